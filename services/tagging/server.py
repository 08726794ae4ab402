"""gRPC servicer of the tagging service: maps RPCs onto the tagging domain.

RPCs not built yet answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

from steward.tagging.v1 import tagging_pb2_grpc

from services.common.context import ServiceContext, ServiceParts
from services.common.server import ServiceRegistration


class TaggingServicer(tagging_pb2_grpc.TaggingServiceServicer):
    """steward.tagging.v1.TaggingService."""

    def __init__(self, context: ServiceContext) -> None:
        self._context = context


def build(context: ServiceContext) -> ServiceParts:
    """The tagging service's parts, ready for the process to run."""
    return ServiceParts(
        [
            ServiceRegistration(
                "steward.tagging.v1.TaggingService",
                tagging_pb2_grpc.add_TaggingServiceServicer_to_server,
                TaggingServicer(context),  # type: ignore[abstract]  # RPCs not built yet  # type: ignore[abstract]  # RPCs not built yet: UNIMPLEMENTED
            )
        ]
    )
