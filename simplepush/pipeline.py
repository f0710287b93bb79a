"""A pipelined client connection: requests made in one loop turn go out in one write.

memcached (store/memcache_client.py) and another node's internal listener
(peers.py) answer requests in the order they came on a connection, so each
caller waits on a future in a FIFO, and the subclass's `_parse` hands out
the answers in turn. Under load several requests share a write and several
answers a read, where a connection per request in flight costs a write, a
read and a wake-up of the other process each.

One timer watches them all: a connection whose oldest request has waited
`timeout` fails every request on it (which of them the server acted on is
unknown), and the next call opens a new connection.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from typing import Any, cast


class Pipelined(asyncio.Protocol):
    """Commands queued in one loop turn go out in one write; one timer watches them all."""

    __slots__ = (
        "_buffer",
        "_loop",
        "_lost",
        "_out",
        "_pending",
        "_timeout",
        "_watchdog",
        "transport",
    )

    # What a broken or stalled connection raises, and what a closed one raises.
    failure: type[Exception] = ConnectionError
    closed: type[Exception] = ConnectionError

    def __init__(self, timeout: float, lost: Callable[[], None] | None = None) -> None:
        self._timeout = timeout
        # Called if the server closes the connection (not when this side gives up on it).
        self._lost = lost
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._out: list[bytes] = []
        # (what the answer is, future, time written), in the order the requests were written
        self._pending: deque[tuple[Any, asyncio.Future, float]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def call(self, request: bytes, kind: Any) -> asyncio.Future:
        """Queue one whole request; `kind` tells `_parse` what its answer looks like."""
        loop = self._loop
        future = loop.create_future()
        self._pending.append((kind, future, loop.time()))
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(request)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._watch)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None:
            self.transport.write(b"".join(out))

    def _watch(self) -> None:
        """Fail the connection if its oldest request has waited too long, else look again later."""
        self._watchdog = None
        if not self._pending:
            return
        waited = self._loop.time() - self._pending[0][2]
        if waited >= self._timeout:
            self._fail(self.failure(f"no answer within {self._timeout:g} s"))
        else:
            self._watchdog = self._loop.call_later(self._timeout - waited, self._watch)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._parse()
        except (ValueError, IndexError, self.failure) as exc:
            self._fail(exc if isinstance(exc, self.failure) else self.failure(str(exc)))

    def _parse(self) -> None:
        """Answer the oldest requests (`_answer`) from what `_buffer` holds; raise `failure`,
        ValueError or IndexError when the server broke the protocol."""
        raise NotImplementedError

    def _answer(self, result: object) -> None:
        future = self._pending.popleft()[1]
        if not future.done():
            future.set_result(result)

    def _fail(self, exc: Exception) -> None:
        """Give up on a connection that broke the protocol or stalled."""
        self._lost = None
        if self.transport is not None:
            self.transport.abort()
        self._drop(exc)

    def _drop(self, exc: Exception) -> None:
        while self._pending:
            future = self._pending.popleft()[1]
            if not future.done():
                future.set_exception(exc)
                # A caller cancelled meanwhile (a closing socket, a shutdown) no longer
                # waits: retrieve it here so that asyncio does not report it at exit.
                future.exception()
        self._buffer.clear()
        self._out.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def close(self) -> None:
        """Closed on purpose: no sign that the server lost anything."""
        self._lost = None
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._drop(self.closed(f"connection lost: {exc}" if exc else "connection closed"))
        if self._lost is not None:
            self._lost()


class Server:
    """One server: at most one pipelined connection, opened when needed, shared by callers."""

    __slots__ = ("_connection", "_opening", "address", "timeout")

    protocol: type[Pipelined] = Pipelined

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._connection: Pipelined | None = None
        self._opening: asyncio.Future[Pipelined] | None = None

    def open_connection(self) -> Pipelined | None:
        connection = self._connection
        return connection if connection is not None and connection.usable() else None

    async def connection(self) -> Pipelined:
        connection = self.open_connection()
        if connection is not None:
            return connection
        if self._opening is None:
            self._opening = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(self._opening)
        finally:
            if self._opening is not None and self._opening.done():
                self._opening = None

    async def _open(self) -> Pipelined:
        loop = asyncio.get_running_loop()
        host, port = self.address
        failure = self.protocol.failure
        try:
            async with asyncio.timeout(self.timeout):
                _transport, connection = await loop.create_connection(
                    lambda: self.protocol(self.timeout, self.lost), host, port
                )
        except TimeoutError:
            raise failure(f"cannot connect within {self.timeout:g} s") from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise failure(f"cannot connect: {reason}") from None
        self._connection = connection
        return connection

    async def call(self, request: bytes, kind: Any) -> Any:
        """The answer to one request. A connection the server closed while idle (a restart)
        fails its first request before the close is noticed: that one is sent once more on
        a new connection."""
        reused = self.open_connection()
        connection = reused or await self.connection()
        try:
            return await connection.call(request, kind)
        except self.protocol.closed:
            if reused is None:
                raise
        connection = await self.connection()
        return await connection.call(request, kind)

    def lost(self) -> None:
        """The server closed the connection (not this side); nothing to do by default."""

    def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        if self._connection is not None:
            self._connection.close()
        self._connection = None
