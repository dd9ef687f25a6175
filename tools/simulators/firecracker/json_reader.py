"""serde_json's reader: its syntax errors and their positions, over one request body.

A byte reader (serde_json's SliceRead and Deserializer token layer) with
serde_json's ErrorCode texts and byte-counted line/column positions, plus the
map and sequence access that the schema nodes in `serde` drive.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tools.simulators.firecracker.rust_fmt import rust_debug_str, ryu_format

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
            err = first_error(err, self.end_seq)
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
            err = first_error(err, self.end_map)
            if err:
                raise err
            # serde_json's Value keeps keys in a BTreeMap.
            return dict(sorted(entries.items()))
        raise self.peek_error(EXPECTED_VALUE)


def first_error(err: JsonError | None, then: Callable[[], None]) -> JsonError | None:
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
