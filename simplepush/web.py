"""Tornado handlers: the device socket, the update endpoint and status pages.

Handlers translate HTTP and WebSocket events into calls on the session and
router and translate outcomes back; no protocol rule lives here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from tornado.httputil import HTTPHeaders, parse_qs_bytes
from tornado.web import Application, HTTPError, RequestHandler

from simplepush import __version__
from simplepush.connection import DeviceConnection
from simplepush.logs import event
from simplepush.node import Node
from simplepush.router import Delivery
from simplepush.store import StoreError
from simplepush.updates import (
    DataTooLong,
    RejectedUpdate,
    check_data,
    form_value,
    parse_version,
)
from simplepush.wsframes import accept_key

SUBPROTOCOL = "push-notification"
_FORM = "application/x-www-form-urlencoded"


class DeviceSocket(RequestHandler):
    """The WebSocket upgrade; the socket then belongs to a DeviceConnection (see wsframes.py)."""

    def initialize(self, node: Node) -> None:
        self._node = node

    async def get(self, *args: str) -> None:
        node = self._node
        if len(node.registry) >= node.max_connections:
            event(logging.WARNING, "websocket.refused", reason="max_connections")
            raise HTTPError(503, reason="Too Many Connections")
        handshake = _handshake(self.request.headers)
        if isinstance(handshake, HTTPError):
            if handshake.status_code == 426:
                self.set_header("Sec-WebSocket-Version", "13")
            raise handshake
        stream = self.detach()
        # The asyncio transport gets its own descriptor; closing the stream
        # then unhooks Tornado from the socket without touching the connection.
        sock = stream.socket.dup()
        stream.close()
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: DeviceConnection(node, handshake), sock=sock)


def _handshake(headers: HTTPHeaders) -> bytes | HTTPError:
    """The 101 response for a valid upgrade request (RFC 6455 4.2), or the error to answer."""
    if headers.get("Upgrade", "").lower() != "websocket":
        return HTTPError(400, reason='Can "Upgrade" only to "WebSocket".')
    tokens = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
    if "upgrade" not in tokens:
        return HTTPError(400, reason='"Connection" must be "Upgrade".')
    if headers.get("Sec-WebSocket-Version") != "13":
        return HTTPError(426, reason="Upgrade Required")
    key = headers.get("Sec-WebSocket-Key")
    if not key or not key.isascii():
        return HTTPError(400, reason="Missing Sec-WebSocket-Key")
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    offered = headers.get("Sec-WebSocket-Protocol", "")
    if SUBPROTOCOL in (part.strip() for part in offered.split(",")):
        lines.append(f"Sec-WebSocket-Protocol: {SUBPROTOCOL}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class JSONHandler(RequestHandler):
    def compute_etag(self) -> None:
        """Answers are tiny and never cached; hashing them is wasted work."""
        return None

    def set_default_headers(self) -> None:
        self.set_header("Content-Type", "application/json")

    def write_json(self, status: int, body: Any) -> None:
        self.set_status(status)
        self.finish(json.dumps(body, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish(json.dumps({"status": status_code, "error": self._reason}))


class UpdateHandler(JSONHandler):
    """PUT /update/<token>: an app server announces a new version."""

    def initialize(self, node: Node) -> None:
        self._node = node

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Access-Control-Allow-Origin", "*")

    def options(self, token: str) -> None:
        self.set_header("Access-Control-Allow-Methods", "PUT, OPTIONS")
        self.set_header("Access-Control-Allow-Headers", "Content-Type")
        self.set_status(200)
        self.finish()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 405:
            self.set_header("Allow", "PUT, OPTIONS")
        super().write_error(status_code, **kwargs)

    async def put(self, token: str) -> None:
        node = self._node
        start = time.monotonic()
        node.metrics.incr("updates.appserver.incoming")
        try:
            form, query = self._form(), self.request.query_arguments
            version = parse_version(form_value(form, query, "version"), int(time.time()))
            data = check_data(form_value(form, query, "data"))
        except RejectedUpdate as exc:
            too_long = isinstance(exc, DataTooLong)
            node.metrics.incr(
                "updates.appserver.toolong" if too_long else "updates.appserver.invalid"
            )
            self.write_json(exc.status, {"status": exc.status, "error": exc.error})
            return
        ids = node.tokens.decode(token)
        if ids is None:
            node.metrics.incr("updates.appserver.invalid")
            self.write_json(404, {"status": 404, "error": "Invalid Token"})
            return
        try:
            delivery = await node.router.notify(ids[0], ids[1], version, data)
        except StoreError as exc:
            node.metrics.incr("updates.appserver.error")
            event(logging.ERROR, "storage.error", error=str(exc))
            self.set_header("Retry-After", "5")
            self.write_json(503, {"status": 503, "error": "Service Unavailable"})
            return
        if delivery is Delivery.UNKNOWN_CHANNEL:
            node.metrics.incr("updates.appserver.rejected")
            self.write_json(404, {"status": 404, "error": "Unknown Channel"})
            return
        node.metrics.timing("updates.handled", (time.monotonic() - start) * 1000)
        self.write_json(delivery.value, {})

    def _form(self) -> dict[str, list[bytes]]:
        """The body counts when Content-Type is absent or form (PROTOCOL.md 4.3)."""
        content_type = self.request.headers.get("Content-Type")
        if content_type is None or content_type.split(";", 1)[0].strip().lower() == _FORM:
            return parse_qs_bytes(self.request.body, keep_blank_values=True)
        return {}


class StatusHandler(JSONHandler):
    """Cheap liveness for load balancers: no storage round trip."""

    def initialize(self, node: Node) -> None:
        self._node = node

    def get(self) -> None:
        self.write_json(
            200, {"status": "OK", "clients": len(self._node.registry), "version": __version__}
        )


class RealStatusHandler(JSONHandler):
    """Health with a storage check, for operators; 503 when not ok."""

    def initialize(self, node: Node) -> None:
        self._node = node

    async def get(self) -> None:
        node = self._node
        error = ""
        try:
            await node.store.check()
        except StoreError as exc:
            error = str(exc) or type(exc).__name__
        ok = not error
        self.write_json(
            200 if ok else 503,
            {
                "ok": ok,
                "clients": len(node.registry),
                "max_clients": node.max_connections,
                "storage": {"ok": ok, "error": error},
                "version": __version__,
            },
        )


def make_app(node: Node) -> Application:
    args = {"node": node}
    return Application(
        [
            (r"/update/(.*)", UpdateHandler, args),
            (r"/status/?", StatusHandler, args),
            (r"/realstatus/?", RealStatusHandler, args),
            (r".*", DeviceSocket, args),
        ],
        log_function=_log_request,
    )


def _log_request(handler: RequestHandler) -> None:
    """Requests are logged at debug (at info they would cost more than the work); 5xx warn."""
    status = handler.get_status()
    path = handler.request.path
    event(
        logging.WARNING if status >= 500 else logging.DEBUG,
        "http.request",
        method=handler.request.method,
        path="/update/" if path.startswith("/update/") else path,
        status=status,
        duration_ms=round(handler.request.request_time() * 1000, 3),
    )
