"""`steward migrate`: the one-shot job that brings every service's schema to head before the
services (and their replicas) start."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from services.cli import app
from services.common.migrations import current_revision, head_revision
from services.consent import keystore
from services.runtime import SERVICES

runner = CliRunner()


def _revisions(engine: Engine) -> dict[str, str | None]:
    revisions = {service: current_revision(engine, service) for service in SERVICES}
    revisions["keystore"] = current_revision(engine, keystore.SERVICE)
    return revisions


def _heads() -> dict[str, str | None]:
    heads = {service: head_revision(service) for service in SERVICES}
    heads["keystore"] = head_revision(keystore.SERVICE, versions_dir=keystore.VERSIONS_DIR)
    return heads


def test_migrate_brings_every_service_and_the_key_store_to_head(
    db_url: str, engine: Engine
) -> None:
    result = runner.invoke(app, ["migrate"], env={"STEWARD_DATABASE_URL": db_url})

    assert result.exit_code == 0, result.output
    assert "migrated consent, identity, tagging, recommend" in result.output
    heads = _heads()
    assert all(heads.values())
    assert _revisions(engine) == heads


def test_migrate_again_is_a_no_op(db_url: str, engine: Engine) -> None:
    env = {"STEWARD_DATABASE_URL": db_url}
    assert runner.invoke(app, ["migrate"], env=env).exit_code == 0

    again = runner.invoke(app, ["migrate"], env=env)

    assert again.exit_code == 0, again.output
    assert _revisions(engine) == _heads()


def test_migrate_one_service_leaves_the_others_alone(db_url: str, engine: Engine) -> None:
    result = runner.invoke(
        app, ["migrate", "--service", "identity"], env={"STEWARD_DATABASE_URL": db_url}
    )

    assert result.exit_code == 0, result.output
    revisions = _revisions(engine)
    assert revisions.pop("identity") == head_revision("identity")
    assert set(revisions.values()) == {None}


def test_migrate_refuses_an_unknown_service() -> None:
    result = runner.invoke(
        app,
        ["migrate", "--service", "billing"],
        env={"STEWARD_DATABASE_URL": "sqlite:///:memory:"},
    )

    assert result.exit_code == 2
    assert "unknown services: billing" in result.output
