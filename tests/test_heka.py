"""contrib/heka/hekad.toml run by a real hekad, fed by a real server (issue 16).

hekad is Mozilla Heka 0.10.0 as built in ../shared/heka (beside the repo);
the test fails, saying so, when it is missing. The shipped config runs with
a few values substituted (heka_substitutions: its paths, and ports the OS
picked free) and one test-only output added: a FileOutput of every
simplepush and statmetric message in Heka's protobuf stream, which
heka-cat prints as JSON.

One scenario, shared by the module: the console script logs JSON at debug
to <log_directory>/simplepush.log and sends statsd to hekad; devices do a
full session (hello, register, PUT, ack, unregister), more PUTs (delivered,
stored, refused), WebPush POSTs; then the log file is moved to
simplepush.log.1 and the server sent SIGHUP, more traffic goes to the new
file, and the server stops. Then, polling with deadlines:
- every line of both files arrives once, in order, decoded: Type,
  Severity, Pid, Hostname, Logger, Timestamp (the line's, to the ns) and
  every field;
- the statsd numbers Heka accumulated are the server's own counts;
- Heka's dashboard (DashboardOutput, on 127.0.0.1) serves each graph's
  circular buffer, holding those same numbers, and the log events by Type
  and Severity.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from simplepush.bench.shared import shared_dir
from tests.conftest import free_port, new_id
from tests.test_cli import EXIT_TIMEOUT, SCRIPT, Server, launch
from tests.test_cluster import Device, notification, put
from tests.test_dashboard import WebPushDevice, post, stats_when
from tests.test_docs import emitted

REPO = Path(__file__).resolve().parents[1]
HEKA = shared_dir() / "heka"
HEKAD, HEKA_CAT = HEKA / "bin" / "hekad", HEKA / "bin" / "heka-cat"
SHIPPED = REPO / "contrib" / "heka" / "hekad.toml"
# The shipped config's [metrics] prefix, as its stat names spell it.
PREFIX = "simplepush"
# Bounds for waiting on hekad (rescan every 2 s, stats and graphs every 5 s), not thresholds.
START_TIMEOUT = 10.0
ARRIVAL_TIMEOUT = 30.0
POLL = 0.25

# The test-only output: what hekad decoded and accumulated, for heka-cat.
TEST_OUTPUT = """
[TestOutput]
type = "FileOutput"
message_matcher = "Logger == 'simplepush' || Type == 'heka.statmetric'"
path = "{path}"
encoder = "ProtobufEncoder"
flush_interval = 100

[ProtobufEncoder]
"""


def heka_substitutions(tmp: Path, statsd_port: int, dashboard_port: int) -> dict[str, str]:
    """Shipped text -> this run's: the paths an operator adapts, and free ports."""
    return {
        'base_dir = "/var/cache/hekad"': f'base_dir = "{tmp / "heka"}"',
        'share_dir = "/usr/share/heka"': f'share_dir = "{HEKA / "share" / "heka"}"',
        'log_directory = "/var/log/simplepush"': f'log_directory = "{tmp / "log"}"',
        '"/etc/heka/log_events.lua"': f'"{REPO / "contrib" / "heka" / "log_events.lua"}"',
        '"127.0.0.1:8125"': f'"127.0.0.1:{statsd_port}"',
        '"127.0.0.1:4352"': f'"127.0.0.1:{dashboard_port}"',
    }


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def library_path(tmp: Path) -> Path:
    """A directory of links to ../shared/heka/lib's libraries, for LD_LIBRARY_PATH.

    hekad finds lib/ by its RUNPATH, but a copy of shared/ that turned lib/'s
    symlinks into small files naming their target (this machine's did) leaves
    the loader a "file too short": here each name links to the real library.
    """
    links = tmp / "heka-lib"
    links.mkdir()
    for entry in (HEKA / "lib").iterdir():
        target = entry
        for _ in range(4):  # libluasandbox.so -> .so.0 -> .so.0.10.2
            with target.open("rb") as handle:
                if handle.read(4) == b"\x7fELF":
                    break
            target = target.with_name(target.read_text(encoding="utf-8").strip())
        (links / entry.name).symlink_to(target)
    return links


@dataclass
class Heka:
    """A running hekad on the shipped config, and what it wrote."""

    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    log_directory: Path
    statsd_port: int
    dashboard_port: int
    output: Path
    stdout: Path

    def messages(self) -> list[dict[str, Any]]:
        """Every message of the test output so far, as heka-cat's JSON (a record still being
        written is left for the next call)."""
        if not self.output.exists():
            return []
        result = subprocess.run(
            [str(HEKA_CAT), "-format=json", str(self.output)],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=EXIT_TIMEOUT,
        )
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]

    def dashboard(self, path: str) -> bytes:
        url = f"http://127.0.0.1:{self.dashboard_port}/{path}"
        with urllib.request.urlopen(url, timeout=EXIT_TIMEOUT) as response:
            return response.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=EXIT_TIMEOUT)


def start_heka(tmp: Path) -> Heka:
    """hekad on the shipped config with heka_substitutions, every input and the dashboard up."""
    if not HEKAD.is_file() or not HEKA_CAT.is_file():
        pytest.fail(
            f"{HEKAD} or {HEKA_CAT} is missing: the Heka test runs the real hekad 0.10"
            " that shared/heka holds: beside the repository, in /work/shared or in"
            " $SIMPLEPUSH_SHARED (simplepush/bench/shared.py; see shared/heka/README.md)"
        )
    env = {**os.environ, "LD_LIBRARY_PATH": str(library_path(tmp))}
    text = SHIPPED.read_text(encoding="utf-8")
    statsd_port, dashboard_port = free_udp_port(), free_port()
    for shipped, ours in heka_substitutions(tmp, statsd_port, dashboard_port).items():
        assert text.count(shipped) == 1, f"contrib/heka/hekad.toml no longer has {shipped}"
        text = text.replace(shipped, ours)
    output = tmp / "heka-test-output.pb"
    config = tmp / "hekad.toml"
    config.write_text(text + TEST_OUTPUT.format(path=output), encoding="utf-8")
    (tmp / "log").mkdir(exist_ok=True)  # the config says it must exist; hekad stops without it
    stdout = tmp / "hekad.out"
    with stdout.open("wb") as out:
        proc = subprocess.Popen(
            [str(HEKAD), f"-config={config}"], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    heka = Heka(proc, env, tmp / "log", statsd_port, dashboard_port, output, stdout)
    inputs = ("SimplepushLogInput", "StatsdInput", "StatAccumInput")

    def up() -> bool:
        assert proc.poll() is None, f"hekad exited {proc.returncode}: {stdout.read_text()}"
        started = stdout.read_text(encoding="utf-8", errors="replace")
        if not all(f"Input started: {name}" in started for name in inputs):
            return False
        try:
            heka.dashboard("")
        except OSError:
            return False
        return True

    try:
        poll(up, START_TIMEOUT, "hekad to start its inputs and dashboard")
    except BaseException:
        heka.stop()
        raise
    return heka


T = TypeVar("T")


def poll(get: Callable[[], T], timeout: float, what: str) -> T:
    """get()'s first truthy answer, asked every POLL seconds; fails after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        answer = get()
        if answer:
            return answer
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(POLL)


def start_server(tmp: Path, heka: Heka, admin_port: int, level: str = "debug") -> Server:
    """The console script logging JSON to heka's log directory and sending it statsd."""
    return launch(
        SCRIPT,
        tmp,
        admin={"port": str(admin_port)},
        storage={"backend": "memory"},
        metrics={
            "statsd_host": "127.0.0.1",
            "statsd_port": str(heka.statsd_port),
            "prefix": PREFIX,
        },
        format="json",
        output=str(heka.log_directory / "simplepush.log"),
        level=level,
    )


# --- the scenario ---------------------------------------------------------------


@dataclass
class Run:
    heka: Heka
    raw: list[str]  # simplepush.log.1's lines, then the new simplepush.log's
    lines: list[dict[str, Any]]  # the same, parsed
    totals: dict[str, int]  # the server's own counters, /api/stats `totals`
    puts: int  # PUTs sent


def session(server: Server) -> int:
    """A full SimplePush session and refused PUTs, then WebPush; returns the PUTs sent (10)."""
    device = Device(server)
    device.hello()
    first, second = new_id(), new_id()
    endpoint = device.register(first)
    assert put(endpoint, "version=1").status == 200
    assert device.recv() == notification((first, 1))
    device.ack((first, 1))
    assert device.request({"messageType": "unregister", "channelID": first})["status"] == 200
    other = device.register(second)
    for version in range(1, 6):
        assert put(other, f"version={version}").status == 200
        assert device.recv() == notification((second, version))
        device.ack((second, version))
    assert put(endpoint, "version=2").status == 404  # unregistered: rejected
    assert put(server.url("/update/not-a-token"), "version=1").status == 404  # invalid
    assert put(other, "version=6&data=" + "x" * 5000).status == 413  # too long
    device.disconnect()
    assert put(other, "version=7").status == 202  # stored for the device
    pusher = WebPushDevice(server)
    pusher.hello()
    chid = new_id()
    push_endpoint = pusher.register(chid)
    assert post(push_endpoint).status == 201
    pusher.ack_version(chid, pusher.receive(chid))
    assert post(server.url("/wpush/v1/not-a-token")).status == 404
    assert post(push_endpoint, headers={"TTL": None}).status == 400
    pusher.unregister(chid)
    pusher.disconnect()
    return 10


def after_rotation(server: Server) -> int:
    device = Device(server)
    device.hello()
    chid = new_id()
    endpoint = device.register(chid)
    for version in (1, 2):
        assert put(endpoint, f"version={version}").status == 200
        assert device.recv() == notification((chid, version))
        device.ack((chid, version))
    device.disconnect()
    return 2


def raw_lines(*paths: Path) -> list[str]:
    return [line for path in paths for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("heka")
    heka = start_heka(tmp)
    admin_port = free_port()
    try:
        server = start_server(tmp, heka, admin_port)
        try:
            puts = session(server)
            log_file = heka.log_directory / "simplepush.log"
            rotated = log_file.rename(heka.log_directory / "simplepush.log.1")
            server.proc.send_signal(signal.SIGHUP)
            poll(
                lambda: log_file.exists() and b'"logging.reopened"' in log_file.read_bytes(),
                START_TIMEOUT,
                "the server to reopen simplepush.log",
            )
            puts += after_rotation(server)
            # Every PUT and every socket counted: the totals are final. (The dashboard
            # samples the workers: an older sample can have its sockets all closed too.)
            final = stats_when(
                admin_port,
                lambda view: (
                    view["connections"] == 0
                    and view["totals"].get("updates.appserver.incoming") == puts
                    and view["totals"].get("client.socket.disconnect")
                    == view["totals"].get("client.socket.connect")
                ),
                "every device socket to be closed",
            )
            assert server.stop() == 0
        finally:
            if server.proc.poll() is None:
                server.proc.kill()
                server.proc.wait(timeout=EXIT_TIMEOUT)
        raw = raw_lines(rotated, log_file)
        yield Run(heka, raw, [json.loads(line) for line in raw], final["totals"], puts)
    finally:
        heka.stop()


# --- what arrived -----------------------------------------------------------------

_VALUE_KEYS = {0: "value_string", 1: "value_bytes", 2: "value_integer", 3: "value_double"}


def fields_of(message: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """A heka-cat message's fields: name -> (kind, value), kind string, number or bool."""
    fields = {}
    for field in message.get("fields", []):
        kind = field.get("value_type", 0)
        if kind == 4:
            fields[field["name"]] = ("bool", field["value_bool"][0])
        elif kind == 0:
            fields[field["name"]] = ("string", field["value_string"][0])
        else:
            fields[field["name"]] = ("number", field[_VALUE_KEYS[kind]][0])
    return fields


def expected_fields(line: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    """What json.lua makes of a line's EnvVersion and Fields: Fields.<key>, as util.lua's
    table_to_fields flattens it (a list's items as Fields.<key>.1, .2, ...; null dropped)."""
    fields = {"EnvVersion": ("string", line["EnvVersion"])}

    def flatten(name: str, value: Any) -> None:
        if isinstance(value, dict | list):
            items = value.items() if isinstance(value, dict) else enumerate(value, 1)
            for key, item in items:
                flatten(f"{name}.{key}", item)
        elif isinstance(value, bool):
            fields[name] = ("bool", value)
        elif isinstance(value, int | float):
            fields[name] = ("number", value)
        elif value is not None:
            fields[name] = ("string", value)

    flatten("Fields", line["Fields"])
    return fields


def log_messages(heka: Heka, lines: int) -> list[dict[str, Any]] | None:
    messages = [m for m in heka.messages() if m.get("logger") == "simplepush"]
    return messages if len(messages) >= lines else None


def test_every_line_arrives_once_in_order_decoded_to_the_nanosecond(run):
    messages = poll(
        lambda: log_messages(run.heka, len(run.lines)),
        ARRIVAL_TIMEOUT,
        f"hekad to decode all {len(run.lines)} lines",
    )
    # Once and in order, across the rotation: the raw lines, kept as payloads.
    assert [m["payload"] for m in messages] == [line + "\n" for line in run.raw]
    types = collections.Counter(line["Type"] for line in run.lines)
    assert {"server.start", "websocket.hello", "update.received", "logging.reopened"} <= set(types)
    assert {"server.stop", "webpush.received", "websocket.ack"} <= set(types)
    for line, message in zip(run.lines, messages, strict=True):
        assert message["timestamp"] == line["Timestamp"], (line, message)
        header = {key: message.get(key) for key in ("type", "severity", "pid", "hostname")}
        assert header == {
            "type": line["Type"],
            "severity": line["Severity"],
            "pid": line["Pid"],
            "hostname": line["Hostname"],
        }, line
        assert fields_of(message) == expected_fields(line), line


def counter_sums(messages: list[dict[str, Any]]) -> dict[str, int]:
    """Each statsd counter, summed over every statmetric message: name -> count."""
    sums: dict[str, int] = collections.Counter()
    head, tail = f"stats.counters.{PREFIX}.", ".count"
    for message in messages:
        for name, (_, value) in fields_of(message).items():
            if name.startswith(head) and name.endswith(tail):
                sums[name[len(head) : -len(tail)]] += value
    return dict(sums)


def statmetrics(heka: Heka) -> list[dict[str, Any]]:
    return [m for m in heka.messages() if m.get("type") == "heka.statmetric"]


def stat_values(messages: list[dict[str, Any]], field: str) -> list[float]:
    """One stat's value in each statmetric message that has it, in order."""
    return [fields[field][1] for fields in map(fields_of, messages) if field in fields]


def test_statsd_counts_arrive_exact(run):
    _, metrics, _ = emitted()
    counters = {name: count for name, count in run.totals.items() if name in metrics}
    # not vacuous: the scenario's PUTs, acks and WebPush POSTs are among them
    assert counters["updates.appserver.incoming"] == run.puts
    assert counters["updates.webpush.incoming"] == 3
    poll(
        lambda: counter_sums(statmetrics(run.heka)) == counters,
        ARRIVAL_TIMEOUT,
        f"Heka's counts to be the server's {counters}",
    )
    messages = statmetrics(run.heka)
    handled = sum(stat_values(messages, f"stats.timers.{PREFIX}.updates.handled.count"))
    assert handled == sum(run.totals[f"put.{how}"] for how in ("delivered", "stored"))
    seen = stat_values(messages, f"stats.gauges.{PREFIX}.update.client.connections")
    assert seen and seen[-1] == 0  # every device gone


# --- the dashboard ------------------------------------------------------------------


def shipped_graphs() -> dict[str, dict[str, Any]]:
    """The shipped config's stat_graph.lua filters: name -> their [*.config]."""
    config = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    return {
        name: section["config"]
        for name, section in config.items()
        if section.get("filename") == "lua_filters/stat_graph.lua"
    }


def graph(heka: Heka, filename: str) -> tuple[list[str], list[float]] | None:
    """A circular buffer the dashboard serves: its column names, and each column's sum over
    its rows (unset rows are nan); None while DashboardOutput rewrites the file in place."""
    text = heka.dashboard(filename).decode("utf-8")
    header, _, body = text.partition("\n")
    rows = [row.split("\t") for row in body.splitlines()]
    if not text.endswith("\n") or len(rows) != json.loads(header)["rows"]:
        return None
    sums = [sum(float(v) for v in column if v != "nan") for column in zip(*rows, strict=True)]
    return [column["name"] for column in json.loads(header)["column_info"]], sums


def outputs(heka: Heka) -> dict[str, dict[str, str]]:
    """sandboxes.json: filter -> {output name: its file}; {} before the first report."""
    try:
        listing = json.loads(heka.dashboard("data/sandboxes.json"))
    except (OSError, ValueError):
        return {}
    return {
        sandbox["Name"]: {output["Name"]: output["Filename"] for output in sandbox["Outputs"]}
        for sandbox in listing["sandboxes"]
    }


def test_the_dashboard_graphs_what_statsd_sent(run):
    """Each graph's columns hold the sum, over every statmetric message, of its stat."""
    graphs = shipped_graphs()
    assert len(graphs) >= 4
    poll(
        lambda: counter_sums(statmetrics(run.heka)).get("updates.sent"),
        ARRIVAL_TIMEOUT,
        "the first stats",
    )

    def graphed() -> bool:
        messages = statmetrics(run.heka)
        listed = outputs(run.heka)
        for name, config in graphs.items():
            if config["title"] not in listed.get(name, {}):
                return False
            served = graph(run.heka, listed[name][config["title"]])
            if served is None:
                return False
            assert served[0] == config["stat_labels"].split(), name
            sums = [sum(stat_values(messages, stat)) for stat in config["stats"].split()]
            if served[1] != pytest.approx(sums, rel=1e-6):
                return False
        return True

    poll(graphed, ARRIVAL_TIMEOUT, "every graph to hold every stat")
    # the graphs show what the server counted
    served = poll(
        lambda: graph(run.heka, outputs(run.heka)["SimplepushTraffic"]["simplepush updates"]),
        ARRIVAL_TIMEOUT,
        "the updates graph",
    )
    wanted = ("appserver.incoming", "webpush.incoming", "sent", "client.ack")
    assert served[1][:4] == [run.totals[f"updates.{name}"] for name in wanted]


def test_the_dashboard_counts_log_events_by_type_and_severity(run):
    by_type = collections.Counter((line["Type"], line["Severity"]) for line in run.lines)
    table = "Type\tSeverity\tcount\n" + "".join(
        f"{type_}\t{severity}\t{count}\n" for (type_, severity), count in sorted(by_type.items())
    )
    severities = collections.Counter(line["Severity"] for line in run.lines)
    by_severity = [
        sum(n for s, n in severities.items() if s <= 3),
        severities[4],
        severities[5] + severities[6],
        severities[7],
    ]

    def counted() -> bool:
        listed = outputs(run.heka).get("SimplepushLogEvents", {})
        if len(listed) < 2:
            return False
        served = graph(run.heka, listed["simplepush log events"])
        text = run.heka.dashboard(listed["simplepush log events by Type"]).decode("utf-8")
        return text == table and served is not None and served[1] == by_severity

    poll(counted, ARRIVAL_TIMEOUT, f"the log events table to be {table}")
    assert severities[4] and severities[6] and severities[7]


# --- the shipped config, without hekad --------------------------------------------


def test_every_graphed_stat_is_a_metric_the_server_sends():
    _, metrics, _ = emitted()
    kinds = {
        "counters": lambda rest: rest.removesuffix(".count"),
        "gauges": lambda rest: rest,
        "timers": lambda rest: rest.rsplit(".", 1)[0],
    }
    for name, config in shipped_graphs().items():
        stats, labels = config["stats"].split(), config["stat_labels"].split()
        assert len(stats) == len(labels), name
        assert all(len(label) <= 15 for label in labels), name  # longer ones are cut
        for stat in stats:
            root, kind, rest = stat.split(".", 2)
            assert (root, rest.split(".", 1)[0]) == ("stats", PREFIX), stat
            assert kinds[kind](rest.split(".", 1)[1]) in metrics, stat
