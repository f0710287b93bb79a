"""What only the sqlite backend has: a file that outlives the process, and its faults.

The Store contract itself runs on sqlite in tests/test_store.py and
tests/test_store_webpush.py, and the server suites through conftest's
storage_settings. Here: the file at start (a newer schema, garbage, a
directory that cannot take it: exit 2 with one line naming [storage] path),
everything kept across a reopen and across kill -9, expiry in bounded
slices, several processes on one file, and faults at run time (a database
locked by another process past the timeout, a full disk): 503 and nothing
stored, then recovery without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from simplepush.config import ConfigError, StorageSettings, load
from simplepush.protocol import Wakeup
from simplepush.server import build_store
from simplepush.store import Enqueued, Holder, StoreError
from simplepush.store import sqlite as sqlite_store
from simplepush.store.sqlite import SqliteStore
from simplepush.store.sqlite_file import SCHEMA_VERSION, Unusable, check_path
from simplepush.updates import Update
from simplepush.webpush import Message, dashed
from tests.conftest import new_id
from tests.test_storage_faults import assert_unavailable, get_json

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / ".venv" / "bin" / "simplepush"
HOLDER = Holder("http://127.0.0.1:8090", 1000.5)
WAKEUP = Wakeup("10.71.22.5", 50213, "214", "07", "10.1.2.3")
TIMEOUT = 0.5  # [storage] timeout in these tests: how long a write waits for a lock
# Bounds for waiting on a process, not performance thresholds.
PROCESS_TIMEOUT = 30.0
# The event loop may be busy this long at a stretch while a write waits for a lock.
LOOP_STALL = 0.1


def key() -> str:
    return uuid.uuid4().hex


def message(chid: str, ttl: int = 3600, expires_at: float | None = None) -> Message:
    expires = time.time() + ttl if expires_at is None else expires_at
    return Message(dashed(chid), key(), ttl, expires, None, None, None)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "simplepush.db"


@pytest.fixture
def storage_settings(db_path: Path) -> StorageSettings:
    """This module's server runs on sqlite only, on the file the test can reach."""
    return StorageSettings(backend="sqlite", path=str(db_path), timeout=TIMEOUT)


@pytest.fixture
def opened(db_path: Path, io_loop) -> Iterator:
    """opened(**options) -> a SqliteStore on db_path; every one is closed at teardown."""
    stores: list[SqliteStore] = []

    def _open(**options) -> SqliteStore:
        store = SqliteStore(str(db_path), **options)
        stores.append(store)
        return store

    yield _open
    for store in stores:
        io_loop.run_sync(store.close)


def run_python(code: str, *args: str, **popen) -> subprocess.Popen[str]:
    """A child Python process running code (which finds simplepush from this checkout)."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO,
        text=True,
        stdout=subprocess.PIPE,
        **popen,
    )


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Another process holding the database's write lock until the block ends."""
    holder = run_python(
        """
        import sqlite3, sys
        db = sqlite3.connect(sys.argv[1], isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR REPLACE INTO health VALUES (1, 0)")
        print("locked", flush=True)
        sys.stdin.read()
        db.execute("ROLLBACK")
        """,
        str(path),
        stdin=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=PROCESS_TIMEOUT)


@contextlib.contextmanager
def disk_full(store: SqliteStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No page can be added to the file (SQLite's max_page_count), also after a reopen."""
    with sqlite3.connect(store.path) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    real_open = sqlite_store.open_database

    def open_full(path: str, busy_timeout: float) -> sqlite3.Connection:
        db = real_open(path, busy_timeout)
        db.execute(f"PRAGMA max_page_count = {pages}")
        return db

    monkeypatch.setattr(sqlite_store, "open_database", open_full)
    if store._db is not None:  # the connection already open fills up too
        store._db.execute(f"PRAGMA max_page_count = {pages}")
    try:
        yield
    finally:
        monkeypatch.setattr(sqlite_store, "open_database", real_open)
        if store._db is not None:  # room again, also for the connection open now
            store._db.execute("PRAGMA max_page_count = 4294967294")


def big(chid: str) -> Message:
    """A message that needs pages of its own: on a full disk it cannot be stored."""
    return Message(dashed(chid), key(), 3600, time.time() + 3600, None, {}, "x" * 4096)


async def fill(store: SqliteStore, uaid: str, chid: str) -> int:
    """Queue large messages until the store refuses one; how many went in."""
    for accepted in range(10_000):
        try:
            assert await store.enqueue(uaid, chid, big(chid), 10**6) == (Enqueued.ACCEPTED, HOLDER)
        except StoreError as exc:
            assert "full" in str(exc), exc
            return accepted
    raise AssertionError("the disk never filled")


async def webpush_uaid(store: SqliteStore) -> tuple[str, str]:
    uaid, chid = key(), key()
    await store.hello(uaid, None, HOLDER, webpush=True)
    await store.register(uaid, chid, dashed(chid), 200)
    return uaid, chid


# --- the file at start: refused with one line, exit 2 -------------------------------------


def newer_schema(path: Path) -> None:
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}").connection.close()


def garbage(path: Path) -> None:
    path.write_bytes(random.Random(12).randbytes(8192))


def other_database(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE accounts (name TEXT)")


def a_directory(path: Path) -> None:
    path.mkdir()


UNUSABLE = [
    pytest.param(
        newer_schema, f"newer simplepush (schema version {SCHEMA_VERSION + 1}", id="newer-schema"
    ),
    pytest.param(garbage, "not an SQLite database", id="garbage"),
    pytest.param(a_directory, "not a regular file", id="directory"),
]


@pytest.mark.parametrize(("make", "problem"), UNUSABLE)
def test_an_unusable_file_is_refused_by_config_and_by_the_store(db_path, make, problem):
    make(db_path)
    with pytest.raises(Unusable, match=re.escape(problem)):
        check_path(str(db_path))
    with pytest.raises(Unusable, match=r"newer|not an SQLite|a directory"):
        SqliteStore(str(db_path))


def cli(config: Path, user_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
        cwd=user_dir,
    )


def assert_exit_2(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    [line] = result.stderr.splitlines()
    for fragment in ("[storage] path", *fragments):
        assert fragment in line, (fragment, line)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        *UNUSABLE,
        pytest.param(other_database, "an SQLite database of something else", id="other-db"),
    ],
)
def test_simplepush_exits_2_with_one_line_naming_storage_path(tmp_path, make, problem):
    """other-db passes config's look at the header and is refused when the store opens."""
    (tmp_path / "data").mkdir()
    make(tmp_path / "data" / "push.db")
    config = tmp_path / "config.ini"
    config.write_text("[storage]\nbackend = sqlite\npath = data/push.db\n[admin]\nport = 0\n")
    assert_exit_2(cli(config, REPO), str(tmp_path / "data" / "push.db"), problem)


def test_a_missing_directory_exits_2(tmp_path):
    config = tmp_path / "config.ini"
    config.write_text("[storage]\nbackend = sqlite\npath = nowhere/push.db\n")
    assert_exit_2(cli(config, REPO), f"directory {tmp_path / 'nowhere'} does not exist")


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A directory this user cannot create files in (root: chattr +i, as modes do not bind it)."""
    directory = tmp_path / "readonly"
    directory.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("root ignores directory modes and chattr is missing")
        subprocess.run(["chattr", "+i", str(directory)], check=True, timeout=PROCESS_TIMEOUT)
        yield directory
        subprocess.run(["chattr", "-i", str(directory)], check=True, timeout=PROCESS_TIMEOUT)
    else:
        directory.chmod(0o555)
        yield directory
        directory.chmod(0o755)


def test_an_unwritable_directory_exits_2(tmp_path, unwritable):
    config = tmp_path / "config.ini"
    config.write_text(f"[storage]\nbackend = sqlite\npath = {unwritable}/push.db\n")
    assert_exit_2(cli(config, REPO), f"directory {unwritable} is not writable")
    with pytest.raises(Unusable, match="cannot be opened"):
        SqliteStore(str(unwritable / "push.db"))


def test_build_store_turns_an_unusable_file_into_a_config_error(db_path):
    other_database(db_path)
    with pytest.raises(ConfigError, match=r"^\[storage\] path: .*something else"):
        build_store(StorageSettings(backend="sqlite", path=str(db_path)), "http://127.0.0.1:8090")


def test_a_relative_path_is_taken_from_the_config_files_directory(tmp_path, monkeypatch):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "simplepush.ini").write_text("[storage]\nbackend = sqlite\n[server]\nprocesses = 2\n")
    monkeypatch.chdir(tmp_path)
    settings = load("etc/simplepush.ini")
    assert settings.storage.path == str(etc / "simplepush.db")
    assert settings.server.processes == 2  # one file serves every worker
    assert not (etc / "simplepush.db").exists()  # config only looks; the workers create it


def test_a_new_file_gets_the_schema_in_wal_mode(db_path, opened):
    opened()
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert {"uaids", "channels", "pending", "messages"} <= tables


# --- kept across restarts ----------------------------------------------------------------


@pytest.mark.gen_test
async def test_everything_is_there_after_closing_and_opening_again(opened):
    store = opened()
    simple, chid = key(), key()
    await store.hello(simple, WAKEUP, HOLDER)
    await store.register(simple, chid, chid.upper(), 200)
    await store.update(simple, chid, 7, "seven")
    web, wchid = key(), key()
    await store.hello(web, None, HOLDER, webpush=True)
    await store.register(web, wchid, dashed(wchid), 200)
    queued = [message(wchid), message(wchid, ttl=60)]
    for m in queued:
        assert await store.enqueue(web, wchid, m, 100) == (Enqueued.ACCEPTED, HOLDER)
    await store.close()

    again = opened()
    assert await again.known(simple) and await again.known(web)
    assert await again.wakeup(simple) == WAKEUP
    assert await again.pending(simple) == [Update(chid.upper(), 7, "seven")]
    assert await again.messages(web) == queued
    # The holder is kept too: the router still finds the node.
    assert await again.update(simple, chid, 8, None) == (Update(chid.upper(), 8), HOLDER)
    assert await again.hello(web, None, HOLDER, webpush=True, create=False) is None


# Versions are nanosecond times, so that each run's are above every earlier run's.
CRASHING_WRITER = """
    import asyncio, sys, time, uuid
    from simplepush.store import Holder
    from simplepush.store.sqlite import SqliteStore
    from simplepush.webpush import Message, dashed

    async def main(path, simple, web, chids):
        store = SqliteStore(path)
        holder = Holder("http://127.0.0.1:8090", 1.0)
        await store.hello(web, None, holder, webpush=True)
        for chid in chids:
            await store.register(simple, chid, chid, 200)
            await store.register(web, chid, dashed(chid), 200)
        print("ready", flush=True)

        async def updates(chid):
            while True:
                version = time.time_ns()
                await store.update(simple, chid, version, None)
                print("update", chid, version, flush=True)

        async def posts(chid):
            while True:
                m = Message(dashed(chid), uuid.uuid4().hex, 60, time.time() + 60)
                await store.enqueue(web, chid, m, 100000)
                print("message", m.id, flush=True)

        await asyncio.gather(*(f(chid) for chid in chids for f in (updates, posts)))

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
"""


@pytest.mark.gen_test(timeout=60)
async def test_every_write_answered_before_kill_9_is_there_after(db_path, opened):
    """An update or message whose call returned is committed: with synchronous = NORMAL
    the WAL write is in the kernel's hands before COMMIT returns (docs/STORAGE.md)."""
    simple, web = key(), key()
    chids = [key() for _ in range(4)]
    acked: dict[str, int] = {}
    ids: set[str] = set()
    for _ in range(3):
        child = run_python(CRASHING_WRITER, str(db_path), simple, web, *chids)
        assert child.stdout is not None
        assert child.stdout.readline() == "ready\n"
        await asyncio.sleep(random.uniform(0.2, 0.6))
        child.kill()
        child.wait(timeout=PROCESS_TIMEOUT)
        lines = child.stdout.read().splitlines()
        for line in lines[:-1]:  # the last line may be cut by the kill
            kind, *fields = line.split()
            if kind == "update":
                acked[fields[0]] = int(fields[1])
            else:
                ids.add(fields[0])
        child.stdout.close()
    store = opened()
    pending = {u.channel_id: u.version for u in await store.pending(simple)}
    assert set(acked) == set(chids)
    assert all(pending[chid] >= version for chid, version in acked.items()), (pending, acked)
    assert ids and ids <= {m.id for m in await store.messages(web)}


# --- several processes, one file -----------------------------------------------------------


TWO_WRITERS = """
    import asyncio, sys
    from simplepush.store.sqlite import SqliteStore

    async def main(path, uaid, shared, mine):
        store = SqliteStore(path, timeout=20)
        await asyncio.gather(*(store.register(uaid, chid, chid, 1000) for chid in mine))
        await asyncio.gather(*(store.update(uaid, chid, 7, chid) for chid in mine))
        await asyncio.gather(*(store.update(uaid, shared, v, str(v)) for v in range(1, 200)))
        await store.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
"""


@pytest.mark.gen_test(timeout=60)
async def test_two_processes_writing_one_uaid_at_once_lose_nothing(db_path, opened):
    store = opened()
    uaid, shared = key(), key()
    await store.register(uaid, shared, shared, 1000)
    channels = [[key() for _ in range(150)] for _ in range(2)]
    children = [run_python(TWO_WRITERS, str(db_path), uaid, shared, *mine) for mine in channels]
    for child in children:
        assert child.wait(timeout=PROCESS_TIMEOUT) == 0
        assert child.stdout is not None
        child.stdout.close()
    pending = {u.channel_id: (u.version, u.data) for u in await store.pending(uaid)}
    expected = {chid: (7, chid) for mine in channels for chid in mine}
    assert pending == {**expected, shared: (199, "199")}


# --- expiry: on read, and by the sweep in bounded slices ------------------------------------


@pytest.mark.gen_test
async def test_an_update_older_than_pending_ttl_is_gone(opened):
    store = opened(pending_ttl=1)
    uaid, old, fresh = key(), key(), key()
    for chid in (old, fresh):
        await store.register(uaid, chid, chid, 200)
    await store.update(uaid, old, 5, "old")
    await asyncio.sleep(1.1)
    await store.update(uaid, fresh, 5, "fresh")
    assert await store.pending(uaid) == [Update(fresh, 5, "fresh")]
    # The expired entry no longer holds back a lower version, which goes last.
    assert await store.update(uaid, old, 1, None) == (Update(old, 1), None)
    assert await store.pending(uaid) == [Update(fresh, 5, "fresh"), Update(old, 1)]


@pytest.mark.gen_test
async def test_a_uaid_expires_uaid_ttl_after_its_last_hello_and_the_sweep_frees_its_rows(opened):
    store = opened(uaid_ttl=1)
    kept, gone, chid = key(), key(), key()
    for uaid in (kept, gone):
        await store.hello(uaid, WAKEUP, HOLDER)
        await store.register(uaid, chid, chid, 200)
        await store.update(uaid, chid, 3, None)
    await asyncio.sleep(0.6)
    await store.hello(kept, WAKEUP, HOLDER)  # only a hello extends a record
    await asyncio.sleep(0.6)
    assert (await store.known(gone), await store.known(kept)) == (False, True)
    assert await store.pending(gone) == []
    assert await store.wakeup(gone) is None
    assert await store.update(gone, chid, 4, None) is None
    assert (await store.stats())["rows"] == {"uaids": 2, "channels": 2, "pending": 2, "messages": 0}
    await store.sweep()
    assert (await store.stats())["rows"] == {"uaids": 1, "channels": 1, "pending": 1, "messages": 0}
    assert await store.pending(kept) == [Update(chid, 3)]


@pytest.mark.gen_test(timeout=30)
async def test_the_sweep_deletes_expired_messages_one_bounded_slice_per_call(opened, monkeypatch):
    monkeypatch.setattr(sqlite_store, "SWEEP_SLICE", 100)
    store = opened()
    live: dict[str, list[Message]] = {}
    for i in range(257):
        # One expired message per channel, queued last: an enqueue drops those of its
        # own channel.
        uaid, chid = await webpush_uaid(store)
        live[uaid] = [message(chid)] if i % 50 == 0 else []
        expired = message(chid, ttl=60, expires_at=time.time() - 1)
        for queued in [*live[uaid], expired]:
            assert await store.enqueue(uaid, chid, queued, 100) == (Enqueued.ACCEPTED, HOLDER)
    # Each call looks at 100 rows at most, from where the last one stopped, round and round:
    # 263 rows, 6 of them live.
    assert [await store.sweep() for _ in range(3)] == [98, 98, 61]
    assert await store.sweep() == 0
    assert (await store.stats())["rows"]["messages"] == 6
    assert {uaid: await store.messages(uaid) for uaid in live} == live


# --- faults at run time: 503, nothing stored, then recovery -----------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_lock_held_past_the_timeout_fails_writes_without_blocking_the_loop(db_path, opened):
    store = opened(timeout=TIMEOUT)
    uaid, chid = key(), key()
    await store.register(uaid, chid, chid, 200)
    await store.update(uaid, chid, 1, "one")
    stalls: list[float] = []
    ticking = True

    async def ticker() -> None:
        while ticking:
            start = time.monotonic()
            await asyncio.sleep(0.005)
            stalls.append(time.monotonic() - start)

    tick = asyncio.ensure_future(ticker())
    with locked(db_path):
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"stayed locked by another process for 0\.5 s"):
            await store.update(uaid, chid, 2, "two")
        assert TIMEOUT <= time.monotonic() - started < TIMEOUT + 1
        with pytest.raises(StoreError, match="locked"):
            await store.check()
        # Reads do not wait for writers (WAL).
        assert await store.pending(uaid) == [Update(chid, 1, "one")]
    ticking = False
    await tick
    assert max(stalls) < LOOP_STALL, max(stalls)
    assert await store.update(uaid, chid, 3, "three") == (Update(chid, 3, "three"), None)
    await store.check()


@pytest.mark.gen_test(timeout=30)
async def test_writes_queued_behind_a_lock_go_together_once_it_is_released(db_path, opened):
    store = opened(timeout=10)
    uaid = key()
    chids = [key() for _ in range(50)]
    await asyncio.gather(*(store.register(uaid, chid, chid, 200) for chid in chids))
    with locked(db_path):
        waiting = asyncio.gather(*(store.update(uaid, chid, 9, None) for chid in chids))
        await asyncio.sleep(0.3)
        assert not waiting.done()
    assert len(await waiting) == len(chids)
    assert sorted(u.channel_id for u in await store.pending(uaid)) == sorted(chids)


@pytest.mark.gen_test(timeout=60)
async def test_a_full_disk_fails_writes_stores_nothing_and_recovers(opened, monkeypatch):
    store = opened()
    uaid, chid = await webpush_uaid(store)
    with disk_full(store, monkeypatch):
        accepted = await fill(store, uaid, chid)
        kept = await store.messages(uaid)
        assert len(kept) == accepted
        with pytest.raises(StoreError, match="full"):
            await store.enqueue(uaid, chid, big(chid), 10**6)
        assert await store.messages(uaid) == kept  # the refused ones are not there
    fresh = big(chid)
    assert await store.enqueue(uaid, chid, fresh, 10**6) == (Enqueued.ACCEPTED, HOLDER)
    assert await store.messages(uaid) == [*kept, fresh]
    await store.check()


@pytest.mark.gen_test(timeout=60)
async def test_a_put_on_a_full_disk_is_503_and_202_once_there_is_room(
    connect, put, node, monkeypatch
):
    device = await connect()
    await device.hello()
    endpoint = await device.register(new_id())
    device.close()
    store = node.store
    with disk_full(store, monkeypatch):
        await fill(store, *await webpush_uaid(store))
        assert_unavailable(await put(endpoint, "version=5&data=" + "x" * 4000))
    assert (await put(endpoint, "version=6&data=" + "x" * 4000)).code == 202


@pytest.mark.gen_test(timeout=30)
async def test_a_locked_database_is_503_to_app_servers_devices_and_realstatus_then_recovers(
    connect, put, http_client, http_port, db_path
):
    device = await connect()
    await device.hello()
    endpoint = await device.register(new_id())
    uaid = device.uaid
    device.close()
    with locked(db_path):
        assert_unavailable(await put(endpoint, "version=5"))
        again = await connect()
        frame = {"messageType": "hello", "uaid": uaid, "channelIDs": []}
        reply = await again.request(frame)
        assert reply["status"] == 503, reply
        code, body = await get_json(http_client, http_port, "/realstatus")
        assert code == 503 and "locked" in body["storage"]["error"], body
    assert (await put(endpoint, "version=6")).code == 202
    assert (await get_json(http_client, http_port, "/realstatus"))[0] == 200
    back = await connect()
    await back.hello(uaid)
    [update] = (await back.recv())["updates"]
    assert update["version"] == 6


# --- for /realstatus ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_stats_count_the_rows_of_each_kind_and_the_files_bytes(db_path, opened):
    store = opened()
    stats = await store.stats()
    assert stats["rows"] == {"uaids": 0, "channels": 0, "pending": 0, "messages": 0}
    simple, web = key(), key()
    for chid in (key(), key()):
        await store.register(simple, chid, chid, 200)
        await store.update(simple, chid, 1, None)
    await store.hello(web, None, HOLDER, webpush=True)
    chid = key()
    await store.register(web, chid, dashed(chid), 200)
    for _ in range(3):
        await store.enqueue(web, chid, message(chid), 100)
    stats = await store.stats()
    assert stats["rows"] == {"uaids": 2, "channels": 3, "pending": 2, "messages": 3}
    on_disk = sum(
        os.path.getsize(f"{db_path}{suffix}")
        for suffix in ("", "-wal")
        if os.path.exists(f"{db_path}{suffix}")
    )
    assert 0 < stats["size_bytes"] == on_disk
    json.dumps(stats)  # ready for /realstatus as it is
