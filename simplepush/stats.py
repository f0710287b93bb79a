"""The dashboard's numbers, without I/O: counters, a latency histogram and 15 minutes of history.

Hot paths only add to a dict (`Stats.incr`, called by metrics.py for every
statsd counter, so each name is counted once whether or not statsd is on)
and, per delivered update, one histogram bucket (`Stats.delivered`; WebPush
POSTs have a histogram of their own, so neither protocol's latency hides
the other's).
Once a second the sampler (sampler.py) calls `Stats.take`, which turns the
counters into that second's deltas: rates are deltas per second, and the
deltas of several workers add up. `view` turns the samples of one or more
workers into the JSON that /api/stats answers and the page draws.

Warning and error events count from the process's start, those logged
before the first sample included. A worker also carries the counts its
supervisor had when it forked it (`inherited`); every worker has them, so
the view takes the highest, not the sum.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

K = TypeVar("K")

HISTORY = 900  # samples kept: 15 minutes at one a second
RATE_WINDOW = 5  # seconds averaged for the headline rates
LATENCY_WINDOW = 60  # seconds of deliveries behind the headline percentiles

# Latency buckets: 8 per doubling (each about 9% wide) from 10 µs up to about 40 s.
_MIN_MS = 0.01
_PER_DOUBLING = 8
_LAST_BUCKET = _PER_DOUBLING * 22

# Gauges of one second, and how the gauges of several workers combine.
_GAUGE_MERGE = {
    "devices": sum,
    "connections": sum,
    "memory_bytes": sum,
    "storage_ok": min,
    "storage_rtt_ms": max,
}

# Headline and plotted rates: what each is called in the JSON, and the counter behind it.
RATES = {
    "connect": "client.socket.connect",
    "disconnect": "client.socket.disconnect",
    "updates": "updates.appserver.incoming",
    "delivered": "put.delivered",
    "stored": "put.stored",
    "routed": "put.routed",
    "acks": "updates.client.ack",
}
# PUTs refused, by the HTTP status they were answered with.
REJECTED = {
    "400": ("put.invalid",),
    "404": ("put.invalid_token", "put.unknown_channel"),
    "413": ("put.too_long",),
    "500": ("put.internal_error",),
    "503": ("put.storage_error",),
}
# WebPush POSTs (/wpush/v1|v2/<token>), kept apart from the PUTs above: JSON key, counter.
WEBPUSH_RATES = {
    "incoming": "updates.webpush.incoming",
    "delivered": "post.delivered",
    "stored": "post.stored",
    "routed": "post.routed",
}
# POSTs refused, by status. One counter covers 401 (VAPID missing or unparseable) and 403
# (VAPID invalid), so they share a bucket; "+" rather than "/" as keys are read as paths.
WEBPUSH_REJECTED = {
    "400": ("post.invalid",),
    "401+403": ("post.unauthorized",),
    "404": ("post.invalid_token",),
    "410": ("post.unknown_channel",),
    "413": ("post.too_long",),
    "429": ("post.throttled",),
    "500": ("post.internal_error",),
    "503": ("post.storage_error",),
}
# UDP wake-ups since start (docs/PROTOCOL.md): JSON key, counter.
WAKEUPS = {"sent": "wakeup.sent", "refused": "wakeup.refused", "failed": "wakeup.error"}
WEBPUSH_PREFIX = "webpush_"  # the WebPush plot series: webpush_<rate>, webpush_p50, ...
ERROR_PREFIX = "error."  # counters of warning and error events, by their log Type


def bucket(ms: float) -> int:
    """The histogram bucket of a latency; its upper bound is `bucket_ms(index)`."""
    if ms <= _MIN_MS:
        return 0
    return min(math.ceil(math.log2(ms / _MIN_MS) * _PER_DOUBLING), _LAST_BUCKET)


def bucket_ms(index: int) -> float:
    return _MIN_MS * 2 ** (index / _PER_DOUBLING)


def percentiles(histogram: dict[int, int], quantiles: Sequence[float]) -> list[float | None]:
    """Each quantile as its bucket's upper bound (at most 9% high); None with no data."""
    total = sum(histogram.values())
    if not total:
        return [None for _ in quantiles]
    ordered = sorted(histogram.items())
    answers: list[float | None] = []
    for quantile in quantiles:
        rank = max(1, math.ceil(quantile * total))
        seen = 0
        for index, count in ordered:
            seen += count
            if seen >= rank:
                answers.append(round(bucket_ms(index), 3))
                break
    return answers


@dataclass(slots=True)
class Sample:
    """One worker's second: counter deltas over `span` seconds, deliveries, gauges at `t`."""

    t: int  # the wall-clock second it was taken
    span: int  # seconds since the previous sample
    counts: dict[str, int]
    latency: dict[int, int]  # PUT deliveries
    gauges: dict[str, float]
    webpush_latency: dict[int, int] = field(default_factory=dict)  # WebPush deliveries

    def to_json(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "span": self.span,
            "counts": self.counts,
            "latency": _histogram_json(self.latency),
            "gauges": self.gauges,
            "webpush_latency": _histogram_json(self.webpush_latency),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sample:
        """Also reads an export without `webpush_latency` (a worker of an older version)."""
        return cls(
            int(data["t"]),
            int(data["span"]),
            data["counts"],
            _histogram(data["latency"]),
            data["gauges"],
            _histogram(data.get("webpush_latency", {})),
        )


def _histogram_json(histogram: dict[int, int]) -> dict[str, int]:
    return {str(index): count for index, count in histogram.items()}


def _histogram(data: dict[str, Any]) -> dict[int, int]:
    return {int(index): int(count) for index, count in data.items()}


class Stats:
    """One worker's counters and its last HISTORY samples."""

    __slots__ = (
        "_base",
        "counts",
        "inherited",
        "latency",
        "samples",
        "status",
        "totals",
        "webpush_latency",
    )

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}  # cumulative since start, fed by hot paths
        self.latency: dict[int, int] = {}  # PUT deliveries since the last sample, by bucket
        self.webpush_latency: dict[int, int] = {}  # WebPush deliveries, the same way
        self.samples: deque[Sample] = deque(maxlen=HISTORY)
        self.totals: dict[str, int] = {}  # cumulative as of the last sample
        self.status: dict[str, Any] = {}  # storage's words: error texts and when
        self.inherited: dict[str, int] = {}  # the supervisor's event counts at this fork
        self._base: dict[str, int] = {}

    def incr(self, name: str, count: int = 1) -> None:
        counts = self.counts
        counts[name] = counts.get(name, 0) + count

    def delivered(self, ms: float, webpush: bool = False) -> None:
        """An update reached a device's socket `ms` after its PUT (or WebPush POST) arrived."""
        index = bucket(ms)
        latency = self.webpush_latency if webpush else self.latency
        latency[index] = latency.get(index, 0) + 1

    def take(self, t: int, gauges: dict[str, float], extra: dict[str, int]) -> Sample:
        """Close second `t`: counter deltas since the last sample, and its deliveries."""
        current = {**self.counts, **extra}
        base = self._base
        deltas = {
            name: value - base.get(name, 0)
            for name, value in current.items()
            if value != base.get(name, 0)
        }
        self._base = current
        _add(self.totals, deltas)
        span = t - self.samples[-1].t if self.samples else 1
        sample = Sample(t, max(span, 1), deltas, self.latency, gauges, self.webpush_latency)
        self.latency = {}
        self.webpush_latency = {}
        self.samples.append(sample)
        return sample

    def export(self, since: int, pid: int) -> dict[str, Any]:
        """What the admin worker collects from the others: samples after `since`."""
        return {
            "pid": pid,
            "totals": self.totals,
            "status": self.status,
            "inherited": self.inherited,
            "samples": [sample.to_json() for sample in self.samples if sample.t > since],
        }


@dataclass(slots=True)
class Worker:
    """One worker's history as the admin worker sees it (its own, or collected)."""

    index: int
    pid: int
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=HISTORY))
    totals: dict[str, int] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    inherited: dict[str, int] = field(default_factory=dict)

    @property
    def last(self) -> int:
        return self.samples[-1].t if self.samples else 0

    def absorb(self, export: dict[str, Any]) -> None:
        """Add what `Stats.export` returned; a restarted worker starts a new history."""
        pid = int(export["pid"])
        if pid != self.pid:
            self.pid = pid
            self.samples.clear()
        self.totals = export["totals"]
        self.status = export["status"]
        self.inherited = export.get("inherited", {})  # absent from an older worker's
        for data in export["samples"]:
            sample = Sample.from_json(data)
            if sample.t > self.last:
                self.samples.append(sample)


def _add(into: dict[K, int], more: dict[K, int]) -> None:
    """Counts of `more` added to `into`, name by name."""
    for name, value in more.items():
        into[name] = into.get(name, 0) + value


def _merge(samples: Iterable[Sample]) -> Sample:
    """Several workers' samples of one second as one."""
    samples = list(samples)
    counts: dict[str, int] = {}
    latency: dict[int, int] = {}
    webpush_latency: dict[int, int] = {}
    gauges: dict[str, list[float]] = {}
    for sample in samples:
        _add(counts, sample.counts)
        _add(latency, sample.latency)
        _add(webpush_latency, sample.webpush_latency)
        for name, value in sample.gauges.items():
            gauges.setdefault(name, []).append(value)
    merged = {name: _GAUGE_MERGE.get(name, sum)(values) for name, values in gauges.items()}
    span = max(sample.span for sample in samples)
    return Sample(samples[0].t, span, counts, latency, merged, webpush_latency)


def _rate(samples: Sequence[Sample], names: Sequence[str]) -> float:
    seconds = sum(sample.span for sample in samples)
    if not seconds:
        return 0.0
    events = sum(sample.counts.get(name, 0) for sample in samples for name in names)
    return round(events / seconds, 3)


def _rates(
    samples: Sequence[Sample],
    plain: dict[str, str] = RATES,
    rejected: dict[str, tuple[str, ...]] = REJECTED,
) -> dict[str, Any]:
    rates: dict[str, Any] = {key: _rate(samples, (name,)) for key, name in plain.items()}
    rates["rejected"] = {status: _rate(samples, names) for status, names in rejected.items()}
    every = [name for names in rejected.values() for name in names]
    rates["rejected"]["all"] = _rate(samples, every)  # the plots' one "rejected or failed" line
    return rates


def _latency(histograms: Iterable[dict[int, int]]) -> dict[str, Any]:
    histogram: dict[int, int] = {}
    for each in histograms:
        _add(histogram, each)
    p50, p95, p99 = percentiles(histogram, (0.5, 0.95, 0.99))
    return {"p50": p50, "p95": p95, "p99": p99, "count": sum(histogram.values())}


def _between(worker: Worker, first: int, last: int) -> list[Sample]:
    """The worker's samples of seconds first < t <= last, read from the newest end."""
    found = []
    for sample in reversed(worker.samples):
        if sample.t <= first:
            break
        if sample.t <= last:
            found.append(sample)
    found.reverse()
    return found


def _totals_at(worker: Worker, t: int) -> dict[str, int]:
    """The worker's totals as they were when sample `t` was taken."""
    totals = dict(worker.totals)
    for sample in _between(worker, t, worker.last):
        for name, value in sample.counts.items():
            totals[name] = totals.get(name, 0) - value
    return totals


def _highest(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """The supervisor's counts as of its latest fork: each worker has a copy, some older."""
    highest: dict[str, int] = {}
    for each in counts:
        for name, value in each.items():
            highest[name] = max(highest.get(name, 0), value)
    return highest


def _summed(totals: Iterable[dict[str, int]]) -> dict[str, int]:
    summed: dict[str, int] = {}
    for each in totals:
        _add(summed, each)
    return {name: value for name, value in sorted(summed.items()) if value}


def _series(samples: Sequence[Sample]) -> dict[str, list[Any]]:
    series: dict[str, list[Any]] = {
        "t": [sample.t for sample in samples],
        "span": [sample.span for sample in samples],
    }
    _plotted(series, "", samples, RATES, REJECTED, [s.latency for s in samples])
    webpush = [s.webpush_latency for s in samples]
    _plotted(series, WEBPUSH_PREFIX, samples, WEBPUSH_RATES, WEBPUSH_REJECTED, webpush)
    for gauge in ("devices", "storage_rtt_ms"):
        series[gauge] = [s.gauges.get(gauge) for s in samples]
    return series


def _plotted(
    series: dict[str, list[Any]],
    prefix: str,
    samples: Sequence[Sample],
    plain: dict[str, str],
    rejected: dict[str, tuple[str, ...]],
    histograms: Sequence[dict[int, int]],
) -> None:
    """One protocol's per-second rates (`rejected` summed) and percentiles, named prefix+key."""
    for key, name in plain.items():
        series[prefix + key] = [round(s.counts.get(name, 0) / s.span, 3) for s in samples]
    refused = [name for names in rejected.values() for name in names]
    series[prefix + "rejected"] = [
        round(sum(s.counts.get(name, 0) for name in refused) / s.span, 3) for s in samples
    ]
    quantiles = [percentiles(histogram, (0.5, 0.95, 0.99)) for histogram in histograms]
    for position, key in enumerate(("p50", "p95", "p99")):
        series[prefix + key] = [values[position] for values in quantiles]


def view(workers: Sequence[Worker], at: int | None = None, since: int = 0) -> dict[str, Any]:
    """/api/stats: the numbers at second `at` (default: the newest every worker has),
    per worker and summed, with the per-second series after `since`.
    """
    live = [worker for worker in workers if worker.samples]
    if not live:
        return {"t": None, "workers": [], "series": _series([])}
    newest = max(worker.last for worker in live)
    # A worker silent for RATE_WINDOW seconds (dead, restarting) does not hold the view back.
    current = [worker for worker in live if worker.last > newest - RATE_WINDOW]
    t = min(worker.last for worker in current) if at is None else at
    # Merged only as far back as the plot points asked for and the latency window need.
    first = max(t - HISTORY, min(since, t - LATENCY_WINDOW))
    by_second: dict[int, list[Sample]] = {}
    for worker in live:
        for sample in _between(worker, first, t):
            by_second.setdefault(sample.t, []).append(sample)
    merged = [_merge(by_second[second]) for second in sorted(by_second)]
    if not merged or merged[-1].t != t:
        return {"t": None, "workers": [], "series": _series([])}
    latest = merged[-1]
    rows = []
    for worker in workers:
        mine = _between(worker, t - RATE_WINDOW, t)
        row: dict[str, Any] = {"index": worker.index, "pid": worker.pid, "up": bool(mine)}
        gauges = mine[-1].gauges if mine else {}
        for gauge in ("devices", "connections", "memory_bytes"):
            row[gauge] = gauges.get(gauge, 0)
        row["rates"] = {key: _rate(mine, (name,)) for key, name in RATES.items()}
        webpush = {key: _rate(mine, (name,)) for key, name in WEBPUSH_RATES.items()}
        row["webpush"] = {"rates": webpush}
        rows.append(row)
    statuses = [worker.status for worker in live]
    last_errors = [status for status in statuses if status.get("last_error_at")]
    last = max(last_errors, key=lambda status: status["last_error_at"], default={})
    gauges = latest.gauges
    recent = merged[-RATE_WINDOW:]
    latency_window = [s for s in merged if s.t > t - LATENCY_WINDOW]
    totals = _summed(
        [*(_totals_at(worker, t) for worker in live), _highest(w.inherited for w in live)]
    )
    errors = [name for name in totals if name.startswith(ERROR_PREFIX)]
    return {
        "t": t,
        # The oldest second held: the server's start, until HISTORY seconds have passed.
        "start_t": min(worker.samples[0].t for worker in live),
        "rate_window_s": RATE_WINDOW,
        "latency_window_s": LATENCY_WINDOW,
        "devices": gauges.get("devices", 0),
        "connections": gauges.get("connections", 0),
        "memory_bytes": gauges.get("memory_bytes", 0),
        "rates": _rates(recent),
        "latency_ms": _latency(s.latency for s in latency_window),
        "webpush": {
            "rates": _rates(recent, WEBPUSH_RATES, WEBPUSH_REJECTED),
            "latency_ms": _latency(s.webpush_latency for s in latency_window),
        },
        "storage": {
            "ok": bool(gauges.get("storage_ok", 1)),
            "rtt_ms": gauges.get("storage_rtt_ms"),
            "error": next((s["error"] for s in statuses if s.get("error")), ""),
            "last_error": last.get("last_error", ""),
            "last_error_at": last.get("last_error_at"),
        },
        "wakeup": {key: totals.get(name, 0) for key, name in WAKEUPS.items()},
        "errors": {
            name[len(ERROR_PREFIX) :]: {"total": totals[name], "rate": _rate(recent, (name,))}
            for name in errors
        },
        "error_events": {
            "total": sum(totals[name] for name in errors),
            "rate": _rate(recent, errors),
        },
        "totals": totals,
        "workers": rows,
        "series": _series([s for s in merged if s.t > since]),
    }
