"""What the etcd client raises."""

from __future__ import annotations

import grpc


class EtcdError(Exception):
    """etcd refused a request, or answered in a way the client did not expect."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(EtcdError):
    """No endpoint answered within the timeout, or a write's outcome is unknown."""


class WatchCompacted(EtcdError):
    """A watch could not resume: the revisions it had not seen yet were compacted away.

    The caller must list the prefix again and watch from that listing's revision + 1.
    """

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted; oldest revision kept is {compact_revision}")
        self.compact_revision = compact_revision


class LeaseNotFound(EtcdError):
    """The lease does not exist: it expired, was revoked, or never existed."""


class NotLeader(EtcdError):
    """The election key given no longer holds leadership."""

