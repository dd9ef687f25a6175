"""The guest image builder: real gcc/ld builds, a real Debian kernel package, real cpio."""

from __future__ import annotations

import gzip
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import tools.guests.images as guest_images
from tools.guests.images import (
    LINUX_GUEST_MARKER,
    TINY_GUEST_MARKER,
    CpioWriter,
    GuestBuildError,
    LinuxGuest,
    TinyGuest,
    default_cache_dir,
    linux_guest,
    tiny_guest,
)


def _need_tools(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} on PATH")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyGuest:
    _need_tools("gcc", "ld")
    try:
        return tiny_guest(tmp_path_factory.mktemp("tiny"))
    except GuestBuildError as e:
        pytest.skip(f"cannot build the tiny guest (gcc -m32 needs libc6-dev-i386?): {e}")


@pytest.fixture(scope="module")
def linux() -> LinuxGuest:
    # The shared cache: the kernel package is downloaded once per checkout.
    _need_tools("apt-get", "dpkg-deb", "lz4")
    try:
        return linux_guest(default_cache_dir())
    except GuestBuildError as e:
        pytest.skip(f"cannot build the Linux guest (needs Debian's cloud kernel package via "
                    f"apt-get download and busybox-static): {e}")


def _elf_header(path: Path) -> tuple[int, int, int]:
    """(class: 1 = 32-bit, 2 = 64-bit; e_machine; e_entry)."""
    data = path.read_bytes()[:64]
    assert data[:4] == b"\x7fELF"
    machine = struct.unpack_from("<H", data, 18)[0]
    entry = struct.unpack_from("<Q" if data[4] == 2 else "<I", data, 24)[0]
    return data[4], machine, entry


def _notes(path: Path) -> list[tuple[bytes, int, bytes]]:
    """(owner, type, descriptor) of every note in the PT_NOTE segments of a 32-bit ELF."""
    data = path.read_bytes()
    phoff = struct.unpack_from("<I", data, 0x1C)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
    notes = []
    for i in range(phnum):
        p_type, p_offset, _, _, p_filesz = struct.unpack_from("<5I", data, phoff + i * phentsize)
        if p_type != 4:
            continue
        pos = p_offset
        while pos < p_offset + p_filesz:
            namesz, descsz, note_type = struct.unpack_from("<3I", data, pos)
            name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            desc_at = pos + 12 + (namesz + 3) // 4 * 4
            notes.append((name, note_type, data[desc_at:desc_at + descsz]))
            pos = desc_at + (descsz + 3) // 4 * 4
    return notes


def test_tiny_guest_elf64_is_a_static_x86_64_executable_at_16_mib(tiny: TinyGuest) -> None:
    elf_class, machine, entry = _elf_header(tiny.elf64)
    assert (elf_class, machine, entry) == (2, 62, 0x1000000)  # ELFCLASS64, EM_X86_64
    assert TINY_GUEST_MARKER.encode() + b"\n" in tiny.elf64.read_bytes()


def test_tiny_guest_pvh32_has_a_pvh_entry_note_pointing_at_its_entry(tiny: TinyGuest) -> None:
    elf_class, machine, entry = _elf_header(tiny.pvh32)
    assert (elf_class, machine, entry) == (1, 3, 0x100000)  # ELFCLASS32, EM_386
    pvh = [desc for owner, kind, desc in _notes(tiny.pvh32) if owner == b"Xen" and kind == 18]
    assert pvh == [struct.pack("<I", entry)]


def test_tiny_guest_is_built_once_and_rebuilt_when_its_source_changes(
        tiny: TinyGuest, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tiny.elf64.parent
    built_at = tiny.elf64.stat().st_mtime_ns
    again = tiny_guest(cache)
    assert again == tiny
    assert again.elf64.stat().st_mtime_ns == built_at

    monkeypatch.setattr(guest_images, "_TINY_ELF64_SOURCE",
                        guest_images._TINY_ELF64_SOURCE.replace("hlt", "hlt\n    nop"))
    changed = tiny_guest(cache)
    assert changed.elf64 != tiny.elf64 and changed.elf64.exists()
    assert changed.pvh32 == tiny.pvh32


def test_cpio_writer_output_is_what_cpio_reads(tmp_path: Path) -> None:
    _need_tools("cpio")
    archive = CpioWriter()
    archive.directory("etc")
    archive.file("etc/motd", b"hello\n", 0o644)
    archive.file("init", b"#!/bin/sh\n", 0o755)
    archive.symlink("bin/sh", "/bin/busybox")
    archive.char_device("dev/console", 5, 1)
    listing = subprocess.run(["cpio", "-itv", "--quiet"], input=archive.finish(),
                             capture_output=True, check=True).stdout.decode()
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in listing.splitlines()}
    assert set(lines) == {"etc", "etc/motd", "init", "bin/sh", "dev/console"}
    assert lines["dev/console"].startswith("crw-------")
    assert re.search(r"\b5,\s+1\b", lines["dev/console"])
    assert lines["init"].startswith("-rwxr-xr-x")
    assert lines["bin/sh"].startswith("lrwxrwxrwx") and lines["bin/sh"].endswith("/bin/busybox")


def test_linux_guest_kernel_in_both_forms(linux: LinuxGuest) -> None:
    assert linux.bzimage.read_bytes()[0x202:0x206] == b"HdrS"
    elf_class, machine, _ = _elf_header(linux.vmlinux)
    assert (elf_class, machine) == (2, 62)
    assert linux.vmlinux.stat().st_size > 3 * linux.bzimage.stat().st_size


def test_linux_guest_initramfs_loads_modules_after_their_dependencies(
        linux: LinuxGuest, tmp_path: Path) -> None:
    _need_tools("cpio")
    subprocess.run(["cpio", "-id", "--quiet"], input=gzip.decompress(
        linux.initramfs.read_bytes()), cwd=tmp_path, check=True)
    order = (tmp_path / "lib/modules/load-order").read_text().split()
    for module in guest_images.GUEST_MODULES:
        assert (tmp_path / f"lib/modules/{module}.ko").is_file()
        assert module in order
    # Every module comes after the modules it names as dependencies.
    for i, module in enumerate(order):
        info = guest_images._modinfo(tmp_path / f"lib/modules/{module}.ko")
        for dep in filter(None, info.get("depends", "").split(",")):
            assert dep.replace("-", "_") in order[:i], f"{module} is loaded before {dep}"
    assert LINUX_GUEST_MARKER in (tmp_path / "etc/rc.ready").read_text()
    assert "::ctrlaltdel:" in (tmp_path / "etc/inittab").read_text()
    assert (tmp_path / "etc/acpi/PWRF/00000080").stat().st_mode & 0o111
    assert (tmp_path / "bin/busybox").is_file() and (tmp_path / "sbin/init").is_symlink()


def test_linux_guest_is_reused_from_the_cache(linux: LinuxGuest) -> None:
    built_at = linux.initramfs.stat().st_mtime_ns
    again = linux_guest(default_cache_dir())
    assert again == linux
    assert again.initramfs.stat().st_mtime_ns == built_at


def test_cli_prints_the_paths(tiny: TinyGuest) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tools.guests", "--cache", str(tiny.elf64.parent),
         "--tiny-only"], capture_output=True, text=True, check=True,
        cwd=guest_images.REPO_ROOT).stdout
    assert f"tiny.elf64={tiny.elf64}" in out and f"tiny.pvh32={tiny.pvh32}" in out
