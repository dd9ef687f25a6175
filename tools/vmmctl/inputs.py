"""What vmmctl reads from its user: memory sizes and VM config files."""

from __future__ import annotations

import json
import re
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

import typer
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from vmm.v1 import vm_pb2

_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "ki": 1 << 10, "kib": 1 << 10,
    "m": 1 << 20, "mi": 1 << 20, "mib": 1 << 20,
    "g": 1 << 30, "gi": 1 << 30, "gib": 1 << 30,
    "t": 1 << 40, "ti": 1 << 40, "tib": 1 << 40,
}


def parse_memory_size(text: str) -> int:
    """Bytes from "1073741824", "512MiB", "2GiB", "1.5GiB" or QEMU-style "512M".

    Units are binary. "MB"/"GB" are refused rather than guessed: a decimal
    megabyte is not a size any hypervisor here accepts for guest memory.
    """
    match = _SIZE_PATTERN.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 512MiB, 2GiB or a byte count")
    number, unit = match.group(1), match.group(2).lower()
    if unit not in _SIZE_UNITS:
        hint = f" (did you mean {number}{unit[0].upper()}iB?)" if unit[:1] in "kmgt" else ""
        raise ValueError(f"unknown size unit {match.group(2)!r}{hint}; use KiB, MiB, GiB or TiB")
    try:
        size = Decimal(number) * _SIZE_UNITS[unit]
    except InvalidOperation as exc:  # pragma: no cover - the pattern admits only decimals
        raise ValueError(f"{text!r} is not a size") from exc
    if size != size.to_integral_value():
        raise ValueError(f"{text!r} is not a whole number of bytes")
    if size <= 0:
        raise ValueError("a memory size must be greater than zero")
    return int(size)


def memory_size_option(text: str) -> int:
    try:
        return parse_memory_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


def _unknown_field(data: Any, descriptor: Descriptor, path: str) -> str | None:
    """The first JSON key with no field in the message, as a path and the valid names.

    protobuf's own error names the camelCase JSON names; people writing the
    spec's snake_case JSON need the path they wrote and the names they may use.
    """
    if not isinstance(data, dict):
        return None  # wrong shapes are left to ParseDict, which names them well enough
    for key, value in data.items():
        fd = descriptor.fields_by_name.get(key) or _field_by_json_name(descriptor, key)
        where = f"{path}.{key}" if path else key
        if fd is None:
            known = ", ".join(f.name for f in descriptor.fields)
            return f'unknown field "{where}"; {descriptor.name} has: {known}'
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        # A list is a repeated field's elements; a list in the wrong place is ParseDict's to name.
        if isinstance(value, list):
            elements = [(f"{where}[{i}]", item) for i, item in enumerate(value)]
        else:
            elements = [(where, value)]
        for element_path, element in elements:
            problem = _unknown_field(element, fd.message_type, element_path)
            if problem:
                return problem
    return None


def _field_by_json_name(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    return next((f for f in descriptor.fields if f.json_name == name), None)


def _parse_error_text(error: json_format.ParseError) -> str:
    """ "Failed to parse config field: Failed to parse cpu field: X" as "config.cpu: X"."""
    text = str(error)
    path: list[str] = []
    while match := re.match(r"Failed to parse (\w+) field: ", text):
        path.append(match.group(1))
        text = text[match.end():]
    text = text.rstrip(".")
    return f"{'.'.join(path)}: {text}" if path else text


class ConfigFileError(ValueError):
    """A VM config file that cannot be read or does not describe a VmConfig."""


def load_create_request(path: str) -> vm_pb2.CreateVmRequest:
    """A CreateVmRequest from a JSON file ("-" is stdin).

    The file is either the spec's shape, {"config": {...}} (optionally with
    vm_id, backend, host_id beside it), or a bare VmConfig object. Raises
    ConfigFileError naming the file and the offending field.
    """
    source = "<stdin>" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"cannot read {source}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigFileError(f"{source}: not valid JSON: {exc.msg} at line {exc.lineno}, "
                              f"column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise ConfigFileError(f"{source}: expected a JSON object")

    wrapped = "config" in data
    request = vm_pb2.CreateVmRequest()
    target: Message = request if wrapped else request.config
    problem = _unknown_field(data, cast(Descriptor, target.DESCRIPTOR), "")
    if problem is None:
        try:
            json_format.ParseDict(data, target)
        except json_format.ParseError as exc:
            problem = _parse_error_text(exc)
    if problem:
        raise ConfigFileError(f"{source}: {problem}")
    return request
