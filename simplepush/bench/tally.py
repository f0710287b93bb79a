"""Per-phase counters a worker keeps and the coordinator merges.

Latencies travel as raw samples (array of doubles, 8 bytes each) so merged
percentiles are exact; 100 000 samples are under 1 MB through the pipe.
"""

from __future__ import annotations

from array import array
from collections import Counter
from dataclasses import dataclass, field, fields


def _samples() -> array[float]:
    return array("d")


@dataclass(slots=True)
class Tally:
    """What one worker saw in one phase. ``attempts``/``ok`` are devices in setup, PUTs after."""

    attempts: int = 0
    ok: int = 0  # devices registered, or round trips completed (200 + notification)
    stored: int = 0  # PUT answered 202 although the device was connected
    timeouts: int = 0
    skipped: int = 0  # open loop: no idle channel when a PUT was due
    pings: int = 0
    pongs: int = 0
    pings_unanswered: int = 0  # soak: open sockets whose last ping got no answer in time
    notifications: int = 0
    dropped: int = 0  # ready sockets the server closed
    protocol_errors: int = 0
    alive: int = 0  # ready devices at the end of the phase
    client_cpu_s: float = 0.0
    wall_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    latency_ms: array[float] = field(default_factory=_samples)
    lag_ms: array[float] = field(default_factory=_samples)  # open loop: PUT due -> PUT written

    def merge(self, other: Tally) -> None:
        """Add ``other`` in: counts and samples add up, wall time is the longest."""
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if f.name == "wall_s":
                self.wall_s = max(mine, theirs)
            elif isinstance(mine, Counter):
                mine.update(theirs)
            elif isinstance(mine, array):
                mine.extend(theirs)
            else:
                setattr(self, f.name, mine + theirs)
