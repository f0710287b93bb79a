"""What one server process shares among its sessions and handlers."""

from __future__ import annotations

from dataclasses import dataclass

from simplepush.metrics import Metrics
from simplepush.registry import Registry
from simplepush.router import Router
from simplepush.store import Store
from simplepush.tokens import TokenCodec


@dataclass(slots=True)
class Node:
    store: Store
    registry: Registry
    router: Router
    tokens: TokenCodec
    metrics: Metrics
    endpoint_url: str
    max_channels: int
    max_connections: int
    hello_timeout: float

    def endpoint(self, uaid: str, chid: str) -> str:
        return f"{self.endpoint_url}/update/{self.tokens.encode(uaid, chid)}"
