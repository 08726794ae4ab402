"""Fuzz target: ledger export verification, what ``steward audit verify`` runs
(services/consent/audit.py).

The input is an export file's text, starting from a genuine export of a small signed ledger.
Documented outcome: a :class:`VerificationReport`, or AuditFileError for a file that is not an
export at all. A failed report explains itself; a passing one may only accept a prefix of the
genuine ledger, entry for entry: anything else would be a forgery that verifies.
"""

from __future__ import annotations

import base64
import io
import json
import sys
from datetime import UTC, datetime, timedelta

from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, consent_pb2

from services.common.keyring import Keyring
from services.consent import audit, ledger
from services.consent.ledger import GENESIS, LedgerRecord, SealedEntry

KEYRING = Keyring.generate()
PUBLIC_KEY = KEYRING.public_key_pem()
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _genuine_entries(count: int) -> list[SealedEntry]:
    entries: list[SealedEntry] = []
    chain = GENESIS
    for seq in range(1, count + 1):
        record = LedgerRecord(
            seq=seq,
            recorded_at=START + timedelta(seconds=seq),
            kind=audit_pb2.ENTRY_KIND_DECISION,
            subject=f"s_{seq:04x}",
            purpose=("analytics", "profiling")[seq % 2],
            decision=common_pb2.DECISION_GRANTED if seq % 3 else common_pb2.DECISION_WITHDRAWN,
            source=consent_pb2.CONSENT_SOURCE_WEB_BANNER,
            policy_version="2026-01",
            actor="shop",
            details={"tcf": "CQNnEPwQNrkMMEsAHBENBYEgAP_gAAAAAAYgF5wAgABALzAAAAA"}
            if seq == 2
            else {},
        )
        entries.append(ledger.seal_entry(record, chain))
        chain = entries[-1].chain_hash
    return entries


def _export(entries: list[SealedEntry], sizes: list[int]) -> bytes:
    checkpoints = []
    for size in sizes:
        root = ledger.merkle_root([entry.leaf_hash for entry in entries[:size]])
        chain = entries[size - 1].chain_hash if size else GENESIS
        moment = START + timedelta(hours=1, seconds=size)
        checkpoints.append(ledger.sign_checkpoint(KEYRING, size, root, moment, chain))
    header = audit_pb2.ExportHeader(format_version=1, public_key_pem=PUBLIC_KEY)
    header.exported_at.FromDatetime(START + timedelta(days=1))
    stream = io.StringIO()
    audit.write_export(
        stream,
        header,
        [
            ledger.to_entry_message(
                entry.record, entry.canonical, entry.leaf_hash, entry.chain_hash
            )
            for entry in entries
        ],
        [ledger.to_checkpoint_message(checkpoint) for checkpoint in checkpoints],
    )
    return stream.getvalue().encode()


def _with_header_key_oid(export: bytes, oid: bytes) -> bytes:
    """The export with its header's key re-labelled as another algorithm (a past finding)."""
    header, rest = export.split(b"\n", 1)
    document = json.loads(header)
    der = base64.b64decode("".join(document["public_key_pem"].splitlines()[1:-1]))
    relabelled = base64.b64encode(der.replace(b"\x06\x03\x2b\x65\x70", oid)).decode()
    document["public_key_pem"] = (
        f"-----BEGIN PUBLIC KEY-----\n{relabelled}\n-----END PUBLIC KEY-----\n"
    )
    return json.dumps(document).encode() + b"\n" + rest


GENUINE = _genuine_entries(6)
GENUINE_CANONICAL = [entry.canonical for entry in GENUINE]
SEEDS = [
    _export(GENUINE, [3, 6]),
    _export(GENUINE[:4], [4]),
    _export(GENUINE, [2, 5]),
    _export([], [0]),
    _with_header_key_oid(_export(GENUINE[:2], [2]), b"\x06\x03\x2b\x75\x70"),
]


def check(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        report = audit.verify_export(io.StringIO(text), PUBLIC_KEY)
    except audit.AuditFileError as error:
        assert str(error), "a refusal says why"
        return
    assert isinstance(report, audit.VerificationReport)
    if not report.ok:
        assert report.problem and report.problems[0] == report.problem
        if report.first_bad_seq is not None:
            assert report.first_bad_seq >= 1, report
        return
    assert report.first_bad_seq is None and not report.problem
    read = audit.read_export(io.StringIO(text))
    accepted = [entry.canonical for entry in read.entries if isinstance(entry, audit.ExportedEntry)]
    assert len(accepted) == len(read.entries) == report.entries
    assert accepted == GENUINE_CANONICAL[: len(accepted)], "a verified export is the genuine ledger"


if __name__ == "__main__":
    from _harness import main

    main(__file__, ("services",))
    sys.exit(0)
