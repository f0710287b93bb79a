"""The embedded store: everything in this process's memory.

The default backend, so that one command starts a working server. State is
lost on restart (the server warns at start); several processes cannot
share it (config refuses processes > 1 with it).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from simplepush.protocol import Wakeup
from simplepush.store import Enqueued, Fresh, Holder, Store, WrongUAID
from simplepush.updates import Update
from simplepush.webpush import Message

# Records looked at per sweep call: expiry never holds the loop for long.
SWEEP_SLICE = 1000


class _Record:
    __slots__ = (
        "channels",
        "holder",
        "messages",
        "pending",
        "registered",
        "wakeup",
        "wakeup_claimed",
        "webpush",
    )

    def __init__(self, webpush: bool = False) -> None:
        self.channels: dict[str, str] = {}  # channel key -> the device's spelling
        self.pending: dict[str, Update] = {}
        # WebPush: message id -> (channel key, message), in the order accepted.
        self.messages: dict[str, tuple[str, Message]] = {}
        self.wakeup: Wakeup | None = None
        self.wakeup_claimed = float("-inf")  # when a node last claimed a wake-up (time.time())
        self.holder: Holder | None = None
        self.registered = False  # ever: a UAID that had channels stays known without them
        self.webpush = webpush


class MemoryStore(Store):
    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._queued: set[str] = set()  # UAIDs with WebPush messages, for the sweep
        self._sweep_order: list[str] = []

    async def known(self, uaid: str) -> bool:
        return uaid in self._records

    async def hello(
        self,
        uaid: str,
        wakeup: Wakeup | None,
        holder: Holder,
        webpush: bool = False,
        create: bool = True,
    ) -> Holder | None:
        record = self._records.get(uaid)
        if record is None:
            if not create:
                raise WrongUAID(uaid)
            record = self._records[uaid] = _Record(webpush)
        elif record.webpush != webpush:
            raise WrongUAID(uaid)
        record.wakeup = wakeup
        other = record.holder
        if other == holder:
            return None
        if other is None or other.connected_at <= holder.connected_at:
            record.holder = holder
        return other

    async def release(self, uaid: str, holder: Holder) -> None:
        record = self._records.get(uaid)
        if record is not None and record.holder == holder:
            record.holder = None
            if not record.registered:
                # Nothing to keep: else every anonymous hello would stay until restart.
                del self._records[uaid]

    async def wakeup(self, uaid: str) -> Wakeup | None:
        record = self._records.get(uaid)
        return record.wakeup if record is not None else None

    async def claim_wakeup(self, uaid: str, interval: int) -> Wakeup | None:
        record = self._records.get(uaid)
        if record is None or record.wakeup is None:
            return None
        now = time.time()
        if now - record.wakeup_claimed < interval:
            return None
        record.wakeup_claimed = now
        return record.wakeup

    async def drop(self, uaid: str) -> None:
        self._records.pop(uaid, None)
        self._queued.discard(uaid)

    async def register(
        self, uaid: str, chid: str, spelling: str, max_channels: int, fresh: Fresh | None = None
    ) -> bool:
        record = self._records.get(uaid)
        if record is None:
            record = self._records[uaid] = _Record(fresh is not None and fresh.webpush)
            if fresh is not None:
                record.holder, record.wakeup = fresh.holder, fresh.wakeup
        channels = record.channels
        if chid not in channels and len(channels) >= max_channels:
            return False
        channels[chid] = spelling
        record.registered = True
        pending = record.pending.get(chid)
        if pending is not None and pending.channel_id != spelling:
            record.pending[chid] = Update(spelling, pending.version, pending.data)
        return True

    async def unregister(self, uaid: str, chid: str) -> None:
        record = self._records.get(uaid)
        if record is not None:
            record.channels.pop(chid, None)
            record.pending.pop(chid, None)
            messages = record.messages
            for mid in [mid for mid, (key, _) in messages.items() if key == chid]:
                del messages[mid]

    async def update(
        self, uaid: str, chid: str, version: int, data: str | None
    ) -> tuple[Update, Holder | None] | None:
        record = self._records.get(uaid)
        if record is None:
            return None
        spelling = record.channels.get(chid)
        if spelling is None:
            return None
        current = record.pending.get(chid)
        if current is None or current.version <= version:
            current = record.pending[chid] = Update(spelling, version, data)
        return current, record.holder

    async def pending(self, uaid: str) -> list[Update]:
        record = self._records.get(uaid)
        return list(record.pending.values()) if record is not None else []

    async def ack(self, uaid: str, acks: Sequence[tuple[str, int]]) -> list[Update]:
        record = self._records.get(uaid)
        if record is None:
            return []
        pending = record.pending
        for chid, version in acks:
            current = pending.get(chid)
            if current is not None and current.version <= version:
                del pending[chid]
        return list(pending.values())

    async def enqueue(
        self, uaid: str, chid: str, message: Message, max_queued: int
    ) -> tuple[Enqueued, Holder | None]:
        record = self._records.get(uaid)
        if record is None or not record.webpush or chid not in record.channels:
            return Enqueued.UNKNOWN, None
        if message.ttl > 0:
            messages = record.messages
            now = time.time()
            queued, replaced = 0, None
            for mid, (key, old) in messages.items():
                if key == chid and old.expires_at > now:
                    if message.topic is not None and old.topic == message.topic:
                        replaced = mid
                    else:
                        queued += 1
            if replaced is None and queued >= max_queued:
                return Enqueued.FULL, record.holder
            if replaced is not None:
                del messages[replaced]
            messages[message.id] = (chid, message)
            self._queued.add(uaid)
        return Enqueued.ACCEPTED, record.holder

    async def messages(self, uaid: str) -> list[Message]:
        record = self._records.get(uaid)
        if record is None:
            return []
        now = time.time()
        return [message for _, message in record.messages.values() if message.expires_at > now]

    async def remove(self, uaid: str, removals: Sequence[tuple[str, str]]) -> None:
        record = self._records.get(uaid)
        if record is None:
            return
        messages = record.messages
        for chid, mid in removals:
            entry = messages.get(mid)
            if entry is not None and entry[0] == chid:
                del messages[mid]

    def changed_elsewhere(self, uaid: str) -> None:
        """Every node reads the one dict: nothing to forget."""

    async def sweep(self) -> int:
        """One slice of the UAIDs holding messages per call, round and round."""
        order = self._sweep_order
        if not order:
            order.extend(self._queued)
        now = time.time()
        removed = 0
        for _ in range(min(SWEEP_SLICE, len(order))):
            uaid = order.pop()
            record = self._records.get(uaid)
            if record is None:
                self._queued.discard(uaid)
                continue
            messages = record.messages
            for mid in [mid for mid, (_, m) in messages.items() if m.expires_at <= now]:
                del messages[mid]
                removed += 1
            if not messages:
                self._queued.discard(uaid)
        return removed

    def watch_losses(self, lost: Callable[[Callable[[str], bool]], None]) -> None:
        """Records live as long as the process: none vanish while it runs."""

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        return None
