"""Shared fixtures: a real server on 127.0.0.1 and real WebSocket devices.

The server runs in-process on pytest-tornado's io_loop and listens on a
real port; devices are Tornado WebSocket clients talking to that port. Mark
a test `@pytest.mark.server(hello_timeout=0.5)` to change a setting.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse
from tornado.websocket import WebSocketClientConnection, websocket_connect

from simplepush.config import ServerSettings, Settings
from simplepush.server import build_node
from simplepush.tokens import generate_key
from simplepush.web import make_app

# How long a test waits for a frame that must come, and listens for one that must not.
FRAME_TIMEOUT = 5.0
SILENCE = 0.3


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "server(**settings): override [server] settings")


@pytest.fixture
def server_settings(request: pytest.FixtureRequest, http_port: int) -> Settings:
    marker = request.node.get_closest_marker("server")
    overrides: dict[str, Any] = dict(marker.kwargs) if marker else {}
    overrides.setdefault("endpoint_url", f"http://127.0.0.1:{http_port}")
    overrides.setdefault("token_key", (generate_key(),))
    overrides.setdefault("port", http_port)
    return Settings(server=dataclasses.replace(ServerSettings(), **overrides))


@pytest.fixture
def node(server_settings: Settings):
    return build_node(server_settings)


@pytest.fixture
def app(node):
    return make_app(node)


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
