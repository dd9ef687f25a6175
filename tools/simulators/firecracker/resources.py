"""The microVM configuration a Firecracker process accumulates before boot (VmResources).

Each setter validates like v1.14.2 and raises ActionError with the full
`fault_message` text ("Drive config error: ..."). Files are opened when they
are configured, as Firecracker opens them: a missing kernel fails
PUT /boot-source, a missing backing file fails PUT /drives. TAP devices are
taken as given (Firecracker running as root creates a missing TAP); only names
the kernel would refuse, and a TAP already used by another interface of this
VM, are errors. The vsock host socket is really bound at `uds_path`.
"""

from __future__ import annotations

import copy
import os
import socket
from typing import Any

from tools.simulators.firecracker.errno import io_error
from tools.simulators.firecracker.rust_fmt import dumps

MAX_VCPUS = 32
DEFAULT_MEM_MIB = 128
IFNAMSIZ = 16
# The kernel command line's capacity in bytes, its terminating NUL included.
CMDLINE_CAPACITY = 2048
MMIO_BASE = 0xC0001000
CMDLINE_TOO_LONG = "Inserting string would make command line too long."
# Drive fields a vhost-user drive (one with a `socket`) must leave out.
VIRTIO_BLOCK_ONLY = ("is_read_only", "io_engine", "rate_limiter")
DEFAULT_MMDS_IPV4 = "169.254.169.254"
DEFAULT_KERNEL_CMDLINE = ("reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux "
                          "i8042.dumbkbd swiotlb=noforce")


class ActionError(Exception):
    """A VmmActionError: its text is the fault_message; 413 only for MMDS size limits."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def disk_size(path: str, read_only: bool) -> int:
    """Open a drive's backing file as Firecracker does and measure it; OSError on failure."""
    fd = os.open(path, os.O_RDONLY if read_only else os.O_RDWR)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def rate_limiter(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """The rate limiter as Firecracker reports it back: empty buckets vanish."""
    if cfg is None:
        return None
    buckets = {name: _bucket(cfg.get(name)) for name in ("bandwidth", "ops")}
    return buckets if any(buckets.values()) else None


def _bucket(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    if not cfg or cfg["size"] == 0 or cfg["refill_time"] == 0:
        return None
    return {"size": cfg["size"], "one_time_burst": cfg.get("one_time_burst") or None,
            "refill_time": cfg["refill_time"]}


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396, which Firecracker applies to PATCH /mmds."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = json_merge_patch(result.get(key), value)
    return dict(sorted(result.items()))


class VmResources:
    def __init__(self, mmds_size_limit: int) -> None:
        self.machine_config: dict[str, Any] = {
            "vcpu_count": 1, "mem_size_mib": DEFAULT_MEM_MIB, "smt": False,
            "cpu_template": None, "track_dirty_pages": False, "huge_pages": "None"}
        self.custom_cpu_template = False
        self.boot_source: dict[str, Any] = {
            "kernel_image_path": "", "initrd_path": None, "boot_args": None}
        # Firecracker keeps the kernel open from PUT /boot-source on (a descriptor: opening
        # a directory succeeds, reading it fails at InstanceStart).
        self.kernel_fd: int | None = None
        self.drives: list[dict[str, Any]] = []
        self.nets: list[dict[str, Any]] = []
        self.mmds_ifaces: set[str] = set()
        self.vsock: dict[str, Any] | None = None
        self.vsock_listener: socket.socket | None = None
        self.balloon: dict[str, Any] | None = None
        self.entropy: dict[str, Any] | None = None
        self.pmem: list[dict[str, Any]] = []
        self.memory_hotplug: dict[str, Any] | None = None
        self.serial_out_path: str | None = None
        # MMDS: the data store exists once anything touched MMDS.
        self.mmds_size_limit = mmds_size_limit
        self.mmds_exists = False
        self.mmds_initialized = False
        self.mmds_data: Any = None
        self.mmds_version = "V1"
        self.mmds_imds_compat = False
        self.mmds_ipv4 = DEFAULT_MMDS_IPV4

    # ---- machine ----
    def machine_config_view(self) -> dict[str, Any]:
        mc = self.machine_config
        view = {"vcpu_count": mc["vcpu_count"], "mem_size_mib": mc["mem_size_mib"],
                "smt": mc["smt"]}
        if mc["cpu_template"] is not None:
            view["cpu_template"] = mc["cpu_template"]
        view["track_dirty_pages"] = mc["track_dirty_pages"]
        view["huge_pages"] = mc["huge_pages"]
        return view

    def update_machine_config(self, update: dict[str, Any]) -> None:
        cur = self.machine_config

        def pick(name: str) -> Any:
            value = update.get(name)
            return cur[name] if value is None else value

        vcpus, smt = pick("vcpu_count"), pick("smt")
        if vcpus == 0 or vcpus > MAX_VCPUS or (smt and vcpus > 1 and vcpus % 2 == 1):
            raise ActionError(
                "Machine config error: The number of vCPUs must be greater than 0, less than "
                f"{MAX_VCPUS} and must be 1 or an even number if SMT is enabled.")
        mem, pages = pick("mem_size_mib"), pick("huge_pages")
        if mem == 0 or (pages == "2M" and mem % 2):
            raise ActionError("Machine config error: The memory size (MiB) is either 0, or not "
                              "a multiple of the configured page size.")
        template = update.get("cpu_template")
        cpu_template = cur["cpu_template"] if template is None else (
            None if template == "None" else template)
        if self.balloon is not None and mem < self.balloon["amount_mib"]:
            raise ActionError("Machine config error: The memory size (MiB) is smaller than the "
                              "previously set balloon device target size.")
        self.machine_config = {
            "vcpu_count": vcpus, "mem_size_mib": mem, "smt": smt, "cpu_template": cpu_template,
            "track_dirty_pages": pick("track_dirty_pages"), "huge_pages": pages}

    def set_custom_cpu_template(self) -> None:
        self.custom_cpu_template = True
        self.machine_config["cpu_template"] = None

    # ---- boot source ----
    def set_boot_source(self, cfg: dict[str, Any]) -> None:
        try:
            kernel = os.open(cfg["kernel_image_path"], os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise ActionError(
                f"Boot source error: The kernel file cannot be opened: {io_error(e)}") from None
        if cfg.get("initrd_path") is not None:
            try:
                os.close(os.open(cfg["initrd_path"], os.O_RDONLY))
            except OSError as e:
                os.close(kernel)
                raise ActionError(
                    "Boot source error: The initrd file cannot be opened due to invalid path "
                    f"or invalid permissions. {io_error(e)}") from None
        if len((cfg.get("boot_args") or "").encode()) >= CMDLINE_CAPACITY:
            os.close(kernel)
            raise ActionError("Boot source error: The kernel command line is invalid: Invalid "
                              "cmdline capacity provided.")
        if self.kernel_fd is not None:
            os.close(self.kernel_fd)
        self.kernel_fd = kernel
        self.boot_source = {"kernel_image_path": cfg["kernel_image_path"],
                            "initrd_path": cfg.get("initrd_path"),
                            "boot_args": cfg.get("boot_args")}

    def kernel_cmdline(self) -> str:
        """The command line the guest sees: boot_args plus Firecracker's root= for a root drive."""
        args = self.boot_source["boot_args"]
        cmdline = DEFAULT_KERNEL_CMDLINE if args is None else args
        root = self.drives[0] if self.drives and self.drives[0]["is_root_device"] else None
        if root is not None:
            device = (f"PARTUUID={root['partuuid']}" if root["partuuid"] else "/dev/vda")
            cmdline += f" root={device} {'ro' if root['is_read_only'] else 'rw'}"
        return cmdline

    def cmdline_error(self) -> str | None:
        """InstanceStart's error when the command line Firecracker builds outgrows its
        CMDLINE_CAPACITY bytes (a NUL included): to the guest's command line
        (kernel_cmdline) it adds " pci=off", then one virtio_mmio.device entry per virtio
        device as it attaches them."""
        length = len(self.kernel_cmdline().encode()) + len(" pci=off")
        if length >= CMDLINE_CAPACITY:
            return f"Start microvm error: Invalid kernel command line: {CMDLINE_TOO_LONG}"
        devices = len(self.drives) + len(self.nets) + len(self.pmem) + sum(
            1 for device in (self.vsock, self.balloon, self.entropy, self.memory_hotplug)
            if device is not None)
        for i in range(devices):
            length += len(f" virtio_mmio.device=4K@0x{MMIO_BASE + i * 0x1000:x}:{5 + i}")
            if length >= CMDLINE_CAPACITY:
                # "resourc" is Firecracker's own spelling.
                return ("Start microvm error: Could not attach device: MMIO transport error: "
                        f"Failed to allocate requested resourc: {CMDLINE_TOO_LONG}")
        return None

    # ---- block devices ----
    def has_block_root(self) -> bool:
        return bool(self.drives) and self.drives[0]["is_root_device"]

    def set_block_device(self, cfg: dict[str, Any]) -> None:
        prefix = "Drive config error: "
        position = next((i for i, d in enumerate(self.drives)
                         if d["drive_id"] == cfg["drive_id"]), None)
        root = cfg["is_root_device"]
        if root and any(p["root_device"] for p in self.pmem):
            raise ActionError(prefix + "Attempt to add block as a root device while the root "
                              "device defined as a pmem device")
        if root and self.has_block_root() and position != 0:
            raise ActionError(prefix + "A root block device already exists!")
        drive = self._create_block(cfg, prefix + "Unable to create the virtio block device: ")
        if position is None:
            if root:
                self.drives.insert(0, drive)
            else:
                self.drives.append(drive)
        else:
            self.drives[position] = drive
            if position != 0 and root:
                self.drives[0], self.drives[position] = self.drives[position], self.drives[0]

    @staticmethod
    def _create_block(cfg: dict[str, Any], prefix: str) -> dict[str, Any]:
        path, sock = cfg.get("path_on_host"), cfg.get("socket")
        read_only = bool(cfg.get("is_read_only"))
        if path is not None and sock is None:
            try:
                disk_size(path, read_only)
            except OSError as e:
                raise ActionError(prefix + "Virtio backend error: Error manipulating the "
                                  f"backing file: {io_error(e)} {path}") from None
        elif path is None and sock is not None and all(
                cfg.get(name) is None for name in VIRTIO_BLOCK_ONLY):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(sock)
            except OSError as e:
                raise ActionError(prefix + "Vhost user backend error: Vhost-user error: Failed "
                                  f"to connect to UDS Unix stream: {io_error(e)}") from None
            finally:
                probe.close()
        else:
            raise ActionError(prefix + "Invalid block config.")
        return {"drive_id": cfg["drive_id"], "partuuid": cfg.get("partuuid"),
                "is_root_device": cfg["is_root_device"], "cache_type": cfg["cache_type"],
                "is_read_only": read_only, "path_on_host": path,
                "rate_limiter": rate_limiter(cfg.get("rate_limiter")),
                "io_engine": cfg.get("io_engine") or "Sync", "socket": sock}

    # ---- network ----
    def set_network_interface(self, cfg: dict[str, Any]) -> None:
        prefix = "Network config error: "
        iface_id, mac = cfg["iface_id"], cfg.get("guest_mac")
        if mac is not None and any(n["guest_mac"] == mac and n["iface_id"] != iface_id
                                   for n in self.nets):
            raise ActionError(prefix + f"The MAC address is already in use: {mac}")
        index = next((i for i, n in enumerate(self.nets) if n["iface_id"] == iface_id), None)
        if index is not None:
            # Firecracker drops the old device first (Vec::swap_remove), even if the new fails.
            self.nets[index] = self.nets[-1]
            self.nets.pop()
            self.mmds_ifaces.discard(iface_id)
        tap = cfg["host_dev_name"]
        if len(tap.encode()) >= IFNAMSIZ:
            raise ActionError(prefix + "Could not create the network device: Open tap device "
                              "failed: Invalid interface name")
        if not tap:
            used = {n["host_dev_name"] for n in self.nets}
            tap = next(f"tap{i}" for i in range(len(used) + 1) if f"tap{i}" not in used)
        if any(n["host_dev_name"] == tap for n in self.nets):
            raise ActionError(
                prefix + "Could not create the network device: Open tap device failed: Error "
                "while creating ifreq structure: Resource busy (os error 16). Invalid TUN/TAP "
                f"Backend provided by {tap}. Check our documentation on setting up the network "
                "devices.")
        self.nets.append({"iface_id": iface_id, "host_dev_name": tap, "guest_mac": mac,
                          "rx_rate_limiter": rate_limiter(cfg.get("rx_rate_limiter")),
                          "tx_rate_limiter": rate_limiter(cfg.get("tx_rate_limiter"))})

    # ---- vsock ----
    def set_vsock(self, cfg: dict[str, Any]) -> None:
        prefix = ("Vsock config error: Cannot create backend for vsock device: Error binding to "
                  "the host-side Unix socket: ")
        if self.vsock is not None:
            if self.vsock_listener is not None:
                self.vsock_listener.close()
                self.vsock_listener = None
            old, self.vsock = self.vsock, None
            try:
                os.remove(old["uds_path"])
            except OSError as e:
                raise ActionError(prefix + io_error(e)) from None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(cfg["uds_path"])
            listener.listen(16)
        except OSError as e:
            listener.close()
            raise ActionError(prefix + io_error(e)) from None
        self.vsock_listener = listener
        self.vsock = {"guest_cid": cfg["guest_cid"], "uds_path": cfg["uds_path"]}

    # ---- balloon, entropy, pmem, memory hotplug ----
    def set_balloon(self, cfg: dict[str, Any]) -> None:
        if cfg["amount_mib"] > self.machine_config["mem_size_mib"]:
            raise ActionError("Balloon config error: Amount of pages requested is too large.")
        self.balloon = dict(cfg)

    def balloon_config(self) -> dict[str, Any]:
        if self.balloon is None:
            raise ActionError("Balloon config error: No balloon device found.")
        return dict(self.balloon)

    def set_entropy(self, cfg: dict[str, Any]) -> None:
        self.entropy = {"rate_limiter": rate_limiter(cfg.get("rate_limiter"))}

    def set_pmem(self, cfg: dict[str, Any]) -> None:
        prefix = "Pmem device error: "
        if cfg["root_device"] and self.has_block_root():
            raise ActionError(prefix + "Attempt to add pmem as a root device while the root "
                              "device defined as a block device")
        index = next((i for i, p in enumerate(self.pmem) if p["id"] == cfg["id"]), None)
        has_root = any(p["root_device"] for p in self.pmem)
        if cfg["root_device"] and has_root and (index is None
                                               or not self.pmem[index]["root_device"]):
            raise ActionError(prefix + "A root pmem device already exist")
        try:
            fd = os.open(cfg["path_on_host"], os.O_RDONLY if cfg["read_only"] else os.O_RDWR)
            size = os.fstat(fd).st_size
            os.close(fd)
        except OSError as e:
            raise ActionError(prefix + "Unable to create the virtio-pmem device: Error "
                              f"accessing backing file: {io_error(e)}") from None
        if size == 0:
            raise ActionError(prefix + "Unable to create the virtio-pmem device: Error backing "
                              "file size is 0")
        device = {k: cfg[k] for k in ("id", "path_on_host", "root_device", "read_only")}
        if index is None:
            self.pmem.append(device)
        else:
            self.pmem[index] = device

    def set_memory_hotplug(self, cfg: dict[str, Any]) -> None:
        prefix = "Memory hotplug config error: "
        block, slot, total = cfg["block_size_mib"], cfg["slot_size_mib"], cfg["total_size_mib"]
        if block < 2:
            raise ActionError(prefix + "Block size must not be lower than 2 MiB")
        if block & (block - 1):
            raise ActionError(prefix + "Block size must be a power of 2")
        if slot < 128:
            raise ActionError(prefix + "Slot size must not be lower than 128 MiB")
        if slot % block:
            raise ActionError(prefix + f"Slot size must be a multiple of block size ({block} MiB)")
        if total < slot:
            raise ActionError(prefix + f"Total size must not be lower than slot size ({slot} MiB)")
        if total % slot:
            raise ActionError(prefix + f"Total size must be a multiple of slot size ({slot} MiB)")
        self.memory_hotplug = {"total_size_mib": total, "block_size_mib": block,
                               "slot_size_mib": slot}

    # ---- MMDS ----
    def set_mmds_config(self, cfg: dict[str, Any]) -> None:
        prefix = "MMMDS config error: "
        ipv4 = cfg.get("ipv4_address")
        if ipv4 is not None:
            octets = [int(p) for p in ipv4.split(".")]
            if not (octets[:2] == [169, 254] and octets[2] not in (0, 255)):
                raise ActionError(prefix + "The MMDS IPv4 address is not link local.")
        ifaces = cfg["network_interfaces"]
        if not ifaces:
            raise ActionError(
                prefix + "The list of network interface IDs that allow forwarding MMDS requests "
                "is empty.")
        known = {n["iface_id"] for n in self.nets}
        if not set(ifaces) <= known:
            raise ActionError(
                prefix + "The list of network interface IDs provided contains at least one ID "
                "that does not correspond to any existing network interface.")
        self.mmds_exists = True
        self.mmds_ifaces = set(ifaces)
        self.mmds_ipv4 = ipv4 or DEFAULT_MMDS_IPV4
        self.mmds_version = cfg["version"]
        self.mmds_imds_compat = cfg["imds_compat"]

    def mmds_get(self) -> Any:
        self.mmds_exists = True
        return {} if self.mmds_data is None else self.mmds_data

    def mmds_put(self, data: Any) -> None:
        self.mmds_exists = True
        self._check_mmds_size(data)
        self.mmds_data = data
        self.mmds_initialized = True

    def mmds_patch(self, patch: Any) -> None:
        self.mmds_exists = True
        if not self.mmds_initialized:
            raise ActionError("MMDS error: The MMDS data store is not initialized.")
        patched = json_merge_patch(self.mmds_data, patch)
        self._check_mmds_size(patched)
        self.mmds_data = patched

    def _check_mmds_size(self, data: Any) -> None:
        if len(dumps(data).encode()) > self.mmds_size_limit:
            raise ActionError(
                "MMDS limit exceeded error: The MMDS patch request doesn't fit.", status=413)

    def mmds_config_view(self) -> dict[str, Any] | None:
        ifaces = [n["iface_id"] for n in self.nets if n["iface_id"] in self.mmds_ifaces]
        if not self.mmds_exists or not ifaces:
            return None
        return {"version": self.mmds_version, "network_interfaces": ifaces,
                "ipv4_address": self.mmds_ipv4, "imds_compat": self.mmds_imds_compat}

    # ---- GET /vm/config ----
    def full_config(self) -> dict[str, Any]:
        """FullVmConfiguration in Firecracker's key order; logger and metrics are always null."""
        return {
            "balloon": None if self.balloon is None else dict(self.balloon),
            "drives": copy.deepcopy(self.drives),
            "boot-source": dict(self.boot_source),
            "cpu-config": None,
            "logger": None,
            "machine-config": self.machine_config_view(),
            "metrics": None,
            "mmds-config": self.mmds_config_view(),
            "network-interfaces": copy.deepcopy(self.nets),
            "vsock": None if self.vsock is None else dict(self.vsock),
            "entropy": None if self.entropy is None else dict(self.entropy),
            "pmem": copy.deepcopy(self.pmem),
            "memory-hotplug": (None if self.memory_hotplug is None
                               else dict(self.memory_hotplug)),
        }

    def close(self) -> None:
        if self.kernel_fd is not None:
            os.close(self.kernel_fd)
        if self.vsock_listener is not None:
            self.vsock_listener.close()
