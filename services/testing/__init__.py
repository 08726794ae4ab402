"""The whole Steward suite in-process, for other teams' integration tests.

``steward_suite()`` starts consent, identity, tagging and recommend in this process on a free
port, with temporary SQLite storage (or the database URL given, e.g. PostgreSQL) and
development keys, and hands back ready client stubs; leaving the ``with`` block stops it and
removes the temporary storage. The pytest plugin (:mod:`services.testing.plugin`, registered
as the ``steward`` entry point) offers the same as the ``steward`` fixture::

    def test_a_purchase_is_stored(steward):
        answer = steward.consent.Collect(CollectRequest(events=[...]), timeout=10)
        assert answer.accepted == 1

The services talk to each other exactly as in ``steward serve``: consumers follow the event
logs in the background, so what a Collect or a withdrawal causes in tagging and recommend
arrives shortly after the call; :meth:`StewardSuite.eventually` waits for it.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.trace.export import SpanExporter
from steward.consent.v1 import audit_pb2_grpc, consent_pb2_grpc
from steward.events.v1 import events_pb2_grpc
from steward.identity.v1 import identity_pb2_grpc
from steward.recommend.v1 import recommend_pb2_grpc
from steward.tagging.v1 import tagging_pb2_grpc

from services.common.channels import open_channel
from services.common.config import Settings
from services.runtime import SERVICES, RunningSuite, start_suite

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class StewardSuite:
    """A running suite and a client stub for each of its services, on one channel."""

    target: str
    """``host:port`` where every service answers."""
    settings: Settings
    running: RunningSuite
    channel: grpc.Channel
    consent: consent_pb2_grpc.ConsentServiceStub
    audit: audit_pb2_grpc.AuditServiceStub
    identity: identity_pb2_grpc.IdentityServiceStub
    tagging: tagging_pb2_grpc.TaggingServiceStub
    recommend: recommend_pb2_grpc.RecommendServiceStub
    events: events_pb2_grpc.EventLogServiceStub

    @staticmethod
    def eventually(
        check: Callable[[], _T | None], *, timeout: float = 10.0, interval: float = 0.05
    ) -> _T:
        """Call ``check`` until it returns something other than None or False and return that;
        AssertionError after ``timeout`` seconds. An AssertionError raised by ``check`` counts
        as "not yet" and is re-raised if it is still raised when time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            failure: AssertionError | None = None
            try:
                result = check()
            except AssertionError as error:
                failure, result = error, None
            if result is not None and result is not False:
                return result
            if time.monotonic() >= deadline:
                if failure is not None:
                    raise failure
                raise AssertionError(f"not true within {timeout} s: {check!r}")
            time.sleep(interval)


@contextmanager
def steward_suite(
    *,
    database_url: str | None = None,
    data_dir: Path | str | None = None,
    services: Sequence[str] = SERVICES,
    environ: Mapping[str, str] | None = None,
    span_exporter: SpanExporter | None = None,
    metric_reader: MetricReader | None = None,
) -> Iterator[StewardSuite]:
    """Start the suite (or the ``services`` named) in-process on a free port; stop it on exit.

    ``database_url`` puts every service's tables in that database (each service prefixes its
    own), e.g. ``postgresql://postgres@127.0.0.1:5432/test``; without it each service gets a
    SQLite file under ``data_dir``. ``data_dir`` (default: a temporary directory, removed
    afterwards) also holds the development keys. ``environ`` adds settings as ``steward serve``
    reads them from the environment (``STEWARD_MAX_BATCH``, ``STEWARD_TRANSPORT``, …); the stubs'
    channel presents its ``STEWARD_TOKEN`` and, under mutual TLS, its certificate.
    ``span_exporter`` and ``metric_reader`` (e.g. OpenTelemetry's in-memory ones) receive the
    suite's spans and metrics.
    """
    temporary = None
    if data_dir is None:
        temporary = tempfile.mkdtemp(prefix="steward-test-")
        data_dir = temporary
    variables = {"STEWARD_DATA_DIR": str(data_dir), **(environ or {})}
    if database_url:
        variables["STEWARD_DATABASE_URL"] = database_url
    settings = dataclasses.replace(Settings.from_env(variables), host="127.0.0.1", port=0)
    try:
        running = start_suite(
            settings, services, span_exporter=span_exporter, metric_reader=metric_reader
        )
        try:
            # With the credentials ``environ`` gives (STEWARD_TLS_*, STEWARD_TOKEN), if any.
            with open_channel(running.target, settings) as channel:
                yield StewardSuite(
                    target=running.target,
                    settings=settings,
                    running=running,
                    channel=channel,
                    consent=consent_pb2_grpc.ConsentServiceStub(channel),
                    audit=audit_pb2_grpc.AuditServiceStub(channel),
                    identity=identity_pb2_grpc.IdentityServiceStub(channel),
                    tagging=tagging_pb2_grpc.TaggingServiceStub(channel),
                    recommend=recommend_pb2_grpc.RecommendServiceStub(channel),
                    events=events_pb2_grpc.EventLogServiceStub(channel),
                )
        finally:
            running.stop(0)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


__all__ = ["StewardSuite", "steward_suite"]
