"""The client side of the hop between nodes (peers.py) against a listener on 127.0.0.1.

Requests made in one loop turn share one connection and one write, and the
answers come back in order; a peer that breaks the connection, stalls or
answers something else is unreachable (None), which makes the router keep
the update stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import pytest

from simplepush import peers
from simplepush.peers import Peers
from simplepush.updates import Update

SECRET = "s3cret"
Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Listener"], Awaitable[None]]


class Listener:
    """A stand-in internal listener: what each connection's reads held, and a script to answer."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.reads: list[list[bytes]] = []  # per connection, each read as it came
        self.server: asyncio.Server | None = None
        self._serving: set[asyncio.Task] = set()

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reads.append([])
        self._serving.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await self.answer(reader, writer, self)
        finally:
            writer.close()

    async def requests(self, reader: asyncio.StreamReader, count: int) -> list[bytes]:
        """Read until `count` whole requests have come, keeping each read."""
        data = b""
        while data.count(b"\r\n\r\n") < count or not _whole(data, count):
            chunk = await reader.read(65536)
            assert chunk, "the client closed the connection"
            self.reads[-1].append(chunk)
            data += chunk
        return _split(data)

    async def stop(self) -> None:
        """Stop listening and end the connections still served."""
        assert self.server is not None
        self.server.close()
        for task in self._serving:
            task.cancel()
        await asyncio.gather(*self._serving, return_exceptions=True)
        await self.server.wait_closed()


def _split(data: bytes) -> list[bytes]:
    requests = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        requests.append(head + b"\r\n\r\n" + rest[:length])
        data = rest[length:]
    return requests


def _whole(data: bytes, count: int) -> bool:
    try:
        return len(_split(data)) >= count
    except (IndexError, ValueError):
        return False


def answer(status: int, reason: str, body: bytes = b"{}") -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def listening(script: Answer) -> tuple[Listener, str]:
    listener = Listener(script)
    return listener, await listener.start()


def update(version: int) -> Update:
    return Update("chid-spelling", version, None)


@pytest.mark.gen_test
async def test_pushes_made_in_one_loop_turn_go_out_in_one_write_and_get_their_own_answers():
    async def script(reader, writer, listener: Listener) -> None:
        await listener.requests(reader, 3)
        writer.write(
            answer(200, "OK") + answer(202, "Accepted", b'{"status":202}') + answer(404, "Not")
        )
        await writer.drain()
        await reader.read()  # until the client closes

    listener, url = await listening(script)
    client = Peers(SECRET)
    try:
        statuses = await asyncio.gather(
            *(client.push(url, f"uaid{n}", update(n)) for n in range(3))
        )
    finally:
        client.close()
        await listener.stop()
    assert statuses == [200, 202, 404]
    assert len(listener.reads) == 1 and len(listener.reads[0]) == 1
    requests = _split(listener.reads[0][0])
    host = url.removeprefix("http://")
    for n, request in enumerate(requests):
        fields = {"channelID": "chid-spelling", "version": n, "data": None}
        body = json.dumps(fields, separators=(",", ":"))
        assert (
            request
            == (
                f"PUT /push/uaid{n} HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: Bearer {SECRET}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )


@pytest.mark.gen_test
async def test_later_requests_reuse_the_one_connection():
    async def script(reader, writer, listener: Listener) -> None:
        for _ in range(2):
            await listener.requests(reader, 1)
            listener.reads[-1].clear()
            writer.write(answer(200, "OK"))
            await writer.drain()
        await reader.read()

    listener, url = await listening(script)
    client = Peers(SECRET)
    try:
        assert await client.push(url, "uaid", update(1)) == 200
        assert await client.kick(url, "uaid", 1000.5) is None
    finally:
        client.close()
        await listener.stop()
    assert len(listener.reads) == 1


@pytest.mark.gen_test
async def test_a_connection_the_peer_closed_is_replaced():
    """A peer worker that restarted closed its end: the next request opens a new one (or,
    if the close is not noticed before it is written, is sent again on a new one)."""
    served: list[int] = []

    async def script(reader, writer, listener: Listener) -> None:
        await listener.requests(reader, 1)
        served.append(len(listener.reads))
        writer.write(answer(200, "OK"))
        await writer.drain()

    listener, url = await listening(script)
    client = Peers(SECRET)
    try:
        assert await client.push(url, "uaid", update(1)) == 200
        await asyncio.sleep(0.05)  # the listener's close reaches the client meanwhile, or not
        assert await client.push(url, "uaid", update(2)) == 200
    finally:
        client.close()
        await listener.stop()
    assert served == [1, 2]


@pytest.mark.gen_test
async def test_a_peer_that_does_not_answer_in_time_is_unreachable_for_every_request_waiting(
    monkeypatch, caplog
):
    monkeypatch.setattr(peers, "TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING)

    async def script(reader, writer, listener: Listener) -> None:
        await listener.requests(reader, 2)
        await reader.read()  # never answers

    listener, url = await listening(script)
    client = Peers(SECRET)
    try:
        started = asyncio.get_running_loop().time()
        statuses = await asyncio.gather(
            client.push(url, "a", update(1)), client.push(url, "b", update(2))
        )
        waited = asyncio.get_running_loop().time() - started
    finally:
        client.close()
        await listener.stop()
    assert statuses == [None, None]
    assert 0.2 <= waited < 2.0
    unreachable = [r for r in caplog.records if r.getMessage() == "router.unreachable"]
    assert len(unreachable) == 2


async def answered_with(reply: bytes) -> tuple[int | None, bool]:
    """What one push gets from a peer that answers `reply`, and whether the client then
    dropped the connection."""
    dropped = asyncio.Event()

    async def script(reader, writer, listener: Listener) -> None:
        await listener.requests(reader, 1)
        writer.write(reply)
        await writer.drain()
        if await reader.read() == b"":
            dropped.set()

    listener, url = await listening(script)
    client = Peers(SECRET)
    try:
        status = await client.push(url, "uaid", update(1))
        await asyncio.wait_for(dropped.wait(), 2.0)
    finally:
        client.close()
        await listener.stop()
    return status, dropped.is_set()


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    ],
    ids=["no-content-length", "not-http", "http-1.0"],
)
@pytest.mark.gen_test
async def test_a_peer_that_answers_otherwise_is_unreachable_and_its_connection_dropped(reply):
    assert await answered_with(reply) == (None, True)


@pytest.mark.gen_test
async def test_an_answer_to_no_request_drops_the_connection():
    assert await answered_with(answer(200, "OK") + answer(200, "OK")) == (200, True)


@pytest.mark.gen_test
async def test_a_peer_that_is_not_listening_is_unreachable(caplog):
    caplog.set_level(logging.WARNING)
    listener, url = await listening(lambda reader, writer, listener: asyncio.sleep(0))
    await listener.stop()
    client = Peers(SECRET)
    try:
        assert await client.push(url, "uaid", update(1)) is None
    finally:
        client.close()
    [record] = [r for r in caplog.records if r.getMessage() == "router.unreachable"]
    assert record.fields["node"] == url
    assert record.fields["error"].startswith("cannot connect: ")
