"""Rust's `{:?}` rendering of strings, and serde_json-style output.

serde_json writes compact separators and shortest round-trip floats as the
`ryu` crate prints them.
"""

from __future__ import annotations

import json
import math
from typing import Any


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
