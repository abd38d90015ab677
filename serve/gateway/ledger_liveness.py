"""Ledger owners' liveness: a heartbeat per owner and the sweep that finalizes the open
entries of dead owners (`serve.gateway.ledger` explains the write-ahead scheme)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from serve.gateway.ledger import LOST_REASON

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LivenessTimers:
    """How often an owner proves it is alive, when it counts as dead, how often a live
    owner looks for dead ones (`Settings.usage_*`)."""

    heartbeat_s: float = 2.0
    dead_after_s: float = 10.0
    sweep_s: float = 5.0


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Liveness:
    """One ledger owner's background task: a heartbeat every `heartbeat_s` and, every
    `sweep_s`, the sweep that finalizes dead owners' open entries.

    Sweeps only run once the store has answered this owner's heartbeats, each within half
    of `dead_after_s`, for a whole `dead_after_s` (from the start it is trusted): after an
    outage or a stall of the store, every live owner first gets the time to beat again, so
    none is taken for dead because the store failed everyone. The task lives on the event
    loop that first needed it; `stop` ends it.
    """

    def __init__(
        self,
        name: str,
        timers: LivenessTimers,
        beat: Callable[[], Awaitable[None]],
        sweep: Callable[[], Awaitable[int]],
    ) -> None:
        self._name = name
        self._timers = timers
        self._beat = beat
        self._sweep = sweep
        self._task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        task = self._task
        if task is not None and not task.done() and not task.get_loop().is_closed():
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"{self._name} liveness"
        )

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None or task.done() or task.get_loop().is_closed():
            return
        if task.get_loop() is not asyncio.get_running_loop():
            task.get_loop().call_soon_threadsafe(task.cancel)
            return
        # Again until it ends: Python 3.11's wait_for (inside a beat) can swallow a cancel
        # that lands as its call completes. asyncio.wait never raises, so a cancel of the
        # caller still propagates.
        while not task.done():
            task.cancel()
            await asyncio.wait([task], timeout=0.1)

    async def _run(self) -> None:
        timers, loop = self._timers, asyncio.get_running_loop()
        trusted_from = loop.time() - timers.dead_after_s
        next_sweep, failing = 0.0, False
        while True:
            started = loop.time()
            try:
                await self._beat()
                # Slow enough that other owners may be missing their beats too.
                prompt = loop.time() - started <= timers.dead_after_s / 2
                if failing:
                    log.warning("%s: heartbeat works again", self._name)
                failing = False
            except Exception as err:
                if not failing:
                    log.warning("%s: heartbeat failed (%s)", self._name, type(err).__name__)
                prompt, failing = False, True
            now = loop.time()
            if not prompt:
                trusted_from = now
            elif now - trusted_from >= timers.dead_after_s and now >= next_sweep:
                next_sweep = now + timers.sweep_s
                try:
                    lost = await self._sweep()
                except Exception as err:
                    log.warning("%s: sweep failed (%s)", self._name, type(err).__name__)
                else:
                    if lost:
                        log.warning(
                            "%s: %d requests of dead ledger owners recorded as %s",
                            self._name,
                            lost,
                            LOST_REASON,
                        )
            await asyncio.sleep(timers.heartbeat_s)
