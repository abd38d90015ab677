"""A draining replica ends its generations before Serve stops it.

When Serve stops a replica (a rolling restart, a scale-down, `batchserve up` exiting),
the replica drains: its `/-/healthz` answers 503 `DRAINING`, HAProxy stops sending it
requests, and Serve waits for the requests in flight, for at most the deployment's
`graceful_shutdown_timeout_s`. Then the controller kills the actor, and a stream still
running ends as a broken connection, with no error event and no `[DONE]`.

Serve (2.60) tells the application nothing when draining begins, so the replica asks:
`DrainWatch` polls its own `/-/healthz`, on the address it learned from the first request
it served (`LearnAddress`), and once it sees the drain, calls `on_deadline` shortly
before the budget runs out. The replica's composition (`serve.cluster.compose_replica`)
makes that end every running generation with 503/3040 and Retry-After (an error event
then `[DONE]` for a stream) and fail later ones at once; the usage record is this
replica's own, with the tokens it generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable

import psutil
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)

Address = tuple[str, int]


class Health(enum.Enum):
    SERVING = "serving"  # 200
    UNHEALTHY = "unhealthy"  # 503 for another reason (a failed health check)
    DRAINING = "draining"  # 503 DRAINING
    CLOSED = "closed"  # connection refused: the listener is closed (late in a drain)
    UNKNOWN = "unknown"  # no answer in time


Probe = Callable[[Address, float], Awaitable[Health]]

_MAX_ANSWER = 4096
_REQUEST = b"GET /-/healthz HTTP/1.1\r\nHost: replica\r\nConnection: close\r\n\r\n"


async def probe_healthz(address: Address, timeout_s: float) -> Health:
    """Serve's data-plane health of the replica listening on `address`."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(*address)
            try:
                writer.write(_REQUEST)
                answer = b""
                while len(answer) < _MAX_ANSWER and (chunk := await reader.read(_MAX_ANSWER)):
                    answer += chunk
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except ConnectionRefusedError:
        return Health.CLOSED
    except (OSError, TimeoutError):
        return Health.UNKNOWN
    status = answer.split(b" ", 2)[1:2]
    if status == [b"200"]:
        return Health.SERVING
    if b"DRAINING" in answer:
        return Health.DRAINING
    return Health.UNHEALTHY if status else Health.UNKNOWN


class DrainWatch:
    """Calls `on_deadline` `margin_s` before a drain's `budget_s` runs out.

    The drain began after the last probe that found the replica serving was sent, so the
    deadline counts from that probe: at most `poll_s` early, never late (but for Serve's
    own delay in telling the replica, which `margin_s` covers)."""

    def __init__(
        self,
        on_deadline: Callable[[], None],
        *,
        budget_s: float,
        poll_s: float,
        margin_s: float = 1.0,
        probe: Probe = probe_healthz,
    ) -> None:
        self._on_deadline = on_deadline
        self._budget_s = budget_s
        self._poll_s = poll_s
        self._margin_s = margin_s
        self._probe = probe
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        # When the drain was seen, and when `on_deadline` ran (monotonic clock).
        self.draining_seen_at: float | None = None
        self.ended_at: float | None = None

    @property
    def started(self) -> bool:
        return self._task is not None

    def watch(self, address: Address) -> None:
        """Start watching the replica at `address` (later calls change nothing)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(address))
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self.ended_at is None and not self._stopped:
            log.error("the drain watch ended early: %r", task)

    def stop(self) -> None:
        self._stopped = True
        if self._task is not None:
            self._task.cancel()

    async def _run(self, address: Address) -> None:
        log.info("watching %s:%d for the start of a drain", *address)
        last_serving: float | None = None
        while True:
            sent = time.monotonic()
            try:
                health = await self._probe(address, self._poll_s)
            except Exception:  # never end the watch: a drain would then go unseen
                log.exception("drain probe of %s:%d failed", *address)
                health = Health.UNKNOWN
            if health in (Health.DRAINING, Health.CLOSED):
                break
            if health is not Health.UNKNOWN:
                last_serving = sent
            await asyncio.sleep(max(0.0, sent + self._poll_s - time.monotonic()))
        self.draining_seen_at = now = time.monotonic()
        began = now if last_serving is None else last_serving
        wait_s = max(0.0, began + self._budget_s - self._margin_s - now)
        log.info(
            "replica draining (%s): a generation still running %.1f s from now ends with 503/3040",
            health.value,
            wait_s,
        )
        await asyncio.sleep(wait_s)
        self.ended_at = time.monotonic()
        self._on_deadline()


def listening_here(port: int) -> bool:
    """Whether this process listens on `port` (the replica's own direct-ingress server)."""
    connections = psutil.Process().net_connections(kind="inet")
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections)


class LearnAddress:
    """ASGI middleware: starts the watch on the address a request came to, once it is the
    replica's own server. A request can also arrive through Serve's proxy (HAProxy's
    fallback before it knows the replica): its `server` is the proxy's, whose health says
    nothing of this replica."""

    def __init__(
        self, app: ASGIApp, watch: DrainWatch, is_own: Callable[[int], bool] = listening_here
    ) -> None:
        self.app = app
        self.watch = watch
        self._is_own = is_own
        self._not_own: set[int] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.watch.started and scope["type"] == "http":
            server = scope.get("server")
            if server is not None and server[1] is not None and server[1] not in self._not_own:
                if self._is_own(int(server[1])):
                    self.watch.watch((str(server[0]), int(server[1])))
                else:
                    self._not_own.add(int(server[1]))
        await self.app(scope, receive, send)
