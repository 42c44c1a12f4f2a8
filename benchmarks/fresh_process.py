"""Measuring in a fresh process, so that its peak resident memory is the measured work's own.

A benchmark script runs itself again with `--child VARIANT` (`run_child`); the child does the work, then
`report(seconds, **extra)` prints one JSON line with the seconds and the process's peak memory in MiB.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def report(seconds: float, **extra) -> None:
    """The child's result line: seconds, peak resident memory (MiB) and `extra`."""
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mib": peak_mib, **extra}))


def run_child(script: str, args: list[str], variant: str) -> dict:
    """Run `python script *args --child variant` and return its `report` line."""
    done = subprocess.run(
        [sys.executable, script, *args, "--child", variant], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])
