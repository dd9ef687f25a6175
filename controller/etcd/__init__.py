"""An asyncio client for the parts of etcd v3 the controller uses.

It speaks etcd's gRPC API through the trimmed protocol files in proto/vmm/etcd:
keys and prefixes, revision-guarded transactions, watches, leases and the
server-side election API.

Failure model. The client holds one channel per endpoint and sends every call
to the current one. When an endpoint cannot be reached the call moves on to the
next and is retried with backoff until `timeout` seconds have passed; then it
raises `EtcdUnavailable`. A write whose connection broke after it was sent may
or may not have been applied, so writes are retried only when they certainly
never reached a server; otherwise `EtcdUnavailable` says the outcome is
unknown and the caller re-reads. Watches, lease keepalives and election
observers reconnect on their own and resume where they left off.

The package, one job per module:

    client.py      EtcdClient: keys, transactions, watches, leases, election, status
    endpoints.py   the endpoint pool: channels, failover and retries with backoff
    keepalive.py   LeaseKeepAlive: refreshes a lease until it is stopped or lost
    txn.py         transaction guards (Compare) and operations (Op), and their results
    values.py      KeyValue, WatchEvent and the other values calls return
    errors.py      EtcdError and its kinds
"""

from controller.etcd.client import EtcdClient
from controller.etcd.errors import (
    EtcdError,
    EtcdUnavailable,
    LeaseNotFound,
    NotLeader,
    WatchCompacted,
)
from controller.etcd.keepalive import LeaseKeepAlive
from controller.etcd.txn import (
    Compare,
    CompareTarget,
    DeleteResult,
    GetResult,
    Op,
    OpResult,
    PutResult,
    TxnResult,
)
from controller.etcd.values import (
    EtcdStatus,
    EventType,
    KeyValue,
    LeaderKey,
    LeaseInfo,
    WatchEvent,
    prefix_range_end,
)

__all__ = [
    "Compare",
    "CompareTarget",
    "DeleteResult",
    "EtcdClient",
    "EtcdError",
    "EtcdStatus",
    "EtcdUnavailable",
    "EventType",
    "GetResult",
    "KeyValue",
    "LeaderKey",
    "LeaseInfo",
    "LeaseKeepAlive",
    "LeaseNotFound",
    "NotLeader",
    "Op",
    "OpResult",
    "PutResult",
    "TxnResult",
    "WatchCompacted",
    "WatchEvent",
    "prefix_range_end",
]
