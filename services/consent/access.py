"""What the other services hold about a person, for a data-subject access export.

Consent answers ExportSubjectData for the whole suite: its own history and events, identity's
person (identifiers in hashed form, with their sources), and — from the services deployed —
tagging's tags with their explanations and objections and recommend's interactions and the
answers last shown. An export must be complete, so a deployed service that cannot answer fails
the export (UNAVAILABLE) rather than leaving its part out silently.
"""

from __future__ import annotations

import grpc
from steward.recommend.v1 import recommend_pb2, recommend_pb2_grpc
from steward.tagging.v1 import tagging_pb2, tagging_pb2_grpc

from services.common.errors import Unavailable

DEFAULT_TIMEOUT = 10.0


class PeerExports:
    """Clients of tagging and recommend for a person's export; a service left unconnected is
    not deployed and has nothing to give."""

    def __init__(self) -> None:
        self._tagging: tagging_pb2_grpc.TaggingServiceStub | None = None
        self._recommend: recommend_pb2_grpc.RecommendServiceStub | None = None

    def connect(
        self, *, tagging: grpc.Channel | None = None, recommend: grpc.Channel | None = None
    ) -> None:
        if tagging is not None:
            self._tagging = tagging_pb2_grpc.TaggingServiceStub(tagging)
        if recommend is not None:
            self._recommend = recommend_pb2_grpc.RecommendServiceStub(recommend)

    def tags(self, person_id: str, timeout: float | None) -> tagging_pb2.GetTagsResponse | None:
        """The person's tags, suppressed tags and objections; None without tagging."""
        if self._tagging is None:
            return None
        try:
            response: tagging_pb2.GetTagsResponse = self._tagging.GetTags(
                tagging_pb2.GetTagsRequest(person_id=person_id),
                timeout=timeout or DEFAULT_TIMEOUT,
            )
        except grpc.RpcError as error:
            raise _unavailable("tagging", error) from None
        return response

    def recommendations(
        self, person_id: str, timeout: float | None
    ) -> recommend_pb2.ExportPersonResponse | None:
        """The person's interactions and the answers shown; None without recommend."""
        if self._recommend is None:
            return None
        try:
            response: recommend_pb2.ExportPersonResponse = self._recommend.ExportPerson(
                recommend_pb2.ExportPersonRequest(person_id=person_id),
                timeout=timeout or DEFAULT_TIMEOUT,
            )
        except grpc.RpcError as error:
            raise _unavailable("recommend", error) from None
        return response


def _unavailable(service: str, error: grpc.RpcError) -> Unavailable:
    code = error.code() if isinstance(error, grpc.Call) else None
    name = code.name if code is not None else "UNKNOWN"
    return Unavailable(f"the {service} service could not export the person ({name})")
