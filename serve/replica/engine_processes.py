"""The CPU seconds this replica's vLLM engine processes have used, for the watchdog.

vLLM titles its processes `VLLM::EngineCore`, `VLLM::Worker`, ...; they run under the
replica's process. They are found once and again whenever one of them has gone (a
restarted engine), and a reading after such a change is skipped, so that the sum of two
different sets of processes is never compared.
"""

from __future__ import annotations

import psutil

TITLE_PREFIX = "VLLM::"


class EngineProcesses:
    def __init__(self, root: psutil.Process | None = None) -> None:
        self._root = root or psutil.Process()
        self._found: list[psutil.Process] = []

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the engine processes so far; None when there are
        none, or they changed since the last reading."""
        if not self._found or not all(p.is_running() for p in self._found):
            self._found = self._find()
            return None
        total = 0.0
        for process in self._found:
            try:
                times = process.cpu_times()
            except psutil.Error:
                self._found = []
                return None
            total += times.user + times.system
        return total

    def names(self) -> list[str]:
        return [p.name() for p in self._found]

    def _find(self) -> list[psutil.Process]:
        found = []
        for child in self._root.children(recursive=True):
            try:
                if child.name().startswith(TITLE_PREFIX):
                    found.append(child)
            except psutil.Error:
                continue
        return found
