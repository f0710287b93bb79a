"""The device side of the wire, against a real server on a real port.

One test per rule of PROTOCOL.md sections 2-3 and 7.7 as DESIGN.md section 2
decides, asserting whole frames, statuses and close codes. Tests covering a
PROTOCOL.md 7.7 checklist item say so with a `# 7.7 item N` comment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from typing import Any

import pytest
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError, websocket_connect

from simplepush.protocol import Wakeup
from tests.conftest import Device, new_id

# Some tests dial the port themselves rather than through connect().
pytestmark = pytest.mark.usefixtures("http_server")

UAID = re.compile(r"[0-9a-f]{32}")
TEXTS = {401: "Invalid Command", 413: "Too Many Channels", 503: "Service Unavailable"}
# Close codes the server uses (simplepush/session.py, simplepush/registry.py)
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
SUPERSEDED = 4000


def hex_id() -> str:
    """32 lowercase hex: how the suite of PROTOCOL.md 7 spells UAIDs and channelIDs."""
    return uuid.uuid4().hex


def hello(uaid: Any = "", channel_ids: Any = (), **extra: Any) -> dict[str, Any]:
    return {"messageType": "hello", "uaid": uaid, "channelIDs": list(channel_ids), **extra}


def hello_ok(uaid: str) -> dict[str, Any]:
    return {"messageType": "hello", "uaid": uaid, "status": 200}


def error(request: dict[str, Any], status: int) -> dict[str, Any]:
    """The only shape of an error reply: the request echoed, type lowercased, status, error."""
    reply = dict(request)
    if isinstance(request.get("messageType"), str):
        reply["messageType"] = request["messageType"].lower()
    reply.update(status=status, error=TEXTS[status])
    return reply


def notification(*updates: tuple[str, int] | tuple[str, int, str]) -> dict[str, Any]:
    entries = []
    for update in updates:
        entry: dict[str, Any] = {"channelID": update[0], "version": update[1]}
        if len(update) == 3:
            entry["data"] = update[2]
        entries.append(entry)
    return {"messageType": "notification", "updates": entries}


async def new_uaid_of(device: Device, frame: dict[str, Any]) -> str:
    """Send a hello that must be answered 200 with a fresh, server-made UAID."""
    reply = await device.request(frame)
    uaid = reply.get("uaid", "")
    assert UAID.fullmatch(uaid), reply
    assert reply == hello_ok(uaid)
    device.uaid = uaid
    return uaid


async def assert_refused(device: Device, frame: dict[str, Any] | str, reply: dict) -> None:
    """The frame is answered with exactly `reply`, then the socket is closed."""
    assert await device.request(frame) == reply
    assert await device.expect_closed() == POLICY_VIOLATION


async def assert_open_and_quiet(device: Device) -> None:
    """The socket is open and sent nothing since the last frame read.

    The server handles one socket's frames in order and writes what a frame
    (or a finished PUT) causes before it reads the next frame, so a ping's
    reply as the very next frame proves that nothing else was sent.
    """
    await device.send("{}")
    assert await device.recv_text() == "{}"


async def hang_up(device: Device) -> None:
    """Close from the device side and wait for the server's close frame.

    The server has then seen the close, so a following PUT finds no socket
    (202, not 200) and a new upgrade is counted without this one.
    """
    device.close()
    while await device.recv_text() is not None:
        pass


async def registered_offline(connect, put, version: int = 5) -> tuple[str, str, str]:
    """A UAID with one channel whose update was stored while the device was away."""
    device = await connect()
    await device.hello()
    chid = new_id()
    endpoint = await device.register(chid)
    await hang_up(device)
    response = await put(endpoint, f"version={version}")
    assert (response.code, response.body) == (202, b"{}")
    return device.uaid, chid, endpoint


# --- PROTOCOL.md 3.2.4: how the UAID is chosen -----------------------------


@pytest.mark.parametrize(
    "frame",
    [
        hello(""),
        {"messageType": "hello", "channelIDs": []},
        hello(None),
    ],
    ids=["empty", "absent", "null"],
)
@pytest.mark.gen_test
async def test_row_a_no_uaid_gets_a_new_one(connect, frame):
    device = await connect()
    await new_uaid_of(device, frame)


@pytest.mark.gen_test
async def test_row_b_no_uaid_with_channels_gets_a_new_one(connect):
    device = await connect()
    await new_uaid_of(device, hello("", [new_id(), hex_id()]))


@pytest.mark.gen_test
async def test_row_c_known_uaid_is_kept(connect, put):
    first = await connect()
    await first.hello()
    chid = new_id()
    endpoint = await first.register(chid)
    await hang_up(first)
    second = await connect()
    assert await second.request(hello(first.uaid, [chid])) == hello_ok(first.uaid)
    # and the old endpoint reaches the resumed socket (PROTOCOL.md 7.3 uaid_resumption)
    assert (await put(endpoint, "version=9")).code == 200
    assert await second.recv() == notification((chid, 9))


@pytest.mark.gen_test
async def test_row_d_unknown_uaid_without_channels_is_kept(connect):  # 7.7 item 6
    device = await connect()
    uaid = hex_id()
    assert await device.request(hello(uaid, [], customKey="x")) == hello_ok(uaid)


@pytest.mark.gen_test
async def test_row_e_unknown_uaid_with_channels_is_reset(connect):  # 7.7 item 6
    device = await connect()
    uaid = hex_id()
    assert await new_uaid_of(device, hello(uaid, [hex_id()])) != uaid


MALFORMED_UAIDS = [
    "valid_uaid",
    " fooey barrey ",
    "!@#$%^&*()-+",
    "0",
    "1",
    "-66000",
    "True",
    "false",
    '"quoted"',
    "f7067d44-5893-4ab1-8b3e-2f1e4a2e1c4",  # last group one short
    "f7067d4-45893-4ab1-8b3e-2f1e4a2e1c4a",  # dashes misplaced
    "f" * 33,
    "f" * 128_000,
]


@pytest.mark.parametrize("uaid", MALFORMED_UAIDS, ids=lambda u: u[:40])
@pytest.mark.gen_test
async def test_row_f_malformed_uaid_is_503_and_closed(connect, uaid):  # 7.7 item 6
    device = await connect()
    frame = hello(uaid, [], customKey="custom")
    await assert_refused(device, frame, error(frame, 503))


@pytest.mark.parametrize("uaid", [str(uuid.uuid4()), str(uuid.uuid4()).upper()])
@pytest.mark.gen_test
async def test_row_g_dashed_uuid_uaid_is_kept_verbatim(connect, uaid):  # 7.7 item 6
    device = await connect()
    assert await device.request(hello(uaid)) == hello_ok(uaid)
    chid = new_id()
    reply = await device.request({"messageType": "register", "channelID": chid})
    assert reply["uaid"] == uaid


@pytest.mark.gen_test
async def test_row_h_uppercase_hex_uaid_is_kept_verbatim(connect):
    device = await connect()
    uaid = hex_id().upper()
    assert await device.request(hello(uaid)) == hello_ok(uaid)


@pytest.mark.parametrize("uaid", [0, 123, 1.5, True, [], [hex_id()], {}])
@pytest.mark.gen_test
async def test_row_i_non_string_uaid_is_401_and_closed(connect, uaid):
    device = await connect()
    frame = hello(uaid)
    await assert_refused(device, frame, error(frame, 401))


@pytest.mark.server(max_channels=3)
@pytest.mark.gen_test
async def test_row_j_too_many_channel_ids_reset_the_uaid_and_drop_its_data(connect, put):
    uaid, chid, endpoint = await registered_offline(connect, put)
    second = await connect()
    assert await new_uaid_of(second, hello(uaid, [chid, new_id(), new_id(), new_id()])) != uaid
    await assert_open_and_quiet(second)
    # X is now unknown: hello X with [] keeps it (row D) but nothing of it survived
    third = await connect()
    assert await third.request(hello(uaid)) == hello_ok(uaid)
    await assert_open_and_quiet(third)
    assert (await put(endpoint, "version=6")).code == 404


@pytest.mark.server(max_channels=3)
@pytest.mark.gen_test
async def test_row_j_exactly_max_channel_ids_keep_the_uaid(connect, put):
    uaid, chid, _ = await registered_offline(connect, put, version=5)
    device = await connect()
    assert await device.request(hello(uaid, [chid, new_id(), new_id()])) == hello_ok(uaid)
    assert await device.recv() == notification((chid, 5))


@pytest.mark.gen_test
async def test_row_k_newest_connection_for_a_uaid_wins(connect, put):
    old = await connect()
    await old.hello()
    chid = new_id()
    endpoint = await old.register(chid)
    new = await connect()
    assert await new.request(hello(old.uaid, [chid])) == hello_ok(old.uaid)
    assert await old.expect_closed() == SUPERSEDED  # with no frame before the close
    assert (await put(endpoint, "version=3")).code == 200
    assert await new.recv() == notification((chid, 3))


@pytest.mark.gen_test
async def test_row_k_older_connection_cannot_take_the_uaid_back(connect, put):
    """Newest means newest connected (DESIGN.md 2.7), even if it said hello first."""
    older = await connect()
    newer = await connect()
    await newer.hello()
    chid = new_id()
    endpoint = await newer.register(chid)
    await older.send(hello(newer.uaid, [chid]))
    assert await older.expect_closed() == SUPERSEDED
    assert (await put(endpoint, "version=3")).code == 200
    assert await newer.recv() == notification((chid, 3))


@pytest.mark.parametrize(
    "frame",
    [
        {"messageType": "hello"},
        {"messageType": "hello", "uaid": ""},
        {"messageType": "hello", "uaid": "", "channelIDs": None},
        {"messageType": "hello", "uaid": "", "channelIDs": "abc"},
        {"messageType": "hello", "uaid": "", "channelIDs": [new_id(), 5]},
    ],
    ids=["bare", "missing", "null", "string", "non-string-entry"],
)
@pytest.mark.gen_test
async def test_row_l_hello_without_channel_ids_is_401_and_closed(connect, frame):  # 7.7 item 6
    device = await connect()
    await assert_refused(device, frame, error(frame, 401))


# --- PROTOCOL.md 3.2.5: a second hello on the same socket ------------------


@pytest.mark.parametrize("again", ["same", "empty", "absent"])
@pytest.mark.gen_test
async def test_second_hello_with_same_or_no_uaid_repeats_it_and_flushes(
    connect, put, again
):  # 7.7 item 7
    device = await connect()
    uaid = hex_id()
    assert await device.request(hello(uaid)) == hello_ok(uaid)
    chid = hex_id()
    endpoint = await device.register(chid)
    assert (await put(endpoint, "version=4")).code == 200
    assert await device.recv() == notification((chid, 4))
    frame = {"same": hello(uaid), "empty": hello(""), "absent": {"messageType": "hello"}}[again]
    frame["channelIDs"] = [chid]
    assert await device.request(frame) == hello_ok(uaid)
    assert await device.recv() == notification((chid, 4))


@pytest.mark.gen_test
async def test_second_hello_with_another_uaid_is_503_and_closed(connect):  # 7.7 item 7
    device = await connect()
    asked = hex_id()
    await new_uaid_of(device, hello(asked, [hex_id()]))
    frame = hello(asked, [hex_id() for _ in range(200)])
    await assert_refused(device, frame, error(frame, 503))


# --- before hello, pings, purge, message types -----------------------------


@pytest.mark.parametrize(
    "frame",
    [
        {"messageType": "register", "channelID": new_id()},
        {"messageType": "unregister", "channelID": new_id()},
        {"messageType": "Register", "channelID": hex_id(), "uaid": ""},
    ],
)
@pytest.mark.gen_test
async def test_commands_before_hello_are_401_and_closed(connect, frame):  # 7.7 item 5
    device = await connect()
    await assert_refused(device, frame, error(frame, 401))


@pytest.mark.parametrize("mtype", ["ack", "acK"])
@pytest.mark.gen_test
async def test_ack_before_hello_echoes_its_updates_unchanged(connect, mtype):  # 7.7 item 3, 5
    device = await connect()
    updates = [{"channelID": hex_id(), "version": 23}, {"channelID": "x", "version": "y"}]
    reply = await device.request({"messageType": mtype, "updates": updates})
    assert reply == {
        "messageType": "ack",
        "updates": updates,
        "status": 401,
        "error": "Invalid Command",
    }
    assert await device.expect_closed() == POLICY_VIOLATION


PINGS = [
    "{}",
    "{ }",
    '{"messageType":"ping"}',
    '{"messageType":"PING"}',
    json.dumps({"messageType": "ping", "channelIDs": [hex_id()], "uaid": hex_id(), "nada": ""}),
]


@pytest.mark.parametrize("ping", PINGS)
@pytest.mark.gen_test
async def test_pings_are_answered_exactly_before_and_after_hello(connect, ping):  # 7.7 item 2
    device = await connect()
    await device.send(ping)
    assert await device.recv_text() == "{}"
    await device.hello(hex_id(), [hex_id()])  # the ping left the socket usable (7.4 ping_reg)
    await device.register()
    await device.send(ping)
    assert await device.recv_text() == "{}"


@pytest.mark.parametrize("mtype", ["purge", "PURGE", "nack"])
@pytest.mark.gen_test
async def test_purge_and_nack_are_accepted_without_reply(connect, mtype):  # 7.7 item 12
    device = await connect()
    await device.send({"messageType": mtype})
    await assert_open_and_quiet(device)
    await device.hello()
    await device.send({"messageType": mtype, "version": 3, "code": 200})
    await assert_open_and_quiet(device)


@pytest.mark.parametrize("mtype", ["", " ", "bogus", "hell", "REGISTRATION", 123, None, [], {}])
@pytest.mark.parametrize("after_hello", [False, True])
@pytest.mark.gen_test
async def test_unknown_blank_or_non_string_type_is_401_and_closed(
    connect, mtype, after_hello
):  # 7.7 item 5
    device = await connect()
    if after_hello:
        await device.hello()
    frame = {"messageType": mtype, "uaid": hex_id(), "channelIDs": []}
    await assert_refused(device, frame, error(frame, 401))


@pytest.mark.parametrize(
    "frame",
    [
        {"messagetype": "hello", "uaid": "", "channelIDs": []},
        {" messageType ": "hello", "uaid": "", "channelIDs": []},
        {"messageType": "hello", "uaid": "", "ChannelIds": [hex_id()]},
    ],
    ids=["messagetype", "spaced", "ChannelIds"],
)
@pytest.mark.gen_test
async def test_keys_are_case_sensitive(connect, frame):
    """DESIGN.md 2.2 overrides PROTOCOL.md 7.7 item 4: no case-insensitive key matching."""
    device = await connect()
    await assert_refused(device, frame, error(frame, 401))


@pytest.mark.gen_test
async def test_message_type_value_is_case_insensitive_and_replies_lowercase(
    connect,
):  # 7.7 item 3
    device = await connect()
    uaid = hex_id()
    reply = await device.request({"messageType": "HELLO", "uaid": uaid, "channelIDs": []})
    assert reply == hello_ok(uaid)
    chid = hex_id()
    reply = await device.request({"messageType": "rEGISTEr", "channelID": chid})
    assert (reply["messageType"], reply["status"]) == ("register", 200)
    reply = await device.request({"messageType": "UNREGISTER", "channelID": chid})
    assert reply == {"messageType": "unregister", "channelID": chid, "status": 200}


@pytest.mark.gen_test
async def test_register_with_a_channel_id_list_is_401_and_stays_open(connect):  # 7.7 item 3
    device = await connect()
    await device.hello()
    frame = {"messageType": "registeR", "channelIDs": [hex_id()], "uaiD": device.uaid}
    assert await device.request(frame) == error(frame, 401)
    await assert_open_and_quiet(device)


@pytest.mark.parametrize("text", ["{", "hello", "{'messageType': 'hello'}", "", '{"a":1}}'])
@pytest.mark.gen_test
async def test_invalid_json_is_closed_without_reply(connect, text):
    device = await connect()
    await device.send(text)
    assert await device.expect_closed() == INVALID_PAYLOAD


@pytest.mark.parametrize("text", ["[]", '"hello"', "1", "null", '[{"messageType":"ping"}]'])
@pytest.mark.gen_test
async def test_non_object_json_is_closed_without_reply(connect, text):
    device = await connect()
    await device.hello()
    await device.send(text)
    assert await device.expect_closed() == INVALID_PAYLOAD


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.gen_test
async def test_non_standard_json_constants_are_closed_without_reply(connect, constant):
    """RFC 8259 has no NaN or Infinity: the frame is not JSON, and is not echoed."""
    device = await connect()
    await device.send(f'{{"messageType":"bogus","x":{constant}}}')
    assert await device.expect_closed() == INVALID_PAYLOAD


@pytest.mark.gen_test
async def test_no_nesting_depth_makes_the_server_abort_the_socket(connect):
    """Shallow frames are echoed (401), too-deep ones are invalid JSON (1007).

    The echo's encoder reaches the recursion limit a few levels before the
    decoder does; bisect for the first depth that is not echoed and check that
    it, too, gets a proper close rather than an aborted connection.
    """
    close_codes: dict[int, int | None] = {}

    async def echoed(depth: int) -> bool:
        device = await connect()
        await device.send('{"messageType":"bogus","x":' + "[" * depth + "]" * depth + "}")
        text = await device.recv_text()
        if text is None:
            close_codes[depth] = device.conn.close_code
            return False
        assert json.loads(text)["status"] == 401
        return True

    low, high = 1, 100_000
    assert await echoed(low)
    assert not await echoed(high)
    while high - low > 1:
        middle = (low + high) // 2
        if await echoed(middle):
            low = middle
        else:
            high = middle
    assert close_codes[high] == INVALID_PAYLOAD, f"nesting depth {high}"


@pytest.mark.gen_test
async def test_binary_frame_is_closed(connect):
    device = await connect()
    await device.conn.write_message(b"{}", binary=True)
    assert await device.expect_closed() == UNSUPPORTED_DATA


# --- PROTOCOL.md 3.3: register ---------------------------------------------


@pytest.mark.parametrize(
    "chid",
    [
        "5c6e1d2a-9f83-4b7e-a1c2-3d4e5f607182",
        "5C6E1D2A-9F83-4B7E-A1C2-3D4E5F607182",
        "5c6e1d2a9f834b7ea1c23d4e5f607182",
        "5C6E1d2a9F834b7eA1C23D4E5F607182",
    ],
)
@pytest.mark.gen_test
async def test_register_accepts_uuid_spellings_and_echoes_them(
    connect, put, http_port, chid
):  # 7.7 item 8
    device = await connect()
    await device.hello()
    reply = await device.request({"messageType": "register", "channelID": chid, "uaid": ""})
    endpoint = reply.get("pushEndpoint", "")
    assert re.fullmatch(rf"http://127\.0\.0\.1:{http_port}/update/[A-Za-z0-9_-]+", endpoint)
    assert reply == {
        "messageType": "register",
        "channelID": chid,
        "status": 200,
        "uaid": device.uaid,
        "pushEndpoint": endpoint,
    }
    assert (await put(endpoint, "version=2")).code == 200
    assert await device.recv() == notification((chid, 2))


@pytest.mark.parametrize(
    "fields",
    [
        {"channelID": hex_id() + "ab"},
        {"channelID": ""},
        {"channelID": "not-a-uuid"},
        {"channelID": 123},
        {"channelID": None},
        {"channelID": [new_id()]},
        {},
    ],
    ids=["34-hex", "empty", "word", "int", "null", "list", "missing"],
)
@pytest.mark.gen_test
async def test_register_with_a_bad_channel_id_is_401_and_stays_open(connect, fields):  # 7.7 item 8
    device = await connect()
    await device.hello()
    frame = {"messageType": "register", **fields}
    assert await device.request(frame) == error(frame, 401)
    await assert_open_and_quiet(device)


@pytest.mark.gen_test
async def test_duplicate_register_is_200_and_keeps_the_pending_update(connect, put):  # 7.7 item 8
    uaid, chid, endpoint = await registered_offline(connect, put, version=8)
    device = await connect()
    assert await device.request(hello(uaid, [chid])) == hello_ok(uaid)
    assert await device.recv() == notification((chid, 8))
    second = await device.request({"messageType": "register", "channelID": chid})
    assert (second["status"], second["channelID"]) == (200, chid)
    await hang_up(device)
    again = await connect()
    assert await again.request(hello(uaid, [chid])) == hello_ok(uaid)
    assert await again.recv() == notification((chid, 8))
    # both endpoints stay valid
    assert (await put(second["pushEndpoint"], "version=9")).code == 200
    assert (await put(endpoint, "version=10")).code == 200


@pytest.mark.gen_test
async def test_registering_the_same_channels_over_and_over_succeeds(connect):  # 7.7 item 8
    """PROTOCOL.md 7.6 test_reg_all_chans: 200 registers cycling over two channels."""
    device = await connect()
    await device.hello()
    chids = [new_id(), new_id()]
    for count in range(200):
        reply = await device.request({"messageType": "register", "channelID": chids[count % 2]})
        assert (reply["status"], "/update/" in reply["pushEndpoint"]) == (200, True)


@pytest.mark.server(max_channels=3)
@pytest.mark.gen_test
async def test_register_beyond_max_channels_is_413_and_stays_open(connect, caplog):
    caplog.set_level(logging.INFO)
    device = await connect()
    await device.hello()
    chids = [new_id() for _ in range(3)]
    for chid in chids:
        await device.register(chid)
    frame = {"messageType": "register", "channelID": new_id()}
    assert await device.request(frame) == error(frame, 413)
    await device.register(chids[0])  # a duplicate is not a new channel
    await assert_open_and_quiet(device)
    said = [
        (r.levelno, r.fields)
        for r in caplog.records
        if getattr(r, "event_type", "") == "websocket.too_many_channels"
    ]
    assert said == [(logging.INFO, {"max_channels": 3})]


# --- PROTOCOL.md 3.4: unregister -------------------------------------------


@pytest.mark.gen_test
async def test_unregister_is_always_200(connect):  # 7.7 item 9
    device = await connect()
    await device.hello()
    chid = hex_id()
    await device.register(chid)
    for channel_id in (chid, chid, new_id(), "not-a-uuid"):
        reply = await device.request({"messageType": "unregister", "channelID": channel_id})
        assert reply == {"messageType": "unregister", "channelID": channel_id, "status": 200}


@pytest.mark.parametrize(
    "fields", [{}, {"channelID": ""}, {"channelID": 7}, {"channelID": None}], ids=str
)
@pytest.mark.gen_test
async def test_unregister_without_a_channel_id_is_401_and_stays_open(connect, fields):
    device = await connect()
    await device.hello("")
    frame = {"messageType": "unregister", **fields}
    assert await device.request(frame) == error(frame, 401)
    await assert_open_and_quiet(device)


@pytest.mark.gen_test
async def test_unregistered_channel_is_never_redelivered(connect, put):  # 7.7 item 9
    uaid, chid, endpoint = await registered_offline(connect, put)
    device = await connect()
    await device.hello(uaid, [chid])
    assert await device.recv() == notification((chid, 5))
    reply = await device.request({"messageType": "unregister", "channelID": chid})
    assert reply == {"messageType": "unregister", "channelID": chid, "status": 200}
    await assert_open_and_quiet(device)
    await hang_up(device)
    again = await connect()
    assert await again.request(hello(uaid, [chid])) == hello_ok(uaid)
    await assert_open_and_quiet(again)  # neither the update nor an `expired` frame
    response = await put(endpoint, "version=6")
    assert response.code == 404


# --- PROTOCOL.md 2.2: subprotocol ------------------------------------------


@pytest.mark.parametrize("offered", [["push-notification"], ["chat", "push-notification"]])
@pytest.mark.gen_test
async def test_push_notification_subprotocol_is_echoed_when_offered(connect, offered):
    device = await connect(subprotocols=offered)
    assert device.conn.selected_subprotocol == "push-notification"
    await device.hello()


@pytest.mark.gen_test
async def test_no_subprotocol_is_required(connect):  # 7.7 item 1
    device = await connect()
    assert device.conn.selected_subprotocol is None
    await device.hello()


@pytest.mark.parametrize("path", ["/", "/push", "/v1/socket?x=1"])
@pytest.mark.gen_test
async def test_websocket_is_served_on_any_other_path(http_port, path):
    """DESIGN.md 3: upgrade on / and on any path that is not an HTTP route."""
    device = Device(await websocket_connect(f"ws://127.0.0.1:{http_port}{path}"))
    try:
        await device.hello()
    finally:
        device.close()


@pytest.mark.gen_test
async def test_another_subprotocol_is_not_selected(connect):
    device = await connect(subprotocols=["chat"])
    assert device.conn.selected_subprotocol is None
    await device.hello()


# --- PROTOCOL.md 2.5 and 6.3: hello timeout, connection limit --------------


@pytest.mark.server(hello_timeout=0.5)
@pytest.mark.gen_test
async def test_socket_without_hello_is_closed_after_hello_timeout(connect):
    device = await connect()
    assert await device.expect_closed() == POLICY_VIOLATION


@pytest.mark.server(hello_timeout=0.5)
@pytest.mark.gen_test
async def test_pings_do_not_extend_hello_timeout(connect):
    device = await connect()
    answered = 0
    for _ in range(30):  # pinging for up to 3 s, six times the timeout
        try:
            await device.send("{}")
        except WebSocketClosedError:
            break
        text = await device.recv_text()
        if text is None:
            break
        assert text == "{}"
        answered += 1
        await asyncio.sleep(0.1)
    assert answered >= 2
    assert device.conn.close_code == POLICY_VIOLATION


@pytest.mark.server(hello_timeout=0.5)
@pytest.mark.gen_test
async def test_hello_stops_hello_timeout(connect):
    device = await connect()
    await device.hello()
    await device.expect_silence(1.0)  # twice the timeout
    await assert_open_and_quiet(device)


@pytest.mark.server(max_connections=2)
@pytest.mark.gen_test
async def test_upgrades_beyond_max_connections_get_503(connect):
    first = await connect()
    await connect()
    with pytest.raises(HTTPClientError) as refused:
        await connect()
    assert refused.value.code == 503
    await hang_up(first)
    third = await connect()
    await third.hello()


# --- PROTOCOL.md 3.5-3.6 and 5: delivery, redelivery, acks -----------------


@pytest.mark.gen_test
async def test_hello_flushes_everything_pending_in_one_frame(connect, put):
    device = await connect()
    await device.hello()
    chids = [new_id(), hex_id()]
    endpoints = [await device.register(chid) for chid in chids]
    await hang_up(device)
    assert [
        (await put(e, f"version={v}")).code for e, v in zip(endpoints, (11, 22), strict=True)
    ] == [202, 202]
    again = await connect()
    await again.hello(device.uaid, chids)
    frame = await again.recv()
    frame["updates"].sort(key=lambda u: u["channelID"] != chids[0])
    assert frame == notification((chids[0], 11), (chids[1], 22))
    await assert_open_and_quiet(again)


@pytest.mark.gen_test
async def test_ack_flushes_what_is_still_pending(connect, put):
    device = await connect()
    await device.hello()
    chids = [new_id(), new_id()]
    for chid, version in zip(chids, (1, 2), strict=True):
        endpoint = await device.register(chid)
        assert (await put(endpoint, f"version={version}")).code == 200
        assert await device.recv() == notification((chid, version))
    await device.ack(chids[0], 1)
    assert await device.recv() == notification((chids[1], 2))
    await device.ack(chids[1], 2)
    await assert_open_and_quiet(device)


@pytest.mark.gen_test
async def test_ack_of_a_lower_version_keeps_the_pending_one(connect, put):
    """The ack race: v2 lands between delivering v1 and its ack (DESIGN.md 2.6)."""
    device = await connect()
    await device.hello()
    chid = new_id()
    endpoint = await device.register(chid)
    assert (await put(endpoint, "version=1")).code == 200
    assert await device.recv() == notification((chid, 1))
    assert (await put(endpoint, "version=2")).code == 200
    assert await device.recv() == notification((chid, 2))
    await device.ack(chid, 1)
    assert await device.recv() == notification((chid, 2))
    await hang_up(device)
    again = await connect()
    await again.hello(device.uaid, [chid])
    assert await again.recv() == notification((chid, 2))


@pytest.mark.gen_test
async def test_ack_of_a_higher_version_clears(connect, put):
    device = await connect()
    await device.hello()
    chid = new_id()
    endpoint = await device.register(chid)
    assert (await put(endpoint, "version=5")).code == 200
    assert await device.recv() == notification((chid, 5))
    await device.ack(chid, 9)
    await assert_open_and_quiet(device)
    await hang_up(device)
    again = await connect()
    await again.hello(device.uaid, [chid])
    await assert_open_and_quiet(again)


@pytest.mark.gen_test
async def test_acked_update_is_not_redelivered(connect, put):
    uaid, chid, _ = await registered_offline(connect, put, version=5)
    device = await connect()
    await device.hello(uaid, [chid])
    assert await device.recv() == notification((chid, 5))
    await device.ack(chid, 5)
    await hang_up(device)
    again = await connect()
    await again.hello(uaid, [chid])
    await assert_open_and_quiet(again)


@pytest.mark.gen_test
async def test_unacked_update_is_redelivered_on_every_hello(connect, put):
    uaid, chid, _ = await registered_offline(connect, put, version=5)
    for _ in range(2):
        device = await connect()
        await device.hello(uaid, [chid])
        assert await device.recv() == notification((chid, 5))
        await hang_up(device)


@pytest.mark.parametrize("data", [None, "howdythere"])
@pytest.mark.gen_test
async def test_stored_redelivery_equals_the_live_update(connect, put, data):  # 7.7 item 11
    device = await connect()
    await device.hello()
    chid = new_id()
    endpoint = await device.register(chid)
    body = "version=12" if data is None else f"version=12&data={data}"
    assert (await put(endpoint, body)).code == 200
    live = await device.recv()
    expected = (chid, 12) if data is None else (chid, 12, data)
    assert live == notification(expected)
    await hang_up(device)
    again = await connect()
    await again.hello(device.uaid, [chid])
    assert await again.recv() == live


@pytest.mark.gen_test
async def test_lower_version_does_not_replace_a_pending_one(connect, put):
    """DESIGN.md 2.5: keep the max while pending; after the ack any version goes."""
    uaid, chid, endpoint = await registered_offline(connect, put, version=10)
    assert (await put(endpoint, "version=4")).code == 202
    device = await connect()
    await device.hello(uaid, [chid])
    assert await device.recv() == notification((chid, 10))
    await device.ack(chid, 10)
    assert (await put(endpoint, "version=1")).code == 200
    assert await device.recv() == notification((chid, 1))


@pytest.mark.parametrize(
    "frame",
    [
        {"messageType": "ack"},
        {"messageType": "ack", "updates": []},
        {"messageType": "ack", "updates": "all"},
        {"messageType": "ack", "updates": [{"channelID": new_id(), "version": 3}]},
    ],
    ids=["missing", "empty", "string", "unknown-channel"],
)
@pytest.mark.gen_test
async def test_ack_without_usable_updates_is_ignored(connect, frame):
    """PROTOCOL.md 8 #19: tolerate an empty or missing ack list without closing."""
    device = await connect()
    await device.hello()
    await device.send(frame)
    await assert_open_and_quiet(device)


@pytest.mark.gen_test
async def test_update_bodies_as_the_device_sees_them(connect, put):  # 7.7 item 10
    device = await connect()
    await device.hello()
    chid = hex_id()
    endpoint = await device.register(chid)

    async def delivered(body: str, headers: dict[str, str] | None = None) -> int:
        response = await put(endpoint, body, headers)
        assert (response.code, response.body) == (200, b"{}")
        frame = await device.recv()
        version = frame["updates"][0]["version"]
        assert frame == notification((chid, version))
        await device.ack(chid, version)
        return version

    assert await delivered("version=12", headers={}) == 12
    assert await delivered("version=0") == 0
    for body, headers in [
        ("version=999", {"Content-Type": "text/plain"}),
        ('{"version": 999}', {"Content-Type": "application/json"}),
        ("version=", None),
        ("", None),
    ]:
        before = int(time.time())
        assert before <= await delivered(body, headers) <= int(time.time())
    await hang_up(device)
    assert (await put(endpoint, "version=13")).code == 202


WAKEUP_HELLO = {
    "wakeup_hostport": {"ip": "10.71.22.5", "port": 50213},
    "mobilenetwork": {"mcc": "214", "mnc": "07", "netid": "10.1.2.3"},
}


@pytest.mark.gen_test
async def test_hello_stores_valid_wakeup_details_with_the_uaid(connect, node):
    """DESIGN.md 2.8: validated and stored with the UAID (a new one's at its first register)."""
    device = await connect()
    reply = await device.request(hello(**WAKEUP_HELLO))
    assert reply["status"] == 200
    await device.register()
    assert await node.store.wakeup(reply["uaid"]) == Wakeup(
        "10.71.22.5", 50213, "214", "07", "10.1.2.3"
    )
    again = await connect()
    assert (await again.request(hello(reply["uaid"], **WAKEUP_HELLO)))["uaid"] == reply["uaid"]
    assert await node.store.wakeup(reply["uaid"]) == Wakeup(
        "10.71.22.5", 50213, "214", "07", "10.1.2.3"
    )


@pytest.mark.gen_test
async def test_a_new_uaid_is_stored_at_its_first_register_and_not_before(connect, node):
    """One write per new device, at its register, rather than two (store.Fresh)."""
    device = await connect()
    uaid = (await device.request(hello()))["uaid"]
    assert await node.store.known(uaid) is False
    await device.register()
    assert await node.store.known(uaid) is True


@pytest.mark.gen_test
async def test_hello_ignores_invalid_wakeup_details_and_stays_open(connect, node):
    """PROTOCOL.md 3.2.6 step 5: unusable details are ignored, the socket stays open."""
    device = await connect()
    reply = await device.request(hello(wakeup_hostport={"ip": "not-an-ip", "port": 50213}))
    assert reply == {"messageType": "hello", "uaid": reply["uaid"], "status": 200}
    assert await node.store.wakeup(reply["uaid"]) is None
    assert await device.request("{}") == {}


@pytest.mark.gen_test
async def test_a_later_hello_without_wakeup_forgets_the_old_details(connect, node):
    first = await connect()
    uaid = (await first.request(hello(**WAKEUP_HELLO)))["uaid"]
    first.close()
    second = await connect()
    assert (await second.request(hello(uaid)))["uaid"] == uaid
    assert await node.store.wakeup(uaid) is None
