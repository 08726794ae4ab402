"""gRPC servicers of the consent service: map RPCs onto the consent domain.

RPCs not built yet answer UNIMPLEMENTED through the generated base classes.
"""

from __future__ import annotations

from typing import Any

from steward.consent.v1 import audit_pb2_grpc, consent_pb2_grpc

from services.common.context import ServiceContext, ServiceParts
from services.common.server import ServiceRegistration


class ConsentServicer(consent_pb2_grpc.ConsentServiceServicer):
    """steward.consent.v1.ConsentService."""

    def __init__(self, context: ServiceContext) -> None:
        self._context = context


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """steward.consent.v1.AuditService: read-only access to the consent ledger."""

    def __init__(self, context: ServiceContext) -> None:
        self._context = context


def build(context: ServiceContext) -> ServiceParts:
    """The consent service's parts, ready for the process to run."""
    registrations: list[ServiceRegistration[Any]] = [
        ServiceRegistration(
            "steward.consent.v1.ConsentService",
            consent_pb2_grpc.add_ConsentServiceServicer_to_server,
            ConsentServicer(context),  # type: ignore[abstract]  # RPCs not built yet: UNIMPLEMENTED
        ),
        ServiceRegistration(
            "steward.consent.v1.AuditService",
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
            AuditServicer(context),  # type: ignore[abstract]  # RPCs not built yet: UNIMPLEMENTED
        ),
    ]
    return ServiceParts(registrations)
