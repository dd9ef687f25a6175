"""Request-body decoding that fails exactly like Firecracker's serde derives do.

Firecracker deserializes each body straight into a typed struct, so its error
texts ("missing field `vcpu_count` at line 1 column 21", "unknown variant ...,
expected one of ...") depend on the order in which serde_json reads tokens and
on where the reader stands when a check fails. The schema nodes here (`Struct`,
`Enum`, `UInt`, ...) consume tokens from `json_reader.Reader` the way serde's
derived deserializers do. Field and variant order in a schema is the Rust
declaration order, because that order shows in "expected one of" lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tools.simulators.firecracker.json_reader import (
    EOF_OBJECT,
    EOF_VALUE,
    EXPECTED_VALUE,
    JsonError,
    MapAccess,
    Reader,
    SeqAccess,
    first_error,
    invalid_type,
    invalid_value,
)


def one_of(names: Sequence[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    if len(quoted) == 1:
        return quoted[0]
    if len(quoted) == 2:
        return f"{quoted[0]} or {quoted[1]}"
    return "one of " + ", ".join(quoted)


# ---- schema nodes ---------------------------------------------------------------------


class Schema:
    """One Rust type's Deserialize impl."""

    expecting = "a value"

    def read(self, r: Reader) -> Any:
        raise NotImplementedError


class UInt(Schema):
    def __init__(self, rust_type: str, bits: int) -> None:
        self.expecting = rust_type
        self.max = 2**bits - 1

    def read(self, r: Reader) -> int:
        ch = r.skip_whitespace()
        if ch is None:
            raise r.peek_error(EOF_VALUE)
        try:
            if ch == ord("-"):
                r.eat()
                number = r.parse_number(False)
            elif ord("0") <= ch <= ord("9"):
                number = r.parse_number(True)
            else:
                raise r.peek_invalid_type(self.expecting)
            if number.kind == "f":
                raise invalid_type(number.unexpected(), self.expecting)
            if not 0 <= int(number.value) <= self.max:
                raise invalid_value(number.unexpected(), self.expecting)
            return int(number.value)
        except JsonError as err:
            raise r.fix(err) from None


class Bool(Schema):
    expecting = "a boolean"

    def read(self, r: Reader) -> bool:
        ch = r.skip_whitespace()
        if ch is None:
            raise r.peek_error(EOF_VALUE)
        if ch == ord("t"):
            r.eat()
            r.parse_ident(b"rue")
            return True
        if ch == ord("f"):
            r.eat()
            r.parse_ident(b"alse")
            return False
        raise r.peek_invalid_type(self.expecting)


class Str(Schema):
    """String ("a string"), PathBuf ("path string") and other string-visited types.

    `check` runs inside the string visitor, so its error is positioned right after
    the string, as serde_json positions visitor errors.
    """

    def __init__(self, expecting: str = "a string",
                 check: Callable[[str], Any] | None = None) -> None:
        self.expecting = expecting
        self.check = check

    def read(self, r: Reader) -> Any:
        ch = r.skip_whitespace()
        if ch is None:
            raise r.peek_error(EOF_VALUE)
        if ch != ord('"'):
            raise r.peek_invalid_type(self.expecting)
        r.eat()
        text = r.parse_str()
        if self.check is None:
            return text
        try:
            return self.check(text)
        except JsonError as err:
            raise r.fix(err) from None


class Validated(Schema):
    """A custom Deserialize that reads an inner type, then validates it.

    Its error carries no position, so the enclosing struct positions it after
    its own end (serde_json's fix_position at the struct level).
    """

    def __init__(self, inner: Schema, check: Callable[[Any], Any]) -> None:
        self.inner = inner
        self.expecting = inner.expecting
        self.check = check

    def read(self, r: Reader) -> Any:
        return self.check(self.inner.read(r))


class Enum(Schema):
    """A Rust enum of unit variants, externally tagged (`"Variant"`)."""

    def __init__(self, name: str, variants: Sequence[str]) -> None:
        self.expecting = f"enum {name}"
        self.variants = list(variants)

    def _variant(self, r: Reader) -> str:
        ch = r.skip_whitespace()
        if ch is None:
            raise r.peek_error(EOF_VALUE)
        if ch != ord('"'):
            raise r.peek_invalid_type("variant identifier")
        r.eat()
        name = r.parse_str()
        if name not in self.variants:
            raise r.fix(JsonError(f"unknown variant `{name}`, expected {self._expected()}"))
        return name

    def _expected(self) -> str:
        return one_of(self.variants) if self.variants else "there are no variants"

    def read(self, r: Reader) -> str:
        ch = r.skip_whitespace()
        if ch == ord('"'):
            return self._variant(r)
        if ch == ord("{"):
            # {"Variant": null}: the map form of a unit variant.
            r.eat()
            name = self._variant(r)
            r.parse_colon()
            if r.skip_whitespace() == ord("n"):
                r.eat()
                r.parse_ident(b"ull")
            elif r.peek() is None:
                raise r.peek_error(EOF_VALUE)
            else:
                raise r.peek_invalid_type("unit")
            end = r.skip_whitespace()
            if end == ord("}"):
                r.eat()
                return name
            raise r.error(EOF_OBJECT if end is None else EXPECTED_VALUE)
        if ch is None:
            raise r.peek_error(EOF_VALUE)
        raise r.peek_error(EXPECTED_VALUE)


class Opt(Schema):
    def __init__(self, inner: Schema) -> None:
        self.inner = inner
        self.expecting = "option"

    def read(self, r: Reader) -> Any:
        if r.skip_whitespace() == ord("n"):
            r.eat()
            r.parse_ident(b"ull")
            return None
        return self.inner.read(r)


class Seq(Schema):
    expecting = "a sequence"

    def __init__(self, inner: Schema) -> None:
        self.inner = inner

    def read(self, r: Reader) -> list[Any]:
        ch = r.skip_whitespace()
        if ch is None:
            raise r.peek_error(EOF_VALUE)
        if ch != ord("["):
            raise r.peek_invalid_type(self.expecting)
        r.eat()
        items: list[Any] = []
        access = SeqAccess(r)
        err: JsonError | None = None
        try:
            while access.next_element():
                items.append(self.inner.read(r))
        except JsonError as e:
            err = e
        err = first_error(err, r.end_seq)
        if err:
            raise r.fix(err)
        return items


class AnyValue(Schema):
    """serde_json::Value."""

    def read(self, r: Reader) -> Any:
        return r.parse_any()


# Marks a field without `#[serde(default)]`.
NO_DEFAULT: Any = object()


class Field:
    def __init__(self, name: str, schema: Schema, default: Any = NO_DEFAULT) -> None:
        self.name = name
        self.schema = schema
        # A value, or a zero-argument factory for mutable defaults; NO_DEFAULT when the
        # Rust field has no #[serde(default)].
        self.default = default

    @property
    def has_default(self) -> bool:
        return self.default is not NO_DEFAULT

    @property
    def required(self) -> bool:
        # serde fills a missing Option with None in the map form only.
        return not self.has_default and not isinstance(self.schema, Opt)

    def default_value(self) -> Any:
        if not self.has_default:
            return None
        return self.default() if callable(self.default) else self.default


def field(name: str, schema: Schema, default: Any = NO_DEFAULT) -> Field:
    return Field(name, schema, default)


class Struct(Schema):
    """A `#[derive(Deserialize)]` struct; returns a dict in declaration order."""

    def __init__(self, name: str, fields: Sequence[Field], deny_unknown: bool = True) -> None:
        self.name = name
        self.expecting = f"struct {name}"
        self.fields = list(fields)
        self.by_name = {f.name: f for f in self.fields}
        self.deny_unknown = deny_unknown

    def read(self, r: Reader) -> dict[str, Any]:
        ch = r.skip_whitespace()
        if ch is None:
            raise r.peek_error(EOF_VALUE)
        err: JsonError | None = None
        result: dict[str, Any] = {}
        if ch == ord("{"):
            r.eat()
            try:
                result = self._visit_map(r)
            except JsonError as e:
                err = e
            err = first_error(err, r.end_map)
        elif ch == ord("["):
            r.eat()
            try:
                result = self._visit_seq(r)
            except JsonError as e:
                err = e
            err = first_error(err, r.end_seq)
        else:
            raise r.peek_invalid_type(self.expecting)
        if err:
            raise r.fix(err)
        return result

    def _visit_map(self, r: Reader) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        keys = MapAccess(r)
        while (key := keys.next_key()) is not None:
            known = self.by_name.get(key)
            if known is None:
                if self.deny_unknown:
                    raise JsonError(self._unknown_field(key))
                r.parse_colon()
                r.parse_any()
                continue
            if key in seen:
                raise JsonError(f"duplicate field `{key}`")
            r.parse_colon()
            seen[key] = known.schema.read(r)
        result: dict[str, Any] = {}
        for f in self.fields:
            if f.name in seen:
                result[f.name] = seen[f.name]
            elif f.required:
                raise JsonError(f"missing field `{f.name}`")
            else:
                result[f.name] = f.default_value()
        return result

    def _visit_seq(self, r: Reader) -> dict[str, Any]:
        access = SeqAccess(r)
        result: dict[str, Any] = {}
        expected = f"struct {self.name} with {len(self.fields)} element" + (
            "" if len(self.fields) == 1 else "s")
        for i, f in enumerate(self.fields):
            if access.next_element():
                result[f.name] = f.schema.read(r)
            elif not f.has_default:
                raise JsonError(f"invalid length {i}, expected {expected}")
            else:
                result[f.name] = f.default_value()
        return result

    def _unknown_field(self, key: str) -> str:
        if not self.fields:
            return f"unknown field `{key}`, there are no fields"
        return f"unknown field `{key}`, expected {one_of([f.name for f in self.fields])}"


def from_slice(schema: Schema, body: bytes) -> Any:
    """serde_json::from_slice::<T>(body): the value, or a JsonError."""
    r = Reader(body)
    value = schema.read(r)
    r.end()
    return value
