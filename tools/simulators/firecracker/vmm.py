"""The simulated VMM: Firecracker's pre-boot / post-boot action handling and the VM lifecycle.

Actions carry Firecracker's VmmAction names. Before InstanceStart (or a
snapshot load) the configuration actions are served and the runtime ones fail
with "... not supported before starting the microVM."; afterwards the reverse.
Like Firecracker, a failed snapshot load leaves the process unusable: it
answers, then exits with status 1.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

from tools.simulators.firecracker import guest, snapshot
from tools.simulators.firecracker.devices import RunningDevices
from tools.simulators.firecracker.errno import io_error
from tools.simulators.firecracker.http import EventLoop, Timer
from tools.simulators.firecracker.logger import Logger, open_nonblocking
from tools.simulators.firecracker.metrics import Metrics, MetricsAlreadyInitialized
from tools.simulators.firecracker.resources import ActionError, VmResources

NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"
VERSION = "1.14.2"
PRE_BOOT_ERROR = "The requested operation is not supported before starting the microVM."
POST_BOOT_ERROR = "The requested operation is not supported after starting the microVM."
# How long a Linux guest takes from Ctrl+Alt+Del to the reset that ends Firecracker.
REBOOT_DELAY_S = 0.1
# Firecracker writes metrics every 60 s once the microVM runs.
METRICS_PERIOD_S = 60.0

PRE_BOOT_ONLY = frozenset({
    "ConfigureBootSource", "ConfigureLogger", "ConfigureMetrics", "ConfigureSerial",
    "InsertBlockDevice", "InsertPmemDevice", "InsertNetworkDevice", "LoadSnapshot",
    "PutCpuConfiguration", "SetBalloonDevice", "SetVsockDevice", "SetMmdsConfiguration",
    "SetEntropyDevice", "SetMemoryHotplugDevice", "StartMicroVm", "UpdateMachineConfiguration"})
POST_BOOT_ONLY = frozenset({
    "CreateSnapshot", "FlushMetrics", "Pause", "Resume", "GetBalloonStats",
    "GetMemoryHotplugStatus", "UpdateBalloon", "UpdateBalloonStatistics", "UpdateBlockDevice",
    "UpdateMemoryHotplugSize", "UpdateNetworkInterface", "StartFreePageHinting",
    "GetFreePageHintingStatus", "StopFreePageHinting", "SendCtrlAltDel"})
# Configuring any of these rules out loading a snapshot into this process.
BOOT_PATH = frozenset({
    "ConfigureBootSource", "UpdateMachineConfiguration", "InsertBlockDevice",
    "InsertNetworkDevice", "InsertPmemDevice", "SetBalloonDevice", "SetVsockDevice",
    "SetMmdsConfiguration", "SetEntropyDevice", "SetMemoryHotplugDevice"})


class Vmm:
    def __init__(self, instance_id: str, logger: Logger, metrics: Metrics, loop: EventLoop,
                 exit_process: Callable[[int], None], mmds_size_limit: int,
                 metrics_period_s: float = METRICS_PERIOD_S) -> None:
        self.instance_id = instance_id
        self.logger = logger
        self.metrics = metrics
        self.loop = loop
        self.exit_process = exit_process
        self.metrics_period_s = metrics_period_s
        self.resources = VmResources(mmds_size_limit)
        self.state = NOT_STARTED
        self.boot_path = False
        self.reboots_on_ctrl_alt_del = False
        self.ctrl_alt_del_pending = False
        self.reboot_timer: Timer | None = None
        self.devices = RunningDevices(self.resources, metrics)
        # The userfaultfd page-fault handler's connection, after a Uffd snapshot load.
        self.uffd_handler: socket.socket | None = None
        self.handlers: dict[str, Callable[[Any], Any]] = {
            "ConfigureBootSource": self.resources.set_boot_source,
            "ConfigureLogger": self._configure_logger,
            "ConfigureMetrics": self._configure_metrics,
            "ConfigureSerial": self._configure_serial,
            "CreateSnapshot": self._create_snapshot,
            "FlushMetrics": lambda _: self._write_metrics(),
            "GetBalloonConfig": self._balloon_config,
            "GetBalloonStats": self.devices.balloon_stats,
            "GetFullVmConfig": self._full_config,
            "GetMMDS": lambda _: self.resources.mmds_get(),
            "GetMemoryHotplugStatus": self.devices.hotplug_status,
            "GetVmInstanceInfo": lambda _: self.instance_info(),
            "GetVmMachineConfig": lambda _: self.resources.machine_config_view(),
            "GetVmmVersion": lambda _: {"firecracker_version": VERSION},
            "InsertBlockDevice": self._insert_block_device,
            "InsertNetworkDevice": self.resources.set_network_interface,
            "InsertPmemDevice": self.resources.set_pmem,
            "LoadSnapshot": self._load_snapshot,
            "PatchMMDS": self.resources.mmds_patch,
            "Pause": lambda _: self._pause(),
            "PutCpuConfiguration": lambda _: self.resources.set_custom_cpu_template(),
            "PutMMDS": self.resources.mmds_put,
            "Resume": lambda _: self._resume(),
            "SendCtrlAltDel": lambda _: self._send_ctrl_alt_del(),
            "SetBalloonDevice": self.resources.set_balloon,
            "SetEntropyDevice": self.resources.set_entropy,
            "SetMemoryHotplugDevice": self.resources.set_memory_hotplug,
            "SetMmdsConfiguration": self.resources.set_mmds_config,
            "SetVsockDevice": self._set_vsock,
            "StartFreePageHinting": self.devices.start_hinting,
            "GetFreePageHintingStatus": self.devices.hinting_status,
            "StopFreePageHinting": self.devices.stop_hinting,
            "StartMicroVm": lambda _: self._start(),
            "UpdateBalloon": self.devices.update_balloon,
            "UpdateBalloonStatistics": self.devices.update_balloon_stats,
            "UpdateBlockDevice": self.devices.update_block_device,
            "UpdateMachineConfiguration": self.resources.update_machine_config,
            "UpdateMemoryHotplugSize": self.devices.update_hotplug,
            "UpdateNetworkInterface": self.devices.update_network_interface,
        }

    @property
    def started(self) -> bool:
        return self.state != NOT_STARTED

    def instance_info(self) -> dict[str, Any]:
        return {"id": self.instance_id, "state": self.state, "vmm_version": VERSION,
                "app_name": "Firecracker"}

    def handle(self, action: str, arg: Any = None) -> Any:
        """Run one VmmAction: its data (None for 204), or ActionError."""
        if not self.started and action in POST_BOOT_ONLY:
            raise ActionError(PRE_BOOT_ERROR)
        if self.started and action in PRE_BOOT_ONLY:
            raise ActionError(POST_BOOT_ERROR)
        if action in BOOT_PATH:
            self.boot_path = True
        return self.handlers[action](arg)

    # ---- logger, metrics, serial ----
    def _configure_logger(self, cfg: dict[str, Any]) -> None:
        try:
            self.logger.configure(cfg.get("log_path"), cfg.get("level"), cfg.get("show_level"),
                                  cfg.get("show_log_origin"), cfg.get("module"))
        except OSError as e:
            raise ActionError(f"Logger error: Failed to open target file: {io_error(e)}") from None

    def _configure_metrics(self, cfg: dict[str, Any]) -> None:
        prefix = "Metrics error: Cannot initialize the metrics system due to bad user input: "
        try:
            self.metrics.init(cfg["metrics_path"])
        except OSError as e:
            raise ActionError(prefix + io_error(e)) from None
        except MetricsAlreadyInitialized as e:
            raise ActionError(prefix + str(e)) from None

    def _configure_serial(self, cfg: dict[str, Any]) -> None:
        self.resources.serial_out_path = cfg.get("serial_out_path")

    def _write_metrics(self) -> None:
        self.metrics.write(self.logger.missed)
        self.logger.missed = 0

    def _periodic_metrics(self) -> None:
        self._write_metrics()
        self.loop.call_later(self.metrics_period_s, self._periodic_metrics)

    # ---- the guest's serial console ----
    def _console(self, lines: list[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        path = self.resources.serial_out_path
        try:
            if path is None:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            else:
                fd = open_nonblocking(path)
                try:
                    os.lseek(fd, 0, os.SEEK_END)
                    os.write(fd, data)
                finally:
                    os.close(fd)
        except OSError:
            self.metrics.inc("uart", "missed_write_count", len(data))
            return
        self.metrics.inc("uart", "write_count", len(data))
        self.metrics.inc("vcpu", "exit_io_out", len(data))

    # ---- start ----
    def _start(self) -> None:
        kernel = self.resources.kernel_fd
        if kernel is None:
            raise ActionError(
                "Start microvm error: Cannot start microvm without kernel configuration.")
        refusal = guest.kernel_load_error(kernel) or self.resources.cmdline_error()
        if refusal is not None:
            raise ActionError(refusal)
        self.reboots_on_ctrl_alt_del = guest.reboots_on_ctrl_alt_del(kernel)
        self.devices.balloon_active = guest.has_balloon_driver(kernel)
        self.devices.hotplug_requested_mib = 0
        self._run(RUNNING)
        cmdline = self.resources.kernel_cmdline()
        missing = guest.root_device_missing(
            cmdline, self.resources.has_block_root(),
            self.resources.boot_source.get("initrd_path") is not None) \
            if self.reboots_on_ctrl_alt_del else None
        if missing is None:
            self._console(guest.boot_lines(cmdline))
            return
        self._console([guest.boot_lines(cmdline)[0], *guest.panic_lines(missing)])
        delay = guest.panic_reboot_delay(cmdline)
        if delay is not None:
            self._console([f"[    0.600000] Rebooting in {max(1, int(delay))} seconds.."])
            self.reboot_timer = self.loop.call_later(delay, self._panic_reboot)

    def _panic_reboot(self) -> None:
        """The panicked kernel's emergency restart: no orderly reboot line."""
        self.metrics.inc("i8042", "reset_count")
        self.logger.info("Vmm is stopping.", "main")
        self.logger.info("Firecracker exiting successfully. exit_code=0", "main")
        self.exit_process(0)

    def _run(self, state: str) -> None:
        """The microVM exists from here on: runtime API, per-device and periodic metrics."""
        self.state = state
        for drive in self.resources.drives:
            self.metrics.device("block", drive["drive_id"])
        for net in self.resources.nets:
            self.metrics.device("net", net["iface_id"])
        self._periodic_metrics()

    # ---- pause / resume ----
    def _pause(self) -> None:
        start = time.monotonic_ns()
        self.state = PAUSED
        self._vmm_latency("pause_vm", start, "pause vm")

    def _resume(self) -> None:
        start = time.monotonic_ns()
        self.logger.info("Artificially kick devices", "main")
        self.state = RUNNING
        self._vmm_latency("resume_vm", start, "resume vm")
        if self.ctrl_alt_del_pending:
            self.ctrl_alt_del_pending = False
            self._schedule_reboot()

    def _vmm_latency(self, metric: str, start_ns: int, action: str) -> None:
        took = max(1, (time.monotonic_ns() - start_ns) // 1000)
        self.metrics.set("latencies_us", f"vmm_{metric}", took)
        self.logger.info(f"'{action}' VMM action took {took} us.", "main")

    # ---- Ctrl+Alt+Del ----
    def _send_ctrl_alt_del(self) -> None:
        if not self.reboots_on_ctrl_alt_del:
            return
        if self.state == PAUSED:
            # The keystroke waits in the controller until the vCPUs run again.
            self.ctrl_alt_del_pending = True
        else:
            self._schedule_reboot()

    def _schedule_reboot(self) -> None:
        if self.reboot_timer is None:
            self.reboot_timer = self.loop.call_later(REBOOT_DELAY_S, self._guest_reboot)

    def _guest_reboot(self) -> None:
        if self.state == PAUSED:
            self.reboot_timer = None
            self.ctrl_alt_del_pending = True
            return
        self._console([guest.REBOOT_LINE])
        self.metrics.inc("i8042", "reset_count")
        self.logger.info("Vmm is stopping.", "main")
        self.logger.info("Firecracker exiting successfully. exit_code=0", "main")
        self.exit_process(0)

    # ---- devices before boot ----
    def _insert_block_device(self, cfg: dict[str, Any]) -> None:
        if cfg.get("socket") is not None and cfg.get("path_on_host") is None:
            self.logger.warn("[DevPreview] vhost-user-blk device is in development preview.",
                             "main")
        self.resources.set_block_device(cfg)
        if cfg.get("io_engine") == "Async":
            self.logger.warn("[DevPreview] Async file IO is in development preview.", "main")

    # ---- vsock ----
    def _set_vsock(self, cfg: dict[str, Any]) -> None:
        old = self.resources.vsock_listener
        if old is not None:
            self.loop.unwatch(old)
        self.resources.set_vsock(cfg)
        listener = self.resources.vsock_listener
        if listener is not None:
            listener.setblocking(False)
            self.loop.watch(listener, selectors.EVENT_READ, lambda _mask: _refuse(listener))

    def _balloon_config(self, _: Any) -> dict[str, Any]:
        if not self.started:
            return self.resources.balloon_config()
        return dict(self.devices.balloon("Internal VMM error: "))

    def _full_config(self, _: Any) -> dict[str, Any]:
        if not self.started:
            self.logger.warn("If the VM was restored from snapshot, boot-source, "
                             "machine-config.smt, and machine-config.cpu_template will all be "
                             "empty.", "main")
        return self.resources.full_config()

    # ---- snapshots ----
    def _create_snapshot(self, params: dict[str, Any]) -> None:
        prefix = "Create snapshot error: "
        kind = params["snapshot_type"]
        if kind == "Diff":
            self.logger.warn("[DevPreview] Virtual machine diff snapshots is in development "
                             "preview.", "main")
        if self.state != PAUSED:
            raise ActionError(prefix + "Cannot save the microVM state: Operation not allowed: "
                              "save/restore unavailable while running")
        start = time.monotonic_ns()
        try:
            snapshot.write_state(params["snapshot_path"], self._snapshot_state())
        except OSError as e:
            raise ActionError(prefix + "Cannot perform open on the snapshot backing file: " +
                              io_error(e)) from None
        try:
            snapshot.write_memory(params["mem_file_path"],
                                  self.resources.machine_config["mem_size_mib"])
        except OSError as e:
            raise ActionError(prefix + "Cannot perform open on the memory backing file: " +
                              io_error(e)) from None
        metric = "full_create_snapshot" if kind == "Full" else "diff_create_snapshot"
        took = max(1, (time.monotonic_ns() - start) // 1000)
        self.metrics.set("latencies_us", f"vmm_{metric}", took)
        self.logger.info(f"'create {kind.lower()} snapshot' VMM action took {took} us.", "main")

    def _snapshot_state(self) -> dict[str, Any]:
        r = self.resources
        mc = r.machine_config
        return {
            "vm_info": {"mem_size_mib": mc["mem_size_mib"], "smt": mc["smt"],
                        "cpu_template": mc["cpu_template"] or "None",
                        "boot_source": r.boot_source, "huge_pages": mc["huge_pages"]},
            "vcpu_count": mc["vcpu_count"],
            "drives": r.drives, "nets": r.nets, "mmds_ifaces": sorted(r.mmds_ifaces),
            "mmds": {"version": r.mmds_version, "ipv4_address": r.mmds_ipv4,
                     "imds_compat": r.mmds_imds_compat} if r.mmds_exists else None,
            "vsock": r.vsock, "balloon": r.balloon, "entropy": r.entropy, "pmem": r.pmem,
            "memory_hotplug": r.memory_hotplug,
            "hotplug_requested_mib": self.devices.hotplug_requested_mib,
            "guest": {"reboots_on_ctrl_alt_del": self.reboots_on_ctrl_alt_del,
                      "balloon_active": self.devices.balloon_active},
        }

    def _load_snapshot(self, params: dict[str, Any]) -> None:
        """A failed restore raises FatalActionError: the process exits after answering."""
        prefix = "Load snapshot error: "
        if self.boot_path:
            message = "Loading a microVM snapshot not allowed after configuring boot-specific " \
                      "resources."
            self.logger.info(message, "main")
            raise ActionError(prefix + message)
        start = time.monotonic_ns()
        try:
            self._restore(params)
        except ActionError as err:
            raise FatalActionError(prefix + "Failed to restore from snapshot: " +
                                   err.message) from None
        took = max(1, (time.monotonic_ns() - start) // 1000)
        self.metrics.set("latencies_us", "vmm_load_snapshot", took)

    def _restore(self, params: dict[str, Any]) -> None:
        from_file = "Failed to get snapshot state from file: "
        try:
            state = snapshot.read_state(params["snapshot_path"])
        except OSError as e:
            raise ActionError(from_file + "Failed to open snapshot file: " + io_error(e)) from None
        except snapshot.SnapshotFormatError as e:
            raise ActionError(from_file + "Failed to load snapshot state from file: " +
                              str(e)) from None
        nets = state["nets"]
        for override in params["network_overrides"]:
            net = next((n for n in nets if n["iface_id"] == override["iface_id"]), None)
            if net is None:
                raise ActionError(from_file + "Unknown Network Device.")
            net["host_dev_name"] = override["host_dev_name"]
        info = state["vm_info"]
        r = self.resources
        r.update_machine_config({
            "vcpu_count": state["vcpu_count"], "mem_size_mib": info["mem_size_mib"],
            "smt": info["smt"], "cpu_template": info["cpu_template"],
            "track_dirty_pages": params["track_dirty_pages"], "huge_pages": info["huge_pages"]})
        self._attach_memory(params["mem_backend"], info["huge_pages"])
        r.boot_source = info["boot_source"]
        r.drives, r.nets = state["drives"], nets
        r.mmds_ifaces = set(state["mmds_ifaces"])
        if state["mmds"] is not None:
            r.mmds_exists = True
            r.mmds_version = state["mmds"]["version"]
            r.mmds_ipv4 = state["mmds"]["ipv4_address"]
            r.mmds_imds_compat = state["mmds"]["imds_compat"]
        r.balloon, r.entropy, r.pmem = state["balloon"], state["entropy"], state["pmem"]
        r.memory_hotplug = state["memory_hotplug"]
        if state["vsock"] is not None:
            try:
                self._set_vsock(state["vsock"])
            except ActionError:
                r.vsock = state["vsock"]  # the host socket path is taken; keep the config
        self.devices.hotplug_requested_mib = state["hotplug_requested_mib"]
        self.reboots_on_ctrl_alt_del = state["guest"]["reboots_on_ctrl_alt_del"]
        self.devices.balloon_active = state["guest"].get("balloon_active", True)
        self._run(RUNNING if params["resume_vm"] else PAUSED)

    def _attach_memory(self, backend: dict[str, Any], huge_pages: str) -> None:
        prefix = "Failed to load guest memory: "
        path = backend["backend_path"]
        if backend["backend_type"] == "File":
            prefix += "Error creating guest memory from file: "
            if huge_pages == "2M":
                raise ActionError(prefix + "Cannot restore hugetlbfs backed snapshot by mapping "
                                  "the memory file. Please use uffd.")
            try:
                os.close(os.open(path, os.O_RDONLY))
            except OSError as e:
                raise ActionError(prefix + "Failed to load guest memory: " +
                                  io_error(e)) from None
            return
        handler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            handler.connect(path)
            size = self.resources.machine_config["mem_size_mib"] * 1024 * 1024
            page = 2 * 1024 * 1024 if huge_pages == "2M" else 4096
            handler.sendall(json.dumps([{
                "base_host_virt_addr": 0x7F0000000000, "size": size, "offset": 0,
                "page_size": page, "page_size_kib": page}]).encode())
        except OSError as e:
            handler.close()
            raise ActionError(prefix + "Error creating guest memory from uffd: Failed to connect "
                              f"to UDS Unix stream: {io_error(e)}") from None
        self.uffd_handler = handler  # the page-fault handler keeps its end open

    def close(self) -> None:
        self.resources.close()


class FatalActionError(ActionError):
    """An error after which Firecracker answers and then exits with status 1."""


def _refuse(listener: socket.socket) -> None:
    """A host-side vsock connection: no guest listens, so it is closed at once."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    conn.close()
