"""`processes = 2` on sqlite (issue 12): two workers behind one port, one database file.

As tests/test_cluster_webpush.py does on memcached: real `simplepush
--config` processes logging at debug, devices on websocket-client sockets
(SimplePush and WebPush), app servers on raw http.client connections, and
the worker serving a TCP connection read from /proc. An update reaching the
worker that does not hold the device is routed to the one that does; the
newest connection wins across workers; a worker killed with SIGKILL is
replaced by the supervisor, and its devices, reconnecting, get everything
stored meanwhile. Every process is killed at teardown and every wait is
bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import websocket

from tests.conftest import new_id
from tests.test_cluster import (
    EXIT_TIMEOUT,
    IO_TIMEOUT,
    RECOVERY_TIMEOUT,
    SILENCE,
    SUPERSEDED,
    Device,
    Server,
    children,
    gone,
    notification,
    wait_until,
    worker_pids,
)
from tests.test_cluster_webpush import (
    LANDING_ATTEMPTS,
    Phone,
    _holding,
    _poll,
    _server_side_inode,
    bodies,
)
from tests.test_cluster_webpush import notification as message
from tests.test_crash import request, servers, storage_section  # noqa: F401

D = TypeVar("D", bound=Device)
COUNT = 30  # updates per device in the routing tests
TTL = 120
KINDS = (Device,) * 3 + (Phone,) * 3  # the devices put on each worker in the kill test


# --- processes and devices --------------------------------------------------------------


@pytest.fixture
def cluster(servers: Callable[..., Server], tmp_path: Path) -> Callable[[], Server]:  # noqa: F811
    """cluster() -> a started `processes = 2` server on a fresh sqlite file, logging at
    debug; every process is killed at teardown."""
    return lambda: servers(storage_section("sqlite", tmp_path, None), 2, "debug")


@pytest.fixture
def sockets() -> Iterator[Callable[[type[D], Server], D]]:
    """sockets(Device or Phone, server) -> a new device socket; all closed at teardown."""
    opened: list[Device] = []

    def _open(kind: type[D], server: Server) -> D:
        device = kind(server)
        opened.append(device)
        return device

    yield _open
    for device in opened:
        with contextlib.suppress(websocket.WebSocketException, OSError):
            device.ws.close(timeout=0)


def worker_of(server: Server, sock: socket.socket) -> int:
    """The index of the worker that accepted this client socket (waits for the accept).

    As tests/test_cluster_webpush.py's, but the workers are read again at every look: a
    connection queued on a dead worker's socket is accepted by its replacement."""
    client_port = sock.getsockname()[1]
    inode = _poll(
        lambda: _server_side_inode(server.port, client_port),  # 0 until accepted
        f"the connection from :{client_port} to be accepted",
    )
    target = f"socket:[{inode}]"

    def holders() -> list[int]:
        return [i for i, pid in worker_pids(server).items() if _holding(pid, target)]

    found = _poll(holders, f"a worker holding the connection from :{client_port}")
    assert len(found) == 1, found
    return found[0]


def landed(sockets, kind: type[D], server: Server, worker: int) -> D:
    """A new socket that the kernel gave to that worker (others opened on the way closed)."""
    for _ in range(LANDING_ATTEMPTS):
        device = sockets(kind, server)
        if worker_of(server, device.ws.sock) == worker:
            return device
        device.ws.close(timeout=0)
    pytest.fail(f"{LANDING_ATTEMPTS} connections and none on worker {worker}")


def send(server: Server, endpoint: str, value: int | bytes) -> tuple[int, int]:
    """A PUT (int: version=value) or a POST (bytes: the body, TTL, aes128gcm) through the
    public port on a fresh connection: the status, and which worker the kernel gave it to."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=IO_TIMEOUT)
    try:
        conn.connect()
        worker = worker_of(server, conn.sock)
        request(conn, endpoint, value, TTL)
        response = conn.getresponse()
        body = response.read()
        assert body == (b"{}" if isinstance(value, int) else b""), (response.status, body)
        return response.status, worker
    finally:
        conn.close()


def outcomes(server: Server, type_: str, count: int) -> Counter[tuple[int, int, str]]:
    """(worker pid, status, outcome) of the current run's `type_` records (update.received
    or webpush.received), once `count` of them are written."""
    wait_until(lambda: len(server.records(type_)) >= count, IO_TIMEOUT, f"{count} {type_}", server)
    records = server.records(type_)
    assert len(records) == count, records
    return Counter((r["Pid"], r["Fields"]["status"], r["Fields"]["outcome"]) for r in records)


def expected_outcomes(
    server: Server, landed_on: list[int], home: int, status: int
) -> Counter[tuple[int, int, str]]:
    """Delivered by the worker holding the device, routed by the other."""
    workers = worker_pids(server)
    return Counter((workers[w], status, "delivered" if w == home else "routed") for w in landed_on)


@dataclass
class Held:
    """A device's current socket and its channels (chid -> endpoint, in the order made)."""

    socket: Device
    endpoints: dict[str, str]

    @property
    def chids(self) -> list[str]:
        return list(self.endpoints)


def held_on(sockets, kind: type[Device], server: Server, worker: int, channels: int) -> Held:
    """A new device on that worker, with a new uaid and `channels` registered channels."""
    device = landed(sockets, kind, server, worker)
    device.hello()
    return Held(
        device, {chid: device.register(chid) for chid in (new_id() for _ in range(channels))}
    )


def reconnect(sockets, held: Held, server: Server) -> None:
    """The same device on a new socket through the port; its uaid must be echoed."""
    old = held.socket
    if isinstance(old, Phone):
        held.socket = sockets(Phone, server)
        held.socket.hello(old.uaid)
    else:
        held.socket = sockets(Device, server)
        held.socket.hello(old.uaid, held.chids)
    assert held.socket.uaid == old.uaid


def values_for(kind: type[Device]) -> list[int | bytes]:
    """COUNT versions for SimplePush, COUNT distinct bodies for WebPush (new each call)."""
    return list(range(1, COUNT + 1)) if kind is Device else list(bodies(COUNT))


def expect(held: Held, chid: str, values: list[int | bytes]) -> None:
    """Exactly these updates of one channel are the next frames, in order; all acked. The
    ack ends with a ping whose answer must come next: nothing else was sent before it."""
    device = held.socket
    frames = [device.recv() for _ in values]
    if isinstance(device, Phone):
        versions = [frame.pop("version", None) for frame in frames]
        assert frames == [message(chid, TTL, value) for value in values]  # type: ignore[arg-type]
        assert len(set(versions)) == len(versions) and all(versions), versions
        device.ack(chid, versions)
    else:
        assert frames == [notification((chid, value)) for value in values]
        device.ack((chid, values[-1]))


def all_silent(held: list[Held]) -> None:
    """One SILENCE for all: then no socket has a frame waiting (nothing came twice)."""
    time.sleep(SILENCE)
    for h in held:
        h.socket.ws.settimeout(SILENCE / 10)
        try:
            text = h.socket.next_text()
        except websocket.WebSocketTimeoutException:
            continue
        finally:
            h.socket.ws.settimeout(IO_TIMEOUT)
        pytest.fail(f"{h.socket.uaid}: expected no frame, got {text!r}")


# --- routing --------------------------------------------------------------------------------


def test_puts_and_posts_through_one_port_reach_either_worker_once_in_order(cluster, sockets):
    """A SimplePush device on worker 0 and a WebPush one on worker 1; the kernel spreads
    the requests over both workers, so each device gets some delivered by its own worker
    and some routed from the other: every one 2xx and received once, in order; acked,
    nothing comes again on a new socket."""
    server = cluster()
    sp = held_on(sockets, Device, server, 0, channels=1)
    wp = held_on(sockets, Phone, server, 1, channels=1)
    sent = {200: (sp, values_for(Device)), 201: (wp, values_for(Phone))}
    landed_on: dict[int, list[int]] = {}
    for status, (h, values) in sent.items():
        answers = [send(server, h.endpoints[h.chids[0]], value) for value in values]
        assert {s for s, _ in answers} == {status}
        landed_on[status] = [w for _, w in answers]
        assert 0 < sum(landed_on[status]) < COUNT, landed_on  # both workers took some
    for h, values in sent.values():
        expect(h, h.chids[0], values)
    all_silent([sp, wp])
    puts, posts = landed_on[200], landed_on[201]
    assert outcomes(server, "update.received", COUNT) == expected_outcomes(server, puts, 0, 200)
    assert outcomes(server, "webpush.received", COUNT) == expected_outcomes(server, posts, 1, 201)

    for h in (sp, wp):
        h.socket.disconnect()
        reconnect(sockets, h, server)
    all_silent([sp, wp])


@pytest.mark.parametrize("kind", [Device, Phone], ids=["simplepush", "webpush"])
def test_the_newest_connection_wins_across_workers(cluster, sockets, kind):
    """A second socket with the same uaid on the other worker takes the device: the first
    is closed with 4000, and every later update, whichever worker it lands on, goes to the
    new one, in order."""
    server = cluster()
    held = held_on(sockets, kind, server, 0, channels=1)
    [chid] = held.chids
    old = held.socket
    for _ in range(LANDING_ATTEMPTS):
        reconnect(sockets, held, server)
        if worker_of(server, held.socket.ws.sock) == 1:
            break
        held.socket.disconnect()  # on worker 0 again: try another socket
    else:
        pytest.fail(f"{LANDING_ATTEMPTS} connections and none on worker 1")
    assert old.expect_close() == SUPERSEDED

    values = values_for(kind)
    answers = [send(server, held.endpoints[chid], value) for value in values]
    status = 200 if kind is Device else 201
    assert {s for s, _ in answers} == {status}
    landed_on = [w for _, w in answers]
    assert 0 < sum(landed_on) < COUNT, landed_on
    expect(held, chid, values)
    all_silent([held])
    type_ = "update.received" if kind is Device else "webpush.received"
    assert outcomes(server, type_, COUNT) == expected_outcomes(server, landed_on, 1, status)
    assert held.socket.answers_ping()


# --- a worker killed ----------------------------------------------------------------------


def test_a_killed_worker_is_replaced_and_its_devices_get_what_was_stored_meanwhile(
    cluster, sockets
):
    """Devices of both protocols on both workers; worker 0 gets SIGKILL. Updates sent
    while it is dead and after the supervisor replaced it are delivered to the devices on
    worker 1 and stored for those of worker 0, which reconnect with their uaid and get
    every one; then the replacement takes its share of the port like any worker."""
    server = cluster()
    supervisor = server.proc.pid
    workers = worker_pids(server)
    # SimplePush devices have a channel per round (a channel keeps only its newest version).
    held = {
        w: [held_on(sockets, kind, server, w, 3 if kind is Device else 1) for kind in KINDS]
        for w in (0, 1)
    }
    everyone = [h for w in (0, 1) for h in held[w]]

    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: gone(victim), EXIT_TIMEOUT, f"worker {victim} to die")
    assert [h.socket.answers_ping() for h in everyone] == [False] * len(KINDS) + [True] * len(KINDS)

    def value(h: Held, round_: int) -> int | bytes:
        """SimplePush: version round + 1 on channel `round`; WebPush: a distinct body."""
        if isinstance(h.socket, Phone):
            return f"{round_}:{everyone.index(h)}".encode()
        return round_ + 1

    def channel(h: Held, round_: int) -> str:
        return h.chids[round_ if len(h.chids) > 1 else 0]

    def send_round(round_: int, orphans_offline: bool) -> list[int]:
        """One update to every device; the answers checked; the workers they landed on."""
        on = []
        for w in (0, 1):
            for h in held[w]:
                status, worker = send(server, h.endpoints[channel(h, round_)], value(h, round_))
                if isinstance(h.socket, Phone):
                    assert status == 201
                else:
                    assert status == (202 if orphans_offline and w == 0 else 200), (w, round_)
                on.append(worker)
        return on

    # While worker 0 is dead or being replaced.
    send_round(0, orphans_offline=True)
    for h in held[1]:
        expect(h, channel(h, 0), [value(h, 0)])
    wait_until(
        lambda: (
            len(children(supervisor) - {workers[1]}) == 1
            and [r["Fields"]["worker"] for r in server.records("server.start")].count(0) == 2
        ),
        RECOVERY_TIMEOUT,
        "a replacement worker 0",
        server,
    )
    [replacement] = children(supervisor) - {workers[1]}
    assert replacement != victim and worker_pids(server) == {0: replacement, 1: workers[1]}
    died = [r["Fields"] for r in server.records("worker.died")]
    assert died == [{"index": 0, "pid": victim, "exit_code": -signal.SIGKILL}]
    after = send_round(1, orphans_offline=True)
    for h in held[1]:
        expect(h, channel(h, 1), [value(h, 1)])

    # The orphans come back through the port, wherever they land, and get both rounds.
    for h in held[0]:
        reconnect(sockets, h, server)
        device = h.socket
        if isinstance(device, Phone):
            expect(h, h.chids[0], [value(h, 0), value(h, 1)])
            continue
        flush = device.recv()
        flush["updates"].sort(key=lambda update: h.chids.index(update["channelID"]))
        assert flush == notification((h.chids[0], 1), (h.chids[1], 2))
        device.ack((h.chids[0], 1), (h.chids[1], 2))

    # Everyone connected again: delivered or routed.
    after += send_round(2, orphans_offline=False)
    assert 0 < sum(after) < len(after), after  # the replacement took its share of both
    for h in everyone:
        expect(h, channel(h, 2), [value(h, 2)])
    all_silent(everyone)
    assert server.proc.poll() is None
