"""Guest images for tests and local runs, built on this host and cached.

Two guests:

* the tiny guest: a few instructions that print TINY_GUEST_MARKER on the
  serial port (0x3f8) and halt. It boots in milliseconds under any KVM,
  including a nested or paravirtualised one. Two builds of the same program:
  a 64-bit static ELF (what Firecracker loads) and a 32-bit ELF carrying a Xen
  PVH entry note (what QEMU's ``-kernel`` loads).
* the Linux guest: Debian's cloud kernel plus a busybox initramfs that prints
  LINUX_GUEST_MARKER, a heartbeat line every second, and powers off on the
  ACPI power button and on Ctrl+Alt+Del.

Everything is built into a cache directory and rebuilt only when missing; the
file names carry a hash of their inputs, so a change to a source rebuilds it.

    python -m tools.guests [--cache DIR] [--tiny-only]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

TINY_GUEST_MARKER = "GUEST-READY tiny-elf"
# What the tiny panicking guests print (the first one as a Linux kernel in a panic does).
TINY_GUEST_PANIC_LINE = "Kernel panic - not syncing: tiny guest panics on purpose"
TINY_GUEST_PVPANIC_MARKER = "tiny guest signals a panic on its pvpanic port"
LINUX_GUEST_MARKER = "VMM-GUEST-READY"
LINUX_GUEST_POWEROFF_MARKER = "VMM-GUEST-POWEROFF"
# Printed once a second by the Linux guest, followed by a counter and what the guest
# sees: "VMM-GUEST-HEARTBEAT 7 cpus=0-1 mem_kib=418308 disks=vda vdb".
LINUX_GUEST_HEARTBEAT = "VMM-GUEST-HEARTBEAT"
# Printed for each NIC the guest configured from its ip= argument, and when a peer named
# by vmm.ping= answered.
LINUX_GUEST_NET_MARKER = "VMM-GUEST-NET"
LINUX_GUEST_PING_MARKER = "VMM-GUEST-PING"

REPO_ROOT = Path(__file__).resolve().parents[2]


def default_cache_dir() -> Path:
    return REPO_ROOT / "var" / "guests"


class GuestBuildError(RuntimeError):
    """A guest image could not be built; the message says which step and why."""


def _run(argv: Sequence[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            list(argv), cwd=cwd, check=False, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{argv[0]} is not installed") from e
    if done.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(argv)} failed with status {done.returncode}: "
            f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:16]


def _publish(tmp: Path, final: Path) -> Path:
    """Move a finished build into place atomically so a concurrent reader never sees half."""
    os.replace(tmp, final)
    return final


# ---- the tiny guest -----------------------------------------------------------------

# Entered in 64-bit long mode by Firecracker's ELF loader (flat segments, paging on,
# identity mapped). Writes the marker to COM1, then halts for good.
_TINY_ELF64_SOURCE = f"""\
    .code64
    .text
    .globl _start
_start:
    cld
    lea     marker(%rip), %rsi
    mov     $marker_len, %ecx
    mov     $0x3f8, %dx
1:  lodsb
    outb    %al, %dx
    loop    1b
2:  hlt
    jmp     2b

marker:
    .ascii  "{TINY_GUEST_MARKER}\\n"
    .set    marker_len, . - marker
"""

# Entered in 32-bit protected mode, paging off (the PVH boot protocol). QEMU finds
# the entry in the XEN_ELFNOTE_PHYS32_ENTRY (18) note of a PT_NOTE segment.
_TINY_PVH32_SOURCE = f"""\
    .code32
    .section .note.Xen, "a", @note
    .balign 4
    .long   4               /* name size: "Xen" plus NUL */
    .long   4               /* descriptor size: one 32-bit address */
    .long   18              /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz  "Xen"
    .balign 4
    .long   _start
    .balign 4

    .text
    .globl _start
_start:
    cld
    mov     $marker, %esi
    mov     $marker_len, %ecx
    mov     $0x3f8, %dx
1:  lodsb
    outb    %al, %dx
    loop    1b
2:  hlt
    jmp     2b

marker:
    .ascii  "{TINY_GUEST_MARKER}\\n"
    .set    marker_len, . - marker
"""

# Variants that die as a panicking Linux kernel does. For Firecracker: the kernel's panic
# line, then the reboot `panic=1` asks for (a CPU reset through the i8042 controller,
# which ends the Firecracker process). For QEMU: a line that is not the panic line, then
# a panic event on the pvpanic device's port, so only the hypervisor can tell.
_TINY_PANIC_ELF64_SOURCE = _TINY_ELF64_SOURCE.replace(
    TINY_GUEST_MARKER, TINY_GUEST_PANIC_LINE).replace(
    "2:  hlt", "    mov     $0xfe, %al\n    outb    %al, $0x64\n2:  hlt")
_TINY_PANIC_PVH32_SOURCE = _TINY_PVH32_SOURCE.replace(
    TINY_GUEST_MARKER, TINY_GUEST_PVPANIC_MARKER).replace(
    "2:  hlt", "    mov     $1, %al\n    mov     $0x505, %dx\n    outb    %al, %dx\n2:  hlt")

_TINY_ELF64_BUILD = (
    ("gcc", "-c", "-o", "{obj}", "{src}"),
    ("ld", "-static", "-nostdlib", "-Ttext=0x1000000", "-e", "_start", "-o", "{out}", "{obj}"),
)
_TINY_PVH32_BUILD = (
    ("gcc", "-m32", "-c", "-o", "{obj}", "{src}"),
    ("ld", "-m", "elf_i386", "-static", "-nostdlib", "-Ttext=0x100000",
     # Keep the note next to the code instead of at the default 0x8048000 base.
     "--section-start=.note.Xen=0x101000", "-e", "_start",
     "-o", "{out}", "{obj}"),
)


@dataclass(frozen=True)
class TinyGuest:
    # 64-bit static ELF, loaded at 0x1000000 (Firecracker's kernel_image_path).
    elf64: Path
    # 32-bit ELF with a PVH entry note, loaded at 0x100000 (QEMU's -kernel).
    pvh32: Path
    # Die as a panicking kernel: see _TINY_PANIC_ELF64_SOURCE and _TINY_PANIC_PVH32_SOURCE.
    panic_elf64: Path
    panic_pvh32: Path
    marker: str = TINY_GUEST_MARKER


def _build_asm(cache_dir: Path, stem: str, source: str,
               steps: Iterable[Sequence[str]]) -> Path:
    steps = tuple(tuple(s) for s in steps)
    out = cache_dir / f"{stem}-{_digest(source, repr(steps))}.elf"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=f".{stem}-") as work:
        src = Path(work) / f"{stem}.S"
        src.write_text(source)
        names = {"src": str(src), "obj": str(Path(work) / f"{stem}.o"),
                 "out": str(Path(work) / f"{stem}.elf")}
        for step in steps:
            _run([arg.format(**names) for arg in step])
        return _publish(Path(names["out"]), out)


def tiny_guest(cache_dir: Path) -> TinyGuest:
    """The tiny serial-marker guest, built into cache_dir when missing."""
    return TinyGuest(
        elf64=_build_asm(cache_dir, "tiny-guest-elf64", _TINY_ELF64_SOURCE, _TINY_ELF64_BUILD),
        pvh32=_build_asm(cache_dir, "tiny-guest-pvh32", _TINY_PVH32_SOURCE, _TINY_PVH32_BUILD),
        panic_elf64=_build_asm(cache_dir, "tiny-panic-elf64", _TINY_PANIC_ELF64_SOURCE,
                               _TINY_ELF64_BUILD),
        panic_pvh32=_build_asm(cache_dir, "tiny-panic-pvh32", _TINY_PANIC_PVH32_SOURCE,
                               _TINY_PVH32_BUILD),
    )


# ---- the Linux guest ----------------------------------------------------------------

# The kernel flavour whose build has what the VMMs need built in (8250 console, PVH
# entry, ACPI, i8042) and virtio as modules.
KERNEL_FLAVOUR = "cloud-amd64"
# Modules the initramfs loads, in addition to whatever they depend on.
GUEST_MODULES = ("virtio", "virtio_ring", "virtio_mmio", "virtio_pci", "virtio_blk",
                 "virtio_net", "virtio_console", "button", "evdev")
# A kernel command line that suits the guest on every backend (add reboot=k for
# Firecracker, whose only way out is the keyboard controller reset).
LINUX_GUEST_CMDLINE = "console=ttyS0 quiet"

# The kernel runs /init; it loads modules and hands over to busybox init, which
# (unlike a plain shell) asks the kernel to turn Ctrl+Alt+Del into a signal.
_INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r module; do
    insmod "/lib/modules/$module.ko" || echo "init: cannot load $module"
done < /lib/modules/load-order
exec /sbin/init
"""

_INITTAB = """::sysinit:/etc/rc.ready
::once:/etc/heartbeat
::ctrlaltdel:/etc/poweroff-guest
"""

# acpid (logging to /var/log/acpid.log) runs the power button handler it finds at
# <conf dir>/PWRF/00000080. Each NIC is configured from its kernel `ip=` argument
# (<client>::<gateway>:<netmask>::<device>:off) before the guest says it is ready.
_RC_READY = f"""#!/bin/sh
acpid -c /etc/acpi
ifconfig lo 127.0.0.1 up
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ip=*) /etc/net-up "${{arg#ip=}}" ;;
        vmm.ping=*) /etc/ping-peer "${{arg#vmm.ping=}}" & ;;
    esac
done
echo "{LINUX_GUEST_MARKER}"
"""

_NET_UP = f"""#!/bin/sh
IFS=: read -r client server gateway netmask hostname device autoconf <<END
$1
END
device=${{device:-eth0}}
if ifconfig "$device" "$client" netmask "$netmask" up; then
    [ -n "$gateway" ] && route add default gw "$gateway" dev "$device"
    echo "{LINUX_GUEST_NET_MARKER} $device $client $netmask"
else
    echo "init: cannot configure $device"
fi
"""

# vmm.ping=<address> on the command line: ping it until it answers and say so, so a test
# sees one guest reach another on the console.
_PING_PEER = f"""#!/bin/sh
for _ in $(seq 60); do
    if ping -c 1 -W 1 "$1" >/dev/null 2>&1; then
        echo "{LINUX_GUEST_PING_MARKER} $1"
        exit 0
    fi
done
echo "{LINUX_GUEST_PING_MARKER}-FAILED $1"
"""

# Once a second: bring hot-added vCPUs and memory online (no udev here to do it), then
# report what the guest sees, so progress and hotplug are both visible on the console.
_HEARTBEAT = f"""#!/bin/sh
n=0
while :; do
    n=$((n + 1))
    for state in /sys/devices/system/cpu/cpu*/online /sys/devices/system/memory/memory*/state
    do
        [ -e "$state" ] || continue
        case "$(cat "$state")" in
            0) echo 1 > "$state" ;;
            offline) echo online > "$state" ;;
        esac
    done
    cpus=$(cat /sys/devices/system/cpu/online)
    mem=$(sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo)
    disks=$(ls /sys/block | tr '\\n' ' ')
    echo "{LINUX_GUEST_HEARTBEAT} $n cpus=$cpus mem_kib=$mem disks=$disks"
    sleep 1
done
"""

# Power off the way this machine can: through ACPI where its tables define the S5
# (soft-off) state, else by a reset, which is how a Firecracker guest ends its VM.
_POWEROFF = f"""#!/bin/sh
echo "{LINUX_GUEST_POWEROFF_MARKER}" > /dev/console
if grep -q _S5_ /sys/firmware/acpi/tables/DSDT 2>/dev/null; then
    poweroff -f
else
    reboot -f
fi
"""

_GUEST_SCRIPTS: dict[str, str] = {
    "init": _INIT,
    "etc/rc.ready": _RC_READY,
    "etc/net-up": _NET_UP,
    "etc/ping-peer": _PING_PEER,
    "etc/heartbeat": _HEARTBEAT,
    "etc/poweroff-guest": _POWEROFF,
    "etc/acpi/PWRF/00000080": _POWEROFF,
}


@dataclass(frozen=True)
class LinuxGuest:
    # The compressed kernel as Debian ships it (QEMU's -kernel).
    bzimage: Path
    # The uncompressed ELF kernel with its PVH note (Firecracker, Cloud Hypervisor).
    vmlinux: Path
    # gzip-compressed cpio (newc) with busybox, the virtio modules and the init scripts.
    initramfs: Path
    # The kernel release, e.g. "6.1.0-56-cloud-amd64".
    release: str
    marker: str = LINUX_GUEST_MARKER
    poweroff_marker: str = LINUX_GUEST_POWEROFF_MARKER
    heartbeat: str = LINUX_GUEST_HEARTBEAT
    cmdline: str = LINUX_GUEST_CMDLINE


def kernel_release_offered() -> str:
    """The release of the cloud kernel apt offers now, e.g. "6.1.0-56-cloud-amd64"."""
    out = _run(["apt-cache", "depends", f"linux-image-{KERNEL_FLAVOUR}"])
    found = re.findall(rf"Depends: linux-image-(\S+-{KERNEL_FLAVOUR})\b", out)
    if not found:
        raise GuestBuildError(f"apt-cache offers no linux-image-{KERNEL_FLAVOUR}; "
                              "run apt-get update")
    return found[0]


def _cached_release(cache_dir: Path) -> str | None:
    """The newest kernel release already built in the cache."""
    releases = [p.name.removeprefix("linux-")
                for p in cache_dir.glob(f"linux-*-{KERNEL_FLAVOUR}") if (p / "vmlinux").exists()]
    return max(releases, key=_version_key, default=None)


def _version_key(release: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", release))


def linux_guest(cache_dir: Path, release: str | None = None) -> LinuxGuest:
    """Debian's cloud kernel and a busybox initramfs, built into cache_dir when missing.

    Without a release, the one already in the cache is used, else the one apt offers.
    """
    chosen = release or _cached_release(cache_dir) or kernel_release_offered()
    kernel_dir = cache_dir / f"linux-{chosen}"
    if not (kernel_dir / "vmlinux").exists():
        try:
            _build_kernel_dir(cache_dir, chosen, kernel_dir)
        except GuestBuildError:
            if release:
                raise
            # Package lists older than the mirror name a kernel it no longer has.
            _run(["apt-get", "update", "-qq"])
            chosen = kernel_release_offered()
            kernel_dir = cache_dir / f"linux-{chosen}"
            _build_kernel_dir(cache_dir, chosen, kernel_dir)
    return LinuxGuest(
        bzimage=kernel_dir / "bzImage",
        vmlinux=kernel_dir / "vmlinux",
        initramfs=_build_initramfs(kernel_dir),
        release=chosen,
    )


def _build_kernel_dir(cache_dir: Path, release: str, kernel_dir: Path) -> None:
    """Download and unpack the kernel package; keep the kernel in both forms and the
    modules the guest loads."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".kernel-") as work_str:
        work = Path(work_str)
        _run(["apt-get", "download", f"linux-image-{release}-unsigned"], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise GuestBuildError(f"apt-get download left no .deb for {release}")
        root = work / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)])
        staged = work / "out"
        (staged / "modules").mkdir(parents=True)
        bzimage = root / "boot" / f"vmlinuz-{release}"
        shutil.copyfile(bzimage, staged / "bzImage")
        _extract_vmlinux(bzimage, staged / "vmlinux", work)
        load_order = _module_closure(root / "lib" / "modules" / release, GUEST_MODULES)
        for name, path in load_order:
            shutil.copyfile(path, staged / "modules" / f"{name}.ko")
        (staged / "modules" / "load-order").write_text(
            "".join(f"{name}\n" for name, _ in load_order))
        shutil.rmtree(kernel_dir, ignore_errors=True)
        os.replace(staged, kernel_dir)


def _extract_vmlinux(bzimage: Path, out: Path, work: Path) -> None:
    """The bzImage's payload is an LZ4 (legacy) stream followed by its decompressed size."""
    data = bzimage.read_bytes()
    start = data.find(_LZ4_LEGACY_MAGIC)
    if start < 0:
        raise GuestBuildError(f"{bzimage} has no LZ4 payload (magic {_LZ4_LEGACY_MAGIC.hex()})")
    # The setup header says where the payload ends; the size trailer is not LZ4.
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    payload_start = (setup_sects + 1) * 512 + payload_offset
    if payload_start != start:
        raise GuestBuildError(f"{bzimage}: LZ4 magic at {start}, setup header says "
                              f"{payload_start}")
    payload = data[start:start + payload_length]
    (expected_size,) = struct.unpack("<I", payload[-4:])
    stream = work / "vmlinux.lz4"
    stream.write_bytes(payload[:-4])
    _run(["lz4", "-d", "-q", "-f", str(stream), str(out)])
    if out.stat().st_size != expected_size or out.read_bytes()[:4] != b"\x7fELF":
        raise GuestBuildError(f"{bzimage}: decompressed payload is not the {expected_size}-byte "
                              "ELF kernel the header announces")


_LZ4_LEGACY_MAGIC = bytes.fromhex("02214c18")


def _module_closure(modules_root: Path, wanted: Iterable[str]) -> list[tuple[str, Path]]:
    """The wanted modules and their dependencies, each after what it depends on.

    Debian's package ships no modules.dep (depmod writes it on install), so the
    dependencies come from each module's own .modinfo section.
    """
    by_name = {p.name.removesuffix(".ko").replace("-", "_"): p
               for p in modules_root.rglob("*.ko")}
    builtin = _builtin_modules(modules_root)
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        path = by_name.get(name)
        if path is None:
            raise GuestBuildError(f"module {name} is neither built in nor in {modules_root}")
        for dep in _modinfo(path).get("depends", "").split(","):
            if dep:
                visit(dep)
        order.append((name, path))

    for name in wanted:
        visit(name)
    return order


def _builtin_modules(modules_root: Path) -> set[str]:
    try:
        lines = (modules_root / "modules.builtin").read_text().split()
    except OSError:
        return set()
    return {Path(line).name.removesuffix(".ko").replace("-", "_") for line in lines}


def _modinfo(ko: Path) -> dict[str, str]:
    """key=value pairs of a kernel module's .modinfo ELF section."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError(f"{ko} is not a 64-bit ELF module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, strtab_off, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        name = data[strtab_off + name_off:data.index(b"\0", strtab_off + name_off)]
        if name == b".modinfo":
            pairs = (item.split(b"=", 1) for item in data[offset:offset + size].split(b"\0"))
            return {p[0].decode(): p[1].decode() for p in pairs if len(p) == 2}
    return {}


def _static_busybox() -> Path:
    for candidate in ("/bin/busybox", "/usr/bin/busybox"):
        path = Path(candidate)
        if path.exists() and not _has_interpreter(path):
            return path
    raise GuestBuildError("a statically linked busybox is missing (install busybox-static)")


def _has_interpreter(elf: Path) -> bool:
    """Whether the ELF executable needs a dynamic loader (has a PT_INTERP segment)."""
    data = elf.read_bytes()[:4096]
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return True
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    return any(struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3
               for i in range(phnum) if phoff + (i + 1) * phentsize <= len(data))


def _build_initramfs(kernel_dir: Path) -> Path:
    """The initramfs for the kernel in kernel_dir, named by a hash of its contents."""
    archive = _initramfs_archive(kernel_dir)
    out = kernel_dir / f"initramfs-{_digest(archive)}.cpio.gz"
    if not out.exists():
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        tmp.write_bytes(gzip.compress(archive, mtime=0))
        # Earlier builds stay: stored VM configs may still name them.
        _publish(tmp, out)
    return out


def _initramfs_archive(kernel_dir: Path) -> bytes:
    busybox = _static_busybox()
    modules_dir = kernel_dir / "modules"
    load_order = (modules_dir / "load-order").read_text().split()

    archive = CpioWriter()
    for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "etc/acpi", "etc/acpi/PWRF",
              "proc", "sys", "dev", "tmp", "run", "var", "var/log", "var/run", "lib",
              "lib/modules"):
        archive.directory(d)
    # The kernel opens /dev/console for init before anything mounts devtmpfs.
    archive.char_device("dev/console", 5, 1)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in _run([str(busybox), "--list-full"]).split():
        if applet != "bin/busybox":
            archive.symlink(applet, "/bin/busybox")
    for path, text in _GUEST_SCRIPTS.items():
        archive.file(path, text.encode(), 0o755)
    archive.file("etc/inittab", _INITTAB.encode(), 0o644)
    archive.file("lib/modules/load-order", "".join(f"{n}\n" for n in load_order).encode(),
                 0o644)
    for name in load_order:
        archive.file(f"lib/modules/{name}.ko", (modules_dir / f"{name}.ko").read_bytes(), 0o644)
    return archive.finish()


class CpioWriter:
    """A cpio archive in the "newc" format the kernel unpacks as its initramfs.

    Written here rather than with cpio(1) so that device nodes need no root and
    the archive is the same bytes on every build.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._ino = 0

    def directory(self, path: str) -> None:
        self._entry(path, stat.S_IFDIR | 0o755, b"", nlink=2)

    def file(self, path: str, data: bytes, mode: int) -> None:
        self._entry(path, stat.S_IFREG | mode, data)

    def symlink(self, path: str, target: str) -> None:
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, path: str, major: int, minor: int) -> None:
        self._entry(path, stat.S_IFCHR | 0o600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", nlink=1)
        return b"".join(self._chunks)

    def _entry(self, path: str, mode: int, data: bytes, nlink: int = 1,
               rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        name = path.lstrip("/").encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1],
                  len(name), 0)
        header = b"070701" + b"".join(b"%08X" % value for value in fields)
        self._chunks += [header, name, _pad4(len(header) + len(name)), data, _pad4(len(data))]


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.guests",
                                     description="Build the test guests and print their paths.")
    parser.add_argument("--cache", type=Path, default=default_cache_dir(),
                        help="where images are built and kept (default: %(default)s)")
    parser.add_argument("--tiny-only", action="store_true",
                        help="build only the tiny serial-marker guest")
    args = parser.parse_args(argv)
    try:
        tiny = tiny_guest(args.cache)
        print(f"tiny.elf64={tiny.elf64}")
        print(f"tiny.pvh32={tiny.pvh32}")
        if not args.tiny_only:
            linux = linux_guest(args.cache)
            print(f"linux.bzimage={linux.bzimage}")
            print(f"linux.vmlinux={linux.vmlinux}")
            print(f"linux.initramfs={linux.initramfs}")
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
