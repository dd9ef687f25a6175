"""Request-body decoding that fails exactly like Firecracker's serde_json does.

Firecracker deserializes each body straight into a typed struct, so its error
texts ("missing field `vcpu_count` at line 1 column 21", "unknown variant ...,
expected one of ...") depend on the order in which serde_json reads tokens and
on where the reader stands when a check fails. This module reproduces that:
a byte reader with serde_json's syntax errors and positions, and schema nodes
(`Struct`, `Enum`, `UInt`, ...) that consume tokens the way serde's derived
deserializers do. Field and variant order in a schema is the Rust declaration
order, because that order shows in "expected one of" lists.

Also here: Rust's `{:?}` rendering of strings and serde_json-style output
(compact separators, shortest round-trip floats as the `ryu` crate writes them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from typing import Any

WHITESPACE = b" \n\t\r"
MAX_U64 = 2**64 - 1
MIN_I64 = -(2**63)


class JsonError(Exception):
    """A serde_json error; line 0 means "no position", as serde_json prints it."""

    def __init__(self, message: str, line: int = 0, column: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column

    def __str__(self) -> str:
        if self.line == 0:
            return self.message
        return f"{self.message} at line {self.line} column {self.column}"

    def debug(self) -> str:
        """Rust's `{:?}` of serde_json::Error, as Firecracker logs it."""
        return f"Error({rust_debug_str(self.message)}, line: {self.line}, column: {self.column})"


# serde_json's ErrorCode texts.
EOF_LIST = "EOF while parsing a list"
EOF_OBJECT = "EOF while parsing an object"
EOF_STRING = "EOF while parsing a string"
EOF_VALUE = "EOF while parsing a value"
EXPECTED_COLON = "expected `:`"
EXPECTED_LIST_COMMA_OR_END = "expected `,` or `]`"
EXPECTED_OBJECT_COMMA_OR_END = "expected `,` or `}`"
EXPECTED_IDENT = "expected ident"
EXPECTED_VALUE = "expected value"
INVALID_ESCAPE = "invalid escape"
INVALID_NUMBER = "invalid number"
NUMBER_OUT_OF_RANGE = "number out of range"
INVALID_UNICODE = "invalid unicode code point"
CONTROL_CHARACTER = "control character (\\u0000-\\u001F) found while parsing a string"
KEY_MUST_BE_STRING = "key must be a string"
LONE_LEADING_SURROGATE = "lone leading surrogate in hex escape"
TRAILING_COMMA = "trailing comma"
TRAILING_CHARACTERS = "trailing characters"
UNEXPECTED_END_OF_HEX = "unexpected end of hex escape"


# ---- Rust/serde renderings ------------------------------------------------------------


def rust_debug_str(text: str) -> str:
    """`format!("{:?}", text)` for a Rust &str."""
    out = ['"']
    for ch in text:
        if ch in _DEBUG_ESCAPES:
            out.append(_DEBUG_ESCAPES[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{{{ord(ch):x}}}")
    out.append('"')
    return "".join(out)


_DEBUG_ESCAPES = {"\t": "\\t", "\r": "\\r", "\n": "\\n", "\\": "\\\\", '"': '\\"', "\0": "\\0"}


def ryu_format(value: float) -> str:
    """An f64 as the ryu crate prints it (what serde_json writes for floats)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return f"{sign}0.0"
    # repr() gives the same shortest round-trip digits as ryu; only the layout differs.
    mantissa, _, exp_text = repr(abs(value)).partition("e")
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    exponent = int(exp_text or 0) - len(frac)
    significant = digits.rstrip("0")
    exponent += len(digits) - len(significant)
    digits = significant
    length = len(digits)
    kk = length + exponent  # 10^(kk-1) <= value < 10^kk
    if 0 <= exponent and kk <= 16:
        text = digits + "0" * exponent + ".0"
    elif 0 < kk <= 16:
        text = digits[:kk] + "." + digits[kk:]
    elif -5 < kk <= 0:
        text = "0." + "0" * (-kk) + digits
    elif length == 1:
        text = f"{digits}e{kk - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{kk - 1}"
    return sign + text


def dumps(value: Any) -> str:
    """serde_json::to_string: compact, UTF-8 kept, floats in ryu form."""
    if isinstance(value, float):
        return ryu_format(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{_dump_str(str(k))}:{dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, str):
        return _dump_str(value)
    return json.dumps(value)


def _dump_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class Number:
    """A JSON number as serde_json classifies it: u64, i64 or f64."""

    __slots__ = ("kind", "value")

    def __init__(self, kind: str, value: float) -> None:
        self.kind = kind  # "u", "i" or "f"
        self.value = value

    def unexpected(self) -> str:
        if self.kind == "f":
            return f"floating point `{ryu_format(float(self.value))}`"
        return f"integer `{self.value}`"


def one_of(names: Sequence[str]) -> str:
    quoted = [f"`{n}`" for n in names]
    if len(quoted) == 1:
        return quoted[0]
    if len(quoted) == 2:
        return f"{quoted[0]} or {quoted[1]}"
    return "one of " + ", ".join(quoted)


def invalid_type(unexpected: str, expected: str) -> JsonError:
    return JsonError(f"invalid type: {unexpected}, expected {expected}")


def invalid_value(unexpected: str, expected: str) -> JsonError:
    return JsonError(f"invalid value: {unexpected}, expected {expected}")


def custom(message: str) -> JsonError:
    return JsonError(message)


# ---- the reader -----------------------------------------------------------------------


class Reader:
    """serde_json's SliceRead + Deserializer token layer over one request body."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.index = 0

    # positions: serde_json counts bytes; a newline starts line + 1, column 0.
    def _position(self, index: int) -> tuple[int, int]:
        consumed = self.data[:index]
        line = consumed.count(b"\n") + 1
        column = index - (consumed.rfind(b"\n") + 1)
        return line, column

    def error(self, message: str) -> JsonError:
        return JsonError(message, *self._position(self.index))

    def peek_error(self, message: str) -> JsonError:
        return JsonError(message, *self._position(min(len(self.data), self.index + 1)))

    def fix(self, err: JsonError) -> JsonError:
        if err.line == 0:
            err.line, err.column = self._position(self.index)
        return err

    def peek(self) -> int | None:
        return self.data[self.index] if self.index < len(self.data) else None

    def eat(self) -> None:
        self.index += 1

    def next_char(self) -> int | None:
        ch = self.peek()
        if ch is not None:
            self.index += 1
        return ch

    def skip_whitespace(self) -> int | None:
        while self.index < len(self.data) and self.data[self.index] in WHITESPACE:
            self.index += 1
        return self.peek()

    def parse_ident(self, rest: bytes) -> None:
        for expected in rest:
            ch = self.next_char()
            if ch is None:
                raise self.error(EOF_VALUE)
            if ch != expected:
                raise self.error(EXPECTED_IDENT)

    def parse_colon(self) -> None:
        ch = self.skip_whitespace()
        if ch == ord(":"):
            self.eat()
            return
        raise self.peek_error(EOF_OBJECT if ch is None else EXPECTED_COLON)

    def end(self) -> None:
        if self.skip_whitespace() is not None:
            raise self.peek_error(TRAILING_CHARACTERS)

    def end_map(self) -> None:
        ch = self.skip_whitespace()
        if ch == ord("}"):
            self.eat()
        elif ch == ord(","):
            raise self.peek_error(TRAILING_COMMA)
        elif ch is None:
            raise self.peek_error(EOF_OBJECT)
        else:
            raise self.peek_error(TRAILING_CHARACTERS)

    def end_seq(self) -> None:
        ch = self.skip_whitespace()
        if ch == ord("]"):
            self.eat()
            return
        if ch == ord(","):
            self.eat()
            if self.skip_whitespace() == ord("]"):
                raise self.peek_error(TRAILING_COMMA)
            raise self.peek_error(TRAILING_CHARACTERS)
        raise self.peek_error(EOF_LIST if ch is None else TRAILING_CHARACTERS)

    # -- numbers --
    def parse_number(self, positive: bool) -> Number:
        """After an optional '-' has been eaten: serde_json's parse_integer and friends."""
        start = self.index - (0 if positive else 1)
        first = self.next_char()
        if first is None:
            raise self.error(EOF_VALUE)
        if first == ord("0"):
            following = self.peek()
            if following is not None and ord("0") <= following <= ord("9"):
                raise self.peek_error(INVALID_NUMBER)
        elif ord("1") <= first <= ord("9"):
            while (ch := self.peek()) is not None and ord("0") <= ch <= ord("9"):
                self.eat()
        else:
            raise self.error(INVALID_NUMBER)
        is_float = False
        if self.peek() == ord("."):
            is_float = True
            self.eat()
            digits = 0
            while (ch := self.peek()) is not None and ord("0") <= ch <= ord("9"):
                self.eat()
                digits += 1
            if digits == 0:
                raise self.peek_error(INVALID_NUMBER if self.peek() is not None else EOF_VALUE)
        if self.peek() in (ord("e"), ord("E")):
            is_float = True
            self.eat()
            if self.peek() in (ord("+"), ord("-")):
                self.eat()
            ch = self.next_char()
            if ch is None:
                raise self.error(EOF_VALUE)
            if not ord("0") <= ch <= ord("9"):
                raise self.error(INVALID_NUMBER)
            while (ch := self.peek()) is not None and ord("0") <= ch <= ord("9"):
                self.eat()
        text = self.data[start:self.index].decode()
        if not is_float:
            number = int(text)
            if text == "-0":
                return Number("f", -0.0)
            if 0 <= number <= MAX_U64:
                return Number("u", number)
            if MIN_I64 <= number < 0:
                return Number("i", number)
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise self.error(NUMBER_OUT_OF_RANGE)
        return Number("f", value)

    # -- strings --
    def parse_str(self) -> str:
        """After the opening quote has been eaten."""
        out = bytearray()
        data = self.data
        while True:
            if self.index >= len(data):
                raise self.error(EOF_STRING)
            ch = data[self.index]
            self.index += 1
            if ch == ord('"'):
                try:
                    return out.decode("utf-8")
                except UnicodeDecodeError:
                    raise self.error(INVALID_UNICODE) from None
            if ch == ord("\\"):
                self._parse_escape(out)
            elif ch < 0x20:
                raise self.error(CONTROL_CHARACTER)
            else:
                out.append(ch)

    def _parse_escape(self, out: bytearray) -> None:
        ch = self.next_char()
        if ch is None:
            raise self.error(EOF_STRING)
        simple = {ord('"'): b'"', ord("\\"): b"\\", ord("/"): b"/", ord("b"): b"\b",
                  ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t"}
        if ch in simple:
            out += simple[ch]
            return
        if ch != ord("u"):
            raise self.error(INVALID_ESCAPE)
        code = self._hex4()
        if 0xDC00 <= code <= 0xDFFF:
            raise self.error(LONE_LEADING_SURROGATE)
        if 0xD800 <= code <= 0xDBFF:
            if self.next_char() != ord("\\") or self.next_char() != ord("u"):
                raise self.error(UNEXPECTED_END_OF_HEX)
            low = self._hex4()
            if not 0xDC00 <= low <= 0xDFFF:
                raise self.error(LONE_LEADING_SURROGATE)
            code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
        out += chr(code).encode("utf-8", "surrogatepass")

    def _hex4(self) -> int:
        """Four hex digits, consumed together before they are checked (as serde_json does)."""
        digits = self.data[self.index:self.index + 4]
        if len(digits) < 4:
            self.index = len(self.data)
            raise self.error(EOF_STRING)
        self.index += 4
        try:
            text = digits.decode("ascii")
            if not all(c in "0123456789abcdefABCDEF" for c in text):
                raise ValueError(text)
            return int(text, 16)
        except ValueError:
            raise self.error(INVALID_ESCAPE) from None

    # -- what an unexpected token is, for "invalid type" errors --
    def peek_invalid_type(self, expected: str) -> JsonError:
        ch = self.peek()
        if ch == ord("n"):
            self.eat()
            self.parse_ident(b"ull")
            err = invalid_type("null", expected)
        elif ch in (ord("t"), ord("f")):
            self.eat()
            self.parse_ident(b"rue" if ch == ord("t") else b"alse")
            err = invalid_type(f"boolean `{'true' if ch == ord('t') else 'false'}`", expected)
        elif ch == ord("-"):
            self.eat()
            err = invalid_type(self.parse_number(False).unexpected(), expected)
        elif ch is not None and ord("0") <= ch <= ord("9"):
            err = invalid_type(self.parse_number(True).unexpected(), expected)
        elif ch == ord('"'):
            self.eat()
            err = invalid_type(f"string {rust_debug_str(self.parse_str())}", expected)
        elif ch == ord("["):
            err = invalid_type("sequence", expected)
        elif ch == ord("{"):
            err = invalid_type("map", expected)
        else:
            return self.peek_error(EXPECTED_VALUE)
        return self.fix(err)

    # -- any value (serde_json::Value) --
    def parse_any(self) -> Any:
        ch = self.skip_whitespace()
        if ch is None:
            raise self.peek_error(EOF_VALUE)
        try:
            return self._parse_any_at(ch)
        except JsonError as err:
            raise self.fix(err) from None

    def _parse_any_at(self, ch: int) -> Any:
        if ch == ord("n"):
            self.eat()
            self.parse_ident(b"ull")
            return None
        if ch == ord("t"):
            self.eat()
            self.parse_ident(b"rue")
            return True
        if ch == ord("f"):
            self.eat()
            self.parse_ident(b"alse")
            return False
        if ch == ord("-"):
            self.eat()
            return self.parse_number(False).value
        if ord("0") <= ch <= ord("9"):
            return self.parse_number(True).value
        if ch == ord('"'):
            self.eat()
            return self.parse_str()
        if ch == ord("["):
            self.eat()
            items: list[Any] = []
            access = SeqAccess(self)
            err: JsonError | None = None
            try:
                while access.next_element():
                    items.append(self.parse_any())
            except JsonError as e:
                err = e
            err = _first_error(err, self.end_seq)
            if err:
                raise err
            return items
        if ch == ord("{"):
            self.eat()
            entries: dict[str, Any] = {}
            keys = MapAccess(self)
            err = None
            try:
                while (key := keys.next_key()) is not None:
                    self.parse_colon()
                    entries[key] = self.parse_any()
            except JsonError as e:
                err = e
            err = _first_error(err, self.end_map)
            if err:
                raise err
            # serde_json's Value keeps keys in a BTreeMap.
            return dict(sorted(entries.items()))
        raise self.peek_error(EXPECTED_VALUE)


def _first_error(err: JsonError | None, then: Callable[[], None]) -> JsonError | None:
    """serde_json always runs end_map/end_seq, and reports the visitor's error first."""
    try:
        then()
    except JsonError as end_err:
        return err or end_err
    return err


class MapAccess:
    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.first = True

    def next_key(self) -> str | None:
        r = self.reader
        ch = r.skip_whitespace()
        if ch == ord("}"):
            return None
        if ch == ord(",") and not self.first:
            r.eat()
            ch = r.skip_whitespace()
        elif ch is not None:
            if not self.first:
                raise r.peek_error(EXPECTED_OBJECT_COMMA_OR_END)
            self.first = False
        else:
            raise r.peek_error(EOF_OBJECT)
        if ch == ord('"'):
            r.eat()
            return r.parse_str()
        if ch == ord("}"):
            raise r.peek_error(TRAILING_COMMA)
        if ch is None:
            raise r.peek_error(EOF_VALUE)
        raise r.peek_error(KEY_MUST_BE_STRING)


class SeqAccess:
    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.first = True

    def next_element(self) -> bool:
        """True when an element follows (the reader stands before it)."""
        r = self.reader
        ch = r.skip_whitespace()
        if ch == ord("]"):
            return False
        if ch == ord(",") and not self.first:
            r.eat()
            ch = r.skip_whitespace()
        elif ch is not None:
            if not self.first:
                raise r.peek_error(EXPECTED_LIST_COMMA_OR_END)
            self.first = False
        else:
            raise r.peek_error(EOF_LIST)
        if ch == ord("]"):
            raise r.peek_error(TRAILING_COMMA)
        if ch is None:
            raise r.peek_error(EOF_VALUE)
        return True


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
        err = _first_error(err, r.end_seq)
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
            err = _first_error(err, r.end_map)
        elif ch == ord("["):
            r.eat()
            try:
                result = self._visit_seq(r)
            except JsonError as e:
                err = e
            err = _first_error(err, r.end_seq)
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
