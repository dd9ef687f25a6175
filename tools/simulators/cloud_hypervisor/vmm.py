"""The VMM: Cloud Hypervisor's request handler (vmm/src/lib.rs), the VM state machine."""

from __future__ import annotations

import copy
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

from tools.simulators.cloud_hypervisor.config import memory_actual_size, validation_error
from tools.simulators.cloud_hypervisor.devices import SerialPort, open_serial
from tools.simulators.cloud_hypervisor.errors import (
    ADD_DISK,
    ADD_NET,
    ALREADY_CREATED,
    BOOT,
    CONFIG_VALIDATION,
    CREATE,
    INFO,
    MISSING_CONFIG,
    NMI,
    NOT_CREATED,
    NOT_RUNNING,
    PAUSE,
    POWER_BUTTON,
    REBOOT,
    REMOVE_DEVICE,
    RESIZE,
    RESUME,
    SHUTDOWN,
    VmFailure,
    api_action,
)
from tools.simulators.cloud_hypervisor.guest import Guest

VERSION = "53.0.0"
BUILD_VERSION = "v53.0"
GUEST_POWEROFF_LINE = "reboot: Power down"
# Seconds between the power button press and the guest's power-off.
GUEST_POWEROFF_DELAY = 0.1


def panic_on_missing_console_file() -> NoReturn:
    """pre_create_console_devices unwraps the file of a File console: without one, the VMM
    thread panics and the process ends, leaving the request unanswered."""
    sys.stderr.write("thread 'vmm' panicked at vmm/src/console_devices.rs:\n"
                     "called `Option::unwrap()` on a `None` value\n")
    sys.stderr.flush()
    os._exit(1)


class Vmm:
    """The VMM's state. Every API request runs under its lock, one at a time, as on
    Cloud Hypervisor's single VMM thread."""

    def __init__(self, no_shutdown: bool, unplug_seconds: float,
                 request_exit: Callable[[], None], guest_debug: bool = False) -> None:
        self.lock = threading.RLock()
        self.features = ["kvm", "io_uring", *(["guest_debug"] if guest_debug else [])]
        self.no_shutdown = no_shutdown
        self.unplug_seconds = unplug_seconds
        self.request_exit = request_exit
        self.config: dict[str, Any] | None = None
        self.vm: Guest | None = None
        self.serial: SerialPort | None = None

    def _require_config(self) -> dict[str, Any]:
        if self.config is None:
            raise VmFailure(NOT_CREATED)
        return self.config

    def _require_vm(self, missing: str = NOT_RUNNING) -> Guest:
        if self.vm is None:
            raise VmFailure(missing)
        return self.vm

    # ---- lifecycle

    def vm_create(self, config: dict[str, Any]) -> None:
        with api_action(CREATE):
            if self.config is not None:
                raise VmFailure(ALREADY_CREATED)
            for name in ("console", "serial"):
                if config[name]["mode"] == "File" and "file" not in config[name]:
                    panic_on_missing_console_file()
            # Stored first: a failure to open the serial output leaves the config in place.
            self.config = config
            self.serial = open_serial(config)

    def vm_boot(self) -> None:
        with api_action(BOOT):
            if self.vm is not None:
                raise VmFailure(ALREADY_CREATED)
            if self.config is None:
                raise VmFailure(MISSING_CONFIG)
            if self.serial is None:
                self.serial = open_serial(self.config)
            # Vm::new: a failure here leaves no VM, so a later vm.boot tries afresh.
            self.vm = Guest(self.config, self.serial)
            # Vm::boot: a failure here keeps the VM, "Created", until vm.shutdown/vm.delete.
            self.vm.boot()

    def vm_pause(self) -> None:
        with api_action(PAUSE):
            vm = self._require_vm()
            if vm.state != "Running":
                raise VmFailure("Cannot pause VM", "Failed to pause migratable component",
                                f"Invalid transition: InvalidStateTransition({vm.state}, Paused)")
            vm.state = "Paused"

    def vm_resume(self) -> None:
        with api_action(RESUME):
            vm = self._require_vm()
            if vm.state != "Paused":
                raise VmFailure("Cannot resume VM", "Failed to resume migratable component",
                                f"Invalid transition: InvalidStateTransition({vm.state}, "
                                "Running)")
            vm.state = "Running"
            if vm.power_off_pending:
                self._schedule_power_off(vm)

    def vm_shutdown(self) -> None:
        with api_action(SHUTDOWN):
            self._require_vm()
            self._drop_vm()

    def _drop_vm(self) -> None:
        # The Vm object goes away with its serial output; the config stays, so
        # vm.info says "Created" and vm.boot starts it again.
        if self.vm is not None:
            self.vm.stop()
        elif self.serial is not None:
            self.serial.close()
        self.vm = None
        self.serial = None

    def vm_reboot(self) -> None:
        with api_action(REBOOT):
            self._require_vm(missing=NOT_CREATED)
            self._drop_vm()
            config = self._require_config()
            self.serial = open_serial(config)
            self.vm = Guest(config, self.serial)
            self.vm.boot()

    def vm_delete(self) -> None:
        if self.config is not None:
            self._drop_vm()
            self.config = None

    def vmm_shutdown(self) -> None:
        self.vm_delete()

    # ---- information

    def vm_info(self) -> dict[str, Any]:
        with api_action(INFO):
            config = self._require_config()
            info: dict[str, Any] = {
                "config": config,
                "state": self.vm.state if self.vm is not None else "Created",
                "memory_actual_size": memory_actual_size(config),
            }
            if self.vm is not None:
                info["device_tree"] = self.vm.device_tree()
            return info

    def vm_counters(self) -> dict[str, Any]:
        with api_action(INFO):
            return self._require_vm().counters()

    def vmm_ping(self) -> dict[str, Any]:
        return {"build_version": BUILD_VERSION, "version": VERSION, "pid": os.getpid(),
                "features": self.features}

    # ---- the power button

    def vm_power_button(self) -> None:
        with api_action(POWER_BUTTON):
            vm = self._require_vm()
        if vm.ignores_power_button:
            return
        vm.power_off_pending = True
        if vm.state == "Running":
            self._schedule_power_off(vm)

    def _schedule_power_off(self, vm: Guest) -> None:
        timer = threading.Timer(GUEST_POWEROFF_DELAY, self._guest_powered_off, (vm,))
        timer.daemon = True
        timer.start()

    def _guest_powered_off(self, vm: Guest) -> None:
        with self.lock:
            if self.vm is not vm or vm.state != "Running":
                return
            vm.serial.write_line(f"[    1.000000] {GUEST_POWEROFF_LINE}")
            if self.no_shutdown:
                self._drop_vm()
                return
            self.vmm_shutdown()
        self.request_exit()

    # ---- resources

    def vm_resize(self, data: dict[str, Any]) -> None:
        with api_action(RESIZE):
            config = self._require_config()
            if self.vm is None:
                if "desired_vcpus" in data:
                    config["cpus"]["boot_vcpus"] = data["desired_vcpus"]
                if "desired_ram" in data:
                    config["memory"]["size"] = data["desired_ram"]
                return
            if "desired_vcpus" in data:
                self.vm.resize_vcpus(data["desired_vcpus"], self.unplug_seconds)
            if "desired_ram" in data:
                self.vm.resize_ram(data["desired_ram"])

    def vm_add_disk(self, disk: dict[str, Any]) -> dict[str, Any] | None:
        with api_action(ADD_DISK):
            return self._add_device("disks", disk)

    def vm_add_net(self, net: dict[str, Any]) -> dict[str, Any] | None:
        with api_action(ADD_NET):
            return self._add_device("net", net)

    def _add_device(self, key: str, device: dict[str, Any]) -> dict[str, Any] | None:
        config = self._require_config()
        trial = copy.deepcopy(config)
        trial[key] = [*(trial.get(key) or []), copy.deepcopy(device)]
        chain = validation_error(trial)
        if chain is not None:
            raise VmFailure(CONFIG_VALIDATION, *chain)
        if self.vm is None:
            config[key] = [*(config.get(key) or []), device]
            return None
        plugged = self.vm.attach_disk(device) if key == "disks" else self.vm.attach_net(device)
        config[key] = [*(config.get(key) or []), device]
        return {"id": plugged.id, "bdf": plugged.bdf}

    def vm_remove_device(self, device_id: str) -> None:
        with api_action(REMOVE_DEVICE):
            if self.vm is not None:
                self.vm.unplug(device_id)
                self._remove_from_config(device_id)
                return
            self._require_config()
            if not self._remove_from_config(device_id):
                raise VmFailure(f"No device with id {json.dumps(device_id)} to remove")

    def _remove_from_config(self, device_id: str) -> bool:
        config = self._require_config()
        for key in ("disks", "net"):
            devices = config.get(key) or []
            kept = [d for d in devices if d.get("id") != device_id]
            if len(kept) != len(devices):
                if kept:
                    config[key] = kept
                else:
                    config.pop(key)
                return True
        return False

    def vm_nmi(self) -> None:
        with api_action(NMI):
            self._require_vm()
