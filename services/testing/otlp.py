"""A small OTLP/gRPC collector for tests and benchmarks: what Steward processes export.

Services started as processes of their own (``steward serve``) export their spans and metrics
only by OTLP, to ``OTEL_EXPORTER_OTLP_ENDPOINT``. Pointing that at :class:`OtlpCollector` lets a
test read exactly what would leave the suite for Jaeger or an OpenTelemetry collector: the
export requests as the services' own exporters encoded them. Each request is handed to
``on_export`` as it arrives (to be scanned, say) and counted; none is kept unless asked.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

ExportHandler = Callable[[str, bytes], None]
"""Called with ``"spans"`` or ``"metrics"`` and the serialized export request."""


@dataclass
class OtlpCollector:
    """Serves OTLP's trace and metrics Export on ``127.0.0.1`` at a free port while running."""

    on_export: ExportHandler | None = None
    keep: bool = False
    """Keep every request (``requests``); for short runs."""
    spans: int = 0
    metric_exports: int = 0
    requests: list[tuple[str, bytes]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: grpc.Server | None = None
    port: int = 0

    @property
    def endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (plain text, as the scheme says)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpCollector:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handlers = {
            "opentelemetry.proto.collector.trace.v1.TraceService": {
                "Export": self._handler("spans", trace_service_pb2.ExportTraceServiceResponse())
            },
            "opentelemetry.proto.collector.metrics.v1.MetricsService": {
                "Export": self._handler(
                    "metrics", metrics_service_pb2.ExportMetricsServiceResponse()
                )
            },
        }
        for service, methods in handlers.items():
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(service, methods),)
            )
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(1).wait()
            self._server = None

    def __enter__(self) -> OtlpCollector:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _handler(self, kind: str, answer: Any) -> grpc.RpcMethodHandler[bytes, bytes]:
        reply = answer.SerializeToString()

        def export(request: bytes, _context: grpc.ServicerContext) -> bytes:
            self._received(kind, request)
            return bytes(reply)

        return grpc.unary_unary_rpc_method_handler(
            export, request_deserializer=None, response_serializer=None
        )

    def _received(self, kind: str, request: bytes) -> None:
        count = 0
        if kind == "spans":
            parsed = trace_service_pb2.ExportTraceServiceRequest.FromString(request)
            count = sum(
                len(scope.spans)
                for resource in parsed.resource_spans
                for scope in resource.scope_spans
            )
        with self._lock:
            if kind == "spans":
                self.spans += count
            else:
                self.metric_exports += 1
            if self.keep:
                self.requests.append((kind, request))
        if self.on_export is not None:
            self.on_export(kind, request)
