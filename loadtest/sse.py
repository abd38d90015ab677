"""An incremental server-sent-events decoder (the WHATWG framing rules).

Bytes arrive in arbitrary reads: an event may be split across reads, several events may
arrive in one read, a CRLF may be split between two reads. Comment lines (`: ...`, the
heartbeats) and events without data dispatch nothing but are counted.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Feed bytes with `feed`; it returns the events completed by those bytes."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False  # any field or comment line seen in the current event
        self.comments = 0

    @property
    def has_partial(self) -> bool:
        """Bytes of an event not dispatched yet are buffered."""
        return bool(self._text) or self._started

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._text += self._utf8.decode(chunk)
        return self._lines(final=False)

    def close(self) -> list[SSEEvent]:
        """End of stream: a trailing CR ends its line; an unterminated last event is dropped."""
        self._text += self._utf8.decode(b"", final=True)
        events = self._lines(final=True)
        self._text, self._data, self._started = "", [], False
        return events

    def _lines(self, final: bool) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        text, pos = self._text, 0
        while True:
            cr, lf = text.find("\r", pos), text.find("\n", pos)
            if cr < 0 and lf < 0:
                break
            if cr >= 0 and (lf < 0 or cr < lf):
                if cr == len(text) - 1 and not final:
                    break  # a CR at the end may be the first half of a CRLF
                end, nxt = cr, cr + 2 if text.startswith("\n", cr + 1) else cr + 1
            else:
                end, nxt = lf, lf + 1
            event = self._line(text[pos:end])
            if event is not None:
                out.append(event)
            pos = nxt
        self._text = text[pos:]
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        self._started = True
        if line.startswith(":"):
            self.comments += 1
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value
        return None

    def _dispatch(self) -> SSEEvent | None:
        data, name = self._data, self._event
        self._data, self._event, self._started = [], "", False
        if not data:
            return None
        return SSEEvent(data="\n".join(data), event=name or "message", id=self._id)
