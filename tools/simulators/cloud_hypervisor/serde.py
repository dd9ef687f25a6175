"""Request bodies decoded as serde_json decodes them, with serde's messages and positions.

A JSON decoder that remembers where each value ends, and the schema nodes
(`Struct`, `Variant`, `Unsigned`, ...) that check a decoded value as serde's
derived deserializers of Cloud Hypervisor's config structs do.
"""

from __future__ import annotations

import copy
import json
import json.decoder
import json.scanner
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tools.simulators.cloud_hypervisor.errors import ApiFailure


class SerdeError(Exception):
    def __init__(self, message: str, position: int) -> None:
        super().__init__(message)
        self.message = message
        self.position = position


class JsonObject(dict[str, Any]):
    """A decoded JSON object that remembers where it and each member value ended."""

    end: int = 0
    value_ends: dict[str, int]


# The standard library's object parser, which the pure-Python scanner calls back.
_JSON_OBJECT: Callable[..., tuple[Any, int]] = getattr(json.decoder, "JSONObject")  # noqa: B009


def _parse_object(s_and_end: tuple[str, int], strict: bool, scan_once: Any,
                  object_hook: Any, object_pairs_hook: Any, memo: Any = None) -> Any:
    ends: list[int] = []

    def scan_recording_end(string: str, idx: int) -> Any:
        value, end = scan_once(string, idx)
        ends.append(end)
        return value, end

    pairs, end = _JSON_OBJECT(s_and_end, strict, scan_recording_end, None, list, memo)
    obj = JsonObject()
    obj.value_ends = {}
    for (key, value), value_end in zip(pairs, ends, strict=True):
        obj[key] = value
        obj.value_ends[key] = value_end
    obj.end = end
    return obj, end


def _position_decoder() -> json.JSONDecoder:
    decoder = json.JSONDecoder()
    # The pure-Python scanner calls the decoder's parse_object; the C one would not.
    setattr(decoder, "parse_object", _parse_object)  # noqa: B010
    py_make_scanner = getattr(json.scanner, "py_make_scanner")  # noqa: B009
    setattr(decoder, "scan_once", py_make_scanner(decoder))  # noqa: B010
    return decoder


def _line_column(text: str, end: int) -> tuple[int, int]:
    """serde_json's position: line and column of the last character read."""
    end = max(1, min(end, len(text)))
    line = text.count("\n", 0, end) + 1
    return line, end - (text.rfind("\n", 0, end) + 1)


_SYNTAX_MESSAGES = {
    "Expecting value": "expected value",
    "Expecting property name enclosed in double quotes": "key must be a string",
    "Expecting ',' delimiter": "expected `,` or `}`",
    "Expecting ':' delimiter": "expected `:`",
    "Extra data": "trailing characters",
}


def deserialize(raw: bytes, kind: Kind) -> Any:
    """Decode a request body against a schema; errors are 400 with serde's message."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiFailure(400, ["Failed to deserialize JSON",
                               f"invalid unicode code point at line 1 column {e.start + 1}"]) from e
    try:
        value = _position_decoder().decode(text)
    except json.JSONDecodeError as e:
        message = _SYNTAX_MESSAGES.get(e.msg, e.msg[:1].lower() + e.msg[1:])
        if e.pos >= len(text.rstrip()):
            message = "EOF while parsing a value"
        line, column = _line_column(text, e.pos + 1)
        raise ApiFailure(400, ["Failed to deserialize JSON",
                               f"{message} at line {line} column {column}"]) from e
    try:
        return kind.decode(value, len(text))
    except SerdeError as e:
        line, column = _line_column(text, e.position)
        raise ApiFailure(400, ["Failed to deserialize JSON",
                               f"{e.message} at line {line} column {column}"]) from e


# ---- schema nodes ---------------------------------------------------------------------


def _unexpected(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{'true' if value else 'false'}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{value!r}`"
    if isinstance(value, str):
        return f"string {json.dumps(value)}"
    return "sequence" if isinstance(value, list) else "map"


class Kind:
    expected = ""

    def decode(self, value: Any, end: int) -> Any:
        raise NotImplementedError

    def wrong_type(self, value: Any, end: int) -> SerdeError:
        return SerdeError(f"invalid type: {_unexpected(value)}, expected {self.expected}", end)


class Unsigned(Kind):
    def __init__(self, name: str, bits: int) -> None:
        self.expected = name
        self.limit = (1 << bits) - 1

    def decode(self, value: Any, end: int) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong_type(value, end)
        if not 0 <= value <= self.limit:
            raise SerdeError(f"invalid value: integer `{value}`, expected {self.expected}", end)
        return value


class Boolean(Kind):
    expected = "a boolean"

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, bool):
            raise self.wrong_type(value, end)
        return value


class Text(Kind):
    def __init__(self, expected: str = "a string") -> None:
        self.expected = expected

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, str):
            raise self.wrong_type(value, end)
        return value


class Variant(Kind):
    """A Rust enum of unit variants, spelled as a JSON string."""

    def __init__(self, name: str, variants: Sequence[str]) -> None:
        self.expected = f"enum {name}"
        self.variants = tuple(variants)

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, str):
            raise self.wrong_type(value, end)
        if value not in self.variants:
            names = [f"`{v}`" for v in self.variants]
            choice = (f"{names[0]} or {names[1]}" if len(names) == 2
                      else "one of " + ", ".join(names))
            raise SerdeError(f"unknown variant `{value}`, expected {choice}", end)
        return value


class ListOf(Kind):
    expected = "a sequence"

    def __init__(self, item: Kind) -> None:
        self.item = item

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, list):
            raise self.wrong_type(value, end)
        return [self.item.decode(v, getattr(v, "end", end)) for v in value]


class Maybe(Kind):
    def __init__(self, inner: Kind) -> None:
        self.inner = inner
        self.expected = inner.expected

    def decode(self, value: Any, end: int) -> Any:
        return None if value is None else self.inner.decode(value, end)


class Anything(Kind):
    """A part of the config the simulator keeps as given."""

    def decode(self, value: Any, end: int) -> Any:
        return value


REQUIRED = object()


@dataclass(frozen=True)
class Field:
    name: str
    kind: Kind
    # REQUIRED, a value, or a callable that makes one. Options default to None.
    default: Any = None
    # PciDeviceCommonConfig's `iommu` is left out of the output when false.
    skip_if_false: bool = False


class Struct(Kind):
    def __init__(self, name: str, fields: Sequence[Field], deny_unknown: bool = False) -> None:
        self.expected = f"struct {name}"
        self.fields = tuple(fields)
        self.by_name = {f.name: f for f in self.fields}
        # #[serde(deny_unknown_fields)]: an unknown field is an error, not skipped.
        self.deny_unknown = deny_unknown

    def _unknown_field(self, key: str, end: int) -> SerdeError:
        names = [f"`{f.name}`" for f in self.fields]
        expected = (" or ".join(names) if len(names) <= 2
                    else ", ".join(names[:-1]) + f", or {names[-1]}")
        return SerdeError(f"unknown field `{key}`, expected {expected}", end)

    def decode(self, value: Any, end: int) -> Any:
        if not isinstance(value, dict):
            raise self.wrong_type(value, end)
        object_end = getattr(value, "end", end)
        value_ends: dict[str, int] = getattr(value, "value_ends", {})
        decoded: dict[str, Any] = {}
        for key, item in value.items():
            spec = self.by_name.get(key)
            if spec is not None:
                decoded[key] = spec.kind.decode(item, value_ends.get(key, object_end))
            elif self.deny_unknown:
                raise self._unknown_field(key, value_ends.get(key, object_end))
        for spec in self.fields:
            if spec.name in decoded:
                continue
            if spec.default is REQUIRED:
                raise SerdeError(f"missing field `{spec.name}`", object_end)
            default = spec.default() if callable(spec.default) else spec.default
            decoded[spec.name] = copy.deepcopy(default)
        # Output as serde would serialise it: None options and skipped falses left out.
        return {f.name: decoded[f.name] for f in self.fields
                if decoded[f.name] is not None
                and not (f.skip_if_false and decoded[f.name] is False)}

    def default_value(self, **given: Any) -> dict[str, Any]:
        result: dict[str, Any] = self.decode(given, 0)
        return result


U8, U16, U32, U64, USIZE = (Unsigned("u8", 8), Unsigned("u16", 16), Unsigned("u32", 32),
                            Unsigned("u64", 64), Unsigned("usize", 64))
BOOL, STRING, PATH, ANY = Boolean(), Text(), Text("path string"), Anything()
