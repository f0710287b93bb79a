"""The embedded store: everything in this process's memory.

The default backend, so that one command starts a working server. State is
lost on restart (the server warns at start); several processes cannot
share it (config refuses processes > 1 with it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from simplepush.protocol import Wakeup
from simplepush.store import Holder, Store
from simplepush.updates import Update


class _Record:
    __slots__ = ("channels", "holder", "pending", "registered", "wakeup")

    def __init__(self) -> None:
        self.channels: dict[str, str] = {}  # channel key -> the device's spelling
        self.pending: dict[str, Update] = {}
        self.wakeup: Wakeup | None = None
        self.holder: Holder | None = None
        self.registered = False  # ever: a UAID that had channels stays known without them


class MemoryStore(Store):
    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}

    async def known(self, uaid: str) -> bool:
        return uaid in self._records

    async def hello(self, uaid: str, wakeup: Wakeup | None, holder: Holder) -> Holder | None:
        record = self._records.get(uaid)
        if record is None:
            record = self._records[uaid] = _Record()
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

    async def drop(self, uaid: str) -> None:
        self._records.pop(uaid, None)

    async def register(self, uaid: str, chid: str, spelling: str, max_channels: int) -> bool:
        record = self._records.get(uaid)
        if record is None:
            record = self._records[uaid] = _Record()
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

    def watch_losses(self, lost: Callable[[Callable[[str], bool]], None]) -> None:
        """Records live as long as the process: none vanish while it runs."""

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        return None
