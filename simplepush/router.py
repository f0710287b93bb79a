"""Where an app server's update goes: stored, then written to the device's socket.

This node only knows its own sockets so far; a node that does not hold the
device answers "stored" and the device gets the update on its next hello.
"""

from __future__ import annotations

import enum

from simplepush.registry import Registry
from simplepush.store import Store


class Delivery(enum.Enum):
    UNKNOWN_CHANNEL = 404
    DELIVERED = 200
    STORED = 202


class Router:
    def __init__(self, store: Store, registry: Registry) -> None:
        self._store = store
        self._registry = registry

    async def notify(self, uaid: str, chid: str, version: int, data: str | None) -> Delivery:
        """Store first so that nothing answered 200/202 depends on the socket staying up."""
        update = await self._store.update(uaid, chid, version, data)
        if update is None:
            return Delivery.UNKNOWN_CHANNEL
        session = self._registry.get(uaid)
        if session is not None and session.deliver(update):
            return Delivery.DELIVERED
        return Delivery.STORED
