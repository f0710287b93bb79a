"""Tornado handlers: the device socket, the update endpoint and status pages.

Handlers translate HTTP and WebSocket events into calls on the session and
router and translate outcomes back; no protocol rule lives here.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from tornado.httputil import parse_qs_bytes
from tornado.ioloop import IOLoop
from tornado.web import Application, HTTPError, RequestHandler
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from simplepush import __version__
from simplepush.logs import event
from simplepush.node import Node
from simplepush.router import Delivery
from simplepush.session import POLICY_VIOLATION, Session
from simplepush.store import StoreError
from simplepush.updates import (
    DataTooLong,
    RejectedUpdate,
    check_data,
    form_value,
    parse_version,
)

SUBPROTOCOL = "push-notification"
_FORM = "application/x-www-form-urlencoded"


class DeviceSocket(WebSocketHandler):
    """A device's WebSocket; it is the session's Transport."""

    def initialize(self, node: Node) -> None:
        self._node = node
        self._session: Session | None = None
        self._hello_timer: object | None = None

    async def get(self, *args: Any, **kwargs: Any) -> None:
        node = self._node
        if len(node.registry) >= node.max_connections:
            event(logging.WARNING, "websocket.refused", reason="max_connections")
            raise HTTPError(503, reason="Too Many Connections")
        await super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        """Devices and browsers connect from anywhere; there is no cookie to protect."""
        return True

    def select_subprotocol(self, subprotocols: list[str]) -> str | None:
        return SUBPROTOCOL if SUBPROTOCOL in subprotocols else None

    def open(self, *args: str, **kwargs: str) -> None:
        node = self._node
        self._session = Session(node, self, time.time())
        node.registry.connections.add(self._session)
        node.metrics.incr("client.socket.connect")
        if node.hello_timeout > 0:
            self._hello_timer = IOLoop.current().call_later(node.hello_timeout, self._hello_expired)

    def _hello_expired(self) -> None:
        self._hello_timer = None
        if self._session is not None and self._session.key is None:
            self._session.close(POLICY_VIOLATION, "hello timeout")

    async def on_message(self, message: str | bytes) -> None:
        session = self._session
        if type(message) is bytes:
            session.receive_binary()
            return
        await session.receive(message)
        if self._hello_timer is not None and session.key is not None:
            IOLoop.current().remove_timeout(self._hello_timer)
            self._hello_timer = None

    def send(self, text: str) -> bool:
        connection = self.ws_connection
        if connection is None or connection.is_closing():
            return False
        try:
            self.write_message(text)
        except WebSocketClosedError:
            return False
        return True

    def on_close(self) -> None:
        session = self._session
        if session is None:
            return
        node = self._node
        if self._hello_timer is not None:
            IOLoop.current().remove_timeout(self._hello_timer)
            self._hello_timer = None
        session.on_closed()
        node.registry.connections.discard(session)
        node.metrics.incr("client.socket.disconnect")
        node.metrics.timing("client.socket.lifespan", (time.time() - session.connected_at) * 1000)


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
