"""OpenTelemetry wiring: a span per RPC and per agent operation, counters of VMs and placements.

Exporters are chosen by configuration: "none" (default), "console", or "otlp"
(the standard OTEL_EXPORTER_OTLP_* environment variables say where).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from vmm.store.v1 import records_pb2
from vmm.v1 import vm_pb2

EXPORTERS = ("none", "console", "otlp")


def _exporters(kind: str) -> tuple[SpanExporter | None, MetricReader | None]:
    if kind == "console":
        return ConsoleSpanExporter(), PeriodicExportingMetricReader(ConsoleMetricExporter())
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(), PeriodicExportingMetricReader(OTLPMetricExporter())
    return None, None


class Telemetry:
    """Tracer and instruments of one controller process."""

    def __init__(self, service_name: str = "vmm-controller", exporter: str = "none") -> None:
        if exporter not in EXPORTERS:
            raise ValueError(f"telemetry exporter must be one of {', '.join(EXPORTERS)}")
        resource = Resource.create({"service.name": service_name})
        span_exporter, reader = _exporters(exporter)
        self.tracer_provider = TracerProvider(resource=resource)
        if span_exporter is not None:
            self.tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter))
        self.meter_provider = MeterProvider(resource=resource,
                                            metric_readers=[reader] if reader else [])
        self.tracer = self.tracer_provider.get_tracer("vmm.controller")
        meter = self.meter_provider.get_meter("vmm.controller")
        self.vms_by_state = meter.create_up_down_counter(
            "vmm.vms", unit="{vm}", description="VMs by observed state")
        self.placements = meter.create_counter(
            "vmm.placements", unit="{placement}", description="VM placements by host and backend")
        self.placement_conflicts = meter.create_counter(
            "vmm.placement.conflicts", unit="{retry}",
            description="placement commits retried because a host's allocation changed")

    def vm_state_changed(self, old: vm_pb2.VmState.ValueType,
                         new: vm_pb2.VmState.ValueType) -> None:
        if old:
            self.vms_by_state.add(-1, {"state": vm_pb2.VmState.Name(old)})
        if new:
            self.vms_by_state.add(1, {"state": vm_pb2.VmState.Name(new)})

    def vm_deleted(self, record: records_pb2.VmRecord) -> None:
        if record.status.state:
            self.vms_by_state.add(-1, {"state": vm_pb2.VmState.Name(record.status.state)})

    def placed(self, host_id: str, backend: str) -> None:
        self.placements.add(1, {"host": host_id, "backend": backend})

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


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
