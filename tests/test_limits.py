"""The limits on what one peer may send (docs/SECURITY.md), each exceeded over real sockets.

Every limit answers with its status or close code, logs a line, and leaves
the connection (where HTTP allows) and every other device working.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from simplepush.config import StorageSettings
from simplepush.connection import MAX_WRITE_BUFFER
from simplepush.wsframes import POLICY_VIOLATION
from tests.conftest import FRAME_TIMEOUT
from tests.wsclient import PING, RawDevice, client_frame, upgrade_request

pytestmark = [pytest.mark.usefixtures("http_server"), pytest.mark.gen_test(timeout=30)]

BODY_LIMIT = 16 * 1024
HEADER_LIMIT = 4 * 1024
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def storage_settings() -> StorageSettings:
    """Limits sit in front of storage: one backend is enough."""
    return StorageSettings(backend="memory")


class HTTPPeer:
    """An HTTP/1.1 client on a bare socket: exact bytes out, whole responses in."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), FRAME_TIMEOUT)
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(length), FRAME_TIMEOUT)
        return int(status_line.split()[1]), headers, body

    async def closed_within(self, seconds: float) -> bool:
        """True if the server closes the connection within `seconds`, sending nothing."""
        try:
            rest = await asyncio.wait_for(self.reader.read(), seconds)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        assert rest == b"", rest
        return True


@pytest.fixture
def peer(http_port):
    opened: list[HTTPPeer] = []

    async def _peer() -> HTTPPeer:
        connection = HTTPPeer(*await asyncio.open_connection("127.0.0.1", http_port))
        opened.append(connection)
        return connection

    yield _peer
    for connection in opened:
        connection.writer.close()


def request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    fields = {"Host": "127.0.0.1", **(headers or {})}
    if body and "Transfer-Encoding" not in fields:
        fields.setdefault("Content-Length", str(len(body)))
    head = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in fields.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def chunked(body: bytes, size: int = 4096) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def refusals(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        record.fields
        for record in caplog.records
        if getattr(record, "event_type", "") == "http.refused"
    ]


async def registered(connect) -> tuple[Any, str, str]:
    """A device with one channel: (device, channelID, path of its endpoint)."""
    device = await connect()
    await device.hello()
    channel = "6a1ba8d4-8de6-4b4d-a8b5-c7e4e1e01e5f"
    endpoint = await device.register(channel)
    return device, channel, "/update/" + endpoint.rsplit("/update/", 1)[1]


async def expect_update(device, channel: str, version: int) -> None:
    message = await device.recv()
    assert message["updates"] == [{"channelID": channel, "version": version}], message
    await device.ack(channel, version)


# --- PUT bodies -------------------------------------------------------------


@pytest.mark.server(max_body_size=BODY_LIMIT)
async def test_a_body_at_the_limit_is_served(connect, peer):
    device, channel, path = await registered(connect)
    body = b"version=7&pad=" + b"a" * (BODY_LIMIT - len(b"version=7&pad="))
    client = await peer()
    await client.send(request("PUT", path, body, FORM))
    status, _, answer = await client.response()
    assert (status, answer) == (200, b"{}")
    await expect_update(device, channel, 7)


@pytest.mark.server(max_body_size=BODY_LIMIT)
@pytest.mark.parametrize("size", [BODY_LIMIT + 1, 5 * 1024 * 1024])
async def test_a_body_over_the_limit_is_413_and_the_connection_serves_the_next_request(
    connect, peer, caplog, size
):
    caplog.set_level(logging.INFO)
    device, channel, path = await registered(connect)
    client = await peer()
    await client.send(request("PUT", path, b"version=9&pad=" + b"a" * size, FORM))
    status, headers, answer = await client.response()
    assert status == 413
    assert json.loads(answer) == {"status": 413, "error": "Request Entity Too Large"}
    assert headers["content-type"] == "application/json"
    assert refusals(caplog) == [{"status": 413, "limit": "max_body_size"}]
    await device.expect_silence()
    await client.send(request("PUT", path, b"version=10", FORM))
    assert (await client.response())[0] == 200
    await expect_update(device, channel, 10)


@pytest.mark.server(max_body_size=BODY_LIMIT)
async def test_the_413_comes_before_the_body_is_sent(connect, peer):
    """A client that waits for an answer to its head (Expect: 100-continue) sends nothing."""
    _device, _channel, path = await registered(connect)
    client = await peer()
    headers = {**FORM, "Content-Length": str(50 * 1024 * 1024), "Expect": "100-continue"}
    await client.send(request("PUT", path, headers=headers))
    status, _, answer = await client.response()
    assert (status, json.loads(answer)["status"]) == (413, 413)


@pytest.mark.server(max_body_size=BODY_LIMIT)
async def test_a_chunked_body_over_the_limit_is_413_too(connect, peer):
    device, channel, path = await registered(connect)
    client = await peer()
    chunked_form = {**FORM, "Transfer-Encoding": "chunked"}
    await client.send(request("PUT", path, chunked(b"version=3&x=" + b"b" * 40000), chunked_form))
    assert (await client.response())[0] == 413
    await client.send(request("PUT", path, chunked(b"version=4"), chunked_form))
    assert (await client.response())[0] == 200
    await expect_update(device, channel, 4)


# --- request heads ------------------------------------------------------------


@pytest.mark.server(max_header_size=HEADER_LIMIT)
async def test_a_head_over_the_limit_is_431_and_the_connection_serves_the_next_request(
    peer, caplog
):
    caplog.set_level(logging.INFO)
    client = await peer()
    await client.send(request("GET", "/status", headers={"X-Big": "x" * HEADER_LIMIT}))
    status, _, answer = await client.response()
    assert status == 431
    assert json.loads(answer) == {"status": 431, "error": "Request Header Fields Too Large"}
    assert refusals(caplog) == [{"status": 431, "limit": "max_header_size"}]
    await client.send(request("GET", "/status", headers={"X-Small": "x" * 100}))
    assert (await client.response())[0] == 200


@pytest.mark.server(max_header_size=HEADER_LIMIT)
async def test_a_head_too_big_to_hold_is_cut(peer):
    client = await peer()
    await client.send(request("GET", "/status", headers={"X-Huge": "x" * (5 * HEADER_LIMIT)}))
    assert await client.closed_within(FRAME_TIMEOUT)


@pytest.mark.server(max_header_size=HEADER_LIMIT)
async def test_an_upgrade_with_a_head_over_the_limit_is_431(peer, http_port):
    client = await peer()
    await client.send(upgrade_request(http_port, Cookie="c" * HEADER_LIMIT))
    assert (await client.response())[0] == 431


# --- slow and idle clients -----------------------------------------------------


@pytest.mark.server(idle_timeout=0.5)
async def test_an_idle_keep_alive_connection_is_closed(peer):
    client = await peer()
    await client.send(request("GET", "/status"))
    assert (await client.response())[0] == 200
    assert await client.closed_within(FRAME_TIMEOUT)


@pytest.mark.server(idle_timeout=0.5)
async def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_idle_timeout(peer):
    """A slow-loris client cannot hold a connection by trickling its head."""
    client = await peer()
    closed = False
    for byte in request("GET", "/status", headers={"X-Slow": "s" * 100}):
        try:
            await client.send(bytes((byte,)))
        except ConnectionError:
            closed = True
            break
        if await client.closed_within(0.05):
            closed = True
            break
    assert closed


@pytest.mark.server(body_timeout=0.5)
async def test_a_body_that_stops_coming_is_cut_at_the_body_timeout(connect, peer, caplog):
    caplog.set_level(logging.INFO)
    _device, _channel, path = await registered(connect)
    client = await peer()
    await client.send(request("PUT", path, headers={**FORM, "Content-Length": "100"}) + b"ver")
    assert await client.closed_within(FRAME_TIMEOUT)
    timeouts = [r.fields for r in caplog.records if r.getMessage() == "http.body_timeout"]
    assert timeouts == [{"timeout": 0.5}]


@pytest.mark.server(body_timeout=0.5)
async def test_a_chunked_body_that_stops_coming_is_cut_too(peer):
    client = await peer()
    head = request("PUT", "/update/x", headers={**FORM, "Transfer-Encoding": "chunked"})
    await client.send(head + b"5\r\nversi")
    assert await client.closed_within(FRAME_TIMEOUT)


# --- WebSocket ------------------------------------------------------------------


@pytest.mark.server(max_message_size=300 * 1024)
async def test_a_message_under_a_raised_limit_is_answered(upgrade):
    device = await upgrade()
    await device.hello()
    long_id = "x" * (290 * 1024)
    await device.send_text(json.dumps({"messageType": "register", "channelID": long_id}))
    reply = await device.recv_json()
    assert (reply["status"], reply["channelID"]) == (401, long_id)


@pytest.mark.server(min_ping_interval=30)
async def test_a_second_ping_inside_min_ping_interval_is_401_and_closed(connect, caplog):
    caplog.set_level(logging.INFO)
    device = await connect()
    assert await device.request("{}") == {}
    assert await device.request("{}") == {
        "messageType": "ping",
        "status": 401,
        "error": "Invalid Command",
    }
    assert await device.expect_closed() == POLICY_VIOLATION
    assert device.conn.close_reason == "too many pings"
    assert "websocket.ping_flood" in [getattr(r, "event_type", "") for r in caplog.records]


async def test_pings_are_not_limited_by_default(connect):
    device = await connect()
    for _ in range(20):
        assert await device.request("{}") == {}


async def test_a_device_that_floods_pings_and_never_reads_is_not_read_either(
    http_port, node, connect, put
):
    """Its pongs stop at the write high-water mark; the rest of its pings wait in the kernel."""
    raw = socket.create_connection(("127.0.0.1", http_port))
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(raw, upgrade_request(http_port))
    head = await asyncio.wait_for(loop.sock_recv(raw, 4096), FRAME_TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 ")
    # Control-frame pings: each pong is as big as its ping, so the pongs outgrow
    # the kernel's buffers (a few MB on loopback) long before the flood ends.
    ping = client_frame(PING, b"p" * 125)
    sent = 0
    deadline = loop.time() + 3
    burst = ping * 512
    while sent < 48 * 1024 * 1024 and loop.time() < deadline:
        try:
            # A partial send leaves the rest of a frame to go first.
            sent += raw.send(burst[sent % len(burst) :])
        except BlockingIOError:
            await asyncio.sleep(0.01)
    (flooder,) = node.registry.connections
    buffered = flooder._transport._transport.get_write_buffer_size()
    # The high-water mark plus the pongs of the one read (at most 256 KiB) that crossed it.
    assert buffered <= 64 * 1024 + 256 * 1024 + 1024, buffered
    other, channel, path = await registered(connect)
    response = await put(f"http://127.0.0.1:{http_port}{path}", "version=8")
    assert response.code == 200
    await expect_update(other, channel, 8)
    raw.close()


async def test_a_device_that_never_reads_its_updates_is_cut_and_gets_them_on_reconnect(
    http_port, connect, put, caplog
):
    caplog.set_level(logging.INFO)
    raw = socket.create_connection(("127.0.0.1", http_port))
    reader, writer = await asyncio.open_connection(sock=raw)
    device = RawDevice(reader, writer)
    await device.request_head(upgrade_request(http_port))
    uaid = await device.hello()
    channel = "0f8d4a1e-3f6c-4d8a-9d7e-2b5c6a7e8f90"
    await device.send_text(json.dumps({"messageType": "register", "channelID": channel}))
    endpoint = (await device.recv_json())["pushEndpoint"]
    watcher, watched, watched_path = await registered(connect)
    data = "d" * 4096
    statuses = []
    # Enough to fill the device's receive buffer, the server's send buffer (at most
    # tcp_wmem's maximum) and MAX_WRITE_BUFFER, twice over.
    wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    room = raw.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) + wmem_max + MAX_WRITE_BUFFER
    for version in range(1, 2 * room // len(data)):
        response = await put(endpoint, f"version={version}&data={data}")
        statuses.append(response.code)
        if response.code != 200:
            break
    assert statuses[-1] == 202, "the silent device was never cut"
    dropped = [
        r.fields for r in caplog.records if getattr(r, "event_type", "") == "websocket.dropped"
    ]
    assert dropped == [{"reason": "device is not reading", "code": 1006}]
    response = await put(f"http://127.0.0.1:{http_port}{watched_path}", "version=5")
    assert response.code == 200
    await expect_update(watcher, watched, 5)
    writer.close()
    again = await connect()
    await again.hello(uaid, [channel])
    message = await again.recv()
    assert message["updates"] == [{"channelID": channel, "version": version, "data": data}]
