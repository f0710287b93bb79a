"""The sqlite store's file: its schema and version, opening it, checkpoints, its size.

simplepush/store/sqlite.py runs the Store's calls on a connection opened
here. config.py uses check_path to refuse an unusable file before any
worker starts.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from typing import Any

from simplepush.store import StoreError

# PRAGMA user_version of the schema below; a file with a higher one is refused, one with
# a lower one is brought up to it (_MIGRATIONS).
SCHEMA_VERSION = 2
_SCHEMA = (
    # kind: 0 SimplePush, 1 WebPush. registered: ever had a channel (else a release
    # forgets it, as anonymous hellos must not pile up). seen_at: the last hello, or the
    # creation by register; uaid_ttl counts from it. wake_at: when a node last claimed a
    # UDP wake-up of the device (claim_wakeup; version 2, hence last).
    """CREATE TABLE uaids (
        uaid TEXT PRIMARY KEY,
        kind INTEGER NOT NULL,
        registered INTEGER NOT NULL,
        holder_node TEXT,
        holder_at REAL,
        wake_ip TEXT,
        wake_port INTEGER,
        wake_mcc TEXT,
        wake_mnc TEXT,
        wake_netid TEXT,
        seen_at REAL NOT NULL,
        wake_at REAL
    ) WITHOUT ROWID""",
    """CREATE TABLE channels (
        uaid TEXT NOT NULL,
        chid TEXT NOT NULL,
        spelling TEXT NOT NULL,
        PRIMARY KEY (uaid, chid)
    ) WITHOUT ROWID""",
    # seq orders a UAID's entries: a newer version keeps its row, a new entry goes last.
    """CREATE TABLE pending (
        uaid TEXT NOT NULL,
        chid TEXT NOT NULL,
        seq INTEGER NOT NULL,
        version INTEGER NOT NULL,
        data TEXT,
        stored_at REAL NOT NULL,
        PRIMARY KEY (uaid, chid)
    ) WITHOUT ROWID""",
    # seq (the rowid: always above every other row's) is the order accepted.
    """CREATE TABLE messages (
        seq INTEGER PRIMARY KEY,
        uaid TEXT NOT NULL,
        chid TEXT NOT NULL,
        id TEXT NOT NULL,
        ttl INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        topic TEXT,
        headers TEXT,
        data TEXT
    )""",
    # Serves a UAID's messages, a channel's count, a topic's match and a removal by id.
    "CREATE INDEX messages_channel ON messages (uaid, chid, topic, id)",
    "CREATE TABLE health (id INTEGER PRIMARY KEY CHECK (id = 1), checked_at REAL NOT NULL)",
)
# What brings a file of version i up to i + 1, in one transaction with the version's change.
_MIGRATIONS = {
    1: ("ALTER TABLE uaids ADD COLUMN wake_at REAL",),
}
TABLES = ("uaids", "channels", "pending", "messages")

# A WAL that a checkpoint has emptied is truncated back to this size.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
# How often each worker's thread copies the WAL into the database file, and how long
# it waits for the other workers' writes to let it finish (see Checkpointer).
CHECKPOINT_INTERVAL = 1.0
CHECKPOINT_WAIT = 1.0
_HEADER = b"SQLite format 3\x00"
_USER_VERSION_OFFSET = 60  # where PRAGMA user_version lives in the file's header


class Unusable(StoreError):
    """The database cannot be opened at all: at start-up, exit 2 naming [storage] path."""


def check_path(path: str) -> None:
    """What can be told before any worker opens the file, without writing it.

    For config: raises Unusable for a directory that is missing or not
    writable (SQLite creates the -wal and -shm files beside the database), a
    file that is not an SQLite database, or one from a newer schema.
    """
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        raise Unusable(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise Unusable(f"{path}: directory {directory} is not writable by this user")
    if not os.path.exists(path):
        return
    if not os.path.isfile(path):
        raise Unusable(f"{path}: not a regular file")
    if not os.access(path, os.R_OK | os.W_OK):
        raise Unusable(f"{path}: not readable and writable by this user")
    with open(path, "rb") as handle:
        header = handle.read(100)
    if header and (len(header) < 100 or not header.startswith(_HEADER)):
        raise Unusable(f"{path}: not an SQLite database")
    offset = _USER_VERSION_OFFSET
    _check_version(path, int.from_bytes(header[offset : offset + 4], "big") if header else 0)


def _check_version(path: str, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise Unusable(
            f"{path}: written by a newer simplepush (schema version {version}, this one"
            f" reads up to {SCHEMA_VERSION}); run that version or restore a backup"
        )


def _explain(path: str, exc: sqlite3.Error) -> str:
    """SQLite's "unable to open database file" says neither which file nor why."""
    if isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
        return f"{path}: not an SQLite database"
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        return f"{path}: directory {directory} does not exist"
    if os.path.isdir(path):
        return f"{path}: is a directory"
    return f"{path}: cannot be opened: {exc}"


def open_database(path: str, busy_timeout: float) -> sqlite3.Connection:
    """A connection in WAL mode with the current schema, created here if absent.

    busy_timeout bounds the wait for another process that is creating the
    schema at the same moment; the connection then fails at once when
    another writer holds the lock (busy_timeout 0), for the caller to retry.
    """
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise Unusable(_explain(path, exc)) from None
    try:
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        _check_version(path, db.execute("PRAGMA user_version").fetchone()[0])
        if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise Unusable(f"{path}: SQLite cannot use a WAL journal there")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA wal_autocheckpoint = 0")  # the checkpoint thread's job
        db.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
        _create_schema(path, db)
        db.execute("PRAGMA busy_timeout = 0")
    except sqlite3.Error as exc:
        db.close()
        raise Unusable(_explain(path, exc)) from None
    except Unusable:
        db.close()
        raise
    return db


def _create_schema(path: str, db: sqlite3.Connection) -> None:
    """Create or migrate it in one transaction, so that two workers starting at once do it once."""
    if db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        _check_version(path, version)
        if version == 0:
            if db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise Unusable(f"{path}: an SQLite database of something else (no schema version)")
            for statement in _SCHEMA:
                db.execute(statement)
        else:
            for step in range(version, SCHEMA_VERSION):
                for statement in _MIGRATIONS[step]:
                    db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def file_stats(path: str) -> dict[str, Any]:
    """The files' size in bytes and the rows of each table, on a connection of its own.

    Counting walks every table: tens of milliseconds for a million rows in
    the page cache, a second or more from a cold disk, so callers run it in
    a thread. WAL readers never wait for writers.
    """
    try:
        db = sqlite3.connect(path, isolation_level=None)
        try:
            rows = {
                table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLES
            }
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StoreError(f"sqlite {path}: stats failed: {exc}") from None
    size = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            size += os.path.getsize(path + suffix)
    return {"size_bytes": size, "rows": rows}


class Checkpointer(threading.Thread):
    """Copies the WAL into the database file, off the loop: its fsyncs take milliseconds.

    Every worker runs one. A passive checkpoint copies what is committed
    without stopping anybody; under a steady stream of writes it never
    catches up, and the WAL would grow without end (SQLite rewinds it only
    after a checkpoint that copied everything). So a RESTART follows: it
    holds writers back while it copies the last few frames, and the next
    write starts the WAL over. Writers on the loop meet it as a busy database
    and retry; only this thread waits. Two workers' checkpoints at the same
    moment: one skips. Failures are left for the loop's own calls to report.
    """

    def __init__(self, path: str) -> None:
        super().__init__(name="sqlite-checkpoint", daemon=True)
        self._path = path
        self._stopping = threading.Event()

    def run(self) -> None:
        db: sqlite3.Connection | None = None
        while not self._stopping.wait(CHECKPOINT_INTERVAL):
            try:
                if db is None:
                    db = sqlite3.connect(self._path, isolation_level=None)
                    db.execute(f"PRAGMA busy_timeout = {int(CHECKPOINT_WAIT * 1000)}")
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                db.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            except sqlite3.Error:
                if db is not None:
                    db.close()
                db = None
        if db is not None:
            db.close()

    def stop(self) -> None:
        self._stopping.set()
        self.join()
