from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.common.config import Settings
from services.common.telemetry import (
    REDACTED_COUNT_ATTRIBUTE,
    Telemetry,
    TraceContextInterceptor,
    instrument_channel,
    server_interceptor,
    setup_telemetry,
    traced_call_filter,
)

SETTINGS = Settings.from_env({})


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def telemetry(exporter: InMemorySpanExporter) -> Iterator[Telemetry]:
    telemetry = setup_telemetry(SETTINGS, "consent", span_exporter=exporter)
    yield telemetry
    telemetry.shutdown()


def _only_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    (span,) = exporter.get_finished_spans()
    return span


def test_identifier_attributes_never_reach_the_exporter(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    with telemetry.tracer("test").start_as_current_span("Collect") as span:
        span.set_attribute("user.email", "alice@example.com")
        span.set_attribute("contact", "+44 7700 900123")
        span.set_attribute("customer", "bob@example.org")
        span.set_attribute("rpc.method", "Collect")
        span.set_attribute("steward.batch_size", 500)
        span.set_attribute("steward.purposes", ["analytics", "marketing"])

    exported = _only_span(exporter)
    attributes = dict(exported.attributes or {})
    assert "user.email" not in attributes
    assert "contact" not in attributes
    assert "customer" not in attributes
    assert attributes["rpc.method"] == "Collect"
    assert attributes["steward.batch_size"] == 500
    assert attributes["steward.purposes"] == ("analytics", "marketing")
    assert attributes[REDACTED_COUNT_ATTRIBUTE] == 3
    assert "alice@example.com" not in exported.to_json()
    assert "7700" not in exported.to_json()


def test_identifiers_inside_text_are_scrubbed_and_the_rest_kept(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    with telemetry.tracer("test").start_as_current_span("Resolve") as span:
        span.set_attribute("note", "merged alice@example.com into p-42")
        span.set_attribute("aliases", ["x", "07700 900123"])
        span.add_event("lookup", {"identifier.value": "07700900123", "candidates": 2})
        span.record_exception(ValueError("no person for carol@example.net"))
        span.set_status(Status(StatusCode.ERROR, "unknown carol@example.net"))

    exported = _only_span(exporter)
    attributes = dict(exported.attributes or {})
    assert attributes["note"] == "merged [redacted] into p-42"
    assert attributes["aliases"] == ("x", "[redacted]")
    lookup, exception = exported.events
    assert dict(lookup.attributes or {}) == {"candidates": 2}
    assert dict(exception.attributes or {})["exception.type"] == "ValueError"
    assert "carol@example.net" not in exported.to_json()
    assert exported.status.description == "unknown [redacted]"
    assert exported.status.status_code is StatusCode.ERROR
    redacted_count = attributes[REDACTED_COUNT_ATTRIBUTE]
    assert isinstance(redacted_count, int) and redacted_count >= 5


def test_clean_spans_pass_through_untouched(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    tracer = telemetry.tracer("test")
    with tracer.start_as_current_span("parent", kind=SpanKind.SERVER) as parent:
        parent.set_attribute("steward.events", 1234567)
        with tracer.start_as_current_span("child"):
            pass

    child, parent_span = exporter.get_finished_spans()
    assert REDACTED_COUNT_ATTRIBUTE not in (parent_span.attributes or {})
    assert parent_span.attributes == {"steward.events": 1234567}
    assert parent_span.kind is SpanKind.SERVER
    assert child.parent is not None
    assert child.parent.span_id == parent_span.context.span_id
    assert parent_span.resource.attributes["service.name"] == "consent"


def test_redacted_copy_keeps_identity_timing_and_parentage(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    tracer = telemetry.tracer("test")
    with tracer.start_as_current_span("parent"), tracer.start_as_current_span("child") as child:
        child.set_attribute("phone", "n/a")

    redacted_child, parent = exporter.get_finished_spans()
    assert redacted_child.name == "child"
    assert redacted_child.parent is not None
    assert redacted_child.parent.span_id == parent.context.span_id
    assert redacted_child.context.trace_id == parent.context.trace_id
    assert redacted_child.start_time is not None and redacted_child.end_time is not None
    assert redacted_child.instrumentation_scope is not None
    assert redacted_child.instrumentation_scope.name == "test"
    assert redacted_child.resource.attributes["service.name"] == "consent"


def test_metrics_carry_the_service_name() -> None:
    reader = InMemoryMetricReader()
    telemetry = setup_telemetry(SETTINGS, "tagging", metric_reader=reader)
    telemetry.meter("test").create_counter("steward.tags.granted").add(3)

    data = reader.get_metrics_data()
    telemetry.shutdown()
    telemetry.shutdown()

    assert data is not None
    (resource_metrics,) = data.resource_metrics
    assert resource_metrics.resource.attributes["service.name"] == "tagging"
    (metric,) = resource_metrics.scope_metrics[0].metrics
    assert metric.name == "steward.tags.granted"


class _CallDetails(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_health_checks_are_not_traced() -> None:
    assert not traced_call_filter(_CallDetails("/grpc.health.v1.Health/Check"))
    assert not traced_call_filter(_CallDetails("/grpc.health.v1.Health/Watch"))
    assert traced_call_filter(_CallDetails("/steward.consent.v1.ConsentService/Collect"))


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def test_interceptors_trace_one_call_across_client_and_server(
    telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[server_interceptor(telemetry)]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(_echo)}
            )
        ]
    )
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as raw_channel:
            channel = instrument_channel(raw_channel, telemetry)
            assert channel.unary_unary("/test.Echo/Say", None, None)(b"hi", timeout=5) == b"hi"
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        server.stop(None)

    spans = exporter.get_finished_spans()
    assert sorted(span.kind.name for span in spans) == ["CLIENT", "SERVER"]
    assert {span.name for span in spans} == {"/test.Echo/Say"}
    client = next(span for span in spans if span.kind is SpanKind.CLIENT)
    server_span = next(span for span in spans if span.kind is SpanKind.SERVER)
    assert server_span.context.trace_id == client.context.trace_id


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsSink(metrics_service_pb2_grpc.MetricsServiceServicer):
    def Export(self, request: Any, context: Any) -> Any:
        return metrics_service_pb2.ExportMetricsServiceResponse()


def test_otlp_export_goes_through_redaction() -> None:
    collector = _Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(  # type: ignore[no-untyped-call]
        collector, server
    )
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        _MetricsSink(), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = Settings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"})
        telemetry = setup_telemetry(settings, "identity")
        with telemetry.tracer("test").start_as_current_span("Resolve") as span:
            span.set_attribute("user.email", "alice@example.com")
            span.set_attribute("steward.identifiers", 2)
        telemetry.shutdown()
    finally:
        server.stop(None)

    exported = [
        span
        for request in collector.requests
        for resource_spans in request.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    (otlp_span,) = exported
    keys = {attribute.key for attribute in otlp_span.attributes}
    assert keys == {"steward.identifiers", REDACTED_COUNT_ATTRIBUTE}
    assert b"alice@example.com" not in collector.requests[0].SerializeToString()


def test_spans_are_not_recorded_when_nothing_exports_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    telemetry = setup_telemetry(Settings.from_env({}), "steward-test")
    tracer = telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("parent") as parent:
        assert not parent.is_recording()
        # Still a valid context, so callees join the caller's trace.
        assert parent.get_span_context().is_valid
        with tracer.start_as_current_span("child") as child:
            assert child.get_span_context().trace_id == parent.get_span_context().trace_id


def test_the_standard_sampler_variable_overrides_not_recording(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    telemetry = setup_telemetry(Settings.from_env({}), "steward-test")
    with telemetry.tracer_provider.get_tracer("test").start_as_current_span("span") as span:
        assert span.is_recording()


def test_spans_are_recorded_when_an_exporter_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(Settings.from_env({}), "steward-test", span_exporter=exporter)
    with telemetry.tracer_provider.get_tracer("test").start_as_current_span("span"):
        pass
    assert [span.name for span in exporter.get_finished_spans()] == ["span"]


def test_without_recording_handlers_still_run_in_the_callers_trace(
    monkeypatch: pytest.MonkeyPatch, telemetry: Telemetry, exporter: InMemorySpanExporter
) -> None:
    """The caller records (an exporter); the server does not: the server's handlers see the
    caller's trace id, in unary and streaming calls, and calls without one work as well."""
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    quiet = setup_telemetry(SETTINGS, "identity")
    interceptor = server_interceptor(quiet)
    assert isinstance(interceptor, TraceContextInterceptor)
    seen: list[int] = []

    def current_trace() -> int:
        return trace.get_current_span().get_span_context().trace_id

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(current_trace())
        return request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        seen.append(current_trace())
        yield request
        seen.append(current_trace())
        yield request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo",
                {
                    "Say": grpc.unary_unary_rpc_method_handler(unary),
                    "Repeat": grpc.unary_stream_rpc_method_handler(stream),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as raw_channel:
            channel = instrument_channel(raw_channel, telemetry)
            assert channel.unary_unary("/test.Echo/Say", None, None)(b"hi", timeout=5) == b"hi"
            assert list(channel.unary_stream("/test.Echo/Repeat", None, None)(b"x", timeout=5)) == [
                b"x",
                b"x",
            ]
            plain = raw_channel.unary_unary("/test.Echo/Say", None, None)
            assert plain(b"bare", timeout=5) == b"bare"
    finally:
        server.stop(None)

    callers = {
        span.name: span.context.trace_id
        for span in exporter.get_finished_spans()
        if span.kind is SpanKind.CLIENT
    }
    assert seen == [
        callers["/test.Echo/Say"],
        callers["/test.Echo/Repeat"],
        callers["/test.Echo/Repeat"],
        0,  # no caller context: no trace, and nothing failed
    ]


def test_without_recording_clients_carry_the_current_trace_to_the_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    quiet = setup_telemetry(SETTINGS, "consent")
    seen: list[int] = []

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        seen.append(trace.get_current_span().get_span_context().trace_id)
        return request

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2), interceptors=[server_interceptor(quiet)]
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(unary)}
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    caller = trace.NonRecordingSpan(
        trace.SpanContext(trace_id, 0x00F067AA0BA902B7, is_remote=False)
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as raw_channel:
            say = instrument_channel(raw_channel, quiet).unary_unary("/test.Echo/Say", None, None)
            with trace.use_span(caller):
                assert say(b"hi", timeout=5, metadata=(("x-steward-caller", "test"),)) == b"hi"
            assert say(b"no trace", timeout=5) == b"no trace"
    finally:
        server.stop(None)
    assert seen == [trace_id, 0]
