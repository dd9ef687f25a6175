"""Shared fixtures: a real control plane, and the spec's example configs."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format

from tools.fleet.cluster import ROOT, Cluster
from vmm.v1 import vm_pb2

pytest_plugins = ["tests.support.fixtures", "tests.support.guests"]

EXAMPLES = ROOT / "deploy" / "examples"
# Where the examples point; tests move that tree into a temp dir.
EXAMPLE_ROOT = "/var/lib/vmm/"
# A stand-in kernel image. The simulators read it like the real hypervisors open it;
# "i8042" marks a Linux kernel with the keyboard driver, which reboots on Ctrl+Alt+Del.
FAKE_KERNEL = b"\x7fELF fake Linux kernel image with i8042 and atkbd drivers\n"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    try:
        c.start()
        yield c
    finally:
        c.close()


def materialise(config: vm_pb2.VmConfig, root: Path) -> vm_pb2.VmConfig:
    """Point a config's files into root and create them there."""
    out = vm_pb2.VmConfig()
    out.CopyFrom(config)

    def move(path: str, content: bytes = b"") -> str:
        if not path.startswith(EXAMPLE_ROOT):
            return path
        target = root / path.removeprefix(EXAMPLE_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.write_bytes(content)
            if not content:
                with open(target, "r+b") as f:
                    f.truncate(1 << 20)
        return str(target)

    out.boot.kernel_path = move(out.boot.kernel_path, FAKE_KERNEL)
    if out.boot.initrd_path:
        out.boot.initrd_path = move(out.boot.initrd_path, b"initrd")
    for disk in out.storage:
        disk.path = move(disk.path)
    return out


def load_example(name: str) -> vm_pb2.VmConfig:
    data = json.loads((EXAMPLES / f"{name}.json").read_text())
    return json_format.ParseDict(data["config"], vm_pb2.VmConfig())


@pytest.fixture
def example(tmp_path: Path) -> Callable[[str], vm_pb2.VmConfig]:
    """example("lambda-function") -> that spec example with its files under tmp_path."""
    files = tmp_path / "files"

    def get(name: str) -> vm_pb2.VmConfig:
        return materialise(load_example(name), files)

    return get
