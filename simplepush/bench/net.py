"""Opening client TCP connections from a chosen 127.0.0.x source address."""

from __future__ import annotations

import asyncio
import resource
import socket
import ssl
from typing import TypeVar

from simplepush.bench.settings import Target

P = TypeVar("P", bound=asyncio.Protocol)

# Linux: let connect() pick the ephemeral port for the full 4-tuple instead of
# bind() reserving one per source address; Python does not export the name.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


async def connect(
    protocol: P, target: Target, source_ip: str, tls: ssl.SSLContext | None = None
) -> P:
    """Connect ``protocol`` to ``target`` from ``source_ip``, over TLS when given a context.

    asyncio's ``create_connection(local_addr=...)`` binds too, but cannot set
    IP_BIND_ADDRESS_NO_PORT, so we build and connect the socket ourselves and
    hand it over; the transport still sets TCP_NODELAY.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source_ip, 0))
        await loop.sock_connect(sock, (target.ip, target.port))
        await loop.create_connection(
            lambda: protocol,
            sock=sock,
            ssl=tls,
            server_hostname=target.hostname if tls is not None else None,
        )
    except BaseException:
        sock.close()
        raise
    return protocol


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def ephemeral_ports() -> int:
    """How many source ports one source address can use (ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = map(int, f.read().split())
    except (OSError, ValueError):
        return 28232  # Linux default 32768-60999
    return high - low + 1
