"""simplepush-bench's words for people: its --help and the table it prints (issue 14).

The installed console script and a one-device run against a real server.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.test_bench import BENCH_TIMEOUT, run_bench, server  # noqa: F401

BENCH = Path(sys.executable).parent / "simplepush-bench"


def test_help_shows_only_defaults_there_are():
    result = subprocess.run(
        [str(BENCH), "--help"], capture_output=True, text=True, timeout=BENCH_TIMEOUT
    )
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    for unset in ("None", "(default: False)", "(default: )", "(default: [])"):
        assert unset not in text, unset
    assert "seconds of the soak phase (default: --duration)" in text
    assert "(default: 1000)" in text  # --devices, a real default, still shown


def test_the_table_counts_in_english(server, tmp_path):  # noqa: F811
    done = run_bench(server, tmp_path / "report.json", "-n", "1", "-p", "1", "--phases", "setup")
    assert done.returncode == 0, done.stderr
    assert ": 1 device, 1 process\n" in done.stderr


# --- scripts/measure.py: ours beside the reference peers (issue 13) --------------------

MEASURE = [sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "measure.py")]
BENCH_ARGS = ["--", "-n", "3", "-p", "1", "--phases", "setup,closed", "-d", "1", "-c", "2"]


def test_measure_rotates_ours_and_the_peers_and_prints_ratios_to_each_peer():
    servers = ["ours:memory-1", "pushgo", "floor"]
    done = subprocess.run(
        [*MEASURE, "--servers", ",".join(servers), "--runs", "2", *BENCH_ARGS],
        capture_output=True,
        text=True,
        timeout=4 * BENCH_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    runs = [line.split(": ", 1) for line in lines if line.startswith("run ")]
    order = [head.rsplit(" ", 1)[0] for head, _ in runs if head.endswith(" setup")]
    assert order == [  # run 2 starts where run 1's second server stood
        "run 1 ours:memory-1",
        "run 1 pushgo",
        "run 1 floor",
        "run 2 pushgo",
        "run 2 floor",
        "run 2 ours:memory-1",
    ]
    for head, data in runs:
        numbers = json.loads(data)
        if head.endswith(" setup"):
            assert (numbers["devices_connected"], numbers["setup_errors"]) == (3, 0), head
        else:
            assert (numbers["errors"], numbers["timeouts"], numbers["stored"]) == (0, 0, 0), head
    for mine in ("ours:memory-1/pushgo", "ours:memory-1/floor"):
        ratio = next(line for line in lines if line.startswith(f"ratio {mine} closed: "))
        assert json.loads(ratio.split(": ", 1)[1])["round_trips_per_s"] > 0
    table = lines[lines.index(next(line for line in lines if line.startswith("server "))) :]
    assert [row.split()[0] for row in table[1:]] == [
        *servers,
        "ours:memory-1/pushgo",
        "ours:memory-1/floor",
    ]
    assert all(row.split()[-1] == "0" for row in table[1:4])  # nothing lost on any server


def test_measure_says_where_the_peers_are_missing(tmp_path):
    done = subprocess.run(
        [*MEASURE, "--servers", "ours:memory-1,pushgo", "--peers", str(tmp_path), *BENCH_ARGS],
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT,
    )
    assert done.returncode == 2
    assert f"--servers pushgo: no pushgo/run.sh in {tmp_path}" in done.stderr
    assert "run " not in done.stdout  # nothing was started
