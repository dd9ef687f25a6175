from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class VmState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VM_STATE_UNSPECIFIED: _ClassVar[VmState]
    VM_STATE_CREATED: _ClassVar[VmState]
    VM_STATE_RUNNING: _ClassVar[VmState]
    VM_STATE_PAUSED: _ClassVar[VmState]
    VM_STATE_SHUTDOWN: _ClassVar[VmState]
    VM_STATE_FAILED: _ClassVar[VmState]
    VM_STATE_UNKNOWN: _ClassVar[VmState]

class VmEventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VM_EVENT_TYPE_UNSPECIFIED: _ClassVar[VmEventType]
    VM_EVENT_TYPE_EXISTING: _ClassVar[VmEventType]
    VM_EVENT_TYPE_CREATED: _ClassVar[VmEventType]
    VM_EVENT_TYPE_UPDATED: _ClassVar[VmEventType]
    VM_EVENT_TYPE_DELETED: _ClassVar[VmEventType]
VM_STATE_UNSPECIFIED: VmState
VM_STATE_CREATED: VmState
VM_STATE_RUNNING: VmState
VM_STATE_PAUSED: VmState
VM_STATE_SHUTDOWN: VmState
VM_STATE_FAILED: VmState
VM_STATE_UNKNOWN: VmState
VM_EVENT_TYPE_UNSPECIFIED: VmEventType
VM_EVENT_TYPE_EXISTING: VmEventType
VM_EVENT_TYPE_CREATED: VmEventType
VM_EVENT_TYPE_UPDATED: VmEventType
VM_EVENT_TYPE_DELETED: VmEventType

class VmConfig(_message.Message):
    __slots__ = ("cpu", "memory", "boot", "storage", "network", "console", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CPU_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    BOOT_FIELD_NUMBER: _ClassVar[int]
    STORAGE_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    cpu: CpuConfig
    memory: MemoryConfig
    boot: BootConfig
    storage: _containers.RepeatedCompositeFieldContainer[StorageDevice]
    network: _containers.RepeatedCompositeFieldContainer[NetworkInterface]
    console: ConsoleConfig
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, cpu: _Optional[_Union[CpuConfig, _Mapping]] = ..., memory: _Optional[_Union[MemoryConfig, _Mapping]] = ..., boot: _Optional[_Union[BootConfig, _Mapping]] = ..., storage: _Optional[_Iterable[_Union[StorageDevice, _Mapping]]] = ..., network: _Optional[_Iterable[_Union[NetworkInterface, _Mapping]]] = ..., console: _Optional[_Union[ConsoleConfig, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CpuConfig(_message.Message):
    __slots__ = ("vcpu_count", "max_vcpu_count", "topology", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MAX_VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    vcpu_count: int
    max_vcpu_count: int
    topology: CpuTopology
    features: _containers.ScalarMap[str, str]
    def __init__(self, vcpu_count: _Optional[int] = ..., max_vcpu_count: _Optional[int] = ..., topology: _Optional[_Union[CpuTopology, _Mapping]] = ..., features: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CpuTopology(_message.Message):
    __slots__ = ("sockets", "cores_per_socket", "threads_per_core")
    SOCKETS_FIELD_NUMBER: _ClassVar[int]
    CORES_PER_SOCKET_FIELD_NUMBER: _ClassVar[int]
    THREADS_PER_CORE_FIELD_NUMBER: _ClassVar[int]
    sockets: int
    cores_per_socket: int
    threads_per_core: int
    def __init__(self, sockets: _Optional[int] = ..., cores_per_socket: _Optional[int] = ..., threads_per_core: _Optional[int] = ...) -> None: ...

class MemoryConfig(_message.Message):
    __slots__ = ("size_bytes", "hotplug_enabled", "max_size_bytes", "backing")
    class BackingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOTPLUG_ENABLED_FIELD_NUMBER: _ClassVar[int]
    MAX_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BACKING_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    hotplug_enabled: bool
    max_size_bytes: int
    backing: _containers.ScalarMap[str, str]
    def __init__(self, size_bytes: _Optional[int] = ..., hotplug_enabled: _Optional[bool] = ..., max_size_bytes: _Optional[int] = ..., backing: _Optional[_Mapping[str, str]] = ...) -> None: ...

class BootConfig(_message.Message):
    __slots__ = ("kernel_path", "initrd_path", "kernel_args", "boot_options")
    class BootOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    KERNEL_PATH_FIELD_NUMBER: _ClassVar[int]
    INITRD_PATH_FIELD_NUMBER: _ClassVar[int]
    KERNEL_ARGS_FIELD_NUMBER: _ClassVar[int]
    BOOT_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    kernel_path: str
    initrd_path: str
    kernel_args: str
    boot_options: _containers.ScalarMap[str, str]
    def __init__(self, kernel_path: _Optional[str] = ..., initrd_path: _Optional[str] = ..., kernel_args: _Optional[str] = ..., boot_options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class StorageDevice(_message.Message):
    __slots__ = ("id", "path", "read_only", "is_root_device", "interface_type", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    IS_ROOT_DEVICE_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    path: str
    read_only: bool
    is_root_device: bool
    interface_type: str
    options: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., path: _Optional[str] = ..., read_only: _Optional[bool] = ..., is_root_device: _Optional[bool] = ..., interface_type: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class NetworkInterface(_message.Message):
    __slots__ = ("id", "mac_address", "tap_device", "interface_type", "options")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MAC_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TAP_DEVICE_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_TYPE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    mac_address: str
    tap_device: str
    interface_type: str
    options: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., mac_address: _Optional[str] = ..., tap_device: _Optional[str] = ..., interface_type: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ConsoleConfig(_message.Message):
    __slots__ = ("enabled", "output", "input", "console_type")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    CONSOLE_TYPE_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    output: str
    input: str
    console_type: str
    def __init__(self, enabled: _Optional[bool] = ..., output: _Optional[str] = ..., input: _Optional[str] = ..., console_type: _Optional[str] = ...) -> None: ...

class CreateVmRequest(_message.Message):
    __slots__ = ("vm_id", "config", "backend", "host_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    config: VmConfig
    backend: str
    host_id: str
    def __init__(self, vm_id: _Optional[str] = ..., config: _Optional[_Union[VmConfig, _Mapping]] = ..., backend: _Optional[str] = ..., host_id: _Optional[str] = ...) -> None: ...

class CreateVmResponse(_message.Message):
    __slots__ = ("vm_id", "state", "warnings", "placement")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    state: VmState
    warnings: _containers.RepeatedScalarFieldContainer[str]
    placement: Placement
    def __init__(self, vm_id: _Optional[str] = ..., state: _Optional[_Union[VmState, str]] = ..., warnings: _Optional[_Iterable[str]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ...) -> None: ...

class DeleteVmRequest(_message.Message):
    __slots__ = ("vm_id", "force")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    force: bool
    def __init__(self, vm_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteVmResponse(_message.Message):
    __slots__ = ("success",)
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    success: bool
    def __init__(self, success: _Optional[bool] = ...) -> None: ...

class BootVmRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class BootVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class ShutdownVmRequest(_message.Message):
    __slots__ = ("vm_id", "force", "timeout_seconds")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    force: bool
    timeout_seconds: int
    def __init__(self, vm_id: _Optional[str] = ..., force: _Optional[bool] = ..., timeout_seconds: _Optional[int] = ...) -> None: ...

class ShutdownVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class PauseVmRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class PauseVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class ResumeVmRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class ResumeVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class RebootVmRequest(_message.Message):
    __slots__ = ("vm_id", "force")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    force: bool
    def __init__(self, vm_id: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class RebootVmResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class GetVmInfoRequest(_message.Message):
    __slots__ = ("vm_id",)
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    def __init__(self, vm_id: _Optional[str] = ...) -> None: ...

class GetVmInfoResponse(_message.Message):
    __slots__ = ("vm_id", "config", "state", "metrics", "backend_info", "placement", "state_reason", "desired_state", "generation", "observed_generation", "created_timestamp", "modified_timestamp")
    class BackendInfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_INFO_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    DESIRED_STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    OBSERVED_GENERATION_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    config: VmConfig
    state: VmState
    metrics: VmMetrics
    backend_info: _containers.ScalarMap[str, str]
    placement: Placement
    state_reason: str
    desired_state: VmState
    generation: int
    observed_generation: int
    created_timestamp: int
    modified_timestamp: int
    def __init__(self, vm_id: _Optional[str] = ..., config: _Optional[_Union[VmConfig, _Mapping]] = ..., state: _Optional[_Union[VmState, str]] = ..., metrics: _Optional[_Union[VmMetrics, _Mapping]] = ..., backend_info: _Optional[_Mapping[str, str]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., state_reason: _Optional[str] = ..., desired_state: _Optional[_Union[VmState, str]] = ..., generation: _Optional[int] = ..., observed_generation: _Optional[int] = ..., created_timestamp: _Optional[int] = ..., modified_timestamp: _Optional[int] = ...) -> None: ...

class ListVmsRequest(_message.Message):
    __slots__ = ("state_filter", "page_size", "page_token")
    STATE_FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    state_filter: _containers.RepeatedScalarFieldContainer[VmState]
    page_size: int
    page_token: str
    def __init__(self, state_filter: _Optional[_Iterable[_Union[VmState, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListVmsResponse(_message.Message):
    __slots__ = ("vms", "next_page_token", "total_count")
    VMS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_COUNT_FIELD_NUMBER: _ClassVar[int]
    vms: _containers.RepeatedCompositeFieldContainer[VmInfo]
    next_page_token: str
    total_count: int
    def __init__(self, vms: _Optional[_Iterable[_Union[VmInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total_count: _Optional[int] = ...) -> None: ...

class VmInfo(_message.Message):
    __slots__ = ("vm_id", "state", "vcpu_count", "memory_size_bytes", "created_timestamp", "modified_timestamp", "metadata", "placement", "state_reason")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    STATE_REASON_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    state: VmState
    vcpu_count: int
    memory_size_bytes: int
    created_timestamp: int
    modified_timestamp: int
    metadata: _containers.ScalarMap[str, str]
    placement: Placement
    state_reason: str
    def __init__(self, vm_id: _Optional[str] = ..., state: _Optional[_Union[VmState, str]] = ..., vcpu_count: _Optional[int] = ..., memory_size_bytes: _Optional[int] = ..., created_timestamp: _Optional[int] = ..., modified_timestamp: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ..., placement: _Optional[_Union[Placement, _Mapping]] = ..., state_reason: _Optional[str] = ...) -> None: ...

class VmMetrics(_message.Message):
    __slots__ = ("cpu_usage_percent", "memory_usage_bytes", "network_stats", "storage_stats", "uptime_seconds")
    CPU_USAGE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_STATS_FIELD_NUMBER: _ClassVar[int]
    STORAGE_STATS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    cpu_usage_percent: float
    memory_usage_bytes: int
    network_stats: NetworkStats
    storage_stats: StorageStats
    uptime_seconds: int
    def __init__(self, cpu_usage_percent: _Optional[float] = ..., memory_usage_bytes: _Optional[int] = ..., network_stats: _Optional[_Union[NetworkStats, _Mapping]] = ..., storage_stats: _Optional[_Union[StorageStats, _Mapping]] = ..., uptime_seconds: _Optional[int] = ...) -> None: ...

class NetworkStats(_message.Message):
    __slots__ = ("bytes_received", "bytes_transmitted", "packets_received", "packets_transmitted")
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_TRANSMITTED_FIELD_NUMBER: _ClassVar[int]
    PACKETS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PACKETS_TRANSMITTED_FIELD_NUMBER: _ClassVar[int]
    bytes_received: int
    bytes_transmitted: int
    packets_received: int
    packets_transmitted: int
    def __init__(self, bytes_received: _Optional[int] = ..., bytes_transmitted: _Optional[int] = ..., packets_received: _Optional[int] = ..., packets_transmitted: _Optional[int] = ...) -> None: ...

class StorageStats(_message.Message):
    __slots__ = ("bytes_read", "bytes_written", "read_operations", "write_operations")
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    READ_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    WRITE_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    bytes_read: int
    bytes_written: int
    read_operations: int
    write_operations: int
    def __init__(self, bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., read_operations: _Optional[int] = ..., write_operations: _Optional[int] = ...) -> None: ...

class Placement(_message.Message):
    __slots__ = ("host_id", "backend", "simulated")
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    backend: str
    simulated: bool
    def __init__(self, host_id: _Optional[str] = ..., backend: _Optional[str] = ..., simulated: _Optional[bool] = ...) -> None: ...

class WatchVmsRequest(_message.Message):
    __slots__ = ("vm_ids", "state_filter")
    VM_IDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FILTER_FIELD_NUMBER: _ClassVar[int]
    vm_ids: _containers.RepeatedScalarFieldContainer[str]
    state_filter: _containers.RepeatedScalarFieldContainer[VmState]
    def __init__(self, vm_ids: _Optional[_Iterable[str]] = ..., state_filter: _Optional[_Iterable[_Union[VmState, str]]] = ...) -> None: ...

class WatchVmsResponse(_message.Message):
    __slots__ = ("type", "vm", "revision")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VM_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    type: VmEventType
    vm: VmInfo
    revision: int
    def __init__(self, type: _Optional[_Union[VmEventType, str]] = ..., vm: _Optional[_Union[VmInfo, _Mapping]] = ..., revision: _Optional[int] = ...) -> None: ...

class ResizeVmRequest(_message.Message):
    __slots__ = ("vm_id", "vcpu_count", "memory_size_bytes")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    vcpu_count: int
    memory_size_bytes: int
    def __init__(self, vm_id: _Optional[str] = ..., vcpu_count: _Optional[int] = ..., memory_size_bytes: _Optional[int] = ...) -> None: ...

class ResizeVmResponse(_message.Message):
    __slots__ = ("success", "state", "vcpu_count", "memory_size_bytes")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VCPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    vcpu_count: int
    memory_size_bytes: int
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ..., vcpu_count: _Optional[int] = ..., memory_size_bytes: _Optional[int] = ...) -> None: ...

class AttachDiskRequest(_message.Message):
    __slots__ = ("vm_id", "device")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    device: StorageDevice
    def __init__(self, vm_id: _Optional[str] = ..., device: _Optional[_Union[StorageDevice, _Mapping]] = ...) -> None: ...

class AttachDiskResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class DetachDiskRequest(_message.Message):
    __slots__ = ("vm_id", "device_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    device_id: str
    def __init__(self, vm_id: _Optional[str] = ..., device_id: _Optional[str] = ...) -> None: ...

class DetachDiskResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class AttachNetworkInterfaceRequest(_message.Message):
    __slots__ = ("vm_id", "interface")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    interface: NetworkInterface
    def __init__(self, vm_id: _Optional[str] = ..., interface: _Optional[_Union[NetworkInterface, _Mapping]] = ...) -> None: ...

class AttachNetworkInterfaceResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class DetachNetworkInterfaceRequest(_message.Message):
    __slots__ = ("vm_id", "interface_id")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    INTERFACE_ID_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    interface_id: str
    def __init__(self, vm_id: _Optional[str] = ..., interface_id: _Optional[str] = ...) -> None: ...

class DetachNetworkInterfaceResponse(_message.Message):
    __slots__ = ("success", "state")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    state: VmState
    def __init__(self, success: _Optional[bool] = ..., state: _Optional[_Union[VmState, str]] = ...) -> None: ...

class GetConsoleLogRequest(_message.Message):
    __slots__ = ("vm_id", "tail_lines")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    tail_lines: int
    def __init__(self, vm_id: _Optional[str] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class GetConsoleLogResponse(_message.Message):
    __slots__ = ("text", "truncated")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    text: str
    truncated: bool
    def __init__(self, text: _Optional[str] = ..., truncated: _Optional[bool] = ...) -> None: ...

class StreamConsoleRequest(_message.Message):
    __slots__ = ("vm_id", "tail_lines")
    VM_ID_FIELD_NUMBER: _ClassVar[int]
    TAIL_LINES_FIELD_NUMBER: _ClassVar[int]
    vm_id: str
    tail_lines: int
    def __init__(self, vm_id: _Optional[str] = ..., tail_lines: _Optional[int] = ...) -> None: ...

class StreamConsoleResponse(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
