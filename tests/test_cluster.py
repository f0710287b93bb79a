"""Several real simplepush processes sharing one real memcached (issue 4).

Each test starts its own memcached and its own `simplepush --config`
processes on free ports, all with one token key, and drives them the way
devices (websocket-client) and app servers (http.client) do. An update
that reaches the wrong node still reaches the device; the newest
connection wins across nodes; pending updates survive dead nodes, restarts
and concurrent writers; a storage outage is answered 503 and heals by
itself; `processes = 2` workers behind one port route to each other and
are replaced when they die. Every process is killed at teardown and every
wait is bounded.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import signal
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pytest
import websocket

from simplepush.peers import router_secrets
from simplepush.tokens import generate_key
from tests.conftest import Memcached, free_port, new_id
from tests.test_cli import SCRIPT, assert_config_error, run_cli

# Bounds for waiting on processes and sockets, not performance thresholds.
START_TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0
IO_TIMEOUT = 5.0
RECOVERY_TIMEOUT = 5.0  # memcached back, or a dead worker replaced
SILENCE = 0.3  # how long a device listens for a frame that must not come
SUPERSEDED = 4000
GOING_AWAY = 1001


# --- processes ----------------------------------------------------------------


def free_ports(count: int) -> int:
    """A port p with p .. p + count - 1 all free: worker i listens on router_port + i.

    Picked below Linux's ephemeral range (32768 up): in it, bind(0) hands out
    odd ports and outgoing connections take the even ones beside them.
    """
    for first in random.sample(range(20000, 32000), 200):
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                held.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
                sock.bind(("127.0.0.1", port))
                sock.listen()
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    pytest.fail(f"no run of {count} free ports")


@dataclass
class Server:
    """One `simplepush --config` process (a supervisor when processes > 1) and its files."""

    config: Path
    port: int
    router_port: int
    processes: int
    log: Path
    stderr: Path
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_start: int = 0  # where the current run's log lines begin

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        return self.runs[-1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def records(self, type_: str | None = None) -> list[dict[str, Any]]:
        """The current run's complete log records, optionally only those of one Type."""
        data = self.log.read_bytes()[self.log_start :] if self.log.exists() else b""
        records = [
            json.loads(line) for line in data.splitlines(keepends=True) if line[-1:] == b"\n"
        ]
        return [r for r in records if type_ is None or r["Type"] == type_]

    def launch(self) -> None:
        """Start the process and wait until every worker logged server.start."""
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.stderr.open("ab") as err:
            self.runs.append(
                subprocess.Popen(
                    [str(SCRIPT), "--config", str(self.config)],
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    start_new_session=True,  # one process group: teardown kills workers too
                )
            )
        wait_until(
            lambda: self.started() == set(range(self.processes)),
            START_TIMEOUT,
            "every worker to log server.start",
            self,
        )

    def started(self) -> set[int]:
        return {r["Fields"]["worker"] for r in self.records("server.start")}

    def stop(self) -> int:
        """SIGTERM; the exit status, which must come within EXIT_TIMEOUT."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=EXIT_TIMEOUT)

    def kill_all(self) -> None:
        for proc in self.runs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=EXIT_TIMEOUT)


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, server: Server | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if server is not None and server.proc.poll() is not None:
            pytest.fail(f"server exited {server.proc.returncode}: {server.stderr.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.05)


def children(pid: int) -> set[int]:
    """The live (not zombie) child processes of pid, from /proc."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.add(int(entry.name))
    return found


def gone(pid: int) -> bool:
    """Dead: no longer in /proc, or a zombie (its sockets are closed either way)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


@pytest.fixture
def memcached_proc() -> Iterator[Memcached]:
    """Each test's own memcached, which it may stop and start again on the same port."""
    server = Memcached()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def token_key() -> str:
    return generate_key()


@pytest.fixture
def cluster(tmp_path: Path, memcached_proc: Memcached, token_key: str):
    """cluster(processes=1, admin_port=0, level="info") -> a started Server on the shared
    memcached and token key, logging at `level`; its dashboard is off unless given a port.

    Every process of every server (workers included) is killed at teardown.
    """
    servers: list[Server] = []

    def _start(processes: int = 1, admin_port: int = 0, level: str = "info") -> Server:
        port, router_port = free_port(), free_ports(processes)
        name = f"node{len(servers)}"
        log = tmp_path / f"{name}.log"
        config = tmp_path / f"{name}.ini"
        config.write_text(
            "[server]\n"
            f"port = {port}\n"
            f"endpoint_url = http://127.0.0.1:{port}\n"
            f"processes = {processes}\n"
            "max_connections = 1000\n"
            f"token_key = {token_key}\n"
            f"router_port = {router_port}\n"
            "[storage]\n"
            "backend = memcached\n"
            f"servers = {memcached_proc.address}\n"
            "timeout = 1\n"
            "[logging]\n"
            f"output = {log}\n"
            f"level = {level}\n"
            f"[admin]\nport = {admin_port}\n",
            encoding="utf-8",
        )
        server = Server(config, port, router_port, processes, log, tmp_path / f"{name}.stderr")
        servers.append(server)
        server.launch()
        return server

    yield _start
    for server in servers:
        server.kill_all()


# --- app servers and devices ----------------------------------------------------


class Response(NamedTuple):
    status: int
    body: bytes
    headers: http.client.HTTPMessage


def call(
    method: str, url: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> Response:
    """One HTTP request on a fresh connection; any status is returned, none raised."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=IO_TIMEOUT)
    try:
        conn.request(method, parts.path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Response(response.status, response.read(), response.headers)
    finally:
        conn.close()


def put(endpoint: str, body: str) -> Response:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    return call("PUT", endpoint, body.encode(), form)


def via(endpoint: str, server: Server) -> str:
    """The same endpoint on another node: an app server's request may land on any."""
    return urlsplit(endpoint)._replace(netloc=f"127.0.0.1:{server.port}").geturl()


def get_json(server: Server, path: str) -> tuple[int, dict[str, Any]]:
    response = call("GET", server.url(path))
    return response.status, json.loads(response.body)


def notification(*updates: tuple[str, int]) -> dict[str, Any]:
    return {
        "messageType": "notification",
        "updates": [{"channelID": chid, "version": version} for chid, version in updates],
    }


class Device:
    """A device's WebSocket; every read is bounded by IO_TIMEOUT."""

    def __init__(self, server: Server) -> None:
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/", timeout=IO_TIMEOUT)
        self.uaid = ""
        self.close_code: int | None = None

    def send(self, frame: dict[str, Any] | str) -> None:
        self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    def next_text(self) -> str | None:
        """The next text frame, or None when the server's close frame came (see close_code)."""
        while True:
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_TEXT:
                return data.decode("utf-8")
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close_code = struct.unpack("!H", data[:2])[0]
                return None

    def recv(self) -> dict[str, Any]:
        text = self.next_text()
        assert text is not None, f"socket closed with {self.close_code}"
        return json.loads(text)

    def request(self, frame: dict[str, Any] | str) -> dict[str, Any]:
        self.send(frame)
        return self.recv()

    def hello(self, uaid: str = "", channel_ids: list[str] | None = None) -> None:
        """Hello; a known uaid must be kept, not reset."""
        reply = self.request(
            {"messageType": "hello", "uaid": uaid, "channelIDs": channel_ids or []}
        )
        self.uaid = reply.get("uaid", "")
        assert reply == {"messageType": "hello", "uaid": uaid or self.uaid, "status": 200}

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
        return endpoint

    def ack(self, *updates: tuple[str, int]) -> None:
        """Ack, then ping: frames are handled in order, so the answer means the ack is done."""
        acks = [{"channelID": chid, "version": version} for chid, version in updates]
        self.send({"messageType": "ack", "updates": acks})
        assert self.request("{}") == {}

    def answers_ping(self) -> bool:
        """False once the socket is cut (its server process died)."""
        try:
            return self.request("{}") == {}
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return False

    def expect_silence(self) -> None:
        self.ws.settimeout(SILENCE)
        try:
            text = self.next_text()
        except websocket.WebSocketTimeoutException:
            return
        finally:
            self.ws.settimeout(IO_TIMEOUT)
        raise AssertionError(f"expected no frame, got {text!r} (close code {self.close_code})")

    def expect_close(self) -> int | None:
        """The server's close code; any text frame before the close fails."""
        text = self.next_text()
        assert text is None, f"expected a close, got {text!r}"
        return self.close_code

    def disconnect(self) -> None:
        """Close and wait (briefly) for the server's answer, as a device going offline."""
        self.ws.close(timeout=1)


@pytest.fixture
def connect():
    """connect(server) -> a Device on that server's public port; all closed at teardown."""
    opened: list[Device] = []

    def _connect(server: Server) -> Device:
        device = Device(server)
        opened.append(device)
        return device

    yield _connect
    for device in opened:
        device.ws.close(timeout=0)


def registered(connect, server: Server, channels: int = 1) -> tuple[Device, list[str], list[str]]:
    """A new device on server with registered channels: (device, channelIDs, endpoints)."""
    device = connect(server)
    device.hello()
    chids = [new_id() for _ in range(channels)]
    return device, chids, [device.register(chid) for chid in chids]


# --- routing between nodes --------------------------------------------------------


def test_a_put_on_another_node_reaches_the_device_and_its_ack_clears_it(cluster, connect):
    """App servers hit any node behind a balancer; the update (data too) is routed to A."""
    a, b = cluster(), cluster()
    device, [chid], [endpoint] = registered(connect, a)
    assert endpoint.startswith(a.url("/update/"))
    assert put(via(endpoint, b), "version=42&data=hi")[:2] == (200, b"{}")
    assert device.recv() == {
        "messageType": "notification",
        "updates": [{"channelID": chid, "version": 42, "data": "hi"}],
    }
    device.ack((chid, 42))
    device.disconnect()
    for node in (b, a):
        again = connect(node)
        again.hello(device.uaid, [chid])
        again.expect_silence()
        again.disconnect()


def test_a_device_moving_to_another_node_closes_the_old_socket_and_gets_everything_there(
    cluster, connect
):
    """Newest connection wins across nodes: A must not keep a stale socket that eats updates."""
    a, b = cluster(), cluster()
    old, [chid], [endpoint] = registered(connect, a)
    new = connect(b)
    new.hello(old.uaid, [chid])
    assert put(via(endpoint, a), "version=1")[:2] == (200, b"{}")
    assert new.recv() == notification((chid, 1))
    assert put(via(endpoint, b), "version=2")[:2] == (200, b"{}")
    assert new.recv() == notification((chid, 2))
    new.expect_silence()
    assert old.expect_close() == SUPERSEDED


def test_a_put_for_a_device_on_a_killed_node_is_stored_and_flushed_on_reconnect(cluster, connect):
    """A dead holder must not lose the update: stored (202), then flushed after the next hello."""
    a, b = cluster(), cluster()
    device, [chid], [endpoint] = registered(connect, a)
    a.proc.kill()
    a.proc.wait(timeout=EXIT_TIMEOUT)
    assert put(via(endpoint, b), "version=7")[:2] == (202, b"{}")
    again = connect(b)
    again.hello(device.uaid, [chid])
    assert again.recv() == notification((chid, 7))


def test_a_pending_update_survives_restarting_every_server(cluster, connect):
    """Pending updates live in memcached, not in any server process."""
    a, b = cluster(), cluster()
    device, [chid], [endpoint] = registered(connect, a)
    device.disconnect()
    assert put(via(endpoint, b), "version=9")[:2] == (202, b"{}")
    assert (a.stop(), b.stop()) == (0, 0)
    a.launch()
    b.launch()
    again = connect(a)
    again.hello(device.uaid, [chid])
    assert again.recv() == notification((chid, 9))


def test_concurrent_puts_through_two_nodes_to_one_uaid_lose_nothing(cluster, connect):
    """Two nodes rewriting one UAID record at once: CAS must keep every channel's version."""
    a, b = cluster(), cluster()
    device, chids, endpoints = registered(connect, a, channels=20)
    device.disconnect()
    start = threading.Barrier(len(endpoints))

    def update(index: int) -> tuple[int, bytes]:
        start.wait(timeout=IO_TIMEOUT)
        return put(via(endpoints[index], (a, b)[index % 2]), f"version={1000 + index}")[:2]

    with ThreadPoolExecutor(len(endpoints)) as pool:
        answers = list(pool.map(update, range(len(endpoints))))
    assert answers == [(202, b"{}")] * len(endpoints)
    again = connect(b)
    again.hello(device.uaid, chids)
    flush = again.recv()
    flush["updates"].sort(key=lambda update: update["channelID"])
    assert flush == notification(*sorted((chid, 1000 + i) for i, chid in enumerate(chids)))
    again.expect_silence()


# --- storage outage -----------------------------------------------------------------


def test_memcached_down_is_503_and_service_resumes_without_a_restart(
    cluster, connect, memcached_proc
):
    """An outage is reported, not hidden (503, not 202), and heals without operator action."""
    a, b = cluster(), cluster()
    _, _, [endpoint] = registered(connect, a)
    memcached_proc.stop()
    response = put(endpoint, "version=5")
    assert (response.status, response.body) == (
        503,
        b'{"status":503,"error":"Service Unavailable"}',
    )
    assert int(response.headers["Retry-After"]) > 0
    status, body = get_json(a, "/realstatus")
    assert (status, body["ok"], body["storage"]["ok"]) == (503, False, False)
    assert memcached_proc.address in body["storage"]["error"]
    assert get_json(a, "/status")[0] == 200
    memcached_proc.start()
    for server in (a, b):
        wait_until(
            lambda server=server: get_json(server, "/realstatus")[0] == 200,
            RECOVERY_TIMEOUT,
            "/realstatus to be 200 again",
        )
    assert [a.proc.poll(), b.proc.poll()] == [None, None]
    device, [chid], [endpoint] = registered(connect, a)
    assert put(via(endpoint, b), "version=6")[:2] == (200, b"{}")
    assert device.recv() == notification((chid, 6))


# --- processes = 2 ------------------------------------------------------------------


def worker_pids(server: Server) -> dict[int, int]:
    """index -> pid of each worker's latest start, as the supervisor logged it."""
    return {r["Fields"]["index"]: r["Fields"]["pid"] for r in server.records("worker.start")}


def test_two_workers_share_one_port_route_to_each_other_and_are_replaced(cluster, connect):
    """processes = 2: the kernel spreads devices and PUTs over both workers, which route
    to each other; a dead worker is replaced and its devices come back through the port.
    """
    server = cluster(processes=2)
    supervisor = server.proc.pid
    workers = worker_pids(server)
    assert children(supervisor) == set(workers.values())
    devices = [registered(connect, server) for _ in range(40)]
    for _, _, [endpoint] in devices:
        assert put(endpoint, "version=1")[:2] == (200, b"{}")
    for device, [chid], _ in devices:
        assert device.recv() == notification((chid, 1))
        device.ack((chid, 1))

    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: gone(victim), EXIT_TIMEOUT, f"worker {victim} to die")
    survivors = [entry for entry in devices if entry[0].answers_ping()]
    orphans = [entry for entry in devices if entry not in survivors]
    # Devices sat on both workers, so the PUTs that landed on the other one were routed.
    assert survivors and orphans, (len(survivors), len(orphans))
    wait_until(
        lambda: (
            len(children(supervisor) - {workers[1]}) == 1
            and [r["Fields"]["worker"] for r in server.records("server.start")].count(0) == 2
        ),
        RECOVERY_TIMEOUT,
        "a replacement worker 0",
    )
    [replacement] = children(supervisor) - {workers[1]}
    assert replacement != victim
    died = [r["Fields"] for r in server.records("worker.died")]
    assert died == [{"index": 0, "pid": victim, "exit_code": -signal.SIGKILL}]

    devices = survivors
    for old, [chid], [endpoint] in orphans:
        device = connect(server)
        device.hello(old.uaid, [chid])
        devices.append((device, [chid], [endpoint]))
    for _, _, [endpoint] in devices:
        assert put(endpoint, "version=2")[:2] == (200, b"{}")
    for device, [chid], _ in devices:
        assert device.recv() == notification((chid, 2))

    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert [device.expect_close() for device, _, _ in devices] == [GOING_AWAY] * len(devices)
    remaining = max(0.0, EXIT_TIMEOUT - (time.monotonic() - signalled))
    assert server.proc.wait(timeout=remaining) == 0
    assert [pid for pid in (workers[1], replacement) if not gone(pid)] == []


def test_each_worker_logs_under_its_own_pid(cluster):
    """The mozlog Pid tells an operator which worker wrote a line."""
    server = cluster(processes=2)
    workers = worker_pids(server)
    logged = {r["Fields"]["worker"]: r["Pid"] for r in server.records("server.start")}
    assert logged == workers


# --- the internal listener ------------------------------------------------------------


def test_the_internal_listener_wants_the_secret_and_is_not_on_the_public_port(
    cluster, connect, token_key
):
    """Whoever reaches /push or /notif can write to or close any device: peers only."""
    server = cluster()
    device, [chid], _ = registered(connect, server)
    internal = f"http://127.0.0.1:{server.router_port}"
    body = json.dumps({"channelID": chid, "version": 3, "data": None}).encode()
    right = {"Authorization": f"Bearer {router_secrets([token_key])[0]}"}
    wrong = {"Authorization": f"Bearer {router_secrets([generate_key()])[0]}"}
    push = f"/push/{device.uaid}"
    assert call("PUT", internal + push, body).status == 401
    assert call("PUT", internal + push, body, wrong).status == 401
    assert call("PUT", internal + push, body, right)[:2] == (200, b"{}")
    assert device.recv() == notification((chid, 3))
    assert call("PUT", internal + f"/push/{uuid.uuid4().hex}", body, right).status == 404

    assert call("PUT", server.url(push), body, right).status >= 400
    device.expect_silence()
    kick = f"/notif/{device.uaid}/{time.time() + 3600:.6f}"
    assert call("DELETE", server.url(kick), b"", right).status >= 400
    assert device.answers_ping()
    assert call("DELETE", internal + kick, b"", right)[:2] == (200, b"{}")
    assert device.expect_close() == SUPERSEDED


def test_the_internal_listener_answers_pipelined_requests_in_order(cluster, connect, token_key):
    """peers.py writes the requests of one loop turn back to back on one connection."""
    server = cluster()
    device, [chid], _ = registered(connect, server)
    auth = f"Authorization: Bearer {router_secrets([token_key])[0]}\r\n"
    body = json.dumps({"channelID": chid, "version": 5, "data": None})

    def request(uaid: str, authorization: str) -> bytes:
        return (
            f"PUT /push/{uaid} HTTP/1.1\r\nHost: peer\r\n{authorization}"
            f"Content-Length: {len(body)}\r\n\r\n{body}"
        ).encode()

    requests = [
        request(uuid.uuid4().hex, auth),
        request(device.uaid, ""),
        request(device.uaid, auth),
    ]
    with socket.create_connection(("127.0.0.1", server.router_port), timeout=IO_TIMEOUT) as conn:
        conn.sendall(b"".join(requests))
        reader = conn.makefile("rb")
        statuses = []
        for _ in requests:
            status = int(reader.readline().split()[1])
            headers = dict(
                line.decode().rstrip("\r\n").lower().split(": ", 1)
                for line in iter(reader.readline, b"\r\n")
            )
            statuses.append((status, reader.read(int(headers["content-length"]))))
    assert statuses == [
        (404, b'{"status":404,"error":"Not Connected Here"}'),
        (401, b'{"status":401,"error":"Unauthorized"}'),
        (200, b"{}"),
    ]
    assert device.recv() == notification((chid, 5))


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("processes", "backend", "busy"),
    [(2, "memory", None), (1, "memcached", 0), (2, "memcached", 1)],
    ids=["processes-with-memory", "router-port-busy", "router-port-plus-1-busy"],
)
def test_a_cluster_config_that_cannot_work_exits_2_with_one_line(
    tmp_path, token_key, processes, backend, busy
):
    """A cluster that would silently lose updates or routes must not start."""
    router_port = free_ports(2)
    with socket.socket() as taken:
        if busy is not None:
            # As free_ports probed it: a TIME_WAIT left by an earlier test must not matter.
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            taken.bind(("127.0.0.1", router_port + busy))
            taken.listen()
        config = tmp_path / "cluster.ini"
        config.write_text(
            f"[server]\nport = {free_port()}\nprocesses = {processes}\n"
            f"token_key = {token_key}\nrouter_port = {router_port}\n"
            f"[storage]\nbackend = {backend}\n[admin]\nport = 0\n",
            encoding="utf-8",
        )
        result = run_cli(SCRIPT, "--config", str(config), cwd=tmp_path)
    if busy is None:
        assert_config_error(result, [str(config), "[server] processes", "memcached"])
    else:
        fragments = ["[server] router_port", f":{router_port + busy}", "in use"]
        assert_config_error(result, [str(config), *fragments])
