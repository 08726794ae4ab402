"""Services started apart find each other's event logs where the settings say they run, as
compose.yaml runs them: one process per service."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import grpc
from sqlalchemy import Table, select
from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2, consent_pb2_grpc

from services.common.config import Settings
from services.common.db import make_engine
from services.recommend.store import CONSUMER_TABLES as RECOMMEND_CONSUMER_TABLES
from services.runtime import start_suite
from services.tagging.store import CONSUMER_TABLES as TAGGING_CONSUMER_TABLES


def test_target_of_prefers_the_configured_address() -> None:
    settings = Settings.from_env(
        {"STEWARD_CONSENT_TARGET": "consent:50051", "STEWARD_IDENTITY_TARGET": "identity:50051"}
    )
    assert settings.target_of("consent", "own") == "consent:50051"
    assert settings.target_of("identity", "own") == "identity:50051"
    assert settings.target_of("tagging", "own") == "own"
    assert Settings.from_env({}).target_of("consent", "own") == "own"


def _settings(tmp_path: Path, name: str, **targets: str) -> Settings:
    base = Settings.from_env({"STEWARD_DATA_DIR": str(tmp_path / name)})
    return dataclasses.replace(base, port=0, **targets)  # type: ignore[arg-type]


def test_each_service_in_its_own_process_reads_the_logs_where_they_are(tmp_path: Path) -> None:
    identity = start_suite(_settings(tmp_path, "identity"), ["identity"])
    consent_process = start_suite(
        _settings(tmp_path, "consent", identity_target=identity.target), ["consent"]
    )
    settings = _settings(
        tmp_path,
        "tagging",
        consent_target=consent_process.target,
        identity_target=identity.target,
    )
    tagging = start_suite(settings, ["tagging"])
    # Recommend in a process of its own too, as compose runs it.
    recommend_settings = _settings(
        tmp_path,
        "recommend",
        consent_target=consent_process.target,
        identity_target=identity.target,
    )
    recommend = start_suite(recommend_settings, ["recommend"])
    try:
        with grpc.insecure_channel(consent_process.target) as channel:
            consent = consent_pb2_grpc.ConsentServiceStub(channel)
            policy = next(
                p.policy_version
                for p in consent.ListPurposes(consent_pb2.ListPurposesRequest()).purposes
                if p.id == "profiling"
            )
            # By identifiers, so consent asks identity in its own process too.
            consent.RecordConsent(
                consent_pb2.RecordConsentRequest(
                    subject=common_pb2.PersonRef(
                        identifiers=[
                            common_pb2.Identifier(
                                type=common_pb2.IDENTIFIER_TYPE_EMAIL, value="split@example.org"
                            )
                        ]
                    ),
                    decisions=[
                        consent_pb2.DecisionInput(
                            purpose="profiling",
                            decision=common_pb2.DECISION_GRANTED,
                            policy_version=policy,
                        )
                    ],
                    source=consent_pb2.CONSENT_SOURCE_WEB_BANNER,
                    locale="en-GB",
                ),
                timeout=10,
            )
        consumers = {
            "tagging": (settings.db_url("tagging"), TAGGING_CONSUMER_TABLES.cursors),
            "recommend": (
                recommend_settings.db_url("recommend"),
                RECOMMEND_CONSUMER_TABLES.cursors,
            ),
        }
        # Neither consumer's process nor identity's holds consent's log: it came from consent's.
        for consumer, (url, cursors) in consumers.items():
            assert _consent_cursor_reaches(url, cursors, 1), consumer
    finally:
        recommend.stop(0)
        tagging.stop(0)
        consent_process.stop(0)
        identity.stop(0)


def _consent_cursor_reaches(url: str, cursors: Table, seq: int, timeout: float = 10) -> bool:
    """Whether the consumer's cursor on consent's log reaches ``seq`` within ``timeout``."""
    engine = make_engine(url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                current = connection.execute(
                    select(cursors.c.seq).where(cursors.c.producer == "consent")
                ).scalar_one_or_none()
            if (current or 0) >= seq:
                return True
            time.sleep(0.05)
        return False
    finally:
        engine.dispose()
