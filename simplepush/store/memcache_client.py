"""memcached's text protocol on the IOLoop: the few commands the store needs.

Why not pymemcache's clients: they block, so they must run in threads, and
measured with simplepush-bench that cost about 1.4 ms of CPU per
notification (thread hand-offs and GIL transfers for four memcached calls),
three times the whole budget. Here each call is one write on a pipelined
connection per server and one parse in `data_received`; the IOLoop never
waits. pymemcache still chooses the server for a key (its rendezvous hash).

Commands are answered in order on a connection, so requests wait in a FIFO
(simplepush/pipeline.py). A connection that fails or times out fails every
request on it; the next request opens a new one, which is how service
resumes after memcached restarts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pymemcache.client.rendezvous import RendezvousHash

from simplepush.pipeline import Pipelined, Server

# The reply of a classic storage command that stored (anything else did not).
STORED = b"STORED"
# A meta set that did not store: the item changed (EX), vanished (NF) or exists (NS).
_LOST_RACE = (b"EX", b"NF", b"NS")
_VALUE, _LINE = 0, 1
# Values up to this many bytes are written with meta sets (see swap); memcached's items
# must be able to hold them (its -I, 1 MB by default, is far larger).
META_SET_LIMIT = 64 * 1024
# memcached's answer to a command it does not know; before 1.6 that is every meta command.
UNKNOWN_COMMAND = "ERROR, a command memcached does not know: the store needs memcached 1.6 or later"
PLACEMENT_CACHE = 65536
_MAX_VALUE = 2 * 1024 * 1024


class MemcacheFailure(Exception):
    """The server did not answer as memcached does; the caller answers 503."""


class ConnectionLost(MemcacheFailure):
    """The connection closed under a command (memcached restarted, or went away)."""


class _Connection(Pipelined):
    """memcached's replies, in the order of the commands (simplepush/pipeline.py)."""

    __slots__ = ()
    failure = MemcacheFailure
    closed = ConnectionLost

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
                if line == b"ERROR":
                    raise MemcacheFailure(UNKNOWN_COMMAND)
                if line.endswith(b"ERROR") or line.startswith((b"CLIENT_ERROR", b"SERVER_ERROR")):
                    raise MemcacheFailure(line.decode("ascii", "replace"))
                result = (None, None) if pending[0][0] == _VALUE else line
                if pending[0][0] == _VALUE and line != b"END":
                    raise MemcacheFailure(f"unexpected reply {line[:40]!r}")
            self._answer(result)
        if buffer and not pending:
            raise MemcacheFailure("reply to no command")


class _Server(Server):
    """One memcached server, named as in the config."""

    __slots__ = ("_on_lost", "name")
    protocol = _Connection

    def __init__(
        self,
        name: str,
        address: tuple[str, int],
        timeout: float,
        lost: Callable[[_Server], None],
    ) -> None:
        super().__init__(address, timeout)
        self.name = name
        self._on_lost = lost

    def lost(self) -> None:
        self._on_lost(self)


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

    async def gets(
        self, key: str, server: _Server | None = None
    ) -> tuple[bytes | None, int | None]:
        """The value and its CAS token, or (None, None) when absent."""
        server = server or self.server_for(key)
        return await server.call(b"gets %s\r\n" % key.encode(), _VALUE)

    async def get(self, key: str, server: _Server | None = None) -> bytes | None:
        server = server or self.server_for(key)
        value, _cas = await server.call(b"gets %s\r\n" % key.encode(), _VALUE)
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
        return await server.call(b"%s\r\n%s\r\n" % (head, value), _LINE)

    async def add(self, key: str, value: bytes, expire: int, server: _Server | None = None) -> bool:
        """Store only if absent: False when another writer created it first."""
        return await self._store(b"add", key, value, expire, None, server) == STORED

    async def swap(
        self, key: str, value: bytes, expire: int, token: int | None, server: _Server | None = None
    ) -> tuple[bool, int | None]:
        """Store only if unchanged since `token` (None: only if absent): whether it was stored
        (False: another writer got in first), and the new CAS token when memcached told it.

        A meta set (memcached 1.6) answers with the new token, so that a writer
        that remembers what it wrote can change the item again without reading
        it first (memcached.py). But a meta set that memcached refuses as too
        large deletes the item it was to replace (1.6.18 does), so a value
        past META_SET_LIMIT goes as a classic cas or add, which keeps it.
        """
        server = server or self.server_for(key)
        if len(value) > META_SET_LIMIT:
            verb = b"add" if token is None else b"cas"
            return await self._store(verb, key, value, expire, token, server) == STORED, None
        head = b"ms %s %d T%d c %s" % (
            key.encode(),
            len(value),
            expire,
            b"ME" if token is None else b"C%d" % token,
        )
        command = b"%s\r\n%s\r\n" % (head, value)
        reply: bytes = await server.call(command, _LINE)
        if reply.startswith(b"HD c"):
            return True, int(reply[4:])
        if reply[:2] in _LOST_RACE:
            return False, None
        raise MemcacheFailure(f"meta set answered {reply!r}")

    async def delete(self, key: str) -> None:
        await self.server_for(key).call(b"delete %s\r\n" % key.encode(), _LINE)

    def close(self) -> None:
        for server in self._servers.values():
            server.close()


def _address(server: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (validated by config) as a socket address."""
    host, _, port = server.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)
