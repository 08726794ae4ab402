"""The callers file: who may call, with which scopes; and ``caller_of`` under authentication."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from services.cli import app
from services.common.callers import (
    Caller,
    Callers,
    CallersFileError,
    acting_as,
    caller_of,
    hash_token,
    new_token,
)
from services.common.scopes import known_scopes

runner = CliRunner()


def load(text: str) -> Callers:
    return Callers.from_document(yaml.safe_load(text), known_scopes(), source="callers.yaml")


def test_a_caller_is_found_by_its_token_or_its_certificate_subject() -> None:
    token = new_token()
    callers = load(
        f"""
        callers:
          - name: shop
            scopes: [events:write, consent:read]
            token_sha256: {hash_token(token)}
            rate_limit: {{per_second: 20}}
          - name: tagging
            scopes: [events:read]
            certificate_subject: tagging
        """
    )

    shop = callers.by_token(token)
    assert shop is not None and shop.name == "shop"
    assert shop.scopes == {"events:write", "consent:read"}
    assert shop.rate_limit is not None and (shop.rate_limit.per_second, shop.rate_limit.burst) == (
        20.0,
        20,
    )
    tagging = callers.by_certificate_subject("tagging")
    assert tagging is not None and tagging.name == "tagging"
    assert callers.by_token(token + "x") is None
    assert callers.by_certificate_subject("shop") is None


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("{name: a, scopes: ['*'], token_sha256: " + "0" * 64 + "}", "`\\*` is not a scope"),
        ("{name: a, scopes: [consent:reed], token_sha256: " + "0" * 64 + "}", "consent:reed"),
        ("{name: a, scopes: [], token_sha256: " + "0" * 64 + "}", "non-empty list"),
        ("{name: a, scopes: [consent:read]}", "token_sha256`, `certificate_subject` or both"),
        ("{name: a, scopes: [consent:read], token_sha256: s3cret}", "64 hex digits"),
        ("{name: 'a b', scopes: [consent:read], certificate_subject: a}", "`name` must be"),
        ("{name: a, scopes: [consent:read], certificate_subject: a, role: x}", "unknown keys"),
        (
            "{name: a, scopes: [consent:read], certificate_subject: a,"
            " rate_limit: {per_second: 0}}",
            "must be positive",
        ),
    ],
)
def test_a_bad_entry_is_refused_naming_what_is_wrong(entry: str, problem: str) -> None:
    with pytest.raises(CallersFileError, match=problem):
        load(f"callers: [{entry}]")


def test_two_callers_may_not_share_a_name_or_a_credential() -> None:
    digest = hash_token(new_token())
    with pytest.raises(CallersFileError, match="listed twice"):
        load(
            "callers: [{name: a, scopes: [consent:read], certificate_subject: a},"
            " {name: a, scopes: [consent:read], certificate_subject: b}]"
        )
    with pytest.raises(CallersFileError, match="shares another's token"):
        load(
            f"callers: [{{name: a, scopes: [consent:read], token_sha256: {digest}}},"
            f" {{name: b, scopes: [consent:read], token_sha256: {digest}}}]"
        )


def test_a_missing_callers_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CallersFileError, match="cannot read the callers file"):
        Callers.load(tmp_path / "absent.yaml", known_scopes())


def test_saved_callers_load_back_and_the_file_is_private(tmp_path: Path) -> None:
    path = tmp_path / "callers.yaml"
    callers = Callers(
        [
            Caller("shop", frozenset({"events:write"}), token_sha256=hash_token("t")),
            Caller("alice", frozenset({"audit:read"}), certificate_subject="alice"),
        ]
    )

    callers.save(path)

    assert [caller.to_document() for caller in Callers.load(path, known_scopes())] == [
        caller.to_document() for caller in callers
    ]
    assert path.stat().st_mode & 0o777 == 0o600


def test_callers_add_prints_the_token_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    path = tmp_path / "callers.yaml"

    result = runner.invoke(
        app,
        ["callers", "add", "crm", "--scope", "consent:write", "--rate", "5", "--file", str(path)],
    )

    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[-1]
    text = path.read_text()
    assert token not in text
    assert hash_token(token) in text
    crm = Callers.load(path, known_scopes()).by_token(token)
    assert crm is not None and crm.scopes == {"consent:write"}
    assert crm.rate_limit is not None and crm.rate_limit.burst == 5

    again = runner.invoke(
        app, ["callers", "add", "crm", "--scope", "consent:read", "--file", str(path)]
    )
    assert again.exit_code == 1 and "listed twice" in again.output


def test_callers_add_with_all_scopes_writes_each_scope_out(tmp_path: Path) -> None:
    path = tmp_path / "callers.yaml"

    result = runner.invoke(
        app,
        [
            "callers",
            "add",
            "ops",
            "--all-scopes",
            "--no-token",
            "--certificate-subject",
            "ops",
            "--file",
            str(path),
        ],
    )

    assert result.exit_code == 0, result.output
    assert yaml.safe_load(path.read_text())["callers"][0]["scopes"] == sorted(known_scopes())


class _Call:
    """A call's context as far as ``caller_of`` looks: the metadata the caller sent."""

    def __init__(self, *metadata: tuple[str, str]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


def test_the_authenticated_caller_wins_over_the_claimed_one_only_inside_acting_as() -> None:
    claimed = _Call(("x-steward-caller", "mallory"))

    with acting_as("shop"):
        assert caller_of(claimed) == "shop"  # type: ignore[arg-type]
    assert caller_of(claimed) == "mallory"  # type: ignore[arg-type]
    assert caller_of(_Call(("x-steward-caller", "not a name!"))) == "anonymous"  # type: ignore[arg-type]
