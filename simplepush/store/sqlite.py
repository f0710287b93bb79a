"""The SQLite store: durable on one machine, one file shared by its worker processes.

Every UAID, channel, pending update and queued WebPush message is a row of
one database file in WAL mode (sqlite_file.py has the schema); each worker
opens its own connection. Calls run on the event loop: the writes queued
during one turn of the loop go in one transaction on the next (group
commit), taken with BEGIN IMMEDIATE so that every read-modify-write is
atomic; reads are single statements, which WAL never blocks. With
synchronous = NORMAL a commit is a write() into the WAL, no fsync; the
fsyncs happen in checkpoints, in a thread. A transaction that finds
another process writing does not wait inside SQLite (busy_timeout 0: that
would sleep the whole loop) but is retried after a pause by a timer.
docs/STORAGE.md ("sqlite") says what survives what; docs/PERFORMANCE.md
("SQLite: on the loop or in a thread") has the measurements behind this.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from simplepush.protocol import Wakeup
from simplepush.store import Enqueued, Fresh, Holder, Store, StoreError, WrongUAID
from simplepush.store.sqlite_file import TABLES, Checkpointer, file_stats, open_database
from simplepush.updates import Update
from simplepush.webpush import Message, dashed

T = TypeVar("T")

# Rows of messages and of pending that one sweep looks at, and UAIDs (each past
# uaid_ttl goes with its channels, pending updates and messages): about 3 ms on the
# loop when every row has expired. Reads skip what expired, so the sweep only gives the
# space back, at its pace; in exchange no write pays for an index on expiry times.
SWEEP_SLICE = 100
SWEEP_UAIDS = 20
# Writes that find another process writing wait in the queue, retried after a random
# pause whose bound doubles from BUSY_BACKOFF to BUSY_BACKOFF_CAP; each fails after
# `timeout` s. At most BATCH go in one transaction (about a millisecond on the loop).
BUSY_BACKOFF = 0.0002
BUSY_BACKOFF_CAP = 0.005
BATCH = 32


def _busy(exc: sqlite3.Error) -> bool:
    """Another connection holds the lock: worth retrying, nothing is wrong."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


def _holder(node: str | None, connected_at: float | None) -> Holder | None:
    return None if node is None or connected_at is None else Holder(node, connected_at)


def _forget(db: sqlite3.Connection, uaid: str) -> None:
    for table in TABLES:
        db.execute(f"DELETE FROM {table} WHERE uaid = ?", (uaid,))


def _wake(wakeup: Wakeup | None) -> tuple[Any, ...]:
    """The wake_* columns' values."""
    if wakeup is None:
        return (None,) * 5
    return (wakeup.ip, wakeup.port, wakeup.mcc, wakeup.mnc, wakeup.netid)


def _insert_uaid(
    db: sqlite3.Connection, now: float, uaid: str, fresh: Fresh | None, registered: bool
) -> None:
    """A UAID's row, as its hello makes it or (without a hello, fresh None) its register."""
    holder = fresh.holder if fresh is not None else None
    db.execute(
        "INSERT INTO uaids (uaid, kind, registered, holder_node, holder_at, wake_ip,"
        " wake_port, wake_mcc, wake_mnc, wake_netid, seen_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            uaid,
            int(fresh is not None and fresh.webpush),
            int(registered),
            holder.node if holder is not None else None,
            holder.connected_at if holder is not None else None,
            *_wake(fresh.wakeup if fresh is not None else None),
            now,
        ),
    )


class _Busy(Exception):
    """Another process holds the write lock."""


class _Job:
    """One write call: what to run, and where its result goes."""

    __slots__ = ("args", "deadline", "future", "op", "what")

    def __init__(
        self,
        what: str,
        op: Callable[..., Any],
        args: tuple[Any, ...],
        future: asyncio.Future,
        deadline: float,
    ) -> None:
        self.what = what
        self.op = op
        self.args = args
        self.future = future
        self.deadline = deadline  # still waiting for the lock then: StoreError


def _settle(jobs: Sequence[_Job], outcomes: Sequence[tuple[Any, BaseException | None]]) -> None:
    """Hand each job its (result, error), unless its caller has gone (a cancelled future)."""
    for job, (result, error) in zip(jobs, outcomes, strict=True):
        if job.future.done():
            continue
        if error is None:
            job.future.set_result(result)
        else:
            job.future.set_exception(error)


def _pause(attempt: int) -> float:
    """Random, with a bound doubling from BUSY_BACKOFF to BUSY_BACKOFF_CAP."""
    bound = min(BUSY_BACKOFF_CAP, BUSY_BACKOFF * 2**attempt)
    return random.uniform(bound / 2, bound)


class SqliteStore(Store):
    def __init__(
        self,
        path: str,
        *,
        pending_ttl: int = 3 * 86400,
        uaid_ttl: int = 60 * 86400,
        timeout: float = 5.0,
    ) -> None:
        self.path = path
        self._pending_ttl = pending_ttl
        self._uaid_ttl = uaid_ttl
        self._timeout = timeout
        self._db: sqlite3.Connection | None = open_database(path, timeout)
        self._closed = False
        self._waiting: deque[_Job] = deque()  # writes for the next transaction
        self._flusher: asyncio.Handle | None = None  # the next _flush, when one is due
        # Where the next sweep starts in messages (seq), pending (uaid, chid) and uaids.
        self._sweep_cursor: tuple[int, tuple[str, str], str] = (0, ("", ""), "")
        self._checkpointer = Checkpointer(path)
        self._checkpointer.start()

    # --- running calls ---------------------------------------------------------------

    async def _run(self, what: str, op: Callable[..., T], *args: Any, write: bool = True) -> T:
        """op(db, now, *args) in a transaction; SQLite's errors become StoreError.

        A write joins this process's queue, and the writes queued during one
        turn of the loop go in one transaction on the next (see _flush): one
        commit for many, and a busy database costs one retry, not one per
        write. Reads are one statement each, a transaction of their own, and
        never wait for writers (WAL).
        """
        if self._closed:
            raise StoreError("sqlite store is closed")
        if not write:
            return await self._read(what, op, args)
        loop = asyncio.get_running_loop()
        job = _Job(what, op, args, loop.create_future(), time.monotonic() + self._timeout)
        self._waiting.append(job)
        if self._flusher is None:
            self._flusher = loop.call_soon(self._flush)
        return await job.future

    async def _read(self, what: str, op: Callable[..., T], args: tuple[Any, ...]) -> T:
        deadline = time.monotonic() + self._timeout
        attempt = 0
        while True:
            try:
                return op(self._connection(), time.time(), *args)
            except sqlite3.Error as exc:
                if not _busy(exc):
                    self._discard()
                    raise StoreError(f"sqlite {self.path}: {what} failed: {exc}") from None
            attempt += 1
            if time.monotonic() >= deadline:
                raise StoreError(self._locked(what))
            await asyncio.sleep(_pause(attempt))

    def _flush(self, attempt: int = 0) -> None:
        """Up to BATCH queued writes in one transaction; the rest on the next turn.

        When another process holds the lock, the batch goes back to the front
        of the queue and this runs again after a pause that grows with each
        attempt: the loop never waits, and nothing spins. A write that waited
        `timeout` seconds fails.
        """
        loop = asyncio.get_running_loop()
        self._flusher = None
        batch = [self._waiting.popleft() for _ in range(min(BATCH, len(self._waiting)))]
        try:
            self._transaction(batch)
        except _Busy:
            self._waiting.extendleft(reversed(batch))
            now = time.monotonic()
            while self._waiting and self._waiting[0].deadline <= now:
                job = self._waiting.popleft()
                _settle([job], [(None, StoreError(self._locked(job.what)))])
            if self._waiting:
                self._flusher = loop.call_later(_pause(attempt + 1), self._flush, attempt + 1)
            return
        if self._waiting:
            self._flusher = loop.call_soon(self._flush)

    def _transaction(self, jobs: list[_Job]) -> None:
        """Run jobs in one transaction and settle their futures; _Busy when locked.

        With several jobs each has a savepoint, so that one raising
        (WrongUAID) leaves the others' writes in; a lone job that raises is
        rolled back. Any SQLite error fails them all, as none is committed,
        and closes the connection: the next call opens a new one, so that
        the store recovers once the fault (a full disk, a replaced file)
        clears.
        """
        jobs = [job for job in jobs if not job.future.done()]  # cancelled callers
        if not jobs:
            return
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            if _busy(exc):
                raise _Busy from None
            self._fail(jobs, exc)
            return
        except StoreError as exc:  # the file cannot be opened again (yet)
            _settle(jobs, [(None, StoreError(f"sqlite {job.what} failed: {exc}")) for job in jobs])
            return
        now = time.time()
        several = len(jobs) > 1
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            for job in jobs:
                if several:
                    db.execute("SAVEPOINT job")
                try:
                    outcomes.append((job.op(db, now, *job.args), None))
                except (WrongUAID, StoreError) as exc:
                    if several:
                        db.execute("ROLLBACK TO job")
                    outcomes.append((None, exc))
                if several:
                    db.execute("RELEASE job")
            db.execute("COMMIT" if several or outcomes[0][1] is None else "ROLLBACK")
        except sqlite3.Error as exc:
            self._fail(jobs, exc)
            return
        except Exception as exc:  # a bug: every caller hears of it, none waits forever
            self._rollback(db)
            outcomes = [(None, exc)] * len(jobs)
        _settle(jobs, outcomes)

    def _fail(self, jobs: list[_Job], exc: sqlite3.Error) -> None:
        if self._db is not None:
            self._rollback(self._db)
        self._discard()
        failed = [StoreError(f"sqlite {self.path}: {job.what} failed: {exc}") for job in jobs]
        _settle(jobs, [(None, error) for error in failed])

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self._db = open_database(self.path, 0)
        return self._db

    def _discard(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _locked(self, what: str) -> str:
        return (
            f"sqlite {self.path}: {what}: the database stayed locked by another process"
            f" for {self._timeout:g} s"
        )

    def _fresh(self, now: float) -> float:
        """The oldest last hello a UAID may have and still count."""
        return now - self._uaid_ttl

    # --- the Store interface -----------------------------------------------------------

    async def known(self, uaid: str) -> bool:
        return await self._run("known", self._known, uaid, write=False)

    def _known(self, db: sqlite3.Connection, now: float, uaid: str) -> bool:
        row = db.execute("SELECT seen_at FROM uaids WHERE uaid = ?", (uaid,)).fetchone()
        return row is not None and row[0] >= self._fresh(now)

    def _record(self, db: sqlite3.Connection, now: float, uaid: str) -> tuple[Any, ...] | None:
        """(kind, registered, holder_node, holder_at) of a live record; an expired one goes."""
        row = db.execute(
            "SELECT kind, registered, holder_node, holder_at, seen_at FROM uaids WHERE uaid = ?",
            (uaid,),
        ).fetchone()
        if row is not None and row[4] < self._fresh(now):
            _forget(db, uaid)
            return None
        return row

    async def hello(
        self,
        uaid: str,
        wakeup: Wakeup | None,
        holder: Holder,
        webpush: bool = False,
        create: bool = True,
    ) -> Holder | None:
        return await self._run("hello", self._hello, uaid, wakeup, holder, webpush, create)

    def _hello(
        self,
        db: sqlite3.Connection,
        now: float,
        uaid: str,
        wakeup: Wakeup | None,
        holder: Holder,
        webpush: bool,
        create: bool,
    ) -> Holder | None:
        row = self._record(db, now, uaid)
        if row is None:
            if not create:
                raise WrongUAID(uaid)
            _insert_uaid(db, now, uaid, Fresh(holder, webpush, wakeup), registered=False)
            return None
        if bool(row[0]) != webpush:
            raise WrongUAID(uaid)
        other = _holder(row[2], row[3])
        kept = other if other is not None and other.connected_at > holder.connected_at else holder
        db.execute(
            "UPDATE uaids SET holder_node = ?, holder_at = ?, wake_ip = ?, wake_port = ?,"
            " wake_mcc = ?, wake_mnc = ?, wake_netid = ?, seen_at = ? WHERE uaid = ?",
            (kept.node, kept.connected_at, *_wake(wakeup), now, uaid),
        )
        return None if other == holder else other

    async def release(self, uaid: str, holder: Holder) -> None:
        await self._run("release", self._release, uaid, holder)

    def _release(self, db: sqlite3.Connection, now: float, uaid: str, holder: Holder) -> None:
        key = (uaid, holder.node, holder.connected_at)
        held = "uaid = ? AND holder_node = ? AND holder_at = ?"
        # Nothing to keep of a UAID that never had a channel: else anonymous hellos pile up.
        if not db.execute(f"DELETE FROM uaids WHERE {held} AND registered = 0", key).rowcount:
            db.execute(f"UPDATE uaids SET holder_node = NULL, holder_at = NULL WHERE {held}", key)

    async def wakeup(self, uaid: str) -> Wakeup | None:
        return await self._run("wakeup", self._wakeup, uaid, write=False)

    def _wakeup(self, db: sqlite3.Connection, now: float, uaid: str) -> Wakeup | None:
        row = db.execute(
            "SELECT wake_ip, wake_port, wake_mcc, wake_mnc, wake_netid FROM uaids"
            " WHERE uaid = ? AND seen_at >= ?",
            (uaid, self._fresh(now)),
        ).fetchone()
        return Wakeup(*row) if row is not None and row[0] is not None else None

    async def claim_wakeup(self, uaid: str, interval: int) -> Wakeup | None:
        return await self._run("claim_wakeup", self._claim_wakeup, uaid, interval)

    def _claim_wakeup(
        self, db: sqlite3.Connection, now: float, uaid: str, interval: int
    ) -> Wakeup | None:
        """In the write transaction (BEGIN IMMEDIATE): one process at a time gets it."""
        claimed = db.execute(
            "UPDATE uaids SET wake_at = ? WHERE uaid = ? AND wake_ip IS NOT NULL"
            " AND seen_at >= ? AND (wake_at IS NULL OR wake_at <= ?)",
            (now, uaid, self._fresh(now), now - interval),
        ).rowcount
        return self._wakeup(db, now, uaid) if claimed else None

    async def drop(self, uaid: str) -> None:
        await self._run("drop", lambda db, now: _forget(db, uaid))

    async def register(
        self, uaid: str, chid: str, spelling: str, max_channels: int, fresh: Fresh | None = None
    ) -> bool:
        return await self._run(
            "register", self._register, uaid, chid, spelling, max_channels, fresh
        )

    def _register(
        self,
        db: sqlite3.Connection,
        now: float,
        uaid: str,
        chid: str,
        spelling: str,
        max_channels: int,
        fresh: Fresh | None,
    ) -> bool:
        row = self._record(db, now, uaid)
        if row is None:
            _insert_uaid(db, now, uaid, fresh, registered=True)
        known = db.execute(
            "SELECT spelling FROM channels WHERE uaid = ? AND chid = ?", (uaid, chid)
        ).fetchone()
        if known is None:
            count = db.execute("SELECT count(*) FROM channels WHERE uaid = ?", (uaid,)).fetchone()
            if count[0] >= max_channels:
                return False
            db.execute("INSERT INTO channels VALUES (?, ?, ?)", (uaid, chid, spelling))
        elif known[0] != spelling:
            db.execute(
                "UPDATE channels SET spelling = ? WHERE uaid = ? AND chid = ?",
                (spelling, uaid, chid),
            )
        if row is not None and not row[1]:
            db.execute("UPDATE uaids SET registered = 1 WHERE uaid = ?", (uaid,))
        return True

    async def unregister(self, uaid: str, chid: str) -> None:
        await self._run("unregister", self._unregister, uaid, chid)

    def _unregister(self, db: sqlite3.Connection, now: float, uaid: str, chid: str) -> None:
        for table in ("channels", "pending", "messages"):
            db.execute(f"DELETE FROM {table} WHERE uaid = ? AND chid = ?", (uaid, chid))

    async def update(
        self, uaid: str, chid: str, version: int, data: str | None
    ) -> tuple[Update, Holder | None] | None:
        return await self._run("update", self._update, uaid, chid, version, data)

    def _update(
        self,
        db: sqlite3.Connection,
        now: float,
        uaid: str,
        chid: str,
        version: int,
        data: str | None,
    ) -> tuple[Update, Holder | None] | None:
        row = db.execute(
            "SELECT u.holder_node, u.holder_at, c.spelling, p.version, p.data, p.stored_at"
            " FROM uaids u JOIN channels c ON c.uaid = u.uaid AND c.chid = ?"
            " LEFT JOIN pending p ON p.uaid = u.uaid AND p.chid = c.chid"
            " WHERE u.uaid = ? AND u.seen_at >= ?",
            (chid, uaid, self._fresh(now)),
        ).fetchone()
        if row is None:
            return None
        node, connected_at, spelling, current, current_data, stored_at = row
        holder = _holder(node, connected_at)
        if stored_at is not None and stored_at >= now - self._pending_ttl:
            if current > version:
                return Update(spelling, current, current_data), holder
            db.execute(
                "UPDATE pending SET version = ?, data = ?, stored_at = ?"
                " WHERE uaid = ? AND chid = ?",
                (version, data, now, uaid, chid),
            )
        else:  # a new entry (or one replacing an expired entry) goes last
            db.execute(
                "INSERT OR REPLACE INTO pending VALUES"
                " (?, ?, (SELECT coalesce(max(seq), 0) + 1 FROM pending WHERE uaid = ?), ?, ?, ?)",
                (uaid, chid, uaid, version, data, now),
            )
        return Update(spelling, version, data), holder

    async def pending(self, uaid: str) -> list[Update]:
        return await self._run("pending", self._pending, uaid, write=False)

    def _pending(self, db: sqlite3.Connection, now: float, uaid: str) -> list[Update]:
        rows = db.execute(
            "SELECT c.spelling, p.version, p.data FROM pending p"
            " JOIN uaids u ON u.uaid = p.uaid"
            " JOIN channels c ON c.uaid = p.uaid AND c.chid = p.chid"
            " WHERE p.uaid = ? AND p.stored_at >= ? AND u.seen_at >= ? ORDER BY p.seq",
            (uaid, now - self._pending_ttl, self._fresh(now)),
        ).fetchall()
        return [Update(*row) for row in rows]

    async def ack(self, uaid: str, acks: Sequence[tuple[str, int]]) -> list[Update]:
        return await self._run("ack", self._ack, uaid, acks)

    def _ack(
        self, db: sqlite3.Connection, now: float, uaid: str, acks: Sequence[tuple[str, int]]
    ) -> list[Update]:
        db.executemany(
            "DELETE FROM pending WHERE uaid = ? AND chid = ? AND version <= ?",
            [(uaid, chid, version) for chid, version in acks],
        )
        return self._pending(db, now, uaid)

    async def enqueue(
        self, uaid: str, chid: str, message: Message, max_queued: int
    ) -> tuple[Enqueued, Holder | None]:
        # TTL 0 only checks the channel: one read.
        return await self._run(
            "enqueue", self._enqueue, uaid, chid, message, max_queued, write=message.ttl > 0
        )

    def _enqueue(
        self,
        db: sqlite3.Connection,
        now: float,
        uaid: str,
        chid: str,
        message: Message,
        max_queued: int,
    ) -> tuple[Enqueued, Holder | None]:
        row = db.execute(
            "SELECT u.holder_node, u.holder_at FROM uaids u"
            " JOIN channels c ON c.uaid = u.uaid AND c.chid = ?"
            " WHERE u.uaid = ? AND u.kind = 1 AND u.seen_at >= ?",
            (chid, uaid, self._fresh(now)),
        ).fetchone()
        if row is None:
            return Enqueued.UNKNOWN, None
        holder = _holder(*row)
        if message.ttl == 0:
            return Enqueued.ACCEPTED, holder
        channel = (uaid, chid)
        db.execute(
            "DELETE FROM messages WHERE uaid = ? AND chid = ? AND expires_at <= ?", (*channel, now)
        )
        replaced = (
            message.topic is not None
            and db.execute(
                "DELETE FROM messages WHERE uaid = ? AND chid = ? AND topic = ?",
                (*channel, message.topic),
            ).rowcount
        )
        if not replaced:
            queued = db.execute(
                "SELECT count(*) FROM messages WHERE uaid = ? AND chid = ?", channel
            ).fetchone()[0]
            if queued >= max_queued:
                return Enqueued.FULL, holder
        headers = json.dumps(message.headers) if message.headers is not None else None
        db.execute(
            "INSERT INTO messages (uaid, chid, id, ttl, expires_at, topic, headers, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (*channel, message.id, message.ttl, message.expires_at, message.topic, headers,
             message.data),
        )  # fmt: skip
        return Enqueued.ACCEPTED, holder

    async def messages(self, uaid: str) -> list[Message]:
        return await self._run("messages", self._messages, uaid, write=False)

    def _messages(self, db: sqlite3.Connection, now: float, uaid: str) -> list[Message]:
        rows = db.execute(
            "SELECT m.chid, m.id, m.ttl, m.expires_at, m.topic, m.headers, m.data"
            " FROM messages m JOIN uaids u ON u.uaid = m.uaid"
            " WHERE m.uaid = ? AND m.expires_at > ? AND u.seen_at >= ? ORDER BY m.seq",
            (uaid, now, self._fresh(now)),
        ).fetchall()
        return [
            Message(dashed(chid), mid, ttl, expires, topic, headers and json.loads(headers), data)
            for chid, mid, ttl, expires, topic, headers, data in rows
        ]

    async def remove(self, uaid: str, removals: Sequence[tuple[str, str]]) -> None:
        if removals:
            await self._run("remove", self._remove, uaid, removals)

    def _remove(
        self, db: sqlite3.Connection, now: float, uaid: str, removals: Sequence[tuple[str, str]]
    ) -> None:
        db.executemany(
            "DELETE FROM messages WHERE uaid = ? AND chid = ? AND id = ?",
            [(uaid, chid, mid) for chid, mid in removals],
        )

    def changed_elsewhere(self, uaid: str) -> None:
        """Every read goes to the file: nothing to forget."""

    async def sweep(self) -> int:
        return await self._run("sweep", self._sweep)

    def _sweep(self, db: sqlite3.Connection, now: float) -> int:
        """The next slice of each table in key order, deleting what expired; round and round.

        Reads never return what expired, so the sweep only gives the space
        back; it needs no index on expiry times, which every write would pay.
        Returns how many messages went.
        """
        cursor = self._sweep_cursor
        rows = db.execute(
            "SELECT seq, expires_at FROM messages WHERE seq > ? ORDER BY seq LIMIT ?",
            (cursor[0], SWEEP_SLICE),
        ).fetchall()
        messages = [(seq,) for seq, expires_at in rows if expires_at <= now]
        db.executemany("DELETE FROM messages WHERE seq = ?", messages)
        pending = db.execute(
            "SELECT uaid, chid, stored_at FROM pending WHERE (uaid, chid) > (?, ?)"
            " ORDER BY uaid, chid LIMIT ?",
            (*cursor[1], SWEEP_SLICE),
        ).fetchall()
        oldest = now - self._pending_ttl
        db.executemany(
            "DELETE FROM pending WHERE uaid = ? AND chid = ?",
            [(uaid, chid) for uaid, chid, stored_at in pending if stored_at < oldest],
        )
        uaids = db.execute(
            "SELECT uaid, seen_at FROM uaids WHERE uaid > ? ORDER BY uaid LIMIT ?",
            (cursor[2], SWEEP_UAIDS),
        ).fetchall()
        for uaid, seen_at in uaids:
            if seen_at < self._fresh(now):
                _forget(db, uaid)
        self._sweep_cursor = (
            rows[-1][0] if len(rows) == SWEEP_SLICE else 0,
            pending[-1][:2] if len(pending) == SWEEP_SLICE else ("", ""),
            uaids[-1][0] if len(uaids) == SWEEP_UAIDS else "",
        )
        return len(messages)

    async def check(self) -> None:
        """A real write and read back, in one transaction."""

        def op(db: sqlite3.Connection, now: float) -> None:
            db.execute("INSERT OR REPLACE INTO health VALUES (1, ?)", (now,))
            if db.execute("SELECT checked_at FROM health").fetchone() != (now,):
                raise StoreError(f"sqlite {self.path}: check read back another value")

        await self._run("check", op)

    async def stats(self) -> dict[str, Any]:
        """For /realstatus: {"size_bytes": database and WAL, "rows": {table: count}}.

        In a thread: counting walks every table (file_stats).
        """
        return await asyncio.to_thread(file_stats, self.path)

    def watch_losses(self, lost: Callable[[Callable[[str], bool]], None]) -> None:
        """The file keeps every record: none vanish behind the server's back."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
        closed = StoreError("sqlite store is closed")
        _settle(list(self._waiting), [(None, closed)] * len(self._waiting))
        self._waiting.clear()
        self._checkpointer.stop()
        self._discard()
