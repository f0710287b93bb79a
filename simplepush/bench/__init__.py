"""simplepush-bench: a wire-level load generator for any SimplePush server.

It speaks only the public protocol (WebSocket JSON frames and HTTP PUT to
the pushEndpoint), so it can measure other implementations as well as ours.
"""
