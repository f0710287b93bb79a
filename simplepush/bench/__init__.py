"""simplepush-bench: a wire-level load generator for any SimplePush or WebPush server.

It speaks only the public protocol (WebSocket JSON frames and HTTP PUT, or
with --webpush a VAPID-signed POST, to the pushEndpoint), so it can measure
other implementations as well as ours.
"""
