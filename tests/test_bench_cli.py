"""simplepush-bench's words for people: its --help and the table it prints (issue 14).

The installed console script and a one-device run against a real server.
"""

from __future__ import annotations

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
