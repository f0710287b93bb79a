"""The public port's HTTP/1.1 (simplepush/http1.py) over real sockets, byte-exact, on both loops.

What Tornado's HTTPServer did and the lean port must keep doing: pipelined
requests answered in order on one connection (PUTs, chunked bodies, an
upgrade behind a PUT), the bytes a device sends after its upgrade request
handed to its socket, a refused upgrade leaving the connection to HTTP,
HTTP/1.0 and Connection: close, Expect: 100-continue, 400 for what it does
not read, and at shutdown the connections still queued in the listener
served. Every test runs on asyncio's loop and on uvloop (which `simplepush`
runs on).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import re
import socket
import ssl
import time
from pathlib import Path

import pytest
import uvloop

from simplepush.bench.selfsigned import write_self_signed
from simplepush.config import Settings, StorageSettings
from simplepush.wsframes import TEXT
from tests.conftest import FRAME_TIMEOUT
from tests.test_limits import chunked, expect_update, registered, request
from tests.wsclient import HELLO, RawDevice, client_frame, upgrade_request

pytestmark = [pytest.mark.usefixtures("http_server"), pytest.mark.gen_test(timeout=30)]

RFC_KEY, RFC_ACCEPT = "dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + RFC_ACCEPT.encode() + b"\r\n\r\n"
)
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PUT_OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
    b"Access-Control-Allow-Origin: *\r\nDate: *\r\n\r\n{}"
)
BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest):
    """pytest-tornado's io_loop is made by the policy in force: asyncio's, or uvloop's."""
    if request.param == "uvloop":
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    yield request.param
    asyncio.set_event_loop_policy(None)


async def test_each_test_runs_on_the_loop_it_names(loop_kind):
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop) == (loop_kind == "uvloop")


@pytest.fixture
def storage_settings() -> StorageSettings:
    """HTTP sits in front of storage: one backend is enough."""
    return StorageSettings(backend="memory")


async def response(reader: asyncio.StreamReader) -> bytes:
    """One whole response as sent (its body by Content-Length), Date's value as `*`."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), FRAME_TIMEOUT)
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
    body = b""
    if length:
        body = await asyncio.wait_for(reader.readexactly(int(length[1])), FRAME_TIMEOUT)
    return re.sub(rb"\r\nDate: [^\r]+\r\n", b"\r\nDate: *\r\n", head) + body


async def eof(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed (a reset counts as a close)."""
    try:
        return await asyncio.wait_for(reader.read(), FRAME_TIMEOUT)
    except ConnectionResetError:
        return b""


@pytest.fixture
def dial_http(http_port: int):
    opened: list[asyncio.StreamWriter] = []

    async def _dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
        opened.append(writer)
        return reader, writer

    yield _dial
    for writer in opened:
        writer.close()


def put(path: str, body: bytes, **headers: str) -> bytes:
    return request("PUT", path, body, {**FORM, **headers})


def status_json(answer: bytes) -> tuple[bytes, dict]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], json.loads(body)


# --- pipelining -------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order_on_one_connection(connect, dial_http):
    """Three PUTs (one chunked) and a status page in one write: four answers, in order."""
    device, channel, path = await registered(connect)
    reader, writer = await dial_http()
    writer.write(
        put(path, b"version=1")
        + request("GET", "/status")
        + request(
            "PUT", path, chunked(b"version=2", size=4), {**FORM, "Transfer-Encoding": "chunked"}
        )
        + put(path, b"version=3")
    )
    assert await response(reader) == PUT_OK
    status_line, status = status_json(await response(reader))
    assert (status_line, status["status"]) == (b"HTTP/1.1 200 OK", "OK")
    assert await response(reader) == PUT_OK
    assert await response(reader) == PUT_OK
    versions = []
    while not versions or versions[-1] < 3:
        message = await device.recv()
        versions += [update["version"] for update in message["updates"]]
    assert versions == sorted(versions) and versions[-1] == 3, versions
    await device.ack(channel, 3)


async def test_a_chunked_put_body_is_read_whole(connect, dial_http):
    device, channel, path = await registered(connect)
    reader, writer = await dial_http()
    body = b"version=5&data=" + b"x" * 300
    writer.write(request("PUT", path, chunked(body, 7), {**FORM, "Transfer-Encoding": "chunked"}))
    assert await response(reader) == PUT_OK
    message = await device.recv()
    assert message["updates"] == [{"channelID": channel, "version": 5, "data": "x" * 300}]


async def test_an_upgrade_behind_a_put_waits_for_the_put_s_answer(connect, dial_http, http_port):
    """PUT, upgrade and hello in one write: the PUT's answer, the 101, the hello's reply."""
    device, channel, path = await registered(connect)
    reader, writer = await dial_http()
    writer.write(
        put(path, b"version=9")
        + upgrade_request(http_port, Sec_WebSocket_Key=RFC_KEY)
        + client_frame(TEXT, HELLO.encode())
    )
    assert await response(reader) == PUT_OK
    assert await asyncio.wait_for(reader.readexactly(len(SWITCHING)), FRAME_TIMEOUT) == SWITCHING
    hello = await RawDevice(reader, writer).recv_json()
    assert (hello["messageType"], hello["status"]) == ("hello", 200)
    await expect_update(device, channel, 9)


# --- the upgrade --------------------------------------------------------------------


async def upgraded_with_frames(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, http_port: int
) -> RawDevice:
    """Send the upgrade request with a hello and a ping message behind it in one write;
    the device once the 101 has come."""
    writer.write(
        upgrade_request(http_port, Sec_WebSocket_Key=RFC_KEY)
        + client_frame(TEXT, HELLO.encode())
        + client_frame(TEXT, b"{}")
    )
    assert await asyncio.wait_for(reader.readexactly(len(SWITCHING)), FRAME_TIMEOUT) == SWITCHING
    return RawDevice(reader, writer)


async def test_frames_sent_with_the_upgrade_request_go_to_the_device(dial_http, http_port):
    """A hello and a ping message that did not wait for the 101 are answered after it."""
    device = await upgraded_with_frames(*await dial_http(), http_port)
    hello = await device.recv_json()
    assert hello == {"messageType": "hello", "uaid": hello["uaid"], "status": 200}
    assert await device.recv_frame() == (TEXT, b"{}")


@pytest.mark.parametrize(
    ("refused", "status_line"),
    [
        (upgrade_request(0, Upgrade="h2c"), b'HTTP/1.1 400 Can "Upgrade" only to "WebSocket".'),
        (b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n", b"HTTP/1.1 405 Method Not Allowed"),
        (
            upgrade_request(0, Content_Length="3") + b"abc",
            b"HTTP/1.1 400 An upgrade request has no body.",
        ),
    ],
    ids=["h2c", "connect", "with-body"],
)
async def test_a_refused_upgrade_leaves_the_connection_to_http(dial_http, refused, status_line):
    """llhttp stops at an upgrade's head; refused, what follows is HTTP again (a body: not)."""
    reader, writer = await dial_http()
    writer.write(refused + request("GET", "/status"))
    assert (await response(reader)).split(b"\r\n")[0] == status_line
    if refused.endswith(b"abc"):
        # The body of an upgrade request is not read as one: it is the next request, a bad one.
        assert await eof(reader) == BAD_REQUEST
        return
    status_line, status = status_json(await response(reader))
    assert (status_line, status["status"]) == (b"HTTP/1.1 200 OK", "OK")


# --- keep-alive ------------------------------------------------------------------------


async def test_http_1_0_is_answered_then_closed(dial_http):
    reader, writer = await dial_http()
    writer.write(b"GET /status HTTP/1.0\r\n\r\n")
    answer = await response(reader)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection:" not in answer
    assert await eof(reader) == b""


async def test_http_1_0_keep_alive_is_kept_alive(dial_http):
    reader, writer = await dial_http()
    for _ in range(2):
        writer.write(b"GET /status HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        answer = await response(reader)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"\r\nConnection: Keep-Alive\r\n" in answer


async def test_connection_close_is_answered_with_it_then_closed(connect, dial_http):
    device, channel, path = await registered(connect)
    reader, writer = await dial_http()
    writer.write(put(path, b"version=4", Connection="close") + put(path, b"version=5"))
    assert await response(reader) == PUT_OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    assert await eof(reader) == b""
    await expect_update(device, channel, 4)


async def test_expect_100_continue_gets_100_then_the_answer(connect, dial_http):
    device, channel, path = await registered(connect)
    reader, writer = await dial_http()
    writer.write(
        request("PUT", path, headers={**FORM, "Content-Length": "9", "Expect": "100-continue"})
    )
    continued = b"HTTP/1.1 100 (Continue)\r\n\r\n"
    assert await asyncio.wait_for(reader.readexactly(len(continued)), FRAME_TIMEOUT) == continued
    writer.write(b"version=6")
    assert await response(reader) == PUT_OK
    await expect_update(device, channel, 6)


# --- what is not read -------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET /status HTTP/2.0\r\n\r\n",
        b"PUT /update/x HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n",
        b"GET /status HTTP/1.1\r\n\r\n",
        upgrade_request(0, Host=None),
    ],
    ids=["http2", "gzip-chunked", "body-over-the-limit", "no-host", "upgrade-without-host"],
)
async def test_what_is_not_read_is_400_then_closed(dial_http, caplog, data):
    caplog.set_level(logging.INFO)
    reader, writer = await dial_http()
    writer.write(data + request("GET", "/status"))
    assert await eof(reader) == BAD_REQUEST
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("http.")] == [
        "http.malformed"
    ]


# --- shutdown ---------------------------------------------------------------------------


async def test_connections_queued_in_the_listener_are_served_when_it_closes(
    http_server, connect, http_port
):
    """Accepted at the close (not reset by it): the PUT they carry is answered."""
    device, channel, path = await registered(connect)
    queued = socket.create_connection(("127.0.0.1", http_port))
    queued.sendall(put(path, b"version=7"))
    # The loop has not run since: the connection is still in the listener's queue.
    http_server.stop_accepting()
    reader, writer = await asyncio.open_connection(sock=queued)
    assert await response(reader) == PUT_OK
    await expect_update(device, channel, 7)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", http_port)).close()
    writer.close()


async def test_idle_keep_alive_connections_are_closed_at_shutdown(http_server, dial_http):
    reader, writer = await dial_http()
    writer.write(request("GET", "/status"))
    await response(reader)
    await http_server.close_connections()
    assert await eof(reader) == b""


# --- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def server_settings(server_settings: Settings, request: pytest.FixtureRequest) -> Settings:
    """With TLS where a test asks for `tls`."""
    if "tls" not in request.fixturenames:
        return server_settings
    certfile, keyfile = request.getfixturevalue("certificate")
    server = dataclasses.replace(
        server_settings.server, ssl_certfile=str(certfile), ssl_keyfile=str(keyfile)
    )
    return dataclasses.replace(server_settings, server=server)


@pytest.fixture
def tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate[0]))


async def test_over_tls_frames_sent_with_the_upgrade_go_to_the_device(tls, http_port):
    """The TLS transport itself is handed to the device (no second TLS layer, nothing lost)."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", http_port, ssl=tls, server_hostname="127.0.0.1"
    )
    device = await upgraded_with_frames(reader, writer, http_port)
    assert (await device.recv_json())["status"] == 200
    assert await device.recv_frame() == (TEXT, b"{}")
    writer.close()


# --- what a closed socket leaves behind -----------------------------------------


async def test_a_device_that_leaves_leaves_no_cycle_for_the_collector(connect, node, put):
    """Workers run the garbage collector rarely (server.GC_THRESHOLDS), so a device's
    objects must go with their last reference, not wait for a full collection."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        device = await connect()
        await device.hello()
        endpoint = await device.register()
        assert (await put(endpoint, "version=7")).code == 200
        [update] = (await device.recv())["updates"]
        await device.ack(update["channelID"], 7)
        await device.request({"messageType": "ping"})
        device.conn.stream.close()  # no close frame: the socket just ends
        deadline = time.monotonic() + 5
        while node.registry.connections:
            assert time.monotonic() < deadline, "the server did not see the socket close"
            await asyncio.sleep(0.01)
        gc.collect()
        ours = sorted(
            {
                type(o).__name__
                for o in gc.garbage
                if str(type(o).__module__).startswith("simplepush")
            }
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []
