"""Turning merged tallies and /proc samples into the JSON report and the short table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from simplepush.bench.procstats import Sample
from simplepush.bench.tally import Tally

ROUND_TRIP_PHASES = ("closed", "open")


def percentiles(
    samples: Sequence[float], points: Sequence[int] = (50, 95, 99)
) -> dict[str, float | None]:
    """Nearest-rank percentiles plus max, in the samples' unit; None without samples."""
    ordered = sorted(samples)
    out: dict[str, float | None] = {}
    for p in points:
        out[f"p{p}"] = (
            round(ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)], 3) if ordered else None
        )
    out["max"] = round(ordered[-1], 3) if ordered else None
    return out


def ratio(numerator: float | None, denominator: float, scale: float = 1.0) -> float | None:
    """numerator * scale / denominator rounded, or None when either side is missing."""
    if numerator is None or not denominator:
        return None
    return round(numerator * scale / denominator, 3)


def phase_report(
    name: str, params: dict[str, Any], tally: Tally, before: Sample | None, after: Sample | None
) -> dict[str, Any]:
    """The JSON object for one phase; server fields are None without --pid."""
    server_cpu_ms = after.cpu_since(before) * 1000 if before and after and after.cpu_s else None
    out: dict[str, Any] = dict(params)
    out.update(
        duration_s=round(tally.wall_s, 3),
        server_cpu_ms=None if server_cpu_ms is None else round(server_cpu_ms, 1),
        server_rss_kb_before=before.rss_kb if before else None,
        server_rss_kb_after=after.rss_kb if after else None,
        client_cpu_ms=round(tally.client_cpu_s * 1000, 1),
        sockets_dropped=tally.dropped,
        protocol_errors=tally.protocol_errors,
        devices_at_end=tally.alive,
    )
    if name == "setup":
        connected = tally.ok
        out.update(
            devices_connected=connected,
            setup_errors=sum(tally.errors.values()),
            setup_errors_by_kind=dict(tally.errors),
            setup_rate_per_s=ratio(connected, tally.wall_s),
            setup_ms=percentiles(tally.latency_ms),
            server_cpu_ms_per_setup=ratio(server_cpu_ms, connected),
            rss_kb_per_device_setup_delta=ratio(after.rss_kb - before.rss_kb, connected)
            if before and after
            else None,
            rss_kb_per_device_total=ratio(after.rss_kb, connected) if after else None,
        )
    elif name in ROUND_TRIP_PHASES:
        out.update(
            puts_sent=tally.attempts,
            round_trips=tally.ok,
            round_trips_per_s=ratio(tally.ok, tally.wall_s),
            latency_ms=percentiles(tally.latency_ms),
            errors=sum(tally.errors.values()),
            errors_by_kind=dict(tally.errors),
            stored=tally.stored,
            timeouts=tally.timeouts,
            server_cpu_us_per_round_trip=ratio(server_cpu_ms, tally.ok, 1000),
            client_cpu_us_per_round_trip=ratio(tally.client_cpu_s, tally.ok, 1e6),
        )
        if name == "open":
            out.update(
                skipped_no_idle_channel=tally.skipped,
                send_lag_ms=percentiles(tally.lag_ms, (50, 99)),
            )
    else:
        out.update(
            pings_sent=tally.pings,
            pongs_received=tally.pongs,
            pings_unanswered=tally.pings_unanswered,
        )
    return out


def summary(phases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers; round-trip figures come from the closed loop, else the open loop."""
    setup = phases.get("setup", {})
    trips = next((phases[p] for p in ROUND_TRIP_PHASES if p in phases), {})
    latency = trips.get("latency_ms", {})
    loops = [phases[p] for p in ROUND_TRIP_PHASES if p in phases]
    return {
        "devices_connected": setup.get("devices_connected", 0),
        "setup_errors": setup.get("setup_errors", 0),
        "setup_rate_per_s": setup.get("setup_rate_per_s"),
        "server_cpu_ms_per_setup": setup.get("server_cpu_ms_per_setup"),
        "rss_kb_per_device_setup_delta": setup.get("rss_kb_per_device_setup_delta"),
        "rss_kb_per_device_total": setup.get("rss_kb_per_device_total"),
        "round_trips_per_s": trips.get("round_trips_per_s"),
        "latency_ms_p50": latency.get("p50"),
        "latency_ms_p95": latency.get("p95"),
        "latency_ms_p99": latency.get("p99"),
        "server_cpu_us_per_round_trip": trips.get("server_cpu_us_per_round_trip"),
        "client_cpu_us_per_round_trip": trips.get("client_cpu_us_per_round_trip"),
        "errors": sum(p["errors"] for p in loops)
        + sum(p["protocol_errors"] for p in phases.values()),
        "timeouts": sum(p["timeouts"] for p in loops),
        "stored": sum(p["stored"] for p in loops),
        "sockets_dropped": sum(p["sockets_dropped"] for p in phases.values()),
    }


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".rstrip()


def _count(number: int, noun: str) -> str:
    """`1 process`, `2 processes`: the header reads as English for any count."""
    if number == 1:
        return f"1 {noun}"
    return f"{number} {noun}{'es' if noun.endswith('s') else 's'}"


def table(report: dict[str, Any]) -> str:
    """A few lines for people; the JSON has everything."""
    cfg, phases = report["config"], report["phases"]
    rows = [
        f"simplepush-bench {cfg['url']} ({cfg.get('protocol', 'simplepush')}): "
        f"{_count(cfg['devices'], 'device')}, {_count(cfg['processes'], 'process')}"
    ]

    def row(phase: str, label: str, value: str) -> None:
        rows.append(f"  {phase:<7}{label:<36}{value}")

    if "setup" in phases:
        s = phases["setup"]
        row(
            "setup", "devices connected / errors", f"{s['devices_connected']} / {s['setup_errors']}"
        )
        row("setup", "setup rate", _num(s["setup_rate_per_s"], "devices/s"))
        row("setup", "server CPU per setup", _num(s["server_cpu_ms_per_setup"], "ms"))
        row(
            "setup",
            "server RSS per device (setup delta)",
            _num(s["rss_kb_per_device_setup_delta"], "KB"),
        )
        row("setup", "server RSS per device (total)", _num(s["rss_kb_per_device_total"], "KB"))
    for name in ROUND_TRIP_PHASES:
        if name in phases:
            p, lat = phases[name], phases[name]["latency_ms"]
            row(name, "round trips/s", _num(p["round_trips_per_s"]))
            row(
                name,
                "latency p50 / p95 / p99",
                " / ".join(_num(lat[k]) for k in ("p50", "p95", "p99")) + " ms",
            )
            row(
                name,
                "errors / timeouts / stored",
                f"{p['errors']} / {p['timeouts']} / {p['stored']}",
            )
            row(name, "server CPU per round trip", _num(p["server_cpu_us_per_round_trip"], "us"))
            row(name, "client CPU per round trip", _num(p["client_cpu_us_per_round_trip"], "us"))
    if "soak" in phases:
        p = phases["soak"]
        row("soak", "pings sent / pongs received", f"{p['pings_sent']} / {p['pongs_received']}")
    row("all", "sockets dropped by the server", str(report["summary"]["sockets_dropped"]))
    if report["aborted"]:
        rows.append(f"  ABORTED: {report['aborted']}")
    return "\n".join(rows)
