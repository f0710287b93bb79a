"""simplepush.httpclient: framing and pooling on canned bytes, then against a tiny real server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from simplepush.httpclient import MAX_BODY, HttpConn, HttpError, HttpPool, chunked_end

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HANG = 10.0  # seconds: a bound on hanging, not a performance threshold
CHUNKED = (
    b"HTTP/1.1 202 Accepted\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
)


def run(scenario: Awaitable[None]) -> None:
    """Run a test scenario, bounded so that a framing bug fails instead of hanging."""
    asyncio.run(asyncio.wait_for(scenario, HANG))


async def settle() -> None:
    """Let tasks and call_soon callbacks run until they wait on something."""
    for _ in range(5):
        await asyncio.sleep(0)


async def started(pool: HttpPool, *request: bytes) -> asyncio.Task[tuple[int, bytes, float]]:
    """A request as far as it goes by itself: written, or waiting for a connection."""
    task = asyncio.create_task(pool.request(*request))
    await settle()
    return task


# --- canned bytes ---------------------------------------------------------------------------


class Wire(asyncio.Transport):
    """A fake transport: logs what is written; closing ends the connection soon, as a real one."""

    def __init__(self, net: FakeNet, conn: HttpConn) -> None:
        super().__init__()
        self.net, self.conn = net, conn
        self.closing = self.aborted = False
        conn.connection_made(self)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.net.log.append((self, bytes(data)))

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            asyncio.get_running_loop().call_soon(self.conn.connection_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def is_closing(self) -> bool:
        return self.closing


class FakeNet:
    """``connect`` for a pool: every connection is a Wire."""

    def __init__(self) -> None:
        self.wires: list[Wire] = []
        self.log: list[tuple[Wire, bytes]] = []  # every request written, in order

    async def connect(self, conn: HttpConn) -> HttpConn:
        self.wires.append(Wire(self, conn))
        return conn

    async def answer(self, response: bytes, step: int = 0) -> None:
        """Feed ``response`` to the connection of the last request, ``step`` bytes a read."""
        conn = self.log[-1][0].conn
        step = step or len(response) or 1
        for i in range(0, len(response), step):
            conn.data_received(response[i : i + step])
        await settle()


def fake_pool(size: int = 1) -> tuple[FakeNet, HttpPool]:
    """A pool whose connections are Wires."""
    net = FakeNet()
    return net, HttpPool("h", net.connect, size)


def test_requests_are_written_whole_with_host_headers_and_content_length() -> None:
    async def scenario() -> None:
        net = FakeNet()
        pool = HttpPool("node:8081", net.connect, 1)
        for method, body, headers, want in [
            (b"PUT", b"version=1", b"X-A: 1\r\n", b"X-A: 1\r\nContent-Length: 9\r\n\r\nversion=1"),
            (b"POST", b"", b"", b"Content-Length: 0\r\n\r\n"),
            (b"DELETE", b"", b"Authorization: k\r\n", b"Authorization: k\r\n\r\n"),
        ]:
            task = await started(pool, method, b"/a?b=c", body, headers)
            assert net.log[-1][1] == method + b" /a?b=c HTTP/1.1\r\nHost: node:8081\r\n" + want
            await net.answer(OK)
            status, answer, sent = await task
            assert (status, answer) == (200, b"ok") and sent > 0
        assert len(net.wires) == 1 and len(net.log) == 3

    run(scenario())


@pytest.mark.parametrize("step", [0, 1], ids=["whole", "byte-by-byte"])
@pytest.mark.parametrize(
    ("response", "status", "body", "keep"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", 200, b"hello", True),
        (CHUNKED, 202, b"abcde", True),
        (CHUNKED.replace(b"\r\n\r\n", b"\r\nContent-Length: 99\r\n\r\n", 1), 202, b"abcde", True),
        (b"HTTP/1.1 100 Continue\r\n\r\n" + OK, 200, b"ok", True),
        (
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
            404,
            b"no",
            False,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", True),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", False),
        (
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok",
            200,
            b"ok",
            True,
        ),
    ],
    ids=["length", "chunked", "chunked-wins", "continue", "conn-close", "204", "1.0", "1.0-keep"],
)
def test_responses_are_framed_and_the_connection_kept_or_closed(
    response: bytes, status: int, body: bytes, keep: bool, step: int
) -> None:
    async def scenario() -> None:
        net, pool = fake_pool()
        task = await started(pool, b"PUT", b"/", b"x")
        await net.answer(response[:-1], step)
        assert not task.done()
        await net.answer(response[-1:])
        assert (await task)[:2] == (status, body)
        wire = net.wires[0]
        assert wire.closing is not keep and not wire.aborted
        assert pool.opened == int(keep)
        task = await started(pool, b"PUT", b"/", b"x")
        assert len(net.wires) == (1 if keep else 2)  # reused, or a new one

        await net.answer(OK)
        await task

    run(scenario())


def test_a_body_without_length_runs_until_the_server_closes() -> None:
    async def scenario() -> None:
        for head in (b"HTTP/1.1 200 OK\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\n"):
            net, pool = fake_pool()
            task = await started(pool, b"GET", b"/")
            await net.answer(head + b"body until ")
            await net.answer(b"EOF")
            assert not task.done()
            net.wires[0].close()  # the server closes
            await settle()
            assert (await task)[:2] == (200, b"body until EOF")
            assert pool.opened == 0

    run(scenario())


def test_a_head_response_has_no_body_whatever_its_length() -> None:
    async def scenario() -> None:
        net, pool = fake_pool()
        task = await started(pool, b"HEAD", b"/")
        await net.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
        assert (await task)[:2] == (200, b"")
        assert pool.idle == [net.wires[0].conn]

    run(scenario())


@pytest.mark.parametrize(
    ("response", "eof", "match"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe", True, "before the response ended"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe", True, "ended"),
        (b"", True, "before the response ended"),
        (b"SPDY/3 200 OK\r\n\r\n", False, "malformed"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", False, "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", False, "malformed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", False, "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1), False, "too large"),
        (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * (MAX_BODY + 1), False, "too large"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"x" * 70000, False, "head too large"),
    ],
    ids=[
        "eof-in-body",
        "eof-in-chunks",
        "eof-before-head",
        "not-http",
        "bad-status",
        "negative-length",
        "chunk-without-crlf",
        "length-too-large",
        "until-close-too-large",
        "head-too-large",
    ],
)
def test_broken_responses_raise_http_error_and_drop_the_connection(
    response: bytes, eof: bool, match: str
) -> None:
    async def scenario() -> None:
        net, pool = fake_pool()
        task = await started(pool, b"GET", b"/")
        await net.answer(response)
        if eof:
            net.wires[0].close()
        else:
            assert net.wires[0].aborted
        await settle()
        with pytest.raises(HttpError, match=match):
            await task
        assert pool.opened == 0 and pool.idle == []

    run(scenario())


def test_unsolicited_data_on_an_idle_connection_drops_it() -> None:
    async def scenario() -> None:
        net, pool = fake_pool()
        task = await started(pool, b"GET", b"/")
        await net.answer(OK + b"HTTP/1.1 200 OK\r\n")
        assert (await task)[:2] == (200, b"ok")
        assert net.wires[0].aborted and pool.opened == 0 and pool.idle == []

    run(scenario())


def test_chunked_end_decodes_only_a_whole_body() -> None:
    body = bytearray(b"4;ext=1\r\nabcd\r\n2\r\nef\r\n0\r\nTrailer: x\r\n\r\nNEXT")
    assert chunked_end(body) == (len(body) - 4, b"abcdef")
    for cut in range(len(body) - 4):
        assert chunked_end(body[:cut]) is None


def test_a_cancelled_request_closes_its_connection_and_frees_its_slot() -> None:
    async def scenario() -> None:
        net, pool = fake_pool()
        task = asyncio.create_task(pool.request(b"PUT", b"/slow", b"x"))
        waiting = await started(pool, b"PUT", b"/next", b"y")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert net.wires[0].aborted
        await settle()  # the waiter opens a new connection in the freed slot
        assert len(net.wires) == 2 and net.log[-1][1].startswith(b"PUT /next ")
        await net.answer(OK)
        assert (await waiting)[:2] == (200, b"ok") and pool.opened == 1

    run(scenario())


def test_the_pool_opens_at_most_size_connections_and_serves_waiters_in_order() -> None:
    async def scenario() -> None:
        net, pool = fake_pool(2)
        tasks = [asyncio.create_task(pool.request(b"PUT", b"/%d" % i)) for i in range(6)]
        await settle()
        assert len(net.wires) == 2 and len(pool.waiters) == 4
        # Answer the oldest request each time: its connection goes to the oldest waiter.
        for i in range(6):
            wire, data = net.log[i]
            assert data.startswith(b"PUT /%d " % i)
            wire.conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i)
            await settle()
        assert [(await task)[1] for task in tasks] == [b"%d" % i for i in range(6)]
        assert len(net.wires) == 2 and len(pool.idle) == 2

    run(scenario())


def test_a_cancelled_waiter_does_not_keep_a_connection_from_the_next() -> None:
    async def scenario() -> None:
        net, pool = fake_pool()
        first = asyncio.create_task(pool.request(b"GET", b"/1"))
        second = asyncio.create_task(pool.request(b"GET", b"/2"))
        third = await started(pool, b"GET", b"/3")
        second.cancel()
        await net.answer(OK)
        await first
        assert net.log[-1][1].startswith(b"GET /3 ")
        await net.answer(OK)
        await third
        assert second.cancelled() and len(net.wires) == 1

    run(scenario())


def test_a_failed_connect_frees_its_slot_and_close_fails_the_waiters() -> None:
    async def scenario() -> None:
        net = FakeNet()
        attempts = 0

        async def flaky(conn: HttpConn) -> HttpConn:
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise ConnectionRefusedError
            return await net.connect(conn)

        pool = HttpPool("h", flaky, 1)
        with pytest.raises(ConnectionRefusedError):
            await pool.request(b"GET", b"/")
        assert pool.opened == 0
        busy = asyncio.create_task(pool.request(b"GET", b"/busy"))
        waiting = await started(pool, b"GET", b"/waiting")
        pool.close()
        with pytest.raises(HttpError, match="pool closed"):
            await waiting
        await net.answer(OK)
        assert (await busy)[:2] == (200, b"ok")  # a busy connection finishes its request
        await settle()
        assert net.wires[0].closing and pool.opened == 0  # then closes
        with pytest.raises(HttpError, match="pool closed"):
            await pool.request(b"GET", b"/")

    run(scenario())


# --- a tiny real server on 127.0.0.1 --------------------------------------------------------


class TinyServer:
    """Answers by path; counts connections; records (method, path, headers, body)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.connections = self.open = self.most_open = 0
        self.hung_up = asyncio.Event()  # a client closed a connection mid-request
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def connect(self) -> Callable[[HttpConn], Awaitable[HttpConn]]:
        """The pool's ``connect``, as the server opens node-to-node connections."""

        async def connect(conn: HttpConn) -> HttpConn:
            await asyncio.get_running_loop().create_connection(lambda: conn, "127.0.0.1", self.port)
            return conn

        return connect

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while await self.answer(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()

    async def answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection should close."""
        lines = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        method, path, _ = lines[0].split(" ")
        headers = {}
        for line in filter(None, lines[1:]):
            name, value = line.split(": ", 1)
            headers[name.lower()] = value
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        self.requests.append((method, path, headers, body))
        echo = method.encode() + b" " + body
        if path == "/slow":
            await asyncio.sleep(0.01)
        if path == "/hang":
            await reader.read()  # until the client gives up
            self.hung_up.set()
            return False
        if path == "/chunked":
            half = len(echo) // 2
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(
                b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                % (half, echo[:half], len(echo) - half, echo[half:])
            )
        elif path == "/until-close":
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + echo)
            return False
        else:
            if path == "/continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await writer.drain()
            close = b"Connection: close\r\n" if path == "/close" else b""
            writer.write(
                b"HTTP/1.1 201 Created\r\n%sContent-Length: %d\r\n\r\n" % (close, len(echo))
            )
            writer.write(echo)
            if close:
                return False
        await writer.drain()
        return True

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


def with_server(test: Callable[[TinyServer], Awaitable[None]]) -> None:
    async def scenario() -> None:
        server = TinyServer()
        await server.start()
        try:
            await test(server)
        finally:
            server.close()

    run(scenario())


def test_real_server_every_framing_on_one_keep_alive_connection() -> None:
    async def test(server: TinyServer) -> None:
        pool = HttpPool(f"127.0.0.1:{server.port}", server.connect(), 4)
        auth = b"Authorization: Bearer k\r\nContent-Type: application/json\r\n"
        for path, status in [("/echo", 201), ("/chunked", 200), ("/continue", 201)]:
            got = await pool.request(b"PUT", path.encode(), b'{"v":1}', auth)
            assert got[:2] == (status, b'PUT {"v":1}')
        assert (await pool.request(b"DELETE", b"/echo", headers=auth))[:2] == (201, b"DELETE ")
        assert server.connections == 1
        method, path, headers, body = server.requests[0]
        assert (method, path, body) == ("PUT", "/echo", b'{"v":1}')
        assert headers["authorization"] == "Bearer k"
        assert headers["host"] == f"127.0.0.1:{server.port}"
        assert "content-length" not in server.requests[-1][2]  # DELETE without a body

        for path in ("/close", "/until-close"):
            assert (await pool.request(b"POST", path.encode(), b"x"))[1] == b"POST x"
            await pool.request(b"GET", b"/echo")  # on a new connection
        assert server.connections == 3
        pool.close()

    with_server(test)


def test_real_server_a_timed_out_request_closes_its_connection() -> None:
    async def test(server: TinyServer) -> None:
        pool = HttpPool("t", server.connect(), 1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await pool.request(b"PUT", b"/hang", b"x")
        await server.hung_up.wait()  # the server saw the client close
        assert (await pool.request(b"PUT", b"/echo", b"y"))[:2] == (201, b"PUT y")
        assert server.connections == 2 and pool.opened == 1
        pool.close()

    with_server(test)


def test_real_server_pool_size_is_respected_and_waiters_served_in_order() -> None:
    async def test(server: TinyServer) -> None:
        pool = HttpPool("t", server.connect(), 3)
        bodies = [b"%d" % i for i in range(12)]
        results = await asyncio.gather(*(pool.request(b"PUT", b"/slow", b) for b in bodies))
        assert [answer for _, answer, _ in results] == [b"PUT " + b for b in bodies]
        assert server.connections == 3 and server.most_open == 3

        server.requests.clear()
        one = HttpPool("t", server.connect(), 1)
        await asyncio.gather(*(one.request(b"PUT", b"/slow", b) for b in bodies))
        assert [body for _, _, _, body in server.requests] == bodies
        assert server.connections == 4
        pool.close()
        one.close()

    with_server(test)
