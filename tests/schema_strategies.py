"""Hypothesis strategies for Workers AI request bodies, shared by the unit and HTTP tiers.

`schema_bodies()` draws bodies from INPUT_SCHEMA itself (hypothesis-jsonschema);
`NEAR_BODIES` draws bodies around it (mostly valid, sometimes just out of range, or noise)
to be classified by `ORACLE`, the reference JSON Schema implementation.
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterator
from typing import Any

import hypothesis.internal.conjecture.utils as conjecture_utils
import hypothesis_jsonschema._from_schema as hypothesis_jsonschema_impl
import jsonschema
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from serve.protocol.workers_ai import INPUT_SCHEMA

ORACLE = jsonschema.Draft202012Validator(INPUT_SCHEMA)


def subschemas(schema: Any) -> Iterator[dict[str, Any]]:
    """`schema` and every schema nested in it (properties, items, oneOf)."""
    if isinstance(schema, dict):
        yield schema
        for key, sub in schema.items():
            if key == "properties":
                for prop in sub.values():
                    yield from subschemas(prop)
            elif key in ("items", "oneOf"):
                yield from subschemas(sub)
    elif isinstance(schema, list):
        for sub in schema:
            yield from subschemas(sub)


if not hasattr(conjecture_utils.many, "more"):

    class _LegacyMany(conjecture_utils.many):
        """hypothesis-jsonschema 0.23.1 drives `many` with `more()`, which newer Hypothesis
        replaced by `with many(...) as e: for _ in e:`. Only that library sees this shim."""

        _steps: Iterator[None] | None = None

        def more(self) -> bool:
            if self._steps is None:
                self.__enter__()
                self._steps = iter(self)
            if next(self._steps, False) is None:
                return True
            self.__exit__(None)
            return False

    shim = types.SimpleNamespace(many=_LegacyMany)
    hypothesis_jsonschema_impl.cu = shim  # type: ignore[attr-defined,assignment]


def _capped(schema: Any, cap: int = 40) -> Any:
    schema = copy.deepcopy(schema)
    for sub in subschemas(schema):
        if "maxLength" in sub:
            sub["maxLength"] = min(sub["maxLength"], cap)
    return schema


def schema_bodies(max_chars: int = 40) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies INPUT_SCHEMA accepts (strings capped at `max_chars` to keep examples small)."""
    return from_schema(_capped(INPUT_SCHEMA, max_chars))


def _names(schema: Any) -> set[str]:
    return {name for sub in subschemas(schema) for name in sub.get("properties", {})}


KEYS = st.sampled_from(sorted(_names(INPUT_SCHEMA) | {"x", "stop"}))
EDGES = [0, 1, 2, 5, 50, 51, -0.01, 0.6, 2.01, 5.01, 2.0, 9999999999, 10000000000, 256]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(EDGES)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
    | st.sampled_from(["", "user", "json_object", "json_schema"])
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


def _mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.integers(0, 11).flatmap(lambda roll: rare if roll == 0 else common)


def _near(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values around what `schema` accepts: mostly valid, sometimes just out, or noise."""
    kinds = schema.get("type", "object")
    valid: list[st.SearchStrategy[Any]] = []
    invalid: list[st.SearchStrategy[Any]] = [VALUES]
    for kind in [kinds] if isinstance(kinds, str) else kinds:
        low, high = schema.get("minimum", -(10**12)), schema.get("maximum", 10**12)
        if kind in ("integer", "number"):
            valid += [st.integers(low, high), st.sampled_from([low, high])]
            invalid.append(st.sampled_from([low - 1, high + 1]))
        if kind == "number":
            valid.append(st.floats(low, high))
            invalid.append(st.sampled_from([low - 0.01, high + 0.01]))
        if kind == "string":
            valid.append(
                st.sampled_from(schema["enum"])
                if "enum" in schema
                else st.text(min_size=schema.get("minLength", 0), max_size=3)
            )
            invalid.append(st.sampled_from(["", "x"]))
        if kind == "boolean":
            valid.append(st.booleans())
        if kind == "null":
            valid.append(st.none())
        if kind == "array":
            valid.append(st.lists(_near(schema.get("items", {})), max_size=3))
        if kind == "object":
            props = {name: _near(sub) for name, sub in schema.get("properties", {}).items()}
            required = {name: props.pop(name) for name in schema.get("required", [])}
            valid.append(st.fixed_dictionaries(required, optional=props))
            invalid.append(st.fixed_dictionaries({}, optional={**required, **props}))
    return _mostly(st.one_of(valid) if valid else VALUES, st.one_of(invalid))


def _merge(parts: tuple[Any, ...]) -> Any:
    dicts = [part for part in parts if isinstance(part, dict)]
    return {key: value for part in dicts for key, value in part.items()}


BRANCH_BODIES = st.sampled_from(INPUT_SCHEMA["oneOf"]).flatmap(_near)
EXTRA_KEYS = st.dictionaries(KEYS | st.text(max_size=3), VALUES, max_size=3)
NEAR_BODIES = _mostly(
    st.tuples(BRANCH_BODIES, EXTRA_KEYS).map(_merge),
    VALUES | st.tuples(*map(_near, INPUT_SCHEMA["oneOf"]), EXTRA_KEYS).map(_merge),
)
