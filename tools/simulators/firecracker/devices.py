"""The devices of a running microVM: what PATCH and GET do to them after InstanceStart.

A guest whose kernel image carries the virtio balloon driver (guest.has_balloon_driver)
activates the balloon at boot and reaches each target at once; without the driver the
balloon never activates, and resizing or hinting is refused as Firecracker refuses it.
Hot-plugged memory is plugged as soon as it is requested. Errors
carry Firecracker's texts, including its "Failed perform action on device".
"""

from __future__ import annotations

from typing import Any

from tools.simulators.firecracker.errno import io_error
from tools.simulators.firecracker.metrics import Metrics
from tools.simulators.firecracker.resources import ActionError, VmResources, disk_size, rate_limiter

DEVICE_NOT_FOUND = "Failed perform action on device: Device not found"


class RunningDevices:
    def __init__(self, resources: VmResources, metrics: Metrics) -> None:
        self.resources = resources
        self.metrics = metrics
        self.balloon_hint_cmd = 0
        self.hotplug_requested_mib = 0
        # Whether the guest's driver activated the balloon device.
        self.balloon_active = True

    def update_block_device(self, cfg: dict[str, Any]) -> None:
        prefix = "Drive config error: Unable to patch the block device: "
        suffix = " Please verify the request arguments."
        drive = next((d for d in self.resources.drives if d["drive_id"] == cfg["drive_id"]),
                     None)
        if drive is None:
            raise ActionError(prefix + DEVICE_NOT_FOUND + suffix)
        path, limiter = cfg.get("path_on_host"), cfg.get("rate_limiter")
        if path is None and limiter is None and drive["socket"] is None:
            raise ActionError(prefix + "Block: Running method expected different backend." +
                              suffix)
        if path is not None:
            try:
                disk_size(path, drive["is_read_only"])
            except OSError as e:
                raise ActionError(prefix + "Block: Virtio backend error: Error manipulating the "
                                  f"backing file: {io_error(e)} {path}" + suffix) from None
            drive["path_on_host"] = path
            self.metrics.inc_device("block", drive["drive_id"], "update_count")
        if limiter is not None:
            drive["rate_limiter"] = _update_limiter(drive["rate_limiter"], limiter)

    def update_network_interface(self, cfg: dict[str, Any]) -> None:
        net = next((n for n in self.resources.nets if n["iface_id"] == cfg["iface_id"]), None)
        if net is None:
            raise ActionError("Network config error: Unable to update the net device: " +
                              DEVICE_NOT_FOUND)
        for name in ("rx_rate_limiter", "tx_rate_limiter"):
            if cfg.get(name) is not None:
                net[name] = _update_limiter(net[name], cfg[name])

    def balloon(self, prefix: str) -> dict[str, Any]:
        if self.resources.balloon is None:
            raise ActionError(prefix + DEVICE_NOT_FOUND)
        return self.resources.balloon

    def balloon_stats(self, _: Any) -> dict[str, Any]:
        balloon = self.balloon("Internal VMM error: ")
        if balloon["stats_polling_interval_s"] == 0:
            raise ActionError(
                "Internal VMM error: Balloon: Received stats query when stats are disabled.")
        target = balloon["amount_mib"]
        actual = target if self.balloon_active else 0
        return {"target_pages": target * 256, "actual_pages": actual * 256,
                "target_mib": target, "actual_mib": actual}

    def _require_active_balloon(self) -> None:
        if not self.balloon_active:
            raise ActionError("Balloon update error: Balloon: Device not activated yet.")

    def update_balloon(self, cfg: dict[str, Any]) -> None:
        balloon = self.balloon("Balloon update error: ")
        self._require_active_balloon()
        if cfg["amount_mib"] > self.resources.machine_config["mem_size_mib"]:
            raise ActionError("Balloon update error: Balloon: Requested memory should be less "
                              f"than {cfg['amount_mib']}MiB")
        balloon["amount_mib"] = cfg["amount_mib"]

    def update_balloon_stats(self, cfg: dict[str, Any]) -> None:
        balloon = self.balloon("Balloon update error: ")
        old, new = balloon["stats_polling_interval_s"], cfg["stats_polling_interval_s"]
        if old != new and (old == 0 or new == 0):
            raise ActionError("Balloon update error: Balloon: Statistics cannot be "
                              "enabled/disabled after activation.")
        balloon["stats_polling_interval_s"] = new

    def _hinting_balloon(self) -> dict[str, Any]:
        balloon = self.balloon("Balloon update error: ")
        if not balloon["free_page_hinting"]:
            raise ActionError(
                "Balloon update error: Balloon: Attempting to use hinting when not enabled")
        return balloon

    def start_hinting(self, _cfg: Any) -> None:
        self._hinting_balloon()
        self._require_active_balloon()
        # Firecracker numbers hinting runs from 2; 0 is STOP and 1 is DONE.
        self.balloon_hint_cmd = max(2, self.balloon_hint_cmd + 1)

    def hinting_status(self, _: Any) -> dict[str, Any]:
        self._hinting_balloon()
        return {"host_cmd": self.balloon_hint_cmd, "guest_cmd": None}

    def stop_hinting(self, _: Any) -> None:
        self._hinting_balloon()
        self._require_active_balloon()
        self.balloon_hint_cmd = 0

    def hotplug_status(self, _: Any) -> dict[str, Any]:
        cfg = self.resources.memory_hotplug
        if cfg is None:
            raise ActionError("Internal VMM error: " + DEVICE_NOT_FOUND)
        return {"block_size_mib": cfg["block_size_mib"], "total_size_mib": cfg["total_size_mib"],
                "slot_size_mib": cfg["slot_size_mib"],
                "plugged_size_mib": self.hotplug_requested_mib,
                "requested_size_mib": self.hotplug_requested_mib}

    def update_hotplug(self, cfg: dict[str, Any]) -> None:
        hotplug = self.resources.memory_hotplug
        if hotplug is None:
            raise ActionError("Memory hotplug update error: " + DEVICE_NOT_FOUND)
        size = cfg["requested_size_mib"]
        if size % hotplug["block_size_mib"] or size > hotplug["total_size_mib"]:
            raise ActionError(
                "Memory hotplug update error: Failed to create memory hotplug device: Size "
                f"{size * 1024 * 1024} is invalid: it must be a multiple of block size and less "
                "than the total size")
        self.hotplug_requested_mib = size


def _update_limiter(current: dict[str, Any] | None,
                    update: dict[str, Any]) -> dict[str, Any] | None:
    """A PATCHed rate limiter: given buckets replace (a zero size disables), absent ones stay."""
    merged = dict(current or {"bandwidth": None, "ops": None})
    for name in ("bandwidth", "ops"):
        if update.get(name) is not None:
            merged[name] = (rate_limiter({name: update[name]}) or {}).get(name)
    return merged if any(merged.values()) else None
