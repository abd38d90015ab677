"""Engine liveness: an engine holding unfinished requests must keep producing output.

vLLM's `AsyncLLM.check_health` only looks at a dead flag, so a stopped engine process
(SIGSTOP, a wedged kernel) would pass Serve's health check forever. The watchdog is
fed on each health check with two numbers the engine's front end keeps cheaply: how
many requests are unfinished and a counter of outputs produced so far. If there is
work and the counter has not moved for `stall_s`, the engine is declared stalled and
the health check fails, so Serve replaces the replica. The gateway then ends every
running generation at once with 408/3007 (`CompletionService.check_health`), or earlier
at the request timeout if that comes first.

One engine step can itself outlast `stall_s` on the CPU backend: there every prompt is
prefilled in a single step (chunked prefill is off, `serve.replica.vllm_engine`), and
one of 7,890 tokens took 43 s on 2 vCPUs with nothing else running, so two at once or a
slower machine went past the 60 s default and a working replica was replaced with all
its requests. So the engine may also report the CPU seconds its processes have used
(`busy_s`): a reading in which they used at least `busy_share` of a core since the one
before counts as progress too. A stopped EngineCore leaves its worker polling for work
at about a tenth of a core (measured: 1.1 s in 10 s), so a stall is still seen.
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

    def __init__(
        self,
        stall_s: float,
        *,
        busy_share: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stall_s = stall_s
        self.busy_share = busy_share
        self._clock = clock
        self._outputs: int | None = None
        # The last (time, busy_s) reading that reported CPU seconds.
        self._busy: tuple[float, float] | None = None
        # Since when the engine has had work but produced nothing (None: not stalled).
        self._since: float | None = None
        # Unfinished requests when the stall was declared (None: no stall declared).
        self._declared_with: int | None = None

    def check(self, *, unfinished: int, outputs: int, busy_s: float | None = None) -> None:
        """Raise `EngineStalled` if work has waited `stall_s` without any output, nor
        (when `busy_s`, the engine processes' CPU seconds so far, is given) the engine
        computing in the meantime."""
        now = self._clock()
        moved = outputs != self._outputs or self._computed(now, busy_s)
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

    def _computed(self, now: float, busy_s: float | None) -> bool:
        """Whether the engine used at least `busy_share` of a core since the last reading."""
        if busy_s is None:  # not measured, or a different set of processes
            self._busy = None
            return False
        last, self._busy = self._busy, (now, busy_s)
        if last is None or now <= last[0]:
            return False
        return busy_s - last[1] >= self.busy_share * (now - last[0])
