"""API errors: gRPC status codes used as meant, with google.rpc details."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class Violation:
    """One bad field: its path in the request and what is wrong with it."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class ApiError(Exception):
    """An error to return to the caller as a gRPC status."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 violations: Sequence[Violation] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.violations = list(violations)

    def to_status(self) -> grpc.Status:
        status = status_pb2.Status(code=self.code.value[0], message=_bounded(self.message))
        if self.violations:
            detail = any_pb2.Any()
            violation = error_details_pb2.BadRequest.FieldViolation
            detail.Pack(error_details_pb2.BadRequest(field_violations=[
                violation(field=_bounded(v.field, 96), description=_bounded(v.description, 160))
                for v in self.violations]))
            status.details.append(detail)
        return rpc_status.to_status(status)


# A request with thousands of bad fields hears of the first few: the error must stay small.
MAX_VIOLATIONS = 10


# Longest message a status carries, in UTF-8 bytes: whatever a request echoes, the trailers
# (message percent-encoded, details base64) stay below a client's default 8 KiB metadata
# limit, over which the caller would see RESOURCE_EXHAUSTED instead of the real answer.
MAX_MESSAGE_BYTES = 1024


def _bounded(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit].decode(errors="ignore") + f"... ({len(data) - limit} bytes more)"


def invalid(violations: Sequence[Violation]) -> ApiError:
    """INVALID_ARGUMENT naming the bad fields (the first MAX_VIOLATIONS of them)."""
    listed = list(violations[:MAX_VIOLATIONS])
    if len(violations) > MAX_VIOLATIONS:
        rest = len(violations) - MAX_VIOLATIONS
        listed.append(Violation(violations[MAX_VIOLATIONS].field,
                                f"and {rest} more violation{'s' if rest > 1 else ''}"))
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(str(v) for v in listed), listed)


def invalid_field(field: str, description: str) -> ApiError:
    return invalid([Violation(field, description)])


def not_found(vm_id: str) -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, f"vm {vm_id!r} not found")


def failed_precondition(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.FAILED_PRECONDITION, message)


def code_from_name(name: str) -> grpc.StatusCode:
    """A grpc.StatusCode from its name ("FAILED_PRECONDITION"); unknown names map to INTERNAL."""
    try:
        return grpc.StatusCode[name]
    except KeyError:
        return grpc.StatusCode.INTERNAL

