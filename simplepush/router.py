"""Where an app server's update goes: stored, then written to the device's socket.

The store records which node holds each UAID's socket. This node writes to
its own sockets; an update for a device held nowhere (or elsewhere) is
answered "stored" and reaches the device in the flush after its next hello.
"""

from __future__ import annotations

import asyncio
import enum
import logging

from simplepush.logs import event
from simplepush.registry import Registry
from simplepush.store import Holder, Store, StoreError


class Delivery(enum.Enum):
    UNKNOWN_CHANNEL = 404
    DELIVERED = 200
    STORED = 202


class Router:
    def __init__(self, store: Store, registry: Registry, url: str) -> None:
        self._store = store
        self._registry = registry
        self.url = url  # this node's name in Holder records
        self._releases: set[asyncio.Task[None]] = set()

    async def notify(self, uaid: str, chid: str, version: int, data: str | None) -> Delivery:
        """Store first so that nothing answered 200/202 depends on the socket staying up."""
        result = await self._store.update(uaid, chid, version, data)
        if result is None:
            return Delivery.UNKNOWN_CHANNEL
        update, holder = result
        if holder is None or holder.node != self.url:
            return Delivery.STORED
        session = self._registry.get(uaid)
        if session is not None and session.deliver(update):
            return Delivery.DELIVERED
        await self._store.release(uaid, holder)
        return Delivery.STORED

    def disconnected(self, uaid: str, connected_at: float) -> None:
        """A device left: clear its holder record without making the socket's close wait."""
        task = asyncio.ensure_future(self._release(uaid, Holder(self.url, connected_at)))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, uaid: str, holder: Holder) -> None:
        try:
            await self._store.release(uaid, holder)
        except StoreError as exc:
            event(logging.WARNING, "storage.error", op="release", error=str(exc))
