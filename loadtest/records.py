"""Per-request records: the raw capture of the hot path, and its parse done afterwards.

The client only appends `(perf_counter_ns, bytes)` per socket read. Parsing (SSE framing, JSON,
tokenising) happens here, after the request, so it never delays a timestamp. An event is stamped
with the read that carried its first byte.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields
from typing import Any

from loadtest.sse import SSEDecoder
from loadtest.targets import Piece, Target
from loadtest.workloads import Tokenizer

NS = 1e-9


@dataclass(slots=True)
class RawRecord:
    id: int
    session: int
    turn: int
    requested_tokens: int
    prompt_tokens_client: int
    intended_ns: int
    sent_ns: int = 0
    status: int | None = None
    headers_ns: int | None = None
    reads: list[tuple[int, bytes]] = field(default_factory=list)
    end_ns: int = 0
    exc: str | None = None


@dataclass(slots=True)
class RequestResult:
    """One request, all times in seconds. `*_s` are from the actual send; `*_sched_s` are from the
    intended send time (coordinated-omission-free); offsets are from the run's start."""

    id: int
    session: int
    turn: int
    status: int | None
    error: str | None
    intended_offset_s: float
    sent_offset_s: float
    end_offset_s: float
    dispatch_lag_s: float
    ttfb_s: float | None
    ttft_s: float | None
    e2e_s: float
    chunk_offsets_s: list[float]
    """Arrival of each content-bearing chunk, from the send."""
    chunk_tokens: list[int]
    requested_output_tokens: int
    output_tokens_server: int | None
    output_tokens_client: int | None
    prompt_tokens_server: int | None
    prompt_tokens_client: int
    heartbeats: int = 0
    text: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rate_limited(self) -> bool:
        return self.status == 429

    @property
    def ttft_sched_s(self) -> float | None:
        return None if self.ttft_s is None else self.ttft_s + self.dispatch_lag_s

    @property
    def e2e_sched_s(self) -> float:
        return self.e2e_s + self.dispatch_lag_s

    def output_tokens(self, source: str = "server") -> int:
        """The output length from the chosen source (`server` usage, else the client count)."""
        first, second = (
            (self.output_tokens_server, self.output_tokens_client)
            if source == "server"
            else (self.output_tokens_client, self.output_tokens_server)
        )
        return first if first is not None else (second or 0)

    @property
    def icl_s(self) -> list[float]:
        """Inter-chunk latencies: gaps between content-bearing chunks."""
        t = self.chunk_offsets_s
        return [b - a for a, b in itertools.pairwise(t)]

    @property
    def itl_s(self) -> list[float]:
        """Per-token inter-token latencies: each chunk gap split over that chunk's tokens."""
        out: list[float] = []
        for gap, k in zip(self.icl_s, self.chunk_tokens[1:], strict=False):
            k = max(k, 1)
            out.extend([gap / k] * k)
        return out

    def tpot_s(self, source: str = "server") -> float | None:
        """(last content - first content) / (output tokens - 1)."""
        n = self.output_tokens(source)
        if not self.ok or len(self.chunk_offsets_s) < 1 or n < 2:
            return None
        return (self.chunk_offsets_s[-1] - self.chunk_offsets_s[0]) / (n - 1)

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "text"}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RequestResult:
        return cls(**d)


def _chunk_tokens(texts: list[str], total: int | None, tok: Tokenizer | None) -> list[int]:
    """Tokens per content chunk: 1 each when the server's count equals the chunk count,
    else the client tokenizer's count per chunk scaled to the total, else an even split."""
    n = len(texts)
    if n == 0:
        return []
    if total is None or total == n:
        if tok is None or total == n:
            return [1] * n
        return [max(1, len(tok.encode(t))) for t in texts]
    counts = [len(tok.encode(t)) for t in texts] if tok is not None else [1] * n
    s = sum(counts) or n
    scaled = [c * total / s for c in counts]
    out = [int(x) for x in scaled]
    rest = total - sum(out)
    order = sorted(range(n), key=lambda i: scaled[i] - out[i], reverse=True)
    for i in order[: max(rest, 0)]:
        out[i] += 1
    return out


def parse(raw: RawRecord, target: Target, start_ns: int, tok: Tokenizer | None) -> RequestResult:
    pieces: list[tuple[int, Piece]] = []
    heartbeats = 0
    error = raw.exc
    if raw.status is not None and raw.status >= 400 and error is None:
        body = b"".join(d for _, d in raw.reads)
        error = f"HTTP {raw.status}: {body[:200].decode(errors='replace')}"
    elif target.stream and raw.status is not None and error is None:
        dec = SSEDecoder()
        first_ns = None
        for ts, data in raw.reads:
            start = first_ns if first_ns is not None else ts
            events = dec.feed(data)
            for i, ev in enumerate(events):
                pieces.append((start if i == 0 else ts, target.parse_event(ev.data)))
            if events or first_ns is None:
                first_ns = ts if dec.has_partial else None
        end = raw.reads[-1][0] if raw.reads else raw.end_ns
        pieces += [(end, target.parse_event(ev.data)) for ev in dec.close()]
        heartbeats = dec.comments
        if not any(p.done for _, p in pieces):
            error = "stream ended without [DONE]"
    elif raw.status is not None and error is None and raw.reads:
        pieces.append((raw.reads[-1][0], target.parse_body(b"".join(d for _, d in raw.reads))))
    errors = [p.error for _, p in pieces if p.error]
    if errors and error is None:
        error = errors[0]
    content = [(ts, p) for ts, p in pieces if p.content_bearing]
    usage = [p for _, p in pieces if p.completion_tokens is not None or p.prompt_tokens is not None]
    out_server = usage[-1].completion_tokens if usage else None
    prompt_server = usage[-1].prompt_tokens if usage else None
    text = "".join(p.content for _, p in content)
    out_client = len(tok.encode(text + "".join(p.reasoning for _, p in content))) if tok else None
    sent = raw.sent_ns
    first_byte = raw.reads[0][0] if raw.reads else None
    return RequestResult(
        id=raw.id,
        session=raw.session,
        turn=raw.turn,
        status=raw.status,
        error=error,
        intended_offset_s=(raw.intended_ns - start_ns) * NS,
        sent_offset_s=(sent - start_ns) * NS,
        end_offset_s=(raw.end_ns - start_ns) * NS,
        dispatch_lag_s=max(0, sent - raw.intended_ns) * NS,
        ttfb_s=None if first_byte is None else (first_byte - sent) * NS,
        ttft_s=(content[0][0] - sent) * NS if content and error is None else None,
        e2e_s=(raw.end_ns - sent) * NS,
        chunk_offsets_s=[(ts - sent) * NS for ts, _ in content],
        chunk_tokens=_chunk_tokens([p.content + p.reasoning for _, p in content], out_server, tok),
        requested_output_tokens=raw.requested_tokens,
        output_tokens_server=out_server,
        output_tokens_client=out_client,
        prompt_tokens_server=prompt_server,
        prompt_tokens_client=raw.prompt_tokens_client,
        heartbeats=heartbeats,
        text=text,
    )
