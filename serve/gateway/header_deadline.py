"""A deadline for request headers on the gateway's own HTTP server (slowloris).

uvicorn times nothing between a connection's first byte and the end of its request
headers: its keep-alive timer starts only after a response, and the next byte cancels it.
A client that connects and sends nothing, or one header byte a second, holds a
connection and its buffers for as long as it likes. In front of the replicas HAProxy's
`timeout http-request` cuts such a client (serve/ingress.py), but each replica's own
direct-ingress port is reachable without HAProxy, and Serve starts that server itself,
with no knob for a timeout.

`HeaderDeadlineProtocol` is uvicorn's httptools protocol with one timer: armed when a
connection opens and when bytes arrive after a complete response (a further request, or
bytes that start none), disarmed when a request's headers are complete. When it fires the
client gets 408/3007 in the envelope of both dialects and the connection is closed. A
pipelined request that trickles while the previous response is still being written only
makes the connection close after that response. The request body is the gateway's to
time (`body_timeout_s`, serve/gateway/body.py).

`install` makes it the protocol of every uvicorn server this process starts afterwards,
which is how a replica gets it into the server Serve builds (after the replica's
constructor ran). The cost: one timer per request on the event loop, and two attribute
checks per chunk of bytes received.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from uvicorn import config as uvicorn_config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.errors import HeaderTimeout
from serve.gateway.error_wire import raw_error_response


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose headers come too slowly."""

    # Process-wide, like the uvicorn protocol table `install` edits.
    header_timeout_s: ClassVar[float] = 10.0

    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Bytes after a complete response: a next request begins, or bytes no request
        # starts with (CRLFs between requests, the rest of a body the app never read),
        # which would otherwise cancel the keep-alive timer for ever.
        if self._deadline is None and self.cycle is not None and self.cycle.response_complete:
            self._arm()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request trickles behind a response still being written.
            self.cycle.keep_alive = False
            return
        self.transport.write(raw_error_response(HeaderTimeout(self.header_timeout_s)))
        self.transport.close()


def install(
    header_timeout_s: float, protocol: type[HeaderDeadlineProtocol] = HeaderDeadlineProtocol
) -> None:
    """Make `protocol` (this class or a subclass) with this timeout the HTTP protocol of
    the uvicorn servers this process starts from now on (`http="auto"` or `"httptools"`)."""
    HeaderDeadlineProtocol.header_timeout_s = header_timeout_s
    path = f"{protocol.__module__}:{protocol.__qualname__}"
    for name in ("auto", "httptools"):
        uvicorn_config.HTTP_PROTOCOLS[name] = path
