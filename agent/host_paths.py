"""Which host files a VM config may name: the agent's path policy.

A caller never names host files freely. Every path a config hands the hypervisor
(kernel, initrd, disks, console output, vhost-user and gdb sockets, VFIO devices) must
resolve, symlinks and `..` followed, to a regular file under one of the agent's roots, or
to a block device (or VFIO device) matching the device allowlist. A path that breaks the
policy and a path that does not exist get the same answer, so no caller can probe the
host's filesystem; the reason is only in the agent's log.

The policy is checked in preflight, before anything is stored, and again just before a
hypervisor is started; the hypervisor is then handed the resolved path, never the
caller's string.
"""

from __future__ import annotations

import enum
import fnmatch
import logging
import os
import stat
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass

from google.protobuf.message import Message

from agent.hypervisors.errors import RuntimeFailure
from vmm import features
from vmm.agent.v1 import agent_pb2
from vmm.v1 import vm_pb2

log = logging.getLogger(__name__)

DEFAULT_ROOTS = ("/var/lib/vmm",)
REFUSED = "is not a file this host allows (it must exist under the agent's allowed paths)"


class Use(enum.Enum):
    """What the hypervisor does with a path."""

    # Opens an existing file: a regular file under a root, or an allowed block device.
    READ = "read"
    # Writes a file, creating it if needed, in a directory under a root.
    WRITE = "write"
    # A Unix socket under a root: an existing one, or one to create in a directory there
    # (vhost-user back-ends may be either side).
    SOCKET = "socket"
    # Claims a host device: an existing path matching the device allowlist.
    DEVICE = "device"


class PathRefused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class HostPathPolicy:
    roots: tuple[str, ...] = DEFAULT_ROOTS
    # Globs of the block devices (and VFIO devices) a VM may be given, e.g. "/dev/nvme*n1".
    device_allowlist: tuple[str, ...] = ()

    @classmethod
    def of(cls, roots: Iterable[str], device_allowlist: Iterable[str] = ()) -> HostPathPolicy:
        # Roots are resolved once, so a root that is itself a symlink still compares.
        return cls(tuple(os.path.realpath(r) for r in roots if r),
                   tuple(g for g in device_allowlist if g))

    def resolve(self, path: str, use: Use) -> str:
        """The resolved path the hypervisor may be handed; PathRefused if it may not."""
        if not path.startswith("/"):
            raise PathRefused("not an absolute path")
        if "\0" in path:
            raise PathRefused("contains a NUL byte")
        try:
            real = os.path.realpath(path, strict=use in (Use.READ, Use.DEVICE))
        except OSError as exc:
            raise PathRefused(f"does not resolve: {exc.strerror}") from None
        if use == Use.DEVICE:
            if not self._device_allowed(real):
                raise PathRefused(f"resolves to {real}, which the device allowlist does not name")
            return real
        try:
            mode = os.stat(real).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as exc:
            raise PathRefused(f"cannot be examined: {exc.strerror}") from None
        if use == Use.READ and mode is not None and stat.S_ISBLK(mode):
            if not self._device_allowed(real):
                raise PathRefused(f"block device {real} is not on the device allowlist")
            return real
        if not self._under_root(real):
            raise PathRefused(f"resolves to {real}, outside the allowed roots")
        if use == Use.READ and (mode is None or not stat.S_ISREG(mode)):
            raise PathRefused(f"{real} is not a regular file")
        if use == Use.WRITE and mode is not None and not stat.S_ISREG(mode):
            raise PathRefused(f"{real} exists and is not a regular file")
        if use == Use.SOCKET and mode is not None and not stat.S_ISSOCK(mode):
            raise PathRefused(f"{real} exists and is not a socket")
        if mode is None and not os.path.isdir(os.path.dirname(real)):
            raise PathRefused(f"the directory of {real} does not exist")
        return real

    def _under_root(self, real: str) -> bool:
        return any(real == root or real.startswith(root.rstrip("/") + "/")
                   for root in self.roots)

    def _device_allowed(self, real: str) -> bool:
        return any(fnmatch.fnmatchcase(real, glob) for glob in self.device_allowlist)

    # ---- whole configs ----------------------------------------------------------------

    def check(self, config: vm_pb2.VmConfig) -> list[agent_pb2.FieldViolation]:
        """One violation per path the policy refuses, naming the field."""
        return self.resolved(config)[1]

    def resolved(self, config: vm_pb2.VmConfig
                 ) -> tuple[vm_pb2.VmConfig, list[agent_pb2.FieldViolation]]:
        """A copy of config with every host path replaced by its resolved form, and the
        violations of the paths the policy refuses."""
        out = vm_pb2.VmConfig()
        out.CopyFrom(config)
        violations: list[agent_pb2.FieldViolation] = []
        for named in _paths_of(out):
            value = named.get()
            if not value:
                continue
            try:
                named.put(self.resolve(value, named.use))
            except PathRefused as exc:
                log.warning("refused %s=%r: %s", named.field, value, exc.reason)
                violations.append(agent_pb2.FieldViolation(
                    field=named.field, description=REFUSED))
        return out, violations

    def resolved_disk(self, disk: vm_pb2.StorageDevice, field_path: str
                      ) -> tuple[vm_pb2.StorageDevice, list[agent_pb2.FieldViolation]]:
        """A hot-plugged disk with its paths resolved, and the violations."""
        config, violations = self.resolved(vm_pb2.VmConfig(storage=[disk]))
        for v in violations:
            v.field = v.field.replace("config.storage[0]", field_path, 1)
        return config.storage[0], violations

    def resolved_nic(self, nic: vm_pb2.NetworkInterface, field_path: str
                     ) -> tuple[vm_pb2.NetworkInterface, list[agent_pb2.FieldViolation]]:
        """A hot-plugged interface with its paths resolved, and the violations."""
        config, violations = self.resolved(vm_pb2.VmConfig(network=[nic]))
        for v in violations:
            v.field = v.field.replace("config.network[0]", field_path, 1)
        return config.network[0], violations


# Keys of the free-form option maps that name host paths.
SOCKET_OPTIONS = ("vhost_socket", "socket")
VFIO_OPTION = "vfio_path"


@dataclass(frozen=True)
class _NamedPath:
    field: str
    use: Use
    get: Callable[[], str]
    put: Callable[[str], None]


def _attr(field_path: str, use: Use, message: Message, name: str) -> _NamedPath:
    return _NamedPath(field_path, use, lambda: str(getattr(message, name)),
                      lambda value: setattr(message, name, value))


def _option(field_path: str, use: Use, options: MutableMapping[str, str], key: str
            ) -> _NamedPath:
    return _NamedPath(f"{field_path}[{key}]", use, lambda: options.get(key, ""),
                      lambda value: options.__setitem__(key, value))


def _paths_of(config: vm_pb2.VmConfig) -> list[_NamedPath]:
    """Every place in config that names a host path."""
    paths = [
        _attr("config.boot.kernel_path", Use.READ, config.boot, "kernel_path"),
        _attr("config.boot.initrd_path", Use.READ, config.boot, "initrd_path"),
        _attr("config.console.output", Use.WRITE, config.console, "output"),
        _option("config.boot.boot_options", Use.SOCKET, config.boot.boot_options,
                features.GDB_KEY),
    ]
    for i, disk in enumerate(config.storage):
        paths.append(_attr(f"config.storage[{i}].path", Use.READ, disk, "path"))
        paths += [_option(f"config.storage[{i}].options", Use.SOCKET, disk.options, key)
                  for key in SOCKET_OPTIONS]
    for i, nic in enumerate(config.network):
        paths += [_option(f"config.network[{i}].options", Use.SOCKET, nic.options, key)
                  for key in SOCKET_OPTIONS]
        paths.append(_option(f"config.network[{i}].options", Use.DEVICE, nic.options,
                             VFIO_OPTION))
    return paths


def refuse(violations: list[agent_pb2.FieldViolation]) -> None:
    """Fail with every violation, each naming its field (INVALID_ARGUMENT)."""
    if violations:
        raise RuntimeFailure("; ".join(f"{v.field}: {v.description}" for v in violations),
                             "INVALID_ARGUMENT")
