"""The memcached store: one record per UAID, shared by every node.

Each UAID is one memcached item (docs/STORAGE.md has the key, the record
format and the expiry rules). Every change is a read-modify-write: a gets,
then a meta set that stores only if the CAS token is unchanged (only if
absent, for creation), retried on conflict, so that two nodes writing the
same UAID at once lose nothing; an update reads the holder in the same
round trip. The node holding a device's socket makes most of its record's
changes (hello, register, ack, release), so it remembers what it last wrote
with the token memcached gave back, and its next change is a single meta
set, no gets; a stale memory costs one refused set. The calls go through
MemcacheClient, which speaks memcached's protocol on the IOLoop without
blocking it (memcache_client.py says why not in threads).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import orjson

from simplepush.protocol import Wakeup
from simplepush.store import Enqueued, Fresh, Holder, Store, StoreError, WrongUAID
from simplepush.store.memcache_client import MemcacheClient, MemcacheFailure
from simplepush.updates import Update
from simplepush.webpush import Message, dashed

T = TypeVar("T")
Record = dict[str, Any]
# change(record or None when absent, now) -> (record to write or None, the call's result)
Change = Callable[[Record | None, float], tuple[Record | None, T]]

KEY_PREFIX = "u:"
# A UAID's last wake-up claim: added (only if absent) on its record's server, expiring
# after the interval, so that of several nodes claiming at once one succeeds.
WAKEUP_PREFIX = "w:"
# memcached reads an expiry above 30 days as a unix time, not a duration.
MAX_RELATIVE_EXPIRY = 30 * 86400
# Seconds a record with no channel, nothing pending and no socket is kept (see _expiry).
EMPTY_RECORD_TTL = 600
# A lost CAS means another writer got in first: retry after a random pause
# whose bound doubles each time (full jitter) up to CAS_BACKOFF_CAP, for at
# most `timeout` seconds in all.
CAS_BACKOFF = 0.0005
CAS_BACKOFF_CAP = 0.05
# memcached's default largest item (-I 1m), less room for the channels (200 of them take
# about 15 KB): a UAID's queued WebPush messages all live in its one item, so past this a
# POST answers 429 (docs/STORAGE.md).
MAX_RECORD = 1024 * 1024 - 64 * 1024
# Records this node last wrote for the devices it holds, at most (see _remember).
RECENT = 65536
# A queued WebPush message: [chid, id, ttl, expires_at, topic, headers, data]; data last.
_Q_DATA = 6


def _encode(record: Record) -> bytes:
    """A JSON header, a newline, then the data of each pending entry and queued message.

    Data stays out of the JSON so that escaping cannot inflate it: a record
    is at most its header plus the byte lengths of its data (docs/STORAGE.md).
    """
    blobs: list[bytes] = []
    header = dict(record)
    header["p"] = {chid: _blob_out(entry, 1, blobs) for chid, entry in record["p"].items()}
    if "q" in record:
        header["q"] = [_blob_out(entry, _Q_DATA, blobs) for entry in record["q"]]
    return b"".join((orjson.dumps(header), b"\n", *blobs))


def _blob_out(entry: list[Any], index: int, blobs: list[bytes]) -> list[Any]:
    """A copy of entry whose data (at index) is replaced by its byte length, kept in blobs."""
    data = entry[index]
    if data is None:
        return entry
    blob = data.encode("utf-8")
    blobs.append(blob)
    copy = list(entry)
    copy[index] = len(blob)
    return copy


def _decode(value: bytes) -> Record:
    """JSON never holds a raw newline, so the first one ends the header."""
    offset = value.index(b"\n") + 1
    record = orjson.loads(value[: offset - 1])
    entries = [(entry, 1) for entry in record["p"].values()]
    entries += [(entry, _Q_DATA) for entry in record.get("q", ())]
    for entry, index in entries:
        size = entry[index]
        if size is not None:
            entry[index] = value[offset : offset + size].decode("utf-8")
            offset += size
    return record


def _holder(record: Record) -> Holder | None:
    held = record.get("h")
    return Holder(held[0], held[1]) if held is not None else None


def _new_record(webpush: bool) -> Record:
    """A UAID's item as its first hello makes it: a WebPush one has a queue ("q")."""
    return {"c": {}, "p": {}, "q": []} if webpush else {"c": {}, "p": {}}


def _keep_wakeup(record: Record, wakeup: Wakeup | None) -> None:
    if wakeup is None:
        record.pop("w", None)
    else:
        record["w"] = [wakeup.ip, wakeup.port, wakeup.mcc, wakeup.mnc, wakeup.netid]


def _message(entry: list[Any]) -> Message:
    return Message(dashed(entry[0]), *entry[1:])


def _updates(record: Record) -> list[Update]:
    channels = record["c"]
    return [Update(channels[chid], entry[0], entry[1]) for chid, entry in record["p"].items()]


class MemcachedStore(Store):
    def __init__(
        self,
        servers: Sequence[str],
        *,
        pending_ttl: int = 3 * 86400,
        uaid_ttl: int = 60 * 86400,
        timeout: float = 5.0,
        node: str | None = None,
    ) -> None:
        self._client = MemcacheClient(servers, timeout)
        self._pending_ttl = pending_ttl
        self._uaid_ttl = uaid_ttl
        self._timeout = timeout
        self._closed = False
        # This node's name in Holder records, and (UAID -> (value, CAS token)) of what it
        # last wrote for the UAIDs it holds; None: remember nothing.
        self._node = node
        self._recent: dict[str, tuple[bytes, int]] = {}

    def watch_losses(self, lost: Callable[[Callable[[str], bool]], None]) -> None:
        client = self._client

        def server_lost(server: object) -> None:
            lost(lambda uaid: client.server_for(KEY_PREFIX + uaid) is server)

        client.lost = server_lost

    async def _call(self, what: str, key: str, job: Callable[[str], Any]) -> Any:
        """Run job(key); memcached failures become StoreError naming the server."""
        if self._closed:
            raise StoreError("memcached store is closed")
        try:
            return await job(key)
        except MemcacheFailure as exc:
            server = self._client.server_for(key).name
            raise StoreError(f"memcached {server}: {what} failed: {exc}") from None

    async def _change(self, what: str, uaid: str, change: Change[T], absent: bool = False) -> T:
        return await self._call(
            what, KEY_PREFIX + uaid, lambda key: self._modify(key, uaid, change, absent)
        )

    def _expiry(self, record: Record) -> int:
        """uaid_ttl after the last hello, as memcached wants it (relative up to 30 days).

        A record with no channel, nothing pending and no socket (a device that
        said hello and left) is kept only briefly: anonymous hellos must not
        fill memcached and push real records out of its LRU.
        """
        if not record["c"] and not record["p"] and not record.get("q") and "h" not in record:
            return EMPTY_RECORD_TTL
        deadline = record["s"] + self._uaid_ttl
        remaining = math.ceil(deadline - time.time())
        if remaining > MAX_RELATIVE_EXPIRY:
            return math.ceil(deadline)
        return max(remaining, 1)

    def _load(self, data: bytes, now: float) -> Record:
        """Decode a record, dropping pending entries older than pending_ttl."""
        record = _decode(data)
        pending = record["p"]
        expired = [chid for chid, entry in pending.items() if now - entry[2] > self._pending_ttl]
        for chid in expired:
            del pending[chid]
        queue = record.get("q")
        if queue:
            queue[:] = [entry for entry in queue if entry[3] > now]
        return record

    async def _read(self, key: str) -> Record | None:
        data, _token = await self._client.gets(key)
        return self._load(data, time.time()) if data is not None else None

    async def _modify(self, key: str, uaid: str, change: Change[T], absent: bool) -> T:
        """Read-modify-write with gets and a meta set that checks the CAS token (that the item
        is absent, for a token of None), retried while another writer wins.

        change(record, now) returns the record to write (None: nothing to
        write) and the call's result; it runs again on the fresh record after
        a lost race. `absent`: the item is surely not there yet (a UAID just
        made up), so the first try is an add without a gets. A record this
        node remembers writing stands in for the gets, but what change makes
        of it counts only once memcached takes the write: a remembered record
        may be stale, and its token then makes the set fail.
        """
        client = self._client
        deadline = time.monotonic() + self._timeout
        attempt = 0
        remembered = self._recent.pop(uaid, None)
        while True:
            # A remembered record serves one try at most; the next one reads.
            guess, remembered = remembered, None
            if absent:
                data, token, absent = None, None, False
            elif guess is not None:
                data, token = guess
            else:
                data, token = await client.gets(key)
            now = time.time()
            record = self._load(data, now) if data is not None else None
            try:
                new, result = change(record, now)
            except WrongUAID:
                if guess is None:
                    raise
                continue
            if new is None:
                if guess is None:
                    return result
                continue  # the answer must come from memcached's own record
            value, expire = _encode(new), self._expiry(new)
            stored, written = await client.swap(key, value, expire, token)
            if stored:
                if written is not None:
                    self._remember(uaid, new, value, written)
                return result
            if guess is not None:
                continue  # the memory was stale: no race lost, no pause
            attempt += 1
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"memcached {client.server_for(key).name}: {key} changed under"
                    f" {attempt} writes in a row for {self._timeout} s"
                )
            await asyncio.sleep(random.uniform(0, min(CAS_BACKOFF_CAP, CAS_BACKOFF * 2**attempt)))

    def _remember(self, uaid: str, record: Record, value: bytes, token: int) -> None:
        """Keep what was written while this node holds the UAID: its sessions write next.

        Keyed by the UAID itself, the string its session holds too."""
        held = record.get("h")
        recent = self._recent
        if held is None or held[0] != self._node:
            return
        if len(recent) >= RECENT:
            del recent[next(iter(recent))]  # the oldest entry
        recent[uaid] = (value, token)

    def changed_elsewhere(self, uaid: str) -> None:
        self._recent.pop(uaid, None)

    async def known(self, uaid: str) -> bool:
        async def job(key: str) -> bool:
            return await self._client.get(key) is not None

        return await self._call("known", KEY_PREFIX + uaid, job)

    async def hello(
        self,
        uaid: str,
        wakeup: Wakeup | None,
        holder: Holder,
        webpush: bool = False,
        create: bool = True,
    ) -> Holder | None:
        def change(record: Record | None, now: float) -> tuple[Record, Holder | None]:
            if record is None:
                if not create:
                    raise WrongUAID(uaid)
                record = _new_record(webpush)
            elif ("q" in record) != webpush:
                raise WrongUAID(uaid)
            record["s"] = int(now)
            _keep_wakeup(record, wakeup)
            other = _holder(record)
            if other == holder:
                return record, None
            if other is None or other.connected_at <= holder.connected_at:
                record["h"] = [holder.node, holder.connected_at]
            return record, other

        return await self._change("hello", uaid, change)

    async def release(self, uaid: str, holder: Holder) -> None:
        def change(record: Record | None, now: float) -> tuple[Record | None, None]:
            if record is None or _holder(record) != holder:
                return None, None
            del record["h"]
            return record, None

        await self._change("release", uaid, change)

    async def wakeup(self, uaid: str) -> Wakeup | None:
        async def job(key: str) -> Wakeup | None:
            record = await self._read(key)
            if record is None or "w" not in record:
                return None
            return Wakeup(*record["w"])

        return await self._call("wakeup", KEY_PREFIX + uaid, job)

    async def claim_wakeup(self, uaid: str, interval: int) -> Wakeup | None:
        client = self._client

        async def job(key: str) -> Wakeup | None:
            record = await self._read(key)
            if record is None or "w" not in record:
                return None
            # memcached's clock ticks in whole seconds: an item given n seconds may go
            # up to one second early, so it gets one more and lives at least `interval`.
            claim, server = b"%d" % time.time(), client.server_for(key)
            if not await client.add(WAKEUP_PREFIX + uaid, claim, interval + 1, server):
                return None
            return Wakeup(*record["w"])

        return await self._call("claim_wakeup", KEY_PREFIX + uaid, job)

    async def drop(self, uaid: str) -> None:
        self.changed_elsewhere(uaid)
        await self._call("drop", KEY_PREFIX + uaid, self._client.delete)

    async def register(
        self, uaid: str, chid: str, spelling: str, max_channels: int, fresh: Fresh | None = None
    ) -> bool:
        def change(record: Record | None, now: float) -> tuple[Record | None, bool]:
            if record is None:
                record = _new_record(fresh is not None and fresh.webpush)
                record["s"] = int(now)
                if fresh is not None:
                    _keep_wakeup(record, fresh.wakeup)
                    record["h"] = [fresh.holder.node, fresh.holder.connected_at]
            else:
                known = record["c"].get(chid)
                if known == spelling:
                    return None, True
                if known is None and len(record["c"]) >= max_channels:
                    return None, False
            record["c"][chid] = spelling
            return record, True

        return await self._change("register", uaid, change, absent=fresh is not None)

    async def unregister(self, uaid: str, chid: str) -> None:
        def change(record: Record | None, now: float) -> tuple[Record | None, None]:
            if record is None:
                return None, None
            queue = record.get("q", [])
            queued = any(entry[0] == chid for entry in queue)
            if chid not in record["c"] and chid not in record["p"] and not queued:
                return None, None
            record["c"].pop(chid, None)
            record["p"].pop(chid, None)
            if queued:
                record["q"] = [entry for entry in queue if entry[0] != chid]
            return record, None

        await self._change("unregister", uaid, change)

    async def update(
        self, uaid: str, chid: str, version: int, data: str | None
    ) -> tuple[Update, Holder | None] | None:
        def change(
            record: Record | None, now: float
        ) -> tuple[Record | None, tuple[Update, Holder | None] | None]:
            if record is None:
                return None, None
            spelling = record["c"].get(chid)
            if spelling is None:
                return None, None
            current = record["p"].get(chid)
            if current is not None and current[0] > version:
                return None, (Update(spelling, current[0], current[1]), _holder(record))
            record["p"][chid] = [version, data, round(now, 3)]
            return record, (Update(spelling, version, data), _holder(record))

        return await self._change("update", uaid, change)

    async def pending(self, uaid: str) -> list[Update]:
        async def job(key: str) -> list[Update]:
            record = await self._read(key)
            return _updates(record) if record is not None else []

        return await self._call("pending", KEY_PREFIX + uaid, job)

    async def ack(self, uaid: str, acks: Sequence[tuple[str, int]]) -> list[Update]:
        def change(record: Record | None, now: float) -> tuple[Record | None, list[Update]]:
            if record is None:
                return None, []
            pending = record["p"]
            cleared = False
            for chid, version in acks:
                current = pending.get(chid)
                if current is not None and current[0] <= version:
                    del pending[chid]
                    cleared = True
            return (record if cleared else None), _updates(record)

        return await self._change("ack", uaid, change)

    async def enqueue(
        self, uaid: str, chid: str, message: Message, max_queued: int
    ) -> tuple[Enqueued, Holder | None]:
        if message.ttl == 0:

            async def job(key: str) -> tuple[Enqueued, Holder | None]:
                record = await self._read(key)
                if record is None or "q" not in record or chid not in record["c"]:
                    return Enqueued.UNKNOWN, None
                return Enqueued.ACCEPTED, _holder(record)

            return await self._call("enqueue", KEY_PREFIX + uaid, job)
        entry = [
            chid,
            message.id,
            message.ttl,
            message.expires_at,
            message.topic,
            message.headers,
            message.data,
        ]
        size = len(message.data or "") + 256

        def change(
            record: Record | None, now: float
        ) -> tuple[Record | None, tuple[Enqueued, Holder | None]]:
            if record is None or "q" not in record or chid not in record["c"]:
                return None, (Enqueued.UNKNOWN, None)
            queue = record["q"]
            holder = _holder(record)
            topic = message.topic
            kept = [e for e in queue if e[0] != chid or topic is None or e[4] != topic]
            queued = sum(1 for e in kept if e[0] == chid)
            total = sum(len(e[_Q_DATA] or "") + 256 for e in kept)
            if queued >= max_queued or total + size > MAX_RECORD:
                return None, (Enqueued.FULL, holder)
            kept.append(entry)
            record["q"] = kept
            return record, (Enqueued.ACCEPTED, holder)

        return await self._change("enqueue", uaid, change)

    async def messages(self, uaid: str) -> list[Message]:
        async def job(key: str) -> list[Message]:
            record = await self._read(key)
            return [_message(e) for e in record.get("q", ())] if record is not None else []

        return await self._call("messages", KEY_PREFIX + uaid, job)

    async def remove(self, uaid: str, removals: Sequence[tuple[str, str]]) -> None:
        doomed = set(removals)

        def change(record: Record | None, now: float) -> tuple[Record | None, None]:
            queue = record.get("q") if record is not None else None
            if not queue:
                return None, None
            kept = [e for e in queue if (e[0], e[1]) not in doomed]
            if len(kept) == len(queue):
                return None, None
            record["q"] = kept
            return record, None

        await self._change("remove", uaid, change)

    async def sweep(self) -> int:
        """memcached expires items itself, and every read drops expired messages."""
        return 0

    async def check(self) -> None:
        """A real round trip to every server: add a short-lived random key with a meta set,
        as every change does, and read it back."""
        key = f"check:{os.urandom(8).hex()}"
        token = key.encode("ascii")
        for server in self._client.servers():
            try:
                stored, _written = await self._client.swap(key, token, 10, None, server)
                if not stored or await self._client.get(key, server) != token:
                    raise StoreError(f"memcached {server.name}: check read back another value")
            except MemcacheFailure as exc:
                raise StoreError(f"memcached {server.name}: check failed: {exc}") from None

    async def close(self) -> None:
        self._closed = True
        self._client.close()
