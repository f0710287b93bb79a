"""``simplepush-bench``: command line, validation, and the report's output."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Any

from simplepush.bench.coordinator import REPORT_GRACE, Plan, run, share
from simplepush.bench.net import ephemeral_ports, raise_nofile
from simplepush.bench.report import table
from simplepush.bench.settings import Target, WorkerSettings, parse_source_ips
from simplepush.bench.webpush import BODY_SIZE, Vapid
from simplepush.bench.worker import SOAK_TICK

PHASES = ("setup", "closed", "open", "soak")
SPARE_FDS = 100  # per process: pipe, epoll, stdio, imports


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default where there is one: not for flags, nor options unset or empty."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default in ("", []):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """All options; every phase and the whole run are bounded in time."""
    p = argparse.ArgumentParser(
        prog="simplepush-bench",
        formatter_class=_DefaultsShown,
        description="Drive a SimplePush server over the wire (WebSocket + HTTP PUT; WebPush with "
        "--webpush) and report setup rate, round-trip latency, errors, dropped sockets and "
        "server CPU/RSS.",
    )
    p.add_argument("--url", default="ws://127.0.0.1:8080/", help="server WebSocket URL (ws or wss)")
    p.add_argument(
        "--webpush",
        action="store_true",
        help="speak WebPush instead: hello with use_webpush, register with one VAPID key for "
        f"the run, POST {BODY_SIZE}-byte aes128gcm bodies with a VAPID JWT (expects 201) and "
        "ack string versions with code 100",
    )
    p.add_argument(
        "--vapid-per-post",
        action="store_true",
        help="with --webpush: sign a new VAPID JWT for every POST, so the server verifies "
        "every signature (no cache can answer)",
    )
    p.add_argument(
        "--ca-file",
        default="",
        help="wss:// and https://: PEM certificate(s) to trust, e.g. a self-signed one;"
        " empty = the system's",
    )
    p.add_argument(
        "-n",
        "--devices",
        type=int,
        default=1000,
        help="devices, one channel each",
    )
    p.add_argument(
        "-p",
        "--processes",
        type=int,
        default=0,
        help="bench processes; 0 = as few as the open-file limit allows",
    )
    p.add_argument(
        "--phases",
        default="setup,closed",
        help=f"comma-separated, from {','.join(PHASES)}; setup always runs first",
    )
    p.add_argument(
        "-d", "--duration", type=float, default=10.0, help="seconds of the closed and open loops"
    )
    p.add_argument(
        "-c", "--workers", type=int, default=64, help="closed loop: concurrent round trips in all"
    )
    p.add_argument(
        "-r", "--rate", type=float, default=1000.0, help="open loop: PUTs per second in all"
    )
    p.add_argument(
        "--soak-duration", type=float, help="seconds of the soak phase (default: --duration)"
    )
    p.add_argument(
        "--ping-interval",
        type=float,
        default=10.0,
        help="soak: seconds between a device's {} pings",
    )
    p.add_argument(
        "--pid",
        type=int,
        action="append",
        default=[],
        help="server PID to sample in /proc, children included (repeatable)",
    )
    p.add_argument(
        "--source-ips",
        default="127.0.0.1",
        help="client source addresses: a range 127.0.0.1-127.0.0.8, a comma list, "
        "or a count counted from 127.0.0.1",
    )
    p.add_argument(
        "--endpoint-base",
        help="rewrite each pushEndpoint's scheme://host:port to this, e.g. "
        "http://127.0.0.1:8080 (needed when the endpoint host is not the --url host)",
    )
    p.add_argument(
        "--connect-concurrency",
        type=int,
        default=64,
        help="per process: devices setting up at once",
    )
    p.add_argument(
        "--http-conns", type=int, default=32, help="per process: keep-alive PUT connections at most"
    )
    p.add_argument(
        "--op-timeout",
        type=float,
        default=10.0,
        help="seconds for one device setup or one round trip",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="the whole run stops after this many seconds"
    )
    p.add_argument("--json", metavar="FILE", help="write the JSON report here instead of stdout")
    return p


def plan_from(args: argparse.Namespace, start: float) -> Plan:
    """Validate the options into a Plan; ValueError says which one is wrong."""
    phases = ["setup"] + [
        name for name in dict.fromkeys(args.phases.split(",")) if name and name != "setup"
    ]
    for name in phases:
        if name not in PHASES:
            raise ValueError(f"--phases: unknown phase {name!r} (choose from {', '.join(PHASES)})")
    soak = args.duration if args.soak_duration is None else args.soak_duration
    for option, value in (
        ("--devices", args.devices),
        ("--duration", args.duration),
        ("--workers", args.workers),
        ("--rate", args.rate),
        ("--soak-duration", soak),
        ("--ping-interval", args.ping_interval),
        ("--connect-concurrency", args.connect_concurrency),
        ("--http-conns", args.http_conns),
        ("--op-timeout", args.op_timeout),
        ("--timeout", args.timeout),
    ):
        if value <= 0:
            raise ValueError(f"{option} must be positive")
    if args.ping_interval < SOAK_TICK:
        raise ValueError(f"--ping-interval must be at least {SOAK_TICK:g} s")
    if args.timeout <= REPORT_GRACE:
        raise ValueError(f"--timeout must be more than {REPORT_GRACE:g} s")
    ws, ws_path = Target.parse(args.url, ("ws", "wss"))
    base = Target.parse(args.endpoint_base, ("http", "https"))[0] if args.endpoint_base else None
    ips = parse_source_ips(args.source_ips)
    if args.devices > len(ips) * ephemeral_ports():
        raise ValueError(
            f"{args.devices} devices need more --source-ips: each gives {ephemeral_ports()} ports"
        )
    per_process = raise_nofile() - SPARE_FDS - args.http_conns
    processes = args.processes or math.ceil(args.devices / per_process)
    if processes < 1 or processes > args.devices:
        raise ValueError("--processes must be between 1 and --devices")
    if math.ceil(args.devices / processes) > per_process:
        raise ValueError(
            f"a process can hold {per_process} devices (open-file limit): use "
            f"--processes {math.ceil(args.devices / per_process)} or more"
        )
    if args.vapid_per_post and not args.webpush:
        raise ValueError("--vapid-per-post goes with --webpush")
    vapid = Vapid.generate() if args.webpush else None
    workers, first = [], 0
    for i in range(processes):
        count = share(args.devices, processes, i)
        workers.append(
            WorkerSettings(
                index=i,
                devices=count,
                first_device=first,
                ws=ws,
                ws_path=ws_path,
                ca_file=args.ca_file,
                source_ips=ips,
                endpoint_base=base,
                connect_concurrency=args.connect_concurrency,
                op_timeout=args.op_timeout,
                http_conns=args.http_conns,
                deadline=start + args.timeout - REPORT_GRACE,
                vapid=vapid,
                vapid_per_post=args.vapid_per_post,
            )
        )
        first += count
    config: dict[str, Any] = {
        "url": args.url,
        "protocol": "webpush" if args.webpush else "simplepush",
        "vapid_per_post": args.vapid_per_post,
        "devices": args.devices,
        "processes": processes,
        "phases": phases,
        "duration_s": args.duration,
        "soak_duration_s": soak,
        "closed_workers": args.workers,
        "open_rate_per_s": args.rate,
        "ping_interval_s": args.ping_interval,
        "source_ips": list(ips),
        "endpoint_base": args.endpoint_base,
        "connect_concurrency": args.connect_concurrency,
        "http_conns": args.http_conns,
        "op_timeout_s": args.op_timeout,
        "timeout_s": args.timeout,
        "pids": args.pid,
    }
    return Plan(
        workers=workers,
        phases=phases,
        closed_workers=args.workers,
        rate=args.rate,
        duration=args.duration,
        soak_duration=soak,
        ping_interval=args.ping_interval,
        pids=args.pid,
        timeout=args.timeout,
        config=config,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the bench; exit status 0 when every phase completed, 1 if the run was cut short."""
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        plan = plan_from(args, start)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    report = run(plan, start)
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    print(table(report), file=sys.stderr)
    return 0 if report["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
