from vmm.agent.v1 import agent_pb2 as _agent_pb2
from vmm.v1 import host_pb2 as _host_pb2
from vmm.v1 import vm_pb2 as _vm_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VmRecord(_message.Message):
    __slots__ = ("vm_id", "config", "backend", "host_id", "generation", "desired_state", "shutdown", "reboot_epoch", "force_reboot", "simulated", "reserved", "created_timestamp", "modified_timestamp", "warnings", "status", "deleting", "force_delete")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    DESIRED_STATE_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    REBOOT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FORCE_REBOOT_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    RESERVED_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DELETING_FIELD_NUMBER: _ClassVar[int]
    FORCE_DELETE_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    config: _vm_pb2.VmConfig
    backend: str
    host_id: str
    generation: int
    desired_state: _vm_pb2.VmState
    shutdown: _agent_pb2.ShutdownPolicy
    reboot_epoch: int
    force_reboot: bool
    simulated: bool
    reserved: _host_pb2.Resources
    created_timestamp: int
    modified_timestamp: int
    warnings: _containers.RepeatedScalarFieldContainer[str]
    status: _agent_pb2.VmStatus
    deleting: bool
    force_delete: bool
    def __init__(self, vm_id: _Optional[str] = ..., config: _Optional[_Union[_vm_pb2.VmConfig, _Mapping]] = ..., backend: _Optional[str] = ..., host_id: _Optional[str] = ..., generation: _Optional[int] = ..., desired_state: _Optional[_Union[_vm_pb2.VmState, str]] = ..., shutdown: _Optional[_Union[_agent_pb2.ShutdownPolicy, _Mapping]] = ..., reboot_epoch: _Optional[int] = ..., force_reboot: _Optional[bool] = ..., simulated: _Optional[bool] = ..., reserved: _Optional[_Union[_host_pb2.Resources, _Mapping]] = ..., created_timestamp: _Optional[int] = ..., modified_timestamp: _Optional[int] = ..., warnings: _Optional[_Iterable[str]] = ..., status: _Optional[_Union[_agent_pb2.VmStatus, _Mapping]] = ..., deleting: _Optional[bool] = ..., force_delete: _Optional[bool] = ...) -> None: ...

class HostRecord(_message.Message):
    __slots__ = ("host_id", "hostname", "capacity", "cpu_overcommit_ratio", "memory_overcommit_ratio", "backends", "labels", "agent_version", "registered_timestamp")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    CPU_OVERCOMMIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEMORY_OVERCOMMIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    hostname: str
    capacity: _host_pb2.Resources
    cpu_overcommit_ratio: float
    memory_overcommit_ratio: float
    backends: _containers.RepeatedCompositeFieldContainer[_host_pb2.Backend]
    labels: _containers.ScalarMap[str, str]
    agent_version: str
    registered_timestamp: int
    def __init__(self, host_id: _Optional[str] = ..., hostname: _Optional[str] = ..., capacity: _Optional[_Union[_host_pb2.Resources, _Mapping]] = ..., cpu_overcommit_ratio: _Optional[float] = ..., memory_overcommit_ratio: _Optional[float] = ..., backends: _Optional[_Iterable[_Union[_host_pb2.Backend, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., registered_timestamp: _Optional[int] = ...) -> None: ...

class Allocation(_message.Message):
    __slots__ = ("allocated", "vm_count")
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    VM_COUNT_FIELD_NUMBER: _ClassVar[int]
    allocated: _host_pb2.Resources
    vm_count: int
    def __init__(self, allocated: _Optional[_Union[_host_pb2.Resources, _Mapping]] = ..., vm_count: _Optional[int] = ...) -> None: ...
