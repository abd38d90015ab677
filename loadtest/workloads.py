"""Workloads: sessions of user turns with exact token lengths, from the served model's tokenizer.

A session is one or more user turns sent one after the other (multi-turn: each turn carries the
history, with the assistant's real answers). Single requests are one-turn sessions.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def special_ids(self) -> frozenset[int]: ...


class HFTokenizer:
    """The served model's tokenizer (a local checkpoint directory; nothing is downloaded)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        self._tok: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset(int(i) for i in self._tok.all_special_ids)


@dataclass(frozen=True, slots=True)
class UserTurn:
    text: str
    prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Session:
    id: int
    turns: tuple[UserTurn, ...]
    system: str | None = None
    think_time_s: float = 0.0
    raw: bool = False
    """Send the text as a raw prompt (no chat template) where the dialect allows it, so the
    server's prompt length is exactly `prompt_tokens`."""


@dataclass(frozen=True)
class LengthDist:
    """`N` (fixed), `A-B` (uniform, inclusive) or `MEAN,STD` (normal, clipped to >= 1)."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        s = str(spec).strip()
        if m := re.fullmatch(r"(\d+)-(\d+)", s):
            return cls("uniform", float(m[1]), float(m[2]))
        if m := re.fullmatch(r"(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)", s):
            return cls("normal", float(m[1]), float(m[2]))
        if s.isdigit():
            return cls("fixed", float(s))
        raise ValueError(f"length spec {spec!r}: use N, A-B or MEAN,STD")

    def draw(self, rng: random.Random) -> int:
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        if self.kind == "normal":
            return max(1, round(rng.gauss(self.a, self.b)))
        return int(self.a)


def exact_text(tok: Tokenizer, n: int, rng: random.Random, attempts: int = 50) -> str:
    """Text that the tokenizer encodes to exactly `n` tokens (random ordinary tokens)."""
    pool = [i for i in range(tok.vocab_size) if i not in tok.special_ids]
    for _ in range(attempts):
        ids = [rng.choice(pool) for _ in range(n)]
        for _ in range(20):
            text = tok.decode(ids)
            got = tok.encode(text)
            if len(got) == n and text.strip() == text and text:
                return text
            ids = (
                got[:n] if len(got) >= n else got + [rng.choice(pool) for _ in range(n - len(got))]
            )
            ids = [i for i in ids if i not in tok.special_ids] or [rng.choice(pool)]
    raise ValueError(f"could not build a prompt of exactly {n} tokens")


def synthetic(
    tok: Tokenizer,
    n: int,
    input_len: LengthDist,
    output_len: LengthDist,
    seed: int = 0,
    raw: bool = True,
) -> list[Session]:
    rng = random.Random(seed)
    sessions = []
    for i in range(n):
        k = input_len.draw(rng)
        turn = UserTurn(exact_text(tok, k, rng), k, output_len.draw(rng))
        sessions.append(Session(i, (turn,), raw=raw))
    return sessions


def shared_prefix(
    tok: Tokenizer,
    n: int,
    groups: int,
    prefix_len: int,
    suffix_len: LengthDist,
    output_len: LengthDist,
    seed: int = 0,
) -> list[Session]:
    """`groups` system prompts of `prefix_len` tokens; each request adds a unique user turn."""
    rng = random.Random(seed)
    prefixes = [exact_text(tok, prefix_len, rng) for _ in range(groups)]
    sessions = []
    for i in range(n):
        k = suffix_len.draw(rng)
        turn = UserTurn(exact_text(tok, k, rng), k + prefix_len, output_len.draw(rng))
        sessions.append(Session(i, (turn,), system=prefixes[i % groups]))
    return sessions


def multi_turn(
    tok: Tokenizer,
    n_sessions: int,
    turns: int,
    input_len: LengthDist,
    output_len: LengthDist,
    think_time_s: float = 0.0,
    seed: int = 0,
) -> list[Session]:
    rng = random.Random(seed)
    sessions = []
    for i in range(n_sessions):
        ts = []
        for _ in range(turns):
            k = input_len.draw(rng)
            ts.append(UserTurn(exact_text(tok, k, rng), k, output_len.draw(rng)))
        sessions.append(Session(i, tuple(ts), think_time_s=think_time_s))
    return sessions


def sharegpt(
    path: Path,
    tok: Tokenizer,
    n: int,
    seed: int = 0,
    output_len: LengthDist | None = None,
    multi_turn: bool = False,
    max_prompt_tokens: int = 1024,
) -> list[Session]:
    """Sessions from a ShareGPT-format JSON file (`[{"conversations": [{"from", "value"}]}]`).
    The requested output length is the recorded answer's token length unless given."""
    data = json.loads(path.read_text())
    rng = random.Random(seed)
    order = list(range(len(data)))
    rng.shuffle(order)
    sessions: list[Session] = []
    for idx in order:
        if len(sessions) >= n:
            break
        conv = data[idx].get("conversations") or data[idx].get("conversation") or []
        turns: list[UserTurn] = []
        for a, b in zip(conv[::2], conv[1::2], strict=False):
            if a.get("from") not in ("human", "user") or b.get("from") not in ("gpt", "assistant"):
                break
            p = len(tok.encode(a["value"]))
            out = output_len.draw(rng) if output_len else max(1, len(tok.encode(b["value"])))
            if p < 1 or p > max_prompt_tokens:
                break
            turns.append(UserTurn(a["value"], p, out))
            if not multi_turn:
                break
        if turns:
            sessions.append(Session(len(sessions), tuple(turns)))
    if not sessions:
        raise ValueError(f"{path}: no usable conversations")
    return sessions


class WordTokenizer:
    """A stand-in when no model tokenizer is given: one token per space-separated word of a
    fixed vocabulary. Lengths are then exact only for this toy scheme; the server's usage
    counts are what to trust (the report flags the disagreement)."""

    WORDS: tuple[str, ...] = tuple(
        [
            "the",
            "a",
            "sea",
            "boat",
            "wind",
            "wave",
            "sun",
            "fox",
            "dog",
            "tree",
            "star",
            "moon",
            "rain",
            "city",
            "road",
            "book",
            "song",
            "bird",
            "stone",
            "river",
            "cloud",
            "light",
            "night",
            "day",
            "green",
            "blue",
            "red",
            "small",
            "big",
            "warm",
            "cold",
            "fast",
            "slow",
        ]
    )

    def encode(self, text: str) -> list[int]:
        index = {w: i for i, w in enumerate(self.WORDS)}
        return [index.get(w, 0) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.WORDS[i % len(self.WORDS)] for i in ids)

    @property
    def vocab_size(self) -> int:
        return len(self.WORDS)

    @property
    def special_ids(self) -> frozenset[int]:
        return frozenset()
