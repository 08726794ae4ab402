"""Offline verification of ledger exports: every tampering is caught and named precisely."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, audit_pb2_grpc, consent_pb2
from typer.testing import CliRunner

from services.cli import app
from services.common.keyring import Keyring, KeyringError
from services.common.server import ServiceRegistration, build_server
from services.consent import audit, ledger
from services.consent.ledger import GENESIS, LedgerRecord, SealedEntry, SignedCheckpoint

KEYRING = Keyring.generate()
PEM = KEYRING.public_key_pem()
FORGER = Keyring.generate()
START = datetime(2025, 5, 1, 8, 0, tzinfo=UTC)
runner = CliRunner()


# Building ledgers and their exports -------------------------------------------------------------


def random_record(rng: random.Random, seq: int) -> LedgerRecord:
    recorded_at = START + timedelta(seconds=seq * 7, microseconds=rng.randrange(10**6))
    return LedgerRecord(
        seq=seq,
        recorded_at=recorded_at,
        kind=rng.choice(audit_pb2.EntryKind.values()[1:]),
        subject=f"s_{rng.randbytes(8).hex()}",
        purpose=rng.choice(["analytics", "personalisation", "profiling", "marketing"]),
        decision=rng.choice(common_pb2.Decision.values()),
        source=rng.choice(consent_pb2.ConsentSource.values()),
        policy_version=f"2025-{rng.randrange(1, 13):02d}",
        notice_sha256=rng.randbytes(32).hex(),
        expires_at=rng.choice([None, recorded_at + timedelta(days=365)]),
        actor=rng.choice(["shop", "crm", "pos", "call-centre"]),
        occurred_at=rng.choice([None, recorded_at - timedelta(seconds=1)]),
        details=rng.choice([{}, {"tcf": "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"}]),
    )


@dataclass
class Ledger:
    entries: list[SealedEntry]
    checkpoints: list[SignedCheckpoint]

    @property
    def sizes(self) -> list[int]:
        return [checkpoint.tree_size for checkpoint in self.checkpoints]


def build_ledger(
    count: int, checkpoint_sizes: list[int], seed: int = 0, keyring: Keyring = KEYRING
) -> Ledger:
    rng = random.Random(seed)
    entries: list[SealedEntry] = []
    chain = GENESIS
    for seq in range(1, count + 1):
        entries.append(ledger.seal_entry(random_record(rng, seq), chain))
        chain = entries[-1].chain_hash
    return Ledger(entries, [sign(entries, size, keyring) for size in checkpoint_sizes])


def sign(entries: list[SealedEntry], size: int, keyring: Keyring = KEYRING) -> SignedCheckpoint:
    leaves = [entry.leaf_hash for entry in entries[:size]]
    chain = entries[size - 1].chain_hash if size else GENESIS
    moment = START + timedelta(hours=1, seconds=size)
    return ledger.sign_checkpoint(keyring, size, ledger.merkle_root(leaves), moment, chain)


def entry_message(entry: SealedEntry) -> audit_pb2.LedgerEntry:
    return ledger.to_entry_message(entry.record, entry.canonical, entry.leaf_hash, entry.chain_hash)


def header_message(keyring: Keyring = KEYRING) -> audit_pb2.ExportHeader:
    header = audit_pb2.ExportHeader(format_version=1, public_key_pem=keyring.public_key_pem())
    header.exported_at.FromDatetime(START + timedelta(days=1))
    return header


@dataclass
class ExportLines:
    """An export as JSON documents, to tamper with line by line."""

    header: dict[str, Any]
    entries: list[dict[str, Any]]
    checkpoints: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def of(cls, built: Ledger) -> ExportLines:
        stream = io.StringIO()
        audit.write_export(
            stream,
            header_message(),
            [entry_message(entry) for entry in built.entries],
            [ledger.to_checkpoint_message(checkpoint) for checkpoint in built.checkpoints],
        )
        header, *rest = (json.loads(line) for line in stream.getvalue().splitlines())
        return cls(
            header,
            [line for line in rest if "canonical" in line],
            [line for line in rest if "signed" in line],
        )

    def text(self) -> str:
        lines = [self.header, *self.entries, *self.checkpoints]
        return "".join(json.dumps(line) + "\n" for line in lines)

    def verify(self, public_key_pem: str = PEM) -> audit.VerificationReport:
        return audit.verify_export(io.StringIO(self.text()), public_key_pem)


def entry_line(seq: int, canonical: bytes, previous_chain: bytes) -> dict[str, Any]:
    """An entry line whose hashes are computed honestly, as a forger would."""
    leaf = ledger.leaf_hash(canonical)
    return {
        "seq": seq,
        "canonical": base64.b64encode(canonical).decode(),
        "leaf_hash": leaf.hex(),
        "chain_hash": ledger.chain_hash(previous_chain, leaf).hex(),
    }


def canonical_of(line: dict[str, Any]) -> bytes:
    return base64.b64decode(line["canonical"])


def rechain(lines: list[dict[str, Any]], start: int) -> None:
    """Recompute leaf and chain hashes from position ``start`` (1-based) on: the careful forger."""
    previous = bytes.fromhex(lines[start - 2]["chain_hash"]) if start > 1 else GENESIS
    for line in lines[start - 1 :]:
        line.update(entry_line(line["seq"], canonical_of(line), previous))
        previous = bytes.fromhex(line["chain_hash"])


@st.composite
def ledgers(draw: st.DrawFn) -> Ledger:
    count = draw(st.integers(min_value=1, max_value=24))
    every = draw(st.integers(min_value=1, max_value=7))
    sizes = list(range(every, count + 1, every))
    if draw(st.booleans()) and count not in sizes:
        sizes.append(count)
    return build_ledger(count, sizes, draw(st.integers(min_value=0, max_value=2**32)))


FAST = settings(max_examples=100, deadline=None)


# The untouched export -------------------------------------------------------------------------


@FAST
@given(ledgers())
def test_untouched_export_verifies(built: Ledger) -> None:
    report = ExportLines.of(built).verify()
    assert report.ok, report.problem
    assert (report.first_bad_seq, report.problem, report.problems) == (None, "", ())
    assert report.entries == len(built.entries)
    assert report.checkpoints_verified == report.checkpoints == len(built.checkpoints)
    newest = max(built.sizes, default=0)
    if newest == len(built.entries):
        assert (report.uncovered_from, report.warnings) == (None, ())
    else:
        assert report.uncovered_from == newest + 1
        which = f"entries after seq {newest} are not" if newest else "no entry is"
        assert report.warnings == (
            f"{which} covered by a signed checkpoint (seqs {newest + 1}-{len(built.entries)})",
        )


def test_empty_ledger_verifies() -> None:
    report = ExportLines.of(build_ledger(0, [0])).verify()
    assert report.ok
    assert (report.entries, report.checkpoints_verified, report.uncovered_from) == (0, 1, None)


# Tampering with entries ------------------------------------------------------------------------


@FAST
@given(ledgers(), st.data())
def test_a_flipped_byte_names_the_altered_entry(built: Ledger, data: st.DataObject) -> None:
    lines = ExportLines.of(built)
    seq = data.draw(st.integers(min_value=1, max_value=len(built.entries)), label="seq")
    canonical = bytearray(canonical_of(lines.entries[seq - 1]))
    offset = data.draw(st.integers(min_value=0, max_value=len(canonical) - 1), label="offset")
    canonical[offset] ^= 1 << data.draw(st.integers(min_value=0, max_value=7), label="bit")
    lines.entries[seq - 1]["canonical"] = base64.b64encode(bytes(canonical)).decode()
    report = lines.verify()
    assert not report.ok
    assert report.first_bad_seq == seq
    assert report.problem.startswith(f"seq {seq} was altered")


@FAST
@given(ledgers(), st.data())
def test_a_removed_entry_is_named(built: Ledger, data: st.DataObject) -> None:
    count = len(built.entries)
    seq = data.draw(st.integers(min_value=1, max_value=count), label="seq")
    lines = ExportLines.of(built)
    del lines.entries[seq - 1]
    report = lines.verify()
    if seq == count and count not in built.sizes:
        # Cutting off an unsigned tail leaves a shorter ledger that is valid in itself.
        assert report.ok
        assert report.entries == count - 1
        return
    assert not report.ok
    assert report.first_bad_seq == seq
    assert f"seq {seq} was removed" in report.problem or f"seqs {seq}-" in report.problem


@FAST
@given(ledgers(), st.data())
def test_an_inserted_forged_entry_is_named(built: Ledger, data: st.DataObject) -> None:
    count = len(built.entries)
    seq = data.draw(st.integers(min_value=1, max_value=count + 1), label="position")
    rng = random.Random(seq)
    forged = dataclasses.replace(random_record(rng, seq), actor="forger")
    lines = ExportLines.of(built)
    previous = bytes.fromhex(lines.entries[seq - 2]["chain_hash"]) if seq > 1 else GENESIS
    lines.entries.insert(seq - 1, entry_line(seq, ledger.canonical_bytes(forged), previous))
    report = lines.verify()
    if seq == count + 1:
        # Appended after the last entry: only a later checkpoint can say whether it belongs.
        assert report.ok
        assert report.uncovered_from is not None
        assert report.uncovered_from <= seq
        return
    assert not report.ok
    assert report.first_bad_seq == seq
    assert "inserted" in report.problem


@FAST
@given(ledgers(), st.data())
def test_a_duplicated_entry_is_named(built: Ledger, data: st.DataObject) -> None:
    count = len(built.entries)
    original = data.draw(st.integers(min_value=1, max_value=count), label="original")
    position = data.draw(st.integers(min_value=original + 1, max_value=count + 1), label="at")
    lines = ExportLines.of(built)
    lines.entries.insert(position - 1, dict(lines.entries[original - 1]))
    report = lines.verify()
    assert not report.ok
    assert report.first_bad_seq == position
    assert report.problem.startswith(f"an entry was inserted at seq {position}")
    assert f"repeats seq {original}" in report.problem


@FAST
@given(ledgers(), st.data())
def test_swapped_entries_are_named(built: Ledger, data: st.DataObject) -> None:
    count = len(built.entries)
    assume(count >= 2)
    first = data.draw(st.integers(min_value=1, max_value=count - 1), label="first")
    second = data.draw(st.integers(min_value=first + 1, max_value=count), label="second")
    lines = ExportLines.of(built)
    entries = lines.entries
    entries[first - 1], entries[second - 1] = entries[second - 1], entries[first - 1]
    report = lines.verify()
    assert not report.ok
    assert report.first_bad_seq == first
    assert report.problem.startswith("entries were reordered")


@FAST
@given(ledgers(), st.data())
def test_a_careful_forgery_is_caught_by_the_first_checkpoint_after_it(
    built: Ledger, data: st.DataObject
) -> None:
    """The forger changes a decision and recomputes every leaf and chain hash after it, so only
    the signed checkpoints can tell; the verifier names the range since the last good one."""
    count = len(built.entries)
    seq = data.draw(st.integers(min_value=1, max_value=count), label="seq")
    lines = ExportLines.of(built)
    record = built.entries[seq - 1].record
    other = next(d for d in common_pb2.Decision.values() if d != record.decision)
    canonical = ledger.canonical_bytes(dataclasses.replace(record, decision=other))
    lines.entries[seq - 1]["canonical"] = base64.b64encode(canonical).decode()
    rechain(lines.entries, seq)
    report = lines.verify()
    covering = [size for size in built.sizes if size >= seq]
    if not covering:
        assert report.ok
        assert report.uncovered_from is not None
        assert report.uncovered_from <= seq
        return
    last_good = max((size for size in built.sizes if size < seq), default=0)
    assert not report.ok
    assert report.first_bad_seq == last_good + 1
    assert report.bad_range == (last_good + 1, min(covering))
    assert report.problem.startswith(f"checkpoint at tree size {min(covering)}")
    assert f"an entry among seqs {last_good + 1}-{min(covering)}" in report.problem
    assert report.checkpoints_verified == len(built.sizes) - len(covering)


# Tampering with checkpoints and keys -----------------------------------------------------------


@FAST
@given(ledgers(), st.data())
def test_a_dropped_or_altered_checkpoint_signature_is_named(
    built: Ledger, data: st.DataObject
) -> None:
    assume(built.checkpoints)
    index = data.draw(st.integers(min_value=0, max_value=len(built.checkpoints) - 1))
    how = data.draw(st.sampled_from(["drop", "empty", "flip", "forge"]), label="how")
    lines = ExportLines.of(built)
    line = lines.checkpoints[index]
    if how == "drop":
        del line["signature"]
    elif how == "empty":
        line["signature"] = ""
    elif how == "flip":
        signature = bytearray(base64.b64decode(line["signature"]))
        signature[data.draw(st.integers(min_value=0, max_value=63))] ^= 0x10
        line["signature"] = base64.b64encode(bytes(signature)).decode()
    else:
        line["signature"] = base64.b64encode(FORGER.sign(base64.b64decode(line["signed"]))).decode()
    report = lines.verify()
    size = built.sizes[index]
    previous = built.sizes[index - 1] if index else 0
    assert not report.ok
    assert report.first_bad_seq == previous + 1
    assert report.bad_range == (previous + 1, size)
    assert report.problem.startswith(f"checkpoint at tree size {size}")
    assert report.checkpoints_verified == len(built.checkpoints) - 1


@FAST
@given(ledgers(), st.booleans())
def test_a_swapped_public_key_is_refused(built: Ledger, forger_resigns: bool) -> None:
    """Either the auditor is handed the wrong key, or the forger puts their own key in the header
    and re-signs every checkpoint with it: only the key the auditor holds counts."""
    lines = ExportLines.of(built)
    if forger_resigns:
        lines.header["public_key_pem"] = FORGER.public_key_pem()
        lines.header["key_id"] = FORGER.signing_key_id
        lines.checkpoints = [
            ExportLines.of(Ledger([], [sign(built.entries, size, FORGER)])).checkpoints[0]
            for size in built.sizes
        ]
        report = lines.verify()
    else:
        report = lines.verify(FORGER.public_key_pem())
    assert not report.ok
    assert report.checkpoints_verified == 0
    assert report.first_bad_seq == (1 if built.checkpoints else None)
    assert any("only the given key is trusted" in problem for problem in report.problems)


# Precise verdicts ------------------------------------------------------------------------------


def test_verdicts_name_line_and_seq() -> None:
    built = build_ledger(10, [5, 10])
    cases: dict[str, tuple[int | None, str]] = {}

    lines = ExportLines.of(built)
    del lines.entries[2]
    cases["removed"] = (3, "seq 3 was removed: line 4 holds seq 4 where seq 3 belongs")

    removed_two = ExportLines.of(built)
    del removed_two.entries[2:4]
    cases["removed two"] = (3, "seqs 3-4 were removed: line 4 holds seq 5 where seq 3 belongs")

    swapped = ExportLines.of(built)
    swapped.entries[1], swapped.entries[6] = swapped.entries[6], swapped.entries[1]
    cases["swapped"] = (
        2,
        "entries were reordered: line 3 holds seq 7 where seq 2 belongs; seq 2 is on line 8",
    )

    chain_only = ExportLines.of(built)
    chain_only.entries[3]["chain_hash"] = "00" * 32
    cases["chain"] = (
        4,
        "seq 4 was altered: the chain hash on line 5 does not follow from seq 3",
    )

    seq_field = ExportLines.of(built)
    seq_field.entries[5]["seq"] = 60
    cases["seq field"] = (
        6,
        "seq 6 was altered: line 7 says seq 60 but its canonical bytes say seq 6",
    )

    for name, export in {
        "removed": lines,
        "removed two": removed_two,
        "swapped": swapped,
        "chain": chain_only,
        "seq field": seq_field,
    }.items():
        report = export.verify()
        first_bad, problem = cases[name]
        assert (report.ok, report.first_bad_seq, report.problem) == (False, first_bad, problem)


def test_a_forged_entry_before_the_genuine_one_is_named_by_the_chain() -> None:
    built = build_ledger(6, [6])
    lines = ExportLines.of(built)
    forged = dataclasses.replace(built.entries[2].record, actor="forger")
    previous = bytes.fromhex(lines.entries[1]["chain_hash"])
    lines.entries.insert(2, entry_line(3, ledger.canonical_bytes(forged), previous))
    report = lines.verify()
    assert report.first_bad_seq == 3
    assert report.problem == (
        "1 entry was inserted before seq 3, from line 4: the genuine seq 3 follows on line 5"
    )


def test_unreadable_lines_stand_in_for_their_entry() -> None:
    built = build_ledger(5, [5])
    text = ExportLines.of(built).text().splitlines()
    text[3] = "{this is not json"
    report = audit.verify_export(io.StringIO("\n".join(text) + "\n"), PEM)
    assert (report.ok, report.first_bad_seq) == (False, 3)
    assert report.problem == "seq 3 was altered: line 4 is unreadable (not JSON)"

    lines = ExportLines.of(built)
    lines.entries[1]["leaf_hash"] = "XYZ"
    report = lines.verify()
    assert report.first_bad_seq == 2
    assert "leaf_hash is not a SHA-256 hash in lowercase hex" in report.problem


def test_a_checkpoint_beyond_the_end_reveals_a_cut_off_tail() -> None:
    lines = ExportLines.of(build_ledger(8, [4, 8]))
    del lines.entries[6:]
    report = lines.verify()
    assert (report.ok, report.first_bad_seq, report.bad_range) == (False, 7, (7, 8))
    assert report.problem == (
        "checkpoint at tree size 8 (line 9) covers seqs 1-8, but the export ends at seq 6: "
        "seqs 7-8 were removed"
    )


def test_a_bad_checkpoint_confirmed_by_a_later_one_blames_only_itself() -> None:
    lines = ExportLines.of(build_ledger(9, [3, 6, 9]))
    lines.checkpoints[1]["root"] = "00" * 32
    report = lines.verify()
    assert (report.ok, report.first_bad_seq, report.bad_range) == (False, 4, (4, 6))
    assert report.problem == (
        "checkpoint at tree size 6 (line 12): its fields differ from the note that was signed; "
        "the later checkpoint at tree size 9 verifies and covers seqs 4-6, so only this "
        "checkpoint was altered"
    )


def test_a_header_naming_another_key_fails_even_when_everything_else_verifies() -> None:
    lines = ExportLines.of(build_ledger(4, [4]))
    lines.header["public_key_pem"] = FORGER.public_key_pem()
    lines.header["key_id"] = FORGER.signing_key_id
    report = lines.verify()
    assert (report.ok, report.first_bad_seq, report.checkpoints_verified) == (False, None, 1)
    assert report.problem == (
        f"the export's header names public key {FORGER.signing_key_id!r}, not the given key "
        f"{KEYRING.signing_key_id!r}; only the given key is trusted"
    )


def test_files_that_are_not_exports_are_refused(tmp_path: Path) -> None:
    with pytest.raises(audit.AuditFileError, match="empty"):
        audit.verify_export(io.StringIO(""), PEM)
    with pytest.raises(audit.AuditFileError, match="header"):
        audit.verify_export(io.StringIO('{"format": "something else"}\n'), PEM)
    with pytest.raises(audit.AuditFileError, match="cannot be opened"):
        audit.verify_export(tmp_path / "missing.jsonl", PEM)
    with pytest.raises(KeyringError):
        audit.verify_export(io.StringIO(ExportLines.of(build_ledger(1, [])).text()), "not a key")


# Reading and writing ---------------------------------------------------------------------------


def test_export_files_round_trip(tmp_path: Path) -> None:
    built = build_ledger(7, [3, 7])
    path = tmp_path / "ledger.jsonl"
    responses = [
        audit_pb2.ExportLedgerResponse(header=header_message()),
        *(audit_pb2.ExportLedgerResponse(entry=entry_message(e)) for e in built.entries[:4]),
        audit_pb2.ExportLedgerResponse(
            checkpoint=ledger.to_checkpoint_message(built.checkpoints[0])
        ),
        *(audit_pb2.ExportLedgerResponse(entry=entry_message(e)) for e in built.entries[4:]),
        audit_pb2.ExportLedgerResponse(
            checkpoint=ledger.to_checkpoint_message(built.checkpoints[1])
        ),
    ]
    assert audit.write_export_stream(path, responses) == (7, 2)
    assert not list(tmp_path.glob(".*.tmp"))
    exported = audit.read_export(path)
    assert exported.header.key_id == KEYRING.signing_key_id
    assert exported.header.public_key_pem == PEM
    assert [
        (e.seq, e.canonical, e.leaf_hash, e.chain_hash)
        for e in exported.entries
        if isinstance(e, audit.ExportedEntry)
    ] == [(e.record.seq, e.canonical, e.leaf_hash, e.chain_hash) for e in built.entries]
    assert [
        c.checkpoint for c in exported.checkpoints if isinstance(c, audit.ExportedCheckpoint)
    ] == built.checkpoints
    lines = path.read_text().splitlines()
    assert [json.loads(line).get("tree_size") for line in lines[-2:]] == [3, 7]
    assert audit.verify_export(path, PEM).ok


def test_an_export_stream_must_start_with_its_header(tmp_path: Path) -> None:
    entry = entry_message(build_ledger(1, []).entries[0])
    with pytest.raises(audit.AuditFileError, match="header"):
        audit.write_export_stream(tmp_path / "x", [audit_pb2.ExportLedgerResponse(entry=entry)])
    assert not (tmp_path / "x").exists()


# Inclusion proofs ------------------------------------------------------------------------------


def make_proof(built: Ledger, seq: int, size: int) -> audit.InclusionProof:
    leaves = [entry.leaf_hash for entry in built.entries]
    checkpoint = next(c for c in built.checkpoints if c.tree_size == size)
    return audit.InclusionProof(
        entry=built.entries[seq - 1].canonical,
        leaf_index=seq - 1,
        tree_size=size,
        audit_path=ledger.inclusion_proof(leaves, seq - 1, size),
        checkpoint=checkpoint,
    )


def check(proof: audit.InclusionProof, pem: str = PEM) -> tuple[bool, str]:
    return audit.check_inclusion_proof(
        proof.entry, proof.leaf_index, proof.tree_size, proof.audit_path, proof.checkpoint, pem
    )


def test_inclusion_proofs_are_checked_against_the_signed_root(tmp_path: Path) -> None:
    built = build_ledger(12, [12])
    proof = make_proof(built, 5, 12)
    path = tmp_path / "proof.json"
    audit.write_proof(path, proof)
    assert audit.read_proof(path) == proof
    ok, explanation = check(proof)
    assert ok, explanation
    assert explanation == (
        f"seq 5 is in the ledger of 12 entries signed at 2025-05-01T09:00:12.000000Z by key "
        f"{KEYRING.signing_key_id}"
    )

    other_entry = dataclasses.replace(proof, entry=built.entries[5].canonical)
    assert check(other_entry) == (
        False,
        "the entry is seq 6, but the proof is for leaf index 4 (seq 5)",
    )
    altered = bytearray(proof.entry)
    altered[-3] ^= 1
    assert not check(dataclasses.replace(proof, entry=bytes(altered)))[0]
    bent_path = [*proof.audit_path]
    bent_path[0] = bytes(32)
    assert "does not lead" in check(dataclasses.replace(proof, audit_path=bent_path))[1]
    assert "tree size 11" in check(dataclasses.replace(proof, tree_size=11))[1]
    assert "no signed checkpoint" in check(dataclasses.replace(proof, checkpoint=None))[1]
    assert "names signing key" in check(proof, FORGER.public_key_pem())[1]


def test_proof_files_that_are_not_proofs_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "proof.json"
    path.write_text(
        '{"entry": "!!", "leaf_index": 0, "tree_size": 1, "audit_path": [], "checkpoint": null}'
    )
    with pytest.raises(audit.AuditFileError, match="entry is not base64"):
        audit.read_proof(path)


# The `steward audit` commands ------------------------------------------------------------------


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Ledger]:
    built = build_ledger(12, [4, 8, 12])
    export = tmp_path / "ledger.jsonl"
    export.write_text(ExportLines.of(built).text())
    key = tmp_path / "ledger.pem"
    key.write_text(PEM)
    return export, key, built


def _flat(output: str) -> str:
    return " ".join(output.split())


def test_cli_verify_exit_codes(files: tuple[Path, Path, Ledger], tmp_path: Path) -> None:
    export, key, built = files
    result = runner.invoke(app, ["audit", "verify", str(export), "--public-key", str(key)])
    assert result.exit_code == 0, result.output
    assert "verified" in result.output
    assert "checkpoints verified: 3 of 3" in _flat(result.output)

    lines = ExportLines.of(built)
    del lines.entries[6]
    export.write_text(lines.text())
    result = runner.invoke(app, ["audit", "verify", str(export), "--public-key", str(key)])
    assert result.exit_code == 1
    assert "first bad seq: 7" in result.output
    assert "seq 7 was removed" in _flat(result.output)

    export.write_text("garbage\n")
    result = runner.invoke(app, ["audit", "verify", str(export), "--public-key", str(key)])
    assert result.exit_code == 2
    bad_key = tmp_path / "bad.pem"
    bad_key.write_text("nope")
    result = runner.invoke(app, ["audit", "verify", str(export), "--public-key", str(bad_key)])
    assert result.exit_code == 2


def test_cli_check_proof_exit_codes(files: tuple[Path, Path, Ledger], tmp_path: Path) -> None:
    _, key, built = files
    proof_file = tmp_path / "proof.json"
    audit.write_proof(proof_file, make_proof(built, 3, 8))
    result = runner.invoke(app, ["audit", "check-proof", str(proof_file), "--public-key", str(key)])
    assert result.exit_code == 0, result.output
    assert "seq 3 is in the ledger of 8 entries" in _flat(result.output)

    wrong_checkpoint = dataclasses.replace(make_proof(built, 3, 8), checkpoint=built.checkpoints[0])
    audit.write_proof(proof_file, wrong_checkpoint)
    result = runner.invoke(app, ["audit", "check-proof", str(proof_file), "--public-key", str(key)])
    assert result.exit_code == 1
    assert "NOT PROVEN" in result.output

    proof_file.write_text("[]")
    result = runner.invoke(app, ["audit", "check-proof", str(proof_file), "--public-key", str(key)])
    assert result.exit_code == 2


class FakeAuditService(audit_pb2_grpc.AuditServiceServicer):
    """Just enough of AuditService to exercise the commands that talk to a running suite."""

    def __init__(self, built: Ledger) -> None:
        self._built = built

    def ExportLedger(
        self, request: audit_pb2.ExportLedgerRequest, context: grpc.ServicerContext
    ) -> Iterator[audit_pb2.ExportLedgerResponse]:
        yield audit_pb2.ExportLedgerResponse(header=header_message())
        for entry in self._built.entries:
            yield audit_pb2.ExportLedgerResponse(entry=entry_message(entry))
        for checkpoint in self._built.checkpoints:
            yield audit_pb2.ExportLedgerResponse(
                checkpoint=ledger.to_checkpoint_message(checkpoint)
            )

    def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetInclusionProofResponse:
        size = request.tree_size or self._built.sizes[-1]
        if not 0 < request.seq <= size <= len(self._built.entries):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "seq outside the tree")
        leaves = [entry.leaf_hash for entry in self._built.entries]
        checkpoint = next((c for c in self._built.checkpoints if c.tree_size == size), None)
        return audit_pb2.GetInclusionProofResponse(
            leaf_index=request.seq - 1,
            tree_size=size,
            leaf_hash=leaves[request.seq - 1],
            audit_path=ledger.inclusion_proof(leaves, request.seq - 1, size),
            checkpoint=ledger.to_checkpoint_message(checkpoint) if checkpoint else None,
            entry=entry_message(self._built.entries[request.seq - 1]),
        )


@pytest.fixture
def fake_suite(files: tuple[Path, Path, Ledger]) -> Iterator[str]:
    registration = ServiceRegistration(
        "steward.consent.v1.AuditService",
        audit_pb2_grpc.add_AuditServiceServicer_to_server,
        FakeAuditService(files[2]),  # type: ignore[abstract]  # other RPCs: UNIMPLEMENTED
    )
    built = build_server(
        [registration], host="127.0.0.1", port=0, max_message_bytes=4 * 1024 * 1024
    )
    built.server.start()
    yield f"127.0.0.1:{built.port}"
    built.server.stop(0)


def test_cli_export_and_prove_against_a_running_audit_service(
    fake_suite: str, files: tuple[Path, Path, Ledger], tmp_path: Path
) -> None:
    _, key, _ = files
    export = tmp_path / "downloaded.jsonl"
    result = runner.invoke(app, ["audit", "export", "--out", str(export), "--target", fake_suite])
    assert result.exit_code == 0, result.output
    assert "wrote 12 entries and 3 checkpoints" in _flat(result.output)
    result = runner.invoke(app, ["audit", "verify", str(export), "--public-key", str(key)])
    assert result.exit_code == 0, result.output

    proof_file = tmp_path / "proof.json"
    result = runner.invoke(
        app, ["audit", "prove", "9", "--out", str(proof_file), "--target", fake_suite]
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["audit", "check-proof", str(proof_file), "--public-key", str(key)])
    assert result.exit_code == 0, result.output
    assert "seq 9 is in the ledger of 12 entries" in _flat(result.output)

    result = runner.invoke(app, ["audit", "prove", "2", "--tree-size", "5", "--target", fake_suite])
    assert result.exit_code == 1
    assert "no checkpoint was signed at tree size 5" in _flat(result.output)
    result = runner.invoke(app, ["audit", "prove", "40", "--target", fake_suite])
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT" in result.output
