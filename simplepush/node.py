"""What one server process shares among its sessions and handlers."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from simplepush.logs import event
from simplepush.metrics import Metrics
from simplepush.registry import STORAGE_RESTARTED, Registry
from simplepush.router import Router
from simplepush.stats import Stats
from simplepush.store import Store, StoreError
from simplepush.tokens import TokenCodec
from simplepush.vapid import Verifier


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
    # Limits on what one peer may send (docs/SECURITY.md), from [server].
    max_message_size: int
    max_body_size: int
    max_header_size: int
    min_ping_interval: float
    vapid: Verifier  # checks the VAPID headers of WebPush POSTs
    max_queued: int  # undelivered WebPush messages per channel
    started_at: float = field(default_factory=time.time)
    # Identified sessions (those holding a UAID), kept here so /realstatus need not scan sockets.
    devices: int = 0
    # PUTs read and not yet answered: a shutdown answers them first.
    puts_in_flight: int = 0
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

    async def sweep(self) -> None:
        """One bounded slice of expired WebPush messages; a failure waits for the next turn."""
        try:
            removed = await self.store.sweep()
        except StoreError as exc:
            self.storage_failed("sweep", exc, logging.WARNING)
            return
        if removed:
            event(logging.DEBUG, "storage.swept", messages=removed)

    def records_lost(self, affected: Callable[[str], bool]) -> None:
        """A storage server went away and may come back empty (docs/STORAGE.md).

        Its devices would stay connected but unreachable, their endpoints
        answering 404; closed, they say hello again and are reset if their
        record is gone.
        """
        closed = self.registry.close_where(affected, *STORAGE_RESTARTED)
        event(logging.WARNING, "storage.lost", closed_sockets=closed)

    def endpoint(self, uaid: str, chid: str) -> str:
        return f"{self.endpoint_url}/update/{self.tokens.encode(uaid, chid)}"

    def webpush_endpoint(self, uaid: str, chid: str, key_hash: bytes | None) -> str:
        """v1 for a subscription without an application server key, v2 bound to one."""
        token = self.tokens.encode_webpush(uaid, chid, key_hash)
        return f"{self.endpoint_url}/wpush/{'v1' if key_hash is None else 'v2'}/{token}"
