"""Which accelerator and CPU model a QEMU guest runs with: KVM where it can, else TCG.

"auto" picks KVM when /dev/kvm is usable, QEMU can start a KVM vCPU with the host
CPU model, and the guest can run there. The last point matters on hosts whose
/dev/kvm is not backed by hardware virtualisation (no vmx/svm CPU flag, as with a
paravirtualised KVM such as PVM inside a cloud VM): a stock Linux kernel cannot
run under such a KVM, while a minimal guest can. There "auto" runs Linux kernels
under TCG (software emulation) and anything else under KVM. On a host with
hardware virtualisation every guest gets KVM.

The CPU model for KVM is probed once per QEMU binary: `-cpu host`, and if QEMU
cannot start a vCPU with it, `-cpu host,-arch-capabilities` (some KVMs advertise
the IA32_ARCH_CAPABILITIES MSR but refuse writes to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO


class Accel(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    TCG = "tcg"


@dataclass(frozen=True)
class AccelChoice:
    accel: Accel  # KVM or TCG, never AUTO
    cpu_model: str  # the -cpu argument
    reason: str  # why, for backend_info and logs


# TCG's richest model: every feature QEMU can emulate.
TCG_CPU_MODEL = "max"
_KVM_CPU_MODELS = ("host", "host,-arch-capabilities")

_KVM_DEVICE = Path("/dev/kvm")
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12


def kvm_device_usable(device: Path = _KVM_DEVICE) -> bool:
    """Whether /dev/kvm opens read-write and speaks the stable KVM API."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def hardware_virtualization(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the host CPU exposes VT-x or AMD-V (the vmx / svm flag)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"vmx", "svm"})
    return False


def is_linux_kernel(path: Path) -> bool:
    """A bzImage (setup header magic "HdrS"), or an ELF kernel carrying "Linux" notes."""
    try:
        with open(path, "rb") as f:
            head = f.read(0x210)
            if head[0x202:0x206] == b"HdrS":
                return True
            if head[:4] != b"\x7fELF":
                return False
            return b"Linux" in _elf_note_owners(f, head)
    except (OSError, struct.error):
        return False


def _elf_note_owners(f: BinaryIO, head: bytes) -> set[bytes]:
    """The owner names of the notes in an ELF file's PT_NOTE segments."""
    is64 = head[4] == 2
    if is64:
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
    else:
        phoff, = struct.unpack_from("<I", head, 0x1C)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x2A)
    f.seek(phoff)
    table = f.read(phentsize * phnum)
    owners: set[bytes] = set()
    for i in range(phnum):
        entry = table[i * phentsize:(i + 1) * phentsize]
        if struct.unpack_from("<I", entry, 0)[0] != 4:  # PT_NOTE
            continue
        # p_offset and p_filesz
        if is64:
            (offset,), (size,) = struct.unpack_from("<Q", entry, 8), struct.unpack_from(
                "<Q", entry, 32)
        else:
            (offset,), (size,) = struct.unpack_from("<I", entry, 4), struct.unpack_from(
                "<I", entry, 16)
        f.seek(offset)
        notes = f.read(min(size, 1 << 20))
        pos = 0
        while pos + 12 <= len(notes):
            namesz, descsz, _type = struct.unpack_from("<III", notes, pos)
            owners.add(notes[pos + 12:pos + 12 + namesz].rstrip(b"\0"))
            pos += 12 + _align4(namesz) + _align4(descsz)
    return owners


def _align4(n: int) -> int:
    return (n + 3) & ~3


# QEMU binary -> the -cpu model KVM accepts there (None: KVM unusable with it).
_kvm_cpu_model_cache: dict[tuple[str, float], str | None] = {}


async def kvm_cpu_model(binary: str) -> str | None:
    """The first host CPU model QEMU can start a KVM vCPU with; None if none works."""
    try:
        key = (binary, os.stat(binary).st_mtime)
    except OSError:
        return None
    if key not in _kvm_cpu_model_cache:
        model = None
        for candidate in _KVM_CPU_MODELS:
            if await _kvm_vcpu_starts(binary, candidate):
                model = candidate
                break
        _kvm_cpu_model_cache[key] = model
    return _kvm_cpu_model_cache[key]


async def _kvm_vcpu_starts(binary: str, cpu_model: str) -> bool:
    """Start a paused, empty microvm with cpu_model under KVM and quit it over QMP.

    QEMU creates and resets its vCPUs before it reads QMP, so a CPU model KVM
    refuses ends the process (an abort) before "quit" is answered.
    """
    proc = await asyncio.create_subprocess_exec(
        binary, "-M", "microvm,accel=kvm", "-cpu", cpu_model, "-m", "16", "-S",
        "-nodefaults", "-no-user-config", "-display", "none", "-qmp", "stdio",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(
            b'{"execute": "qmp_capabilities"}\n{"execute": "quit"}\n'), 10.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return False
    return proc.returncode == 0 and b"host-qmp-quit" in out


async def choose_accel(binary: str, requested: Accel, kernel: Path) -> AccelChoice:
    """The accelerator and CPU model for booting kernel; RuntimeError if `kvm` was
    requested and KVM cannot be used."""
    if requested == Accel.TCG:
        return AccelChoice(Accel.TCG, TCG_CPU_MODEL, "tcg requested")
    model = await kvm_cpu_model(binary) if kvm_device_usable() else None
    if requested == Accel.KVM:
        if model is None:
            raise RuntimeError(_kvm_unusable_reason())
        return AccelChoice(Accel.KVM, model, "kvm requested")
    if model is None:
        return AccelChoice(Accel.TCG, TCG_CPU_MODEL, _kvm_unusable_reason())
    if not hardware_virtualization() and is_linux_kernel(kernel):
        return AccelChoice(Accel.TCG, TCG_CPU_MODEL,
                           "/dev/kvm is not backed by hardware virtualisation (no vmx/svm "
                           "CPU flag), where Linux kernels do not run; using tcg")
    return AccelChoice(Accel.KVM, model, "kvm available")


def _kvm_unusable_reason() -> str:
    if not _KVM_DEVICE.exists():
        return f"{_KVM_DEVICE} does not exist"
    if not kvm_device_usable():
        return f"{_KVM_DEVICE} cannot be opened read-write"
    return "QEMU cannot start a KVM vCPU with the host CPU model"
