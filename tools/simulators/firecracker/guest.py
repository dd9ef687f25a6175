"""The simulated guest: what it prints on the serial console and how it reacts to Ctrl+Alt+Del.

There is no CPU emulation. At InstanceStart the kernel image is checked the way
Firecracker's ELF loader starts (the file must begin with the ELF magic), then
the guest "boots" at once and prints, on the serial console (the process's
stdout, or the file set by PUT /serial):

    [    0.000000] Command line: <kernel command line as the guest sees it>
    GUEST-READY

A Linux guest (an image with the i8042 driver, below) told to mount a root device
that does not exist (`root=` on its command line, no root drive, no initrd) panics
as Linux does, printing instead of the marker:

    [    0.600000] VFS: Cannot open root device "vda" or unknown-block(0,0): error -6
    [    0.600000] Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)

With `panic=N` (N > 0) on its command line it then reboots after N seconds (at once
for N < 0), printing `Rebooting in N seconds..`, and Firecracker exits as on any guest
reboot; without, it hangs for good.

SendCtrlAltDel reaches the guest through the emulated i8042 keyboard controller.
A Linux kernel built with the i8042 driver answers it by rebooting, and
Firecracker exits when its guest reboots. The simulator decides by the kernel
image's bytes: an image containing `i8042` (as Debian's and Firecracker's guest
kernels do) reboots; any other image (like the tiny assembly test guest)
ignores the keystroke and keeps running.
"""

from __future__ import annotations

import mmap
import os

READY_MARKER = "GUEST-READY"
REBOOT_LINE = "reboot: Restarting system"
I8042_DRIVER = b"i8042"
BALLOON_DRIVER = b"virtio_balloon"
ELF_MAGIC = b"\x7fELF"
ELF_HEADER_SIZE = 64

KERNEL_LOAD_ERROR = ("Start microvm error: System configuration error: Cannot load kernel due "
                     "to invalid memory configuration or invalid kernel image: Kernel Loader: "
                     "failed to load ELF kernel image: Kernel Loader: ")


def kernel_load_error(kernel: int) -> str | None:
    """The InstanceStart error for an image Firecracker's ELF loader refuses, else None."""
    try:
        head = os.pread(kernel, ELF_HEADER_SIZE, 0)
    except OSError:  # a directory opens, but cannot be read
        head = b""
    if head[:4] == ELF_MAGIC:
        return None
    if len(head) < ELF_HEADER_SIZE:
        return KERNEL_LOAD_ERROR + "Unable to read elf header"
    return KERNEL_LOAD_ERROR + "Invalid Elf magic number"


def _image_has(kernel: int, driver: bytes) -> bool:
    try:
        with mmap.mmap(kernel, 0, access=mmap.ACCESS_READ) as image:
            return image.find(driver) >= 0
    except (OSError, ValueError):  # empty or unmappable file
        return driver in os.pread(kernel, os.fstat(kernel).st_size, 0)


def reboots_on_ctrl_alt_del(kernel: int) -> bool:
    """True when the image carries the i8042 keyboard driver."""
    return _image_has(kernel, I8042_DRIVER)


def has_balloon_driver(kernel: int) -> bool:
    """True when the image carries the virtio balloon driver."""
    return _image_has(kernel, BALLOON_DRIVER)


def boot_lines(cmdline: str) -> list[str]:
    return [f"[    0.000000] Command line: {cmdline}", READY_MARKER]


PANIC_LINE = "Kernel panic - not syncing: VFS: Unable to mount root fs on unknown-block(0,0)"


def root_device_missing(cmdline: str, has_root_drive: bool, has_initrd: bool) -> str | None:
    """The root device a Linux guest would fail to open, or None when it boots."""
    if has_root_drive or has_initrd:
        return None
    roots = [arg.split("=", 1)[1] for arg in cmdline.split() if arg.startswith("root=")]
    return roots[-1].removeprefix("/dev/") if roots else None


def panic_lines(device: str) -> list[str]:
    return [f'[    0.600000] VFS: Cannot open root device "{device}" or unknown-block(0,0): '
            "error -6", f"[    0.600000] {PANIC_LINE}"]


def panic_reboot_delay(cmdline: str) -> float | None:
    """Seconds until a panicked kernel reboots (`panic=N`), None when it never does."""
    values = [arg.split("=", 1)[1] for arg in cmdline.split() if arg.startswith("panic=")]
    try:
        seconds = int(values[-1]) if values else 0
    except ValueError:
        return None
    if seconds == 0:
        return None
    return max(0.0, float(seconds))
