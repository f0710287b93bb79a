#!/usr/bin/env python3
"""Run simplepush-bench against fresh servers several times and print medians.

Each run starts a new server (so RSS deltas are not flattered by memory a
previous run left behind), points the bench at it with --pid, stops it, and
keeps the bench's summary. Used for every figure in docs/PERFORMANCE.md:

    scripts/measure.py --runs 3 -- -n 10000 -p 2 --phases setup,closed -d 15
    scripts/measure.py --tree /tmp/old-checkout --runs 3 -- -n 10000 -p 2
    scripts/measure.py --logging off --statsd off --runs 3 -- -n 10000 -p 2
    scripts/measure.py --protocol both --runs 3 -- -n 10000 -p 2 --phases setup,closed
    scripts/measure.py --servers ours:memory-1,ours:memcached-2,pushgo,floor --runs 3 \
        -- -n 5000 -p 2 --phases setup,closed -d 10 -c 64

--tree runs another checkout's code (e.g. a `git worktree` of an older
commit) with this machine's installed dependencies. With --statsd on (the
default) a UDP sink on 127.0.0.1 receives the metrics, as a statsd would.

--servers lists what each run measures, one after the other in an order that
rotates from run to run (A B C, then B C A, ...), so drift of the machine falls
on all of them: `ours` (this tree as --set/--memcached say), `ours:BACKEND-N`
(storage.backend=BACKEND, server.processes=N; memcached-N starts its own
memcached), and the reference peers of shared/peers (--peers): `pushgo`
(pushgo 1.5.0 with a memcached of its own, counted with it) and `floor` (the
least a Tornado server can do). Besides each server's medians it prints the
median over runs of each run's ratio of every `ours` server to every peer, and
a closing table of both.

--protocol webpush runs the bench with --webpush; --protocol both makes every
`ours` server a pair, a SimplePush and a WebPush bench each against its own
fresh server, and prints the median of the runs' ratios webpush / simplepush.
The peers speak SimplePush only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simplepush.bench.selfsigned import write_self_signed
from simplepush.bench.shared import shared_dir

REPO = Path(__file__).resolve().parents[1]
PEERS = shared_dir() / "peers"
# What each peer needs in --peers.
PEER_FILES = {"pushgo": "pushgo/run.sh", "floor": "floor/floor_server.py"}
MODE = re.compile(r"(memory|sqlite|memcached)-([1-9][0-9]*)")
START_TIMEOUT = 15.0
# The numbers each phase reports (nested dicts such as latency_ms are flattened).
FIELDS = {
    "setup": (
        "devices_connected",
        "setup_errors",
        "server_cpu_ms_per_setup",
        "rss_kb_per_device_setup_delta",
        "rss_kb_per_device_total",
    ),
    "closed": (
        "round_trips_per_s",
        "server_cpu_us_per_round_trip",
        "latency_ms_p50",
        "latency_ms_p99",
        "errors",
        "timeouts",
        "stored",
    ),
    "open": (
        "round_trips_per_s",
        "server_cpu_us_per_round_trip",
        "latency_ms_p50",
        "latency_ms_p95",
        "latency_ms_p99",
        "errors",
        "timeouts",
    ),
    "soak": ("devices_at_end", "sockets_dropped", "pings_unanswered", "protocol_errors"),
}
# Counts, not costs: a ratio of them means nothing (and is mostly 0 / 0).
COUNTS = {
    "devices_connected",
    "setup_errors",
    "errors",
    "timeouts",
    "stored",
    "devices_at_end",
    "sockets_dropped",
    "pings_unanswered",
    "protocol_errors",
}
# The closing table's columns: (phase, field, heading).
COLUMNS = (
    ("setup", "server_cpu_ms_per_setup", "CPU/setup ms"),
    ("closed", "server_cpu_us_per_round_trip", "CPU/trip us"),
    ("open", "server_cpu_us_per_round_trip", "open CPU/trip us"),
    ("setup", "rss_kb_per_device_setup_delta", "RSS/device KB"),
    ("setup", "rss_kb_per_device_total", "RSS total/device KB"),
    ("closed", "latency_ms_p99", "p99 ms"),
    ("open", "latency_ms_p99", "open p99 ms"),
)
# What the closing table adds up over every phase of every run as "lost".
LOSSES = ("setup_errors", "errors", "timeouts", "sockets_dropped", "protocol_errors")


@dataclass(frozen=True)
class Server:
    """One entry of the rotation: ours in a mode and protocol, or a peer."""

    name: str  # as printed; "" for the lone `ours` of a plain SimplePush run
    kind: str  # "ours", "pushgo" or "floor"
    settings: tuple[str, ...] = ()  # ours: config.ini settings of the mode
    memcached: bool = False  # ours: start a memcached and store in it
    protocol: str = "simplepush"


def flatten(phase: dict) -> dict:
    flat = {}
    for key, value in phase.items():
        if isinstance(value, dict):
            flat.update({f"{key}_{sub}": v for sub, v in value.items()})
        else:
            flat[key] = value
    return flat


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_run(count: int) -> int:
    """A port p with p .. p+count-1 all free (worker i's internal listener is p + i)."""
    while True:
        base = random.randrange(20000, 32000 - count)
        try:
            for port in range(base, base + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue


def statsd_sink() -> tuple[int, list[int]]:
    """A UDP socket that swallows metrics; returns its port and a packet counter."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    count = [0]

    def drain() -> None:
        while True:
            sock.recv(65536)
            count[0] += 1

    threading.Thread(target=drain, daemon=True).start()
    return sock.getsockname()[1], count


def config_text(
    args: argparse.Namespace, port: int, statsd_port: int | None, settings: list[str]
) -> str:
    scheme = "https" if args.tls else "http"
    sections: dict[str, dict[str, str]] = {
        "server": {"port": str(port), "endpoint_url": f"{scheme}://127.0.0.1:{port}"},
        "logging": {
            "level": "info" if args.logging == "info" else "critical",
            "output": "server.log",
        },
        "metrics": {
            "statsd_host": "127.0.0.1" if statsd_port else "",
            "statsd_port": str(statsd_port or 8125),
        },
        # The dashboard as by default, on a free port rather than the fixed 8081.
        "admin": {"port": str(free_port())},
    }
    for setting in settings:
        name, _, value = setting.partition("=")
        section, _, key = name.partition(".")
        sections.setdefault(section, {})[key] = value
    return "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
        for section, keys in sections.items()
    )


@contextmanager
def running(command: list[str], **popen: Any) -> Iterator[subprocess.Popen]:
    """A process for the duration of the block: SIGTERM at the end, SIGKILL after 10 s."""
    process = subprocess.Popen(command, **popen)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until(ready: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    """Poll ``ready`` until it holds; exit with a message if ``process`` dies or it takes long."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit(f"measure.py: {what} did not start")
        time.sleep(0.05)


def listening(*ports: int) -> Callable[[], bool]:
    def check() -> bool:
        try:
            for port in ports:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    return check


def memcached(stack: ExitStack) -> tuple[int, int]:
    """Start a memcached for this run; its pid and port."""
    port = free_port()
    command = ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    if os.geteuid() == 0:
        command += ["-u", "root"]  # memcached refuses to run as root unless told to
    process = stack.enter_context(running(command))
    wait_until(listening(port), process, "memcached")
    return process.pid, port


def start_ours(
    stack: ExitStack, server: Server, args: argparse.Namespace, statsd_port: int | None, tmp: Path
) -> tuple[str, list[int], str]:
    """This tree's server in ``server``'s mode; its URL, pids to count and CA file."""
    port = free_port()
    pids: list[int] = []
    # Workers' router ports (sqlite or memcached with several processes): a free run of
    # them, as a fixed port could be an outgoing connection's; --set may still name one.
    settings = [f"server.router_port={free_port_run(16)}", *server.settings, *args.set]
    if server.memcached:
        memcached_pid, memcached_port = memcached(stack)
        pids.append(memcached_pid)
        settings[:0] = [
            "storage.backend=memcached",
            f"storage.servers=127.0.0.1:{memcached_port}",
        ]
    certfile, trust = "", None
    if args.tls:
        cert, keyfile = write_self_signed(tmp)
        certfile = str(cert)
        settings += [f"server.ssl_certfile={certfile}", f"server.ssl_keyfile={keyfile}"]
        trust = ssl.create_default_context(cafile=certfile)
    scheme = "s" if args.tls else ""
    config = tmp / "config.ini"
    config.write_text(config_text(args, port, statsd_port, settings))
    env = dict(os.environ, PYTHONPATH=str(Path(args.tree).resolve()))
    command = [sys.executable, "-m", "simplepush.cli", "--config", str(config)]
    process = stack.enter_context(running(command, cwd=tmp, env=env))
    pids.append(process.pid)

    def answers() -> bool:
        try:
            urllib.request.urlopen(
                f"http{scheme}://127.0.0.1:{port}/status", timeout=1, context=trust
            )
        except OSError:
            return False
        return True

    wait_until(answers, process, "the server")
    return f"ws{scheme}://127.0.0.1:{port}/", pids, certfile


def start_pushgo(
    stack: ExitStack, server: Server, args: argparse.Namespace, statsd_port: int | None, tmp: Path
) -> tuple[str, list[int], str]:
    """pushgo on a memcached of its own, both counted."""
    memcached_pid, memcached_port = memcached(stack)
    ws = free_port_run(3)  # websocket, endpoint and router listeners
    command = [
        str(Path(args.peers) / PEER_FILES["pushgo"]),
        *map(str, (ws, ws + 1, ws + 2)),
        f"127.0.0.1:{memcached_port}",
    ]
    process = stack.enter_context(running(command, stdout=subprocess.DEVNULL))
    wait_until(listening(ws, ws + 1), process, "pushgo")
    # run.sh leaves its config file in /tmp and execs pushgo: remove the file after the run.
    with open(f"/proc/{process.pid}/cmdline", "rb") as f:
        for arg in f.read().decode().split("\0"):
            if arg.startswith("-config="):
                stack.callback(Path(arg.removeprefix("-config=")).unlink, missing_ok=True)
    return f"ws://127.0.0.1:{ws}/", [process.pid, memcached_pid], ""


def start_floor(
    stack: ExitStack, server: Server, args: argparse.Namespace, statsd_port: int | None, tmp: Path
) -> tuple[str, list[int], str]:
    """The Tornado floor server, on this Python."""
    port = free_port()
    command = [sys.executable, str(Path(args.peers) / PEER_FILES["floor"]), str(port)]
    process = stack.enter_context(running(command, cwd=tmp))
    wait_until(listening(port), process, "the floor server")
    return f"ws://127.0.0.1:{port}/", [process.pid], ""


START = {"ours": start_ours, "pushgo": start_pushgo, "floor": start_floor}


def one_run(
    server: Server, args: argparse.Namespace, bench_args: list[str], statsd_port: int | None
) -> dict:
    """Start ``server`` afresh, bench it, stop it; the bench's JSON report."""
    with tempfile.TemporaryDirectory() as name, ExitStack() as stack:
        tmp = Path(name)
        url, pids, ca_file = START[server.kind](stack, server, args, statsd_port, tmp)
        report = tmp / "bench.json"
        subprocess.run(
            [
                str(Path(sys.executable).parent / "simplepush-bench"),
                "--url",
                url,
                *(("--ca-file", ca_file) if ca_file else ()),
                *(arg for pid in pids for arg in ("--pid", str(pid))),
                "--json",
                str(report),
                *bench_args,
                *(("--webpush",) if server.protocol == "webpush" else ()),
            ],
            check=False,
            stderr=subprocess.DEVNULL,
        )
        return json.loads(report.read_text())


def servers_from(args: argparse.Namespace) -> list[Server]:
    """The rotation --servers and --protocol ask for; ValueError says what is wrong."""
    tokens = args.servers.split(",") if args.servers else ["ours"]
    if len(set(tokens)) != len(tokens):
        raise ValueError("--servers: a server is named twice")
    protocols = ["simplepush", "webpush"] if args.protocol == "both" else [args.protocol]
    servers = []
    for token in tokens:
        kind, _, mode = token.partition(":")
        if kind in PEER_FILES:
            if mode:
                raise ValueError(f"--servers {token}: a peer has no mode")
            if "simplepush" not in protocols or args.tls:
                raise ValueError(f"--servers {token}: the peers speak SimplePush without TLS")
            servers.append(Server(token, kind))
            continue
        if kind != "ours":
            raise ValueError(f"--servers {token}: not ours, ours:MODE, pushgo or floor")
        settings: tuple[str, ...] = ()
        store_in_memcached = args.memcached
        if mode:
            match = MODE.fullmatch(mode)
            if match is None:
                raise ValueError(f"--servers {token}: a mode is BACKEND-PROCESSES, e.g. memory-1")
            backend, processes = match.groups()
            if args.memcached:
                raise ValueError("--memcached goes with a plain `ours`; name ours:memcached-N")
            if backend == "memory" and processes != "1":
                raise ValueError(f"--servers {token}: the memory backend serves one process")
            settings = (f"storage.backend={backend}", f"server.processes={processes}")
            store_in_memcached = backend == "memcached"
        for protocol in protocols:
            words = [token] if args.servers else []
            words += [protocol] if args.protocol != "simplepush" else []
            servers.append(Server(" ".join(words), "ours", settings, store_in_memcached, protocol))
    return servers


def number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ratios(top: list[dict[str, dict]], bottom: list[dict[str, dict]], phase: str) -> dict:
    """Per cost field of ``phase``: the median over runs of top / bottom.

    The two benches of a run ran in the same rotation, so a ratio within a run
    cancels what the machine did meanwhile better than a ratio of two medians.
    """
    out = {}
    for key in FIELDS.get(phase, ()):
        if key in COUNTS:
            continue
        pairs = [
            high / low
            for a, b in zip(top, bottom, strict=True)
            if number(high := a.get(phase, {}).get(key))
            and number(low := b.get(phase, {}).get(key))
            and low
        ]
        if pairs:
            out[key] = round(statistics.median(pairs), 3)
    return out


def medians(runs: list[dict[str, dict]], phase: str) -> dict[str, float]:
    out = {}
    for key in FIELDS.get(phase, ()):
        values = [v for r in runs if number(v := r.get(phase, {}).get(key))]
        if values:
            out[key] = round(statistics.median(values), 3)
    return out


def comparisons(servers: list[Server]) -> list[tuple[str, Server, Server]]:
    """(what the ratio is called, top, bottom): WebPush / SimplePush of each of ours, then
    each SimplePush one of ours / each peer."""
    ours = [s for s in servers if s.kind == "ours"]
    peers = [s for s in servers if s.kind != "ours"]
    pairs = []
    for web in ours:
        for simple in ours:
            if (web.protocol, simple.protocol) == ("webpush", "simplepush") and (
                web.settings,
                web.memcached,
            ) == (simple.settings, simple.memcached):
                base = web.name.removesuffix("webpush")
                pairs.append((f"{base}webpush/simplepush", web, simple))
    for mine in ours:
        if mine.protocol == "simplepush":
            pairs += [(f"{mine.name}/{peer.name}", mine, peer) for peer in peers]
    return pairs


def cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def table(
    servers: list[Server],
    runs: dict[str, list[dict[str, dict]]],
    pairs: list[tuple[str, Server, Server]],
) -> str:
    """Medians per server, the lost count over all runs, then the ratio rows."""
    phases = {phase for r in runs.values() for run in r for phase in run}
    columns = [c for c in COLUMNS if c[0] in phases]
    rows = [["server", *(heading for _, _, heading in columns), "lost (all runs)"]]
    for server in servers:
        values = [medians(runs[server.name], phase).get(key) for phase, key, _ in columns]
        lost = sum(
            value
            for run in runs[server.name]
            for data in run.values()
            for key in LOSSES
            if number(value := data.get(key))
        )
        rows.append([server.name, *map(cell, values), str(lost)])
    for name, top, bottom in pairs:
        shares = [
            ratios(runs[top.name], runs[bottom.name], phase).get(key) for phase, key, _ in columns
        ]
        rows.append([name, *(f"{v:.2f}x" if v is not None else "-" for v in shares), ""])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            text.ljust(width) if i == 0 else text.rjust(width)
            for i, (text, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", default=str(REPO), help="source tree to run (default: this)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--logging", choices=["info", "off"], default="info")
    parser.add_argument("--statsd", choices=["on", "off"], default="on")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config.ini setting of ours, e.g. server.processes=2 (repeatable)",
    )
    parser.add_argument(
        "--memcached",
        action="store_true",
        help="start a memcached for each run, use it as the store, count its CPU",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve wss:// and https:// with a self-signed certificate made for each run",
    )
    parser.add_argument(
        "--protocol",
        choices=["simplepush", "webpush", "both"],
        default="simplepush",
        help="what the bench speaks; both = each run is a SimplePush and a WebPush bench "
        "(alternating which goes first) and the ratios webpush / simplepush are printed",
    )
    parser.add_argument(
        "--servers",
        default="",
        metavar="LIST",
        help="comma-separated, measured in rotating order in every run: ours, "
        "ours:BACKEND-PROCESSES (memory-1, sqlite-2, memcached-2, ...), pushgo, floor "
        "(default: ours alone)",
    )
    parser.add_argument(
        "--peers",
        default=str(PEERS),
        help="the reference peers' folder, with pushgo/run.sh and floor/floor_server.py "
        "(default: shared/peers beside this repo)",
    )
    parser.add_argument("--label", default="", help="name printed with the medians")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then bench options")
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    if "--webpush" in bench_args:
        parser.error("give --protocol webpush (or both) rather than the bench's --webpush")
    try:
        servers = servers_from(args)
    except ValueError as exc:
        parser.error(str(exc))
    for server in servers:
        if server.kind in PEER_FILES and not (Path(args.peers) / PEER_FILES[server.kind]).exists():
            parser.error(
                f"--servers {server.name}: no {PEER_FILES[server.kind]} in {args.peers} "
                "(shared/peers beside the repo, in /work/shared or in $SIMPLEPUSH_SHARED;"
                " --peers DIR names another)"
            )
    statsd_port = statsd_sink()[0] if args.statsd == "on" else None
    label = f" {args.label}" if args.label else ""
    runs: dict[str, list[dict[str, dict]]] = {server.name: [] for server in servers}
    for run in range(1, args.runs + 1):
        turn = (run - 1) % len(servers)
        for server in servers[turn:] + servers[:turn]:
            report = one_run(server, args, bench_args, statsd_port)
            phases = {name: flatten(data) for name, data in report["phases"].items()}
            runs[server.name].append(phases)
            name = f" {server.name}" if server.name else ""
            for phase, data in phases.items():
                picked = {key: data.get(key) for key in FIELDS.get(phase, ())}
                print(f"run {run}{name} {phase}: {json.dumps(picked)}", flush=True)
    for server in servers:
        name = f" {server.name}" if server.name else ""
        for phase in runs[server.name][0]:
            print(
                f"median{label}{name} {phase}: {json.dumps(medians(runs[server.name], phase))}",
                flush=True,
            )
    pairs = comparisons(servers)
    for name, top, bottom in pairs:
        for phase in runs[top.name][0]:
            found = ratios(runs[top.name], runs[bottom.name], phase)
            print(f"ratio{label} {name} {phase}: {json.dumps(found)}", flush=True)
    if args.servers:
        print(table(servers, runs, pairs), flush=True)


if __name__ == "__main__":
    main()
