"""The failures hypervisor clients raise, which the runtimes above them raise too.

RuntimeFailure is the agent's failure type for any VM operation; HypervisorApiError is
the one whose message is a hypervisor's own refusal.
"""

from __future__ import annotations


class RuntimeFailure(Exception):
    """An operation failed. `code` is the gRPC status code name the caller gets."""

    def __init__(self, message: str, code: str = "FAILED_PRECONDITION") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class HypervisorApiError(RuntimeFailure):
    """The hypervisor's API refused a request; message carries its own error text verbatim."""
