"""The public port's requests: the device upgrade, the update endpoints and status pages.

Handlers translate HTTP and WebSocket events into calls on the session and
router and translate outcomes back; no protocol rule lives here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from http.client import responses
from typing import Any

from tornado.httputil import (
    HTTPHeaders,
    HTTPMessageDelegate,
    RequestStartLine,
    ResponseStartLine,
    format_timestamp,
)
from tornado.web import Application, HTTPError, RequestHandler

from simplepush import __version__, endpoint, logs, webpush_endpoint
from simplepush.config import AdminSettings
from simplepush.connection import DeviceConnection
from simplepush.http1 import PublicConnection
from simplepush.logs import event
from simplepush.node import Node
from simplepush.store import StoreError
from simplepush.wsframes import accept_key

SUBPROTOCOL = "push-notification"
UPDATE_PREFIX = "/update/"


class DeviceSocket(RequestHandler):
    """GET on the device path when FrontDoor did not upgrade it: a page, or the refusal.

    FrontDoor upgrades every valid handshake while there is room (DeviceUpgrade);
    what comes here is a browser, a bad handshake, or a device the server is too
    full for.
    """

    def initialize(self, node: Node, landing: bytes) -> None:
        self._node = node
        self._landing = landing

    def get(self, *args: str) -> None:
        node = self._node
        if not any(name in self.request.headers for name in WEBSOCKET_HEADERS):
            # A browser or curl, not a device: say where they are and where to go.
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(self._landing)
            return
        handshake = _handshake(self.request.headers)
        if not isinstance(handshake, HTTPError) or len(node.registry) >= node.max_connections:
            event(logging.WARNING, "websocket.refused", reason="max_connections")
            raise HTTPError(503, reason="Too Many Connections")
        self.set_status(handshake.status_code, handshake.reason)
        if handshake.status_code == 426:
            self.set_header("Sec-WebSocket-Version", "13")
        self.finish()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """A method other than GET answers as the endpoints do; the upgrade's errors as ever."""
        if status_code != 405:
            super().write_error(status_code, **kwargs)
            return
        self.set_header("Allow", "GET")
        self.set_header("Content-Type", "application/json")
        self.finish(error_body(405, self._reason))


class DeviceUpgrade(HTTPMessageDelegate):
    """A valid upgrade: once its head is read, the connection is the device's.

    The same transport goes on under a DeviceConnection, which writes the 101
    first; bytes the device sent after the head (frames that did not wait for
    the 101) go to it too.
    """

    def __init__(self, node: Node, connection: PublicConnection, handshake: bytes) -> None:
        self._node = node
        self._connection = connection
        self._handshake = handshake

    def finish(self) -> None:
        self._connection.upgrade(DeviceConnection(self._node, self._handshake))


# A request with none of these is not a WebSocket client's (RFC 6455 4.1).
WEBSOCKET_HEADERS = ("Upgrade", "Sec-WebSocket-Key", "Sec-WebSocket-Version")


def landing_text(admin: AdminSettings | None) -> bytes:
    """The public port's answer to a plain GET: what it is, where app servers and operators go.

    A dashboard on a loopback address is named; another address is not, as
    this answer is public and the dashboard's address should not be.
    """
    if admin is None or not admin.port:
        dashboard = "The dashboard is off ([admin] port = 0)."
    elif admin.host in ("localhost", "::1") or admin.host.startswith("127."):
        host = f"[{admin.host}]" if ":" in admin.host else admin.host
        dashboard = f"The dashboard is on the server's machine: http://{host}:{admin.port}/"
    else:
        dashboard = "The dashboard is on the private address of [admin] host and port."
    return (
        f"simplepush {__version__}: a push server. This is its WebSocket endpoint for devices"
        " (ws:// or wss://, any path); it has no page.\n"
        "App servers send to the endpoint URLs devices get: PUT /update/<token> (SimplePush),"
        " POST /wpush/v1/<token> or /wpush/v2/<token> (WebPush).\n"
        "Health: GET /status, GET /realstatus.\n"
        f"{dashboard}\n"
    ).encode()


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
    if "Transfer-Encoding" in headers or (
        "Content-Length" in headers and headers["Content-Length"] != "0"
    ):
        # What follows the head is the device's frames: a body would be read as frames.
        return HTTPError(400, reason="An upgrade request has no body.")
    lines = [
        "HTTP/1.1 101 Switching Protocols",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Accept: {accept_key(key)}",
    ]
    # (`in` first: HTTPHeaders.get raises and catches a KeyError for a missing header.)
    if "Sec-WebSocket-Protocol" in headers and SUBPROTOCOL in (
        part.strip() for part in headers["Sec-WebSocket-Protocol"].split(",")
    ):
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
        self.finish(error_body(status_code, self._reason))


def error_body(status: int, reason: str) -> str:
    """An error answer's body, compact as endpoint.py writes its own."""
    return json.dumps({"status": status, "error": reason}, separators=(",", ":"))


class UpdateHandler(JSONHandler):
    """Every method on /update/<token> but PUT, which UpdateRequest serves."""

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


class WebPushHandler(JSONHandler):
    """Every method on /wpush/ and /m/ but the POST and DELETE that UpdateRequest serves."""

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        if status_code == 405:
            allowed = "POST" if self.request.path.startswith("/wpush/") else "DELETE"
            self.set_header("Allow", allowed)
            self.finish(webpush_endpoint.error(405, 999, f"Use {allowed}").body)
            return
        super().write_error(status_code, **kwargs)


# The Application's routes other than DeviceSocket's (Tornado matches them on the path).
_APP_PATHS = re.compile(r"/(?:update|wpush|m)/|/(?:real)?status/?(?:\?|$)")


class FrontDoor:
    """Picks who answers a request once its head is read (http1.PublicServer asks).

    The hot requests (the upgrade, PUT /update/, WebPush POST and DELETE) get
    lean delegates; the rest goes to the Application. Why: tornado.web's
    routing and RequestHandler cost more per PUT than storing and delivering
    the update (see docs/PERFORMANCE.md); the endpoints need none of their
    features.
    """

    def __init__(self, node: Node, app: Application) -> None:
        self._node = node
        self._app = app

    def request(
        self,
        start_line: RequestStartLine,
        headers: HTTPHeaders,
        head_size: int,
        connection: PublicConnection,
    ) -> HTTPMessageDelegate:
        node = self._node
        if head_size > node.max_header_size:
            return Refusal(connection, 431, "max_header_size")
        method, path = start_line.method, start_line.path
        if method == "PUT":
            if path.startswith(UPDATE_PREFIX):
                return UpdateRequest(node, connection)
        elif method == "POST":
            if path.startswith(webpush_endpoint.POST_PREFIX):
                return UpdateRequest(node, connection, POST_ROUTE)
        elif method == "DELETE":
            if path.startswith(webpush_endpoint.MESSAGE_PREFIX):
                return UpdateRequest(node, connection, DELETE_ROUTE)
        elif (
            method == "GET"
            and "Upgrade" in headers
            # tornado.web's HTTPServerRequest answers 400 without it, as before
            and ("Host" in headers or start_line.version == "HTTP/1.0")
            and len(node.registry) < node.max_connections
            and not _APP_PATHS.match(path)
        ):
            handshake = _handshake(headers)
            if not isinstance(handshake, HTTPError):
                return DeviceUpgrade(node, connection, handshake)
        return self._app.start_request(connection, connection)


# A refused request's body is read and dropped (so the client can read the
# answer, and the connection stays usable); the body timer bounds how long.
_DRAIN = 1 << 62


class Refusal(HTTPMessageDelegate):
    """A request over a limit: answered at once, its body drained, then the exchange ends."""

    def __init__(self, connection: PublicConnection, status: int, limit: str) -> None:
        self._connection = connection
        self._status = status
        self._limit = limit

    def headers_received(
        self, start_line: RequestStartLine | ResponseStartLine, headers: HTTPHeaders
    ) -> None:
        refuse(self._connection, self._status, self._limit)

    def finish(self) -> None:
        self._connection.finish()


def refuse(connection: PublicConnection, status: int, limit: str) -> None:
    """Answer `status` now; the caller finishes the exchange once the body has been read."""
    event(logging.INFO, "http.refused", status=status, limit=limit)
    connection.set_max_body_size(_DRAIN)
    body = error_body(status, responses[status]).encode()
    _write_answer(connection, status, body, (("Date", _http_date()),))


_date: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header, formatted once a second rather than once a response."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, format_timestamp(now))
    return _date[1]


def _write_answer(
    connection: PublicConnection, status: int, body: bytes, extra: Iterable[tuple[str, str]]
) -> None:
    """A whole JSON answer (or an empty one) in one write."""
    if body:
        fields = f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    else:
        fields = "" if status == 204 else "Content-Length: 0\r\n"
    fields += "".join(f"{name}: {value}\r\n" for name, value in extra)
    connection.answer(status, fields, body)


# Answers one hot request from its path, headers and body (endpoint.py, webpush_endpoint.py).
Respond = Callable[[Node, str, HTTPHeaders, bytes], Awaitable[endpoint.Answer]]


async def _put(node: Node, path: str, headers: HTTPHeaders, body: bytes) -> endpoint.Answer:
    path, _, query = path.partition("?")
    token = path[len(UPDATE_PREFIX) :]
    return await endpoint.update(node, token, headers.get("Content-Type"), body, query)


async def _post(node: Node, path: str, headers: HTTPHeaders, body: bytes) -> endpoint.Answer:
    return await webpush_endpoint.post(node, path.partition("?")[0], headers.get, body)


async def _delete(node: Node, path: str, headers: HTTPHeaders, body: bytes) -> endpoint.Answer:
    return await webpush_endpoint.cancel(node, path.partition("?")[0])


@dataclass(slots=True, frozen=True)
class Route:
    """A hot route: who answers it, its name in logs (no token), and how a crash is told."""

    respond: Respond
    label: str
    error_type: str  # the log Type of an unexpected exception
    dashboard: str | None  # its dashboard counter (Stats only)
    metric: str | None  # its statsd counter
    failure: endpoint.Answer


PUT_ROUTE = Route(
    _put,
    UPDATE_PREFIX,
    "update.error",
    "put.internal_error",
    None,
    endpoint.Answer(500, b'{"status":500,"error":"Internal Server Error"}'),
)
_WEBPUSH_FAILURE = webpush_endpoint.error(500, 999, "Internal Server Error")
POST_ROUTE = Route(
    _post,
    webpush_endpoint.POST_PREFIX,
    "webpush.error",
    "post.internal_error",
    "updates.webpush.error",
    _WEBPUSH_FAILURE,
)
DELETE_ROUTE = Route(
    _delete, webpush_endpoint.MESSAGE_PREFIX, "webpush.error", None, None, _WEBPUSH_FAILURE
)


class UpdateRequest(HTTPMessageDelegate):
    """An app server's PUT, POST or DELETE, answered by its Route."""

    def __init__(self, node: Node, connection: PublicConnection, route: Route = PUT_ROUTE) -> None:
        self._node = node
        self._connection = connection
        self._route = route
        self._method = ""
        self._path = ""
        self._headers = HTTPHeaders()
        self._chunks: list[bytes] = []
        self._size = 0
        self._refused = False
        self._gone = False
        self._task: asyncio.Future[None] | None = None
        self._counted = False

    def headers_received(
        self, start_line: RequestStartLine | ResponseStartLine, headers: HTTPHeaders
    ) -> None:
        assert isinstance(start_line, RequestStartLine)
        self._node.puts_in_flight += 1
        self._counted = True
        self._method = start_line.method
        self._path = start_line.path
        self._headers = headers
        length = headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self._node.max_body_size:
            self._refuse()
        elif "Transfer-Encoding" in headers:
            # Counted in data_received, so that a chunked body over the limit gets 413 too
            # rather than Tornado's bare 400.
            self._connection.set_max_body_size(_DRAIN)

    def data_received(self, chunk: bytes) -> None:
        if self._refused:
            return
        self._size += len(chunk)
        if self._size > self._node.max_body_size:
            self._chunks = []
            self._refuse()
            return
        self._chunks.append(chunk)

    def _refuse(self) -> None:
        self._refused = True
        refuse(self._connection, 413, "max_body_size")

    def finish(self) -> None:
        if self._refused:
            self._connection.finish()
            self._answered()
            return
        self._task = asyncio.ensure_future(self._respond())

    def on_connection_close(self) -> None:
        self._gone = True
        if self._task is None:
            self._answered()

    def _answered(self) -> None:
        """No longer in flight: a shutdown waits for the PUTs in flight (server.serve)."""
        if self._counted:
            self._counted = False
            self._node.puts_in_flight -= 1

    async def _respond(self) -> None:
        try:
            await self._answer()
        finally:
            self._answered()

    async def _answer(self) -> None:
        start = time.monotonic()
        try:
            answer = await self._route.respond(
                self._node, self._path, self._headers, b"".join(self._chunks)
            )
        except Exception:
            route = self._route
            logs.exception(route.error_type)
            if route.dashboard is not None:
                self._node.stats.incr(route.dashboard)
            if route.metric is not None:
                self._node.metrics.incr(route.metric)
            answer = route.failure
        if self._gone:
            return
        extra = [("Access-Control-Allow-Origin", "*"), ("Date", _http_date())]
        if answer.retry_after:
            extra.append(("Retry-After", endpoint.RETRY_AFTER))
        extra += answer.headers
        _write_answer(self._connection, answer.status, answer.body, extra)
        self._connection.finish()
        event(
            logging.WARNING if answer.status >= 500 else logging.DEBUG,
            "http.request",
            method=self._method,
            path=self._route.label,
            status=answer.status,
            duration_ms=round((time.monotonic() - start) * 1000, 3),
        )


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
        start = time.monotonic()
        try:
            await node.store.check()
        except StoreError as exc:
            error = node.storage_failed("check", exc, logging.WARNING)
        rtt_ms = round((time.monotonic() - start) * 1000, 3)
        data: dict[str, Any] = {}
        if not error:
            try:
                data = await node.store.stats()
            except StoreError as exc:
                error = node.storage_failed("stats", exc, logging.WARNING)
        ok = not error
        self.write_json(
            200 if ok else 503,
            {
                "ok": ok,
                "clients": len(node.registry),
                "devices": node.devices,
                "max_clients": node.max_connections,
                "storage": {
                    "ok": ok,
                    "error": error,
                    "rtt_ms": rtt_ms,
                    "last_error": node.last_storage_error,
                    "last_error_at": node.last_storage_error_at,
                    **data,
                },
                "uptime_s": round(time.time() - node.started_at, 3),
                "version": __version__,
            },
        )


def make_app(node: Node, admin: AdminSettings | None = None) -> FrontDoor:
    """The public port; `admin` is only named in the answer to a plain GET (None: no dashboard)."""
    args = {"node": node}
    app = Application(
        [
            (r"/update/(.*)", UpdateHandler),
            (r"/(?:wpush|m)/(.*)", WebPushHandler),
            (r"/status/?", StatusHandler, args),
            (r"/realstatus/?", RealStatusHandler, args),
            (r".*", DeviceSocket, {**args, "landing": landing_text(admin)}),
        ],
        log_function=_log_request,
    )

    return FrontDoor(node, app)


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
