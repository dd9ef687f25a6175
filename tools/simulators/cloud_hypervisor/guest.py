"""One booted VM and its simulated guest: boot, hot-plugged devices, vCPU and RAM resizing."""

from __future__ import annotations

import math
import time
from typing import Any

from tools.simulators.cloud_hypervisor import events
from tools.simulators.cloud_hypervisor.config import validation_error
from tools.simulators.cloud_hypervisor.devices import (
    Device,
    DiskImage,
    SerialPort,
    counters_for,
)
from tools.simulators.cloud_hypervisor.errors import (
    CONFIG_VALIDATION,
    DEVICE_MANAGER,
    ApiFailure,
    VmFailure,
    os_error_text,
)

GUEST_READY_LINE = "GUEST-READY"
PANIC_LINE = "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"
LOCKING_ERROR = "Error locking disk images: Another instance likely holds a lock"
HOTPLUG_SLOTS = 8  # ACPI memory hotplug slots
HOTPLUG_ALIGN = 128 << 20
DISK_PROBE_BYTES = 4096


class Guest:
    """One VM (Cloud Hypervisor's `Vm`): its devices, vCPUs, RAM and guest OS.

    Built like Vm::new: the config is validated and the devices are created (disks
    opened and their image type detected, ids named `_disk0`, `_net1`, ... from one
    counter and written back into the config); the VM is then "Created". `boot`
    does what Vm::boot does: takes the disks' advisory locks and loads the
    initramfs and kernel. A failure there leaves the VM built and "Created", and
    Cloud Hypervisor keeps it: every later vm.boot is refused until vm.shutdown
    or vm.delete drops it.
    """

    def __init__(self, config: dict[str, Any], serial: SerialPort) -> None:
        chain = validation_error(config)
        if chain is not None:
            raise VmFailure(CONFIG_VALIDATION, *chain)
        self.config = config
        self.serial = serial
        self.state = "Created"
        self.devices: dict[str, Device] = {}
        self.disk_images: dict[str, DiskImage] = {}
        self._next_id = 0
        self._boot_ids = {d["id"] for key in ("disks", "net") for d in config.get(key) or []
                          if "id" in d}
        self.boot_ram = config["memory"]["size"]
        self.current_ram = self.boot_ram
        self.hotplug_slots_used = 0
        self.unplug_pending_until = 0.0
        self.power_off_pending = False
        if config["console"]["mode"] != "Off":
            self._plug("__console", "console")
        for disk in config.get("disks") or []:
            self.attach_disk(disk)
        for net in config.get("net") or []:
            self.attach_net(net)
        self._plug("__rng", "rng")

    @property
    def cmdline(self) -> str:
        return str(self.config["payload"].get("cmdline", ""))

    @property
    def ignores_power_button(self) -> bool:
        """A guest booted with acpi=off has no ACPI: no power button, no CPU hotplug."""
        return "acpi=off" in self.cmdline.split()

    def boot(self) -> None:
        """Vm::boot: lock the disk images, load the payload, start the guest."""
        try:
            for image in self.disk_images.values():
                image.lock()
        except VmFailure as e:
            raise VmFailure(LOCKING_ERROR, "Cannot lock images of all block devices",
                            *e.chain) from e
        payload = self.config["payload"]
        for key in ("initramfs", "kernel"):
            if key in payload:
                try:
                    with open(payload[key], "rb"):
                        pass
                except OSError as e:
                    raise VmFailure(f"Cannot open {key} file", os_error_text(e)) from e
        self.state = "Running"
        self.serial.write_line(f"[    0.000000] Command line: {self.cmdline}")
        if self._panics_at_boot(payload):
            return
        for disk in self.config.get("disks") or []:
            self._probe_disk(disk)
        self.serial.write_line(GUEST_READY_LINE)

    def _panics_at_boot(self, payload: dict[str, Any]) -> bool:
        """A Linux guest told to mount a root device it has not got (root= without disks
        or an initramfs) panics; with a pvpanic device Cloud Hypervisor reports it as a
        ("guest", "panic") event, and the VM keeps running (the guest hangs, or reboots
        in place with panic=N)."""
        roots = [arg.split("=", 1)[1] for arg in self.cmdline.split() if arg.startswith("root=")]
        if not roots or self.config.get("disks") or "initramfs" in payload:
            return False
        device = roots[-1].removeprefix("/dev/")
        self.serial.write_line(f'[    0.600000] VFS: Cannot open root device "{device}" or '
                               "unknown-block(0,0): error -6")
        self.serial.write_line(f"[    0.600000] {PANIC_LINE}")
        if self.config.get("pvpanic"):
            events.event("guest", "panic", {"event": "panic"})
        return True

    def _probe_disk(self, disk: dict[str, Any]) -> None:
        # What a booting kernel does first with a disk: read its first sectors.
        device = self.devices.get(disk.get("id", ""))
        if device is None or "path" not in disk:
            return
        try:
            with open(disk["path"], "rb") as f:
                data = f.read(DISK_PROBE_BYTES)
        except OSError:
            return
        device.counters["read_ops"] += 1
        device.counters["read_bytes"] += len(data)

    def _device_name(self, prefix: str) -> str:
        while True:
            name = f"{prefix}{self._next_id}"
            self._next_id += 1
            if name not in self._boot_ids and name not in self.devices:
                return name

    def _plug(self, device_id: str, kind: str) -> Device:
        used = {d.slot for d in self.devices.values()}
        slot = next(s for s in range(1, 32) if s not in used)
        device = Device(device_id, kind, slot, counters_for(kind))
        self.devices[device_id] = device
        return device

    def attach_disk(self, disk: dict[str, Any]) -> Device:
        """Open the disk image, as the block device factory does, and plug it in.

        A disk hot-added to a booted VM takes its advisory lock at once."""
        image = None
        if "path" in disk:
            try:
                image = DiskImage.open(disk["path"], disk["readonly"], disk["image_type"])
            except VmFailure as e:
                raise VmFailure(DEVICE_MANAGER, *e.chain) from e
            # An undeclared type is detected and written back, to persist across reboots.
            disk["image_type"] = image.image_type
            if self.state != "Created":
                try:
                    image.lock()
                except VmFailure as e:
                    image.close()
                    raise VmFailure(DEVICE_MANAGER, "Cannot lock images of all block devices",
                                    *e.chain) from e
        if "id" not in disk:
            disk["id"] = self._device_name("_disk")
        if image is not None:
            self.disk_images[disk["id"]] = image
        return self._plug(disk["id"], "block")

    def attach_net(self, net: dict[str, Any]) -> Device:
        if "id" not in net:
            net["id"] = self._device_name("_net")
        return self._plug(net["id"], "net")

    def unplug(self, device_id: str) -> None:
        device = self.devices.get(device_id)
        if device is None:
            raise VmFailure(DEVICE_MANAGER, "Failed to find device corresponding to the "
                            f"given identifier: {device_id}")
        if device.kind not in ("block", "net"):
            raise VmFailure(DEVICE_MANAGER, "Not allowed to remove this type of device from "
                            f"the VM: {device.kind}")
        # This guest ejects the device at once; a real one acknowledges through ACPI.
        del self.devices[device_id]
        image = self.disk_images.pop(device_id, None)
        if image is not None:
            image.close()

    def resize_vcpus(self, desired: int, unplug_seconds: float) -> None:
        cpus = self.config["cpus"]
        if desired == cpus["boot_vcpus"]:
            return
        if desired < 1:
            raise VmFailure("Error from CPU manager", "Requested zero vCPUs")
        if time.monotonic() < self.unplug_pending_until:
            raise ApiFailure(429, ["Too Many Requests"])
        if desired > cpus["max_vcpus"]:
            raise VmFailure("Error from CPU manager", "Requested vCPUs exceed maximum")
        if desired < cpus["boot_vcpus"]:
            # The guest ejects the vCPUs through ACPI; without ACPI it never does, and the
            # removal stays pending for good.
            self.unplug_pending_until = (math.inf if self.ignores_power_button
                                         else time.monotonic() + unplug_seconds)
        cpus["boot_vcpus"] = desired

    def resize_ram(self, desired: int) -> None:
        memory = self.config["memory"]
        if memory.get("zones"):
            raise VmFailure("Memory manager error", "Impossible to resize guest memory if it "
                            "is backed by user defined memory regions")
        if desired > self.current_ram and memory["hotplug_method"] == "Acpi":
            if self.hotplug_slots_used >= HOTPLUG_SLOTS:
                raise VmFailure("Memory manager error", "No ACPI slot available")
            if (desired - self.current_ram) % HOTPLUG_ALIGN:
                raise VmFailure("Memory manager error",
                                "The requested hotplug memory addition is not a valid size")
            if desired > self.boot_ram + memory.get("hotplug_size", 0):
                raise VmFailure("Memory manager error",
                                "Not enough space in the hotplug RAM region")
            self.hotplug_slots_used += 1
            self.current_ram = desired
        # Cloud Hypervisor records the size whether or not the guest's RAM changed.
        memory["size"] = desired

    def device_tree(self) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for device in self.devices.values():
            pci_id = f"_virtio-pci-{device.id}"
            tree[device.id] = {"id": device.id, "resources": [], "parent": pci_id,
                               "children": []}
            tree[pci_id] = {"id": pci_id, "resources": [], "children": [device.id],
                            "pci_bdf": device.bdf}
        return tree

    def counters(self) -> dict[str, dict[str, int]]:
        return {d.id: dict(d.counters) for d in self.devices.values() if d.counters}

    def stop(self) -> None:
        self.state = "Shutdown"
        self.serial.close()
        for image in self.disk_images.values():
            image.close()  # closing the descriptor releases its lock
        self.disk_images.clear()
