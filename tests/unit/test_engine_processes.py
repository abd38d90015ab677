"""The engine processes' CPU time the watchdog reads (serve/replica/engine_processes.py),
on real child processes titled as vLLM titles its own."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from serve.replica.engine_processes import EngineProcesses

# Spins for `spin` seconds, then sleeps: a worker prefilling, then idle.
CHILD = """
import setproctitle, sys, time
setproctitle.setproctitle(sys.argv[1])
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    pass
time.sleep(60)
"""


@contextmanager
def child(title: str, spin_s: float) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, title, str(spin_s)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(10)


def test_counts_the_vllm_titled_processes_cpu_only() -> None:
    with child("VLLM::Worker", spin_s=1.0), child("not-an-engine", spin_s=1.0):
        processes = EngineProcesses(psutil.Process())
        assert processes.cpu_seconds() is None  # the first reading finds them
        assert processes.names() == ["VLLM::Worker"]
        first = processes.cpu_seconds()
        assert first is not None
        time.sleep(1.2)
        second = processes.cpu_seconds()
        assert second is not None and second - first >= 0.5  # the spinning one alone
        time.sleep(0.5)
        third = processes.cpu_seconds()
        assert third is not None and third - second < 0.2  # now asleep


def test_a_replaced_engine_skips_one_reading() -> None:
    processes = EngineProcesses(psutil.Process())
    with child("VLLM::EngineCore", spin_s=0.0):
        processes.cpu_seconds()
        assert processes.cpu_seconds() is not None
    assert processes.cpu_seconds() is None  # gone: found again, no reading
    with child("VLLM::EngineCore", spin_s=0.0):
        assert processes.cpu_seconds() is None  # the new one found: still no comparison
        assert processes.cpu_seconds() is not None


@pytest.mark.parametrize("title", ["VLLM::EngineCore", "VLLM::Worker_TP0"])
def test_finds_each_vllm_title(title: str) -> None:
    with child(title, spin_s=0.0):
        processes = EngineProcesses(psutil.Process())
        processes.cpu_seconds()
        assert processes.names() == [title]
