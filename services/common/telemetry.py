"""OpenTelemetry tracing and metrics for a Steward process.

Providers are built per process and passed down rather than installed globally by default, so
tests can run several in-process services side by side, each with its own in-memory exporter.
Nothing touches the network unless ``OTEL_EXPORTER_OTLP_ENDPOINT`` is configured.

Every span processor is wrapped in ``RedactingSpanProcessor``: span attributes must never carry
raw identifiers, and a filter at the single exit point holds even when instrumentation we do not
control (gRPC status descriptions, recorded exceptions) would let one through.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, cast

import grpc
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.grpc import (
    client_interceptor as otel_client_interceptor,
)
from opentelemetry.instrumentation.grpc import (
    server_interceptor as otel_server_interceptor,
)
from opentelemetry.instrumentation.grpc.filters import health_check, negate
from opentelemetry.instrumentation.grpc.grpcext import intercept_channel
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_NAMESPACE, Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, Sampler
from opentelemetry.trace import Link, Status
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import Attributes, AttributeValue

from services.common.call_metadata import AddedMetadata
from services.common.interceptors import BehaviourInterceptor, StreamBehaviour, UnaryBehaviour
from services.common.redaction import is_identifier, names_identifier, redact_text

if TYPE_CHECKING:
    from opentelemetry.context import Context

    from services.common.config import Settings

REDACTED_COUNT_ATTRIBUTE: Final = "steward.redacted_attributes"
"""Set on a span (only when non-zero) to the number of attributes removed or scrubbed."""


@dataclass(slots=True)
class Telemetry:
    """The providers of one process; pass it to whatever creates tracers, meters or channels."""

    service_name: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    recording: bool = True
    """Whether spans are recorded (an exporter, or a sampler asked for, is configured)."""
    _shut_down: bool = field(default=False, repr=False)

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    def shutdown(self) -> None:
        """Flush and stop exporting; safe to call more than once."""
        if self._shut_down:
            return
        self._shut_down = True
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def setup_telemetry(
    settings: Settings,
    service_name: str,
    *,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
    install_global: bool = False,
) -> Telemetry:
    """Build tracer and meter providers for ``service_name``.

    ``span_exporter`` (exported synchronously, as tests need) and ``metric_reader`` are added
    alongside OTLP export, which is enabled only by ``settings.otlp_endpoint``. Without either,
    spans are not recorded (nothing would read them; recording costs about a tenth of a cheap
    call's CPU) but still carry trace context from caller to callee. The sampler is otherwise the
    SDK's, so ``OTEL_TRACES_SAMPLER`` (e.g. ``parentbased_traceidratio``) applies as documented.
    ``install_global`` also makes them the process-wide providers, which OpenTelemetry allows
    only once per process.
    """
    resource = Resource.create({SERVICE_NAME: service_name, SERVICE_NAMESPACE: "steward"})
    exported = span_exporter is not None or bool(settings.otlp_endpoint)
    sampler: Sampler | None = None
    if not exported and not os.environ.get("OTEL_TRACES_SAMPLER"):
        sampler = ALWAYS_OFF
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    readers: list[MetricReader] = []
    if span_exporter is not None:
        tracer_provider.add_span_processor(
            RedactingSpanProcessor(SimpleSpanProcessor(span_exporter))
        )
    if metric_reader is not None:
        readers.append(metric_reader)
    if settings.otlp_endpoint:
        # Imported here so a process without an endpoint never loads the exporter stack.
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(
            RedactingSpanProcessor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint))
            )
        )
        readers.append(
            PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=settings.otlp_endpoint))
        )
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)
    if install_global:
        trace.set_tracer_provider(tracer_provider)
        metrics.set_meter_provider(meter_provider)
    return Telemetry(service_name, tracer_provider, meter_provider, recording=sampler is None)


_NOT_HEALTH_CHECK: Final[Callable[[Any], bool]] = negate(health_check())


def traced_call_filter(call_details: object) -> bool:
    """Whether a gRPC call gets a span: every call except health checks.

    Orchestrators probe health every few seconds; tracing those would drown real traffic.
    """
    return _NOT_HEALTH_CHECK(call_details)


def server_interceptor(telemetry: Telemetry) -> grpc.ServerInterceptor[Any, Any]:
    """Server interceptor creating a span per RPC on ``telemetry``'s tracer provider.

    When spans are not recorded, OpenTelemetry's interceptor would still build each call's
    attributes and a span nobody reads (about 50 us of a cheap call's 400): then
    :class:`TraceContextInterceptor` only carries the caller's trace context into the handler,
    so log lines and outgoing calls stay in the caller's trace.
    """
    if not telemetry.recording:
        return TraceContextInterceptor()
    return cast(
        "grpc.ServerInterceptor[Any, Any]",
        otel_server_interceptor(  # type: ignore[no-untyped-call]
            tracer_provider=telemetry.tracer_provider, filter_=traced_call_filter
        ),
    )


_TRACE_HEADERS: Final = frozenset(TraceContextTextMapPropagator().fields)


class TraceContextInterceptor(BehaviourInterceptor):
    """Runs each handler in the trace context its caller sent (W3C ``traceparent``), if any."""

    def __init__(self) -> None:
        super().__init__()
        self._propagator = TraceContextTextMapPropagator()

    def _caller_context(self, context: grpc.ServicerContext) -> Context | None:
        carrier = {
            key: value
            for key, value in context.invocation_metadata()
            if key in _TRACE_HEADERS and isinstance(value, str)
        }
        return self._propagator.extract(carrier) if carrier else None

    def wrap_unary(self, behaviour: UnaryBehaviour, method: str) -> UnaryBehaviour:
        def traced(request: Any, context: grpc.ServicerContext) -> Any:
            caller = self._caller_context(context)
            if caller is None:
                return behaviour(request, context)
            token = otel_context.attach(caller)
            try:
                return behaviour(request, context)
            finally:
                otel_context.detach(token)

        return traced

    def wrap_stream(self, behaviour: StreamBehaviour, method: str) -> StreamBehaviour:
        def traced(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            caller = self._caller_context(context)
            if caller is None:
                yield from behaviour(request, context)
                return
            token = otel_context.attach(caller)
            try:
                yield from behaviour(request, context)
            finally:
                otel_context.detach(token)

        return traced


def client_interceptor(telemetry: Telemetry) -> object:
    """Client interceptor (all four call shapes) that starts spans and propagates context.

    It follows OpenTelemetry's own interceptor interface, not grpc's, so apply it with
    ``instrument_channel`` rather than ``grpc.intercept_channel``.
    """
    interceptor: object = otel_client_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider=telemetry.tracer_provider, filter_=traced_call_filter
    )
    return interceptor


def instrument_channel(channel: grpc.Channel, telemetry: Telemetry) -> grpc.Channel:
    """``channel`` with client spans, so one request shows as one trace across services.

    When spans are not recorded, calls only carry the current trace context to the callee
    (:class:`TraceContextClientInterceptor`), as the server side does.
    """
    if not telemetry.recording:
        return grpc.intercept_channel(channel, TraceContextClientInterceptor())
    intercepted = intercept_channel(  # type: ignore[no-untyped-call]
        channel, client_interceptor(telemetry)
    )
    return cast(grpc.Channel, intercepted)


class TraceContextClientInterceptor(AddedMetadata):
    """Adds the current trace context (W3C ``traceparent``) to every call's metadata."""

    def __init__(self) -> None:
        self._propagator = TraceContextTextMapPropagator()

    def entries(self) -> list[tuple[str, str]]:
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        return list(carrier.items())


class RedactingSpanProcessor(SpanProcessor):
    """Forwards each ended span to ``wrapped`` with raw identifiers taken out.

    From span, event and link attributes it removes any attribute whose name says it holds an
    identifier and any string value that is itself an email or phone number; identifiers
    embedded in longer text (exception messages, status descriptions) are replaced by a
    placeholder so the rest stays useful. Spans with nothing to redact pass through unchanged;
    the others are rebuilt as a new ReadableSpan (ended spans are immutable) carrying
    ``steward.redacted_attributes``. Only string values are inspected: a phone number stored as
    an integer has already lost its shape. The rebuilt span reports no dropped counts.
    """

    def __init__(self, wrapped: SpanProcessor) -> None:
        self._wrapped = wrapped

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        self._wrapped.on_start(span, parent_context=parent_context)

    def _on_ending(self, span: Span) -> None:
        self._wrapped._on_ending(span)

    def on_end(self, span: ReadableSpan) -> None:
        self._wrapped.on_end(redact_span(span))

    def shutdown(self) -> None:
        self._wrapped.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._wrapped.force_flush(timeout_millis)


def redact_span(span: ReadableSpan) -> ReadableSpan:
    """``span`` without raw identifiers (see RedactingSpanProcessor); unchanged if clean."""
    attributes, redacted = redact_attributes(span.attributes)
    events: list[Event] = []
    for event in span.events:
        event_attributes, count = redact_attributes(event.attributes)
        redacted += count
        events.append(
            event
            if not count
            else Event(event.name, attributes=event_attributes, timestamp=event.timestamp)
        )
    links: list[Link] = []
    for link in span.links:
        link_attributes, count = redact_attributes(link.attributes)
        redacted += count
        links.append(link if not count else Link(link.context, attributes=link_attributes))
    status = span.status
    if status.description and (description := redact_text(status.description)) != (
        status.description
    ):
        redacted += 1
        status = Status(status.status_code, description)
    if not redacted:
        return span
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes={**attributes, REDACTED_COUNT_ATTRIBUTE: redacted},
        events=events,
        links=links,
        kind=span.kind,
        status=status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


def redact_attributes(
    attributes: Attributes,
) -> tuple[dict[str, AttributeValue], int]:
    """A copy of ``attributes`` without raw identifiers, and how many were removed or scrubbed."""
    kept: dict[str, AttributeValue] = {}
    redacted = 0
    for key, value in (attributes or {}).items():
        if names_identifier(key):
            redacted += 1
            continue
        cleaned = _redact_value(value)
        if cleaned is not value:
            redacted += 1
        if cleaned is not None:
            kept[key] = cleaned
    return kept, redacted


def _redact_value(value: AttributeValue) -> AttributeValue | None:
    """``value`` itself if clean, None if it is an identifier, else a scrubbed copy."""
    if isinstance(value, str):
        if is_identifier(value):
            return None
        scrubbed = redact_text(value)
        return value if scrubbed == value else scrubbed
    if isinstance(value, Sequence) and any(isinstance(item, str) for item in value):
        items = cast(Sequence[str], value)
        scrubbed_items = tuple(redact_text(item) for item in items)
        return value if scrubbed_items == tuple(items) else scrubbed_items
    return value
