"""The values the etcd client hands back: keys, watch events, leadership, leases, status."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from vmm.etcd import election_pb2, kv_pb2


def decode_key(raw: bytes) -> str:
    # surrogateescape round-trips any key, even one another tool wrote in another encoding.
    return raw.decode("utf-8", "surrogateescape")


def encode_key(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def prefix_range_end(prefix: bytes) -> bytes:
    """The exclusive end of the key range that holds every key starting with `prefix`."""
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return b"\0"  # etcd's spelling of "to the end of the keyspace"
    return stripped[:-1] + bytes([stripped[-1] + 1])


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: kv_pb2.KeyValue) -> KeyValue:
        return cls(key=decode_key(kv.key), value=kv.value, create_revision=kv.create_revision,
                   mod_revision=kv.mod_revision, version=kv.version, lease=kv.lease)


class EventType(enum.Enum):
    PUT = "PUT"
    DELETE = "DELETE"


@dataclass(frozen=True)
class WatchEvent:
    type: EventType
    # For a DELETE: the key, an empty value and the revision of the delete.
    kv: KeyValue
    # The key before this change, when the watch asked for it and the key existed.
    prev_kv: KeyValue | None
    revision: int

    @classmethod
    def from_pb(cls, event: kv_pb2.Event) -> WatchEvent:
        kind = EventType.DELETE if event.type == kv_pb2.Event.DELETE else EventType.PUT
        prev = KeyValue.from_pb(event.prev_kv) if event.HasField("prev_kv") else None
        return cls(kind, KeyValue.from_pb(event.kv), prev, event.kv.mod_revision)


@dataclass(frozen=True)
class LeaderKey:
    """Proof of leadership returned by `campaign`; pass it to `proclaim` and `resign`.

    `key` is deleted when leadership ends, and its create revision is `rev`: a
    transaction guarded by `Compare.create_revision(leader.key) == leader.rev`
    only applies while this leadership lasts.
    """

    name: str
    key: str
    rev: int
    lease: int

    @classmethod
    def from_pb(cls, leader: election_pb2.LeaderKey) -> LeaderKey:
        return cls(decode_key(leader.name), decode_key(leader.key), leader.rev, leader.lease)

    def to_pb(self) -> election_pb2.LeaderKey:
        return election_pb2.LeaderKey(name=encode_key(self.name), key=encode_key(self.key),
                                      rev=self.rev, lease=self.lease)


@dataclass(frozen=True)
class LeaseInfo:
    id: int
    # Seconds left before the lease expires.
    ttl: int
    granted_ttl: int
    keys: list[str]


class EtcdStatus(NamedTuple):
    version: str
    # raft member ID of the cluster's leader; 0 while there is none.
    leader_id: int
    revision: int
