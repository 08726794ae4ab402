"""The operator commands of `steward identity`, against a running identity service."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from steward.common.v1 import common_pb2
from steward.identity.v1 import identity_pb2, identity_pb2_grpc
from typer.testing import CliRunner

from services.cli import app
from services.common.config import Settings
from services.runtime import RunningSuite, start_suite

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "identity-rules.yaml"
runner = CliRunner()


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[RunningSuite]:
    settings = Settings.from_env({"STEWARD_DATA_DIR": str(tmp_path / "data")})
    running = start_suite(dataclasses.replace(settings, port=0), ["identity"])
    yield running
    running.stop(0)


def test_example_rules_file_loads_and_applies(suite: RunningSuite) -> None:
    result = runner.invoke(app, ["identity", "put-rules", str(EXAMPLE), "--target", suite.target])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["rules"]["version"] == 1
    with grpc.insecure_channel(suite.target) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        call_centre = common_pb2.Identifier(
            type=common_pb2.IDENTIFIER_TYPE_PHONE, value="020 7946 0000"
        )
        answer = stub.Resolve(
            identity_pb2.ResolveRequest(
                items=[identity_pb2.ResolveItem(identifiers=[call_centre])]
            ),
            timeout=10,
        )
    assert answer.results[0].identifiers[0].status == identity_pb2.LINK_STATUS_BLOCKED
    current = runner.invoke(app, ["identity", "get-rules", "--target", suite.target])
    assert json.loads(current.output)["rules"]["hub_threshold"] == 5


def test_invalid_rules_file_names_the_field(suite: RunningSuite, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("blocked_patterns: ['(unclosed']\n")
    result = runner.invoke(app, ["identity", "put-rules", str(bad), "--target", suite.target])
    assert result.exit_code == 1
    assert "rules.blocked_patterns[0]" in result.output


def test_unknown_person_is_reported(suite: RunningSuite) -> None:
    result = runner.invoke(app, ["identity", "person", "p_nobody", "--target", suite.target])
    assert result.exit_code == 1
    assert "NOT_FOUND" in result.output
