"""The WebPush part of the Store contract, called directly, on every backend.

As tests/test_store.py (whose fixtures and helpers these are): every test
runs on the memory store and on a real memcached (ids end in [memory] or
[memcached]); what only one backend has (memcached's bound on a UAID's
record, memory's sweep) is tested on that backend alone. A WebPush record
is made by a hello with webpush=True; its messages are Message values
whose channel_id is the dashed spelling of the channel key, as the POST
handler makes them.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import Iterator

import pytest
from tornado.ioloop import IOLoop

from simplepush.config import StorageSettings
from simplepush.server import build_store
from simplepush.store import Enqueued, Holder, Store, WrongUAID, memory
from simplepush.store.memcached import MAX_RECORD, MemcachedStore
from simplepush.store.memory import MemoryStore
from simplepush.updates import Update
from simplepush.webpush import MAX_BODY, Message, dashed
from tests.conftest import Memcached
from tests.test_store import NEWER, OLDER, WAKEUP, item_meta, new_key

ACCEPTED, UNKNOWN, FULL = Enqueued.ACCEPTED, Enqueued.UNKNOWN, Enqueued.FULL
AES128GCM = {"encoding": "aes128gcm"}
AESGCM = {
    "encoding": "aesgcm",
    "encryption": "salt=c2FsdHNhbHRzYWx0c2FsdA",
    "crypto_key": "dh=BPOBKU8mW3WOcJE7xl3tNRRjvJ1XOF5sFIRM6hGaV6_y",
}


@pytest.fixture
def store(storage_settings: StorageSettings, io_loop: IOLoop) -> Iterator[Store]:
    """The backend of the test's parameter (tests/test_store.py's fixture)."""
    store = build_store(storage_settings, OLDER.node)
    yield store
    io_loop.run_sync(store.close)


@pytest.fixture
def memcached_store(memcached: Memcached, io_loop: IOLoop):
    """memcached_store() -> a MemcachedStore on the shared (flushed) memcached."""
    memcached.flush()
    opened: list[MemcachedStore] = []

    def _open() -> MemcachedStore:
        store = MemcachedStore([memcached.address])
        opened.append(store)
        return store

    yield _open
    for store in opened:
        io_loop.run_sync(store.close)


def message(
    chid: str,
    ttl: int = 3600,
    topic: str | None = None,
    data: str | None = None,
    headers: dict[str, str] | None = None,
    expires_at: float | None = None,
) -> Message:
    """A message as the POST handler makes it: a fresh id, expiring ttl seconds from now."""
    if data is not None and headers is None:
        headers = AES128GCM
    if expires_at is None:
        expires_at = time.time() + ttl
    return Message(dashed(chid), uuid.uuid4().hex, ttl, expires_at, topic, headers, data)


def body(size: int) -> str:
    """base64url (unpadded) of `size` random bytes: a POST body as the device gets it."""
    return base64.urlsafe_b64encode(os.urandom(size)).rstrip(b"=").decode("ascii")


async def webpush_uaid(store: Store, *chids: str, holder: Holder | None = OLDER) -> str:
    """A new WebPush UAID with these channels registered, held by holder (None: released)."""
    uaid = new_key()
    assert await store.hello(uaid, None, holder or OLDER, webpush=True) is None
    for chid in chids:
        assert await store.register(uaid, chid, dashed(chid), 200) is True
    if holder is None:
        await store.release(uaid, OLDER)
    return uaid


# --- hello: a record's kind ------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_webpush_hello_creates_a_webpush_record_that_takes_messages(store):
    uaid, chid = new_key(), new_key()
    assert await store.hello(uaid, WAKEUP, OLDER, webpush=True) is None
    assert await store.known(uaid) is True
    assert await store.wakeup(uaid) == WAKEUP
    assert await store.messages(uaid) == []
    assert await store.pending(uaid) == []
    assert await store.hello(uaid, None, OLDER, webpush=True) is None  # the same connection
    assert await store.hello(uaid, None, NEWER, webpush=True, create=False) == OLDER
    assert await store.hello(uaid, None, OLDER, webpush=True) == NEWER  # later: must close
    assert await store.register(uaid, chid, dashed(chid), 200) is True
    queued = message(chid)
    assert await store.enqueue(uaid, chid, queued, 100) == (ACCEPTED, NEWER)
    assert await store.messages(uaid) == [queued]


@pytest.mark.parametrize("made_by", ["hello", "register"])
@pytest.mark.parametrize("create", [True, False])
@pytest.mark.gen_test
async def test_a_simplepush_record_refuses_a_webpush_hello_and_keeps_everything(
    store, made_by, create
):
    uaid, chid = new_key(), new_key()
    holder = None
    if made_by == "hello":
        assert await store.hello(uaid, WAKEUP, OLDER) is None
        holder = OLDER
    assert await store.register(uaid, chid, chid, 200) is True
    assert await store.update(uaid, chid, 3, "three") == (Update(chid, 3, "three"), holder)
    with pytest.raises(WrongUAID):
        await store.hello(uaid, None, NEWER, webpush=True, create=create)
    # Nothing was written: not the holder, not the wake-up, not the kind.
    assert await store.wakeup(uaid) == (WAKEUP if made_by == "hello" else None)
    assert await store.pending(uaid) == [Update(chid, 3, "three")]
    assert await store.update(uaid, chid, 4, None) == (Update(chid, 4), holder)
    assert await store.enqueue(uaid, chid, message(chid), 100) == (UNKNOWN, None)
    assert await store.messages(uaid) == []
    # Had the refused hello written NEWER, this hello would be told of it.
    assert await store.hello(uaid, WAKEUP, OLDER) is None


@pytest.mark.parametrize("create", [True, False])
@pytest.mark.gen_test
async def test_a_webpush_record_refuses_a_simplepush_hello_and_keeps_everything(store, create):
    uaid, chid = new_key(), new_key()
    assert await store.hello(uaid, WAKEUP, OLDER, webpush=True) is None
    assert await store.register(uaid, chid, dashed(chid), 200) is True
    first = message(chid, data=body(100))
    assert await store.enqueue(uaid, chid, first, 100) == (ACCEPTED, OLDER)
    with pytest.raises(WrongUAID):
        await store.hello(uaid, None, NEWER, create=create)
    assert await store.wakeup(uaid) == WAKEUP
    assert await store.pending(uaid) == []
    second = message(chid)
    assert await store.enqueue(uaid, chid, second, 100) == (ACCEPTED, OLDER)
    assert await store.messages(uaid) == [first, second]
    assert await store.hello(uaid, None, OLDER, webpush=True, create=False) is None


@pytest.mark.parametrize("webpush", [True, False], ids=["webpush", "simplepush"])
@pytest.mark.gen_test
async def test_a_hello_that_must_not_create_raises_on_an_absent_record_and_writes_nothing(
    store, webpush
):
    uaid, chid = new_key(), new_key()
    with pytest.raises(WrongUAID):
        await store.hello(uaid, WAKEUP, OLDER, webpush=webpush, create=False)
    assert await store.known(uaid) is False
    assert await store.wakeup(uaid) is None
    assert await store.messages(uaid) == []
    assert await store.enqueue(uaid, chid, message(chid), 100) == (UNKNOWN, None)
    assert await store.known(uaid) is False


# --- enqueue: accepted, unknown, full ---------------------------------------------------


@pytest.mark.gen_test
async def test_enqueue_accepts_on_a_registered_channel_and_names_the_holder(store):
    chid = new_key()
    uaid = await webpush_uaid(store, chid)
    first, second, third = message(chid), message(chid), message(chid)
    assert await store.enqueue(uaid, chid, first, 100) == (ACCEPTED, OLDER)
    assert await store.hello(uaid, None, NEWER, webpush=True) == OLDER
    assert await store.enqueue(uaid, chid, second, 100) == (ACCEPTED, NEWER)
    await store.release(uaid, NEWER)
    assert await store.enqueue(uaid, chid, third, 100) == (ACCEPTED, None)
    assert await store.messages(uaid) == [first, second, third]


@pytest.mark.parametrize("ttl", [0, 60])
@pytest.mark.gen_test
async def test_enqueue_is_unknown_without_a_webpush_record_and_channel(store, ttl):
    chid, other = new_key(), new_key()
    absent = new_key()
    assert await store.enqueue(absent, chid, message(chid, ttl), 100) == (UNKNOWN, None)
    assert await store.known(absent) is False  # enqueue creates nothing

    simplepush = new_key()
    await store.hello(simplepush, None, OLDER)
    await store.register(simplepush, chid, dashed(chid), 200)
    assert await store.enqueue(simplepush, chid, message(chid, ttl), 100) == (UNKNOWN, None)
    assert await store.messages(simplepush) == []
    assert await store.update(simplepush, chid, 1, None) == (Update(dashed(chid), 1), OLDER)

    webpush = await webpush_uaid(store, chid)
    assert await store.enqueue(webpush, other, message(other, ttl), 100) == (UNKNOWN, None)
    await store.unregister(webpush, chid)
    assert await store.enqueue(webpush, chid, message(chid, ttl), 100) == (UNKNOWN, None)
    assert await store.messages(webpush) == []


@pytest.mark.gen_test
async def test_ttl_0_is_accepted_with_the_holder_but_never_stored(store):
    """TTL 0 only checks the channel: what decides is the TTL, so a TTL-0 message that
    would still be unexpired (expires_at ahead) must not show up either."""
    chid = new_key()
    uaid = await webpush_uaid(store, chid)
    queued = message(chid)
    assert await store.enqueue(uaid, chid, queued, 1) == (ACCEPTED, OLDER)
    # Not stored, so not held back by a full queue either.
    now = message(chid, 0, data=body(10), expires_at=time.time() + 3600)
    assert await store.enqueue(uaid, chid, now, 1) == (ACCEPTED, OLDER)
    assert await store.messages(uaid) == [queued]
    await store.release(uaid, OLDER)
    topical = message(chid, 0, topic="t", expires_at=time.time() + 3600)
    assert await store.enqueue(uaid, chid, topical, 1) == (ACCEPTED, None)
    assert await store.messages(uaid) == [queued]
    await store.remove(uaid, [(chid, queued.id)])
    for _ in range(3):
        assert await store.enqueue(uaid, chid, message(chid, 0), 1) == (ACCEPTED, None)
    assert await store.messages(uaid) == []
    assert await store.sweep() == 0


@pytest.mark.gen_test
async def test_enqueue_is_full_at_max_queued_on_the_channel(store):
    a, b = new_key(), new_key()
    uaid = await webpush_uaid(store, a, b)
    on_a = [message(a, data=body(i)) for i in range(3)]
    on_b = [message(b) for _ in range(3)]
    for queued in on_a:
        assert await store.enqueue(uaid, a, queued, 3) == (ACCEPTED, OLDER)
    assert await store.enqueue(uaid, a, message(a), 3) == (FULL, OLDER)
    assert await store.enqueue(uaid, a, message(a, topic="new"), 3) == (FULL, OLDER)
    # The cap is per channel: b still takes its own max_queued.
    for queued in on_b:
        assert await store.enqueue(uaid, b, queued, 3) == (ACCEPTED, OLDER)
    assert await store.enqueue(uaid, b, message(b), 3) == (FULL, OLDER)
    await store.release(uaid, OLDER)
    assert await store.enqueue(uaid, a, message(a), 3) == (FULL, None)
    assert await store.messages(uaid) == on_a + on_b
    # Each call's max_queued counts: a larger one takes one more.
    fourth = message(a)
    assert await store.enqueue(uaid, a, fourth, 4) == (ACCEPTED, None)
    # A delivered (removed) message frees its place.
    await store.remove(uaid, [(a, on_a[0].id)])
    fifth = message(a)
    assert await store.enqueue(uaid, a, fifth, 4) == (ACCEPTED, None)
    assert await store.enqueue(uaid, a, message(a), 4) == (FULL, None)
    assert await store.messages(uaid) == [*on_a[1:], *on_b, fourth, fifth]


# --- messages: order, topics, expiry ----------------------------------------------------


@pytest.mark.gen_test
async def test_messages_come_back_exactly_in_the_order_accepted_across_channels(store):
    a, b, c = new_key(), new_key(), new_key()
    uaid = await webpush_uaid(store, a, b, c)
    accepted = [
        message(a, data=body(MAX_BODY)),
        message(b, ttl=30),
        message(a, topic="A_z-09" * 5 + "xy", data=body(1), headers=AESGCM),
        message(c, ttl=5184000),
        message(b, data=body(0)),
        message(a),
    ]
    for queued in accepted:
        chid = queued.channel_id.replace("-", "")
        assert await store.enqueue(uaid, chid, queued, 100) == (ACCEPTED, OLDER)
    assert await store.messages(uaid) == accepted


@pytest.mark.gen_test
async def test_a_topic_replaces_the_undelivered_message_and_takes_the_end_of_the_queue(store):
    a, b = new_key(), new_key()
    uaid = await webpush_uaid(store, a, b)
    old = message(a, topic="t", data=body(8))
    plain = message(a)
    same_topic_elsewhere = message(b, topic="t")
    for queued in (old, plain, same_topic_elsewhere):
        chid = queued.channel_id.replace("-", "")
        assert await store.enqueue(uaid, chid, queued, 100) == (ACCEPTED, OLDER)
    new = message(a, topic="t", data=body(9))
    assert await store.enqueue(uaid, a, new, 100) == (ACCEPTED, OLDER)
    assert await store.messages(uaid) == [plain, same_topic_elsewhere, new]
    other_topic = message(a, topic="u")
    assert await store.enqueue(uaid, a, other_topic, 100) == (ACCEPTED, OLDER)
    newest = message(a, topic="t")
    assert await store.enqueue(uaid, a, newest, 100) == (ACCEPTED, OLDER)
    assert await store.messages(uaid) == [plain, same_topic_elsewhere, other_topic, newest]
    # The replaced message is gone for good: removing it changes nothing.
    await store.remove(uaid, [(a, old.id), (a, new.id)])
    assert await store.messages(uaid) == [plain, same_topic_elsewhere, other_topic, newest]


@pytest.mark.gen_test
async def test_a_topic_replacement_does_not_count_against_the_cap(store):
    chid = new_key()
    uaid = await webpush_uaid(store, chid)
    topical, plain = message(chid, topic="t"), message(chid)
    assert await store.enqueue(uaid, chid, topical, 2) == (ACCEPTED, OLDER)
    assert await store.enqueue(uaid, chid, plain, 2) == (ACCEPTED, OLDER)
    replacement = message(chid, topic="t", data=body(5))
    assert await store.enqueue(uaid, chid, replacement, 2) == (ACCEPTED, OLDER)
    again = message(chid, topic="t")
    assert await store.enqueue(uaid, chid, again, 2) == (ACCEPTED, OLDER)
    assert await store.enqueue(uaid, chid, message(chid), 2) == (FULL, OLDER)
    assert await store.enqueue(uaid, chid, message(chid, topic="other"), 2) == (FULL, OLDER)
    assert await store.messages(uaid) == [plain, again]


@pytest.mark.gen_test
async def test_expired_messages_are_not_returned_nor_counted_against_the_cap(store):
    a, b = new_key(), new_key()
    uaid = await webpush_uaid(store, a, b)
    expired = message(a, ttl=60, data=body(3), expires_at=time.time() - 1)
    live = message(a)
    assert await store.enqueue(uaid, a, expired, 100) == (ACCEPTED, OLDER)
    assert await store.enqueue(uaid, a, live, 100) == (ACCEPTED, OLDER)
    assert await store.messages(uaid) == [live]
    stale = message(b, ttl=60, topic="t", expires_at=time.time() - 1)
    assert await store.enqueue(uaid, b, stale, 1) == (ACCEPTED, OLDER)
    fresh = message(b, topic="t")
    assert await store.enqueue(uaid, b, fresh, 1) == (ACCEPTED, OLDER)
    assert await store.messages(uaid) == [live, fresh]
    assert await store.enqueue(uaid, b, message(b), 1) == (FULL, OLDER)
    await store.remove(uaid, [(a, expired.id), (b, stale.id)])
    assert await store.messages(uaid) == [live, fresh]


@pytest.mark.gen_test
async def test_remove_deletes_only_the_matching_channel_and_id(store):
    a, b = new_key(), new_key()
    uaid = await webpush_uaid(store, a, b)
    first, second, third = message(a), message(a), message(b)
    for queued in (first, second, third):
        chid = queued.channel_id.replace("-", "")
        assert await store.enqueue(uaid, chid, queued, 100) == (ACCEPTED, OLDER)
    await store.remove(uaid, [])
    await store.remove(uaid, [(b, first.id), (a, third.id), (a, uuid.uuid4().hex)])
    assert await store.messages(uaid) == [first, second, third]
    await store.remove(uaid, [(a, second.id)])
    assert await store.messages(uaid) == [first, third]
    await store.remove(uaid, [(a, second.id), (b, third.id), (a, first.id)])
    assert await store.messages(uaid) == []
    # Anyone else's: fine and harmless.
    await store.remove(new_key(), [(a, first.id)])
    simplepush = new_key()
    await store.register(simplepush, a, a, 200)
    await store.update(simplepush, a, 7, "seven")
    await store.remove(simplepush, [(a, first.id), (a, "7")])
    assert await store.pending(simplepush) == [Update(a, 7, "seven")]


@pytest.mark.gen_test
async def test_unregister_drops_the_channels_messages_only(store):
    a, b = new_key(), new_key()
    uaid = await webpush_uaid(store, a, b)
    on_a, on_b, later_a = message(a), message(b, data=body(30)), message(a, topic="t")
    for queued in (on_a, on_b, later_a):
        chid = queued.channel_id.replace("-", "")
        assert await store.enqueue(uaid, chid, queued, 100) == (ACCEPTED, OLDER)
    await store.unregister(uaid, a)
    await store.unregister(uaid, new_key())
    assert await store.messages(uaid) == [on_b]
    assert await store.enqueue(uaid, a, message(a), 100) == (UNKNOWN, None)
    # Registered again, the channel starts empty: nothing comes back.
    assert await store.register(uaid, a, dashed(a), 200) is True
    assert await store.messages(uaid) == [on_b]
    again = message(a)
    assert await store.enqueue(uaid, a, again, 100) == (ACCEPTED, OLDER)
    assert await store.messages(uaid) == [on_b, again]


@pytest.mark.gen_test
async def test_drop_forgets_every_message_and_the_record(store):
    a, b = new_key(), new_key()
    uaid = await webpush_uaid(store, a, b)
    for chid in (a, b, a):
        assert await store.enqueue(uaid, chid, message(chid), 100) == (ACCEPTED, OLDER)
    await store.drop(uaid)
    assert await store.messages(uaid) == []
    assert await store.known(uaid) is False
    assert await store.enqueue(uaid, a, message(a), 100) == (UNKNOWN, None)
    with pytest.raises(WrongUAID):
        await store.hello(uaid, None, OLDER, webpush=True, create=False)
    # A new hello starts an empty record of either kind.
    assert await store.hello(uaid, None, OLDER) is None
    assert await store.messages(uaid) == []


# --- memcached: the bound on a UAID's record ----------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_uaid_is_full_before_its_record_outgrows_one_memcached_item(
    memcached_store, memcached
):
    """Every message of a UAID lives in its one item: with the largest bodies on two
    channels (200 places at max_queued 100), FULL comes once the record would pass
    MAX_RECORD, before memcached would refuse it (a 503), and what is queued stays whole."""
    store = memcached_store()
    a, b = new_key(), new_key()
    uaid = await webpush_uaid(store, a, b)
    data = body(MAX_BODY)
    accepted: list[Message] = []
    while True:
        chid = (a, b)[len(accepted) % 2]
        queued = message(chid, data=data)
        enqueued = await store.enqueue(uaid, chid, queued, 100)
        if enqueued != (ACCEPTED, OLDER):
            break
        accepted.append(queued)
        assert len(accepted) < 200, "never full: the record is not bounded"
    assert enqueued == (FULL, OLDER)
    size = item_meta(memcached, uaid, "s")
    assert size <= MAX_RECORD
    # Not refused long before the bound: a message's bookkeeping is far below 512 bytes.
    assert len(accepted) >= MAX_RECORD // (len(data) + 512), (len(accepted), size)
    for chid in (a, b):
        assert await store.enqueue(uaid, chid, message(chid, data=data), 100) == (FULL, OLDER)
    assert item_meta(memcached, uaid, "s") == size
    assert await store.messages(uaid) == accepted
    # The bound is the UAID's: another UAID's record is not affected.
    other = await webpush_uaid(store, a)
    fits = message(a, data=data)
    assert await store.enqueue(other, a, fits, 100) == (ACCEPTED, OLDER)
    assert await store.messages(other) == [fits]
    # Delivered messages make room again.
    await store.remove(uaid, [(a, accepted[0].id)])
    last = message(a, data=data)
    assert await store.enqueue(uaid, a, last, 100) == (ACCEPTED, OLDER)
    assert await store.messages(uaid) == [*accepted[1:], last]


@pytest.mark.gen_test
async def test_memcached_sweep_deletes_nothing_and_reads_skip_the_expired(memcached_store):
    store = memcached_store()
    chid = new_key()
    uaid = await webpush_uaid(store, chid)
    expired = message(chid, ttl=60, expires_at=time.time() - 1)
    live = message(chid)
    for queued in (expired, live):
        assert await store.enqueue(uaid, chid, queued, 100) == (ACCEPTED, OLDER)
    assert await store.sweep() == 0
    assert await store.messages(uaid) == [live]
    assert await store.sweep() == 0


# --- memory: the sweep --------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_memory_sweep_removes_expired_messages_one_slice_of_uaids_per_call():
    store = MemoryStore()
    assert await store.sweep() == 0
    extra = 7
    chid = new_key()
    live: dict[str, Message] = {}
    for _ in range(memory.SWEEP_SLICE + extra):
        uaid = await webpush_uaid(store, chid)
        expired = message(chid, ttl=60, expires_at=time.time() - 1)
        live[uaid] = message(chid)
        assert await store.enqueue(uaid, chid, expired, 100) == (ACCEPTED, OLDER)
        assert await store.enqueue(uaid, chid, live[uaid], 100) == (ACCEPTED, OLDER)
    untouched = await webpush_uaid(store, chid)  # a UAID with nothing queued
    # Each UAID holds one expired message: one slice of UAIDs per call.
    assert [await store.sweep() for _ in range(3)] == [memory.SWEEP_SLICE, extra, 0]
    assert {uaid: await store.messages(uaid) for uaid in live} == {
        uaid: [kept] for uaid, kept in live.items()
    }
    assert await store.messages(untouched) == []
    assert await store.known(untouched) is True
    # Round and round: within the next full round (three calls from here) a message that
    # expires later is found, once.
    target = next(iter(live))
    late = message(chid, ttl=60, expires_at=time.time() - 1)
    assert await store.enqueue(target, chid, late, 100) == (ACCEPTED, OLDER)
    assert sum([await store.sweep() for _ in range(3)]) == 1
    assert await store.messages(target) == [live[target]]
    # Nothing expired: nothing removed, every live message kept.
    assert [await store.sweep() for _ in range(3)] == [0, 0, 0]
    assert sum([len(await store.messages(uaid)) for uaid in live]) == len(live)


@pytest.mark.gen_test
async def test_memory_sweep_skips_dropped_uaids_and_counts_each_message_once(monkeypatch):
    monkeypatch.setattr(memory, "SWEEP_SLICE", 2)
    store = MemoryStore()
    chid = new_key()
    dropped, emptied, kept = [await webpush_uaid(store, chid) for _ in range(3)]
    for uaid in (dropped, emptied, kept):
        expired = message(chid, ttl=60, expires_at=time.time() - 1)
        assert await store.enqueue(uaid, chid, expired, 100) == (ACCEPTED, OLDER)
    await store.drop(dropped)
    # Two UAIDs with messages left: one slice of 2, one expired message each.
    assert await store.sweep() == 2
    assert await store.sweep() == 0
    assert [await store.messages(uaid) for uaid in (dropped, emptied, kept)] == [[], [], []]
    assert await store.known(emptied) is True
