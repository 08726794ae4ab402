"""Tampering with the consent ledger in the database itself: someone with write access to a copy
of consent's SQLite file drops the append-only triggers, then updates, deletes, inserts and
reorders rows. Consent, started on the copy, exports what the table now says, and
`steward audit verify` names the first entry that cannot be trusted.

tests/consent/test_audit.py tampers with export files line by line; here the export is honest
and the table is not.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import Connection, select, text, update
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, audit_pb2_grpc, consent_pb2, consent_pb2_grpc
from typer.testing import CliRunner

from services.cli import app
from services.common.config import Settings
from services.common.db import make_engine
from services.common.keyring import Keyring
from services.consent import ledger
from services.consent.ledger import GENESIS
from services.consent.service import record_from_row
from services.consent.store import ledger_table
from services.runtime import start_suite

CHECKPOINT_EVERY = 4
runner = CliRunner()


def _flip_decision(connection: Connection, seq: int) -> None:
    connection.execute(
        text(
            "UPDATE consent_ledger SET decision = CASE decision WHEN :granted THEN :denied "
            "ELSE :granted END WHERE seq = :seq"
        ),
        {"granted": common_pb2.DECISION_GRANTED, "denied": common_pb2.DECISION_DENIED, "seq": seq},
    )


def _delete(connection: Connection, *seqs: int) -> None:
    connection.execute(ledger_table.delete().where(ledger_table.c.seq.in_(seqs)))


def _insert_at(connection: Connection, seq: int) -> None:
    """Make room at ``seq`` and put a forged entry there: the genuine one's copy with another
    subject, hashes and all."""
    connection.execute(text("UPDATE consent_ledger SET seq = -seq WHERE seq >= :seq"), {"seq": seq})
    connection.execute(text("UPDATE consent_ledger SET seq = 1 - seq WHERE seq < 0"))
    genuine = connection.execute(select(ledger_table).where(ledger_table.c.seq == seq + 1)).one()
    forged = {**genuine._asdict(), "seq": seq, "subject": "s_forged"}
    connection.execute(ledger_table.insert().values(**forged))


def _swap(connection: Connection, first: int, second: int) -> None:
    for old, new in ((first, -1), (second, first), (-1, second)):
        connection.execute(update(ledger_table).where(ledger_table.c.seq == old).values(seq=new))


def _careful_forgery(connection: Connection, seq: int) -> None:
    """Flip a decision and recompute every hash from there on, as someone who knows the format
    would: only a signed checkpoint can tell."""
    _flip_decision(connection, seq)
    rows = list(connection.execute(select(ledger_table).order_by(ledger_table.c.seq)))
    chain = GENESIS if seq == 1 else bytes(rows[seq - 2].chain_hash)
    for row in rows[seq - 1 :]:
        sealed = ledger.seal_entry(record_from_row(row), chain)
        connection.execute(
            update(ledger_table)
            .where(ledger_table.c.seq == row.seq)
            .values(
                canonical=sealed.canonical,
                leaf_hash=sealed.leaf_hash,
                chain_hash=sealed.chain_hash,
            )
        )
        chain = sealed.chain_hash


@dataclass(frozen=True)
class Tampering:
    name: str
    change: Callable[[Connection, int], None]
    """Changes the ledger table of a copy, given how many entries it has."""
    first_bad_seq: Callable[[int], int]
    says: str
    """Words the verdict must use."""


TAMPERINGS = [
    Tampering(
        "update a decision", lambda c, n: _flip_decision(c, 5), lambda n: 5, "seq 5 was altered"
    ),
    Tampering("delete an entry", lambda c, n: _delete(c, 7), lambda n: 7, "seq 7 was removed"),
    Tampering(
        "delete two entries", lambda c, n: _delete(c, 6, 7), lambda n: 6, "seqs 6-7 were removed"
    ),
    Tampering("insert a forged entry", lambda c, n: _insert_at(c, 6), lambda n: 6, "seq 6"),
    Tampering("reorder two entries", lambda c, n: _swap(c, 4, 5), lambda n: 4, "seq 4"),
    Tampering("cut off the tail", lambda c, n: _delete(c, n - 1, n), lambda n: n - 1, "removed"),
    Tampering("forge carefully", lambda c, n: _careful_forgery(c, 3), lambda n: 1, "checkpoint"),
]


def record_consents(target: str, persons: int) -> None:
    with grpc.insecure_channel(target) as channel:
        consent = consent_pb2_grpc.ConsentServiceStub(channel)
        purposes = consent.ListPurposes(consent_pb2.ListPurposesRequest(), timeout=10).purposes
        for number in range(persons):
            email = f"ledger-{number}@example.org"
            consent.RecordConsent(
                consent_pb2.RecordConsentRequest(
                    subject=common_pb2.PersonRef(
                        identifiers=[
                            common_pb2.Identifier(
                                type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=email
                            )
                        ]
                    ),
                    decisions=[
                        consent_pb2.DecisionInput(
                            purpose=purpose.id,
                            decision=(common_pb2.DECISION_GRANTED, common_pb2.DECISION_DENIED)[
                                (number + index) % 2
                            ],
                            policy_version=purpose.policy_version,
                        )
                        for index, purpose in enumerate(purposes[:3])
                    ],
                    source=consent_pb2.CONSENT_SOURCE_WEB_BANNER,
                    locale="en-GB",
                ),
                timeout=30,
            )
        audit = audit_pb2_grpc.AuditServiceStub(channel)
        audit.GetCheckpoint(audit_pb2.GetCheckpointRequest(sign_now=True), timeout=10)


def run_steward(suite: Any, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        suite.command(*arguments), env=suite.env(), capture_output=True, text=True, check=False
    )


def export_from_copy(data_dir: Path, out: Path) -> None:
    """Consent started on the tampered copy (in this process) writes the export."""
    settings = Settings.from_env({"STEWARD_DATA_DIR": str(data_dir)})
    running = start_suite(dataclasses.replace(settings, host="127.0.0.1", port=0), ["consent"])
    try:
        result = runner.invoke(
            app, ["audit", "export", "--target", f"127.0.0.1:{running.port}", "--out", str(out)]
        )
        assert result.exit_code == 0, result.output
    finally:
        running.stop(0)


def test_rows_changed_in_the_ledger_table_are_named_by_audit_verify(
    serve_process: Callable[..., Any], tmp_path: Path
) -> None:
    suite = serve_process(STEWARD_CHECKPOINT_EVERY=str(CHECKPOINT_EVERY))
    suite.start()
    record_consents(suite.target, persons=5)
    public_key = tmp_path / "ledger.pem"
    public_key.write_text(Keyring.load(suite.data_dir / "keys").public_key_pem())
    genuine = tmp_path / "genuine.jsonl"
    exported = runner.invoke(
        app, ["audit", "export", "--target", suite.target, "--out", str(genuine)]
    )
    assert exported.exit_code == 0, exported.output
    # The untouched ledger passes the real command, in a process of its own.
    answer = run_steward(suite, "audit", "verify", str(genuine), "--public-key", str(public_key))
    assert answer.returncode == 0, answer.stdout
    suite.stop()

    engine = make_engine(f"sqlite:///{suite.data_dir}/consent.db")
    with engine.connect() as connection:
        entries = len(list(connection.execute(select(ledger_table.c.seq))))
    engine.dispose()
    assert entries >= 2 * CHECKPOINT_EVERY + 2

    verdicts = {}
    for number, tampering in enumerate(TAMPERINGS):
        copy = tmp_path / f"copy-{number}" / "data"
        shutil.copytree(suite.data_dir, copy)
        engine = make_engine(f"sqlite:///{copy}/consent.db")
        with engine.begin() as connection:
            # What the database refuses until someone with write access to the file drops them.
            connection.execute(text("DROP TRIGGER consent_ledger_no_update"))
            connection.execute(text("DROP TRIGGER consent_ledger_no_delete"))
            tampering.change(connection, entries)
        engine.dispose()
        export = copy.parent / "export.jsonl"
        export_from_copy(copy, export)
        result = runner.invoke(
            app, ["audit", "verify", str(export), "--public-key", str(public_key)]
        )
        named = re.search(r"first bad seq: (\d+)", result.output)
        verdicts[tampering.name] = (result.exit_code, named and int(named[1]), result.output)

    wrong = {
        tampering.name: verdicts[tampering.name][2]
        for tampering in TAMPERINGS
        if verdicts[tampering.name][:2] != (1, tampering.first_bad_seq(entries))
        or tampering.says not in verdicts[tampering.name][2]
    }
    assert not wrong, wrong
    for name, (_, first_bad, output) in verdicts.items():
        problem = next(line for line in output.splitlines() if "problem:" in line)
        print(f"\nfaults/ledger [{name}]: first bad seq {first_bad};{problem.split(':', 1)[1]}")
