"""Who may call the controller: the access file of agent and client credentials, roles and
namespace quotas, re-read when it changes.

The file is TOML:

    [[agents]]                  # one per host: the credential speaks for that host only
    host_id = "host-a"
    token_sha256 = "9f86d0..."  # or token = "..." (the sha256 keeps the file free of secrets)

    [[clients]]                 # API callers
    name = "ci"
    role = "operator"           # admin | operator | viewer
    namespaces = ["team-a"]     # "*" for every namespace
    token_sha256 = "..."        # optional: a client certificate naming this client also works

    [namespaces.team-a]         # quotas; a namespace without a table has none
    max_vcpus = 64
    max_memory_bytes = 137438953472
    max_vms = 100

Certificates carry identities as SAN URIs: `spiffe://vmm/host/<host_id>` for an agent,
`spiffe://vmm/client/<name>` for a client listed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HOST_URI_PREFIX = "spiffe://vmm/host/"
CLIENT_URI_PREFIX = "spiffe://vmm/client/"
DEFAULT_NAMESPACE = "default"
ALL_NAMESPACES = "*"
# How often the access file is looked at for changes (SIGHUP re-reads it at once).
RELOAD_INTERVAL = 1.0


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    VIEWER = "viewer"


@dataclass(frozen=True)
class Caller:
    """Who an RPC comes from: an agent of one host, or an API client with a role."""

    name: str
    # Set for agents: the one host this caller may speak for.
    host_id: str | None = None
    role: Role | None = None
    namespaces: frozenset[str] = frozenset()
    # The sha256 of the token it presented; empty when a certificate (or nothing) named it.
    credential: bytes = field(default=b"", repr=False)

    @property
    def is_agent(self) -> bool:
        return self.host_id is not None

    def may_see(self, namespace: str) -> bool:
        return ALL_NAMESPACES in self.namespaces or namespace in self.namespaces

    def describe(self) -> str:
        return f"agent of host {self.host_id}" if self.is_agent else f"client {self.name!r}"


# With no access file every caller is this one: any role, any namespace, any host.
OPEN_ACCESS = Caller(name="anonymous", role=Role.ADMIN, namespaces=frozenset({ALL_NAMESPACES}))


@dataclass(frozen=True)
class Quota:
    """Limits on what the VMs of one namespace hold together; 0 is no limit."""

    max_vcpus: int = 0
    max_memory_bytes: int = 0
    max_vms: int = 0


class AccessFileError(ValueError):
    """The access file cannot be used as it is."""


@dataclass
class Access:
    """One reading of the access file."""

    by_token: dict[bytes, Caller] = field(default_factory=dict)
    clients: dict[str, Caller] = field(default_factory=dict)
    quotas: dict[str, Quota] = field(default_factory=dict)

    def for_token(self, token: str) -> Caller | None:
        return self.by_token.get(token_digest(token))

    def for_certificate(self, uris: Iterable[str]) -> Caller | None:
        """The identity a verified certificate's SAN URIs carry, if any."""
        for uri in uris:
            if uri.startswith(HOST_URI_PREFIX) and (host := uri.removeprefix(HOST_URI_PREFIX)):
                return Caller(name=uri, host_id=host)
            if uri.startswith(CLIENT_URI_PREFIX):
                client = self.clients.get(uri.removeprefix(CLIENT_URI_PREFIX))
                if client is not None:
                    return client
        return None


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.strip().encode()).digest()


def parse(text: str, source: str = "access file") -> Access:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AccessFileError(f"{source}: {exc}") from None
    access = Access()

    def add_token(entry: Mapping[str, Any], where: str, caller: Caller) -> None:
        digest = _digest_of(entry, where)
        if digest is None:
            return
        if digest in access.by_token:
            raise AccessFileError(f"{where}: the same token is given twice")
        access.by_token[digest] = replace(caller, credential=digest)

    for i, entry in enumerate(_tables(data, "agents", source)):
        where = f"{source}: agents[{i}]"
        host_id = _text(entry, "host_id", where)
        if _digest_of(entry, where) is None:
            raise AccessFileError(f"{where}: needs token or token_sha256")
        add_token(entry, where, Caller(name=f"agent:{host_id}", host_id=host_id))
    for i, entry in enumerate(_tables(data, "clients", source)):
        where = f"{source}: clients[{i}]"
        name = _text(entry, "name", where)
        try:
            role = Role(entry.get("role", ""))
        except ValueError:
            raise AccessFileError(f"{where}: role must be one of "
                                  f"{', '.join(r.value for r in Role)}") from None
        namespaces = entry.get("namespaces", [DEFAULT_NAMESPACE])
        if not isinstance(namespaces, list) or not all(
                isinstance(n, str) and n for n in namespaces):
            raise AccessFileError(f"{where}: namespaces must be a list of names")
        if name in access.clients:
            raise AccessFileError(f"{where}: client {name!r} is listed twice")
        caller = Caller(name=name, role=role, namespaces=frozenset(namespaces))
        access.clients[name] = caller
        add_token(entry, where, caller)
    namespaces = data.get("namespaces", {})
    if not isinstance(namespaces, dict):
        raise AccessFileError(f"{source}: namespaces must be a table of tables")
    for name, table in namespaces.items():
        where = f"{source}: namespaces.{name}"
        if not isinstance(table, dict):
            raise AccessFileError(f"{where} must be a table")
        limits = {}
        for key in ("max_vcpus", "max_memory_bytes", "max_vms"):
            value = table.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise AccessFileError(f"{where}.{key} must be a non-negative integer")
            limits[key] = value
        unknown = set(table) - set(limits)
        if unknown:
            raise AccessFileError(f"{where}: unknown setting {sorted(unknown)[0]}")
        access.quotas[name] = Quota(**limits)
    return access


def _tables(data: Mapping[str, Any], key: str, source: str) -> list[Mapping[str, Any]]:
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise AccessFileError(f"{source}: {key} must be an array of tables ([[{key}]])")
    return entries


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise AccessFileError(f"{where}: {key} is required")
    return value


def _digest_of(entry: Mapping[str, Any], where: str) -> bytes | None:
    if "token" in entry and "token_sha256" in entry:
        raise AccessFileError(f"{where}: give token or token_sha256, not both")
    if "token" in entry:
        return token_digest(_text(entry, "token", where))
    if "token_sha256" in entry:
        try:
            digest = bytes.fromhex(_text(entry, "token_sha256", where))
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise AccessFileError(f"{where}: token_sha256 must be 64 hex digits")
        return digest
    return None


class AccessFile:
    """The access file, re-read whenever it changes (polled, and at once on `reload()`). A
    file that fails to parse is reported and the previous reading stays in force."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        self.current = self._read()
        self._task: asyncio.Task[None] | None = None
        # Called with each new reading.
        self.on_change: Callable[[Access], None] | None = None

    def _read(self) -> Access:
        stat = self.path.stat()
        access = parse(self.path.read_text(), str(self.path))
        self._stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        return access

    def reload(self, force: bool = False) -> bool:
        """Re-read the file if it changed since the last reading (or `force`); whether a new
        reading was taken."""
        try:
            stat = self.path.stat()
            if not force and (stat.st_ino, stat.st_mtime_ns, stat.st_size) == self._stamp:
                return False
            self.current = self._read()
        except (OSError, AccessFileError) as exc:
            log.error("access file not reloaded, the previous one stays in force: %s", exc)
            with contextlib.suppress(OSError):
                stat = self.path.stat()
                self._stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
            return False
        log.info("access file %s reloaded: %d agents, %d clients, %d namespace quotas",
                 self.path, sum(1 for c in self.current.by_token.values() if c.is_agent),
                 len(self.current.clients), len(self.current.quotas))
        if self.on_change is not None:
            self.on_change(self.current)
        return True

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll(), name="access-file-reload")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_INTERVAL)
            self.reload()

