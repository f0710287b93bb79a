"""The Store contract, called directly, on every backend.

The same tests run on the memory store, on sqlite and on a real memcached
(test ids end in [memory], [sqlite] or [memcached]); what only memcached has
(several nodes sharing records, expiry) is tested on memcached alone, and
sqlite's own (restarts, faults, its sweep) in tests/test_sqlite.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import string
import time
import uuid
from collections.abc import Iterator

import pytest
from tornado.ioloop import IOLoop

from simplepush.config import StorageSettings
from simplepush.protocol import Wakeup
from simplepush.server import build_store
from simplepush.store import Fresh, Holder, Store, StoreError, WrongUAID
from simplepush.store.memcached import (
    EMPTY_RECORD_TTL,
    KEY_PREFIX,
    WAKEUP_PREFIX,
    MemcachedStore,
)
from simplepush.store.memory import MemoryStore
from simplepush.store.sqlite import SqliteStore
from simplepush.updates import MAX_DATA_BYTES, MAX_VERSION, Update
from tests.conftest import Memcached

OLDER = Holder("http://node-a:8090", 1000.25)
NEWER = Holder("http://node-b:8090", 1000.5)
WAKEUP = Wakeup("10.71.22.5", 50213, "214", "07", "10.1.2.3")


def new_key() -> str:
    """A canonical UAID or channel key: 32 lowercase hex."""
    return uuid.uuid4().hex


@pytest.fixture
def store(storage_settings: StorageSettings, io_loop: IOLoop) -> Iterator[Store]:
    """A node named as OLDER is: memcached remembers its writes for the UAIDs it holds."""
    store = build_store(storage_settings, OLDER.node)
    yield store
    io_loop.run_sync(store.close)


@pytest.fixture
def record_ttl(storage_settings: StorageSettings):
    """record_ttl(uaid) -> seconds memcached will still keep that UAID's record."""

    def ttl(uaid: str) -> int:
        host, port = storage_settings.servers[0].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as conn:
            conn.sendall(f"mg {KEY_PREFIX}{uaid} t\r\n".encode())
            reply = conn.recv(256).decode()
        assert reply.startswith("HD t"), reply  # meta get: "HD t<seconds left>"
        return int(reply.split()[1][1:])

    return ttl


@pytest.fixture
def memcached_store(memcached: Memcached, io_loop: IOLoop):
    """memcached_store(**options) -> a MemcachedStore (a "node") on the shared memcached."""
    opened: list[MemcachedStore] = []

    def _open(**options) -> MemcachedStore:
        store = MemcachedStore([memcached.address], **options)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        io_loop.run_sync(store.close)


def item_meta(memcached: Memcached, uaid: str, flag: str) -> int:
    """A number memcached keeps about the UAID's record (meta get: t = TTL left, s = size)."""
    with socket.create_connection(("127.0.0.1", memcached.port), timeout=5) as conn:
        conn.sendall(f"mg {KEY_PREFIX}{uaid} {flag}\r\n".encode())
        reply = conn.recv(256).decode()
    assert reply.startswith(f"HD {flag}") and reply.endswith("\r\n"), reply
    return int(reply[4:-2])


def remaining_ttl(memcached: Memcached, uaid: str) -> int:
    return item_meta(memcached, uaid, "t")


def largest_data(rng: random.Random) -> str:
    """Exactly MAX_DATA_BYTES of UTF-8 mixing 1- to 4-byte characters and escapes."""
    chars = [*string.printable, "\x00", "\x01", '"', "\\", "é", "中", "𝄞"]
    text, size = [], 0
    while size < MAX_DATA_BYTES - 4:
        char = rng.choice(chars)
        text.append(char)
        size += len(char.encode("utf-8"))
    return "".join(text) + "a" * (MAX_DATA_BYTES - size)


# --- records: created by hello and register, nothing else -------------------


@pytest.mark.gen_test
async def test_an_unknown_uaid_has_nothing_and_gains_nothing(store):
    uaid, chid = new_key(), new_key()
    assert await store.known(uaid) is False
    assert await store.update(uaid, chid, 5, None) is None
    assert await store.ack(uaid, [(chid, 5)]) == []
    await store.unregister(uaid, chid)
    await store.release(uaid, OLDER)
    await store.drop(uaid)
    assert await store.pending(uaid) == []
    assert await store.wakeup(uaid) is None
    assert await store.known(uaid) is False


@pytest.mark.gen_test
async def test_hello_creates_the_record_and_keeps_the_latest_wakeup(store):
    uaid = new_key()
    assert await store.hello(uaid, WAKEUP, OLDER) is None
    assert await store.known(uaid) is True
    assert await store.wakeup(uaid) == WAKEUP
    assert await store.hello(uaid, None, OLDER) is None
    assert await store.wakeup(uaid) is None
    assert await store.pending(uaid) == []


@pytest.mark.gen_test
async def test_register_creates_the_record(store):
    uaid, chid = new_key(), new_key()
    assert await store.register(uaid, chid, chid, 200) is True
    assert await store.known(uaid) is True
    assert await store.update(uaid, chid, 1, None) == (Update(chid, 1), None)


@pytest.mark.gen_test
@pytest.mark.parametrize("webpush", [False, True], ids=["simplepush", "webpush"])
async def test_a_fresh_uaids_first_register_records_what_its_hello_did_not(store, webpush):
    """store.Fresh: the holder, the kind and the wake-up details, in the register's write."""
    uaid, chid = new_key(), new_key()
    assert await store.register(uaid, chid, chid, 200, Fresh(OLDER, webpush, WAKEUP)) is True
    assert await store.wakeup(uaid) == WAKEUP
    assert await store.update(uaid, chid, 1, None) == (Update(chid, 1), OLDER)
    assert await store.hello(uaid, WAKEUP, NEWER, webpush, create=False) == OLDER
    with pytest.raises(WrongUAID):
        await store.hello(uaid, None, NEWER, not webpush, create=False)


@pytest.mark.gen_test
async def test_fresh_is_ignored_when_the_uaid_has_a_record(store):
    uaid, chid, other = new_key(), new_key(), new_key()
    assert await store.hello(uaid, None, OLDER) is None
    assert await store.register(uaid, chid, chid, 200) is True
    assert await store.register(uaid, other, other, 200, Fresh(NEWER, True, WAKEUP)) is True
    assert await store.wakeup(uaid) is None
    assert await store.update(uaid, chid, 1, None) == (Update(chid, 1), OLDER)
    assert await store.update(uaid, other, 1, None) == (Update(other, 1), OLDER)


@pytest.mark.gen_test
async def test_drop_forgets_channels_pending_and_holder(store):
    uaid, chid = new_key(), new_key()
    await store.hello(uaid, WAKEUP, OLDER)
    await store.register(uaid, chid, chid, 200)
    await store.update(uaid, chid, 3, "x")
    await store.drop(uaid)
    assert await store.known(uaid) is False
    assert await store.pending(uaid) == []
    assert await store.wakeup(uaid) is None
    assert await store.update(uaid, chid, 4, None) is None


# --- UDP wake-up claims: one node sends, at most once per interval -------------

# Bounds a wait for a claim to come free again; not a performance threshold.
CLAIM_TIMEOUT = 5.0


async def claim_when_free(store: Store, uaid: str, interval: int) -> Wakeup:
    """Claim until a claim succeeds; every refused one records nothing."""
    deadline = time.monotonic() + CLAIM_TIMEOUT
    while (wakeup := await store.claim_wakeup(uaid, interval)) is None:
        assert time.monotonic() < deadline, f"no claim came free in {CLAIM_TIMEOUT} s"
        await asyncio.sleep(0.05)
    return wakeup


@pytest.mark.gen_test(timeout=15)
async def test_a_wakeup_claim_gives_the_address_at_most_once_per_interval(store):
    uaid = new_key()
    assert await store.claim_wakeup(uaid, 1) is None  # no record
    await store.hello(uaid, None, OLDER)
    assert await store.claim_wakeup(uaid, 1) is None  # no address: nothing is recorded
    await store.hello(uaid, WAKEUP, OLDER)
    started = time.monotonic()
    assert await store.claim_wakeup(uaid, 1) == WAKEUP
    assert await store.claim_wakeup(uaid, 1) is None
    await store.hello(uaid, WAKEUP, NEWER)  # a hello does not start the interval over
    assert await store.claim_wakeup(uaid, 1) is None
    assert await claim_when_free(store, uaid, 1) == WAKEUP
    assert time.monotonic() - started >= 1
    assert await store.claim_wakeup(uaid, 1) is None


@pytest.mark.gen_test
async def test_a_hello_without_wakeup_fields_leaves_nothing_to_claim(store):
    uaid = new_key()
    await store.hello(uaid, WAKEUP, OLDER)
    await store.hello(uaid, None, OLDER)
    assert await store.wakeup(uaid) is None
    assert await store.claim_wakeup(uaid, 30) is None
    await store.drop(uaid)
    await store.hello(uaid, WAKEUP, OLDER)
    assert await store.claim_wakeup(uaid, 30) == WAKEUP


@pytest.mark.gen_test
async def test_of_many_claims_at_once_exactly_one_gets_the_address(store):
    uaid = new_key()
    await store.hello(uaid, WAKEUP, OLDER)
    claims = await asyncio.gather(*(store.claim_wakeup(uaid, 30) for _ in range(20)))
    assert claims.count(WAKEUP) == 1
    assert claims.count(None) == 19


@pytest.mark.gen_test
async def test_of_two_sqlite_processes_claiming_at_once_exactly_one_gets_the_address(tmp_path):
    """Two connections to one file, as two workers have: the claim is one write transaction."""
    path = str(tmp_path / "shared.db")
    first, second = SqliteStore(path), SqliteStore(path)
    try:
        uaids = [new_key() for _ in range(10)]
        for uaid in uaids:
            await first.hello(uaid, WAKEUP, OLDER)
        claims = await asyncio.gather(
            *(store.claim_wakeup(uaid, 30) for uaid in uaids for store in (first, second))
        )
        assert claims.count(WAKEUP) == len(uaids)
        assert all(claims[i] is None or claims[i + 1] is None for i in range(0, len(claims), 2))
    finally:
        await first.close()
        await second.close()


# --- the holder: newest connection wins ---------------------------------------


@pytest.mark.gen_test
async def test_hello_returns_the_other_connection_and_the_newest_keeps_the_record(store):
    uaid, chid = new_key(), new_key()
    await store.register(uaid, chid, chid, 200)
    assert await store.hello(uaid, None, OLDER) is None
    assert await store.hello(uaid, None, OLDER) is None  # the same connection again
    assert await store.hello(uaid, None, NEWER) == OLDER  # displaced: its node closes it
    assert await store.hello(uaid, None, OLDER) == NEWER  # later: this one must close
    assert await store.update(uaid, chid, 1, None) == (Update(chid, 1), NEWER)


@pytest.mark.gen_test
async def test_release_clears_only_the_holder_it_names(store):
    uaid, chid = new_key(), new_key()
    await store.register(uaid, chid, chid, 200)
    await store.hello(uaid, None, NEWER)
    await store.release(uaid, OLDER)
    await store.release(uaid, Holder(NEWER.node, NEWER.connected_at + 1))
    assert await store.update(uaid, chid, 1, None) == (Update(chid, 1), NEWER)
    await store.release(uaid, NEWER)
    assert await store.update(uaid, chid, 2, None) == (Update(chid, 2), None)
    assert await store.known(uaid) is True


@pytest.mark.gen_test
async def test_a_uaid_that_said_hello_and_left_with_nothing_is_not_kept(
    store, storage_settings, record_ttl
):
    """Anonymous hellos must not fill the store: the record of a UAID that never had a
    channel goes when its socket does (memory, sqlite) or within minutes (memcached,
    EMPTY_RECORD_TTL) instead of after uaid_ttl."""
    anonymous, registered = new_key(), new_key()
    await store.hello(anonymous, None, NEWER)
    await store.hello(registered, None, NEWER)
    await store.register(registered, registered, registered, 200)
    await store.release(anonymous, NEWER)
    await store.release(registered, NEWER)
    if storage_settings.backend != "memcached":
        assert await store.known(anonymous) is False
        assert await store.known(registered) is True
        return
    assert 0 < record_ttl(anonymous) <= EMPTY_RECORD_TTL
    assert record_ttl(registered) > EMPTY_RECORD_TTL


# --- channels ---------------------------------------------------------------


@pytest.mark.gen_test
async def test_register_is_idempotent_and_bounded_by_max_channels(store):
    uaid = new_key()
    first, second, third = new_key(), new_key(), new_key()
    assert await store.register(uaid, first, first, 2) is True
    assert await store.register(uaid, second, second, 2) is True
    assert await store.register(uaid, third, third, 2) is False
    assert await store.register(uaid, first, first, 2) is True
    await store.unregister(uaid, first)
    assert await store.register(uaid, third, third, 2) is True
    assert await store.update(uaid, first, 1, None) is None
    assert await store.update(uaid, third, 1, None) == (Update(third, 1), None)


@pytest.mark.gen_test
async def test_registering_again_keeps_the_pending_update_in_the_new_spelling(store):
    uaid = new_key()
    dashed = str(uuid.uuid4())
    chid = dashed.replace("-", "")
    await store.register(uaid, chid, dashed.upper(), 200)
    await store.update(uaid, chid, 9, "d")
    await store.register(uaid, chid, dashed, 200)
    assert await store.pending(uaid) == [Update(dashed, 9, "d")]


@pytest.mark.gen_test
async def test_unregister_drops_the_channel_and_its_pending_update(store):
    uaid, kept, gone = new_key(), new_key(), new_key()
    for chid in (kept, gone):
        await store.register(uaid, chid, chid, 200)
        await store.update(uaid, chid, 1, None)
    await store.unregister(uaid, gone)
    await store.unregister(uaid, new_key())
    assert await store.pending(uaid) == [Update(kept, 1)]
    assert await store.update(uaid, gone, 2, None) is None


# --- updates, pending, acks -------------------------------------------------


@pytest.mark.gen_test
async def test_a_lower_version_does_not_replace_a_pending_one(store):
    uaid, chid = new_key(), new_key()
    await store.register(uaid, chid, chid, 200)
    assert await store.update(uaid, chid, 5, "five") == (Update(chid, 5, "five"), None)
    assert await store.update(uaid, chid, 3, "three") == (Update(chid, 5, "five"), None)
    assert await store.update(uaid, chid, 5, None) == (Update(chid, 5), None)
    assert await store.update(uaid, chid, 7, "seven") == (Update(chid, 7, "seven"), None)
    assert await store.pending(uaid) == [Update(chid, 7, "seven")]


@pytest.mark.gen_test
async def test_an_ack_clears_only_what_its_version_covers(store):
    uaid, first, second = new_key(), new_key(), new_key()
    for chid in (first, second):
        await store.register(uaid, chid, chid, 200)
    await store.update(uaid, first, 10, None)
    await store.update(uaid, second, 20, None)
    remaining = await store.ack(uaid, [(first, 9), (second, 21), (new_key(), 99)])
    assert remaining == [Update(first, 10)]
    assert await store.ack(uaid, [(first, 10)]) == []
    assert await store.update(uaid, first, 1, None) == (Update(first, 1), None)


@pytest.mark.gen_test
async def test_pending_keeps_each_channels_place_until_it_is_acked(store):
    uaid = new_key()
    a, b, c = new_key(), new_key(), new_key()
    for chid in (a, b, c):
        await store.register(uaid, chid, chid, 200)
    for chid in (c, a, b):
        await store.update(uaid, chid, 1, None)
    await store.update(uaid, a, 2, None)
    assert await store.pending(uaid) == [Update(c, 1), Update(a, 2), Update(b, 1)]
    await store.ack(uaid, [(a, 2)])
    await store.update(uaid, a, 3, None)
    assert await store.pending(uaid) == [Update(c, 1), Update(b, 1), Update(a, 3)]


@pytest.mark.parametrize(
    "data",
    ["", 'quote " backslash \\ newline \n nul \x00', "é中𝄞" * 100, "\x01" * MAX_DATA_BYTES],
    ids=["empty", "escapes", "unicode", "controls"],
)
@pytest.mark.parametrize("version", [0, MAX_VERSION])
@pytest.mark.gen_test
async def test_versions_and_data_come_back_exactly(store, version, data):
    uaid, chid = new_key(), new_key()
    await store.register(uaid, chid, chid, 200)
    await store.update(uaid, chid, version, data)
    assert await store.pending(uaid) == [Update(chid, version, data)]


@pytest.mark.gen_test
async def test_check_passes_when_the_backend_answers(store):
    await store.check()


def test_build_store_picks_the_backend_and_only_memory_warns(storage_settings, io_loop, caplog):
    """Only the memory store loses everything on restart; sqlite and memcached have nothing
    to warn about."""
    caplog.set_level(logging.WARNING)
    store = build_store(storage_settings, OLDER.node)
    io_loop.run_sync(store.close)
    warnings = [record.getMessage() for record in caplog.records]
    if storage_settings.backend == "memory":
        assert (type(store), warnings) == (MemoryStore, ["storage.warning"])
    else:
        backends = {"sqlite": SqliteStore, "memcached": MemcachedStore}
        assert (type(store), warnings) == (backends[storage_settings.backend], [])


# --- memcached: several nodes, one record -------------------------------------


@pytest.mark.gen_test(timeout=20)
async def test_two_nodes_registering_and_updating_one_uaid_at_once_lose_nothing(
    memcached_store,
):
    nodes = [memcached_store(), memcached_store()]
    uaid = new_key()
    chids = [new_key() for _ in range(100)]
    registered = await asyncio.gather(
        *(nodes[i % 2].register(uaid, chid, chid, 200) for i, chid in enumerate(chids))
    )
    assert registered == [True] * len(chids)
    await asyncio.gather(
        *(nodes[i % 2].update(uaid, chid, i, None) for i, chid in enumerate(chids))
    )
    pending = await nodes[0].pending(uaid)
    assert sorted(pending, key=lambda u: u.version) == [
        Update(chid, i) for i, chid in enumerate(chids)
    ]


@pytest.mark.gen_test(timeout=20)
async def test_two_nodes_updating_one_channel_at_once_keep_the_highest_version(memcached_store):
    nodes = [memcached_store(), memcached_store()]
    uaid, chid = new_key(), new_key()
    await nodes[0].register(uaid, chid, chid, 200)
    versions = list(range(1, 101))
    random.shuffle(versions)
    await asyncio.gather(*(nodes[v % 2].update(uaid, chid, v, str(v)) for v in versions))
    assert await nodes[1].pending(uaid) == [Update(chid, 100, "100")]


@pytest.mark.gen_test
async def test_two_nodes_saying_hello_at_once_leave_the_newest_holder(memcached_store):
    nodes = [memcached_store(), memcached_store()]
    uaid, chid = new_key(), new_key()
    await nodes[0].register(uaid, chid, chid, 200)
    older, newer = await asyncio.gather(
        nodes[0].hello(uaid, None, OLDER), nodes[1].hello(uaid, None, NEWER)
    )
    # Whichever ran second learned about the first.
    assert (older, newer) in [(None, OLDER), (NEWER, None)]
    assert await nodes[0].update(uaid, chid, 1, None) == (Update(chid, 1), NEWER)


@pytest.mark.gen_test
async def test_of_two_nodes_claiming_a_wakeup_at_once_exactly_one_gets_it(memcached_store):
    a, b = memcached_store(), memcached_store()
    uaids = [new_key() for _ in range(10)]
    for uaid in uaids:
        await a.hello(uaid, WAKEUP, OLDER)
    claims = await asyncio.gather(
        *(node.claim_wakeup(uaid, 30) for uaid in uaids for node in (a, b))
    )
    assert claims.count(WAKEUP) == len(uaids)
    assert all(claims[i] is None or claims[i + 1] is None for i in range(0, len(claims), 2))


@pytest.mark.gen_test
async def test_a_wakeup_claim_lives_a_second_longer_than_its_interval(memcached_store, memcached):
    """memcached's clock ticks in whole seconds: the extra one keeps the whole interval."""
    store = memcached_store()
    uaid = new_key()
    await store.hello(uaid, WAKEUP, OLDER)
    assert await store.claim_wakeup(uaid, 30) == WAKEUP
    with socket.create_connection(("127.0.0.1", memcached.port), timeout=5) as conn:
        conn.sendall(f"mg {WAKEUP_PREFIX}{uaid} t v\r\n".encode())
        reply = conn.recv(256).decode()
    head, value = reply.split("\r\n")[:2]
    assert head.startswith("VA ") and 30 <= int(head.split()[2][1:]) <= 31, reply
    assert abs(int(value) - time.time()) <= 2, reply


# --- memcached: the holder remembers what it wrote ----------------------------


def command_counts(memcached: Memcached) -> dict[str, int]:
    """memcached's own counts of reads, writes and writes refused for a stale CAS token."""
    with socket.create_connection(("127.0.0.1", memcached.port), timeout=5) as conn:
        conn.sendall(b"stats\r\n")
        reply = b""
        while not reply.endswith(b"END\r\n"):
            reply += conn.recv(65536)
    stats = dict(line.split()[1:3] for line in reply.decode().splitlines() if line[:5] == "STAT ")
    return {
        "gets": int(stats["cmd_get"]),
        "sets": int(stats["cmd_set"]),
        "refused": int(stats["cas_badval"]),
    }


class Counted:
    """The reads, writes and refused writes memcached saw within the block."""

    def __init__(self, memcached: Memcached) -> None:
        self._memcached = memcached
        self.delta: dict[str, int] = {}

    def __enter__(self) -> Counted:
        self._before = command_counts(self._memcached)
        return self

    def __exit__(self, *exc: object) -> None:
        after = command_counts(self._memcached)
        self.delta = {name: after[name] - self._before[name] for name in after}


async def held_by_a(node_a: MemcachedStore) -> tuple[str, str]:
    """A UAID with one channel whose socket node A (OLDER) holds."""
    uaid, chid = new_key(), new_key()
    assert await node_a.hello(uaid, None, OLDER) is None
    assert await node_a.register(uaid, chid, chid, 200) is True
    return uaid, chid


@pytest.mark.gen_test
async def test_the_holders_next_change_is_one_write_and_no_read(memcached_store, memcached):
    node_a = memcached_store(node=OLDER.node)
    uaid, chid = await held_by_a(node_a)
    with Counted(memcached) as update:
        assert await node_a.update(uaid, chid, 1, "x") == (Update(chid, 1, "x"), OLDER)
    with Counted(memcached) as ack:
        assert await node_a.ack(uaid, [(chid, 1)]) == []
    assert update.delta == ack.delta == {"gets": 0, "sets": 1, "refused": 0}
    assert await memcached_store().pending(uaid) == []


@pytest.mark.gen_test
async def test_a_node_that_does_not_hold_the_uaid_reads_before_each_change(
    memcached_store, memcached
):
    node_a, node_b = memcached_store(node=OLDER.node), memcached_store(node=NEWER.node)
    uaid, chid = await held_by_a(node_a)
    for version in (1, 2):
        with Counted(memcached) as update:
            assert await node_b.update(uaid, chid, version, None) == (
                Update(chid, version, None),
                OLDER,
            )
        assert update.delta == {"gets": 1, "sets": 1, "refused": 0}


@pytest.mark.gen_test
async def test_a_stale_memory_costs_one_refused_write_and_loses_nothing(memcached_store, memcached):
    node_a, node_b = memcached_store(node=OLDER.node), memcached_store(node=NEWER.node)
    uaid, chid = await held_by_a(node_a)
    await node_a.update(uaid, chid, 1, "one")
    await node_b.update(uaid, chid, 2, "two")  # node A is not told
    with Counted(memcached) as ack:
        # Node A remembers version 1 pending, which the ack clears; memcached has version 2.
        assert await node_a.ack(uaid, [(chid, 1)]) == [Update(chid, 2, "two")]
    assert ack.delta == {"gets": 1, "sets": 1, "refused": 1}
    assert await node_b.pending(uaid) == [Update(chid, 2, "two")]
    with Counted(memcached) as ack:
        assert await node_a.ack(uaid, [(chid, 2)]) == []
    assert ack.delta == {"gets": 1, "sets": 1, "refused": 0}
    assert await node_b.pending(uaid) == []


@pytest.mark.gen_test
async def test_changed_elsewhere_makes_the_next_change_read_first(memcached_store, memcached):
    node_a, node_b = memcached_store(node=OLDER.node), memcached_store(node=NEWER.node)
    uaid, chid = await held_by_a(node_a)
    await node_a.update(uaid, chid, 1, None)
    await node_b.update(uaid, chid, 2, None)
    node_a.changed_elsewhere(uaid)  # node B routed version 2 to node A's socket
    with Counted(memcached) as ack:
        assert await node_a.ack(uaid, [(chid, 2)]) == []
    assert ack.delta == {"gets": 1, "sets": 1, "refused": 0}


@pytest.mark.gen_test
async def test_a_change_that_writes_nothing_answers_from_memcached_not_memory(
    memcached_store, memcached
):
    """Node A remembers the channel registered; node B has since unregistered it."""
    node_a, node_b = memcached_store(node=OLDER.node), memcached_store(node=NEWER.node)
    uaid, chid = await held_by_a(node_a)
    await node_b.unregister(uaid, chid)
    with Counted(memcached) as register:
        assert await node_a.register(uaid, chid, chid, 200) is True
    assert register.delta == {"gets": 1, "sets": 1, "refused": 0}
    assert await node_b.update(uaid, chid, 7, None) == (Update(chid, 7, None), OLDER)


@pytest.mark.gen_test
async def test_a_kind_remembered_wrongly_does_not_start_the_device_over(memcached_store):
    """Node A remembers a WebPush record; the UAID was dropped and made SimplePush since."""
    node_a, node_b = memcached_store(node=OLDER.node), memcached_store(node=NEWER.node)
    uaid = new_key()
    assert await node_a.hello(uaid, None, OLDER, webpush=True) is None
    await node_b.drop(uaid)
    assert await node_b.hello(uaid, None, NEWER) is None
    later = Holder(OLDER.node, NEWER.connected_at + 1)
    assert await node_a.hello(uaid, None, later) == NEWER


@pytest.mark.gen_test
async def test_a_released_uaid_is_no_longer_remembered(memcached_store, memcached):
    node_a = memcached_store(node=OLDER.node)
    uaid, chid = await held_by_a(node_a)
    await node_a.release(uaid, OLDER)
    with Counted(memcached) as update:
        await node_a.update(uaid, chid, 1, None)
    assert update.delta == {"gets": 1, "sets": 1, "refused": 0}


@pytest.mark.gen_test
async def test_a_memcached_without_meta_commands_is_named_in_the_error():
    """Before 1.6 memcached answers ERROR to every meta command: say what is needed."""

    async def before_meta(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if line.startswith(b"ms "):
                await reader.readline()  # the value
            writer.write(b"ERROR\r\n")

    listener = await asyncio.start_server(before_meta, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    store = MemcachedStore([f"127.0.0.1:{port}"], timeout=2)
    needed = r"memcached 127\.0\.0\.1:\d+: %s failed: ERROR, .* needs memcached 1\.6 or later"
    try:
        with pytest.raises(StoreError, match=needed % "check"):
            await store.check()
        fresh = Fresh(OLDER, False, None)
        with pytest.raises(StoreError, match=needed % "register"):
            await store.register(new_key(), new_key(), "chid", 200, fresh)
    finally:
        await store.close()
        listener.close()
        await listener.wait_closed()


# --- memcached: record size ---------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_a_full_uaid_with_the_largest_data_everywhere_fits_in_one_item(
    memcached_store, memcached
):
    """The worst case of docs/STORAGE.md: 200 channels, each with 4096 bytes pending."""
    store = memcached_store()
    uaid = new_key()
    rng = random.Random(4096)
    expected = []
    for _ in range(200):
        chid = str(uuid.uuid4()).upper()
        data = largest_data(rng)
        assert await store.register(uaid, chid.replace("-", "").lower(), chid, 200) is True
        await store.update(uaid, chid.replace("-", "").lower(), MAX_VERSION, data)
        expected.append(Update(chid, MAX_VERSION, data))
    assert await store.pending(uaid) == expected
    assert item_meta(memcached, uaid, "s") <= 200 * MAX_DATA_BYTES + 32 * 1024


@pytest.mark.gen_test
async def test_a_record_memcached_refuses_as_too_large_fails_that_call_only(memcached_store):
    store = memcached_store()
    uaid, chid = new_key(), new_key()
    await store.register(uaid, chid, chid, 200)
    await store.update(uaid, chid, 1, "small")
    with pytest.raises(StoreError, match=r"update failed: .*too large"):
        await store.update(uaid, chid, 2, "x" * 2**20)
    assert await store.pending(uaid) == [Update(chid, 1, "small")]


# --- memcached: expiry --------------------------------------------------------


@pytest.mark.gen_test
async def test_pending_entries_older_than_pending_ttl_are_gone(memcached_store):
    store = memcached_store(pending_ttl=1)
    uaid, old, fresh = new_key(), new_key(), new_key()
    for chid in (old, fresh):
        await store.register(uaid, chid, chid, 200)
    await store.update(uaid, old, 5, "old")
    assert await store.pending(uaid) == [Update(old, 5, "old")]
    await asyncio.sleep(1.1)
    await store.update(uaid, fresh, 5, "fresh")
    assert await store.pending(uaid) == [Update(fresh, 5, "fresh")]
    # The expired entry no longer holds back a lower version.
    assert await store.update(uaid, old, 1, None) == (Update(old, 1), None)
    assert await store.known(uaid) is True


@pytest.mark.gen_test(timeout=10)
async def test_a_record_expires_uaid_ttl_after_the_last_hello(memcached_store):
    store = memcached_store(uaid_ttl=2)
    uaid = new_key()
    await store.hello(uaid, None, OLDER)
    assert await store.known(uaid) is True
    # memcached's clock ticks once a second: the record lives 1 to 2 s.
    deadline = time.monotonic() + 4
    while await store.known(uaid):
        assert time.monotonic() < deadline, "the record outlived uaid_ttl"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("days", [3, 30, 31, 60])
@pytest.mark.gen_test
async def test_uaid_ttl_beyond_30_days_is_kept_too(memcached_store, memcached, days):
    """memcached reads an expiry above 30 days as a unix time; the store sends one."""
    store = memcached_store(uaid_ttl=days * 86400)
    uaid = new_key()
    await store.hello(uaid, None, OLDER)
    assert await store.known(uaid) is True
    # memcached's clock ticks once a second and an absolute expiry is rounded
    # up to a whole second, so the remaining time may read one second high.
    assert days * 86400 - 2 <= remaining_ttl(memcached, uaid) <= days * 86400 + 1


@pytest.mark.gen_test
async def test_only_hello_extends_the_record(memcached_store, memcached):
    store = memcached_store(uaid_ttl=100)
    uaid, chid = new_key(), new_key()
    await store.hello(uaid, None, OLDER)
    await store.register(uaid, chid, chid, 200)
    await asyncio.sleep(2.1)
    await store.update(uaid, chid, 1, None)
    assert 90 <= remaining_ttl(memcached, uaid) <= 98
    await store.hello(uaid, None, OLDER)
    assert 99 <= remaining_ttl(memcached, uaid) <= 100
