"""vmm.v1.VmService: validate, record desired state in etcd, wait for the agent's report.

One servicer composed of one mixin per concern; they share a VmOperations and a Placer."""

from __future__ import annotations

from collections.abc import Callable

from controller.access import Access
from controller.agent_hub import AgentHub
from controller.api.console import ConsoleRpcs
from controller.api.devices import DeviceRpcs
from controller.api.lifecycle import LifecycleRpcs
from controller.api.migration import MigrationRpcs
from controller.api.operations import VmOperations, VmServiceSettings
from controller.api.reads import ReadRpcs
from controller.fleet import Fleet
from controller.networks import Networks
from controller.placement import Placer
from controller.store import Store
from controller.telemetry import Telemetry
from controller.vm_cache import VmCache
from vmm.v1 import vm_pb2_grpc


class VmService(LifecycleRpcs, ReadRpcs, DeviceRpcs, MigrationRpcs, ConsoleRpcs,
                vm_pb2_grpc.VmServiceServicer):
    def __init__(self, store: Store, cache: VmCache, hub: AgentHub, fleet: Fleet,
                 telemetry: Telemetry, settings: VmServiceSettings | None = None,
                 networks: Networks | None = None,
                 access: Callable[[], Access | None] = lambda: None) -> None:
        self.ops = VmOperations(store, cache, hub, fleet, telemetry,
                                settings or VmServiceSettings(), access)
        self.networks = networks or Networks(store)
        self.placer = Placer(self.ops)
