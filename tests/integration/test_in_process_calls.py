"""Services that call each other inside one process never wait on the pool their callers hold.

In ``steward serve`` consent calls identity, and the consumers hold Subscribe streams, inside
the process that serves external callers. Many concurrent external calls that each need
identity must all be answered, not deadlock on the public server's worker threads.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc

from services.common.config import Settings
from services.runtime import RunningSuite, start_suite

CONCURRENT_CALLS = 96
"""Three times the public server's worker threads."""
CALLS_EACH = 20


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[RunningSuite]:
    settings = Settings.from_env({"STEWARD_DATA_DIR": str(tmp_path / "data")})
    running = start_suite(dataclasses.replace(settings, port=0))
    yield running
    running.stop(0)


def test_many_concurrent_calls_that_need_identity_are_all_answered(suite: RunningSuite) -> None:
    start = threading.Barrier(CONCURRENT_CALLS)

    def check(index: int) -> bool:
        with grpc.insecure_channel(suite.target) as channel:
            stub = consent_pb2_grpc.ConsentServiceStub(channel)
            subject = common_pb2.PersonRef(
                identifiers=[
                    common_pb2.Identifier(
                        type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=f"shopper{index}@example.org"
                    )
                ]
            )
            start.wait(timeout=30)
            answers = [
                stub.CheckConsent(
                    consent_pb2.CheckConsentRequest(subject=subject, purpose="analytics"),
                    timeout=30,
                ).allowed
                for _ in range(CALLS_EACH)
            ]
            return any(answers)

    with futures.ThreadPoolExecutor(CONCURRENT_CALLS) as pool:
        answers = list(pool.map(check, range(CONCURRENT_CALLS)))
    # Nobody has granted analytics: every call is answered, and answered "no".
    assert answers == [False] * CONCURRENT_CALLS
