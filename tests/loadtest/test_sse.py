from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from loadtest.sse import SSEDecoder, SSEEvent


def feed_all(chunks: list[bytes]) -> list[SSEEvent]:
    dec = SSEDecoder()
    out: list[SSEEvent] = []
    for c in chunks:
        out += dec.feed(c)
    out += dec.close()
    return out


def test_event_split_across_reads_and_merged_reads() -> None:
    wire = b'data: {"response":"a"}\n\ndata: {"response":"b"}\n\ndata: [DONE]\n\n'
    whole = feed_all([wire])
    assert [e.data for e in whole] == ['{"response":"a"}', '{"response":"b"}', "[DONE]"]
    assert feed_all([wire[i : i + 1] for i in range(len(wire))]) == whole


def test_comments_heartbeats_fields_and_crlf() -> None:
    dec = SSEDecoder()
    events = dec.feed(b": keep-alive\r\n\r\nevent: x\r\nid: 7\r\ndata: one\r\ndata:two\r")
    assert events == []
    assert dec.has_partial
    events = dec.feed(b"\n\r\n")
    assert events == [SSEEvent("one\ntwo", "x", "7")]
    assert dec.comments == 1
    assert not dec.has_partial


def test_unterminated_event_is_dropped_and_utf8_split() -> None:
    snow = "☃".encode()
    assert [e.data for e in feed_all([b"data: " + snow[:1], snow[1:] + b"\n\n"])] == ["☃"]
    assert feed_all([b"data: never finished"]) == []


data_line = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=20
)
event = st.tuples(
    st.lists(data_line, min_size=1, max_size=3),
    st.sampled_from(["", "message", "ping"]),
    st.booleans(),  # a comment line before it
)


@settings(max_examples=300, deadline=None)
@given(
    events=st.lists(event, max_size=8),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12),
)
def test_fuzz_any_split_decodes_the_same(
    events: list[tuple[list[str], str, bool]], eol: str, cuts: list[int]
) -> None:
    text, want = "", []
    for datas, name, comment in events:
        if comment:
            text += ": heartbeat" + eol
        if name:
            text += f"event: {name}" + eol
        text += "".join(f"data: {d}{eol}" for d in datas) + eol
        want.append(SSEEvent("\n".join(datas), name or "message"))
    wire = text.encode()
    points = sorted({c % (len(wire) + 1) for c in cuts} | {0, len(wire)})
    chunks = [wire[a:b] for a, b in itertools.pairwise(points)]
    assert feed_all(chunks) == want
    assert feed_all([wire]) == want
