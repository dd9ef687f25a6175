"""Telemetry of one controller process: OpenTelemetry spans, Prometheus metrics.

Spans: one per RPC and per agent operation, exported as configured: "none" (default),
"console", or "otlp" (the standard OTEL_EXPORTER_OTLP_* environment variables say where).

Metrics live in one Prometheus registry per process, served at /metrics on the HTTP port
(controller/health_http.py). Events are counted here as they happen (placements, their
latency and conflicts, observed state changes); gauges of the fleet are computed at scrape
time from memory by controller/metrics.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.registry import Collector

from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2

EXPORTERS = ("none", "console", "otlp")

# The outcomes observe_placement() records; anything else is counted as "error".
PLACEMENT_OUTCOMES = ("placed", "exhausted", "conflicted", "error")
# Placement is a scheduler pass, an agent preflight round trip and an etcd transaction.
PLACEMENT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0)


def _span_exporter(kind: str) -> SpanExporter | None:
    if kind == "console":
        return ConsoleSpanExporter()
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    return None


def state_label(state: vm_pb2.VmState.ValueType) -> str:
    """RUNNING for VM_STATE_RUNNING."""
    return vm_pb2.VmState.Name(state).removeprefix("VM_STATE_")


class CounterAdder:
    """A Prometheus counter behind the OpenTelemetry counter's add(amount, attributes)."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter

    def add(self, amount: int | float = 1, attributes: Mapping[str, str] | None = None) -> None:
        target = self.counter.labels(**attributes) if attributes else self.counter
        target.inc(amount)


class Telemetry:
    """Tracer, metrics registry and event instruments of one controller process."""

    def __init__(self, service_name: str = "vmm-controller", exporter: str = "none") -> None:
        if exporter not in EXPORTERS:
            raise ValueError(f"telemetry exporter must be one of {', '.join(EXPORTERS)}")
        resource = Resource.create({"service.name": service_name})
        span_exporter = _span_exporter(exporter)
        self.tracer_provider = TracerProvider(resource=resource)
        # Spans nobody exports are not built: they cost about 5 % of a busy controller's CPU.
        self.tracing = span_exporter is not None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        if span_exporter is not None:
            self.tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
            self.tracer = self.tracer_provider.get_tracer("vmm.controller")

        # No *_created series: they would double the series of every labelled counter.
        disable_created_metrics()
        # Its own registry, not prometheus_client's global one: what /metrics serves is
        # exactly this controller's.
        self.registry = CollectorRegistry(auto_describe=True)
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)
        self.placement_seconds = Histogram(
            "vmm_placement_duration_seconds",
            "Time to place a new VM: scheduling, agent preflight and the etcd commit",
            ["outcome"], buckets=PLACEMENT_BUCKETS, registry=self.registry)
        for outcome in PLACEMENT_OUTCOMES:
            self.placement_seconds.labels(outcome=outcome)
        self.placements = Counter(
            "vmm_placements", "VMs placed, by host and backend", ["host_id", "backend"],
            registry=self.registry)
        self.placement_conflicts = CounterAdder(Counter(
            "vmm_placement_conflicts",
            "Placement commits retried because the host's allocation changed meanwhile",
            registry=self.registry))
        self.vm_state_changes = Counter(
            "vmm_vm_state_changes",
            "Observed state changes reported by the agents connected to this controller, "
            "by the state entered", ["state"], registry=self.registry)
        self.vm_deletions = Counter(
            "vmm_vm_deletions", "VMs removed from their host and forgotten",
            registry=self.registry)
        self.sessions_opened = Counter(
            "vmm_agent_sessions_opened", "Agent sessions registered on this controller",
            registry=self.registry)
        self.sessions_closed = Counter(
            "vmm_agent_sessions_closed",
            "Agent sessions that ended on this controller (stream closed or replaced)",
            registry=self.registry)

    def register_collector(self, collector: Collector) -> None:
        """Add a scrape-time collector (controller.metrics.ControllerCollector)."""
        self.registry.register(collector)

    def observe_placement(self, seconds: float, outcome: str = "placed") -> None:
        """One placement decision and commit took `seconds`. outcome is one of
        PLACEMENT_OUTCOMES: placed; exhausted (no host fits); conflicted (the commit lost to
        another writer of the host's allocation); error (anything else: preflight refused,
        etcd unreachable). Other values count as error."""
        if outcome not in PLACEMENT_OUTCOMES:
            outcome = "error"
        self.placement_seconds.labels(outcome=outcome).observe(seconds)

    def vm_state_changed(self, old: vm_pb2.VmState.ValueType,
                         new: vm_pb2.VmState.ValueType) -> None:
        if new and new != old:
            self.vm_state_changes.labels(state=state_label(new)).inc()

    def vm_deleted(self, record: records_pb2.VmRecord) -> None:
        self.vm_deletions.inc()

    def placed(self, host_id: str, backend: str) -> None:
        self.placements.labels(host_id=host_id, backend=backend).inc()

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A server span around every RPC, named after the method, with the status code."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            # Streams (agent sessions, watches) live for hours: a span per message
            # would be noise; their operations get spans of their own.
            return handler
        method = handler_call_details.method
        tracer = self.tracer
        inner = handler.unary_unary

        async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with tracer.start_as_current_span(method, kind=trace.SpanKind.SERVER) as span:
                span.set_attribute("rpc.system", "grpc")
                span.set_attribute("rpc.method", method)
                vm_id = getattr(request, "vm_id", "")
                if vm_id:
                    span.set_attribute("vmm.vm_id", vm_id)
                try:
                    return await inner(request, context)
                finally:
                    code = context.code()
                    span.set_attribute("rpc.grpc.status_code",
                                       code.value[0] if isinstance(code, grpc.StatusCode) else 0)

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
