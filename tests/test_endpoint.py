"""The app-server face: PUT /update/<token>, /status and /realstatus.

Every test drives a real server over 127.0.0.1 with real WebSocket devices
(tests/conftest.py). Rules come from PROTOCOL.md sections 4-6 and the
binding choices of DESIGN.md sections 2-3.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest

from simplepush import __version__
from simplepush.tokens import TokenCodec, generate_key
from tests.conftest import FRAME_TIMEOUT, new_id, token_of

FORM = "application/x-www-form-urlencoded"
INVALID_VERSION = {"status": 400, "error": "Invalid Version"}
DATA_TOO_LONG = {"status": 413, "error": "Data exceeds max length of 4096 bytes"}
INVALID_TOKEN = {"status": 404, "error": "Invalid Token"}
UNKNOWN_CHANNEL = {"status": 404, "error": "Unknown Channel"}
METHOD_NOT_ALLOWED = {"status": 405, "error": "Method Not Allowed"}
# Stands for "the current UTC seconds" where a test expects a timestamp version.
NOW = object()


def notification(*updates: dict[str, Any]) -> dict[str, Any]:
    return {"messageType": "notification", "updates": list(updates)}


def update(channel_id: str, version: int, data: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"channelID": channel_id, "version": version}
    if data is not None:
        entry["data"] = data
    return entry


def body(**fields: str | int) -> str:
    """A form body, percent-encoded the way an app server would send it."""
    return urlencode(fields)


def assert_answer(response, status: int, expected: dict[str, Any]) -> None:
    """Status, JSON content type and the exact JSON body (PROTOCOL.md 4.6)."""
    assert response.code == status, (response.code, response.body)
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    assert json.loads(response.body) == expected


def assert_now(version: int, before: int, after: int) -> None:
    """A version the server took from its clock between `before` and `after`."""
    assert before <= version <= after
    assert len(str(version)) == 10


async def registered(connect, channel_id: str | None = None):
    """A connected, identified device with one channel: (device, channel_id, endpoint)."""
    device = await connect()
    await device.hello()
    channel_id = channel_id or new_id()
    endpoint = await device.register(channel_id)
    return device, channel_id, endpoint


async def hang_up(device, node) -> None:
    """Close the socket and wait until the server has let go of the UAID, so PUTs are stored."""
    device.close()

    async def released() -> None:
        while node.registry.get(device.uaid) is not None:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(released(), FRAME_TIMEOUT)


async def reconnect(connect, uaid: str, channel_ids: list[str]):
    """A new socket saying hello as `uaid`; the hello reply is consumed, any flush is not."""
    device = await connect()
    reply = await device.hello(uaid, channel_ids)
    assert reply["uaid"] == uaid
    return device


async def sync(device) -> None:
    """Ping and require the pong as the very next frame: nothing else was sent before it."""
    assert await device.request({}) == {}


def url(http_port: int, path: str) -> str:
    return f"http://127.0.0.1:{http_port}{path}"


# --- 200 / 202 --------------------------------------------------------------


@pytest.mark.gen_test
async def test_connected_device_gets_200_and_the_notification(connect, put):
    device, chid, endpoint = await registered(connect)
    response = await put(endpoint, "version=12")
    assert_answer(response, 200, {})
    assert response.body == b"{}"
    assert await device.recv() == notification(update(chid, 12))


@pytest.mark.gen_test
async def test_offline_device_gets_202_then_the_flush_after_hello(connect, put, node):
    device, chid, endpoint = await registered(connect)
    await hang_up(device, node)
    response = await put(endpoint, "version=5")
    assert_answer(response, 202, {})
    assert response.body == b"{}"
    device = await reconnect(connect, device.uaid, [chid])
    assert await device.recv() == notification(update(chid, 5))


# --- version rules (DESIGN 2.5, PROTOCOL 4.4) -------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("request_body", ["", "version="], ids=["missing", "empty"])
async def test_missing_or_empty_version_is_now(connect, put, request_body):
    device, chid, endpoint = await registered(connect)
    before = int(time.time())
    response = await put(endpoint, request_body)
    after = int(time.time())
    assert_answer(response, 200, {})
    frame = await device.recv()
    assert_now(frame["updates"][0]["version"], before, after)
    assert frame == notification(update(chid, frame["updates"][0]["version"]))


@pytest.mark.gen_test
@pytest.mark.parametrize("version", [0, 12, 2**63 - 1], ids=["zero", "twelve", "max"])
async def test_valid_version_is_delivered_literally(connect, put, version):
    device, chid, endpoint = await registered(connect)
    assert_answer(await put(endpoint, body(version=version)), 200, {})
    assert await device.recv() == notification(update(chid, version))


@pytest.mark.gen_test
@pytest.mark.parametrize("version", [str(2**63), "-5", "abc", "1.5", "1e3", " 5", "+5"])
async def test_invalid_version_is_400(connect, put, version):
    device, chid, endpoint = await registered(connect)
    response = await put(endpoint, body(version=version))
    assert_answer(response, 400, INVALID_VERSION)
    assert response.body == b'{"status":400,"error":"Invalid Version"}'
    # The next frame is the next valid PUT's: the rejected one delivered nothing.
    assert_answer(await put(endpoint, "version=1"), 200, {})
    assert await device.recv() == notification(update(chid, 1))


@pytest.mark.gen_test
async def test_bad_version_on_bad_token_is_400(put, http_port):
    """The version is checked before the token (PGF order)."""
    response = await put(url(http_port, "/update/garbage"), "version=abc")
    assert_answer(response, 400, INVALID_VERSION)


# --- Content-Type (PROTOCOL 4.3, 7.5 test_two_chan) -------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize(
    ("headers", "request_body", "query", "expected"),
    [
        pytest.param({"Content-Type": FORM}, "version=12", "", 12, id="form"),
        pytest.param({}, "version=12", "", 12, id="no-content-type"),
        pytest.param({"Content-Type": f"{FORM}; charset=utf-8"}, "version=12", "", 12, id="param"),
        pytest.param({"Content-Type": "text/plain"}, "version=999", "", NOW, id="text-plain"),
        pytest.param({"Content-Type": "application/json"}, "version=999", "", NOW, id="json"),
        pytest.param({"Content-Type": FORM}, "", "?version=42", 42, id="query"),
        pytest.param({"Content-Type": FORM}, "version=2", "?version=1", 2, id="body-wins"),
        pytest.param(
            {"Content-Type": "text/plain"}, "version=999", "?version=5", 5, id="ignored-body-query"
        ),
    ],
)
async def test_content_type_decides_whether_the_body_is_read(
    connect, put, headers, request_body, query, expected
):
    device, chid, endpoint = await registered(connect)
    before = int(time.time())
    response = await put(endpoint + query, request_body, headers)
    after = int(time.time())
    assert_answer(response, 200, {})
    frame = await device.recv()
    version = frame["updates"][0]["version"]
    if expected is NOW:
        assert_now(version, before, after)
    else:
        assert version == expected
    assert frame == notification(update(chid, version))


# --- data (DESIGN 2.9, PROTOCOL 4.5) ----------------------------------------


@pytest.mark.gen_test
async def test_data_is_delivered(connect, put):
    device, chid, endpoint = await registered(connect)
    assert_answer(await put(endpoint, "version=3&data=howdythere"), 200, {})
    assert await device.recv() == notification(update(chid, 3, "howdythere"))


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "data",
    ["x" * 4096, "é" * 2048, "😀" * 1024],
    ids=["ascii", "two-byte", "four-byte"],
)
async def test_data_of_exactly_4096_bytes_is_accepted(connect, put, data):
    assert len(data.encode("utf-8")) == 4096
    device, chid, endpoint = await registered(connect)
    assert_answer(await put(endpoint, body(version=3, data=data)), 200, {})
    assert await device.recv() == notification(update(chid, 3, data))


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "data",
    ["x" * 4097, "é" * 2048 + "a", "😀" * 1024 + "a"],
    ids=["ascii", "two-byte", "four-byte"],
)
async def test_data_over_4096_bytes_is_413(connect, put, data):
    """Counted in UTF-8 bytes, not characters: 1025 characters can be too long."""
    assert len(data.encode("utf-8")) == 4097
    device, chid, endpoint = await registered(connect)
    assert_answer(await put(endpoint, body(version=3, data=data)), 413, DATA_TOO_LONG)
    assert_answer(await put(endpoint, "version=4"), 200, {})
    assert await device.recv() == notification(update(chid, 4))


@pytest.mark.gen_test
@pytest.mark.parametrize("request_body", ["version=3", "version=3&data="], ids=["none", "empty"])
async def test_no_data_means_no_data_key(connect, put, request_body):
    device, chid, endpoint = await registered(connect)
    assert_answer(await put(endpoint, request_body), 200, {})
    assert await device.recv() == {
        "messageType": "notification",
        "updates": [{"channelID": chid, "version": 3}],
    }


@pytest.mark.gen_test
async def test_data_is_stored_with_the_pending_version(connect, put, node):
    device, chid, endpoint = await registered(connect)
    await hang_up(device, node)
    assert_answer(await put(endpoint, "version=4&data=stored"), 202, {})
    device = await reconnect(connect, device.uaid, [chid])
    assert await device.recv() == notification(update(chid, 4, "stored"))


@pytest.mark.gen_test
async def test_unacked_live_delivery_is_redelivered_identically(connect, put, node):
    """PROTOCOL 7.2 test_direct_delivery_without_ack, with data kept (DESIGN 2.9)."""
    device, chid, endpoint = await registered(connect)
    assert_answer(await put(endpoint, "version=8&data=again"), 200, {})
    live = await device.recv()
    assert live == notification(update(chid, 8, "again"))
    await hang_up(device, node)
    device = await reconnect(connect, device.uaid, [chid])
    assert await device.recv() == live


# --- tokens (DESIGN 2.4, PROTOCOL 4.7-4.8) ----------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("token", ["", "garbage", "gAAAAA==", "a/b"], ids=repr)
async def test_token_that_does_not_decode_is_404(put, http_port, token):
    response = await put(url(http_port, f"/update/{token}"), "version=1")
    assert_answer(response, 404, INVALID_TOKEN)


@pytest.mark.gen_test
async def test_tampered_token_is_404(connect, put):
    device, chid, endpoint = await registered(connect)
    token = token_of(endpoint)
    middle = len(token) // 2
    flipped = "B" if token[middle] == "A" else "A"
    tampered = token[:middle] + flipped + token[middle + 1 :]
    response = await put(endpoint.replace(token, tampered), "version=1")
    assert_answer(response, 404, INVALID_TOKEN)
    assert_answer(await put(endpoint, "version=2"), 200, {})
    assert await device.recv() == notification(update(chid, 2))


@pytest.mark.gen_test
async def test_token_made_with_another_servers_key_is_404(connect, put):
    device, chid, endpoint = await registered(connect)
    foreign = TokenCodec([generate_key()]).encode(device.uaid, uuid.UUID(chid).hex)
    response = await put(endpoint.replace(token_of(endpoint), foreign), "version=1")
    assert_answer(response, 404, INVALID_TOKEN)
    assert_answer(await put(endpoint, "version=2"), 200, {})
    assert await device.recv() == notification(update(chid, 2))


@pytest.mark.gen_test
async def test_unknown_channel_is_404_and_creates_no_state(connect, put, node):
    device, chid, endpoint = await registered(connect)
    other = new_id()
    token = node.tokens.encode(device.uaid, uuid.UUID(other).hex)
    response = await put(endpoint.replace(token_of(endpoint), token), "version=9")
    assert_answer(response, 404, UNKNOWN_CHANNEL)
    await device.register(other)
    await hang_up(device, node)
    device = await reconnect(connect, device.uaid, [chid, other])
    await device.expect_silence()


@pytest.mark.gen_test
async def test_unknown_uaid_is_404_and_creates_no_state(connect, put, node, http_port):
    uaid, chid = uuid.uuid4().hex, new_id()
    token = node.tokens.encode(uaid, uuid.UUID(chid).hex)
    response = await put(url(http_port, f"/update/{token}"), "version=9")
    assert_answer(response, 404, UNKNOWN_CHANNEL)
    # A UAID the server does not know, sent with channels, is reset (PROTOCOL 3.2.4).
    device = await connect()
    reply = await device.hello(uaid, [chid])
    assert reply["uaid"] != uaid
    await device.expect_silence()


@pytest.mark.gen_test
async def test_unregistered_channel_is_404(connect, put):
    device, chid, endpoint = await registered(connect)
    reply = await device.request({"messageType": "unregister", "channelID": chid})
    assert reply == {"messageType": "unregister", "channelID": chid, "status": 200}
    assert_answer(await put(endpoint, "version=1"), 404, UNKNOWN_CHANNEL)


# --- methods (PROTOCOL 4.2) -------------------------------------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PATCH"])
async def test_other_methods_are_405(connect, put, method):
    device, chid, endpoint = await registered(connect)
    response = await put(endpoint, "version=5", method=method)
    assert_answer(response, 405, METHOD_NOT_ALLOWED)
    assert response.headers["Allow"] == "PUT, OPTIONS"
    assert_answer(await put(endpoint, "version=6"), 200, {})
    assert await device.recv() == notification(update(chid, 6))


@pytest.mark.gen_test
async def test_options_answers_cors_preflight(connect, put):
    _, _, endpoint = await registered(connect)
    response = await put(endpoint, method="OPTIONS")
    assert response.code == 200
    assert response.body == b""
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert response.headers["Access-Control-Allow-Methods"] == "PUT, OPTIONS"


# --- delivery semantics (PROTOCOL 5, DESIGN 2.5-2.6) ------------------------


@pytest.mark.gen_test
async def test_offline_puts_collapse_to_the_highest_version(connect, put, node):
    device, chid, endpoint = await registered(connect)
    await hang_up(device, node)
    for version in (3, 5, 8):
        assert_answer(await put(endpoint, body(version=version)), 202, {})
    device = await reconnect(connect, device.uaid, [chid])
    assert await device.recv() == notification(update(chid, 8))
    await sync(device)


@pytest.mark.gen_test
async def test_lower_version_does_not_replace_a_pending_one(connect, put, node):
    device, chid, endpoint = await registered(connect)
    await hang_up(device, node)
    assert_answer(await put(endpoint, "version=9&data=high"), 202, {})
    assert_answer(await put(endpoint, "version=4&data=low"), 202, {})
    device = await reconnect(connect, device.uaid, [chid])
    assert await device.recv() == notification(update(chid, 9, "high"))


@pytest.mark.gen_test
async def test_lower_version_after_an_ack_is_delivered(connect, put):
    """PROTOCOL 7.5 test_two_chan: 12345789, ack, then 1."""
    device, chid, endpoint = await registered(connect)
    assert_answer(await put(endpoint, "version=12345789"), 200, {})
    assert await device.recv() == notification(update(chid, 12345789))
    await device.ack(chid, 12345789)
    await sync(device)
    assert_answer(await put(endpoint, "version=1"), 200, {})
    assert await device.recv() == notification(update(chid, 1))


@pytest.mark.gen_test
async def test_ack_of_an_older_version_keeps_the_newer_pending(connect, put, node):
    """An update that lands between delivery and ack is not lost (DESIGN 2.6)."""
    device, chid, endpoint = await registered(connect)
    assert_answer(await put(endpoint, "version=1"), 200, {})
    assert await device.recv() == notification(update(chid, 1))
    assert_answer(await put(endpoint, "version=2"), 200, {})
    assert await device.recv() == notification(update(chid, 2))
    await device.ack(chid, 1)
    # After an ack the server flushes what is still pending (PROTOCOL 3.6).
    assert await device.recv() == notification(update(chid, 2))
    await hang_up(device, node)
    device = await reconnect(connect, device.uaid, [chid])
    assert await device.recv() == notification(update(chid, 2))
    await device.ack(chid, 2)
    await sync(device)
    await hang_up(device, node)
    device = await reconnect(connect, device.uaid, [chid])
    await device.expect_silence()


@pytest.mark.gen_test
async def test_unregister_drops_the_pending_update(connect, put, node):
    """PROTOCOL 7.2 test_no_delivery_to_unregistered."""
    device, chid, endpoint = await registered(connect)
    await hang_up(device, node)
    assert_answer(await put(endpoint, "version=7"), 202, {})
    device = await reconnect(connect, device.uaid, [chid])
    assert await device.recv() == notification(update(chid, 7))
    reply = await device.request({"messageType": "unregister", "channelID": chid})
    assert reply == {"messageType": "unregister", "channelID": chid, "status": 200}
    await hang_up(device, node)
    device = await reconnect(connect, device.uaid, [chid])
    await device.expect_silence()


@pytest.mark.gen_test
async def test_flush_batches_every_pending_channel_in_one_frame(connect, put, node):
    device = await connect()
    await device.hello()
    channels = [new_id() for _ in range(3)]
    endpoints = [await device.register(chid) for chid in channels]
    await hang_up(device, node)
    assert_answer(await put(endpoints[0], "version=11"), 202, {})
    assert_answer(await put(endpoints[1], "version=22&data=two"), 202, {})
    assert_answer(await put(endpoints[2], "version=33"), 202, {})
    device = await reconnect(connect, device.uaid, channels)
    frame = await device.recv()
    assert frame["messageType"] == "notification"
    assert sorted(frame["updates"], key=lambda entry: entry["channelID"]) == sorted(
        [update(channels[0], 11), update(channels[1], 22, "two"), update(channels[2], 33)],
        key=lambda entry: entry["channelID"],
    )
    assert set(frame) == {"messageType", "updates"}
    await sync(device)


@pytest.mark.gen_test
async def test_redelivered_on_every_reconnect_until_acked(connect, put, node):
    """PROTOCOL 7.2 test_delivery_repeat_without_ack and test_dont_deliver_acked."""
    device, chid, endpoint = await registered(connect)
    await hang_up(device, node)
    assert_answer(await put(endpoint, "version=7"), 202, {})
    for _ in range(2):
        device = await reconnect(connect, device.uaid, [chid])
        assert await device.recv() == notification(update(chid, 7))
        await hang_up(device, node)
    device = await reconnect(connect, device.uaid, [chid])
    assert await device.recv() == notification(update(chid, 7))
    await device.ack(chid, 7)
    await sync(device)
    await hang_up(device, node)
    device = await reconnect(connect, device.uaid, [chid])
    await device.expect_silence()


# --- /status and /realstatus (DESIGN 3, PROTOCOL 6.1) -----------------------


@pytest.mark.gen_test
@pytest.mark.parametrize("path", ["/status", "/status/"])
@pytest.mark.parametrize("devices", [0, 2])
async def test_status_counts_open_device_sockets(connect, put, http_port, path, devices):
    for index in range(devices):
        device = await connect()
        if index == 0:
            await device.hello()
    response = await put(url(http_port, path), headers={}, method="GET")
    assert_answer(response, 200, {"status": "OK", "clients": devices, "version": __version__})


@pytest.mark.gen_test
@pytest.mark.server(max_connections=7)
@pytest.mark.parametrize("path", ["/realstatus", "/realstatus/"])
async def test_realstatus_reports_storage_and_limits(
    connect, put, http_port, path, storage_settings
):
    device = await connect()
    await device.hello()
    await device.register()
    await connect()  # open but not identified: a client, not a device
    response = await put(url(http_port, path), headers={}, method="GET")
    assert response.code == 200, (response.code, response.body)
    assert response.headers["Content-Type"].split(";")[0] == "application/json"
    body = json.loads(response.body)
    # Measured values: checked for type and range, then the rest exactly.
    rtt_ms, uptime_s = body["storage"].pop("rtt_ms"), body.pop("uptime_s")
    assert type(rtt_ms) in (int, float) and 0 <= rtt_ms < 5000, rtt_ms
    assert type(uptime_s) in (int, float) and 0 <= uptime_s < 60, uptime_s
    storage = {"ok": True, "error": "", "last_error": "", "last_error_at": None}
    if storage_settings.backend == "sqlite":
        # The database's size and its rows by kind: one UAID with one channel.
        size = body["storage"].pop("size_bytes")
        assert type(size) is int and size > 0, size
        storage["rows"] = {"uaids": 1, "channels": 1, "pending": 0, "messages": 0}
    assert body == {
        "ok": True,
        "clients": 2,
        "devices": 1,
        "max_clients": 7,
        "storage": storage,
        "version": __version__,
    }
