"""Transaction builders and results: the guards (Compare), the operations (Op) and what
each operation returned."""

from __future__ import annotations

from dataclasses import dataclass, field

from controller.etcd.values import KeyValue, encode_key, prefix_range_end
from vmm.etcd import rpc_pb2


class Compare:
    """One guard of a transaction, built by comparing a key's field with a value.

        Compare.mod_revision(key) == 42      # unchanged since revision 42 (CAS)
        Compare.create_revision(key) == 0    # the key does not exist
        Compare.version(key) > 0             # the key exists
        Compare.value(key) == b"x"
    """

    __slots__ = ("pb",)

    def __init__(self, pb: rpc_pb2.Compare) -> None:
        self.pb = pb

    @staticmethod
    def version(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.VERSION, "version")

    @staticmethod
    def create_revision(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.CREATE, "create_revision")

    @staticmethod
    def mod_revision(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.MOD, "mod_revision")

    @staticmethod
    def value(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.VALUE, "value")

    @staticmethod
    def lease(key: str) -> CompareTarget:
        return CompareTarget(key, rpc_pb2.Compare.LEASE, "lease")

    @staticmethod
    def absent(key: str) -> Compare:
        """The key does not exist."""
        return Compare.create_revision(key) == 0

    def __repr__(self) -> str:
        return f"Compare({self.pb})"


class CompareTarget:
    """A key's field awaiting the comparison that turns it into a `Compare`."""

    __slots__ = ("_field", "_key", "_target")

    def __init__(self, key: str, target: int, field_name: str) -> None:
        self._key = key
        self._target = target
        self._field = field_name

    def _compare(self, result: int, operand: object) -> Compare:
        wants_bytes = self._field == "value"
        if wants_bytes != isinstance(operand, bytes) or isinstance(operand, bool):
            kind = "bytes" if wants_bytes else "an int"
            raise TypeError(f"{self._field} compares with {kind}, not {operand!r}")
        pb = rpc_pb2.Compare(result=result, target=self._target, key=encode_key(self._key))  # type: ignore[arg-type]
        setattr(pb, self._field, operand)
        return Compare(pb)

    # The comparison operators build guards rather than answer questions.
    def __eq__(self, operand: object) -> Compare:  # type: ignore[override]
        return self._compare(rpc_pb2.Compare.EQUAL, operand)

    def __ne__(self, operand: object) -> Compare:  # type: ignore[override]
        return self._compare(rpc_pb2.Compare.NOT_EQUAL, operand)

    def __gt__(self, operand: object) -> Compare:
        return self._compare(rpc_pb2.Compare.GREATER, operand)

    def __lt__(self, operand: object) -> Compare:
        return self._compare(rpc_pb2.Compare.LESS, operand)

    __hash__ = None  # type: ignore[assignment]


class Op:
    """One operation of a transaction branch."""

    __slots__ = ("pb",)

    def __init__(self, pb: rpc_pb2.RequestOp) -> None:
        self.pb = pb

    @staticmethod
    def get(key: str) -> Op:
        return Op(rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=encode_key(key))))

    @staticmethod
    def get_prefix(prefix: str) -> Op:
        raw = encode_key(prefix)
        return Op(rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(
            key=raw, range_end=prefix_range_end(raw))))

    @staticmethod
    def put(key: str, value: bytes, lease: int = 0) -> Op:
        return Op(rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(
            key=encode_key(key), value=value, lease=lease)))

    @staticmethod
    def delete(key: str) -> Op:
        return Op(rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(
            key=encode_key(key))))

    @staticmethod
    def delete_prefix(prefix: str) -> Op:
        raw = encode_key(prefix)
        return Op(rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(
            key=raw, range_end=prefix_range_end(raw))))

    def __repr__(self) -> str:
        return f"Op({self.pb})"


@dataclass(frozen=True)
class GetResult:
    kvs: list[KeyValue]


@dataclass(frozen=True)
class PutResult:
    pass


@dataclass(frozen=True)
class DeleteResult:
    deleted: int


OpResult = GetResult | PutResult | DeleteResult


@dataclass(frozen=True)
class TxnResult:
    # Whether every compare held, so the success branch ran.
    succeeded: bool
    # The store's revision after the transaction.
    revision: int
    # One result per operation of the branch that ran, in order.
    responses: list[OpResult] = field(default_factory=list)


def op_result(response: rpc_pb2.ResponseOp) -> OpResult:
    kind = response.WhichOneof("response")
    if kind == "response_range":
        return GetResult([KeyValue.from_pb(kv) for kv in response.response_range.kvs])
    if kind == "response_delete_range":
        return DeleteResult(response.response_delete_range.deleted)
    return PutResult()
