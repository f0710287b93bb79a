"""simplepush-bench: its wire clients on canned bytes, then whole runs against a real server.

The end-to-end tests start `python -m simplepush.cli` and the bench as real
processes on 127.0.0.1 and check the JSON report for presence and sanity
only: no timing thresholds, since the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from simplepush.bench.device import ACK, HELLO_WEBPUSH, READY, Device, Shared, mask_frame
from simplepush.bench.report import percentiles
from simplepush.bench.selfsigned import write_self_signed
from simplepush.bench.settings import parse_source_ips
from simplepush.bench.webpush import BODY_SIZE, SUBJECT, Bodies, Vapid
from simplepush.httpclient import HttpConn, HttpPool
from tests.conftest import Memcached, free_port

ROOT = Path(__file__).resolve().parents[1]
# Bounds for waiting on processes, not performance thresholds.
START_TIMEOUT = 10.0
BENCH_TIMEOUT = 90.0
CHID = "5c6e1d2a-9f83-4b7e-a1c2-3d4e5f607182"


# --- wire clients on canned bytes ---------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Records what a protocol writes."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def unmask(frame: bytes) -> tuple[int, bytes]:
    """(opcode, payload) of one masked client frame."""
    assert frame[0] & 0x80, "FIN must be set"
    assert frame[1] & 0x80, "client frames must be masked"
    length, pos = frame[1] & 0x7F, 2
    if length == 126:
        length, pos = int.from_bytes(frame[2:4], "big"), 4
    elif length == 127:
        length, pos = int.from_bytes(frame[2:10], "big"), 10
    key, payload = frame[pos : pos + 4], frame[pos + 4 :]
    assert len(payload) == length
    return frame[0] & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def server_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    """An unmasked server frame, with the shortest length encoding."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 65536:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


@pytest.mark.parametrize("size", [0, 2, 125, 126, 65535, 65536])
def test_client_frames_are_masked_with_every_length_encoding(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    assert unmask(mask_frame(1, payload)) == (1, payload)


async def never_connect(conn: HttpConn) -> HttpConn:
    raise AssertionError("the device tests make no HTTP requests")


def upgraded_device(shared: Shared) -> tuple[Device, FakeTransport, asyncio.Future[float]]:
    """A device that has sent its upgrade request, and the 101 answer fed back byte by byte."""
    waiter = asyncio.get_running_loop().create_future()
    device, transport = Device(shared, waiter), FakeTransport()
    device.connection_made(transport)
    request = transport.written.pop()
    key = re.search(rb"Sec-WebSocket-Key: (\S+)\r\n", request).group(1)
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Protocol: push-notification\r\nSec-WebSocket-Accept: "
        + accept
        + b"\r\n\r\n"
    )
    for i in range(len(answer)):
        device.data_received(answer[i : i + 1])
    return device, transport, waiter


def test_device_sets_up_acks_answers_pings_and_counts_a_server_close() -> None:
    async def scenario() -> None:
        endpoints: list[str] = []

        def endpoint(url: str) -> tuple[HttpPool, bytes, bytes]:
            endpoints.append(url)
            return HttpPool("h", never_connect, 1), b"/update/x", b""

        shared = Shared("127.0.0.1:1", "/", endpoint)
        device, transport, waiter = upgraded_device(shared)
        assert unmask(transport.written.pop()) == (
            1,
            b'{"messageType":"hello","uaid":"","channelIDs":[]}',
        )
        hello = server_frame(b'{"messageType":"hello","uaid":"abc","status":200}')
        device.data_received(hello[:3])
        device.data_received(hello[3:])
        register = json.loads(unmask(transport.written.pop())[1])
        assert register["messageType"] == "register"
        chid = register["channelID"]
        reply = {"messageType": "register", "channelID": chid, "status": 200, "pushEndpoint": "E"}
        device.data_received(server_frame(json.dumps(reply).encode()))
        assert waiter.done() and device.ready and endpoints == ["E"]

        # A notification in a 16-bit-length frame, with a ping control frame in the same read.
        got = device.expect(7)
        note = {"messageType": "notification", "updates": [{"channelID": chid, "version": 7}]}
        note["padding"] = "x" * 200  # unknown keys are ignored
        device.data_received(server_frame(json.dumps(note).encode()) + server_frame(b"hi", 9))
        assert got.done()
        assert unmask(transport.written[0]) == (1, ACK % (chid.encode(), 7))
        assert unmask(transport.written[1]) == (10, b"hi")
        transport.written.clear()

        # Other channels and versions are acked too, as they came.
        device.data_received(
            server_frame(
                b'{"messageType":"notification","updates":[{"channelID":"o","version":3}]}'
            )
        )
        ack = json.loads(unmask(transport.written.pop())[1])
        assert ack == {"messageType": "ack", "updates": [{"channelID": "o", "version": 3}]}

        device.ping()
        assert unmask(transport.written.pop()) == (1, b"{}")
        assert shared.awaiting_pong == 1
        device.data_received(server_frame(b"{}"))
        assert (shared.pongs, shared.awaiting_pong) == (1, 0)

        device.data_received(server_frame((1001).to_bytes(2, "big"), 8))
        assert unmask(transport.written.pop()) == (8, (1001).to_bytes(2, "big"))
        assert transport.closed and not device.ready
        assert (shared.dropped, shared.protocol_errors) == (1, 0)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "frame",
    [
        server_frame(b'{"messageType"', fin=False),  # fragmented text
        server_frame(b"\x00\x01", 2),  # binary
        b"\x81\x82abcd\x00\x00",  # masked server frame
        server_frame(b"not json"),
    ],
)
def test_device_closes_on_protocol_errors_instead_of_waiting(frame: bytes) -> None:
    async def scenario() -> None:
        shared = Shared("h", "/", lambda url: (None, b"", b""))  # type: ignore[arg-type,return-value]
        device, transport, waiter = upgraded_device(shared)
        device.state = READY  # as if registered
        device.data_received(frame)
        assert transport.closed and not device.ready
        assert (shared.protocol_errors, shared.dropped) == (1, 0)
        waiter.cancel()

    asyncio.run(scenario())


def test_device_reports_a_bad_handshake_as_a_setup_error() -> None:
    async def scenario() -> None:
        waiter = asyncio.get_running_loop().create_future()
        device, transport = Device(Shared("h", "/", print), waiter), FakeTransport()  # type: ignore[arg-type]
        device.connection_made(transport)
        device.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        assert transport.closed
        with pytest.raises(Exception, match="handshake"):
            await waiter

    asyncio.run(scenario())


def webpush_device(key: str) -> tuple[Device, FakeTransport, str]:
    """A WebPush device taken through hello and register: it, its transport, its channel ID."""
    endpoints: list[str] = []

    def endpoint(url: str) -> tuple[HttpPool, bytes, bytes]:
        endpoints.append(url)
        return HttpPool("h", never_connect, 1), b"/wpush/v2/x", b"TTL: 60\r\n"

    device, transport, waiter = upgraded_device(Shared("h", "/", endpoint, key))
    assert unmask(transport.written.pop()) == (1, HELLO_WEBPUSH)
    hello = {"messageType": "hello", "uaid": "a" * 32, "status": 200, "use_webpush": True}
    device.data_received(server_frame(json.dumps(hello).encode()))
    register = json.loads(unmask(transport.written.pop())[1])
    chid = register["channelID"]
    assert register == {"messageType": "register", "channelID": chid, "key": key}
    reply = {"messageType": "register", "channelID": chid, "status": 200, "pushEndpoint": "E"}
    device.data_received(server_frame(json.dumps(reply).encode()))
    assert waiter.done() and device.ready and endpoints == ["E"]
    assert device.headers == b"TTL: 60\r\n"
    return device, transport, chid


def test_webpush_device_registers_its_key_and_acks_string_versions_with_code_100() -> None:
    async def scenario() -> None:
        device, transport, chid = webpush_device(Vapid.generate().register_key)
        body, data = Bodies().make(1)
        got = device.expect(data)

        def note(**fields: object) -> bytes:
            return server_frame(json.dumps({"messageType": "notification", **fields}).encode())

        # Another message on the channel (e.g. an older one) is acked but is not the awaited one.
        device.data_received(note(channelID=chid, version='v"0', data="AAAA", ttl=60))
        ack = json.loads(unmask(transport.written.pop())[1])
        assert ack == {
            "messageType": "ack",
            "updates": [{"channelID": chid, "version": 'v"0', "code": 100}],
        }
        assert not got.done()
        # The awaited one, data padded or not.
        headers = {"encoding": "aes128gcm"}
        padded = base64.urlsafe_b64encode(body).decode()
        device.data_received(note(channelID=chid, version="m1", data=padded, headers=headers))
        assert got.done()
        ack = json.loads(unmask(transport.written.pop())[1])
        assert ack["updates"] == [{"channelID": chid, "version": "m1", "code": 100}]
        # Another channel's message is acked as it came.
        device.data_received(note(channelID="o", version="m2"))
        ack = json.loads(unmask(transport.written.pop())[1])
        assert ack["updates"] == [{"channelID": "o", "version": "m2", "code": 100}]
        assert device.shared.notifications == 3 and device.ready

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "fields",
    [
        {"updates": [{"channelID": "c", "version": 1}]},  # a SimplePush notification
        {"version": 7},  # a version Firefox cannot use
        {"version": "m1", "headers": {}},  # the awaited data without its encoding
    ],
    ids=["simplepush-shape", "int-version", "no-encoding"],
)
def test_webpush_device_closes_on_notifications_firefox_could_not_use(
    fields: dict[str, object],
) -> None:
    async def scenario() -> None:
        device, transport, chid = webpush_device(Vapid.generate().register_key)
        _, data = Bodies().make(1)
        got = device.expect(data)
        frame = {"messageType": "notification", "channelID": chid, "data": data, **fields}
        device.data_received(server_frame(json.dumps(frame).encode()))
        assert transport.closed and not device.ready
        assert device.shared.protocol_errors == 1
        with pytest.raises(Exception, match="protocol"):
            await got

    asyncio.run(scenario())


def test_webpush_hello_without_use_webpush_is_a_setup_error() -> None:
    async def scenario() -> None:
        shared = Shared("h", "/", print, "key")  # type: ignore[arg-type]
        device, transport, waiter = upgraded_device(shared)
        device.data_received(server_frame(b'{"messageType":"hello","uaid":"abc","status":200}'))
        assert transport.closed
        with pytest.raises(Exception, match="use_webpush"):
            await waiter

    asyncio.run(scenario())


def test_vapid_header_is_an_es256_jwt_for_the_origin_and_bodies_look_aes128gcm() -> None:
    vapid = Vapid.generate()
    point = base64.urlsafe_b64decode(vapid.register_key)
    assert len(point) == 65 and point[0] == 4 and vapid.register_key.endswith("=")
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    lines = vapid.headers("http://127.0.0.1:8080").decode().split("\r\n")
    assert lines[:2] == ["TTL: 60", "Content-Encoding: aes128gcm"] and lines[3:] == [""]
    match = re.fullmatch(r"Authorization: vapid t=([^,]+),k=([A-Za-z0-9_-]+)", lines[2])
    assert match is not None
    assert base64.urlsafe_b64decode(match.group(2) + "=") == point
    claims = jwt.decode(
        match.group(1), public, algorithms=["ES256"], audience="http://127.0.0.1:8080"
    )
    assert claims["sub"] == SUBJECT
    assert 11.9 * 3600 < claims["exp"] - time.time() <= 12 * 3600

    bodies = Bodies()
    (first, data), (second, _) = bodies.make(1), bodies.make(2)
    assert len(first) == len(second) == BODY_SIZE
    assert base64.urlsafe_b64decode(data + "==") == first and "=" not in data
    # salt(16) | rs(4) | idlen(1) | keyid(65, a P-256 point) | ciphertext
    assert int.from_bytes(first[16:20], "big") == 4096 and first[20] == 65
    ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), first[21:86])
    assert first[16:86] == second[16:86] and first[86:94] != second[86:94]


def test_source_ips_and_percentiles() -> None:
    assert parse_source_ips("127.0.0.1-127.0.0.3") == ("127.0.0.1", "127.0.0.2", "127.0.0.3")
    assert parse_source_ips("2") == ("127.0.0.1", "127.0.0.2")
    assert parse_source_ips("127.0.0.5,127.0.0.9") == ("127.0.0.5", "127.0.0.9")
    assert percentiles([float(i) for i in range(1, 101)]) == {
        "p50": 50.0,
        "p95": 95.0,
        "p99": 99.0,
        "max": 100.0,
    }
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "max": None}


# --- whole runs against the real server ---------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    certfile: Path | None  # set when it serves wss:// and https://


@pytest.fixture
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    """`python -m simplepush.cli` on a free port with the memory store; killed at teardown.

    Parametrised indirectly with "tls", it serves TLS with a self-signed certificate;
    with "memcached", it stores in the session's (flushed) memcached.
    """
    port = free_port()
    config = tmp_path / "server.ini"
    kind = getattr(request, "param", "memory")
    certfile = None
    extra = ""
    if kind == "tls":
        certfile, keyfile = write_self_signed(tmp_path)
        extra = f"ssl_certfile = {certfile}\nssl_keyfile = {keyfile}\n"
    storage = ""
    if kind == "memcached":
        memcached: Memcached = request.getfixturevalue("memcached")
        memcached.flush()
        extra = f"router_port = {free_port()}\n"
        storage = f"[storage]\nbackend = memcached\nservers = {memcached.address}\n"
    scheme = "https" if certfile else "http"
    config.write_text(
        f"[server]\nport = {port}\nendpoint_url = {scheme}://127.0.0.1:{port}\n{extra}"
        f"token_key = {base64.urlsafe_b64encode(os.urandom(32)).decode()}\n"  # a Fernet key
        f"[logging]\noutput = {tmp_path / 'server.log'}\n"
        f"level = warning\n[admin]\nport = 0\n{storage}",
        encoding="utf-8",
    )
    trust = ssl.create_default_context(cafile=str(certfile)) if certfile else None
    proc = subprocess.Popen(
        [sys.executable, "-m", "simplepush.cli", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert proc.poll() is None, f"server exited {proc.returncode}"
        try:
            with urllib.request.urlopen(
                f"{scheme}://127.0.0.1:{port}/status", timeout=1, context=trust
            ):
                break
        except OSError:
            assert time.monotonic() < deadline, "server did not answer /status"
            time.sleep(0.05)
    yield Server(proc, port, certfile)
    proc.kill()
    proc.wait(timeout=START_TIMEOUT)


def bench_command(server: Server, report: Path, *options: str) -> list[str]:
    tls = ("--ca-file", str(server.certfile)) if server.certfile else ()
    return [
        sys.executable,
        "-m",
        "simplepush.bench.cli",
        "--url",
        f"ws{'s' if server.certfile else ''}://127.0.0.1:{server.port}/",
        *tls,
        "--pid",
        str(server.proc.pid),
        "--json",
        str(report),
        "--timeout",
        str(BENCH_TIMEOUT - 10),
        *options,
    ]


def run_bench(server: Server, report: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        bench_command(server, report, *options),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT,
    )


def number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def test_bench_runs_every_phase_against_the_server(server: Server, tmp_path: Path) -> None:
    devices = 50
    path = tmp_path / "report.json"
    options = ["-n", str(devices), "-p", "2", "--phases", "setup,closed,open,soak", "-d", "2"]
    options += [
        "-c",
        "8",
        "--rate",
        "50",
        "--ping-interval",
        "1",
        "--source-ips",
        "127.0.0.1-127.0.0.2",
    ]
    done = run_bench(server, path, *options)
    assert done.returncode == 0, done.stderr
    assert "round trips/s" in done.stderr  # the human table
    report = json.loads(path.read_text())
    assert report["completed"] is True and report["aborted"] is None
    assert report["server_processes"] == [server.proc.pid]
    phases, summary = report["phases"], report["summary"]
    assert list(phases) == ["setup", "closed", "open", "soak"]

    setup = phases["setup"]
    assert setup["devices_connected"] == devices == setup["devices_at_end"]
    assert setup["setup_errors"] == 0 and setup["setup_errors_by_kind"] == {}
    assert setup["setup_rate_per_s"] > 0
    assert setup["server_cpu_ms_per_setup"] > 0
    assert setup["rss_kb_per_device_total"] > 0
    # The delta is a difference of two RSS readings: usually positive, but not a law.
    assert number(setup["rss_kb_per_device_setup_delta"])

    for name in ("closed", "open"):
        loop = phases[name]
        assert loop["round_trips"] > 0 and loop["round_trips"] == loop["puts_sent"]
        latency = loop["latency_ms"]
        assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert (loop["errors"], loop["timeouts"], loop["stored"]) == (0, 0, 0)
        assert loop["server_cpu_us_per_round_trip"] > 0
        assert loop["client_cpu_us_per_round_trip"] > 0
        assert loop["sockets_dropped"] == 0 and loop["devices_at_end"] == devices
    assert phases["open"]["skipped_no_idle_channel"] == 0

    soak = phases["soak"]
    assert soak["pings_sent"] > 0 and soak["pongs_received"] == soak["pings_sent"]
    assert soak["pings_unanswered"] == 0
    assert soak["sockets_dropped"] == 0 and soak["devices_at_end"] == devices
    assert soak["server_rss_kb_after"] > 0

    assert summary["devices_connected"] == devices
    assert (summary["setup_errors"], summary["errors"], summary["timeouts"]) == (0, 0, 0)
    assert summary["sockets_dropped"] == 0
    assert summary["latency_ms_p50"] <= summary["latency_ms_p95"] <= summary["latency_ms_p99"]
    for key in (
        "setup_rate_per_s",
        "server_cpu_ms_per_setup",
        "round_trips_per_s",
        "server_cpu_us_per_round_trip",
        "client_cpu_us_per_round_trip",
        "rss_kb_per_device_total",
    ):
        assert summary[key] > 0, key
    assert number(summary["rss_kb_per_device_setup_delta"])


@pytest.mark.parametrize("server", ["tls"], indirect=True)
def test_bench_speaks_wss_and_https_to_a_tls_server(server: Server, tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    options = ["-n", "20", "-p", "1", "--phases", "setup,closed", "-d", "1", "-c", "4"]
    done = run_bench(server, path, *options)
    assert done.returncode == 0, done.stderr
    phases = json.loads(path.read_text())["phases"]
    assert phases["setup"]["devices_connected"] == 20
    assert phases["setup"]["setup_errors_by_kind"] == {}
    closed = phases["closed"]
    assert closed["round_trips"] > 0 and closed["round_trips"] == closed["puts_sent"]
    assert (closed["errors"], closed["timeouts"], closed["stored"]) == (0, 0, 0)


def test_soak_counts_the_sockets_of_a_killed_server_as_dropped(
    server: Server, tmp_path: Path
) -> None:
    devices = 20
    path = tmp_path / "report.json"
    options = ["-n", str(devices), "-p", "2", "--phases", "soak", "--soak-duration", "4"]
    bench = subprocess.Popen(
        bench_command(server, path, *options, "--ping-interval", "1"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert bench.stderr is not None
        for line in bench.stderr:  # the bench exits by itself within --timeout
            if "phase soak starts" in line:
                break
        time.sleep(1)  # into the 4 s soak; a drop just before it would count in it too
        server.proc.send_signal(signal.SIGKILL)
        _, err = bench.communicate(timeout=BENCH_TIMEOUT)
    finally:
        bench.kill()
    assert bench.returncode == 0, err
    report = json.loads(path.read_text())
    soak = report["phases"]["soak"]
    assert report["phases"]["setup"]["devices_connected"] == devices
    assert soak["sockets_dropped"] == devices == report["summary"]["sockets_dropped"]
    assert soak["devices_at_end"] == 0
    assert soak["server_cpu_ms"] is None  # nothing left to sample


@pytest.mark.parametrize("server", ["memory", "memcached"], indirect=True)
def test_bench_webpush_mode_posts_with_vapid_and_every_message_arrives(
    server: Server, tmp_path: Path
) -> None:
    devices = 30
    path = tmp_path / "report.json"
    options = ["--webpush", "-n", str(devices), "-p", "2", "--phases", "setup,closed,open"]
    options += ["-d", "2", "-c", "6", "--rate", "40"]
    done = run_bench(server, path, *options)
    assert done.returncode == 0, done.stderr
    assert "(webpush)" in done.stderr  # the human table names the mode
    report = json.loads(path.read_text())
    assert report["completed"] is True and report["config"]["protocol"] == "webpush"
    phases, summary = report["phases"], report["summary"]

    setup = phases["setup"]
    # hello echoed use_webpush and register accepted the key, on every device
    assert setup["devices_connected"] == devices == setup["devices_at_end"]
    assert setup["setup_errors_by_kind"] == {}
    assert setup["server_cpu_ms_per_setup"] > 0

    for name in ("closed", "open"):
        loop = phases[name]
        # every POST got 201 and its body reached the device as data, with a string version
        seen = {key: loop[key] for key in ("puts_sent", "errors_by_kind", "timeouts")}
        assert loop["round_trips"] > 0 and loop["round_trips"] == loop["puts_sent"], seen
        assert (loop["errors"], loop["timeouts"], loop["stored"]) == (0, 0, 0), seen
        assert (loop["protocol_errors"], loop["sockets_dropped"]) == (0, 0)
        assert loop["devices_at_end"] == devices
        latency = loop["latency_ms"]
        assert 0 <= latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
        assert loop["server_cpu_us_per_round_trip"] > 0
    assert phases["open"]["skipped_no_idle_channel"] == 0
    assert (summary["errors"], summary["timeouts"], summary["sockets_dropped"]) == (0, 0, 0)


def test_vapid_per_post_signs_every_post_anew_and_needs_webpush(
    server: Server, tmp_path: Path
) -> None:
    """ES256 signatures are randomised: every header differs, so no server cache can answer."""
    vapid = Vapid.generate()
    origin = "http://127.0.0.1:8080"
    assert vapid.headers(origin) != vapid.headers(origin)
    refused = subprocess.run(
        [sys.executable, "-m", "simplepush.bench.cli", "--vapid-per-post", "-n", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2
    assert "--vapid-per-post goes with --webpush" in refused.stderr
    path = tmp_path / "report.json"
    options = ["--webpush", "--vapid-per-post", "-n", "10", "-p", "1", "-d", "1", "-c", "4"]
    done = run_bench(server, path, *options)
    assert done.returncode == 0, done.stderr
    report = json.loads(path.read_text())
    assert report["config"]["vapid_per_post"] is True
    closed = report["phases"]["closed"]
    assert closed["round_trips"] > 0 and closed["round_trips"] == closed["puts_sent"]
    assert (closed["errors"], closed["timeouts"]) == (0, 0), closed["errors_by_kind"]
