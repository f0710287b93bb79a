"""The operator dashboard's admin listener and /api/stats (issue 7), over real sockets.

A known workload (N devices, M updates, K acks; SimplePush PUTs and
WebPush POSTs, counted apart) is driven over the wire against the console
script, with one process and with `processes = 2` on a real memcached,
and /api/stats must count exactly that. Waits are for the
once-a-second sampler to show the numbers, bounded; nothing times the
server. The admin listener wants its token when one is set and is not
reachable through the public port; a bad [admin] setting exits 2.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import time
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from simplepush.stats import RATES, Sample, Stats, Worker, bucket, bucket_ms, percentiles, view
from tests.conftest import free_port, new_id
from tests.test_cli import SCRIPT, Server, assert_config_error, launch, run_cli

# fixtures of the cluster tests: memcached and supervised servers logging to a file
from tests.test_cluster import (  # noqa: F401
    Device,
    Response,
    call,
    cluster,
    memcached_proc,
    notification,
    put,
    token_key,
    wait_until,
    worker_pids,
)

# Bounds for waiting on the sampler (one sample a second) and processes.
STATS_TIMEOUT = 10.0
EXIT_TIMEOUT = 5.0
TOKEN = "s3cret-dashboard-token-0123456789"
MAX_QUEUED = 100  # [server] max_queued's default: WebPush messages waiting per channel
MAX_WEBPUSH_BODY = 4096
SEVERITY_WARNING = 4  # syslog's, as the mozlog envelope gives it


class WebPushDevice(Device):
    """A device that says hello with use_webpush; versions are opaque strings."""

    def hello(self, uaid: str = "", channel_ids: list[str] | None = None) -> None:
        reply = self.request({"messageType": "hello", "use_webpush": True})
        self.uaid = reply.get("uaid", "")
        assert (reply.get("status"), reply.get("use_webpush")) == (200, True), reply

    def register(self, chid: str, key: str = "") -> str:
        """The pushEndpoint: /wpush/v1/ without a key, /wpush/v2/ (VAPID required) with one."""
        frame = {"messageType": "register", "channelID": chid, **({"key": key} if key else {})}
        reply = self.request(frame)
        endpoint = reply.get("pushEndpoint", "")
        assert reply.get("status") == 200 and f"/wpush/v{2 if key else 1}/" in endpoint, reply
        return endpoint

    def unregister(self, chid: str) -> None:
        reply = self.request({"messageType": "unregister", "channelID": chid, "code": 200})
        assert (reply.get("messageType"), reply.get("status")) == ("unregister", 200), reply

    def receive(self, chid: str) -> str:
        """The next notification, which must be for chid; its version."""
        frame = self.recv()
        assert (frame.get("messageType"), frame.get("channelID")) == ("notification", chid), frame
        return frame["version"]

    def ack_version(self, chid: str, version: str) -> None:
        """Ack, then ping, so that the ack is handled when this returns."""
        update = {"channelID": chid, "version": version, "code": 100}
        self.send({"messageType": "ack", "updates": [update]})
        assert self.request("{}") == {}


def post(endpoint: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Response:
    """A WebPush POST with `TTL: 60` unless headers say otherwise (None drops a header)."""
    sent = {"TTL": "60", **(headers or {})}
    return call("POST", endpoint, body, {k: v for k, v in sent.items() if v is not None})


def p256_key() -> str:
    """A fresh P-256 public key as a register's `key`: an uncompressed point, b64url."""
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    )
    return urlsafe_b64encode(point).rstrip(b"=").decode("ascii")


def admin_get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET path, query included, on a fresh connection; any status is returned."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=EXIT_TIMEOUT)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def stats(port: int, query: str = "", token: str = "") -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    status, body = admin_get(port, f"/api/stats{query}", headers)
    assert status == 200, (status, body)
    return json.loads(body)


def stats_when(
    port: int, condition: Callable[[dict[str, Any]], bool], what: str, token: str = ""
) -> dict[str, Any]:
    """The first /api/stats view meeting condition, asked a few times a second."""
    deadline = time.monotonic() + STATS_TIMEOUT
    while True:
        current = stats(port, token=token)
        if current["t"] is not None and condition(current):
            return current
        if time.monotonic() > deadline:
            pytest.fail(f"waited {STATS_TIMEOUT} s for {what}; last view: {current}")
        time.sleep(0.2)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., tuple[Server, int]]]:
    """start(token=..., key=...) -> (a console-script server with its dashboard on, its admin
    port); it logs JSON to its stdout file, and `key` is its token_key (default: a fresh one)."""
    started: list[Server] = []

    def _start(key: str | None = None, **admin: str) -> tuple[Server, int]:
        port = free_port()
        server = launch(
            SCRIPT,
            tmp_path,
            key,
            admin={"port": str(port), **admin},
            output="stdout",
            level="info",
        )
        started.append(server)
        return server, port

    yield _start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(timeout=EXIT_TIMEOUT)


def workload(server: Any, devices: int, connect: Callable[..., Device]) -> list[Device]:
    """Each device: hello, register, one PUT delivered live, one ack. Returns the devices."""
    opened = []
    for _ in range(devices):
        device = connect(server)
        device.hello()
        chid = new_id()
        endpoint = device.register(chid)
        assert put(endpoint, "version=1")[:2] == (200, b"{}")
        assert device.recv() == notification((chid, 1))
        device.ack((chid, 1))
        opened.append(device)
    return opened


def webpush_workload(server: Any, devices: int, connect: Callable[..., Device]) -> list[Any]:
    """Each WebPush device: hello, register, one POST delivered live (201), one ack."""
    opened = []
    for _ in range(devices):
        device = connect(server, WebPushDevice)
        device.hello()
        chid = new_id()
        endpoint = device.register(chid)
        assert post(endpoint).status == 201
        device.ack_version(chid, device.receive(chid))
        opened.append(device)
    return opened


@pytest.fixture
def connect() -> Iterator[Callable[..., Device]]:
    """connect(server, kind=Device): a device's socket, closed at teardown."""
    opened: list[Device] = []

    def _connect(server: Any, kind: type[Device] = Device) -> Device:
        device = kind(server)
        opened.append(device)
        return device

    yield _connect
    for device in opened:
        device.ws.close(timeout=0)


def settled(expected: dict[str, int]) -> Callable[[dict[str, Any]], bool]:
    return lambda current: all(current["totals"].get(k, 0) == v for k, v in expected.items())


def logged_problems(records: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Warning and error events among log records, by Type: what "errors by kind" must count."""
    counts: dict[str, int] = {}
    for record in records:
        if record["Severity"] <= SEVERITY_WARNING:
            counts[record["Type"]] = counts.get(record["Type"], 0) + 1
    return counts


def error_totals(current: dict[str, Any]) -> dict[str, int]:
    return {kind: counts["total"] for kind, counts in current["errors"].items()}


def test_one_process_counts_a_known_workload(start, connect):
    server, admin = start()
    devices = workload(server, 4, connect)
    chid = new_id()
    endpoint = devices[1].register(chid)
    devices[1].disconnect()
    assert put(endpoint, "version=5")[:2] == (202, b"{}")  # stored: the device left
    assert put(endpoint, "version=abc").status == 400
    assert put(server.url("/update/not-a-token"), "version=1").status == 404
    assert put(endpoint, "data=" + "x" * 5000).status == 413

    expected = {
        "client.socket.connect": 4,
        "client.socket.disconnect": 1,
        "updates.client.hello": 4,
        "updates.client.register": 5,
        "updates.client.ack": 4,
        "updates.sent": 4,
        "updates.appserver.incoming": 8,
        "put.delivered": 4,
        "put.stored": 1,
        "put.invalid": 1,
        "put.invalid_token": 1,
        "put.too_long": 1,
    }
    current = stats_when(
        admin,
        lambda v: settled(expected)(v) and v["devices"] == 3 and v["storage"]["rtt_ms"] is not None,
        "the workload's totals",
    )
    assert "put.routed" not in current["totals"]
    assert (current["devices"], current["connections"]) == (3, 3)
    assert current["latency_ms"]["count"] == 4
    p50, p95, p99 = (current["latency_ms"][key] for key in ("p50", "p95", "p99"))
    assert 0 < p50 <= p95 <= p99
    assert current["storage"]["ok"] is True and current["storage"]["rtt_ms"] is not None
    assert current["memory_bytes"] > 0
    # Whatever the start-up warned about (the open-file limit, say) is counted, and nothing else.
    assert error_totals(current) == logged_problems(map(json.loads, server.output()))
    [row] = current["workers"]
    assert (row["index"], row["pid"], row["up"], row["devices"]) == (0, server.proc.pid, True, 3)
    assert row["memory_bytes"] == current["memory_bytes"]

    # The plotted per-second series add up to the same events.
    series = current["series"]
    spans = series["span"]
    events = {"connect": 4, "delivered": 4, "stored": 1, "acks": 4, "updates": 8, "rejected": 3}
    for key, total in events.items():
        assert round(sum(r * s for r, s in zip(series[key], spans, strict=True))) == total, key

    # The same second asked for again gives the same numbers; `since` trims the series.
    again = stats(admin, f"?at={current['t']}&since={current['t'] - 3}")
    assert {k: v for k, v in again.items() if k != "series"} == {
        k: v for k, v in current.items() if k != "series"
    }
    assert again["series"]["t"] == [t for t in series["t"] if t > current["t"] - 3]


def test_the_warnings_of_the_start_are_counted(start):
    """Logged before the first sample, they once counted from it and the dashboard showed 0."""
    server, admin = start(key="")  # warns: a key for this run only
    current = stats_when(admin, lambda v: v["error_events"]["total"] > 0, "the start's warnings")
    logged = logged_problems(map(json.loads, server.output()))
    assert logged.get("config.warning", 0) >= 1
    assert error_totals(current) == logged
    assert current["error_events"]["total"] == sum(logged.values())
    assert current["start_t"] <= current["t"]


def test_one_process_counts_a_known_webpush_workload_apart_from_the_puts(start, connect):
    server, admin = start()
    workload(server, 2, connect)  # 2 PUTs delivered live
    devices = webpush_workload(server, 3, connect)
    # Stored for a device that left, until the channel is full: 201s, then one 429.
    chid = new_id()
    endpoint = devices[0].register(chid)
    devices[0].disconnect()
    stored = 0
    while (status := post(endpoint).status) == 201 and stored <= MAX_QUEUED:
        stored += 1
    assert (status, stored) == (429, MAX_QUEUED)
    assert post(endpoint, headers={"TTL": None}).status == 400
    assert post(server.url("/wpush/v1/not-a-token")).status == 404
    too_long = b"x" * (MAX_WEBPUSH_BODY + 1)
    assert post(endpoint, too_long, {"Content-Encoding": "aes128gcm"}).status == 413
    gone = new_id()
    gone_endpoint = devices[1].register(gone)
    devices[1].unregister(gone)
    assert post(gone_endpoint).status == 410
    assert post(devices[2].register(new_id(), p256_key())).status == 401  # no VAPID on v2

    refused = {
        "post.throttled": 1,
        "post.invalid": 1,
        "post.invalid_token": 1,
        "post.too_long": 1,
        "post.unknown_channel": 1,
        "post.unauthorized": 1,
    }
    incoming = 3 + stored + len(refused)
    expected = {
        "updates.appserver.incoming": 2,
        "put.delivered": 2,
        "updates.webpush.incoming": incoming,
        "post.delivered": 3,
        "post.stored": stored,
        **refused,
        "updates.webpush.invalid": 2,
        "updates.webpush.toolong": 1,
        "updates.webpush.gone": 1,
        "updates.webpush.unauthorized": 1,
        "updates.webpush.throttled": 1,
        "updates.client.ack": 5,
    }
    current = stats_when(admin, settled(expected), "the WebPush workload's totals")
    totals = current["totals"]
    assert "post.routed" not in totals and "post.storage_error" not in totals
    assert "updates.webpush.error" not in totals
    # Latency: 3 WebPush deliveries in their own histogram, the PUTs' 2 in theirs.
    webpush = current["webpush"]
    assert webpush["latency_ms"]["count"] == 3 and current["latency_ms"]["count"] == 2
    p50, p95, p99 = (webpush["latency_ms"][key] for key in ("p50", "p95", "p99"))
    assert 0 < p50 <= p95 <= p99
    assert set(webpush["rates"]) == {"incoming", "delivered", "stored", "routed", "rejected"}
    assert set(webpush["rates"]["rejected"]) == {
        "400",
        "401+403",
        "404",
        "410",
        "413",
        "429",
        "500",
        "503",
        "all",  # what the plot's one "rejected or failed" line sums
    }
    assert current["rates"]["rejected"].keys() == {"400", "404", "413", "500", "503", "all"}

    # The WebPush series add up to the workload, and none of it leaks into the PUT ones.
    series = current["series"]
    events = {
        "webpush_incoming": incoming,
        "webpush_delivered": 3,
        "webpush_stored": stored,
        "webpush_routed": 0,
        "webpush_rejected": len(refused),
        "updates": 2,
        "delivered": 2,
        "stored": 0,
        "rejected": 0,
    }
    for key, total in events.items():
        assert round(sum(r * s for r, s in zip(series[key], series["span"], strict=True))) == total
    assert sum(1 for v in series["webpush_p50"] if v is not None) >= 1


def test_two_workers_with_memcached_count_the_whole_machine(request, connect):
    admin = free_port()
    server = request.getfixturevalue("cluster")(processes=2, admin_port=admin)
    workload(server, 20, connect)
    expected = {
        "client.socket.connect": 20,
        "updates.client.hello": 20,
        "updates.client.register": 20,
        "updates.client.ack": 20,
        "updates.sent": 20,
        "updates.appserver.incoming": 20,
    }

    def complete(current: dict[str, Any]) -> bool:
        totals = current["totals"]
        delivered = totals.get("put.delivered", 0) + totals.get("put.routed", 0)
        return settled(expected)(current) and delivered == 20 and current["devices"] == 20

    current = stats_when(admin, complete, "both workers' totals")
    totals = current["totals"]
    # Some PUTs landed on the worker not holding the device and were routed to the other.
    assert totals["put.routed"] > 0
    assert totals["updates.routed.incoming"] == totals["updates.routed.outgoing"]
    assert totals["updates.routed.outgoing"] == totals["put.routed"]
    assert current["latency_ms"]["count"] == 20
    rows = current["workers"]
    assert {row["index"]: row["pid"] for row in rows} == worker_pids(server)
    assert all(row["up"] for row in rows)
    assert sum(row["devices"] for row in rows) == current["devices"] == 20
    assert sum(row["connections"] for row in rows) == current["connections"] == 20
    assert sum(row["memory_bytes"] for row in rows) == current["memory_bytes"]
    assert current["storage"]["ok"] is True


def test_two_workers_count_webpush_routed_between_them(request, connect):
    """POSTs landing on the worker not holding the device are routed, and still timed."""
    admin = free_port()
    server = request.getfixturevalue("cluster")(processes=2, admin_port=admin)
    webpush_workload(server, 20, connect)

    def complete(current: dict[str, Any]) -> bool:
        totals = current["totals"]
        delivered = totals.get("post.delivered", 0) + totals.get("post.routed", 0)
        done = totals.get("updates.webpush.incoming") == 20 and delivered == 20
        return done and current["devices"] == 20

    current = stats_when(admin, complete, "both workers' WebPush totals")
    assert current["totals"]["post.routed"] > 0
    assert current["webpush"]["latency_ms"]["count"] == 20
    assert current["latency_ms"]["count"] == 0
    assert len(current["workers"]) == 2
    series, totals = current["series"], current["totals"]
    for key in ("delivered", "routed"):
        plotted = zip(series[f"webpush_{key}"], series["span"], strict=True)
        assert round(sum(r * s for r, s in plotted)) == totals.get(f"post.{key}", 0), key


@pytest.mark.parametrize("token_key", [""])  # the supervisor warns, before it forks
def test_two_workers_count_their_supervisors_warnings_and_errors_once(request, token_key):  # noqa: F811
    """Every worker inherits the counts its supervisor had when it forked it: counted once,
    the newest copy (a replacement's) bringing the supervisor's later events, worker.died."""
    admin = free_port()
    server = request.getfixturevalue("cluster")(processes=2, admin_port=admin)

    def as_logged(kind: str, count: int) -> Callable[[dict[str, Any]], bool]:
        def check(current: dict[str, Any]) -> bool:
            totals = error_totals(current)
            return totals.get(kind) == count and totals == logged_problems(server.records())

        return check

    stats_when(admin, as_logged("config.warning", 1), "the supervisor's warning, once")
    victim = worker_pids(server)[1]
    os.kill(victim, signal.SIGKILL)
    current = stats_when(admin, as_logged("worker.died", 1), "worker.died, once")
    assert [row["up"] for row in current["workers"]] == [True, True]
    assert error_totals(current)["config.warning"] == 1


def test_a_replaced_worker_0_serves_the_dashboard_again(request):
    """The supervisor keeps the admin socket, as the public ones, for worker 0's replacement."""
    admin = free_port()
    server = request.getfixturevalue("cluster")(processes=2, admin_port=admin)

    def up_pids() -> list[int]:
        try:
            return [row["pid"] for row in stats(admin)["workers"] if row["up"]]
        except (OSError, AssertionError):
            return []  # worker 0 is gone and its replacement not serving yet

    before = worker_pids(server)
    wait_until(lambda: up_pids() == [before[0], before[1]], STATS_TIMEOUT, "both workers")
    os.kill(before[0], signal.SIGKILL)
    wait_until(
        lambda: (
            worker_pids(server)[0] != before[0] and up_pids() == [worker_pids(server)[0], before[1]]
        ),
        STATS_TIMEOUT,
        "the replacement worker 0 to serve the dashboard",
    )


def test_a_storage_outage_shows_as_failed_puts_errors_and_storage_down(request, connect):
    admin = free_port()
    server = request.getfixturevalue("cluster")(processes=1, admin_port=admin)
    memcached = request.getfixturevalue("memcached_proc")
    device = connect(server)
    device.hello()
    endpoint = device.register(new_id())
    memcached.stop()
    assert put(endpoint, "version=2").status == 503
    current = stats_when(
        admin,
        lambda v: v["totals"].get("put.storage_error") == 1 and not v["storage"]["ok"],
        "the outage to show",
    )
    assert current["errors"]["storage.error"]["total"] >= 1
    assert memcached.address in current["storage"]["error"]
    assert memcached.address in current["storage"]["last_error"]
    memcached.start()
    stats_when(admin, lambda v: v["storage"]["ok"], "storage to be healthy again")


# --- the admin listener's doors ------------------------------------------------------------


def test_a_configured_token_is_required_everywhere_on_the_admin_listener(start):
    server, admin = start(token=TOKEN)
    for path in ("/", "/api/stats", "/static/dashboard.js", "/static/dashboard.css"):
        assert admin_get(admin, path)[0] == 401, path
        assert admin_get(admin, path, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401
        assert admin_get(admin, path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200, path
    assert admin_get(admin, "/api/stats?token=nope")[0] == 401
    assert admin_get(admin, f"/api/stats?token={TOKEN}")[0] == 200

    # A browser opens /?token=...: a cookie carries the token on, the address bar loses it.
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=EXIT_TIMEOUT)
    conn.request("GET", f"/?token={TOKEN}")
    response = conn.getresponse()
    response.read()
    assert (response.status, response.headers["Location"]) == (302, "/")
    cookie = response.headers["Set-Cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    cookie_header = {"Cookie": cookie.split(";", 1)[0]}
    status, body = admin_get(admin, "/", cookie_header)
    assert status == 200 and b"/static/dashboard.js" in body
    assert admin_get(admin, "/api/stats", {"Cookie": "simplepush_admin=wrong"})[0] == 401
    assert server.proc.poll() is None


def test_the_dashboard_is_not_served_on_the_public_port_nor_the_public_routes_on_admin(start):
    server, admin = start()
    for path in ("/", "/api/stats", "/static/dashboard.js", "/stats"):
        # Every unknown path is the WebSocket endpoint; a plain GET is told where to go.
        response = call("GET", server.url(path))
        assert response.status == 200, path
        assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert f"http://127.0.0.1:{admin}/" in response.body.decode()
        assert b"rates" not in response.body and b"<html" not in response.body
    assert admin_get(admin, "/api/stats")[0] == 200
    assert admin_get(admin, "/status")[0] == 404
    assert call("PUT", f"http://127.0.0.1:{admin}/update/x", b"version=1").status in (404, 405)
    status, body = admin_get(admin, "/static/dashboard.js")
    assert status == 200 and b"hand-written SVG" in body


def test_the_dashboard_listens_on_router_host_by_default(start):
    _, admin = start()
    with socket.create_connection(("127.0.0.1", admin), timeout=EXIT_TIMEOUT):
        pass


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[admin]\nport = 70000\n", ["[admin] port", "70000"]),
        ("[admin]\nport = web\n", ["[admin] port", "web"]),
        ("[admin]\ntoken = short\n", ["[admin] token", "16"]),
        ("[admin]\ntoken = has a space in it here\n", ["[admin] token"]),
        ("[admin]\ncolour = blue\n", ["[admin] colour", "unknown key"]),
        ("[server]\nport = 9999\n[admin]\nport = 9999\n", ["[admin] port", "[server] port"]),
    ],
    ids=["port-range", "port-word", "token-short", "token-space", "unknown-key", "public-port"],
)
def test_a_bad_admin_setting_exits_2_with_one_line(tmp_path, text, fragments):
    config = tmp_path / "bad.ini"
    config.write_text(text, encoding="utf-8")
    result = run_cli(SCRIPT, "--config", str(config), cwd=tmp_path)
    assert_config_error(result, [str(config), *fragments])


def test_a_busy_admin_port_exits_2_with_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "busy.ini"
        config.write_text(f"[server]\nport = {free_port()}\n[admin]\nport = {port}\n")
        result = run_cli(SCRIPT, "--config", str(config), cwd=tmp_path)
    assert_config_error(result, [str(config), "[admin] port", str(port), "in use"])


# --- the pure core --------------------------------------------------------------------------


def test_latency_buckets_are_within_nine_percent_and_percentiles_rank_them():
    for ms in (0.02, 0.5, 1.0, 3.3, 42.0, 999.0):
        assert ms <= bucket_ms(bucket(ms)) <= ms * 1.091
    histogram: dict[int, int] = {}
    for ms in [1.0] * 50 + [10.0] * 45 + [100.0] * 5:
        histogram[bucket(ms)] = histogram.get(bucket(ms), 0) + 1
    assert percentiles(histogram, (0.5, 0.95, 0.99)) == [
        round(bucket_ms(bucket(ms)), 3) for ms in (1.0, 10.0, 100.0)
    ]
    assert percentiles({}, (0.5,)) == [None]


def test_workers_add_up_second_by_second_and_a_silent_one_does_not_hold_the_view():
    def sample(t: int, delivered: int, devices: int) -> Sample:
        gauges = {"devices": devices, "connections": devices, "memory_bytes": 100, "storage_ok": 1}
        return Sample(t, 1, {"put.delivered": delivered}, {bucket(1.0): delivered}, gauges)

    a, b = Worker(0, 10), Worker(1, 11)
    for t in range(100, 110):
        a.samples.append(sample(t, 2, 5))
        b.samples.append(sample(t, 3, 7))
    a.totals = {"put.delivered": 20}
    b.totals = {"put.delivered": 30}
    both = view([a, b])
    assert (both["t"], both["devices"], both["memory_bytes"]) == (109, 12, 200)
    assert both["rates"]["delivered"] == 5.0
    assert both["series"]["delivered"] == [5.0] * 10
    assert both["totals"] == {"put.delivered": 50}
    assert view([a, b], at=105)["totals"] == {"put.delivered": 30}
    for t in range(110, 120):
        a.samples.append(sample(t, 2, 5))
    a.totals = {"put.delivered": 40}
    alone = view([a, b])
    assert alone["t"] == 119 and alone["devices"] == 5
    assert [row["up"] for row in alone["workers"]] == [True, False]


def test_the_supervisors_counts_are_taken_once_from_the_newest_copy_and_the_axis_from_start():
    def sample(t: int) -> Sample:
        return Sample(t, 1, {}, {}, {"devices": 0})

    a, b = Worker(0, 10), Worker(1, 11)
    a.samples.extend(sample(t) for t in range(100, 110))
    b.samples.extend(sample(t) for t in range(105, 110))  # replaced at 105
    a.totals = {"error.storage.warning": 1}
    a.inherited = {"error.config.warning": 1}
    b.inherited = {"error.config.warning": 1, "error.worker.died": 1}
    current = view([a, b])
    assert {kind: e["total"] for kind, e in current["errors"].items()} == {
        "config.warning": 1,
        "storage.warning": 1,
        "worker.died": 1,
    }
    assert current["error_events"]["total"] == 3
    assert current["start_t"] == 100


def test_webpush_deliveries_have_their_own_histogram_rates_and_series():
    stats = Stats()
    for name, count in {
        "updates.appserver.incoming": 2,
        "put.delivered": 2,
        "updates.webpush.incoming": 12,
        "post.delivered": 4,
        "post.routed": 1,
        "post.stored": 2,
        "post.invalid": 1,
        "post.unauthorized": 2,
        "post.unknown_channel": 1,
        "post.throttled": 1,
    }.items():
        stats.incr(name, count)
    for ms in (1.0, 1.0):
        stats.delivered(ms)
    for ms in (5.0, 5.0, 5.0, 5.0, 80.0):
        stats.delivered(ms, webpush=True)
    stats.take(100, {"devices": 3}, {})
    current = view([Worker(0, 10, stats.samples, stats.totals, stats.status)])

    webpush = current["webpush"]
    assert webpush["rates"] == {
        "incoming": 12.0,
        "delivered": 4.0,
        "stored": 2.0,
        "routed": 1.0,
        "rejected": {
            "400": 1.0,
            "401+403": 2.0,
            "404": 0.0,
            "410": 1.0,
            "413": 0.0,
            "429": 1.0,
            "500": 0.0,
            "503": 0.0,
            "all": 5.0,
        },
    }
    five, eighty = (round(bucket_ms(bucket(ms)), 3) for ms in (5.0, 80.0))
    assert webpush["latency_ms"] == {"p50": five, "p95": eighty, "p99": eighty, "count": 5}
    # The PUT numbers keep their keys and count only PUTs.
    assert current["latency_ms"]["count"] == 2
    assert (current["rates"]["updates"], current["rates"]["delivered"]) == (2.0, 2.0)
    assert set(current["rates"]) == {*RATES, "rejected"}
    assert set(current["rates"]["rejected"]) == {"400", "404", "413", "500", "503", "all"}
    assert current["workers"][0]["webpush"] == {
        "rates": {"incoming": 12.0, "delivered": 4.0, "stored": 2.0, "routed": 1.0}
    }
    series = current["series"]
    assert (series["webpush_incoming"], series["webpush_rejected"]) == ([12.0], [5.0])
    assert (series["webpush_p50"], series["webpush_p99"], series["p50"]) == (
        [five],
        [eighty],
        [round(bucket_ms(bucket(1.0)), 3)],
    )


def test_webpush_latency_crosses_between_workers_and_an_older_export_still_reads():
    """The per-second export is JSON on the wire (internal.py); worker 0 adds up second t."""
    workers = [Worker(0, 0), Worker(1, 0)]
    for index, ms in enumerate((2.0, 20.0)):
        stats = Stats()
        stats.incr("updates.webpush.incoming", 3)
        stats.incr("post.routed", 3)
        for _ in range(3):
            stats.delivered(ms, webpush=True)
        stats.take(200, {"devices": 1}, {})
        workers[index].absorb(json.loads(json.dumps(stats.export(0, 100 + index))))
    both = view(workers)
    assert both["webpush"]["rates"]["incoming"] == 6.0
    assert both["webpush"]["latency_ms"]["count"] == 6
    assert both["webpush"]["latency_ms"]["p99"] == round(bucket_ms(bucket(20.0)), 3)
    assert both["latency_ms"]["count"] == 0

    old = {"t": 201, "span": 1, "counts": {}, "latency": {"3": 1}, "gauges": {}}
    sample = Sample.from_json(old)
    assert (sample.latency, sample.webpush_latency) == ({3: 1}, {})
    assert Sample.from_json(sample.to_json()) == sample
