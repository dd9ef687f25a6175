"""Cloud Hypervisor's API errors: the error chains its HTTP answers carry, and their texts."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


class ApiFailure(Exception):
    """An HTTP error answer: the status and Cloud Hypervisor's error chain."""

    def __init__(self, status: int, chain: Sequence[str]) -> None:
        super().__init__(": ".join(chain))
        self.status = status
        self.chain = list(chain)


# ApiError texts (vmm/src/api/mod.rs).
BOOT = "The VM could not boot"
CREATE = "The VM could not be created"
DELETE = "The VM could not be deleted"
INFO = "The VM info is not available"
PAUSE = "The VM could not be paused"
RESUME = "The VM could not resume"
SHUTDOWN = "The VM could not shutdown"
REBOOT = "The VM could not reboot"
RESIZE = "The VM could not be resized"
ADD_DISK = "The disk could not be added to the VM"
ADD_NET = "The network device could not be added to the VM"
REMOVE_DEVICE = "The device could not be removed from the VM"
POWER_BUTTON = "Error triggering power button"
NMI = "Error triggering NMI"
# VmError texts (vmm/src/vm.rs).
NOT_CREATED = "VM is not created"
MISSING_CONFIG = "VM config is missing"
ALREADY_CREATED = "VM is already created"
NOT_RUNNING = "VM is not running"
CONFIG_VALIDATION = "Failed to validate config"
DEVICE_MANAGER = "Error from device manager"


class VmFailure(Exception):
    """A VmError of Cloud Hypervisor: its text and the texts of its sources."""

    def __init__(self, *chain: str) -> None:
        super().__init__(": ".join(chain))
        self.chain = list(chain)


def api_error(action: str, *causes: str) -> ApiFailure:
    """HttpError::ApiError: "Error from API", the ApiError text, then its sources.

    404 when the VM has no config (VmNotCreated / VmMissingConfig), else 500.
    """
    status = 404 if causes and causes[0] in (NOT_CREATED, MISSING_CONFIG) else 500
    return ApiFailure(status, ["Error from API", action, *causes])


@contextmanager
def api_action(action: str) -> Iterator[None]:
    """Runs one API action: a VmFailure inside becomes that action's ApiError."""
    try:
        yield
    except VmFailure as e:
        raise api_error(action, *e.chain) from e


def os_error_text(e: OSError) -> str:
    """Rust's io::Error Display for an OS error."""
    return f"{e.strerror or os.strerror(e.errno or 0)} (os error {e.errno})"
