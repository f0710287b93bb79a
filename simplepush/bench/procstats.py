"""Server CPU and RSS from /proc, summed over the given PIDs and all their descendants.

Sampled by the coordinator before and after each phase, so CPU is per phase.
Descendants are found by scanning every /proc/<pid>/stat for its parent,
which also works where /proc/<pid>/task/<tid>/children is not compiled in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class Sample:
    """utime+stime in seconds per PID, and total resident memory in KiB, of a process tree."""

    cpu_s: dict[int, float]
    rss_kb: float

    def cpu_since(self, before: Sample) -> float:
        """CPU seconds the processes alive now used since ``before`` (new ones: all of theirs).

        A process that exited in between is left out rather than making the sum negative.
        """
        return sum(cpu - before.cpu_s.get(pid, 0.0) for pid, cpu in self.cpu_s.items())


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:  # exited meanwhile
        return None
    return data[data.rindex(b")") + 2 :].decode().split()


def descendants(roots: list[int]) -> list[int]:
    """``roots`` that still exist plus all their descendants."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    todo = [pid for pid in roots if os.path.exists(f"/proc/{pid}")]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return found


def sample(roots: list[int]) -> Sample:
    """CPU and RSS of ``roots`` and their descendants right now."""
    cpu: dict[int, float] = {}
    rss_pages = 0
    for pid in descendants(roots):
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z":  # a zombie has exited: nothing to measure
            cpu[pid] = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (14, 15)
            rss_pages += int(fields[21])  # rss (stat field 24)
    return Sample(cpu, rss_pages * PAGE_BYTES / 1024)


def listen_overflows() -> int | None:
    """Host-wide count of connections dropped because a listen queue was full.

    Not per server, but on a bench host it explains setup latency tails of
    one second and more: a dropped SYN is retried after 1 s, then 3 s.
    """
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split(), values.split(), strict=True))
            return int(table["ListenOverflows"]) if "ListenOverflows" in table else None
    return None
