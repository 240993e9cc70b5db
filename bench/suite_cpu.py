"""Where the test suite's time goes: a pytest plugin that records each test's wall time and how busy
the machine's CPUs were meanwhile (from /proc/stat, so every process counts: engines, gateways, CLI
runs), then prints the share per file.

A file whose CPUs sit idle half its time is waiting on processes; that is the time a second xdist
worker fills. This is how `-n 2` was chosen (README, "How long, and why"):

  PYTHONPATH=bench python -m pytest -p suite_cpu -ra     # one worker: CPUs busy 68% (2026-12-07)

Under xdist (`-n 2`: 93%) the workers' summaries are not shown: SUITE_CPU_OUT names a JSON-lines file
that every worker appends its per-test rows to.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import pytest

_rows: list[dict] = []


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    user, nice, system, idle, iowait, irq, softirq, steal = map(int, open("/proc/stat").readline().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    (busy0, total0), started = _cpu_ticks(), time.monotonic()
    yield
    (busy1, total1), wall = _cpu_ticks(), time.monotonic() - started
    row = {"test": item.nodeid, "wall_s": round(wall, 2), "busy": round((busy1 - busy0) / max(1, total1 - total0), 3)}
    _rows.append(row)
    if os.environ.get("SUITE_CPU_OUT"):
        with open(os.environ["SUITE_CPU_OUT"], "a") as out:
            out.write(json.dumps(row) + "\n")


def pytest_terminal_summary(terminalreporter):
    if not _rows:
        return  # the xdist controller runs no test: each worker keeps its rows (SUITE_CPU_OUT)
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for row in _rows:
        spent = files[row["test"].split("::")[0]]
        spent[0] += row["wall_s"]
        spent[1] += row["wall_s"] * row["busy"]
    terminalreporter.section("CPU share per file")
    for name, (wall, busy) in sorted(files.items(), key=lambda item: -item[1][0]):
        terminalreporter.write_line(f"{wall:8.1f} s  CPUs busy {busy / wall:4.0%}  {name}")
    wall, busy = sum(w for w, _ in files.values()), sum(b for _, b in files.values())
    terminalreporter.write_line(f"{wall:8.1f} s  CPUs busy {busy / wall:4.0%}  all tests")
