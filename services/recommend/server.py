"""gRPC servicer of the recommend service: maps RPCs onto the recommend domain.

RPCs not built yet answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

from steward.recommend.v1 import recommend_pb2_grpc

from services.common.context import ServiceContext, ServiceParts
from services.common.server import ServiceRegistration


class RecommendServicer(recommend_pb2_grpc.RecommendServiceServicer):
    """steward.recommend.v1.RecommendService."""

    def __init__(self, context: ServiceContext) -> None:
        self._context = context


def build(context: ServiceContext) -> ServiceParts:
    """The recommend service's parts, ready for the process to run."""
    return ServiceParts(
        [
            ServiceRegistration(
                "steward.recommend.v1.RecommendService",
                recommend_pb2_grpc.add_RecommendServiceServicer_to_server,
                RecommendServicer(context),  # type: ignore[abstract]  # RPCs not built yet  # type: ignore[abstract]  # RPCs not built yet: UNIMPLEMENTED
            )
        ]
    )
