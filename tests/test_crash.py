"""kill -9 under load (issue 12): nothing answered 2xx is lost, nothing else invented.

A real `simplepush --config` on a durable backend (sqlite; memcached too,
the other persistent one) takes SimplePush PUTs and WebPush POSTs from
sender threads, for devices of which half stay connected (reconnecting
with their uaid after every crash, acking as they go) and half are
offline. Meanwhile the whole server is killed with SIGKILL at a random
moment, several times, and restarted on the same database. A checker
records every request and its answer and every notification a device saw.
After the last restart every device says hello with its uaid (which must
be echoed), collects until quiet and acks; then:

- every SimplePush channel gets a version >= its highest one answered
  200/202, and every WebPush body answered 201 arrives (acked before a
  kill counts; it need not come again);
- nothing arrives that was never sent or was answered otherwise (a request
  cut by the kill, unanswered, may or may not have been stored);
- once acked with no crash in between, nothing comes again.

The RNG seed is printed; SIMPLEPUSH_CRASH_SEED=<seed> replays its choices
(thread timing still varies). Every wait polls and is bounded.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import random
import signal
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import websocket

from simplepush.tokens import generate_key
from tests.conftest import Memcached, free_port, new_id
from tests.test_cluster import (
    EXIT_TIMEOUT,
    IO_TIMEOUT,
    START_TIMEOUT,
    Device,
    Server,
    children,
    free_ports,
    gone,
    wait_until,
)
from tests.test_cluster_webpush import Phone

SIMPLEPUSH, WEBPUSH = "simplepush", "webpush"
DEVICES = 20  # of each protocol; the first half stay connected
CHANNELS = 2  # per device
KILLS = 4
SENDERS = 8  # threads, each owning its share of the channels (one request at a time each)
TTL = 300
# Answers accepted by a run before it is killed, so that every kill falls under load.
LOAD_PER_RUN = 60
# The kill comes this long (uniformly drawn) after that.
KILL_DELAY = (0.0, 0.5)
QUIET = 0.5  # a device has collected everything after this long without a frame
POLL = 0.01  # how often a wait looks again (a refused connect, a device's socket)
SEED_VARIABLE = "SIMPLEPUSH_CRASH_SEED"
SP_ACCEPTED = (200, 202)
WP_ACCEPTED = (201,)


# --- servers -----------------------------------------------------------------------------


def storage_section(backend: str, directory: Path, memcached: Memcached | None) -> str:
    """The [storage] lines for a durable backend."""
    if backend == "sqlite":
        return f"backend = sqlite\npath = {directory / 'simplepush.db'}\n"
    assert memcached is not None
    return f"backend = memcached\nservers = {memcached.address}\ntimeout = 1\n"


def write_config(
    directory: Path,
    name: str,
    storage: str,
    processes: int,
    token_key: str,
    level: str,
    extra: str = "",
) -> Server:
    """A config for a server on free ports, `extra` sections last; the Server, not launched."""
    port, router_port = free_port(), free_ports(processes)
    log = directory / f"{name}.log"
    config = directory / f"{name}.ini"
    config.write_text(
        "[server]\n"
        f"port = {port}\n"
        f"endpoint_url = http://127.0.0.1:{port}\n"
        f"processes = {processes}\n"
        "max_connections = 1000\n"
        f"token_key = {token_key}\n"
        f"router_port = {router_port}\n"
        f"[storage]\n{storage}"
        f"[logging]\noutput = {log}\nlevel = {level}\n"
        "[admin]\nport = 0\n"
        f"{extra}",
        encoding="utf-8",
    )
    return Server(config, port, router_port, processes, log, directory / f"{name}.stderr")


def status_ok(server: Server) -> bool:
    """The port accepts and /status answers 200."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=IO_TIMEOUT)
    try:
        conn.request("GET", "/status")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def start(server: Server) -> None:
    """Launch (every worker logged server.start) and wait until /status answers."""
    server.launch()
    wait_until(lambda: status_ok(server), START_TIMEOUT, "/status to answer 200", server)


def kill_9(server: Server) -> None:
    """SIGKILL the server's whole process group; returns once every process is gone."""
    pids = {server.proc.pid, *children(server.proc.pid)}
    os.killpg(server.proc.pid, signal.SIGKILL)
    wait_until(lambda: all(gone(pid) for pid in pids), EXIT_TIMEOUT, f"{pids} to die")
    assert server.proc.wait(timeout=EXIT_TIMEOUT) == -signal.SIGKILL


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """servers(storage, processes=1, level="info", extra="") -> a started Server, all with one
    new token key, `extra` config sections added; every process is killed at teardown."""
    made: list[Server] = []
    token_key = generate_key()

    def _start(storage: str, processes: int = 1, level: str = "info", extra: str = "") -> Server:
        name = f"node{len(made)}"
        server = write_config(tmp_path, name, storage, processes, token_key, level, extra)
        made.append(server)
        start(server)
        return server

    yield _start
    for server in made:
        server.kill_all()


# --- devices --------------------------------------------------------------------------


@dataclass
class Handset:
    """A device that outlives its sockets: its uaid, channels and endpoints."""

    kind: str
    online: bool
    uaid: str = ""
    endpoints: dict[str, str] = field(default_factory=dict)  # chid -> endpoint

    def connect(self, server: Server) -> Device:
        """A new socket that said hello; a known uaid must be echoed (the store kept it).

        A SimplePush hello lists the channels, so a uaid the server forgot is reset
        rather than silently recreated.
        """
        if self.kind == SIMPLEPUSH:
            device = Device(server)
            device.hello(self.uaid, list(self.endpoints))
        else:
            device = Phone(server)
            device.hello(self.uaid)
            assert not self.uaid or device.uaid == self.uaid, (self.uaid, device.uaid)
        self.uaid = device.uaid
        return device

    def register(self, server: Server) -> None:
        """Say hello with a new uaid and register CHANNELS channels; the socket is closed."""
        device = self.connect(server)
        for _ in range(CHANNELS):
            chid = new_id()
            self.endpoints[chid] = device.register(chid)
        device.disconnect()


# --- the checker -------------------------------------------------------------------------


@dataclass
class Checker:
    """Every request with its answer (None: cut by a kill) and every notification seen."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    versions: dict[str, dict[int, int | None]] = field(
        default_factory=lambda: defaultdict(dict)
    )  # chid -> version -> status
    bodies: dict[bytes, tuple[str, int | None]] = field(default_factory=dict)  # chid, status
    owner: dict[str, Handset] = field(default_factory=dict)  # chid -> its device
    seen_versions: list[tuple[str, str, int]] = field(default_factory=list)  # uaid, chid, v
    seen_bodies: list[tuple[str, str, bytes]] = field(default_factory=list)  # uaid, chid, body
    acked_versions: dict[str, int] = field(default_factory=dict)  # chid -> highest acked
    acked_bodies: set[bytes] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    run: int = 0  # kills so far: which run of the server a request went to
    runs: dict[tuple[str, int | bytes], int] = field(default_factory=dict)

    def killed(self) -> None:
        with self.lock:
            self.run += 1

    def answered(self, chid: str, value: int | bytes, status: int | None) -> None:
        with self.lock:
            self.runs[chid, value] = self.run
            if isinstance(value, int):
                self.versions[chid][value] = status
            else:
                self.bodies[value] = (chid, status)

    def accepted(self) -> int:
        """How many answers so far were 2xx."""
        with self.lock:
            sp = sum(s in SP_ACCEPTED for v in self.versions.values() for s in v.values())
            return sp + sum(s in WP_ACCEPTED for _, s in self.bodies.values())

    def problem(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)

    def take(self, handset: Handset, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """Record a notification; the acks it calls for (to be confirmed by `acked`)."""
        with self.lock:
            if frame.get("messageType") != "notification":
                self.problems.append(f"{handset.kind} {handset.uaid}: unexpected {frame}")
                return []
            if handset.kind == SIMPLEPUSH:
                updates = frame.get("updates", [])
                for update in updates:
                    self.seen_versions.append(
                        (handset.uaid, update["channelID"], update["version"])
                    )
                    if set(update) != {"channelID", "version"}:
                        self.problems.append(f"{handset.uaid}: odd update {update}")
                return [{"channelID": u["channelID"], "version": u["version"]} for u in updates]
            chid = frame.get("channelID", "")
            body = base64url_decode(frame.get("data", ""))
            self.seen_bodies.append((handset.uaid, chid, body))
            shape = {k: v for k, v in frame.items() if k not in ("version", "data")}
            expected = {"messageType": "notification", "channelID": chid, "ttl": TTL}
            if body:
                expected["headers"] = {"encoding": "aes128gcm"}
            if shape != expected:
                self.problems.append(f"{handset.uaid}: odd notification {frame}")
            return [{"channelID": chid, "version": frame.get("version"), "code": 100}]

    def acked(self, handset: Handset, updates: list[dict[str, Any]], frame: dict[str, Any]) -> None:
        """The acks for `frame` were written to the socket."""
        with self.lock:
            if handset.kind == WEBPUSH:
                self.acked_bodies.add(base64url_decode(frame.get("data", "")))
                return
            for update in updates:
                chid, version = update["channelID"], update["version"]
                self.acked_versions[chid] = max(version, self.acked_versions.get(chid, version))

    def verdict(self) -> list[str]:
        """Every way the run broke the contract, precisely."""
        found = list(self.problems)
        for uaid, chid, version in self.seen_versions:
            handset = self.owner.get(chid)
            if handset is None or handset.uaid != uaid:
                found.append(f"SimplePush {uaid} got channel {chid} it does not own")
                continue
            status = self.versions[chid].get(version, "never sent")
            if status is not None and status not in SP_ACCEPTED:
                found.append(f"SimplePush {chid} got version {version}, answered {status}")
        for chid, answers in self.versions.items():
            accepted = [v for v, s in answers.items() if s in SP_ACCEPTED]
            got = self.acked_versions.get(chid, 0)
            if accepted and got < max(accepted):
                top = max(accepted)
                found.append(
                    f"SimplePush {chid} lost: highest accepted {top} ({answers[top]} in run"
                    f" {self.runs[chid, top]} of {self.run + 1}), highest received and acked"
                    f" {got or None}; received"
                    f" {sorted(v for _, c, v in self.seen_versions if c == chid)}"
                )
        for uaid, chid, body in self.seen_bodies:
            sent_to, status = self.bodies.get(body, ("", "never sent"))
            if sent_to != chid or self.owner[chid].uaid != uaid:
                found.append(f"WebPush {uaid}/{chid} got {body!r}, sent to {sent_to or None}")
            elif status is not None and status not in WP_ACCEPTED:
                found.append(f"WebPush {chid} got {body!r}, answered {status}")
        for body, (chid, status) in self.bodies.items():
            if status in WP_ACCEPTED and body not in self.acked_bodies:
                seen = sum(1 for _, _, b in self.seen_bodies if b == body)
                found.append(
                    f"WebPush {chid} lost {body!r} (201 in run {self.runs[chid, body]} of"
                    f" {self.run + 1}; seen {seen} times, never acked)"
                )
        return found

    def summary(self) -> str:
        sp = [s for answers in self.versions.values() for s in answers.values()]
        wp = [s for _, s in self.bodies.values()]
        return (
            f"SimplePush answers {count(sp)}, WebPush answers {count(wp)},"
            f" notifications seen {len(self.seen_versions)} + {len(self.seen_bodies)}"
        )


def count(statuses: list[int | None]) -> dict[str, int]:
    found: dict[str, int] = defaultdict(int)
    for status in statuses:
        found[str(status) if status else "cut"] += 1
    return dict(sorted(found.items()))


def base64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# --- load ------------------------------------------------------------------------------


class Refused(Exception):
    """The connect was refused: the server is down and the request never left."""


def request(
    conn: http.client.HTTPConnection, endpoint: str, value: int | bytes, ttl: int = TTL
) -> None:
    """Write a PUT (int: version=value) or a POST (bytes: the body, `ttl`, aes128gcm)."""
    path = urlsplit(endpoint).path
    if isinstance(value, int):
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        conn.request("PUT", path, body=f"version={value}".encode(), headers=form)
    else:
        headers = {"TTL": str(ttl), "Content-Encoding": "aes128gcm"}
        conn.request("POST", path, body=value, headers=headers)


def send(server: Server, endpoint: str, value: int | bytes) -> int | None:
    """A PUT (int version) or POST (body) on a fresh connection: its status, None if the
    connection was cut after the request may have reached the server."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=IO_TIMEOUT)
    try:
        try:
            conn.connect()
        except ConnectionRefusedError:
            raise Refused from None
        request(conn, endpoint, value)
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


@dataclass
class Load:
    """Sender threads and connected devices' threads around one server, its kills included."""

    server: Server
    checker: Checker
    seed: int
    stop_sending: threading.Event = field(default_factory=threading.Event)
    stop_listening: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def spawn(self, name: str, target: Callable[[], None]) -> None:
        def run() -> None:
            try:
                target()
            except BaseException:
                self.checker.problem(f"thread {name} crashed: {traceback.format_exc()}")

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self.threads.append(thread)

    def sender(self, index: int, channels: list[tuple[str, str]]) -> None:
        """Send to these channels, in random order, one request at a time, until stopped."""
        rng = random.Random(self.seed * 1000 + index)
        sent: dict[str, int] = defaultdict(int)
        while not self.stop_sending.is_set():
            chid, endpoint = rng.choice(channels)
            number = sent[chid] + 1
            kind = self.checker.owner[chid].kind
            value: int | bytes = number if kind == SIMPLEPUSH else f"{chid}:{number}".encode()
            try:
                status = send(self.server, endpoint, value)
            except Refused:
                time.sleep(POLL)  # never sent: the same number goes out next time
                continue
            sent[chid] = number
            self.checker.answered(chid, value, status)

    def listener(self, handset: Handset) -> None:
        """A connected device: reconnect with its uaid whenever its socket dies; ack all."""
        while not self.stop_listening.is_set():
            try:
                device = handset.connect(self.server)
            except (OSError, websocket.WebSocketException):
                time.sleep(POLL)
                continue
            try:
                device.ws.settimeout(POLL * 10)
                while not self.stop_listening.is_set():
                    try:
                        text = device.next_text()
                    except websocket.WebSocketTimeoutException:
                        continue
                    if text is None:
                        break
                    acknowledge(self.checker, handset, device, json.loads(text))
            except (OSError, websocket.WebSocketException):
                pass
            finally:
                device.ws.close(timeout=0)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=IO_TIMEOUT * 2)
            assert not thread.is_alive(), f"{thread.name} did not stop"


def acknowledge(checker: Checker, handset: Handset, device: Device, frame: dict[str, Any]) -> None:
    """Record a frame; ack what it delivered (counted as acked once written)."""
    updates = checker.take(handset, frame)
    if updates:
        device.send({"messageType": "ack", "updates": updates})
        checker.acked(handset, updates, frame)


def collect(checker: Checker, handset: Handset, server: Server) -> None:
    """Reconnect with the uaid, take and ack every notification until QUIET, then a ping
    whose answer means the acks were handled."""
    device = handset.connect(server)
    try:
        device.ws.settimeout(QUIET)
        while True:
            try:
                text = device.next_text()
            except websocket.WebSocketTimeoutException:
                break
            assert text is not None, f"{handset.uaid}: closed with {device.close_code}"
            acknowledge(checker, handset, device, json.loads(text))
        device.ws.settimeout(IO_TIMEOUT)
        device.send("{}")
        while (frame := device.recv()) != {}:
            acknowledge(checker, handset, device, frame)
    finally:
        device.disconnect()


def nothing_again(checker: Checker, handset: Handset, server: Server) -> None:
    """Everything was acked with no crash since: a new socket gets nothing."""
    device = handset.connect(server)
    try:
        device.ws.settimeout(QUIET)
        with contextlib.suppress(websocket.WebSocketTimeoutException):
            text = device.next_text()
            checker.problem(f"{handset.kind} {handset.uaid}: after every ack, got {text!r}")
    finally:
        device.disconnect()


# --- the test ----------------------------------------------------------------------------


@pytest.fixture
def memcached_for() -> Iterator[Callable[[], Memcached]]:
    """A memcached of the test's own, started only when asked for."""
    started: list[Memcached] = []

    def _get() -> Memcached:
        if not started:
            started.append(Memcached())
            started[0].start()
        return started[0]

    yield _get
    for server in started:
        server.stop()


@pytest.mark.parametrize(
    ("backend", "processes"),
    [("sqlite", 1), ("sqlite", 2), ("memcached", 1)],
    ids=["sqlite", "sqlite-2-workers", "memcached"],
)
def test_kill_9_under_load_loses_nothing_accepted_and_invents_nothing(
    servers, memcached_for, tmp_path, backend, processes
):
    """SIGKILL at random moments under PUTs and POSTs: after restarts on the same store,
    every 2xx-answered update is delivered and nothing unaccepted ever is."""
    seed = int(os.environ.get(SEED_VARIABLE) or random.randrange(2**32))
    print(f"crash test seed {seed} ({SEED_VARIABLE}={seed} to replay)")
    rng = random.Random(seed)
    memcached = memcached_for() if backend == "memcached" else None
    server = servers(storage_section(backend, tmp_path, memcached), processes)
    checker = Checker()

    handsets = [
        Handset(kind, online=i < DEVICES // 2)
        for kind in (SIMPLEPUSH, WEBPUSH)
        for i in range(DEVICES)
    ]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda h: h.register(server), handsets))
    channels = [(chid, url) for h in handsets for chid, url in h.endpoints.items()]
    checker.owner = {chid: h for h in handsets for chid in h.endpoints}
    rng.shuffle(channels)

    load = Load(server, checker, seed)
    for handset in handsets:
        if handset.online:
            load.spawn(f"device {handset.uaid}", lambda h=handset: load.listener(h))
    for index in range(SENDERS):
        share = channels[index::SENDERS]
        load.spawn(f"sender {index}", lambda i=index, s=share: load.sender(i, s))

    started = time.monotonic()
    delays = []
    for _ in range(KILLS):
        target = checker.accepted() + LOAD_PER_RUN
        wait_until(lambda t=target: checker.accepted() >= t, IO_TIMEOUT, "load", server)
        delays.append(rng.uniform(*KILL_DELAY))
        time.sleep(delays[-1])
        kill_9(server)
        checker.killed()
        start(server)
    target = checker.accepted() + LOAD_PER_RUN
    wait_until(lambda: checker.accepted() >= target, IO_TIMEOUT, "load after the last restart")
    load.stop_sending.set()
    load.stop_listening.set()
    load.join()
    loaded = time.monotonic() - started

    with ThreadPoolExecutor(len(handsets)) as pool:
        list(pool.map(lambda h: collect(checker, h, server), handsets))
        list(pool.map(lambda h: nothing_again(checker, h, server), handsets))

    print(
        f"seed {seed}: {KILLS} kills after {[round(d, 3) for d in delays]} s of load,"
        f" {loaded:.1f} s in all; {checker.summary()}"
    )
    problems = checker.verdict()
    assert not problems, f"seed {seed}: {checker.summary()}\n" + "\n".join(problems[:50])
