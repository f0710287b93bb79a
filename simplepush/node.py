"""What one server process shares among its sessions and handlers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from simplepush.logs import event
from simplepush.metrics import Metrics
from simplepush.registry import Registry
from simplepush.router import Router
from simplepush.stats import Stats
from simplepush.store import Store
from simplepush.tokens import TokenCodec


@dataclass(slots=True)
class Node:
    store: Store
    registry: Registry
    router: Router
    tokens: TokenCodec
    metrics: Metrics
    stats: Stats  # the dashboard's counters, also fed by `metrics`
    endpoint_url: str
    max_channels: int
    max_connections: int
    hello_timeout: float
    started_at: float = field(default_factory=time.time)
    # Identified sessions (those holding a UAID), kept here so /realstatus need not scan sockets.
    devices: int = 0
    # The last StoreError seen, for /realstatus: operators ask "what broke, and when".
    last_storage_error: str = ""
    last_storage_error_at: float | None = None

    def storage_failed(self, op: str, exc: Exception, level: int = logging.ERROR) -> str:
        """Log a storage failure and remember it for /realstatus; returns its text."""
        text = str(exc) or type(exc).__name__
        self.last_storage_error = text
        self.last_storage_error_at = time.time()
        event(level, "storage.error", op=op, error=text)
        return text

    def endpoint(self, uaid: str, chid: str) -> str:
        return f"{self.endpoint_url}/update/{self.tokens.encode(uaid, chid)}"
