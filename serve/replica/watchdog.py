"""Engine liveness: an engine holding unfinished requests must keep producing output.

vLLM's `AsyncLLM.check_health` only looks at a dead flag, so a stopped engine process
(SIGSTOP, a wedged kernel) would pass Serve's health check forever. The watchdog is
fed on each health check with two numbers the engine's front end keeps cheaply: how
many requests are unfinished and a counter of outputs produced so far. If there is
work and the counter has not moved for `stall_s`, the engine is declared stalled and
the health check fails, so Serve replaces the replica. The gateway then ends every
running generation at once with 408/3007 (`CompletionService.check_health`), or earlier
at the request timeout if that comes first.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from serve.errors import EngineStalled

__all__ = ["EngineStalled", "ProgressWatchdog"]


class ProgressWatchdog:
    """Decides, from successive (unfinished, outputs) readings, whether an engine is stalled.

    Once a stall is declared it stays declared until the output count moves again, even
    if the unfinished requests go away meanwhile: the request timeout aborts them, and a
    stopped engine without work would otherwise look idle and pass before Serve has seen
    enough failed checks in a row to replace the replica.
    """

    def __init__(self, stall_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s = stall_s
        self._clock = clock
        self._outputs: int | None = None
        # Since when the engine has had work but produced nothing (None: not stalled).
        self._since: float | None = None
        # Unfinished requests when the stall was declared (None: no stall declared).
        self._declared_with: int | None = None

    def check(self, *, unfinished: int, outputs: int) -> None:
        """Raise `EngineStalled` if work has waited `stall_s` without any output."""
        now = self._clock()
        moved = outputs != self._outputs
        self._outputs = outputs
        if moved:
            self._declared_with = None
            self._since = None if unfinished == 0 else now
            return
        if self._declared_with is not None and self._since is not None:
            raise EngineStalled(now - self._since, max(unfinished, self._declared_with))
        if unfinished == 0:
            self._since = None
            return
        if self._since is None:
            self._since = now
        stalled = now - self._since
        if stalled >= self.stall_s:
            self._declared_with = unfinished
            raise EngineStalled(stalled, unfinished)
