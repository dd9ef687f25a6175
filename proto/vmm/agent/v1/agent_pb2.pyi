from vmm.v1 import host_pb2 as _host_pb2
from vmm.v1 import vm_pb2 as _vm_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ConnectRequest(_message.Message):
    __slots__ = ("register", "heartbeat", "vm_status", "reply")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    VM_STATUS_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    register: Register
    heartbeat: Heartbeat
    vm_status: VmStatus
    reply: Reply
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., vm_status: _Optional[_Union[VmStatus, _Mapping]] = ..., reply: _Optional[_Union[Reply, _Mapping]] = ...) -> None: ...

class Register(_message.Message):
    __slots__ = ("host_id", "hostname", "capacity", "cpu_overcommit_ratio", "memory_overcommit_ratio", "backends", "vms", "agent_version", "labels")
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
    VMS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    hostname: str
    capacity: _host_pb2.Resources
    cpu_overcommit_ratio: float
    memory_overcommit_ratio: float
    backends: _containers.RepeatedCompositeFieldContainer[_host_pb2.Backend]
    vms: _containers.RepeatedCompositeFieldContainer[VmStatus]
    agent_version: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, host_id: _Optional[str] = ..., hostname: _Optional[str] = ..., capacity: _Optional[_Union[_host_pb2.Resources, _Mapping]] = ..., cpu_overcommit_ratio: _Optional[float] = ..., memory_overcommit_ratio: _Optional[float] = ..., backends: _Optional[_Iterable[_Union[_host_pb2.Backend, _Mapping]]] = ..., vms: _Optional[_Iterable[_Union[VmStatus, _Mapping]]] = ..., agent_version: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("health", "health_detail", "metrics", "vms")
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_DETAIL_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    VMS_FIELD_NUMBER: _ClassVar[int]
    health: _host_pb2.HostHealth
    health_detail: str
    metrics: _host_pb2.HostMetrics
    vms: _containers.RepeatedCompositeFieldContainer[VmStatus]
    def __init__(self, health: _Optional[_Union[_host_pb2.HostHealth, str]] = ..., health_detail: _Optional[str] = ..., metrics: _Optional[_Union[_host_pb2.HostMetrics, _Mapping]] = ..., vms: _Optional[_Iterable[_Union[VmStatus, _Mapping]]] = ...) -> None: ...

class VmStatus(_message.Message):
    __slots__ = ("vm_id", "observed_generation", "state", "reason", "error", "error_code", "pid", "metrics", "backend_info", "backend", "reboot_epoch", "config", "removed")
    class BackendInfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_INFO_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REBOOT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    observed_generation: int
    state: _vm_pb2.VmState
    reason: str
    error: str
    error_code: str
    pid: int
    metrics: _vm_pb2.VmMetrics
    backend_info: _containers.ScalarMap[str, str]
    backend: str
    reboot_epoch: int
    config: _vm_pb2.VmConfig
    removed: bool
    def __init__(self, vm_id: _Optional[str] = ..., observed_generation: _Optional[int] = ..., state: _Optional[_Union[_vm_pb2.VmState, str]] = ..., reason: _Optional[str] = ..., error: _Optional[str] = ..., error_code: _Optional[str] = ..., pid: _Optional[int] = ..., metrics: _Optional[_Union[_vm_pb2.VmMetrics, _Mapping]] = ..., backend_info: _Optional[_Mapping[str, str]] = ..., backend: _Optional[str] = ..., reboot_epoch: _Optional[int] = ..., config: _Optional[_Union[_vm_pb2.VmConfig, _Mapping]] = ..., removed: _Optional[bool] = ...) -> None: ...

class ConnectResponse(_message.Message):
    __slots__ = ("desired_state", "desired_vm", "remove_vm", "request")
    DESIRED_STATE_FIELD_NUMBER: _ClassVar[int]
    DESIRED_VM_FIELD_NUMBER: _ClassVar[int]
    REMOVE_VM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    desired_state: DesiredState
    desired_vm: DesiredVm
    remove_vm: RemoveVm
    request: Request
    def __init__(self, desired_state: _Optional[_Union[DesiredState, _Mapping]] = ..., desired_vm: _Optional[_Union[DesiredVm, _Mapping]] = ..., remove_vm: _Optional[_Union[RemoveVm, _Mapping]] = ..., request: _Optional[_Union[Request, _Mapping]] = ...) -> None: ...

class DesiredState(_message.Message):
    __slots__ = ("vms",)
    VMS_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[DesiredVm]
    def __init__(self, vms: _Optional[_Iterable[_Union[DesiredVm, _Mapping]]] = ...) -> None: ...

class ShutdownPolicy(_message.Message):
    __slots__ = ("force", "timeout_seconds")
    FORCE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    force: bool
    timeout_seconds: int
    def __init__(self, force: _Optional[bool] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class DesiredVm(_message.Message):
    __slots__ = ("vm_id", "generation", "config", "backend", "power_state", "shutdown", "reboot_epoch", "force_reboot")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    POWER_STATE_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    REBOOT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    FORCE_REBOOT_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    generation: int
    config: _vm_pb2.VmConfig
    backend: str
    power_state: _vm_pb2.VmState
    shutdown: ShutdownPolicy
    reboot_epoch: int
    force_reboot: bool
    def __init__(self, vm_id: _Optional[str] = ..., generation: _Optional[int] = ..., config: _Optional[_Union[_vm_pb2.VmConfig, _Mapping]] = ..., backend: _Optional[str] = ..., power_state: _Optional[_Union[_vm_pb2.VmState, str]] = ..., shutdown: _Optional[_Union[ShutdownPolicy, _Mapping]] = ..., reboot_epoch: _Optional[int] = ..., force_reboot: _Optional[bool] = ...) -> None: ...

class RemoveVm(_message.Message):
    __slots__ = ("vm_id", "force")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    force: bool
    def __init__(self, vm_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class Request(_message.Message):
    __slots__ = ("request_id", "preflight", "console_log", "console_stream", "cancel", "hotplug")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PREFLIGHT_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_LOG_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_STREAM_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    HOTPLUG_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    preflight: PreflightRequest
    console_log: ConsoleLogRequest
    console_stream: ConsoleStreamRequest
    cancel: CancelRequest
    hotplug: HotplugRequest
    def __init__(self, request_id: _Optional[str] = ..., preflight: _Optional[_Union[PreflightRequest, _Mapping]] = ..., console_log: _Optional[_Union[ConsoleLogRequest, _Mapping]] = ..., console_stream: _Optional[_Union[ConsoleStreamRequest, _Mapping]] = ..., cancel: _Optional[_Union[CancelRequest, _Mapping]] = ..., hotplug: _Optional[_Union[HotplugRequest, _Mapping]] = ...) -> None: ...

class PreflightRequest(_message.Message):
    __slots__ = ("vm_id", "config", "backend")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    config: _vm_pb2.VmConfig
    backend: str
    def __init__(self, vm_id: _Optional[str] = ..., config: _Optional[_Union[_vm_pb2.VmConfig, _Mapping]] = ..., backend: _Optional[str] = ...) -> None: ...

class ConsoleLogRequest(_message.Message):
    __slots__ = ("vm_id", "tail_lines")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    tail_lines: int
    def __init__(self, vm_id: _Optional[str] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class ConsoleStreamRequest(_message.Message):
    __slots__ = ("vm_id", "tail_lines")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    tail_lines: int
    def __init__(self, vm_id: _Optional[str] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class HotplugRequest(_message.Message):
    __slots__ = ("vm_id", "resize", "attach_disk", "detach_disk", "attach_nic", "detach_nic")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    ATTACH_DISK_FIELD_NUMBER: _ClassVar[int]
    DETACH_DISK_FIELD_NUMBER: _ClassVar[int]
    ATTACH_NIC_FIELD_NUMBER: _ClassVar[int]
    DETACH_NIC_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    resize: _vm_pb2.ResizeVmRequest
    attach_disk: _vm_pb2.StorageDevice
    detach_disk: str
    attach_nic: _vm_pb2.NetworkInterface
    detach_nic: str
    def __init__(self, vm_id: _Optional[str] = ..., resize: _Optional[_Union[_vm_pb2.ResizeVmRequest, _Mapping]] = ..., attach_disk: _Optional[_Union[_vm_pb2.StorageDevice, _Mapping]] = ..., detach_disk: _Optional[str] = ..., attach_nic: _Optional[_Union[_vm_pb2.NetworkInterface, _Mapping]] = ..., detach_nic: _Optional[str] = ...) -> None: ...

class FieldViolation(_message.Message):
    __slots__ = ("field", "description")
    FIELD_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    field: str
    description: str
    def __init__(self, field: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class Reply(_message.Message):
    __slots__ = ("request_id", "error_code", "error", "violations", "console_log", "console_chunk", "hotplug", "more")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    VIOLATIONS_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_LOG_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    HOTPLUG_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    error_code: str
    error: str
    violations: _containers.RepeatedCompositeFieldContainer[FieldViolation]
    console_log: ConsoleLogResult
    console_chunk: ConsoleChunk
    hotplug: HotplugResult
    more: bool
    def __init__(self, request_id: _Optional[str] = ..., error_code: _Optional[str] = ..., error: _Optional[str] = ..., violations: _Optional[_Iterable[_Union[FieldViolation, _Mapping]]] = ..., console_log: _Optional[_Union[ConsoleLogResult, _Mapping]] = ..., console_chunk: _Optional[_Union[ConsoleChunk, _Mapping]] = ..., hotplug: _Optional[_Union[HotplugResult, _Mapping]] = ..., more: _Optional[bool] = ...) -> None: ...

class ConsoleLogResult(_message.Message):
    __slots__ = ("text", "truncated")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    text: str
    truncated: bool
    def __init__(self, text: _Optional[str] = ..., truncated: _Optional[bool] = ...) -> None: ...

class ConsoleChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class HotplugResult(_message.Message):
    __slots__ = ("config", "state")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    config: _vm_pb2.VmConfig
    state: _vm_pb2.VmState
    def __init__(self, config: _Optional[_Union[_vm_pb2.VmConfig, _Mapping]] = ..., state: _Optional[_Union[_vm_pb2.VmState, str]] = ...) -> None: ...
