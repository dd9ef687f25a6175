"""The Cloud Hypervisor API simulator, spoken to over its Unix socket like the real binary.

Each test starts `cloud-hypervisor-sim` as its own process and checks the
answers Cloud Hypervisor v53.0 gives: routes, methods, status codes, error
chains, the VM state machine, hotplug and the simulated guest's console.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

SIM_MISSING = "the cloud-hypervisor-sim console script is not installed (pip install -e .)"
# Generous bound for things that take milliseconds; never asserted on.
PATIENCE = 10.0


def simulator() -> str:
    found = shutil.which("cloud-hypervisor-sim") or str(
        Path(sys.executable).with_name("cloud-hypervisor-sim"))
    if not Path(found).exists():
        pytest.skip(SIM_MISSING)
    return found


class Sim:
    """One simulator process and an HTTP client on its API socket."""

    def __init__(self, workdir: Path, *extra_args: str, env: dict[str, str] | None = None,
                 bare_socket: bool = False) -> None:
        self.workdir = workdir
        self.socket = workdir / "api.sock"
        self.stdout = workdir / "stdout.log"
        socket_arg = str(self.socket) if bare_socket else f"path={self.socket}"
        argv = [simulator(), "--api-socket", socket_arg, *extra_args]
        with open(self.stdout, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})
        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(self.socket)),
                                        base_url="http://localhost", timeout=PATIENCE)

    async def started(self) -> Sim:
        deadline = time.monotonic() + PATIENCE
        while not self.socket.exists():
            assert self.proc.poll() is None, self.stdout.read_text()
            assert time.monotonic() < deadline, "the simulator did not create its socket"
            await asyncio.sleep(0.01)
        # The socket file appears at bind(), a moment before the server listens.
        while True:
            try:
                await self.client.get("/api/v1/vmm.ping")
                return self
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "the simulator never accepted connections"
                await asyncio.sleep(0.005)

    async def call(self, method: str, route: str, body: Any = None,
                   raw: bytes | None = None) -> httpx.Response:
        content = raw if raw is not None else (None if body is None else json.dumps(body))
        return await self.client.request(method, f"/api/v1/{route}", content=content)

    async def put(self, route: str, body: Any = None) -> httpx.Response:
        return await self.call("PUT", route, body)

    async def state(self) -> str:
        response = await self.call("GET", "vm.info")
        assert response.status_code == 200, response.text
        return str(response.json()["state"])

    async def wait_for(self, predicate: Callable[[], Any]) -> None:
        deadline = time.monotonic() + PATIENCE
        while not await predicate():
            assert time.monotonic() < deadline, "condition not reached"
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.client.aclose()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    sims: list[Sim] = []

    async def start_sim(*args: str, env: dict[str, str] | None = None,
                        bare_socket: bool = False) -> Sim:
        workdir = tmp_path / f"sim{len(sims)}"
        workdir.mkdir()
        sim = Sim(workdir, *args, env=env, bare_socket=bare_socket)
        sims.append(sim)
        return await sim.started()

    yield start_sim
    for sim in sims:
        await sim.close()


@pytest.fixture
async def sim(start: Callable[..., Any]) -> Sim:
    started: Sim = await start("--no-shutdown")
    return started


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF not really a kernel\n")
    disk = tmp_path / "root.img"
    disk.write_bytes(b"ROOTFS" + bytes(8186))
    data = tmp_path / "data.img"
    data.write_bytes(bytes(4096))
    return {"kernel": kernel, "disk": disk, "data": data, "console": tmp_path / "serial.log"}


def vm_config(files: dict[str, Path], **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 4},
        "memory": {"size": 512 << 20},
        "payload": {"kernel": str(files["kernel"]), "cmdline": "console=ttyS0 root=/dev/vda"},
        "disks": [{"path": str(files["disk"])}],
        "net": [{"tap": "tap-sim0", "mac": "52:54:00:12:34:56"}],
        "serial": {"mode": "File", "file": str(files["console"])},
        "console": {"mode": "Off"},
    }
    config.update(overrides)
    return config


async def booted(sim: Sim, config: dict[str, Any]) -> None:
    assert (await sim.put("vm.create", config)).status_code == 204
    response = await sim.put("vm.boot")
    assert response.status_code == 204, response.text


def chain(response: httpx.Response) -> list[str]:
    body = response.json()
    assert isinstance(body, list), response.text
    return [str(item) for item in body]


# ---- the HTTP surface ---------------------------------------------------------------------


async def test_ping_answers_with_the_version_and_the_server_header(sim: Sim) -> None:
    response = await sim.call("GET", "vmm.ping")
    assert response.status_code == 200
    assert response.headers["server"] == "Cloud Hypervisor API"
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["version"] == "53.0.0"
    assert body["pid"] == sim.proc.pid
    assert "kvm" in body["features"]


async def test_unknown_routes_are_404_not_found(sim: Sim) -> None:
    for path in ("/api/v1/vm.nosuch", "/api/v1", "/vm.boot", "/api/v2/vm.boot"):
        response = await sim.client.get(path)
        assert response.status_code == 404, path
        assert response.json() == ["Not Found"]


async def test_wrong_methods_are_400(sim: Sim) -> None:
    # Action routes: GET is a bad request; their generic handler answers PATCH with no body.
    get_boot = await sim.call("GET", "vm.boot")
    assert (get_boot.status_code, chain(get_boot)) == (400, ["Bad Request"])
    patch_boot = await sim.call("PATCH", "vm.boot")
    assert (patch_boot.status_code, patch_boot.content) == (400, b"")
    # Query routes refuse PUT.
    for route in ("vm.info", "vm.counters", "vmm.ping"):
        response = await sim.call("PUT", route)
        assert (response.status_code, chain(response)) == (400, ["Bad Request"]), route
    get_create = await sim.call("GET", "vm.create")
    assert (get_create.status_code, chain(get_create)) == (400, ["Bad Request"])
    # micro_http itself knows only GET, PUT and PATCH.
    delete = await sim.call("DELETE", "vm.info")
    assert delete.status_code == 400
    assert "Unsupported HTTP method" in delete.text


async def test_bodies_where_none_belongs_and_none_where_one_does(
        sim: Sim, files: dict[str, Path]) -> None:
    empty_create = await sim.call("PUT", "vm.create")
    assert (empty_create.status_code, empty_create.content) == (400, b"")
    assert (await sim.put("vm.create", vm_config(files))).status_code == 204
    boot_with_body = await sim.put("vm.boot", {"now": True})
    assert (boot_with_body.status_code, chain(boot_with_body)) == (400, ["Bad Request"])
    resize_without_body = await sim.put("vm.resize")
    assert (resize_without_body.status_code, chain(resize_without_body)) == (400,
                                                                             ["Bad Request"])


# ---- request bodies: serde's messages -----------------------------------------------------


@pytest.mark.parametrize(("raw", "message"), [
    (b"{", "EOF while parsing a value at line 1 column 1"),
    (b"nonsense", "expected value at line 1 column 1"),
    (b'{"cpus": {"boot_vcpus": 2}}', "missing field `max_vcpus` at line 1 column 26"),
    (b'{"cpus": {"boot_vcpus": "two", "max_vcpus": 2}}',
     'invalid type: string "two", expected u32 at line 1 column 29'),
    (b'{"cpus": {"boot_vcpus": -1, "max_vcpus": 2}}',
     "invalid value: integer `-1`, expected u32 at line 1 column 26"),
    (b'{"memory": {}}', "missing field `size` at line 1 column 13"),
    (b'{"serial": {"mode": "Printer"}}',
     "unknown variant `Printer`, expected one of `Off`, `Pty`, `Tty`, `File`, `Socket`, "
     "`Null` at line 1 column 29"),
    (b'{"disks": {"path": "/x"}}',
     "invalid type: map, expected a sequence at line 1 column 24"),
    (b'{"rng": {}}', "missing field `src` at line 1 column 10"),
])
async def test_bad_bodies_get_serde_messages(sim: Sim, raw: bytes, message: str) -> None:
    response = await sim.call("PUT", "vm.create", raw=raw)
    assert response.status_code == 400
    assert chain(response) == ["Failed to deserialize JSON", message]
    # Nothing was created.
    assert (await sim.call("GET", "vm.info")).status_code == 404


async def test_create_fills_defaults_and_ignores_unknown_fields(sim: Sim) -> None:
    response = await sim.put("vm.create", {"cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                                           "colour": "blue", "memory": {"size": 1 << 30,
                                                                        "speed": "fast"}})
    assert response.status_code == 204
    info = (await sim.call("GET", "vm.info")).json()
    assert info["state"] == "Created"
    assert "colour" not in info["config"] and "speed" not in info["config"]["memory"]
    assert info["config"]["memory"]["hotplug_method"] == "Acpi"
    assert info["config"]["rng"]["src"] == "/dev/urandom"
    assert info["config"]["serial"]["mode"] == "Null"
    assert info["config"]["console"]["mode"] == "Tty"
    assert info["config"]["cpus"]["nested"] is True
    assert info["memory_actual_size"] == 1 << 30
    assert "device_tree" not in info


async def test_a_minimal_config_defaults_to_one_vcpu_and_512_mib(sim: Sim) -> None:
    assert (await sim.put("vm.create", {})).status_code == 204
    config = (await sim.call("GET", "vm.info")).json()["config"]
    assert config["cpus"]["boot_vcpus"] == config["cpus"]["max_vcpus"] == 1
    assert config["memory"]["size"] == 512 << 20


# ---- the state machine ---------------------------------------------------------------------


@pytest.mark.parametrize(("method", "route", "status", "expected"), [
    ("GET", "vm.info", 404, ["Error from API", "The VM info is not available",
                             "VM is not created"]),
    ("PUT", "vm.boot", 404, ["Error from API", "The VM could not boot", "VM config is missing"]),
    ("PUT", "vm.reboot", 404, ["Error from API", "The VM could not reboot", "VM is not created"]),
    ("PUT", "vm.pause", 500, ["Error from API", "The VM could not be paused",
                              "VM is not running"]),
    ("PUT", "vm.resume", 500, ["Error from API", "The VM could not resume", "VM is not running"]),
    ("PUT", "vm.shutdown", 500, ["Error from API", "The VM could not shutdown",
                                 "VM is not running"]),
    ("PUT", "vm.power-button", 500, ["Error from API", "Error triggering power button",
                                     "VM is not running"]),
    ("GET", "vm.counters", 500, ["Error from API", "The VM info is not available",
                                 "VM is not running"]),
])
async def test_before_create(sim: Sim, method: str, route: str, status: int,
                             expected: list[str]) -> None:
    response = await sim.call(method, route)
    assert response.status_code == status
    assert chain(response) == expected


async def test_before_create_body_routes_are_404(sim: Sim, files: dict[str, Path]) -> None:
    cases = [("vm.resize", {"desired_vcpus": 2}, "The VM could not be resized"),
             ("vm.add-disk", {"path": str(files["data"])}, "The disk could not be added to the VM"),
             ("vm.add-net", {"tap": "t0"}, "The network device could not be added to the VM"),
             ("vm.remove-device", {"id": "_disk0"}, "The device could not be removed from the VM")]
    for route, body, action in cases:
        response = await sim.put(route, body)
        assert response.status_code == 404, route
        assert chain(response) == ["Error from API", action, "VM is not created"]
    # Deleting nothing is fine.
    assert (await sim.put("vm.delete")).status_code == 204


async def test_lifecycle(sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files))
    assert await sim.state() == "Running"
    again = await sim.put("vm.boot")
    assert (again.status_code, chain(again)) == (
        500, ["Error from API", "The VM could not boot", "VM is already created"])
    twice = await sim.put("vm.create", vm_config(files))
    assert (twice.status_code, chain(twice)) == (
        500, ["Error from API", "The VM could not be created", "VM is already created"])

    assert (await sim.put("vm.pause")).status_code == 204
    assert await sim.state() == "Paused"
    paused_again = await sim.put("vm.pause")
    assert paused_again.status_code == 500
    assert chain(paused_again) == [
        "Error from API", "The VM could not be paused", "Cannot pause VM",
        "Failed to pause migratable component",
        "Invalid transition: InvalidStateTransition(Paused, Paused)"]
    assert (await sim.put("vm.resume")).status_code == 204
    running_resume = await sim.put("vm.resume")
    assert chain(running_resume)[-1] == (
        "Invalid transition: InvalidStateTransition(Running, Running)")

    # vm.shutdown drops the VM but keeps its config: v53.0 reports "Created" again.
    assert (await sim.put("vm.shutdown")).status_code == 204
    assert await sim.state() == "Created"
    assert sim.proc.poll() is None
    assert (await sim.put("vm.boot")).status_code == 204
    assert await sim.state() == "Running"

    assert (await sim.put("vm.delete")).status_code == 204
    assert (await sim.call("GET", "vm.info")).status_code == 404
    assert (await sim.put("vm.create", vm_config(files))).status_code == 204


async def test_boot_validates_the_config(sim: Sim, files: dict[str, Path]) -> None:
    config = vm_config(files, cpus={"boot_vcpus": 8, "max_vcpus": 4})
    assert (await sim.put("vm.create", config)).status_code == 204
    response = await sim.put("vm.boot")
    assert response.status_code == 500
    assert chain(response) == ["Error from API", "The VM could not boot",
                               "Failed to validate config", "Max CPUs (4) lower than boot CPUs (8)"]
    assert await sim.state() == "Created"


@pytest.mark.parametrize(("overrides", "expected_tail"), [
    ({"payload": None}, ["Failed to validate config", "Payload configuration is not bootable",
                         "No bootitem provided: neither firmware nor kernel"]),
    ({"disks": [{"path": "/a.img", "id": "x"}], "net": [{"tap": "t", "id": "x"}]},
     ["Failed to validate config", "Identifier x is not unique"]),
    ({"cpus": {"boot_vcpus": 4, "max_vcpus": 4,
               "topology": {"threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1,
                            "packages": 1}}},
     ["Failed to validate config", "Product of CPU topology parts does not match maximum vCPU"]),
    ({"net": [{"vhost_user": True, "vhost_socket": "/run/vhost.sock"}]},
     ["Failed to validate config",
      "Using vhost-user requires using shared memory or huge pages"]),
])
async def test_boot_validation_errors(sim: Sim, files: dict[str, Path],
                                      overrides: dict[str, Any], expected_tail: list[str]) -> None:
    config = {k: v for k, v in {**vm_config(files), **overrides}.items() if v is not None}
    assert (await sim.put("vm.create", config)).status_code == 204
    response = await sim.put("vm.boot")
    assert response.status_code == 500
    assert chain(response) == ["Error from API", "The VM could not boot", *expected_tail]


async def test_boot_opens_the_kernel_and_disks(sim: Sim, files: dict[str, Path],
                                               tmp_path: Path) -> None:
    missing = tmp_path / "missing.img"
    assert (await sim.put("vm.create", vm_config(
        files, disks=[{"path": str(missing)}]))).status_code == 204
    response = await sim.put("vm.boot")
    assert chain(response) == [
        "Error from API", "The VM could not boot", "Error from device manager",
        "Cannot open disk path", f"I/O error (path={missing} op=open)",
        "No such file or directory (os error 2)"]
    assert (await sim.put("vm.delete")).status_code == 204

    payload = {"kernel": str(tmp_path / "no-kernel")}
    assert (await sim.put("vm.create", vm_config(files, payload=payload))).status_code == 204
    response = await sim.put("vm.boot")
    assert chain(response) == ["Error from API", "The VM could not boot",
                               "Cannot open kernel file", "No such file or directory (os error 2)"]


async def test_a_boot_that_fails_after_the_vm_is_built_keeps_it_until_shutdown(
        sim: Sim, files: dict[str, Path], tmp_path: Path) -> None:
    kernel = tmp_path / "late-kernel"
    payload = {"kernel": str(kernel), "cmdline": "console=ttyS0"}
    assert (await sim.put("vm.create", vm_config(files, payload=payload))).status_code == 204
    failed = await sim.put("vm.boot")
    assert chain(failed) == ["Error from API", "The VM could not boot",
                             "Cannot open kernel file", "No such file or directory (os error 2)"]
    info = (await sim.call("GET", "vm.info")).json()
    assert info["state"] == "Created" and "device_tree" in info  # built, not booted
    kernel.write_bytes(b"\x7fELF late\n")
    again = await sim.put("vm.boot")
    assert (again.status_code, chain(again)) == (
        500, ["Error from API", "The VM could not boot", "VM is already created"])
    assert (await sim.put("vm.shutdown")).status_code == 204
    assert "device_tree" not in (await sim.call("GET", "vm.info")).json()
    assert (await sim.put("vm.boot")).status_code == 204
    assert await sim.state() == "Running"


async def test_a_boot_refused_by_validation_builds_nothing(sim: Sim,
                                                           files: dict[str, Path]) -> None:
    config = vm_config(files, cpus={"boot_vcpus": 8, "max_vcpus": 4})
    assert (await sim.put("vm.create", config)).status_code == 204
    for _ in range(2):  # Vm::new failed: each vm.boot tries afresh
        assert chain(await sim.put("vm.boot"))[2] == "Failed to validate config"
    assert "device_tree" not in (await sim.call("GET", "vm.info")).json()


def _qcow2(path: Path) -> Path:
    path.write_bytes(b"QFI\xfb" + (3).to_bytes(4, "big") + bytes(65536 - 8))
    return path


def _fixed_vhd(path: Path) -> Path:
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    footer[12:16] = (0x00010000).to_bytes(4, "big")
    footer[16:24] = b"\xff" * 8
    footer[60:64] = (2).to_bytes(4, "big")
    path.write_bytes(bytes(8192) + bytes(footer))
    return path


async def test_disk_image_types_are_detected_and_a_mismatch_refused(
        sim: Sim, files: dict[str, Path], tmp_path: Path) -> None:
    qcow2 = _qcow2(tmp_path / "disk.qcow2")
    vhd = _fixed_vhd(tmp_path / "disk.vhd")
    vhdx = tmp_path / "disk.vhdx"
    vhdx.write_bytes(b"vhdxfile" + bytes(8184))
    config = vm_config(files, disks=[{"path": str(qcow2), "image_type": "Raw"}])
    assert (await sim.put("vm.create", config)).status_code == 204
    refused = await sim.put("vm.boot")
    assert chain(refused) == [
        "Error from API", "The VM could not boot", "Error from device manager",
        "Disk image type does not match expected type: specified = raw, detected = qcow2"]
    assert (await sim.put("vm.delete")).status_code == 204

    disks = [{"path": str(qcow2)}, {"path": str(vhd)}, {"path": str(vhdx)},
             {"path": str(files["disk"]), "image_type": "Raw"}]
    await booted(sim, vm_config(files, disks=disks))
    types = [d["image_type"] for d in (await sim.call("GET", "vm.info")).json()["config"]["disks"]]
    assert types == ["Qcow2", "FixedVhd", "Vhdx", "Raw"]  # detected, and written back
    hot = await sim.put("vm.add-disk", {"path": str(_qcow2(tmp_path / "hot.qcow2")),
                                        "image_type": "Vhdx"})
    assert chain(hot)[1:] == [
        "The disk could not be added to the VM", "Error from device manager",
        "Disk image type does not match expected type: specified = vhdx, detected = qcow2"]


async def test_writable_disks_are_locked_at_boot(start: Callable[..., Any],
                                                 files: dict[str, Path]) -> None:
    first, second = await start("--no-shutdown"), await start("--no-shutdown")
    shared = vm_config(files, serial={"mode": "Null"})
    await booted(first, shared)
    assert (await second.put("vm.create", shared)).status_code == 204
    locked = await second.put("vm.boot")
    assert chain(locked) == [
        "Error from API", "The VM could not boot",
        "Error locking disk images: Another instance likely holds a lock",
        "Cannot lock images of all block devices",
        f"Failed to get Write lock for disk image: {files['disk']}",
        "The file is already locked"]
    assert await second.state() == "Created"
    # The lock goes with the VM that held it.
    assert (await first.put("vm.shutdown")).status_code == 204
    assert (await second.put("vm.shutdown")).status_code == 204
    assert (await second.put("vm.boot")).status_code == 204
    assert (await second.put("vm.shutdown")).status_code == 204
    # Read-only users share a read lock, which a writer cannot take.
    read_only = vm_config(files, serial={"mode": "Null"},
                          disks=[{"path": str(files["data"]), "readonly": True}])
    third, fourth = await start("--no-shutdown"), await start("--no-shutdown")
    await booted(third, read_only)
    await booted(fourth, read_only)
    writer = await first.put("vm.add-disk", {"path": str(files["data"])})
    assert writer.status_code == 204  # not booted: no lock yet
    assert chain(await first.put("vm.boot"))[-2:] == [
        f"Failed to get Write lock for disk image: {files['data']}",
        "The file is already locked"]


# ---- info, counters and devices ------------------------------------------------------------


async def test_generated_device_ids_and_device_tree(sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files))
    info = (await sim.call("GET", "vm.info")).json()
    assert [d["id"] for d in info["config"]["disks"]] == ["_disk0"]
    assert [n["id"] for n in info["config"]["net"]] == ["_net1"]
    tree = info["device_tree"]
    assert tree["_disk0"]["parent"] == "_virtio-pci-_disk0"
    assert tree["_virtio-pci-_disk0"]["pci_bdf"].startswith("0000:00:")

    counters = (await sim.call("GET", "vm.counters")).json()
    assert set(counters) == {"_disk0", "_net1"}
    assert counters["_disk0"]["read_bytes"] > 0  # the guest read the disk's first sectors
    assert counters["_disk0"]["write_ops"] == 0
    assert set(counters["_net1"]) == {"rx_bytes", "rx_frames", "tx_bytes", "tx_frames"}


async def test_add_and_remove_devices_on_a_running_vm(sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files))
    added = await sim.put("vm.add-disk", {"path": str(files["data"]), "readonly": True})
    assert added.status_code == 200
    disk = added.json()
    assert disk["id"] == "_disk2" and disk["bdf"].startswith("0000:00:")
    nic = await sim.put("vm.add-net", {"tap": "tap-sim1", "id": "backend"})
    assert (nic.status_code, nic.json()["id"]) == (200, "backend")

    config = (await sim.call("GET", "vm.info")).json()["config"]
    assert [d["id"] for d in config["disks"]] == ["_disk0", "_disk2"]
    assert config["disks"][1]["readonly"] is True
    assert "backend" in (await sim.call("GET", "vm.counters")).json()

    duplicate = await sim.put("vm.add-net", {"tap": "tap-sim2", "id": "backend"})
    assert (duplicate.status_code, chain(duplicate)) == (
        500, ["Error from API", "The network device could not be added to the VM",
              "Failed to validate config", "Identifier backend is not unique"])

    assert (await sim.put("vm.remove-device", {"id": "_disk2"})).status_code == 204
    assert (await sim.put("vm.remove-device", {"id": "backend"})).status_code == 204
    config = (await sim.call("GET", "vm.info")).json()["config"]
    assert [d["id"] for d in config["disks"]] == ["_disk0"]
    assert [n["id"] for n in config["net"]] == ["_net1"]

    unknown = await sim.put("vm.remove-device", {"id": "_disk2"})
    assert (unknown.status_code, chain(unknown)) == (
        500, ["Error from API", "The device could not be removed from the VM",
              "Error from device manager",
              "Failed to find device corresponding to the given identifier: _disk2"])
    rng = await sim.put("vm.remove-device", {"id": "__rng"})
    assert chain(rng)[-1] == "Not allowed to remove this type of device from the VM: rng"


async def test_add_disk_that_cannot_be_opened(sim: Sim, files: dict[str, Path],
                                              tmp_path: Path) -> None:
    await booted(sim, vm_config(files))
    response = await sim.put("vm.add-disk", {"path": str(tmp_path / "absent.img")})
    assert response.status_code == 500
    assert chain(response)[:4] == ["Error from API", "The disk could not be added to the VM",
                                   "Error from device manager", "Cannot open disk path"]


async def test_devices_added_before_boot_are_cold_plugged(sim: Sim,
                                                          files: dict[str, Path]) -> None:
    assert (await sim.put("vm.create", vm_config(files))).status_code == 204
    response = await sim.put("vm.add-disk", {"path": str(files["data"])})
    assert (response.status_code, response.content) == (204, b"")
    assert (await sim.put("vm.boot")).status_code == 204
    ids = [d["id"] for d in (await sim.call("GET", "vm.info")).json()["config"]["disks"]]
    assert ids == ["_disk0", "_disk1"]
    assert (await sim.put("vm.shutdown")).status_code == 204
    # Before boot, removal edits the config; an unknown id says so.
    assert (await sim.put("vm.remove-device", {"id": "_disk1"})).status_code == 204
    unknown = await sim.put("vm.remove-device", {"id": "_disk1"})
    assert chain(unknown) == ["Error from API", "The device could not be removed from the VM",
                              'No device with id "_disk1" to remove']


# ---- resize --------------------------------------------------------------------------------


async def test_resize_vcpus(sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files, cpus={"boot_vcpus": 2, "max_vcpus": 4}))
    assert (await sim.put("vm.resize", {"desired_vcpus": 4})).status_code == 204
    assert (await sim.call("GET", "vm.info")).json()["config"]["cpus"]["boot_vcpus"] == 4
    too_many = await sim.put("vm.resize", {"desired_vcpus": 5})
    assert (too_many.status_code, chain(too_many)) == (
        500, ["Error from API", "The VM could not be resized", "Error from CPU manager",
              "Requested vCPUs exceed maximum"])
    zero = await sim.put("vm.resize", {"desired_vcpus": 0})
    assert chain(zero)[-1] == "Requested zero vCPUs"


async def test_resize_while_a_vcpu_removal_is_pending_is_429(
        start: Callable[..., Any], files: dict[str, Path]) -> None:
    # The guest takes a minute to eject vCPUs, so the removal is still pending below.
    sim: Sim = await start("--no-shutdown",
                           env={"CLOUD_HYPERVISOR_SIM_VCPU_UNPLUG_SECONDS": "60"})
    await booted(sim, vm_config(files, cpus={"boot_vcpus": 4, "max_vcpus": 4}))
    assert (await sim.put("vm.resize", {"desired_vcpus": 2})).status_code == 204
    pending = await sim.put("vm.resize", {"desired_vcpus": 3})
    assert (pending.status_code, chain(pending)) == (429, ["Too Many Requests"])
    # Asking for the current count is not a change, and memory is not blocked.
    assert (await sim.put("vm.resize", {"desired_vcpus": 2})).status_code == 204


async def test_resize_memory_needs_hotplug_size(sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files))
    response = await sim.put("vm.resize", {"desired_ram": 1 << 30})
    assert (response.status_code, chain(response)) == (
        500, ["Error from API", "The VM could not be resized", "Memory manager error",
              "Not enough space in the hotplug RAM region"])


async def test_resize_memory_within_hotplug_size(sim: Sim, files: dict[str, Path]) -> None:
    memory = {"size": 512 << 20, "hotplug_size": 1 << 30}
    await booted(sim, vm_config(files, memory=memory))
    assert (await sim.put("vm.resize", {"desired_ram": 1 << 30})).status_code == 204
    info = (await sim.call("GET", "vm.info")).json()
    assert info["config"]["memory"]["size"] == 1 << 30
    assert info["memory_actual_size"] == 1 << 30
    odd = await sim.put("vm.resize", {"desired_ram": (1 << 30) + (1 << 20)})
    assert chain(odd)[-1] == "The requested hotplug memory addition is not a valid size"
    beyond = await sim.put("vm.resize", {"desired_ram": 2 << 30})
    assert chain(beyond)[-1] == "Not enough space in the hotplug RAM region"


# ---- the guest and its console -------------------------------------------------------------


async def test_serial_file_shows_the_boot_and_is_recreated_on_reboot(
        sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files))
    first = files["console"].read_text()
    assert "Command line: console=ttyS0 root=/dev/vda" in first
    assert "GUEST-READY" in first.splitlines()
    files["console"].write_text(first + "marker written before the reboot\n")
    assert (await sim.put("vm.reboot")).status_code == 204
    after = files["console"].read_text()
    # File::create on reboot: a fresh file with one new boot.
    assert "marker written before the reboot" not in after
    assert after.count("GUEST-READY") == 1
    assert await sim.state() == "Running"


async def test_serial_tty_goes_to_stdout_across_reboots(sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files, serial={"mode": "Tty"}))
    assert (await sim.put("vm.reboot")).status_code == 204
    output = sim.stdout.read_text()
    assert output.count("GUEST-READY") == 2
    assert output.count("Command line: console=ttyS0") == 2


async def test_power_button_powers_the_guest_off_and_keeps_the_vmm(
        sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files))
    assert (await sim.put("vm.power-button")).status_code == 204

    async def powered_off() -> bool:
        return await sim.state() == "Created"

    await sim.wait_for(powered_off)
    assert "reboot: Power down" in files["console"].read_text()
    assert sim.proc.poll() is None
    assert (await sim.put("vm.boot")).status_code == 204


async def test_power_button_while_paused_takes_effect_on_resume(
        sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files))
    assert (await sim.put("vm.pause")).status_code == 204
    assert (await sim.put("vm.power-button")).status_code == 204
    assert await sim.state() == "Paused"
    assert (await sim.put("vm.resume")).status_code == 204

    async def powered_off() -> bool:
        return await sim.state() == "Created"

    await sim.wait_for(powered_off)


async def test_guest_without_acpi_ignores_the_power_button(
        sim: Sim, files: dict[str, Path]) -> None:
    payload = {"kernel": str(files["kernel"]), "cmdline": "console=ttyS0 acpi=off"}
    await booted(sim, vm_config(files, payload=payload))
    assert (await sim.put("vm.power-button")).status_code == 204
    # Ten times the simulated guest's reaction time.
    await asyncio.sleep(1.0)
    assert await sim.state() == "Running"
    assert "Power down" not in files["console"].read_text()
    assert (await sim.put("vm.shutdown")).status_code == 204


async def test_without_no_shutdown_a_guest_power_off_ends_the_vmm(
        start: Callable[..., Any], files: dict[str, Path]) -> None:
    sim: Sim = await start()
    await booted(sim, vm_config(files))
    assert (await sim.put("vm.power-button")).status_code == 204
    assert sim.proc.wait(timeout=PATIENCE) == 0
    assert not sim.socket.exists()


async def test_vmm_shutdown_ends_the_process(sim: Sim, files: dict[str, Path]) -> None:
    await booted(sim, vm_config(files))
    response = await sim.put("vmm.shutdown")
    assert (response.status_code, response.content) == (200, b"")
    assert sim.proc.wait(timeout=PATIENCE) == 0
    assert not sim.socket.exists()


async def test_sigterm_ends_the_process_and_removes_the_socket(sim: Sim) -> None:
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(timeout=PATIENCE) == 0
    assert not sim.socket.exists()


# ---- the command line ----------------------------------------------------------------------


async def test_accepts_a_bare_socket_path_and_ignores_logging_flags(
        start: Callable[..., Any], tmp_path: Path) -> None:
    log = tmp_path / "ch.log"
    sim: Sim = await start("-v", "-v", "--log-file", str(log), "--seccomp", "false",
                           bare_socket=True)
    assert (await sim.call("GET", "vmm.ping")).status_code == 200
    assert "vmm.ping" in log.read_text()


async def test_refuses_a_socket_another_instance_serves(sim: Sim) -> None:
    done = subprocess.run([simulator(), "--api-socket", f"path={sim.socket}"],  # noqa: ASYNC221
                          capture_output=True, text=True, timeout=PATIENCE, check=False)
    assert done.returncode == 1
    assert "in use" in done.stderr
    assert (await sim.call("GET", "vmm.ping")).status_code == 200


async def test_version_flag() -> None:
    done = subprocess.run([simulator(), "--version"], capture_output=True, text=True,  # noqa: ASYNC221
                          timeout=PATIENCE, check=False)
    assert done.returncode == 0
    assert done.stdout.split()[:2] == ["cloud-hypervisor", "v53.0"]


# ---- limits and checks of the real binary ---------------------------------------------------


async def test_micro_http_refuses_a_body_over_51200_bytes(sim: Sim, files: dict[str, Path]) -> None:
    config = vm_config(files, cpus={"boot_vcpus": 1, "max_vcpus": 1,
                                    "affinity": [{"vcpu": 0, "host_cpus": [0]}] * 4000})
    raw = json.dumps(config).encode()
    assert len(raw) > 51200
    response = await sim.call("PUT", "vm.create", raw=raw)
    assert response.status_code == 400
    assert response.headers["server"] == "Firecracker API"  # micro_http's own answer
    assert response.text.startswith(f'{{ "error": "Request payload with size {len(raw)} is '
                                    "larger than the limit of 51200 allowed by server.")
    fresh = Sim.__new__(Sim)  # the refused connection is spoilt; a new one is served
    fresh.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sim.socket)),
                                     base_url="http://localhost", timeout=PATIENCE)
    try:
        assert (await fresh.call("GET", "vm.info")).status_code == 404  # nothing created
    finally:
        await fresh.client.aclose()


async def test_micro_http_serves_at_most_ten_connections(sim: Sim) -> None:
    import socket as sockets

    held = []
    try:
        for _ in range(10):
            conn = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
            conn.connect(str(sim.socket))
            held.append(conn)
        await asyncio.sleep(0.2)  # let the server take them
        eleventh = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        eleventh.settimeout(PATIENCE)
        eleventh.connect(str(sim.socket))
        answer = eleventh.recv(4096)
        eleventh.close()
        assert answer == (b'HTTP/1.1 503\r\nServer: Firecracker API\r\nConnection: close\r\n'
                          b'Content-Length: 40\r\n\r\n{ "error": "Too many open connections" }')
    finally:
        for conn in held:
            conn.close()
    await sim.wait_for(lambda: _pings(sim))


async def _pings(sim: Sim) -> bool:
    try:
        return (await sim.call("GET", "vmm.ping")).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"net": [{"tap": "t0", "num_queues": 1}]},
     "Number of queues (1) to virtio_net should be higher than 2"),
    ({"net": [{"tap": "t0", "num_queues": 6}]}, "Queue count (6) must not exceed boot vCPUs (2)"),
    ({"net": [{"tap": "t0", "mtu": 1279}]},
     "Provided MTU 1279 is lower than 1280 (expected by VIRTIO specification)"),
    ({"disks": [{"path": "/d.img", "queue_size": 2}]},
     "Block queue size must be greater than 2: 2"),
    ({"disks": [{"path": "/d.img", "serial": "s" * 21}]},
     "Block device serial length (21) exceeds maximum allowed length (20)"),
    ({"memory": {"size": 512 << 20, "shared": True},
      "disks": [{"vhost_user": True, "vhost_socket": "/run/blk.sock",
                 "rate_limiter_config": {"ops": {"size": 10, "refill_time": 100}}}]},
     "Rate limiting is not supported with vhost-user"),
])
async def test_boot_validates_devices_as_cloud_hypervisor_does(
        sim: Sim, files: dict[str, Path], overrides: dict[str, Any], expected: str) -> None:
    assert (await sim.put("vm.create", vm_config(files, **overrides))).status_code == 204
    response = await sim.put("vm.boot")
    assert chain(response)[2:] == ["Failed to validate config", expected]


async def test_rate_limiter_config_denies_unknown_fields(sim: Sim, files: dict[str, Path]) -> None:
    disk = {"path": str(files["disk"]), "rate_limiter_config": {"iops": 5}}
    response = await sim.put("vm.create", vm_config(files, disks=[disk]))
    assert response.status_code == 400
    assert chain(response)[0] == "Failed to deserialize JSON"
    assert chain(response)[1].startswith("unknown field `iops`, expected `bandwidth` or `ops`")


async def test_a_guest_without_acpi_never_ejects_vcpus(sim: Sim, files: dict[str, Path]) -> None:
    payload = {"kernel": str(files["kernel"]), "cmdline": "console=ttyS0 acpi=off"}
    await booted(sim, vm_config(files, payload=payload, cpus={"boot_vcpus": 2, "max_vcpus": 4}))
    assert (await sim.put("vm.resize", {"desired_vcpus": 1})).status_code == 204
    await asyncio.sleep(0.3)  # past the unplug time of a guest with CPU hotplug
    for desired in (2, 3):
        refused = await sim.put("vm.resize", {"desired_vcpus": desired})
        assert (refused.status_code, chain(refused)) == (429, ["Too Many Requests"])


async def test_log_file_is_truncated_and_holds_requests_only_with_v(
        start: Callable[..., Any], tmp_path: Path) -> None:
    log = tmp_path / "ch.log"
    log.write_text("a previous run\n")
    quiet = await start("--log-file", str(log))
    assert (await quiet.call("GET", "vmm.ping")).status_code == 200
    assert log.read_text() == ""  # File::create, and no info lines without -v
    await quiet.close()
    verbose = await start("-v", "--log-file", str(log))
    assert (await verbose.call("GET", "vmm.ping")).status_code == 200
    assert "GET /api/v1/vmm.ping -> 200" in log.read_text()


def test_gdb_is_refused_by_a_release_build(tmp_path: Path) -> None:
    refused = subprocess.run([simulator(), "--api-socket", str(tmp_path / "a.sock"),
                              "--gdb", f"path={tmp_path / 'gdb.sock'}"],
                             capture_output=True, text=True, timeout=PATIENCE, check=False)
    assert refused.returncode == 2
    assert "unexpected argument '--gdb' found" in refused.stderr
    assert "--gdb" not in subprocess.run([simulator(), "--help"], capture_output=True,
                                         text=True, timeout=PATIENCE, check=True).stdout


async def test_gdb_in_a_guest_debug_build(start: Callable[..., Any], tmp_path: Path) -> None:
    debug = await start("--gdb", f"path={tmp_path / 'gdb.sock'}",
                        env={"CLOUD_HYPERVISOR_SIM_GUEST_DEBUG": "1"})
    assert "guest_debug" in (await debug.call("GET", "vmm.ping")).json()["features"]


async def test_serial_file_without_a_path_ends_the_vmm_at_create(
        sim: Sim, files: dict[str, Path]) -> None:
    with pytest.raises(httpx.HTTPError):
        await sim.put("vm.create", vm_config(files, serial={"mode": "File"}))
    assert sim.proc.wait(timeout=PATIENCE) != 0
    assert "panicked" in sim.stdout.read_text()
