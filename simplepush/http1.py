"""The public port's HTTP/1.1: one asyncio Protocol per connection, requests parsed by llhttp.

Why not Tornado's HTTPServer: its IOStream, HTTP1Connection, timeout futures
and close callbacks were about half the CPU of a PUT, and a device's upgrade
then cost an IOStream detach, a socket dup and a second registration with
the loop (docs/PERFORMANCE.md). Here httptools (llhttp, uvicorn's parser)
parses; each request goes to web.FrontDoor through Tornado's HTTPConnection
interface, so tornado.web's handlers still serve what is not hot; and an
upgraded socket's transport, TLS or not, is handed as it is to the protocol
that takes it over (the device's DeviceConnection).

Kept from Tornado's HTTP/1.1 server: one request at a time per connection
(pipelined ones wait, in order, with reading paused), keep-alive as HTTP/1.0
and 1.1 say, Expect: 100-continue, max_body_size (400 and close past it,
unless the delegate raised it for its request), idle_timeout bounding the
wait for a request head and its arrival, a head over four times
max_header_size cut without an answer, and malformed requests answered 400
and closed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from http.client import responses
from typing import Any, Protocol, cast

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)
from tornado.httputil import (
    HTTPHeaders,
    HTTPInputError,
    HTTPMessageDelegate,
    RequestStartLine,
    ResponseStartLine,
)

from simplepush import logs
from simplepush.logs import event

_CONTINUE = b"HTTP/1.1 100 (Continue)\r\n\r\n"
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\n\r\n"
# llhttp also reads 0.9 and 2.0 request lines; like Tornado, only HTTP/1.x is served.
_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
# What waits in a connection's queue behind the request being answered: a request head,
# a piece of body, the end of a request, the bytes after an upgrade request's head, and
# a request that cannot be read.
_HEAD, _BODY, _DONE, _RAW, _BAD = range(5)
# What a connection waits for under a deadline: nothing, a request head, a request body.
_IDLE, _HEAD_DUE, _BODY_DUE = range(3)
_NO_HEADERS = HTTPHeaders()
# The longest a connection may be cut after its head or body deadline passed.
SWEEP_EVERY = 1.0


class Door(Protocol):
    """Who answers a request, picked once its head is read (web.FrontDoor)."""

    def request(
        self,
        start_line: RequestStartLine,
        headers: HTTPHeaders,
        head_size: int,
        connection: PublicConnection,
    ) -> HTTPMessageDelegate: ...


class PublicServer:
    """A worker's public listeners and the HTTP connections they hold (not upgraded ones)."""

    def __init__(
        self,
        door: Door,
        tls: ssl.SSLContext | None,
        *,
        max_header_size: int,
        max_body_size: int,
        idle_timeout: float,
        body_timeout: float,
        backlog: int,
    ) -> None:
        self.door = door
        self.tls = tls
        # FrontDoor answers heads over max_header_size with 431; past four times it the
        # head is not even held: the connection is cut.
        self.head_cut = 4 * max_header_size
        self.max_body_size = max_body_size
        self.idle_timeout = idle_timeout
        self.body_timeout = body_timeout
        self.backlog = backlog
        # How often overdue heads and bodies are looked for: deadlines are met within that.
        self._sweep_every = min(SWEEP_EVERY, idle_timeout / 4, body_timeout / 4)
        self._sweeper: asyncio.TimerHandle | None = None
        self.connections: set[PublicConnection] = set()
        self.loop: asyncio.AbstractEventLoop  # the one start() runs on
        self._listeners: list[asyncio.AbstractServer] = []
        self._sockets: list[socket.socket] = []
        self._handovers: set[asyncio.Task[Any]] = set()

    def _tls(self) -> dict[str, Any]:
        # A TLS handshake is bounded as a request head is: by idle_timeout.
        if self.tls is None:
            return {}
        return {"ssl": self.tls, "ssl_handshake_timeout": self.idle_timeout}

    async def start(self, sockets: list[socket.socket]) -> None:
        self.loop = loop = asyncio.get_running_loop()
        for sock in sockets:
            listener = await loop.create_server(
                self.connection, sock=sock, backlog=self.backlog, **self._tls()
            )
            self._listeners.append(listener)
            self._sockets.append(sock)
        self._sweeper = loop.call_later(self._sweep_every, self._sweep)

    def _sweep(self) -> None:
        """Cut the connections whose request head or body is overdue.

        One timer for all of them: one per request, made and then cancelled,
        costs about 4 µs, on asyncio's loop as on uvloop.
        """
        now = self.loop.time()
        for connection in [c for c in self.connections if c.overdue(now)]:
            connection.expire()
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def connection(self) -> PublicConnection:
        return PublicConnection(self)

    def stop_accepting(self) -> None:
        """Close the listeners, first taking every connection in their queues to serve it.

        The kernel completes handshakes before accept(): a connection still queued
        when its listener closes is reset after the app server sent its PUT, which
        then gets no answer. Taken here, they are served; only one whose handshake
        is under way at the close can still be reset (the kernel's race; a load
        balancer draining first avoids it).
        """
        loop = self.loop
        for sock in self._sockets:
            while True:
                try:
                    accepted, _address = sock.accept()
                except ConnectionAbortedError:
                    continue
                except OSError:  # BlockingIOError: the queue is empty
                    break
                task = loop.create_task(
                    loop.connect_accepted_socket(self.connection, accepted, **self._tls())
                )
                self._handovers.add(task)
                task.add_done_callback(self._handed_over)
        for listener in self._listeners:
            listener.close()
        self._listeners, self._sockets = [], []

    def _handed_over(self, task: asyncio.Task[Any]) -> None:
        self._handovers.discard(task)
        if not task.cancelled():
            task.exception()  # a failed TLS handshake: nobody to tell, as for an accepted one

    async def close_connections(self) -> None:
        """Close the HTTP connections left at shutdown, idle keep-alive ones among them."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in list(self.connections):
            connection.close()
        await asyncio.sleep(0)  # their connection_lost


class _Context:
    """What tornado.web reads of a connection (HTTPServerRequest.remote_ip and .protocol)."""

    __slots__ = ("protocol", "remote_ip")

    def __init__(self, remote_ip: str, protocol: str) -> None:
        self.remote_ip = remote_ip
        self.protocol = protocol

    def __str__(self) -> str:
        return self.remote_ip


def _header(headers: HTTPHeaders, name: str) -> str | None:
    """A header's value or None (HTTPHeaders.get raises and catches KeyError when absent)."""
    return headers[name] if name in headers else None  # noqa: SIM401


def _keep_alive(start_line: RequestStartLine, headers: HTTPHeaders) -> bool:
    """Tornado's rule (HTTP1Connection._can_keep_alive)."""
    connection = _header(headers, "Connection")
    if connection is not None:
        connection = connection.lower()
    if start_line.version == "HTTP/1.1":
        return connection != "close"
    return connection == "keep-alive" and (
        "Content-Length" in headers
        or "Transfer-Encoding" in headers
        or start_line.method in ("HEAD", "GET")
    )


class PublicConnection(asyncio.Protocol):
    """One connection to the public port, and the tornado HTTPConnection of its requests.

    Requests are answered one at a time: one that comes (pipelined) while the
    one before is answered waits in `_queue`, as parsed events, and reading
    pauses until the queue is through.
    """

    __slots__ = (
        "_active",
        "_body_size",
        "_broken",
        "_close_callback",
        "_closing",
        "_context",
        "_deadline",
        "_delegate",
        "_finished",
        "_head_size",
        "_headers",
        "_in_head",
        "_keep_alive",
        "_max_body",
        "_parser",
        "_queue",
        "_reading",
        "_replaying",
        "_server",
        "_transport",
        "_unparsed",
        "_upgrade_to",
        "_url",
        "_version",
        "_waiting",
        "_written",
    )

    def __init__(self, server: PublicServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._parser: HttpRequestParser | None = HttpRequestParser(self)
        self._closing = False
        self._broken = False  # llhttp failed or the head is too big: nothing more is read
        self._context: _Context | None = None
        # The head being parsed, which may be a request's behind the one being answered.
        self._in_head = False
        self._unparsed = 0  # bytes read while a head was incomplete, roughly
        self._url = b""
        self._headers = _NO_HEADERS  # replaced at each request's first byte
        self._head_size = 0
        # The request being answered.
        self._delegate: HTTPMessageDelegate | None = None
        self._active = False  # from its head until it is read and answered
        self._reading = False  # until its end is read
        self._finished = False  # its delegate called finish()
        self._written = False  # some of its answer was written
        self._keep_alive = True
        self._version = "HTTP/1.1"
        self._max_body = server.max_body_size
        self._body_size = 0
        self._close_callback: Callable[[], None] | None = None
        self._upgrade_to: asyncio.BaseProtocol | None = None
        self._queue: deque[tuple[int, Any]] | None = None  # reading is paused while it exists
        self._replaying = False
        # What must come by when; PublicServer's sweep cuts the connection if it does not.
        self._waiting = _IDLE
        self._deadline = 0.0

    # --- asyncio ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        self._wait(_HEAD_DUE, self._server.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._closing or self._broken:
            return
        if self._in_head:
            self._unparsed += len(data)
        try:
            cast(HttpRequestParser, self._parser).feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._upgraded(data[upgrade.args[0] :])
            return
        except HttpParserCallbackError:
            if not self._closing:
                logs.exception("http.error")
                self._abort()
            return
        except HttpParserError as exc:
            self._unreadable(str(exc))
            return
        if self._in_head and self._unparsed > self._server.head_cut:
            self._unreadable(None)

    def connection_lost(self, exc: Exception | None) -> None:
        delegate = self._delegate
        reading, finished, callback = self._reading, self._finished, self._close_callback
        self._forget()
        if delegate is None:
            return
        # As Tornado tells them: the delegate while its request is read, else the close callback.
        try:
            if reading:
                delegate.on_connection_close()
            elif not finished and callback is not None:
                callback()
        except Exception:
            logs.exception("http.error")

    def _forget(self) -> None:
        """This object is done with its transport: closed, or handed to another protocol."""
        self._closing = True
        self._transport = None
        self._server.connections.discard(self)
        self._waiting = _IDLE
        self._queue = None
        self._delegate = self._close_callback = None
        self._parser = None  # it holds our bound methods: no cycle left for the GC

    # --- llhttp's callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        self._headers = HTTPHeaders()
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer after a chunked body: not read, as in Tornado
        key = name.decode("latin-1")
        text = value.decode("latin-1").rstrip(" \t")
        self._head_size += len(key) + len(text) + 4
        headers = self._headers
        if key in headers:
            headers.add(key, text)
        else:
            headers[key] = text

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._unparsed = 0
        if self._closing:
            return
        parser = cast(HttpRequestParser, self._parser)
        method = parser.get_method().decode("ascii")
        url = self._url.decode("latin-1")
        size = self._head_size + len(method) + len(url) + len("HTTP/1.1") + 4
        if size > self._server.head_cut:
            self._unreadable(None)
            return
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self._unreadable("HTTP version is not 1.x")
            return
        headers = self._headers
        encoding = _header(headers, "Transfer-Encoding")
        if encoding is not None and encoding.lower() != "chunked":
            # Tornado's rule: another coding, or a list, could frame the body otherwise.
            self._unreadable(f"unsupported Transfer-Encoding {encoding!r}")
            return
        head = (RequestStartLine(method, url, version), headers, size)
        if self._active or self._queue is not None:
            self._enqueue(_HEAD, head)
        else:
            self._head(head)

    def on_body(self, body: bytes) -> None:
        if self._closing:
            return
        if self._queue is None:
            self._body(body)
        else:
            self._enqueue(_BODY, body)

    def on_message_complete(self) -> None:
        if self._closing:
            return
        if self._queue is None:
            self._done()
        else:
            self._enqueue(_DONE, None)

    # --- one request ---------------------------------------------------------------

    def _head(self, head: tuple[RequestStartLine, HTTPHeaders, int]) -> None:
        start_line, headers, size = head
        server = self._server
        self._waiting = _IDLE
        self._active = self._reading = True
        self._finished = self._written = False
        self._version = start_line.version
        self._keep_alive = _keep_alive(start_line, headers)
        self._max_body = server.max_body_size
        self._body_size = 0
        if not self._step(self._begin, start_line, headers, size) or self._closing:
            return
        if not self._written and _header(headers, "Expect") == "100-continue":
            cast(asyncio.Transport, self._transport).write(_CONTINUE)
        length = _header(headers, "Content-Length")
        if length is not None and int(length) > self._max_body:
            self._malformed("Content-Length too long")
        elif (length is not None and length != "0") or "Transfer-Encoding" in headers:
            self._wait(_BODY_DUE, server.body_timeout)

    def _body(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size > self._max_body:
            self._malformed("body too large")
            return
        self._step(cast(HTTPMessageDelegate, self._delegate).data_received, chunk)

    def _done(self) -> None:
        self._reading = False
        self._waiting = _IDLE
        self._step(cast(HTTPMessageDelegate, self._delegate).finish)

    def _begin(self, start_line: RequestStartLine, headers: HTTPHeaders, size: int) -> None:
        delegate = self._delegate = self._server.door.request(start_line, headers, size, self)
        delegate.headers_received(start_line, headers)

    def _step(self, step: Callable[..., object], *args: Any) -> bool:
        """One step of the request's delegate; False when it raised: an HTTPInputError
        (tornado.web's: no Host header, say) answers 400, anything else 500."""
        try:
            step(*args)
        except HTTPInputError as exc:
            self._malformed(str(exc))
            return False
        except Exception:
            self._crash()
            return False
        return True

    def _end(self) -> None:
        """The request was read and answered: on to the next one, or close."""
        self._active = False
        self._delegate = self._close_callback = None
        if not self._keep_alive:
            self.close()
            return
        if self._queue is not None and not self._replaying:
            self._replay()
        if not self._active and not self._closing:
            self._wait(_HEAD_DUE, self._server.idle_timeout)

    def _enqueue(self, kind: int, item: Any) -> None:
        if self._queue is None:
            self._queue = deque()
            cast(asyncio.Transport, self._transport).pause_reading()
        self._queue.append((kind, item))

    def _replay(self) -> None:
        """Hand on what waited, up to the next request head while one is being answered."""
        queue = cast(deque, self._queue)
        self._replaying = True
        try:
            while queue and not self._closing:
                kind, item = queue[0]
                if kind in (_HEAD, _BAD) and self._active:
                    break
                queue.popleft()
                if kind == _HEAD:
                    self._head(item)
                elif kind == _BODY:
                    self._body(item)
                elif kind == _DONE:
                    self._done()
                elif kind == _RAW:
                    self._raw(item)
                elif item is None:
                    self._abort()
                else:
                    self._malformed(item)
        finally:
            self._replaying = False
        if not queue and not self._closing:
            self._queue = None
            cast(asyncio.Transport, self._transport).resume_reading()

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stopped after an upgrade request's head (Upgrade and Connection: upgrade,
        or CONNECT); `rest` is what came after it."""
        if self._closing:
            return
        if self._queue is None:
            self._raw(rest)
        else:
            self._enqueue(_RAW, rest)

    def _raw(self, rest: bytes) -> None:
        if self._upgrade_to is not None:
            self._switch(rest)
            return
        # Not taken (another protocol, or refused): what follows is HTTP again.
        self._parser = HttpRequestParser(self)
        if rest:
            self.data_received(rest)

    def _switch(self, rest: bytes) -> None:
        protocol = cast(asyncio.BaseProtocol, self._upgrade_to)
        transport = cast(asyncio.Transport, self._transport)
        paused = self._queue is not None
        self._forget()
        transport.set_protocol(protocol)
        if paused:
            transport.resume_reading()
        protocol.connection_made(transport)
        if rest:
            cast(asyncio.Protocol, protocol).data_received(rest)

    # --- timers and ends ---------------------------------------------------------------

    def _wait(self, what: int, seconds: float) -> None:
        """Cut the connection unless `what` comes within `seconds`."""
        self._waiting, self._deadline = what, self._server.loop.time() + seconds

    def overdue(self, now: float) -> bool:
        return self._waiting != _IDLE and self._deadline <= now

    def expire(self) -> None:
        if self._waiting == _BODY_DUE:
            event(logging.INFO, "http.body_timeout", timeout=self._server.body_timeout)
        self._waiting = _IDLE
        self._abort()

    def _unreadable(self, reason: str | None) -> None:
        """The next request cannot be read: 400 for `reason`, or a cut for a head too big to
        hold (None); after the answer to the one before it, as Tornado reads no further."""
        self._broken = True
        if self._queue is not None or (self._active and not self._reading):
            self._enqueue(_BAD, reason)
        elif reason is None:
            self._abort()
        else:
            self._malformed(reason)

    def _malformed(self, reason: str) -> None:
        if self._closing:
            return
        event(logging.INFO, "http.malformed", error=reason)
        cast(asyncio.Transport, self._transport).write(_BAD_REQUEST)
        self.close()

    def _crash(self) -> None:
        """A delegate raised: as Tornado does, log it and drop the connection."""
        logs.exception("http.error")
        self._abort()

    def _abort(self) -> None:
        if not self._closing:
            self._closing = True
            cast(asyncio.Transport, self._transport).abort()

    def close(self) -> None:
        """Close once what was written has gone out."""
        if not self._closing:
            self._closing = True
            cast(asyncio.Transport, self._transport).close()

    # --- tornado.httputil.HTTPConnection --------------------------------------------------

    @property
    def context(self) -> _Context:
        if self._context is None:
            peer = self._transport.get_extra_info("peername") if self._transport else None
            self._context = _Context(
                peer[0] if isinstance(peer, tuple) else "0.0.0.0",
                "http" if self._server.tls is None else "https",
            )
        return self._context

    def set_close_callback(self, callback: Callable[[], None] | None) -> None:
        self._close_callback = callback

    def set_max_body_size(self, max_body_size: int) -> None:
        self._max_body = max_body_size

    def write_headers(
        self,
        start_line: RequestStartLine | ResponseStartLine,
        headers: HTTPHeaders,
        chunk: bytes | None = None,
    ) -> Awaitable[None]:
        if not self._closing:
            assert isinstance(start_line, ResponseStartLine)
            code = start_line.code
            if "Content-Length" not in headers and code not in (204, 304) and code >= 200:
                self._keep_alive = False  # no chunked answers here: its end is the close
            if self._version == "HTTP/1.1":
                if not self._keep_alive:
                    headers["Connection"] = "close"
            elif self._keep_alive:
                headers["Connection"] = "Keep-Alive"
            lines = [f"HTTP/1.1 {code} {start_line.reason}"]
            lines.extend(f"{name}: {value}" for name, value in headers.get_all())
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            self._written = True
            cast(asyncio.Transport, self._transport).write(head + chunk if chunk else head)
        return self._written_future()

    def answer(self, code: int, fields: str, body: bytes) -> None:
        """A whole answer in one write, its header lines formatted ("Name: value\\r\\n" each,
        Content-Length among them but for a 204): write_headers for the hot requests."""
        if self._closing:
            return
        if self._version == "HTTP/1.1":
            if not self._keep_alive:
                fields += "Connection: close\r\n"
        elif self._keep_alive:
            fields += "Connection: Keep-Alive\r\n"
        self._written = True
        head = f"HTTP/1.1 {code} {responses[code]}\r\n{fields}\r\n".encode("latin-1")
        cast(asyncio.Transport, self._transport).write(head + body)

    def write(self, chunk: bytes) -> Awaitable[None]:
        if not self._closing:
            cast(asyncio.Transport, self._transport).write(chunk)
        return self._written_future()

    def _written_future(self) -> asyncio.Future[None]:
        """Done at once: the transport buffers what the socket does not take yet."""
        future = self._server.loop.create_future()
        future.set_result(None)
        return future

    def finish(self) -> None:
        if self._closing or not self._active:
            return
        self._finished = True
        if self._reading:
            # Answered before the request was read: as in Tornado, the rest is not read.
            self.close()
            return
        self._end()

    def upgrade(self, protocol: asyncio.BaseProtocol) -> None:
        """Hand the transport to `protocol` once this request's head is read (its finish()).

        Only for a request llhttp reads as an upgrade (Upgrade and Connection:
        upgrade): it stops at the end of that head and says where.
        """
        self._upgrade_to = protocol
