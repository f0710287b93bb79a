"""Where an app server's update goes: stored, then written to the device's socket.

The store records which node holds each UAID's socket (a Holder). This
node writes to its own sockets and asks the holding node, through Peers,
to write to its; when nobody holds the device, or the holder is gone, the
update stays stored and reaches the device in the flush after its next
hello, which a UDP wake-up may hasten (waker.py).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Coroutine
from typing import Any

from simplepush.logs import event
from simplepush.metrics import Metrics
from simplepush.peers import Peers
from simplepush.registry import Registry
from simplepush.store import Enqueued, Holder, Store, StoreError
from simplepush.updates import Update
from simplepush.waker import Waker
from simplepush.webpush import Message


class Delivery(enum.Enum):
    """What became of an update; the value names it in logs."""

    UNKNOWN_CHANNEL = "unknown_channel"
    DELIVERED = "delivered"  # written to a socket on this node
    ROUTED = "routed"  # written to a socket on another node
    STORED = "stored"
    DISCARDED = "discarded"  # WebPush TTL 0 with no socket to take it now
    FULL = "full"  # WebPush: the channel's queue is at max_queued


class Router:
    def __init__(
        self,
        store: Store,
        registry: Registry,
        peers: Peers,
        metrics: Metrics,
        url: str,
        waker: Waker | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._peers = peers
        self._metrics = metrics
        self.url = url  # this node's name in Holder records
        self.waker = waker  # None: UDP wake-up is off
        self._background: set[asyncio.Future[None]] = set()

    async def notify(self, uaid: str, chid: str, version: int, data: str | None) -> Delivery:
        """Store first so that nothing answered 200/202 depends on a socket staying up."""
        result = await self._store.update(uaid, chid, version, data)
        if result is None:
            return Delivery.UNKNOWN_CHANNEL
        update, holder = result
        return await self._send(uaid, update, holder)

    async def push(self, uaid: str, chid: str, message: Message, max_queued: int) -> Delivery:
        """A WebPush message: queued first when its TTL allows, then sent like an update."""
        enqueued, holder = await self._store.enqueue(uaid, chid, message, max_queued)
        if enqueued is Enqueued.UNKNOWN:
            return Delivery.UNKNOWN_CHANNEL
        if enqueued is Enqueued.FULL:
            return Delivery.FULL
        delivery = await self._send(uaid, message, holder)
        if delivery is Delivery.STORED and message.ttl == 0:
            return Delivery.DISCARDED
        return delivery

    async def _send(self, uaid: str, item: Update | Message, holder: Holder | None) -> Delivery:
        """Write a stored item to the device's socket, here or on the holding node."""
        if holder is None:
            return self._stored(uaid, item)
        if holder.node == self.url:
            session = self._registry.get(uaid)
            if session is not None and session.deliver(item):
                return Delivery.DELIVERED
            if self._registry.arriving(uaid):
                return Delivery.STORED  # the flush after its hello sends it; keep the holder
        else:
            self._metrics.incr("updates.routed.outgoing")
            answer = await self._peers.push(holder.node, uaid, item)
            if answer == 200:
                return Delivery.ROUTED
            if answer == 202:
                return Delivery.STORED  # as above, on the holding node
            self._metrics.incr("updates.routed.error")
        # The holder no longer has the socket: forget it unless a newer one took over.
        await self._store.release(uaid, holder)
        return self._stored(uaid, item)

    def _stored(self, uaid: str, item: Update | Message) -> Delivery:
        """The device is connected nowhere: wake it, unless the item was not kept (TTL 0)."""
        if self.waker is not None and (type(item) is not Message or item.ttl > 0):
            self._spawn(self.waker.wake(uaid))
        return Delivery.STORED

    def displaced(self, uaid: str, older: Holder) -> None:
        """A newer connection took uaid: the older one's node closes its socket."""
        if older.node != self.url:
            self._spawn(self._peers.kick(older.node, uaid, older.connected_at))

    def disconnected(self, uaid: str, connected_at: float) -> None:
        """A device left: clear its holder record without making the socket's close wait."""
        self._spawn(self._release(uaid, Holder(self.url, connected_at)))

    async def close(self) -> None:
        """Stop the releases and wake-ups still running, and wait until they have."""
        self._peers.close()
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.waker is not None:
            self.waker.close()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, uaid: str, holder: Holder) -> None:
        try:
            await self._store.release(uaid, holder)
        except StoreError as exc:
            event(logging.WARNING, "storage.error", op="release", error=str(exc))
