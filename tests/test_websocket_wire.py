"""RFC 6455 on the wire: raw TCP against the real server, byte-exact.

The WebSocket layer is hand-written (simplepush/wsframes.py, connection.py,
web.py's DeviceSocket), so a library client would hide exactly what needs
checking: the upgrade bytes, fragmentation, control frames and close codes.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from simplepush import connection
from simplepush.wsframes import (
    BINARY,
    CLOSE,
    CONTINUATION,
    INVALID_PAYLOAD,
    MESSAGE_TOO_BIG,
    NORMAL,
    PING,
    POLICY_VIOLATION,
    PONG,
    PROTOCOL_ERROR,
    TEXT,
    UNSUPPORTED_DATA,
)
from tests.conftest import new_id
from tests.wsclient import HELLO, MASK, client_frame, frame_header, upgrade_request

pytestmark = pytest.mark.usefixtures("http_server")

RFC_KEY, RFC_ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
# Long enough to see a cut socket, far below the default CLOSE_TIMEOUT of 5 s.
TEST_CLOSE_TIMEOUT = 0.3
CUT_WITHIN = 2.0


async def clients(http_client, http_port) -> int:
    response = await http_client.fetch(f"http://127.0.0.1:{http_port}/status")
    return json.loads(response.body)["clients"]


# --- the opening handshake (RFC 6455 4.2) ----------------------------------


@pytest.mark.gen_test
async def test_upgrade_is_answered_101_with_the_accept_key(dial, http_port):
    device = await dial()
    status, fields = await device.request_head(
        upgrade_request(http_port, Sec_WebSocket_Key=RFC_KEY)
    )
    assert status == "HTTP/1.1 101 Switching Protocols"
    assert fields == {
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-accept": RFC_ACCEPT,
    }


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        ("push-notification", "push-notification"),
        ("chat, push-notification", "push-notification"),
        ("chat", None),
        (None, None),
    ],
)
@pytest.mark.gen_test
async def test_subprotocol_is_chosen_only_when_offered(dial, http_port, offered, chosen):
    """RFC 6455 4.2.2: the server may only pick one of the client's subprotocols."""
    device = await dial()
    status, fields = await device.request_head(
        upgrade_request(http_port, Sec_WebSocket_Protocol=offered)
    )
    assert status == "HTTP/1.1 101 Switching Protocols"
    assert fields.get("sec-websocket-protocol") == chosen


@pytest.mark.gen_test
async def test_get_without_upgrade_is_400(dial, http_port):
    device = await dial()
    status, _ = await device.request_head(upgrade_request(http_port, Upgrade=None))
    assert status.startswith("HTTP/1.1 400 ")


@pytest.mark.gen_test
async def test_version_8_is_426_naming_version_13(dial, http_port):
    """RFC 6455 4.4: a refused version is answered with the versions the server speaks."""
    device = await dial()
    status, fields = await device.request_head(
        upgrade_request(http_port, Sec_WebSocket_Version="8")
    )
    assert status.startswith("HTTP/1.1 426 ")
    assert fields.get("sec-websocket-version") == "13"


@pytest.mark.gen_test
async def test_missing_key_is_400(dial, http_port):
    device = await dial()
    status, _ = await device.request_head(upgrade_request(http_port, Sec_WebSocket_Key=None))
    assert status.startswith("HTTP/1.1 400 ")


# --- data and control frames ----------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"\x00\xffping", bytes(range(125))])
@pytest.mark.gen_test
async def test_ping_gets_a_pong_with_the_same_payload(upgrade, payload):
    """RFC 6455 5.5.3: the pong carries the ping's application data."""
    device = await upgrade()
    await device.send(client_frame(PING, payload))
    assert await device.recv_frame() == (PONG, payload)


@pytest.mark.gen_test
async def test_text_fragmented_over_three_frames_is_one_message(upgrade):
    """A ping between the fragments is answered at once; the hello once it is whole."""
    device = await upgrade()
    data = HELLO.encode()
    await device.send(client_frame(TEXT, data[:5], fin=False))
    await device.send(client_frame(PING, b"mid"))
    assert await device.recv_frame() == (PONG, b"mid")
    await device.send(client_frame(CONTINUATION, data[5:20], fin=False))
    await device.send(client_frame(CONTINUATION, data[20:]))
    reply = await device.recv_json()
    assert reply == {"messageType": "hello", "uaid": reply["uaid"], "status": 200}


@pytest.mark.gen_test
async def test_hello_split_across_many_tcp_writes(upgrade):
    """Byte-sized writes through header and mask, then small ones through the payload."""
    device = await upgrade()
    frame = client_frame(TEXT, HELLO.encode())
    cuts = [*range(1, 7), *range(7, len(frame), 7)]
    for start, end in zip([0, *cuts], [*cuts, len(frame)], strict=True):
        await device.send(frame[start:end])
        # let the server read this piece on its own
        await asyncio.sleep(0.002)
    reply = await device.recv_json()
    assert reply == {"messageType": "hello", "uaid": reply["uaid"], "status": 200}


@pytest.mark.gen_test
async def test_pipelined_frames_are_answered_in_order(upgrade):
    """hello, register and ping in one TCP write: each is handled after the one before."""
    device = await upgrade()
    channel_id = new_id()
    register = json.dumps({"messageType": "register", "channelID": channel_id})
    await device.send(
        b"".join(client_frame(TEXT, text.encode()) for text in (HELLO, register, "{}"))
    )
    hello = await device.recv_json()
    assert (hello["messageType"], hello["status"]) == ("hello", 200)
    registered = await device.recv_json()
    assert registered["messageType"] == "register"
    assert (registered["channelID"], registered["status"]) == (channel_id, 200)
    assert registered["uaid"] == hello["uaid"]
    assert await device.recv_frame() == (TEXT, b"{}")


@pytest.mark.gen_test
async def test_200k_frame_is_answered_not_dropped(upgrade):
    """Below the 256 KiB limit a long field gets its protocol answer (503 for a bad uaid)."""
    device = await upgrade()
    frame = {"messageType": "hello", "uaid": "f" * 200_000, "channelIDs": []}
    await device.send_text(json.dumps(frame))
    assert await device.recv_json() == {**frame, "status": 503, "error": "Service Unavailable"}
    assert await device.recv_close() == POLICY_VIOLATION


# --- failing the connection (RFC 6455 7.1.7) -------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        client_frame(TEXT, b"{}", mask=None),
        client_frame(TEXT, b"{}", rsv=0x40),
        client_frame(3, b""),
        client_frame(CONTINUATION, b"{}"),
        client_frame(PING, b"", fin=False),
        client_frame(CLOSE, b"\x03\xed"),
    ],
    ids=["unmasked", "rsv1", "opcode-3", "lone-continuation", "fragmented-ping", "close-1005"],
)
@pytest.mark.gen_test
async def test_protocol_error_is_closed_1002_then_tcp(upgrade, frame):
    device = await upgrade()
    await device.send(frame)
    assert await device.recv_close() == PROTOCOL_ERROR
    await device.expect_eof()


@pytest.mark.parametrize("payload", [b"\xff", b"{\xc3}", b"\xe2\x82"])
@pytest.mark.gen_test
async def test_invalid_utf8_text_is_closed_1007(upgrade, payload):
    device = await upgrade()
    await device.send(client_frame(TEXT, payload))
    assert await device.recv_close() == INVALID_PAYLOAD
    await device.expect_eof()


@pytest.mark.gen_test
async def test_frame_over_256k_is_closed_1009_on_its_header(upgrade):
    """The payload is never sent: the server must not wait to buffer it."""
    device = await upgrade()
    await device.send(frame_header(TEXT, 256 * 1024 + 1) + MASK)
    assert await device.recv_close() == MESSAGE_TOO_BIG
    await device.expect_eof()


# --- the closing handshake (RFC 6455 7.1) ----------------------------------


@pytest.mark.gen_test
async def test_binary_frame_is_closed_1003_and_the_handshake_completes(upgrade):
    device = await upgrade()
    await device.send(client_frame(BINARY, b"\x00\x01"))
    assert await device.recv_close() == UNSUPPORTED_DATA
    await device.send(client_frame(CLOSE, UNSUPPORTED_DATA.to_bytes(2, "big")))
    await device.expect_eof()


@pytest.mark.gen_test
async def test_device_close_is_echoed_then_tcp_closed_and_uncounted(
    upgrade, http_client, http_port
):
    device = await upgrade()
    assert await clients(http_client, http_port) == 1
    await device.send(client_frame(CLOSE, NORMAL.to_bytes(2, "big") + b"bye"))
    assert await device.recv_frame() == (CLOSE, b"\x03\xe8")
    await device.expect_eof()
    assert await clients(http_client, http_port) == 0


@pytest.mark.gen_test
async def test_device_that_never_answers_the_close_is_cut(
    upgrade, http_client, http_port, monkeypatch
):
    monkeypatch.setattr(connection, "CLOSE_TIMEOUT", TEST_CLOSE_TIMEOUT)
    device = await upgrade()
    await device.send(client_frame(BINARY, b""))
    assert await device.recv_close() == UNSUPPORTED_DATA
    await device.expect_eof(timeout=CUT_WITHIN)
    assert await clients(http_client, http_port) == 0


@pytest.mark.gen_test
async def test_a_misbehaving_device_does_not_disturb_another(upgrade, put):
    good = await upgrade()
    await good.hello()
    channel_id = new_id()
    await good.send_text(json.dumps({"messageType": "register", "channelID": channel_id}))
    endpoint = (await good.recv_json())["pushEndpoint"]
    bad = await upgrade()
    await bad.send(b"\x81\x05hello" + b"\xff" * 64)
    assert await bad.recv_close() == PROTOCOL_ERROR
    await bad.expect_eof()
    response = await put(endpoint, "version=7")
    assert response.code == 200
    assert await good.recv_json() == {
        "messageType": "notification",
        "updates": [{"channelID": channel_id, "version": 7}],
    }
