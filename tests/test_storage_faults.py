"""memcached going away and coming back, against a real server and a real memcached.

Each test has its own memcached process, which it stops (or freezes) and
starts again on the same port. While memcached is gone nothing is answered
200 or 202: app servers get 503 with Retry-After, devices get a 503 reply
and a closed socket, /realstatus says why. When it is back the server
serves again by itself, and devices whose records were lost are reset
through the protocol.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from pymemcache.client.base import Client
from tornado.ioloop import IOLoop

from simplepush.config import StorageSettings
from simplepush.registry import STORAGE_RESTARTED
from simplepush.store import Holder, StoreError
from simplepush.store.memcached import KEY_PREFIX, MemcachedStore
from simplepush.updates import Update
from tests.conftest import FRAME_TIMEOUT, Memcached, new_id
from tests.signalwait import freeze, thaw

SERVICE_UNAVAILABLE = {"status": 503, "error": "Service Unavailable"}
UNKNOWN_CHANNEL = {"status": 404, "error": "Unknown Channel"}
SERVER_ERROR = 1011  # the close code after a storage failure
TIMEOUT = 1.0  # [storage] timeout in these tests
HOLDER = Holder("http://127.0.0.1:8090", 1000.5)


@pytest.fixture
def memcached_proc() -> Iterator[Memcached]:
    server = Memcached()
    server.start()
    yield server
    server.stop()  # SIGKILL, which also ends a frozen (SIGSTOP) process


@pytest.fixture
def storage_settings(memcached_proc: Memcached) -> StorageSettings:
    """This module's server uses its own memcached, not the shared one."""
    return StorageSettings(backend="memcached", servers=(memcached_proc.address,), timeout=TIMEOUT)


def restart(memcached: Memcached) -> None:
    """Stop and start on the same port: memcached comes back empty, as after any restart."""
    memcached.stop()
    memcached.start()


async def registered(connect) -> tuple[Any, str, str]:
    device = await connect()
    await device.hello()
    chid = new_id()
    return device, chid, await device.register(chid)


async def get_json(http_client, http_port: int, path: str) -> tuple[int, dict[str, Any]]:
    response = await http_client.fetch(f"http://127.0.0.1:{http_port}{path}", raise_error=False)
    return response.code, json.loads(response.body)


def assert_unavailable(response) -> None:
    assert response.code == 503, (response.code, response.body)
    assert json.loads(response.body) == SERVICE_UNAVAILABLE
    assert int(response.headers["Retry-After"]) > 0


# --- memcached stopped --------------------------------------------------------


@pytest.mark.gen_test
async def test_a_put_while_memcached_is_down_is_503_and_its_devices_are_sent_to_hello_again(
    connect, put, memcached_proc, caplog
):
    """memcached comes back empty: a device left connected would be unreachable, unaware."""
    device, _, endpoint = await registered(connect)
    memcached_proc.stop()
    assert_unavailable(await put(endpoint, "version=5"))
    assert await device.expect_closed() == STORAGE_RESTARTED[0]
    assert device.conn.close_reason == STORAGE_RESTARTED[1]
    lost = [r.fields for r in caplog.records if getattr(r, "event_type", "") == "storage.lost"]
    assert lost == [{"closed_sockets": 1}]


@pytest.mark.gen_test
async def test_a_hello_while_memcached_is_down_is_503_and_closed(connect, memcached_proc):
    device, chid, _ = await registered(connect)
    frame = {"messageType": "hello", "uaid": device.uaid, "channelIDs": [chid]}
    device.close()
    memcached_proc.stop()
    device = await connect()
    assert await device.request(frame) == {**frame, **SERVICE_UNAVAILABLE}
    assert await device.expect_closed() == SERVER_ERROR


@pytest.mark.gen_test
async def test_a_new_device_while_memcached_is_down_gets_503_at_its_register(
    connect, memcached_proc
):
    """Its hello needs no storage (store.Fresh): the register is the first write, and fails."""
    memcached_proc.stop()
    device = await connect()
    reply = await device.request({"messageType": "hello", "uaid": "", "channelIDs": []})
    assert reply["status"] == 200
    frame = {"messageType": "register", "channelID": new_id()}
    assert await device.request(frame) == {**frame, **SERVICE_UNAVAILABLE}
    assert await device.expect_closed() == SERVER_ERROR


@pytest.mark.parametrize("mtype", ["register", "unregister", "ack"])
@pytest.mark.gen_test
async def test_a_command_memcached_does_not_answer_is_503_and_closed(
    connect, memcached_proc, mtype
):
    """Frozen rather than stopped: a stopped memcached closes the devices itself (above)."""
    device, chid, _ = await registered(connect)
    freeze(memcached_proc.proc.pid)
    frame = {"messageType": mtype, "channelID": chid}
    if mtype == "ack":
        frame = {"messageType": "ack", "updates": [{"channelID": chid, "version": 1}]}
    assert await device.request(frame) == {**frame, **SERVICE_UNAVAILABLE}
    assert await device.expect_closed() == SERVER_ERROR


@pytest.mark.gen_test(timeout=15)
async def test_realstatus_says_why_while_status_stays_200(http_client, http_port, memcached_proc):
    assert (await get_json(http_client, http_port, "/realstatus"))[0] == 200
    memcached_proc.stop()
    code, body = await get_json(http_client, http_port, "/realstatus")
    assert code == 503
    assert body["ok"] is False
    assert body["storage"]["ok"] is False
    assert memcached_proc.address in body["storage"]["error"]
    assert "refused" in body["storage"]["error"].lower()
    # The failed check is remembered, with when, for after storage is back.
    assert body["storage"]["last_error"] == body["storage"]["error"]
    failed_at = body["storage"]["last_error_at"]
    assert type(failed_at) is float and abs(failed_at - time.time()) < 5
    assert type(body["storage"]["rtt_ms"]) in (int, float) and body["storage"]["rtt_ms"] >= 0
    assert body["devices"] == 0 and body["clients"] == 0
    code, body = await get_json(http_client, http_port, "/status")
    assert (code, body["status"]) == (200, "OK")
    memcached_proc.start()
    await wait_until_healthy(http_client, http_port)
    code, body = await get_json(http_client, http_port, "/realstatus")
    assert body["storage"]["ok"] is True and body["storage"]["error"] == ""
    assert memcached_proc.address in body["storage"]["last_error"]
    assert body["storage"]["last_error_at"] >= failed_at


# --- memcached back -------------------------------------------------------------


async def wait_until_healthy(http_client, http_port: int) -> None:
    deadline = time.monotonic() + 5
    while (await get_json(http_client, http_port, "/realstatus"))[0] != 200:
        assert time.monotonic() < deadline, "/realstatus did not recover within 5 s"
        await asyncio.sleep(0.1)


@pytest.mark.gen_test(timeout=15)
async def test_service_resumes_by_itself_and_a_lost_device_is_reset(
    connect, put, http_client, http_port, memcached_proc
):
    device, chid, endpoint = await registered(connect)
    old_uaid = device.uaid
    device.close()
    memcached_proc.stop()
    assert_unavailable(await put(endpoint, "version=5"))
    memcached_proc.start()
    await wait_until_healthy(http_client, http_port)
    # Every call works again, on every pooled connection.
    for _ in range(20):
        response = await put(endpoint, "version=6")
        assert (response.code, json.loads(response.body)) == (404, UNKNOWN_CHANNEL)
    device = await connect()
    reply = await device.request({"messageType": "hello", "uaid": old_uaid, "channelIDs": [chid]})
    assert reply["status"] == 200
    assert reply["uaid"] not in ("", old_uaid)
    device.uaid = reply["uaid"]
    endpoint = await device.register(chid)
    response = await put(endpoint, "version=7")
    assert (response.code, response.body) == (200, b"{}")
    notification = {"messageType": "notification", "updates": [{"channelID": chid, "version": 7}]}
    assert await device.recv() == notification


@pytest.mark.gen_test(timeout=15)
async def test_a_frozen_memcached_times_out_without_stalling_the_server(
    connect, put, http_client, http_port, memcached_proc
):
    device, _, endpoint = await registered(connect)
    freeze(memcached_proc.proc.pid)
    started = time.monotonic()
    waiting = asyncio.ensure_future(put(endpoint, "version=5"))
    # The server keeps answering while the PUT waits on memcached.
    assert await device.request("{}") == {}
    assert (await get_json(http_client, http_port, "/status"))[0] == 200
    assert not waiting.done()
    assert_unavailable(await asyncio.wait_for(waiting, FRAME_TIMEOUT))
    assert time.monotonic() - started >= TIMEOUT
    thaw(memcached_proc.proc.pid)
    await wait_until_healthy(http_client, http_port)
    response = await put(endpoint, "version=6")
    assert (response.code, response.body) == (200, b"{}")


# --- the store itself -------------------------------------------------------------


@pytest.fixture
def memcached_store(io_loop: IOLoop):
    """memcached_store(servers, **options) -> a MemcachedStore closed at teardown."""
    opened: list[MemcachedStore] = []

    def _open(*servers: Memcached, **options) -> MemcachedStore:
        store = MemcachedStore([s.address for s in servers], timeout=TIMEOUT, **options)
        opened.append(store)
        return store

    yield _open
    for store in opened:
        io_loop.run_sync(store.close)


STORE_CALLS = {
    "known": lambda store, uaid: store.known(uaid),
    "hello": lambda store, uaid: store.hello(uaid, None, HOLDER),
    "release": lambda store, uaid: store.release(uaid, HOLDER),
    "wakeup": lambda store, uaid: store.wakeup(uaid),
    "drop": lambda store, uaid: store.drop(uaid),
    "register": lambda store, uaid: store.register(uaid, uaid, uaid, 200),
    "unregister": lambda store, uaid: store.unregister(uaid, uaid),
    "update": lambda store, uaid: store.update(uaid, uaid, 1, None),
    "pending": lambda store, uaid: store.pending(uaid),
    "ack": lambda store, uaid: store.ack(uaid, [(uaid, 1)]),
    "check": lambda store, uaid: store.check(),
}


@pytest.mark.parametrize("call", STORE_CALLS)
@pytest.mark.gen_test
async def test_every_store_call_raises_store_error_naming_the_server(
    memcached_store, memcached_proc, call
):
    store = memcached_store(memcached_proc)
    memcached_proc.stop()
    with pytest.raises(StoreError, match=f"memcached {memcached_proc.address}: .*refused"):
        await STORE_CALLS[call](store, uuid.uuid4().hex)


@pytest.mark.gen_test
async def test_a_connection_memcached_closed_is_opened_again(memcached_store, memcached_proc):
    """A restart leaves every idle connection dead; the next call must not fail on it."""
    store = memcached_store(memcached_proc)
    uaid = uuid.uuid4().hex
    await store.register(uaid, uaid, uaid, 200)
    restart(memcached_proc)
    assert await store.known(uaid) is False
    await store.register(uaid, uaid, uaid, 200)
    assert await store.update(uaid, uaid, 1, None) == (Update(uaid, 1), None)


@pytest.mark.gen_test(timeout=15)
async def test_a_server_that_is_down_keeps_its_keys(memcached_store, memcached_proc):
    """With several servers, a dead one's UAIDs fail (503) instead of moving to another."""
    second = Memcached()
    second.start()
    try:
        store = memcached_store(memcached_proc, second)
        uaids = [uuid.uuid4().hex for _ in range(32)]
        for uaid in uaids:
            await store.hello(uaid, None, HOLDER)
        second.stop()
        on_first, on_second = [], []
        for uaid in uaids:
            try:
                await store.hello(uaid, None, HOLDER)
                on_first.append(uaid)
            except StoreError as exc:
                assert second.address in str(exc)
                on_second.append(uaid)
        assert on_first and on_second
        first = Client(("127.0.0.1", memcached_proc.port))
        try:
            assert all(first.get(KEY_PREFIX + uaid) is None for uaid in on_second)
        finally:
            first.close()
        second.start()
        assert [await store.known(uaid) for uaid in on_first] == [True] * len(on_first)
        assert [await store.known(uaid) for uaid in on_second] == [False] * len(on_second)
    finally:
        second.stop()
