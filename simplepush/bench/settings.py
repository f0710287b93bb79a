"""Picklable run settings shared by the coordinator and its worker processes."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from simplepush.bench.webpush import Vapid


@dataclass(frozen=True, slots=True)
class Target:
    """A resolved host:port, resolved once so no worker ever calls DNS per socket."""

    host: str  # as written, for the Host header
    ip: str
    port: int
    tls: bool = False  # wss:// or https://

    @classmethod
    def parse(cls, url: str, schemes: tuple[str, ...]) -> tuple[Target, str]:
        """Return the target and the request path of ``url``."""
        parts = urlsplit(url)
        if parts.scheme not in schemes:
            raise ValueError(f"{url!r}: scheme must be one of {', '.join(schemes)}")
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        tls = parts.scheme in ("wss", "https")
        port = parts.port or (443 if tls else 80)
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        return cls(parts.netloc, resolve(parts.hostname), port, tls), path

    @property
    def hostname(self) -> str:
        """The host without its port, as a TLS certificate names it."""
        return urlsplit("//" + self.host).hostname or self.ip


def resolve(host: str) -> str:
    """Resolve ``host`` to one IPv4 address."""
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        return socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]


def parse_source_ips(spec: str) -> tuple[str, ...]:
    """Parse ``127.0.0.1-127.0.0.8``, ``a,b,c`` or a count ``8`` (from 127.0.0.1)."""
    spec = spec.strip()
    if spec.isdigit():
        count = int(spec)
        if not 1 <= count <= 254:
            raise ValueError("source IP count must be 1..254")
        first = int(ipaddress.IPv4Address("127.0.0.1"))
        return tuple(str(ipaddress.IPv4Address(first + i)) for i in range(count))
    ips: list[str] = []
    for item in spec.split(","):
        lo, _, hi = item.strip().partition("-")
        start = ipaddress.IPv4Address(lo)
        end = ipaddress.IPv4Address(hi) if hi else start
        if end < start or int(end) - int(start) > 65535:
            raise ValueError(f"bad source IP range {item!r}")
        ips.extend(str(ipaddress.IPv4Address(i)) for i in range(int(start), int(end) + 1))
    return tuple(ips)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """Everything one worker process needs; sent to it once at spawn."""

    index: int
    devices: int
    first_device: int  # global index of this worker's first device (source IP round-robin)
    ws: Target
    ws_path: str
    ca_file: str  # PEM of the CA (or self-signed certificate) to trust for wss://; "" = system
    source_ips: tuple[str, ...]
    endpoint_base: Target | None  # rewrite pushEndpoint scheme://host:port to this
    connect_concurrency: int
    op_timeout: float
    http_conns: int
    deadline: float  # time.monotonic() value; CLOCK_MONOTONIC is system-wide on Linux
    vapid: Vapid | None = None  # WebPush mode: the run's VAPID key pair; None = SimplePush
    # WebPush: sign a new JWT for every POST, so that no server can answer from a cache of
    # verified headers (measures VAPID verification itself).
    vapid_per_post: bool = False
