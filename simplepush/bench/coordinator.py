"""The coordinator: spawns the worker processes, runs the phases in lock-step,
samples the server's /proc between phases and merges what the workers saw."""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from simplepush.bench import procstats
from simplepush.bench.report import phase_report, summary
from simplepush.bench.settings import WorkerSettings
from simplepush.bench.tally import Tally
from simplepush.bench.worker import worker_main

# Seconds kept back from --timeout: workers finish their phase REPORT_GRACE
# before the end; the coordinator gives up waiting for them STOP_GRACE before
# it and then takes at most STOP_GRACE to stop them.
REPORT_GRACE = 4.0
STOP_GRACE = 2.0


class Aborted(Exception):
    """The run cannot go on; the message becomes the report's ``aborted`` field."""


@dataclass(frozen=True, slots=True)
class Plan:
    """A validated run: what to do, with what, for how long."""

    workers: list[WorkerSettings]
    phases: list[str]
    closed_workers: int
    rate: float
    duration: float
    soak_duration: float
    ping_interval: float
    pids: list[int]
    timeout: float
    config: dict[str, Any]


def share(total: int, parts: int, i: int) -> int:
    """Part ``i`` of ``total`` split as evenly as possible over ``parts``."""
    return total // parts + (1 if i < total % parts else 0)


def run(plan: Plan, start: float) -> dict[str, Any]:
    """Run ``plan`` and return the report; never exceeds ``start + plan.timeout``."""
    ctx = multiprocessing.get_context("spawn")  # clean children: no inherited loop or state
    deadline = start + plan.timeout - STOP_GRACE
    procs: list[BaseProcess] = []
    conns: list[Connection] = []
    phases: dict[str, dict[str, Any]] = {}
    aborted = None
    server_pids: set[int] = set()
    try:
        for settings in plan.workers:
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(settings, child),
                daemon=True,
                name=f"simplepush-bench-{settings.index}",
            )
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        _receive_all(conns, deadline)  # every worker has booted: phases start together
        for name in plan.phases:
            print(f"simplepush-bench: phase {name} starts", file=sys.stderr, flush=True)
            args = [_phase_args(plan, name, i) for i in range(len(conns))]
            overflows = procstats.listen_overflows()
            before = procstats.sample(plan.pids) if plan.pids else None
            for conn, arg in zip(conns, args, strict=True):
                conn.send((name, arg))
            tally = Tally()
            for result in _receive_all(conns, deadline):
                tally.merge(result)
            after = procstats.sample(plan.pids) if plan.pids else None
            for sampled in (before, after):
                server_pids.update(sampled.cpu_s if sampled else ())
            phases[name] = phase_report(name, _phase_params(plan, name), tally, before, after)
            now = procstats.listen_overflows()
            phases[name]["host_listen_overflows"] = (
                None if now is None or overflows is None else now - overflows
            )
    except Aborted as exc:
        aborted = str(exc)
    except KeyboardInterrupt:
        aborted = "interrupted"
    finally:
        _stop(conns, procs)
    return {
        "tool": "simplepush-bench",
        "config": plan.config,
        "server_processes": sorted(server_pids),
        "completed": aborted is None,
        "aborted": aborted,
        "phases": phases,
        "summary": summary(phases),
    }


def _phase_args(plan: Plan, name: str, i: int) -> tuple[Any, ...]:
    n = len(plan.workers)
    if name == "closed":
        return (share(plan.closed_workers, n, i), plan.duration)
    if name == "open":  # rate in proportion to the devices each process holds
        return (
            plan.rate * plan.workers[i].devices / sum(w.devices for w in plan.workers),
            plan.duration,
        )
    if name == "soak":
        return (plan.soak_duration, plan.ping_interval)
    return ()


def _phase_params(plan: Plan, name: str) -> dict[str, Any]:
    if name == "setup":
        return {"devices_requested": sum(w.devices for w in plan.workers)}
    if name == "closed":
        return {"workers": plan.closed_workers}
    if name == "open":
        return {"target_rate_per_s": plan.rate}
    return {"ping_interval_s": plan.ping_interval}


def _receive_all(conns: list[Connection], deadline: float) -> list[Any]:
    """One message from every worker, waiting at most until the deadline."""
    results = []
    waiting = list(conns)
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Aborted("global --timeout reached")
        for conn in wait(waiting, left):
            assert isinstance(conn, Connection)
            waiting.remove(conn)
            try:
                result = conn.recv()
            except (EOFError, OSError):
                raise Aborted("a worker process died") from None
            if isinstance(result, str):  # a worker's traceback
                raise Aborted(f"a worker failed:\n{result}")
            results.append(result)
    return results


def _stop(conns: list[Connection], procs: list[BaseProcess]) -> None:
    """Ask workers to stop, then make sure they are gone."""
    for conn in conns:
        with contextlib.suppress(OSError):
            conn.send(("stop", ()))
    until = time.monotonic() + STOP_GRACE
    for proc in procs:
        proc.join(max(0.0, until - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
