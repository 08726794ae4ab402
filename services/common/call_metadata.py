"""Client interceptors that add entries to every outgoing call's metadata, whatever its shape.

Two kinds of entry travel this way: the current trace context (``traceparent``, see
services/common/telemetry.py) and a bearer token (services/common/channels.py). Each says what
to add in :meth:`AddedMetadata.entries`; this base applies it to all four call shapes.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import grpc

MetadataEntry = tuple[str, str | bytes]


class CallDetails(grpc.ClientCallDetails):
    """A call's details with other metadata (grpc's own class cannot be built outside it)."""

    def __init__(
        self, details: grpc.ClientCallDetails, metadata: tuple[MetadataEntry, ...]
    ) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class AddedMetadata(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    """Adds :meth:`entries` to the metadata of every call, unary or streaming."""

    @abstractmethod
    def entries(self) -> Sequence[MetadataEntry]:
        """What to add to this call (evaluated per call: a trace context changes)."""

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        added = self.entries()
        if not added:
            return details
        return CallDetails(details, (*(details.metadata or ()), *added))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)
