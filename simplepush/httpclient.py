"""A lean keep-alive HTTP/1.1 client: pooled connections, one request in flight on each.

The bench PUTs versions to push endpoints with it, and the server routes
notifications to other nodes' internal listeners with it.

Why not tornado.httpclient: its default (simple) client opens a new TCP
connection for every request and runs a coroutine stack per request, and the
keep-alive capable curl client needs pycurl. A request here is a single
``transport.write`` of a preformatted request and a header scan of the reply
inside ``data_received``. Measured on this machine, sequential PUTs: tornado's
simple client ~650-720 us of client CPU per PUT, this pool ~80-90 us.

Scope: no pipelining, redirects, proxies, compression or ``Expect``; the
caller's ``connect`` opens the transport (so TLS or a source address is its
business). Responses may be length-delimited, chunked or close-delimited;
interim 1xx heads are skipped; a body may take at most MAX_BODY bytes on the wire.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import cast

MAX_HEAD = 65536
MAX_BODY = 1 << 20
UNTIL_CLOSE = -1  # no Content-Length and not chunked: the body ends at EOF
WITH_CONTENT = (b"PUT", b"POST", b"PATCH")  # send Content-Length: 0 even for an empty body


class HttpError(ConnectionError):
    """The server broke HTTP/1.1 framing or dropped the connection mid-response."""


class HttpConn(asyncio.Protocol):
    """One keep-alive connection; at most one request in flight (no pipelining)."""

    __slots__ = (
        "bodiless",
        "buf",
        "chunked",
        "keep",
        "need",
        "pool",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self, pool: HttpPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.status = 0  # 0 while the response head has not been parsed
        self.need = 0
        self.chunked = False
        self.keep = True
        self.bodiless = False  # the request was HEAD: the response has no body

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def request(self, data: bytes, bodiless: bool = False) -> asyncio.Future[tuple[int, bytes]]:
        """Write one whole request; the future yields (status, body)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise HttpError("connection closed before the request")
        assert self.waiter is None, "no pipelining"
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        self.bodiless = bodiless
        transport.write(data)
        return waiter

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            while self._step():
                pass
        except HttpError as exc:
            self._fail(exc)
        except (ValueError, IndexError):
            self._fail(HttpError("malformed HTTP response"))

    def _step(self) -> bool:
        """Consume what it can of the response; True when it should be called again."""
        buf = self.buf
        if self.waiter is None:
            if buf:
                raise HttpError("unsolicited data")
            return False
        if not self.status:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    raise HttpError("response head too large")
                return False
            self._head(bytes(buf[: end + 2]).lower())
            del buf[: end + 4]
            return True
        if self.chunked:
            found = chunked_end(buf)
            if found is None:
                if len(buf) > MAX_BODY:
                    raise HttpError("response body too large")
                return False
            end, body = found
            if end > MAX_BODY:
                raise HttpError("response body too large")
        elif self.need == UNTIL_CLOSE:
            if len(buf) > MAX_BODY:
                raise HttpError("response body too large")
            return False  # connection_lost ends it
        else:
            end = self.need
            if len(buf) < end:
                return False
            body = bytes(buf[:end])
        del buf[:end]
        self._done(body)
        return True

    def _head(self, head: bytes) -> None:
        """Parse a lower-cased response head (ending in CRLF); a few finds beat a header dict."""
        if not head.startswith(b"http/1."):
            raise ValueError("not an HTTP/1.x response")
        status = int(head[9:12])
        if status < 200:  # 100 Continue and friends: another head follows
            return
        connection = header_value(head, b"connection")
        if head.startswith(b"http/1.1 "):  # persistent unless told otherwise
            self.keep = b"close" not in connection
        else:
            self.keep = b"keep-alive" in connection
        self.chunked = header_value(head, b"transfer-encoding").endswith(b"chunked")
        if self.bodiless or status in (204, 304):
            self.chunked, self.need = False, 0
        elif not self.chunked:  # chunked wins over a Content-Length
            length = header_value(head, b"content-length")
            if not length:
                self.need, self.keep = UNTIL_CLOSE, False
            else:
                self.need = int(length)
                if self.need < 0:
                    raise ValueError("negative Content-Length")
                if self.need > MAX_BODY:
                    raise HttpError("response body too large")
        self.status = status

    def _done(self, body: bytes) -> None:
        waiter, status = self.waiter, self.status
        self.waiter, self.status, self.need, self.chunked = None, 0, 0, False
        if not self.keep and self.transport is not None:
            self.transport.close()
        if waiter is not None and not waiter.done():
            waiter.set_result((status, body))

    def _fail(self, exc: Exception) -> None:
        waiter, self.waiter = self.waiter, None
        if self.transport is not None:
            self.transport.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def close(self) -> None:
        """Drop the connection, e.g. after a timed-out request left it mid-response."""
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None:
            if self.status and self.need == UNTIL_CLOSE and not self.chunked:
                body = bytes(self.buf)
                self.buf.clear()
                self._done(body)
            else:
                self._fail(HttpError("connection closed before the response ended"))
        self.pool.lost(self)


def header_value(head: bytes, name: bytes) -> bytes:
    """Value of header ``name`` in a lower-cased head, b"" if absent."""
    start = head.find(b"\r\n" + name + b":")
    if start < 0:
        return b""
    start += len(name) + 3
    return head[start : head.index(b"\r\n", start)].strip()


def chunked_end(buf: bytearray) -> tuple[int, bytes] | None:
    """A complete chunked body at the start of ``buf``: (offset just past it, its data).

    None while it is incomplete; ValueError when it is malformed.
    """
    pos = 0
    spans: list[tuple[int, int]] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
        if size < 0:
            raise ValueError("negative chunk size")
        pos = eol + 2
        if size == 0:
            break
        spans.append((pos, pos + size))
        pos += size + 2
        if pos > len(buf):
            return None
        if buf[pos - 2 : pos] != b"\r\n":
            raise ValueError("chunk data not followed by CRLF")
    while True:  # optional trailers, then an empty line
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        if eol == pos:
            return pos + 2, b"".join([buf[start:end] for start, end in spans])
        pos = eol + 2


class HttpPool:
    """Up to ``size`` keep-alive connections to one host, opened on demand.

    ``connect(conn)`` opens a transport for the protocol ``conn`` and returns ``conn``::

        async def connect(conn: HttpConn) -> HttpConn:
            await loop.create_connection(lambda: conn, ip, port)
            return conn

    Requests beyond ``size`` in flight wait for a connection, first come first served.
    """

    def __init__(
        self, host: str, connect: Callable[[HttpConn], Awaitable[HttpConn]], size: int
    ) -> None:
        self.connect = connect
        self.size = size
        self.opened = 0
        self.closed = False
        self.idle: list[HttpConn] = []
        self.waiters: deque[asyncio.Future[HttpConn | None]] = deque()
        self.after_path = b" HTTP/1.1\r\nHost: %s\r\n" % host.encode()  # request line end, Host

    async def request(
        self, method: bytes, path: bytes, body: bytes = b"", headers: bytes = b""
    ) -> tuple[int, bytes, float]:
        """Send one request and read the whole response.

        ``path`` goes on the request line as given (already %-encoded);
        ``headers`` is preformatted ``b"Name: value\\r\\n"`` lines, added after Host.
        Returns (status, response body, perf_counter() just before the write).
        Raises HttpError (a ConnectionError) or what ``connect`` raises; a request
        that fails or is cancelled closes its connection, whose state is unknown.
        """
        conn = self._idle() or await self._acquire()
        length = b"Content-Length: %d\r\n" % len(body) if body or method in WITH_CONTENT else b""
        data = b"%s %s%s%s%s\r\n%s" % (method, path, self.after_path, headers, length, body)
        sent = perf_counter()
        try:
            status, answer = await conn.request(data, method == b"HEAD")
        except BaseException:
            conn.close()
            raise
        self._release(conn)
        return status, answer, sent

    def _idle(self) -> HttpConn | None:
        """An idle connection the server has not begun to close, if any."""
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _acquire(self) -> HttpConn:
        while True:
            if self.closed:
                raise HttpError("pool closed")
            if conn := self._idle():
                return conn
            if self.opened < self.size:
                self.opened += 1
                try:
                    return await self.connect(HttpConn(self))
                except BaseException:
                    self.opened -= 1
                    self._hand(None)  # another waiter may have better luck
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                    self._release(waiter.result())
                raise
            if conn is not None:
                return conn

    def _release(self, conn: HttpConn) -> None:
        if conn.transport is None or conn.transport.is_closing():
            return  # lost() accounts for it
        if self.closed:
            conn.close()
        elif not self._hand(conn):
            self.idle.append(conn)

    def lost(self, conn: HttpConn) -> None:
        """A connection closed: free its slot and let one waiter open a new one."""
        self.opened -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._hand(None)

    def _hand(self, conn: HttpConn | None) -> bool:
        """Wake the oldest waiter with ``conn``, or with None to open one; False if none waits."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def close(self) -> None:
        """Close the idle connections now and busy ones when their request ends.

        Requests that are waiting for a connection, and later ones, raise HttpError.
        """
        self.closed = True
        for conn in list(self.idle):
            conn.close()
        while self._hand(None):
            pass
