#!/usr/bin/env python3
"""Run simplepush-bench against fresh servers several times and print medians.

Each run starts a new server (so RSS deltas are not flattered by memory a
previous run left behind), points the bench at it with --pid, stops it, and
keeps the bench's summary. Used for every figure in docs/PERFORMANCE.md:

    scripts/measure.py --runs 3 -- -n 10000 -p 2 --phases setup,closed -d 15
    scripts/measure.py --tree /tmp/old-checkout --runs 3 -- -n 10000 -p 2
    scripts/measure.py --logging off --statsd off --runs 3 -- -n 10000 -p 2
    scripts/measure.py --protocol both --runs 3 -- -n 10000 -p 2 --phases setup,closed

--tree runs another checkout's code (e.g. a `git worktree` of an older
commit) with this machine's installed dependencies. With --statsd on (the
default) a UDP sink on 127.0.0.1 receives the metrics, as a statsd would.

--protocol webpush runs the bench with --webpush; --protocol both makes each
run a pair, a SimplePush and a WebPush bench each against its own fresh server
of the same tree, in alternating order (so drift of the machine falls on both
sides), and prints the medians of each and the median of the pairs' ratios
webpush / simplepush.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from simplepush.bench.selfsigned import write_self_signed

REPO = Path(__file__).resolve().parents[1]
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
    }
    for setting in settings:
        name, _, value = setting.partition("=")
        section, _, key = name.partition(".")
        sections.setdefault(section, {})[key] = value
    return "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
        for section, keys in sections.items()
    )


def start_memcached() -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = ["memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    if os.geteuid() == 0:
        command += ["-u", "root"]  # memcached refuses to run as root unless told to
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("measure.py: memcached did not start")


def one_run(args: argparse.Namespace, bench_args: list[str], statsd_port: int | None) -> dict:
    port = free_port()
    pids: list[int] = []
    memcached = None
    # Workers' router ports (sqlite or memcached with several processes): a free run of
    # them, as a fixed port could be an outgoing connection's; --set may still name one.
    settings = [f"server.router_port={free_port_run(16)}", *args.set]
    if args.memcached:
        memcached, memcached_port = start_memcached()
        pids.append(memcached.pid)
        settings[:0] = [
            "storage.backend=memcached",
            f"storage.servers=127.0.0.1:{memcached_port}",
        ]
    with tempfile.TemporaryDirectory() as tmp:
        trust = None
        if args.tls:
            certfile, keyfile = write_self_signed(Path(tmp))
            settings += [f"server.ssl_certfile={certfile}", f"server.ssl_keyfile={keyfile}"]
            trust = ssl.create_default_context(cafile=str(certfile))
        scheme = "s" if args.tls else ""
        config = Path(tmp) / "config.ini"
        config.write_text(config_text(args, port, statsd_port, settings))
        env = dict(os.environ, PYTHONPATH=str(Path(args.tree).resolve()))
        server = subprocess.Popen(
            [sys.executable, "-m", "simplepush.cli", "--config", str(config)], cwd=tmp, env=env
        )
        pids.append(server.pid)
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    urllib.request.urlopen(
                        f"http{scheme}://127.0.0.1:{port}/status", timeout=1, context=trust
                    )
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise SystemExit("measure.py: the server did not start") from None
                    time.sleep(0.1)
            report = Path(tmp) / "bench.json"
            subprocess.run(
                [
                    str(Path(sys.executable).parent / "simplepush-bench"),
                    "--url",
                    f"ws{scheme}://127.0.0.1:{port}/",
                    *(("--ca-file", str(certfile)) if args.tls else ()),
                    *(arg for pid in pids for arg in ("--pid", str(pid))),
                    "--json",
                    str(report),
                    *bench_args,
                ],
                check=False,
                stderr=subprocess.DEVNULL,
            )
            return json.loads(report.read_text())
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
            if memcached is not None:
                memcached.terminate()
                memcached.wait()


def tag(args: argparse.Namespace, mode: str) -> str:
    """The mode in printed lines, left out when only SimplePush runs (the output as before)."""
    return "" if args.protocol == "simplepush" else f" {mode}"


def number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def ratios(runs: dict[str, list[dict[str, dict]]], name: str) -> dict[str, float]:
    """Per cost field of phase ``name``: the median over runs of webpush / simplepush.

    Each run's two benches ran back to back, so a ratio within a run cancels
    what the machine did meanwhile better than a ratio of the two medians.
    """
    out = {}
    for key in FIELDS.get(name, ()):
        if key in COUNTS:
            continue
        pairs = [
            web / simple
            for sp, wp in zip(runs["simplepush"], runs["webpush"], strict=True)
            if number(simple := sp.get(name, {}).get(key))
            and number(web := wp.get(name, {}).get(key))
            and simple
        ]
        if pairs:
            out[key] = round(statistics.median(pairs), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", default=str(REPO), help="source tree to run (default: this)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--logging", choices=["info", "off"], default="info")
    parser.add_argument("--statsd", choices=["on", "off"], default="on")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a config.ini setting, e.g. server.processes=2 (repeatable)",
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
    parser.add_argument("--label", default="", help="name printed with the medians")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then bench options")
    args = parser.parse_args()
    bench_args = [a for a in args.bench_args if a != "--"]
    if "--webpush" in bench_args:
        parser.error("give --protocol webpush (or both) rather than the bench's --webpush")
    modes = ["simplepush", "webpush"] if args.protocol == "both" else [args.protocol]
    statsd_port = statsd_sink()[0] if args.statsd == "on" else None
    runs: dict[str, list[dict[str, dict]]] = {mode: [] for mode in modes}
    for run in range(1, args.runs + 1):
        for mode in modes if run % 2 else modes[::-1]:
            extra = ["--webpush"] if mode == "webpush" else []
            phases = {
                name: flatten(data)
                for name, data in one_run(args, bench_args + extra, statsd_port)["phases"].items()
            }
            runs[mode].append(phases)
            for name, data in phases.items():
                picked = {key: data.get(key) for key in FIELDS.get(name, ())}
                print(f"run {run}{tag(args, mode)} {name}: {json.dumps(picked)}", flush=True)
    for mode in modes:
        for name in runs[mode][0]:
            medians = {}
            for key in FIELDS.get(name, ()):
                values = [v for r in runs[mode] if number(v := r.get(name, {}).get(key))]
                if values:
                    medians[key] = round(statistics.median(values), 3)
            print(f"median {args.label}{tag(args, mode)} {name}: {json.dumps(medians)}", flush=True)
    if args.protocol == "both":
        for name in runs["simplepush"][0]:
            print(
                f"ratio {args.label} webpush/simplepush {name}: {json.dumps(ratios(runs, name))}",
                flush=True,
            )


if __name__ == "__main__":
    main()
