"""The memcached store: one record per UAID, shared by every node.

Each UAID is one memcached item (docs/STORAGE.md has the key, the record
format and the expiry rules). Every change is a read-modify-write with
gets/cas (add for creation), retried on conflict, so that two nodes writing
the same UAID at once lose nothing; an update reads the holder in the same
round trip.

Why a thread pool: pymemcache is a blocking client, and a memcached call
made on the IOLoop would stall every socket of the node for its duration
(up to the timeout when a server is gone). Each Store call runs as ONE job
in a bounded ThreadPoolExecutor: a whole CAS loop costs one thread hand-off,
and at most `threads` calls wait on memcached while the IOLoop keeps
serving. Each worker thread owns its HashClient (one connection per server),
so no client state is shared between threads and nothing needs a lock.

Why a fixed ring: HashClient would move a failing server's keys to another
server. Nodes notice failures at different times, so for a while they would
read and write one UAID on different servers, answering 202 for updates
that the device's node never reads. Here a server keeps its keys: calls for
them raise StoreError (callers answer 503) until it is back, and every call
tries it again, so service resumes as soon as it answers.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pymemcache.client.hash import HashClient
from pymemcache.client.rendezvous import RendezvousHash
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError

from simplepush.protocol import Wakeup
from simplepush.store import Holder, Store, StoreError
from simplepush.updates import Update

T = TypeVar("T")
Record = dict[str, Any]
# change(record or None when absent, now) -> (record to write or None, the call's result)
Change = Callable[[Record | None, float], tuple[Record | None, T]]

KEY_PREFIX = "u:"
# memcached reads an expiry above 30 days as a unix time, not a duration.
MAX_RELATIVE_EXPIRY = 30 * 86400
# A lost CAS means another writer got in first: retry after a random pause
# whose bound doubles each time (full jitter) up to CAS_BACKOFF_CAP, for at
# most `timeout` seconds in all.
CAS_BACKOFF = 0.0005
CAS_BACKOFF_CAP = 0.05

# A connection memcached closed while it was idle (a restart) fails on its
# first use; the call is run once more on a new connection. Every Store call
# is idempotent, so running it again is safe.
_STALE = (MemcacheUnexpectedCloseError, ConnectionResetError, BrokenPipeError)
_FAILURES = (MemcacheError, OSError, ValueError)


class _FixedRing(RendezvousHash):
    """Consistent hashing whose servers never leave: see "Why a fixed ring" above."""

    def remove_node(self, node: str) -> None:
        return None


def _server_address(server: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (validated by config) as a socket address."""
    host, _, port = server.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _again_if_stale(call: Callable[[], T]) -> T:
    try:
        return call()
    except _STALE:
        return call()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, MemcacheError) and exc.args and isinstance(exc.args[0], bytes):
        return f"{type(exc).__name__}: {exc.args[0].decode('ascii', 'replace')}"
    return str(exc) or type(exc).__name__


def _encode(record: Record) -> bytes:
    """A JSON header, a newline, then each pending entry's data as raw UTF-8.

    Data stays out of the JSON so that escaping cannot inflate it: a record
    is at most its header plus the byte lengths of its data (docs/STORAGE.md).
    """
    blobs = []
    header = dict(record)
    header["p"] = pending = {}
    for chid, (version, data, stored_at) in record["p"].items():
        if data is None:
            pending[chid] = [version, None, stored_at]
        else:
            blob = data.encode("utf-8")
            blobs.append(blob)
            pending[chid] = [version, len(blob), stored_at]
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False)
    return b"".join((text.encode("utf-8"), b"\n", *blobs))


def _decode(value: bytes) -> Record:
    """JSON never holds a raw newline, so the first one ends the header."""
    offset = value.index(b"\n") + 1
    record = json.loads(value[: offset - 1])
    for entry in record["p"].values():
        size = entry[1]
        if size is not None:
            entry[1] = value[offset : offset + size].decode("utf-8")
            offset += size
    return record


def _holder(record: Record) -> Holder | None:
    held = record.get("h")
    return Holder(held[0], held[1]) if held is not None else None


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
        threads: int = 16,
    ) -> None:
        self._servers = [_server_address(server) for server in servers]
        self._pending_ttl = pending_ttl
        self._uaid_ttl = uaid_ttl
        self._timeout = timeout
        self._local = threading.local()
        self._clients: list[HashClient] = []
        self._clients_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(
            threads, thread_name_prefix="memcached", initializer=self._open_client
        )

    def _open_client(self) -> None:
        """Runs in each worker thread as it starts: its own client, its own sockets."""
        client = HashClient(
            self._servers,
            hasher=_FixedRing,
            connect_timeout=self._timeout,
            timeout=self._timeout,
            no_delay=True,
            default_noreply=False,
            # Fail at once and raise: HashClient returns silent defaults (None,
            # False) for a server it is "retrying", which would read as "no record".
            retry_attempts=0,
        )
        self._local.client = client
        with self._clients_lock:
            self._clients.append(client)

    async def _call(self, what: str, key: str, job: Callable[[HashClient, str], T]) -> T:
        """Run job(client, key) as one executor job; memcached failures become StoreError."""
        try:
            future = asyncio.get_running_loop().run_in_executor(
                self._executor, self._run, what, key, job
            )
        except RuntimeError:
            raise StoreError("memcached store is closed") from None
        return await future

    def _run(self, what: str, key: str, job: Callable[[HashClient, str], T]) -> T:
        client: HashClient = self._local.client
        try:
            return _again_if_stale(lambda: job(client, key))
        except _FAILURES as exc:
            server = client.hasher.get_node(key)
            raise StoreError(f"memcached {server}: {what} failed: {_describe(exc)}") from exc

    async def _change(self, what: str, uaid: str, change: Change[T]) -> T:
        return await self._call(
            what, KEY_PREFIX + uaid, lambda client, key: self._modify(client, key, change)
        )

    def _expiry(self, record: Record) -> int:
        """uaid_ttl after the last hello, as memcached wants it (relative up to 30 days)."""
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
        return record

    def _read(self, client: HashClient, key: str) -> Record | None:
        data = client.get(key)
        return self._load(data, time.time()) if data is not None else None

    def _modify(self, client: HashClient, key: str, change: Change[T]) -> T:
        """Read-modify-write with gets/cas (add when absent), retried while another writer wins.

        change(record, now) returns the record to write (None: nothing to
        write) and the call's result; it runs again on the fresh record after
        a lost race.
        """
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            data, token = client.gets(key)
            now = time.time()
            record = self._load(data, now) if data is not None else None
            new, result = change(record, now)
            if new is None:
                return result
            value, expire = _encode(new), self._expiry(new)
            if token is None:
                stored = client.add(key, value, expire=expire)
            else:
                stored = client.cas(key, value, token, expire=expire)
            if stored:
                return result
            attempt += 1
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"memcached {client.hasher.get_node(key)}: {key} changed under"
                    f" {attempt} writes in a row for {self._timeout} s"
                )
            time.sleep(random.uniform(0, min(CAS_BACKOFF_CAP, CAS_BACKOFF * 2**attempt)))

    async def known(self, uaid: str) -> bool:
        return await self._call(
            "known", KEY_PREFIX + uaid, lambda client, key: client.get(key) is not None
        )

    async def hello(self, uaid: str, wakeup: Wakeup | None, holder: Holder) -> Holder | None:
        def change(record: Record | None, now: float) -> tuple[Record, Holder | None]:
            if record is None:
                record = {"c": {}, "p": {}}
            record["s"] = int(now)
            if wakeup is None:
                record.pop("w", None)
            else:
                record["w"] = [wakeup.ip, wakeup.port, wakeup.mcc, wakeup.mnc, wakeup.netid]
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
        def job(client: HashClient, key: str) -> Wakeup | None:
            record = self._read(client, key)
            if record is None or "w" not in record:
                return None
            return Wakeup(*record["w"])

        return await self._call("wakeup", KEY_PREFIX + uaid, job)

    async def drop(self, uaid: str) -> None:
        await self._call("drop", KEY_PREFIX + uaid, lambda client, key: client.delete(key))

    async def register(self, uaid: str, chid: str, spelling: str, max_channels: int) -> bool:
        def change(record: Record | None, now: float) -> tuple[Record | None, bool]:
            if record is None:
                record = {"c": {}, "p": {}, "s": int(now)}
            else:
                known = record["c"].get(chid)
                if known == spelling:
                    return None, True
                if known is None and len(record["c"]) >= max_channels:
                    return None, False
            record["c"][chid] = spelling
            return record, True

        return await self._change("register", uaid, change)

    async def unregister(self, uaid: str, chid: str) -> None:
        def change(record: Record | None, now: float) -> tuple[Record | None, None]:
            if record is None or (chid not in record["c"] and chid not in record["p"]):
                return None, None
            record["c"].pop(chid, None)
            record["p"].pop(chid, None)
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
        def job(client: HashClient, key: str) -> list[Update]:
            record = self._read(client, key)
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

    async def check(self) -> None:
        """A real round trip to every server: set a short-lived random key and read it back."""

        def job(client: HashClient, key: str) -> None:
            token = key.encode("ascii")
            for name, server in client.clients.items():
                try:
                    _again_if_stale(lambda server=server: server.set(key, token, expire=10))
                    if server.get(key) != token:
                        raise StoreError(f"memcached {name}: check read back another value")
                except _FAILURES as exc:
                    raise StoreError(f"memcached {name}: check failed: {_describe(exc)}") from exc

        await self._call("check", f"check:{os.urandom(8).hex()}", job)

    async def close(self) -> None:
        """Finish queued calls in the pool's threads, then close every connection."""
        await asyncio.to_thread(self._shutdown)

    def _shutdown(self) -> None:
        self._executor.shutdown(wait=True)
        for client in self._clients:
            client.close()
