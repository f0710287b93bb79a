"""Shared fixtures: a real server on 127.0.0.1 and real WebSocket devices.

The server runs in-process on pytest-tornado's io_loop and listens on a
real port; devices are Tornado WebSocket clients talking to that port. Mark
a test `@pytest.mark.server(hello_timeout=0.5)` to change a setting.

Every test using the server runs once per storage backend (test ids end in
[memory], [sqlite] or [memcached]); each sqlite run has a fresh database
file in its tmp_path, and the memcached runs share one real memcached
process, flushed before each test.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pwd
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.ioloop import IOLoop
from tornado.websocket import WebSocketClientConnection, websocket_connect

from simplepush.config import ServerSettings, Settings, StorageSettings
from simplepush.http1 import PublicServer
from simplepush.node import Node
from simplepush.server import build_node, public_server
from simplepush.tokens import generate_key
from simplepush.web import make_app
from tests.wsclient import FRAME_TIMEOUT, RawDevice, upgrade_request

# How long a test waits for a frame that must come, and listens for one that must not.
SILENCE = 0.3
# Bounds a wait for memcached to accept connections or to exit.
MEMCACHED_TIMEOUT = 5.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "server(**settings): override [server] settings")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Memcached:
    """A real memcached process on 127.0.0.1 that a test may stop and start again."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("memcached")
        if binary is None:
            pytest.fail(
                "the memcached binary is missing; the memcached tests need it:"
                " apt-get install memcached"
            )
        # memcached refuses to run as root without -u; as another user -u is ignored.
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.proc = subprocess.Popen(
            [binary, "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-u", user],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + MEMCACHED_TIMEOUT
        while True:
            assert self.proc.poll() is None, f"memcached exited {self.proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"memcached is not accepting on {self.port}"
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=MEMCACHED_TIMEOUT)
            self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=MEMCACHED_TIMEOUT) as conn:
            conn.sendall(b"flush_all\r\n")
            assert conn.recv(64) == b"OK\r\n"


@pytest.fixture(scope="session")
def memcached() -> Iterator[Memcached]:
    """One memcached process for the whole run, started on first use."""
    server = Memcached()
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "sqlite", "memcached"])
def storage_settings(request: pytest.FixtureRequest, tmp_path) -> StorageSettings:
    """Each backend in turn; a sqlite or memcached test starts from an empty database."""
    if request.param == "memory":
        return StorageSettings(backend="memory")
    if request.param == "sqlite":
        return StorageSettings(backend="sqlite", path=str(tmp_path / "simplepush.db"))
    server: Memcached = request.getfixturevalue("memcached")
    server.flush()
    return StorageSettings(backend="memcached", servers=(server.address,))


@pytest.fixture
def server_settings(
    request: pytest.FixtureRequest, http_port: int, storage_settings: StorageSettings
) -> Settings:
    marker = request.node.get_closest_marker("server")
    overrides: dict[str, Any] = dict(marker.kwargs) if marker else {}
    overrides.setdefault("endpoint_url", f"http://127.0.0.1:{http_port}")
    overrides.setdefault("token_key", (generate_key(),))
    overrides.setdefault("port", http_port)
    return Settings(
        server=dataclasses.replace(ServerSettings(), **overrides), storage=storage_settings
    )


@pytest.fixture
def node(server_settings: Settings, io_loop: IOLoop) -> Iterator[Node]:
    node = build_node(server_settings)
    yield node

    async def close() -> None:
        await node.router.close()
        await node.store.close()

    io_loop.run_sync(close)


@pytest.fixture
def app(node):
    return make_app(node)


@pytest.fixture
def http_server(
    app: Any, server_settings: Settings, io_loop: IOLoop, _unused_port: tuple
) -> Iterator[PublicServer]:
    """The public listener as `simplepush` builds it (limits, TLS), on pytest-tornado's port.

    Replaces the plugin's fixture, which builds a bare HTTPServer and looks
    `app` up too late for the backend parametrisation to reach it.
    """
    server = public_server(app, server_settings.server)
    io_loop.run_sync(lambda: server.start([_unused_port[0]]))
    yield server
    server.stop_accepting()
    io_loop.run_sync(server.close_connections)


@pytest.fixture
def ws_url(http_port: int) -> str:
    return f"ws://127.0.0.1:{http_port}/"


def new_id() -> str:
    """A dashed lowercase UUID, as Firefox spells channelIDs."""
    return str(uuid.uuid4())


class Device:
    """A WebSocket client speaking raw JSON frames, with timeouts on every read."""

    def __init__(self, conn: WebSocketClientConnection) -> None:
        self.conn = conn
        self.uaid = ""

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.conn.write_message(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv_text(self, timeout: float = FRAME_TIMEOUT) -> str | None:
        """The next frame's text; None when the server closed the socket."""
        return await asyncio.wait_for(self.conn.read_message(), timeout)

    async def recv(self, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
        text = await self.recv_text(timeout)
        assert text is not None, f"socket closed: {self.conn.close_code} {self.conn.close_reason}"
        return json.loads(text)

    async def request(self, frame: dict[str, Any] | str) -> dict[str, Any]:
        await self.send(frame)
        return await self.recv()

    async def expect_silence(self, seconds: float = SILENCE) -> None:
        try:
            text = await asyncio.wait_for(self.conn.read_message(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no frame, got {text!r}")

    async def expect_closed(self, timeout: float = FRAME_TIMEOUT) -> int | None:
        """Wait for the server to close; return its close code."""
        text = await self.recv_text(timeout)
        assert text is None, f"expected close, got frame {text!r}"
        return self.conn.close_code

    async def hello(self, uaid: str = "", channel_ids: list[str] | None = None) -> dict[str, Any]:
        reply = await self.request(
            {"messageType": "hello", "uaid": uaid, "channelIDs": channel_ids or []}
        )
        assert reply["status"] == 200, reply
        self.uaid = reply["uaid"]
        return reply

    async def register(self, channel_id: str | None = None) -> str:
        """Register a channel; return its endpoint URL."""
        channel_id = channel_id or new_id()
        reply = await self.request({"messageType": "register", "channelID": channel_id})
        assert reply["status"] == 200, reply
        return reply["pushEndpoint"]

    async def ack(self, channel_id: str, version: int) -> None:
        await self.send(
            {"messageType": "ack", "updates": [{"channelID": channel_id, "version": version}]}
        )

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def connect(ws_url: str, http_server):
    """connect() opens a new device socket; all are closed at teardown."""
    opened: list[Device] = []

    async def _connect(subprotocols: list[str] | None = None) -> Device:
        conn = await websocket_connect(ws_url, subprotocols=subprotocols)
        device = Device(conn)
        opened.append(device)
        return device

    yield _connect
    for device in opened:
        device.close()


@pytest.fixture
def put(http_client: AsyncHTTPClient):
    """put(endpoint, body, headers) -> response, never raising on HTTP errors."""

    async def _put(
        endpoint: str,
        body: str | bytes = "",
        headers: dict[str, str] | None = None,
        method: str = "PUT",
    ) -> HTTPResponse:
        if headers is None:
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
        return await http_client.fetch(
            endpoint,
            method=method,
            body=body if method in ("PUT", "POST", "PATCH") else None,
            headers=headers,
            raise_error=False,
            allow_nonstandard_methods=True,
        )

    return _put


def token_of(endpoint: str) -> str:
    return urlsplit(endpoint).path.rsplit("/", 1)[1]


@pytest.fixture
def dial(http_port):
    """dial() opens a TCP connection to the server; upgrade() also completes the handshake."""
    opened: list[RawDevice] = []

    async def _dial() -> RawDevice:
        device = RawDevice(*await asyncio.open_connection("127.0.0.1", http_port))
        opened.append(device)
        return device

    yield _dial
    for device in opened:
        device.writer.close()


@pytest.fixture
def upgrade(dial, http_port):
    async def _upgrade() -> RawDevice:
        device = await dial()
        status, _ = await device.request_head(upgrade_request(http_port))
        assert status == "HTTP/1.1 101 Switching Protocols"
        return device

    return _upgrade
