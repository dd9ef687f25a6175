"""Backend runtimes: one module or package per hypervisor, all behind runtimes.base.Runtime."""

from __future__ import annotations

import importlib

from agent.runtimes.base import Runtime, RuntimeSettings

# backend name -> "module:class". Each runtime detects its own binary or simulator.
RUNTIME_CLASSES: dict[str, str] = {
    "firecracker": "agent.runtimes.firecracker:FirecrackerRuntime",
    "cloud-hypervisor": "agent.runtimes.cloud_hypervisor:CloudHypervisorRuntime",
    "qemu": "agent.runtimes.qemu.runtime:QemuRuntime",
}


def runtime_class(backend: str) -> type[Runtime]:
    module_name, class_name = RUNTIME_CLASSES[backend].split(":")
    cls: type[Runtime] = getattr(importlib.import_module(module_name), class_name)
    return cls


def detect_runtimes(
    settings: dict[str, RuntimeSettings], enabled: list[str] | None = None
) -> dict[str, Runtime]:
    """The runtimes this host can offer, by backend name."""
    found: dict[str, Runtime] = {}
    for backend in enabled or list(RUNTIME_CLASSES):
        runtime = runtime_class(backend).detect(settings.get(backend, RuntimeSettings()))
        if runtime is not None:
            found[backend] = runtime
    return found
