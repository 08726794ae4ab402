"""The whole suite starts in one process and answers health and reflection for every service."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from typer.testing import CliRunner

from services.cli import app
from services.common.config import Settings
from services.runtime import RunningSuite, start_suite

STEWARD_SERVICES = [
    "steward.consent.v1.ConsentService",
    "steward.consent.v1.AuditService",
    "steward.identity.v1.IdentityService",
    "steward.tagging.v1.TaggingService",
    "steward.recommend.v1.RecommendService",
    "steward.events.v1.EventLogService",
]


def _settings(tmp_path: Path) -> Settings:
    base = Settings.from_env({"STEWARD_DATA_DIR": str(tmp_path / "data")})
    return dataclasses.replace(base, port=0)


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[RunningSuite]:
    running = start_suite(_settings(tmp_path))
    yield running
    running.stop(0)


def test_every_service_reports_serving(suite: RunningSuite) -> None:
    with grpc.insecure_channel(suite.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ["", *STEWARD_SERVICES]:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING, name


def test_reflection_lists_every_service(suite: RunningSuite) -> None:
    with grpc.insecure_channel(suite.target) as channel:
        listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert set(STEWARD_SERVICES) <= listed
    assert "grpc.health.v1.Health" in listed


def test_first_start_creates_development_keys(suite: RunningSuite, tmp_path: Path) -> None:
    assert (tmp_path / "data" / "keys" / "keyring.json").exists()


def test_one_service_process_hosts_only_that_service(tmp_path: Path) -> None:
    running = start_suite(_settings(tmp_path), ["identity"])
    try:
        with grpc.insecure_channel(running.target) as channel:
            listed = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    finally:
        running.stop(0)
    assert "steward.identity.v1.IdentityService" in listed
    assert "steward.events.v1.EventLogService" in listed
    assert "steward.consent.v1.ConsentService" not in listed


def test_unknown_service_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown services: billing"):
        start_suite(_settings(tmp_path), ["billing"])


def test_health_command_reports_a_running_suite(suite: RunningSuite) -> None:
    result = CliRunner().invoke(app, ["health", "--target", suite.target])
    assert result.exit_code == 0, result.output
    for name in STEWARD_SERVICES:
        assert name in result.output
    assert "NOT_SERVING" not in result.output


def test_health_command_fails_when_nothing_listens() -> None:
    result = CliRunner().invoke(app, ["health", "--target", "127.0.0.1:1", "--timeout", "0.5"])
    assert result.exit_code == 1
