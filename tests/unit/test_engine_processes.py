"""The engine processes' CPU time the watchdog reads (serve/replica/engine_processes.py),
on real child processes titled as vLLM titles its own."""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from serve.replica.engine_processes import EngineProcesses

# Spins until it has used `spin` CPU seconds, then sleeps: a worker prefilling, then
# idle. Each line is one write (atomic on a pipe), so children sharing stdout never
# interleave theirs.
CHILD = """
import os, setproctitle, sys, time
setproctitle.setproctitle(sys.argv[1])
os.write(1, b"ready\\n")
while time.process_time() < float(sys.argv[2]):
    pass
os.write(1, b"idle\\n")
time.sleep(60)
"""


def line_of(lines: queue.Queue[str], timeout_s: float = 30) -> str:
    """The next line the children wrote (a dead child fails the test, not hangs it)."""
    try:
        return lines.get(timeout=timeout_s).strip()
    except queue.Empty:
        raise AssertionError("no line from the children in time") from None


@contextmanager
def replica(*titles: str, spin_s: float) -> Iterator[tuple[EngineProcesses, queue.Queue[str]]]:
    """A process standing for a replica, with one child per title (spinning `spin_s` CPU
    seconds first); yields the `EngineProcesses` of that process and the children's
    output. (This test process may have vLLM children of its own, from the engine tests
    run before it.)"""
    script = "\n".join(
        [
            "import signal, subprocess, sys, time",
            "signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # a killed child is reaped",
            f"children = [subprocess.Popen([sys.executable, '-c', {CHILD!r}, t, {str(spin_s)!r}])"
            " for t in sys.argv[1:]]",
            "time.sleep(120)",
        ]
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *titles], stdout=subprocess.PIPE, text=True
    )
    root = psutil.Process(proc.pid)
    lines: queue.Queue[str] = queue.Queue()
    stdout = proc.stdout
    assert stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True).start()
    try:
        for _ in titles:
            assert line_of(lines) == "ready"
        yield EngineProcesses(root), lines
    finally:
        for child in root.children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait(10)


def test_counts_the_vllm_titled_processes_cpu_only() -> None:
    with replica("VLLM::Worker", "not-an-engine", spin_s=1.0) as (processes, lines):
        assert processes.cpu_seconds() is None  # the first reading finds them
        assert processes.names() == ["VLLM::Worker"]
        first = processes.cpu_seconds()
        assert first is not None
        # The spinning one alone (however busy this machine is: read until it has spun).
        deadline = time.monotonic() + 30
        while (second := processes.cpu_seconds()) is not None and second - first < 0.5:
            assert time.monotonic() < deadline, "no CPU time counted for a spinning worker"
            time.sleep(0.1)
        assert second is not None
        assert [line_of(lines) for _ in range(2)] == ["idle"] * 2
        third = processes.cpu_seconds()
        time.sleep(0.5)
        fourth = processes.cpu_seconds()
        assert third is not None and fourth is not None and fourth - third < 0.2  # asleep


def test_an_engine_gone_skips_its_readings() -> None:
    with replica("VLLM::EngineCore", spin_s=0.0) as (processes, _):
        processes.cpu_seconds()
        assert processes.cpu_seconds() is not None
        for process in list(processes._found):
            process.kill()
            process.wait(10)
        assert processes.cpu_seconds() is None  # gone: looked for again, no reading
        assert processes.cpu_seconds() is None and processes.names() == []


@pytest.mark.parametrize("title", ["VLLM::EngineCore", "VLLM::Worker_TP0"])
def test_finds_each_vllm_title(title: str) -> None:
    with replica(title, spin_s=0.0) as (processes, _):
        processes.cpu_seconds()
        assert processes.names() == [title]
