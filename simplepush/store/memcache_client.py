"""memcached's text protocol on the IOLoop: the few commands the store needs.

Why not pymemcache's clients: they block, so they must run in threads, and
measured with simplepush-bench that cost about 1.4 ms of CPU per
notification (thread hand-offs and GIL transfers for four memcached calls),
three times the whole budget. Here each call is one write on a pipelined
connection per server and one parse in `data_received`; the IOLoop never
waits. pymemcache still chooses the server for a key (its rendezvous hash).

Commands are answered in order on a connection, so requests wait in a FIFO.
A connection that fails or times out fails every request on it; the next
request opens a new one, which is how service resumes after memcached
restarts.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import cast

from pymemcache.client.rendezvous import RendezvousHash

# Replies that end a storage command (the rest of the line is not needed).
STORED, NOT_STORED, EXISTS, NOT_FOUND, DELETED = (
    b"STORED",
    b"NOT_STORED",
    b"EXISTS",
    b"NOT_FOUND",
    b"DELETED",
)
# A meta set that did not store: the item changed (EX), vanished (NF) or exists (NS).
_LOST_RACE = (b"EX", b"NF", b"NS")
_VALUE, _LINE = 0, 1
# Values up to this many bytes are written with meta sets (see swap); memcached's items
# must be able to hold them (its -I, 1 MB by default, is far larger).
META_SET_LIMIT = 64 * 1024
PLACEMENT_CACHE = 65536
_MAX_VALUE = 2 * 1024 * 1024


class MemcacheFailure(Exception):
    """The server did not answer as memcached does; the caller answers 503."""


class ConnectionLost(MemcacheFailure):
    """The connection closed under a command (memcached restarted, or went away)."""


class _Connection(asyncio.Protocol):
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

    def __init__(self, timeout: float, lost: Callable[[], None]) -> None:
        self._timeout = timeout
        # Called if the server closes the connection: it may have restarted, empty.
        self._lost: Callable[[], None] | None = lost
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._out: list[bytes] = []
        # (reply kind, future, time written), in the order the commands were written
        self._pending: deque[tuple[int, asyncio.Future, float]] = deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def call(self, command: bytes, kind: int) -> asyncio.Future:
        loop = self._loop
        future = loop.create_future()
        self._pending.append((kind, future, loop.time()))
        if not self._out:
            loop.call_soon(self._flush)
        self._out.append(command)
        if self._watchdog is None:
            self._watchdog = loop.call_later(self._timeout, self._watch)
        return future

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None:
            self.transport.write(b"".join(out))

    def _watch(self) -> None:
        """Fail the connection if its oldest command has waited too long, else look again later."""
        self._watchdog = None
        if not self._pending:
            return
        waited = self._loop.time() - self._pending[0][2]
        if waited >= self._timeout:
            self._fail(MemcacheFailure(f"no answer within {self._timeout:g} s"))
        else:
            self._watchdog = self._loop.call_later(self._timeout - waited, self._watch)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._parse()
        except (ValueError, IndexError, MemcacheFailure) as exc:
            self._fail(exc if isinstance(exc, MemcacheFailure) else MemcacheFailure(str(exc)))

    def _parse(self) -> None:
        buffer, pending = self._buffer, self._pending
        while pending and buffer:
            eol = buffer.find(b"\r\n")
            if eol < 0:
                return
            if pending[0][0] == _VALUE and buffer.startswith(b"VALUE "):
                header = buffer[6:eol].split()
                size = int(header[2])
                if size > _MAX_VALUE:
                    raise MemcacheFailure(f"value of {size} bytes")
                end = eol + 2 + size
                if len(buffer) < end + 7:
                    return
                if buffer[end : end + 7] != b"\r\nEND\r\n":
                    raise MemcacheFailure("value not followed by END")
                result: object = (bytes(buffer[eol + 2 : end]), int(header[3]))
                del buffer[: end + 7]
            else:
                line = bytes(buffer[:eol])
                del buffer[: eol + 2]
                if line.endswith(b"ERROR") or line.startswith((b"CLIENT_ERROR", b"SERVER_ERROR")):
                    raise MemcacheFailure(line.decode("ascii", "replace"))
                result = (None, None) if pending[0][0] == _VALUE else line
                if pending[0][0] == _VALUE and line != b"END":
                    raise MemcacheFailure(f"unexpected reply {line[:40]!r}")
            future = pending.popleft()[1]
            if not future.done():
                future.set_result(result)
        if buffer and not pending:
            raise MemcacheFailure("reply to no command")

    def _fail(self, exc: Exception) -> None:
        """Give up on a connection that broke the protocol or stalled; the server kept its data."""
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
        self._drop(ConnectionLost(f"connection lost: {exc}" if exc else "connection closed"))
        if self._lost is not None:
            self._lost()


class _Server:
    """One memcached server: at most one connection, opened when needed."""

    __slots__ = ("_connection", "_lost", "_opening", "address", "name", "timeout")

    def __init__(
        self,
        name: str,
        address: tuple[str, int],
        timeout: float,
        lost: Callable[[_Server], None],
    ) -> None:
        self.name = name
        self.address = address
        self.timeout = timeout
        self._lost = lost
        self._connection: _Connection | None = None
        self._opening: asyncio.Future[_Connection] | None = None

    def open_connection(self) -> _Connection | None:
        connection = self._connection
        return connection if connection is not None and connection.usable() else None

    async def connection(self) -> _Connection:
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

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        host, port = self.address
        try:
            async with asyncio.timeout(self.timeout):
                _transport, connection = await loop.create_connection(
                    lambda: _Connection(self.timeout, lambda: self._lost(self)), host, port
                )
        except TimeoutError:
            raise MemcacheFailure(f"cannot connect within {self.timeout:g} s") from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise MemcacheFailure(f"cannot connect: {reason}") from None
        self._connection = connection
        return connection

    def close(self) -> None:
        if self._opening is not None:
            self._opening.cancel()
        if self._connection is not None:
            self._connection.close()
        self._connection = None


class MemcacheClient:
    """Keys spread over the servers by rendezvous hashing, over a FIXED list.

    A server that fails keeps its keys (calls for them fail until it is
    back) rather than handing them to another server: nodes notice a failure
    at different moments and would otherwise read and write one UAID in two
    places (docs/STORAGE.md).
    """

    def __init__(self, servers: Sequence[str], timeout: float) -> None:
        self._servers = {
            server: _Server(server, _address(server), timeout, self._on_lost) for server in servers
        }
        # Called with the server when it closes its connection (see _Connection).
        self.lost: Callable[[_Server], None] = lambda server: None
        self._ring = RendezvousHash(list(self._servers))
        self._only = next(iter(self._servers.values())) if len(self._servers) == 1 else None
        self._placed: dict[str, _Server] = {}

    def _on_lost(self, server: _Server) -> None:
        self.lost(server)

    def server_for(self, key: str) -> _Server:
        """Hashing a key costs tens of microseconds in pure Python: remember recent ones."""
        if self._only is not None:
            return self._only
        server = self._placed.get(key)
        if server is None:
            placed = self._placed
            if len(placed) >= PLACEMENT_CACHE:
                del placed[next(iter(placed))]
            server = placed[key] = self._servers[self._ring.get_node(key)]
        return server

    def servers(self) -> list[_Server]:
        return list(self._servers.values())

    async def _call(self, server: _Server, command: bytes, kind: int) -> object:
        """A connection memcached closed while idle (a restart) fails its first command
        before the close is noticed: that command is sent once more on a new one."""
        reused = server.open_connection()
        connection = reused or await server.connection()
        try:
            return await connection.call(command, kind)
        except ConnectionLost:
            if reused is None:
                raise
        connection = await server.connection()
        return await connection.call(command, kind)

    async def gets(
        self, key: str, server: _Server | None = None
    ) -> tuple[bytes | None, int | None]:
        """The value and its CAS token, or (None, None) when absent."""
        server = server or self.server_for(key)
        return await self._call(server, b"gets %s\r\n" % key.encode(), _VALUE)  # type: ignore[return-value]

    async def get(self, key: str, server: _Server | None = None) -> bytes | None:
        server = server or self.server_for(key)
        value, _cas = await self._call(server, b"gets %s\r\n" % key.encode(), _VALUE)  # type: ignore[misc]
        return value

    async def _store(
        self,
        verb: bytes,
        key: str,
        value: bytes,
        expire: int,
        cas: int | None,
        server: _Server | None,
    ) -> bytes:
        server = server or self.server_for(key)
        head = b"%s %s 0 %d %d" % (verb, key.encode(), expire, len(value))
        if cas is not None:
            head += b" %d" % cas
        return await self._call(server, b"%s\r\n%s\r\n" % (head, value), _LINE)  # type: ignore[return-value]

    async def add(self, key: str, value: bytes, expire: int, server: _Server | None = None) -> bool:
        """Store only if absent: False when another writer created it first."""
        return await self._store(b"add", key, value, expire, None, server) == STORED

    async def swap(
        self, key: str, value: bytes, expire: int, token: int | None
    ) -> tuple[bool, int | None]:
        """Store only if unchanged since `token` (None: only if absent): whether it was stored
        (False: another writer got in first), and the new CAS token when memcached told it.

        A meta set (memcached 1.6) answers with the new token, so that a writer
        that remembers what it wrote can change the item again without reading
        it first (memcached.py). But a meta set that memcached refuses as too
        large deletes the item it was to replace (1.6.18 does), so a value
        past META_SET_LIMIT goes as a classic cas or add, which keeps it.
        """
        if len(value) > META_SET_LIMIT:
            verb = b"add" if token is None else b"cas"
            return await self._store(verb, key, value, expire, token, None) == STORED, None
        head = b"ms %s %d T%d c %s" % (
            key.encode(),
            len(value),
            expire,
            b"ME" if token is None else b"C%d" % token,
        )
        command = b"%s\r\n%s\r\n" % (head, value)
        reply = cast(bytes, await self._call(self.server_for(key), command, _LINE))
        if reply.startswith(b"HD c"):
            return True, int(reply[4:])
        if reply[:2] in _LOST_RACE:
            return False, None
        raise MemcacheFailure(f"meta set answered {reply!r}")

    async def set(self, key: str, value: bytes, expire: int, server: _Server | None = None) -> None:
        reply = await self._store(b"set", key, value, expire, None, server)
        if reply != STORED:
            raise MemcacheFailure(f"set answered {reply!r}")

    async def delete(self, key: str) -> None:
        await self._call(self.server_for(key), b"delete %s\r\n" % key.encode(), _LINE)

    def close(self) -> None:
        for server in self._servers.values():
            server.close()


def _address(server: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (validated by config) as a socket address."""
    host, _, port = server.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)
