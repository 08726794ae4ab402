"""An auditor's worked example, end to end against a running suite: the README's commands."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc
from typer.testing import CliRunner

from services.cli import app
from services.common.config import Settings
from services.runtime import RunningSuite, start_suite

runner = CliRunner()


@pytest.fixture
def suite(tmp_path: Path) -> Iterator[RunningSuite]:
    settings = Settings.from_env({"STEWARD_DATA_DIR": str(tmp_path / "data")})
    running = start_suite(dataclasses.replace(settings, port=0), ["consent", "identity"])
    yield running
    running.stop(0)


def test_export_verify_prove_and_check_proof(suite: RunningSuite, tmp_path: Path) -> None:
    with grpc.insecure_channel(suite.target) as channel:
        consent = consent_pb2_grpc.ConsentServiceStub(channel)
        for n in range(3):
            consent.RecordConsent(
                consent_pb2.RecordConsentRequest(
                    subject=common_pb2.PersonRef(
                        identifiers=[
                            common_pb2.Identifier(
                                type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=f"p{n}@example.org"
                            )
                        ]
                    ),
                    decisions=[
                        consent_pb2.DecisionInput(
                            purpose="analytics",
                            decision=common_pb2.DECISION_GRANTED,
                            policy_version="2026-01",
                        )
                    ],
                    source=consent_pb2.CONSENT_SOURCE_WEB_BANNER,
                ),
                timeout=10,
            )
    keys = ["--dir", str(tmp_path / "data" / "keys")]
    public = runner.invoke(app, ["keys", "public", *keys])
    assert public.exit_code == 0 and "BEGIN PUBLIC KEY" in public.output
    pem = tmp_path / "ledger.pem"
    pem.write_text(public.output)
    export = tmp_path / "ledger.jsonl"
    result = runner.invoke(app, ["audit", "export", "--out", str(export), "--target", suite.target])
    assert result.exit_code == 0, result.output
    verified = runner.invoke(app, ["audit", "verify", str(export), "--public-key", str(pem)])
    assert verified.exit_code == 0, verified.output
    proof = tmp_path / "proof.json"
    proved = runner.invoke(
        app, ["audit", "prove", "6", "--out", str(proof), "--target", suite.target]
    )
    assert proved.exit_code == 0, proved.output
    checked = runner.invoke(app, ["audit", "check-proof", str(proof), "--public-key", str(pem)])
    assert checked.exit_code == 0, checked.output
    # A doctored export is caught and the first bad entry named.
    lines = export.read_text().splitlines()
    entry = json.loads(lines[2])
    entry["canonical"] = entry["canonical"][:-4] + "AAAA"
    lines[2] = json.dumps(entry)
    export.write_text("\n".join(lines) + "\n")
    tampered = runner.invoke(app, ["audit", "verify", str(export), "--public-key", str(pem)])
    assert tampered.exit_code == 1
    assert "seq 2" in tampered.output or "entry 2" in tampered.output, tampered.output
