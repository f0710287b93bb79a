"""WebPush across real processes: `processes = 2` workers on one port and a real memcached.

As tests/test_cluster.py (whose Server, processes and waits these are),
with debug logging so that each worker's account of every POST
(`webpush.received`: delivered here, or routed to the other worker) can be
checked. Which worker serves a TCP connection is read from /proc: the
server side of the connection is a socket in exactly one worker's fd table.
App servers are raw HTTP (http.client), v1 endpoints (no VAPID), bodies
sent as aes128gcm; devices are websocket-client sockets speaking WebPush.
Every process is killed at teardown and every wait is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import signal
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import websocket

from simplepush.webpush import MAX_BODY
from tests.conftest import new_id
from tests.test_cluster import (  # noqa: F401 (cluster, memcached_proc, token_key: fixtures)
    EXIT_TIMEOUT,
    IO_TIMEOUT,
    SUPERSEDED,
    Device,
    Response,
    Server,
    cluster,
    gone,
    memcached_proc,
    token_key,
    wait_until,
    worker_pids,
)

# Connections opened to find one that the kernel gives to a given worker (about half do).
LANDING_ATTEMPTS = 64
# How often /proc is looked at for an accepted connection (a worker's fd scan is cheap).
PROC_POLL = 0.005


# --- processes ---------------------------------------------------------------------------


@pytest.fixture
def two_workers(request: pytest.FixtureRequest) -> Callable[[], Server]:
    """two_workers() -> a started server of two workers on the test's memcached, logging at
    debug (each POST's outcome is read from the log); tests/test_cluster.py's `cluster`."""
    start = request.getfixturevalue("cluster")
    return lambda: start(processes=2, level="debug")


def _proc_address(port: int) -> str:
    """127.0.0.1:port as /proc/net/tcp spells it (the address in host byte order, hex)."""
    address = int.from_bytes(socket.inet_aton("127.0.0.1"), sys.byteorder)
    return f"{address:08X}:{port:04X}"


def _server_side_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the server's end of an established connection from client_port."""
    local, remote = _proc_address(server_port), _proc_address(client_port)
    with open("/proc/net/tcp", encoding="ascii") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[1] == local and fields[2] == remote and fields[3] == "01":  # ESTABLISHED
                return int(fields[9])
    return None


def _holding(pid: int, target: str) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        with contextlib.suppress(OSError):
            if os.readlink(fd) == target:
                return True
    return False


def _poll(condition: Callable[[], Any], what: str) -> Any:
    """condition()'s first truthy value, polled for at most IO_TIMEOUT."""
    deadline = time.monotonic() + IO_TIMEOUT
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"waited {IO_TIMEOUT} s for {what}")
        time.sleep(PROC_POLL)
    return value


def worker_of(server: Server, sock: socket.socket) -> int:
    """The index of the worker that accepted this client socket (waits for the accept).

    The server's end of the connection is in /proc/net/tcp from the handshake on, and a
    socket in exactly one worker's fd table once that worker accepted it."""
    client_port = sock.getsockname()[1]
    workers = worker_pids(server)
    inode = _poll(
        lambda: _server_side_inode(server.port, client_port),
        f"the connection from :{client_port} in /proc/net/tcp",
    )
    target = f"socket:[{inode}]"
    found = _poll(
        lambda: [index for index, pid in workers.items() if _holding(pid, target)],
        f"a worker to accept the connection from :{client_port}",
    )
    assert len(found) == 1, found
    return found[0]


# --- app servers ----------------------------------------------------------------------------


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def bodies(count: int) -> list[bytes]:
    """Distinct bodies: an empty one, the largest, and small ones in between."""
    made = [b"", os.urandom(MAX_BODY)]
    made += [f"{i}:".encode() + os.urandom(i % 97) for i in range(2, count)]
    return made[:count]


def post(
    server: Server, endpoint: str, body: bytes, ttl: int, identify: bool = True
) -> tuple[Response, int | None]:
    """POST a message through the public port on a fresh connection: the answer, and the
    index of the worker the kernel gave the connection to (None unless identify)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=IO_TIMEOUT)
    try:
        conn.connect()
        worker = worker_of(server, conn.sock) if identify else None
        headers = {
            "TTL": str(ttl),
            "Content-Encoding": "aes128gcm",
            "Content-Type": "application/octet-stream",
        }
        conn.request("POST", urlsplit(endpoint).path, body=body, headers=headers)
        response = conn.getresponse()
        return Response(response.status, response.read(), response.headers), worker
    finally:
        conn.close()


def assert_created(server: Server, response: Response, ttl: int) -> None:
    """201, empty, TTL echoed, and a Location for DELETE on this server."""
    location = response.headers.get("Location", "")
    assert (response.status, response.body, response.headers.get("TTL")) == (201, b"", str(ttl))
    assert location.startswith(server.url("/m/")) and len(location) > len(server.url("/m/"))


def notification(chid: str, ttl: int, body: bytes) -> dict[str, Any]:
    """What the device must get for a POST, less the opaque `version`."""
    frame: dict[str, Any] = {"messageType": "notification", "channelID": chid, "ttl": ttl}
    if body:
        frame["data"] = b64url(body)
        frame["headers"] = {"encoding": "aes128gcm"}
    return frame


def outcomes(server: Server, count: int) -> Counter[tuple[int, int, str]]:
    """(worker pid, status, outcome) of the current run's `webpush.received` records, once
    `count` of them are written."""
    wait_until(
        lambda: len(server.records("webpush.received")) >= count,
        IO_TIMEOUT,
        f"{count} webpush.received records",
        server,
    )
    records = server.records("webpush.received")
    assert len(records) == count, records
    return Counter((r["Pid"], r["Fields"]["status"], r["Fields"]["outcome"]) for r in records)


# --- devices --------------------------------------------------------------------------------


class Phone(Device):
    """A WebPush device: test_cluster's Device with WebPush's hello, register and ack."""

    def __init__(self, server: Server) -> None:
        super().__init__(server)
        self.server = server

    def hello(self, uaid: str = "") -> None:  # type: ignore[override]
        frame: dict[str, Any] = {"messageType": "hello", "use_webpush": True}
        if uaid:
            frame["uaid"] = uaid
        reply = self.request(frame)
        self.uaid = reply.get("uaid", "")
        assert reply == {
            "messageType": "hello",
            "uaid": self.uaid,
            "status": 200,
            "use_webpush": True,
            "broadcasts": {},
        }
        assert len(self.uaid) == 32 and set(self.uaid) <= set("0123456789abcdef"), self.uaid

    def register(self, chid: str) -> str:
        reply = self.request({"messageType": "register", "channelID": chid})
        endpoint = reply.get("pushEndpoint", "")
        assert reply == {
            "messageType": "register",
            "channelID": chid,
            "status": 200,
            "uaid": self.uaid,
            "pushEndpoint": endpoint,
        }
        prefix = self.server.url("/wpush/v1/")
        assert endpoint.startswith(prefix) and len(endpoint) > len(prefix), endpoint
        return endpoint

    def receive(self, expected: list[dict[str, Any]]) -> list[str]:
        """Exactly the expected notifications, in order, then nothing: their versions."""
        frames = [self.recv() for _ in expected]
        versions = [frame.pop("version", None) for frame in frames]
        assert frames == expected
        assert all(type(v) is str and v for v in versions), versions
        assert len(set(versions)) == len(versions), versions
        self.expect_silence()
        return versions

    def ack(self, chid: str, versions: list[str]) -> None:  # type: ignore[override]
        """Ack every version, then ping: frames are handled in order, so the answer means
        the acks are done."""
        updates = [{"channelID": chid, "version": v, "code": 100} for v in versions]
        self.send({"messageType": "ack", "updates": updates})
        assert self.request("{}") == {}


@pytest.fixture
def phones():
    """phones(server) -> a new Phone on the public port; all closed at teardown."""
    opened: list[Phone] = []

    def _open(server: Server) -> Phone:
        phone = Phone(server)
        opened.append(phone)
        return phone

    yield _open
    for phone in opened:
        with contextlib.suppress(websocket.WebSocketException, OSError):
            phone.ws.close(timeout=0)


def phone_on(phones, server: Server, worker: int) -> Phone:
    """A new Phone that the kernel gave to that worker (others opened on the way are closed)."""
    for _ in range(LANDING_ATTEMPTS):
        phone = phones(server)
        if worker_of(server, phone.ws.sock) == worker:
            return phone
        phone.ws.close(timeout=0)
    pytest.fail(f"{LANDING_ATTEMPTS} connections and none on worker {worker}")


# --- routing between workers ------------------------------------------------------------


def test_posts_landing_on_either_worker_reach_the_device_exactly_once_in_order(two_workers, phones):
    """The kernel spreads POSTs over both workers: those on the device's worker are
    delivered there, the others routed to it. Every one is 201 and arrives once, in order,
    with its exact body; acked, nothing comes again on a new socket."""
    server = two_workers()
    workers = worker_pids(server)
    device = phones(server)
    device.hello()
    chid = new_id()
    endpoint = device.register(chid)
    home = worker_of(server, device.ws.sock)

    sent = bodies(40)
    landed = []
    for i, body in enumerate(sent):
        response, worker = post(server, endpoint, body, ttl=60 + i)
        assert_created(server, response, 60 + i)
        landed.append(worker)
    versions = device.receive([notification(chid, 60 + i, b) for i, b in enumerate(sent)])

    routed = sum(1 for worker in landed if worker != home)
    assert 0 < routed < len(sent), landed  # about half: both paths were taken
    expected = Counter((workers[w], 201, "delivered" if w == home else "routed") for w in landed)
    assert outcomes(server, len(sent)) == expected

    device.ack(chid, versions)
    device.disconnect()
    again = phones(server)
    again.hello(device.uaid)
    assert again.uaid == device.uaid
    again.expect_silence()


def test_the_newest_connection_wins_across_workers(two_workers, phones):
    """A second socket with the same uaid on the other worker takes the device: the first
    is closed with 4000 and every later message, on either worker, goes to the new one."""
    server = two_workers()
    workers = worker_pids(server)
    old = phones(server)
    old.hello()
    chid = new_id()
    endpoint = old.register(chid)
    home = worker_of(server, old.ws.sock)
    new = phone_on(phones, server, 1 - home)
    new.hello(old.uaid)
    assert new.uaid == old.uaid
    assert old.expect_close() == SUPERSEDED

    sent = bodies(20)
    landed = []
    for body in sent:
        response, worker = post(server, endpoint, body, ttl=120)
        assert_created(server, response, 120)
        landed.append(worker)
    versions = new.receive([notification(chid, 120, body) for body in sent])
    expected = Counter(
        (workers[w], 201, "delivered" if w == 1 - home else "routed") for w in landed
    )
    assert outcomes(server, len(sent)) == expected
    new.ack(chid, versions)
    assert new.answers_ping()


# --- kill -9 ----------------------------------------------------------------------------------


def test_messages_answered_201_survive_kill_9_of_the_whole_server(two_workers, phones):
    """Messages for an offline device are in memcached before the 201: after kill -9 of
    the supervisor and both workers and a restart, the device says hello with its uaid,
    keeps it, and gets every one exactly once, in order; acked, they are gone for good."""
    server = two_workers()
    device = phones(server)
    device.hello()
    chid = new_id()
    endpoint = device.register(chid)
    uaid = device.uaid
    device.disconnect()

    sent = bodies(30)
    for i, body in enumerate(sent):
        response, _ = post(server, endpoint, body, ttl=3600 + i, identify=False)
        assert_created(server, response, 3600 + i)
    assert {(status, outcome) for _, status, outcome in outcomes(server, len(sent))} == {
        (201, "stored")
    }

    pids = {server.proc.pid, *worker_pids(server).values()}
    os.killpg(server.proc.pid, signal.SIGKILL)
    wait_until(lambda: all(gone(pid) for pid in pids), EXIT_TIMEOUT, f"{pids} to die")
    assert server.proc.wait(timeout=EXIT_TIMEOUT) == -signal.SIGKILL
    server.launch()  # the same config: the same ports and memcached
    assert pids.isdisjoint(worker_pids(server).values())

    again = phones(server)
    again.hello(uaid)
    assert again.uaid == uaid
    versions = again.receive([notification(chid, 3600 + i, b) for i, b in enumerate(sent)])
    again.ack(chid, versions)
    again.disconnect()

    last = phones(server)
    last.hello(uaid)
    assert last.uaid == uaid
    last.expect_silence()
    # The channel is still registered: a new message is delivered, once.
    response, _ = post(server, endpoint, b"after", ttl=30, identify=False)
    assert_created(server, response, 30)
    last.receive([notification(chid, 30, b"after")])
