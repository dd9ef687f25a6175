from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HostHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOST_HEALTH_UNSPECIFIED: _ClassVar[HostHealth]
    HOST_HEALTH_READY: _ClassVar[HostHealth]
    HOST_HEALTH_DEGRADED: _ClassVar[HostHealth]
    HOST_HEALTH_DOWN: _ClassVar[HostHealth]

class Support(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SUPPORT_UNSPECIFIED: _ClassVar[Support]
    SUPPORT_FULL: _ClassVar[Support]
    SUPPORT_PARTIAL: _ClassVar[Support]
    SUPPORT_IGNORED: _ClassVar[Support]
    SUPPORT_NONE: _ClassVar[Support]
HOST_HEALTH_UNSPECIFIED: HostHealth
HOST_HEALTH_READY: HostHealth
HOST_HEALTH_DEGRADED: HostHealth
HOST_HEALTH_DOWN: HostHealth
SUPPORT_UNSPECIFIED: Support
SUPPORT_FULL: Support
SUPPORT_PARTIAL: Support
SUPPORT_IGNORED: Support
SUPPORT_NONE: Support

class Resources(_message.Message):
    __slots__ = ("vcpus", "memory_bytes")
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    vcpus: int
    memory_bytes: int
    def __init__(self, vcpus: _Optional[int] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class Host(_message.Message):
    __slots__ = ("host_id", "hostname", "health", "health_detail", "capacity", "allocatable", "allocated", "cpu_overcommit_ratio", "memory_overcommit_ratio", "backends", "vm_count", "last_heartbeat_timestamp", "registered_timestamp", "labels", "agent_version", "metrics")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_DETAIL_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    ALLOCATABLE_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_FIELD_NUMBER: _ClassVar[int]
    CPU_OVERCOMMIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    MEMORY_OVERCOMMIT_RATIO_FIELD_NUMBER: _ClassVar[int]
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    VM_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    hostname: str
    health: HostHealth
    health_detail: str
    capacity: Resources
    allocatable: Resources
    allocated: Resources
    cpu_overcommit_ratio: float
    memory_overcommit_ratio: float
    backends: _containers.RepeatedCompositeFieldContainer[Backend]
    vm_count: int
    last_heartbeat_timestamp: int
    registered_timestamp: int
    labels: _containers.ScalarMap[str, str]
    agent_version: str
    metrics: HostMetrics
    def __init__(self, host_id: _Optional[str] = ..., hostname: _Optional[str] = ..., health: _Optional[_Union[HostHealth, str]] = ..., health_detail: _Optional[str] = ..., capacity: _Optional[_Union[Resources, _Mapping]] = ..., allocatable: _Optional[_Union[Resources, _Mapping]] = ..., allocated: _Optional[_Union[Resources, _Mapping]] = ..., cpu_overcommit_ratio: _Optional[float] = ..., memory_overcommit_ratio: _Optional[float] = ..., backends: _Optional[_Iterable[_Union[Backend, _Mapping]]] = ..., vm_count: _Optional[int] = ..., last_heartbeat_timestamp: _Optional[int] = ..., registered_timestamp: _Optional[int] = ..., labels: _Optional[_Mapping[str, str]] = ..., agent_version: _Optional[str] = ..., metrics: _Optional[_Union[HostMetrics, _Mapping]] = ...) -> None: ...

class HostMetrics(_message.Message):
    __slots__ = ("cpu_usage_percent", "memory_used_bytes", "memory_available_bytes", "load_average_1m", "agent_rss_bytes")
    CPU_USAGE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOAD_AVERAGE_1M_FIELD_NUMBER: _ClassVar[int]
    AGENT_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    cpu_usage_percent: float
    memory_used_bytes: int
    memory_available_bytes: int
    load_average_1m: float
    agent_rss_bytes: int
    def __init__(self, cpu_usage_percent: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., load_average_1m: _Optional[float] = ..., agent_rss_bytes: _Optional[int] = ...) -> None: ...

class Backend(_message.Message):
    __slots__ = ("name", "simulated", "version", "binary_path", "capabilities")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BINARY_PATH_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    name: str
    simulated: bool
    version: str
    binary_path: str
    capabilities: BackendCapabilities
    def __init__(self, name: _Optional[str] = ..., simulated: _Optional[bool] = ..., version: _Optional[str] = ..., binary_path: _Optional[str] = ..., capabilities: _Optional[_Union[BackendCapabilities, _Mapping]] = ...) -> None: ...

class Feature(_message.Message):
    __slots__ = ("name", "support", "detail", "category", "title")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    name: str
    support: Support
    detail: str
    category: str
    title: str
    def __init__(self, name: _Optional[str] = ..., support: _Optional[_Union[Support, str]] = ..., detail: _Optional[str] = ..., category: _Optional[str] = ..., title: _Optional[str] = ...) -> None: ...

class BackendLimits(_message.Message):
    __slots__ = ("min_vcpus", "max_vcpus", "min_memory_bytes", "max_memory_bytes", "max_disks", "max_nics")
    MIN_VCPUS_FIELD_NUMBER: _ClassVar[int]
    MAX_VCPUS_FIELD_NUMBER: _ClassVar[int]
    MIN_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DISKS_FIELD_NUMBER: _ClassVar[int]
    MAX_NICS_FIELD_NUMBER: _ClassVar[int]
    min_vcpus: int
    max_vcpus: int
    min_memory_bytes: int
    max_memory_bytes: int
    max_disks: int
    max_nics: int
    def __init__(self, min_vcpus: _Optional[int] = ..., max_vcpus: _Optional[int] = ..., min_memory_bytes: _Optional[int] = ..., max_memory_bytes: _Optional[int] = ..., max_disks: _Optional[int] = ..., max_nics: _Optional[int] = ...) -> None: ...

class BackendCapabilities(_message.Message):
    __slots__ = ("backend", "limits", "features")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    backend: str
    limits: BackendLimits
    features: _containers.RepeatedCompositeFieldContainer[Feature]
    def __init__(self, backend: _Optional[str] = ..., limits: _Optional[_Union[BackendLimits, _Mapping]] = ..., features: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ...) -> None: ...

class ListHostsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListHostsResponse(_message.Message):
    __slots__ = ("hosts",)
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    hosts: _containers.RepeatedCompositeFieldContainer[Host]
    def __init__(self, hosts: _Optional[_Iterable[_Union[Host, _Mapping]]] = ...) -> None: ...

class GetHostRequest(_message.Message):
    __slots__ = ("host_id",)
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    host_id: str
    def __init__(self, host_id: _Optional[str] = ...) -> None: ...

class GetHostResponse(_message.Message):
    __slots__ = ("host",)
    HOST_FIELD_NUMBER: _ClassVar[int]
    host: Host
    def __init__(self, host: _Optional[_Union[Host, _Mapping]] = ...) -> None: ...

class GetBackendCapabilitiesRequest(_message.Message):
    __slots__ = ("backend",)
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    backend: str
    def __init__(self, backend: _Optional[str] = ...) -> None: ...

class GetBackendCapabilitiesResponse(_message.Message):
    __slots__ = ("backends",)
    BACKENDS_FIELD_NUMBER: _ClassVar[int]
    backends: _containers.RepeatedCompositeFieldContainer[BackendCapabilities]
    def __init__(self, backends: _Optional[_Iterable[_Union[BackendCapabilities, _Mapping]]] = ...) -> None: ...
