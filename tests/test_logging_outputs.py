"""`[logging] output` beyond stdout: udp and tcp collectors, and logrotate.

DESIGN.md section 3 and issue 5: Heka listens on a udp:// or tcp://
collector, or tails a file that logrotate moves away before SIGHUP. A
collector that is down, or that stops reading, must never block or crash
the server. Every test runs the real console script, as tests/test_cli.py
does; collectors are plain sockets in the test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pty
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import websocket

from simplepush import logs
from simplepush.config import load
from tests.signalwait import deliver
from tests.test_cli import (
    ENVELOPE,
    EXIT_TIMEOUT,
    IO_TIMEOUT,
    SCRIPT,
    Server,
    assert_config_error,
    free_port,
    get_json,
    launch,
    request,
    round_trip,
    run_cli,
)

# fixtures of the processes = 2 test: memcached and a supervised server logging to a file
from tests.test_cluster import cluster, memcached_proc, token_key  # noqa: F401

# Bounds for waiting on the server or its collector, not performance thresholds.
ARRIVAL_TIMEOUT = 10.0
# A tcp collector that comes up is reconnected to within this (backoff caps at 2 s).
RECONNECT_TIMEOUT = 10.0
# Issue 5: /status answers within a second while the collector is stuck.
STATUS_BOUND = 1.0


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """start(output, level=...): a server answering /status; killed at teardown."""
    if not SCRIPT.is_file():
        pytest.fail(f"console script {SCRIPT} is missing: run `pip install -e .` in this venv")
    started: list[Server] = []

    def _start(output: str, level: str = "info") -> Server:
        server = launch(SCRIPT, tmp_path, output=output, level=level)
        started.append(server)
        return server

    yield _start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=EXIT_TIMEOUT)


class Devices:
    """Client WebSockets opened by a test; close_all() before a stop spares the shutdown grace."""

    def __init__(self) -> None:
        self.opened: list[websocket.WebSocket] = []

    def __call__(self, port: int) -> websocket.WebSocket:
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/", timeout=IO_TIMEOUT)
        self.opened.append(ws)
        return ws

    def close_all(self) -> None:
        for ws in self.opened:
            ws.close(timeout=0)
        self.opened.clear()


@pytest.fixture
def sockets() -> Iterator[Devices]:
    devices = Devices()
    yield devices
    devices.close_all()


def check_envelope(line: bytes, pid: int) -> dict:
    """One mozlog object of DESIGN.md section 3, from process `pid`."""
    record = json.loads(line)
    assert set(record) == ENVELOPE, record
    assert type(record["Timestamp"]) is int
    assert type(record["Type"]) is str
    assert record["Logger"] == "simplepush"
    assert record["Hostname"] == socket.gethostname()
    assert record["EnvVersion"] == "2.0"
    assert record["Severity"] in range(8)
    assert record["Pid"] == pid
    assert type(record["Fields"]) is dict
    return record


def hello(server: Server, open_socket: Devices, channels: int) -> None:
    """A device says hello with `channels` channel IDs: `websocket.hello` at info tells them apart.

    (The uaid itself is logged only at debug.)
    """
    ws = open_socket(server.port)
    channel_ids = [str(uuid.uuid4()) for _ in range(channels)]
    reply = request(ws, {"messageType": "hello", "uaid": "", "channelIDs": channel_ids})
    assert reply["status"] == 200


def hello_channels(records: list[dict]) -> list[int]:
    """The `channels` field of each `websocket.hello` record, in order."""
    return [r["Fields"]["channels"] for r in records if r["Type"] == "websocket.hello"]


def file_records(path: Path, pid: int) -> list[dict]:
    return [check_envelope(line, pid) for line in path.read_bytes().splitlines()]


class LineReader:
    """Newline-delimited lines from a connected tcp collector socket."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def until(self, wanted: Callable[[list[dict]], bool], pid: int) -> list[dict]:
        """Read and check records until `wanted(records)`; fails after ARRIVAL_TIMEOUT."""
        records: list[dict] = []
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        while not wanted(records):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"collector did not get the wanted lines: {records}"
            self.conn.settimeout(remaining)
            chunk = self.conn.recv(65536)
            assert chunk, f"server closed the collector connection: {records}"
            self.buffer += chunk
            *lines, self.buffer = self.buffer.split(b"\n")
            records += [check_envelope(line, pid) for line in lines]
        return records


def types_of(records: list[dict]) -> set[str]:
    return {record["Type"] for record in records}


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + ARRIVAL_TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def alive_and_serving(server: Server, open_socket: Devices) -> None:
    """A full device round trip, /status, and the process still running."""
    round_trip(server, open_socket)
    assert get_json(server, "/status")["status"] == "OK"
    assert server.proc.poll() is None


# --- udp and tcp collectors -------------------------------------------------


def test_udp_collector_gets_one_mozlog_object_per_datagram(start, sockets):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        server = start(f"udp://127.0.0.1:{collector.getsockname()[1]}")
        round_trip(server, sockets)
        records: list[dict] = []
        deadline = time.monotonic() + ARRIVAL_TIMEOUT
        while not {"server.start", "websocket.hello"} <= types_of(records):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"collector did not get the wanted lines: {records}"
            collector.settimeout(remaining)
            datagram = collector.recv(65536)
            assert datagram.endswith(b"\n") and datagram.count(b"\n") == 1, datagram
            records.append(check_envelope(datagram, server.proc.pid))
    sockets.close_all()
    assert server.stop() == 0
    assert server.output() == [], "a udp output writes nothing to stdout"


def test_tcp_collector_gets_newline_delimited_mozlog_objects(start, sockets):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(ARRIVAL_TIMEOUT)
        server = start(f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        conn, _ = listener.accept()
        with conn:
            round_trip(server, sockets)
            reader = LineReader(conn)
            pid = server.proc.pid
            reader.until(
                lambda records: {"server.start", "websocket.hello"} <= types_of(records), pid
            )
            sockets.close_all()
            assert server.stop() == 0
            stop = reader.until(lambda records: "server.stop" in types_of(records), pid)
            assert stop[-1]["Type"] == "server.stop", "lines queued at exit are still sent"


# --- collector down: the server serves on, and reconnects --------------------


def test_udp_collector_down_does_not_stop_the_server(start, sockets):
    server = start(f"udp://127.0.0.1:{free_port()}")
    alive_and_serving(server, sockets)
    sockets.close_all()
    assert server.stop() == 0


def test_tcp_collector_down_then_up_gets_lines_after_reconnect(start, sockets):
    port = free_port()
    server = start(f"tcp://127.0.0.1:{port}")
    alive_and_serving(server, sockets)
    with socket.create_server(("127.0.0.1", port)) as listener:
        listener.settimeout(RECONNECT_TIMEOUT)
        conn, _ = listener.accept()
        with conn:
            hello(server, sockets, channels=3)
            records = LineReader(conn).until(
                lambda records: 3 in hello_channels(records), server.proc.pid
            )
    assert "server.start" in types_of(records), "lines waiting in the queue were kept"
    sockets.close_all()
    assert server.stop() == 0


def stuck_pairs() -> int:
    """Register/unregister pairs whose debug lines overflow the kernel's socket buffers.

    A pair logs two lines of ~600 bytes with their envelopes; loopback send
    buffers grow up to tcp_wmem's maximum, so a quarter more than that is sent.
    """
    try:
        wmem_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        wmem_max = 4 * 1024 * 1024
    return wmem_max * 5 // 4 // 600


def test_tcp_collector_that_never_reads_does_not_block_the_server(start, sockets):
    """The collector's buffers fill up; devices and /status are served on time regardless."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(ARRIVAL_TIMEOUT)
        server = start(f"tcp://127.0.0.1:{listener.getsockname()[1]}", level="debug")
        conn, _ = listener.accept()
        with conn:
            ws = sockets(server.port)
            assert request(ws, {"messageType": "hello", "uaid": "", "channelIDs": []})["status"]
            for _ in range(stuck_pairs()):
                chid = str(uuid.uuid4())
                assert request(ws, {"messageType": "register", "channelID": chid})["status"] == 200
                ws.send(json.dumps({"messageType": "unregister", "channelID": chid}))
                assert json.loads(ws.recv())["status"] == 200
            began = time.monotonic()
            with urllib.request.urlopen(server.url("/status"), timeout=STATUS_BOUND) as response:
                assert json.loads(response.read())["status"] == "OK"
            assert time.monotonic() - began < STATUS_BOUND
            alive_and_serving(server, sockets)
            wait_until(
                lambda: "logging.dropped" in server.stderr.read_text(encoding="utf-8"),
                "a logging.dropped warning on stderr",
            )
            warning = next(
                json.loads(line)
                for line in server.stderr.read_text(encoding="utf-8").splitlines()
                if "logging.dropped" in line
            )
            assert warning["Severity"] == 4
            assert warning["Fields"]["dropped"] > 0
            assert warning["Fields"]["total"] >= warning["Fields"]["dropped"]
            sockets.close_all()
            assert server.stop() == 0


def test_full_queue_drops_and_counts_without_blocking_the_caller(capsys):
    """In-process: emit() never waits for a stuck collector; dropped lines are counted."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        handler = logs.CollectorHandler("tcp", "127.0.0.1", listener.getsockname()[1], 100)
        handler.setFormatter(logs.MozlogFormatter("simplepush"))
        before = logs.dropped_lines()
        record = logs.log.makeRecord(
            "simplepush",
            20,
            __file__,
            0,
            "test.line",
            (),
            None,
            extra={"fields": {"x": "y" * 1000}},
        )
        try:
            began = time.monotonic()
            for _ in range(20_000):
                handler.emit(record)
            emitting = time.monotonic() - began
            assert logs.dropped_lines() > before
            wait_until(lambda: "logging.dropped" in capsys.readouterr().err, "logging.dropped")
        finally:
            handler.close()
    # 20,000 emits: a blocking send would take SEND_TIMEOUT or more
    assert emitting < logs.SEND_TIMEOUT


# --- file output and SIGHUP ---------------------------------------------------


def test_sighup_reopens_the_log_file_after_it_is_moved(start, sockets, tmp_path):
    log_file = tmp_path / "simplepush.log"
    server = start(str(log_file))
    pid = server.proc.pid
    hello(server, sockets, channels=1)
    wait_until(lambda: hello_channels(file_records(log_file, pid)) == [1], "the first hello")
    rotated = log_file.rename(tmp_path / "simplepush.log.1")
    server.proc.send_signal(signal.SIGHUP)
    wait_until(log_file.exists, "a new log file")
    hello(server, sockets, channels=2)
    wait_until(lambda: hello_channels(file_records(log_file, pid)) == [2], "the second hello")
    sockets.close_all()
    assert server.stop() == 0
    old, new = file_records(rotated, pid), file_records(log_file, pid)
    assert "server.start" in types_of(old)
    assert hello_channels(old) == [1]
    assert hello_channels(new) == [2]
    assert {"logging.reopened", "server.stop"} <= types_of(new)
    assert "server.stop" not in types_of(old)


@pytest.mark.parametrize("collector", ["stdout", "udp"])
def test_sighup_without_a_log_file_is_harmless(start, sockets, collector):
    output = "stdout" if collector == "stdout" else f"udp://127.0.0.1:{free_port()}"
    server = start(output)
    for _ in range(2):
        deliver(server.proc.pid, signal.SIGHUP)
        alive_and_serving(server, sockets)
    sockets.close_all()
    assert server.stop() == 0


# --- format = auto ------------------------------------------------------------


def read_terminal(leader: int) -> str:
    """All a pseudo-terminal's program wrote, once it exited (EIO: no writer is left)."""
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8").replace("\r\n", "\n")


def test_auto_format_writes_text_to_a_terminal(tmp_path):
    """The shipped default: the first run in a terminal reads as text, values with spaces quoted."""
    port = free_port()
    config = tmp_path / "terminal.ini"
    config.write_text(
        f"[server]\nport = {port}\nendpoint_url = http://127.0.0.1:{port}\n"
        "[storage]\nbackend = memory\n[admin]\nport = 0\n",  # warns: a key for this run only
        encoding="utf-8",
    )
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [str(SCRIPT), "--config", str(config)],
            stdout=follower,
            stderr=subprocess.DEVNULL,
            cwd=tmp_path,
        )
        os.close(follower)
        server = Server(proc, port, tmp_path / "unused", tmp_path / "unused")
        try:
            wait_until(lambda: status_ok(server), "/status")
        finally:
            assert server.stop() == 0
        lines = read_terminal(leader).splitlines()
    finally:
        os.close(leader)
    assert lines
    for line in lines:
        with pytest.raises(ValueError):
            json.loads(line)
    assert any(" INFO server.start " in line and f" port={port} " in line for line in lines)
    warning = next(line for line in lines if " WARNING config.warning key=token_key " in line)
    assert 'problem="empty: using a key for this run only' in warning


def status_ok(server: Server) -> bool:
    try:
        return get_json(server, "/status")["status"] == "OK"
    except OSError:
        return False


def test_auto_format_writes_json_to_a_file_or_pipe(start, tmp_path):
    """Not a terminal, so for a machine: the stdout file launch() gives it gets mozlog JSON."""
    server = start("stdout")
    assert "format" not in (tmp_path / f"server-{server.port}.ini").read_text()  # auto
    assert server.stop() == 0
    records = [check_envelope(line.encode(), server.proc.pid) for line in server.output()]
    assert "server.start" in types_of(records)


# --- config -----------------------------------------------------------------


@pytest.mark.parametrize(
    "output",
    ["udp://nohost", "tcp://host:99999", "tcp://:5170", "udp://host:0", "tcp://host:port"],
)
def test_malformed_collector_exits_2_with_one_line(tmp_path, output):
    config = tmp_path / "bad.ini"
    config.write_text(f"[logging]\noutput = {output}\n", encoding="utf-8")
    result = run_cli(SCRIPT, "--config", str(config), cwd=tmp_path)
    assert_config_error(result, [str(config), "[logging] output", output])


@pytest.mark.parametrize("output", ["http://127.0.0.1:5565", "file:///var/log/simplepush.log"])
def test_another_url_scheme_exits_2_with_one_line(tmp_path, output):
    """Not taken for a file path (whose directory `http:` would be missing)."""
    config = tmp_path / "bad.ini"
    config.write_text(f"[logging]\noutput = {output}\n", encoding="utf-8")
    result = run_cli(SCRIPT, "--config", str(config), cwd=tmp_path)
    scheme = output.split(":")[0]
    assert_config_error(
        result, [str(config), "[logging] output", output, f"{scheme}:// is not an output"]
    )


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[Path]:
    """path made unwritable for this user; root ignores modes, so for root it is made immutable."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.fail("root ignores file modes and chattr (e2fsprogs) is missing")
        subprocess.run(["chattr", "+i", str(path)], check=True, timeout=EXIT_TIMEOUT)
        try:
            yield path
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True, timeout=EXIT_TIMEOUT)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield path
        finally:
            path.chmod(mode)


def assert_refused(tmp_path: Path, output: str, why: str) -> None:
    """The console script names the key and why, instead of a traceback from opening the file."""
    config = tmp_path / "bad.ini"
    config.write_text(f"[logging]\noutput = {output}\n", encoding="utf-8")
    result = run_cli(SCRIPT, "--config", str(config), cwd=tmp_path)
    assert_config_error(result, [str(config), "[logging] output", f"{output}: {why}"])


def test_a_log_file_in_an_unwritable_directory_exits_2_with_one_line(tmp_path):
    directory = tmp_path / "logs"
    directory.mkdir()
    with unwritable(directory):
        assert_refused(
            tmp_path,
            str(directory / "simplepush.log"),
            f"directory {directory} is not writable by this user",
        )


def test_an_unwritable_log_file_exits_2_with_one_line(tmp_path):
    log_file = tmp_path / "simplepush.log"
    log_file.write_text("", encoding="utf-8")
    with unwritable(log_file):
        assert_refused(tmp_path, str(log_file), "not writable by this user")


def test_a_directory_as_log_file_exits_2_with_one_line(tmp_path):
    assert_refused(tmp_path, str(tmp_path), "is a directory")


@pytest.mark.parametrize(
    "output", ["udp://127.0.0.1:5565", "tcp://logs.example.com:5170", "tcp://[::1]:1"]
)
def test_collector_urls_are_accepted(tmp_path, output):
    config = tmp_path / "good.ini"
    config.write_text(f"[logging]\noutput = {output}\n", encoding="utf-8")
    assert load(str(config)).logging.output == output


def test_sighup_to_the_supervisor_reopens_every_workers_log_file(request, tmp_path):
    """processes = 2: the supervisor reopens its own file and passes SIGHUP to both workers."""
    server = request.getfixturevalue("cluster")(processes=2)
    rotated = server.log.rename(tmp_path / "rotated.log")
    server.proc.send_signal(signal.SIGHUP)

    def reopened_by() -> set[int]:
        if not server.log.exists():
            return set()
        records = [json.loads(line) for line in server.log.read_bytes().splitlines()]
        return {r["Pid"] for r in records if r["Type"] == "logging.reopened"}

    wait_until(lambda: len(reopened_by()) == 3, "the supervisor and both workers to reopen")
    assert server.proc.pid in reopened_by()
    assert get_json(server, "/status")["status"] == "OK"
    assert server.stop() == 0
    old = [json.loads(line) for line in rotated.read_bytes().splitlines()]
    new = [json.loads(line) for line in server.log.read_bytes().splitlines()]
    assert {r["Fields"]["worker"] for r in old if r["Type"] == "server.start"} == {0, 1}
    assert {r["Fields"]["worker"] for r in new if r["Type"] == "server.stop"} == {0, 1}
    assert not {"logging.reopened", "server.stop"} & types_of(old)


def test_a_field_orjson_refuses_still_makes_a_json_line():
    """Integers past 64 bits and lone surrogates (a device can send both in JSON) go out
    through json, escaped, rather than losing the line."""
    formatter = logs.MozlogFormatter("simplepush")
    record = logging.LogRecord("simplepush", logging.INFO, __file__, 1, "t", None, None)
    record.event_type = "websocket.test"
    record.fields = {"version": 2**70, "uaid": "\ud800", "channels": 1}
    line = formatter.format(record)
    assert line.isascii() and "\\ud800" in line
    assert json.loads(line)["Fields"] == {"version": 2**70, "uaid": "\ud800", "channels": 1}
    record.fields = {"channels": 1}
    assert json.loads(formatter.format(record))["Fields"] == {"channels": 1}
