"""The auditor's side of the consent ledger: export files, offline verification, inclusion proofs.

Everything here runs without the suite: an auditor holding an export (JSON Lines, written by
``steward audit export``) and the ledger's Ed25519 public key re-derives every hash and checks
every signature, trusting nothing else in the file. docs/ledger.md specifies the formats and
explains each verdict.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, Literal, TypeAlias

from steward.consent.v1 import audit_pb2

from services.common.keyring import KeyringError, key_id_for_public_key
from services.consent.ledger import (
    EMPTY_ROOT,
    GENESIS,
    HASH_BYTES,
    CanonicalError,
    CheckpointNoteError,
    MerkleFrontier,
    SignedCheckpoint,
    chain_hash,
    checkpoint_from_message,
    checkpoint_problem,
    format_timestamp,
    leaf_hash,
    parse_timestamp,
    record_from_canonical,
    verify_inclusion,
)

EXPORT_FORMAT: Final = "steward-ledger-export/1"
PROOF_FORMAT: Final = "steward-inclusion-proof/1"

Source: TypeAlias = "str | os.PathLike[str] | IO[str]"
"""A file name, or an open text stream."""

_HEX_HASH: Final = re.compile(r"[0-9a-f]{64}")


class AuditFileError(ValueError):
    """A file that is not a readable export or proof at all (wrong format, no header, no file)."""


# Export files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportHeader:
    """The first line of an export. Its key is informative only: verifiers trust the key given."""

    exported_at: datetime
    public_key_pem: str
    key_id: str
    format: str = EXPORT_FORMAT

    @classmethod
    def from_message(cls, message: audit_pb2.ExportHeader) -> ExportHeader:
        if message.format_version != 1:
            raise AuditFileError(f"unsupported export format version {message.format_version}")
        try:
            key_id = key_id_for_public_key(message.public_key_pem)
        except KeyringError:
            key_id = ""  # written as is; verification reports the unreadable key
        return cls(
            exported_at=message.exported_at.ToDatetime(tzinfo=UTC),
            public_key_pem=message.public_key_pem,
            key_id=key_id,
        )


@dataclass(frozen=True)
class ExportedEntry:
    """One entry line: the canonical bytes and the hashes the exporter claims for them."""

    line: int
    seq: int
    canonical: bytes
    leaf_hash: bytes
    chain_hash: bytes


@dataclass(frozen=True)
class ExportedCheckpoint:
    """One checkpoint line."""

    line: int
    checkpoint: SignedCheckpoint


@dataclass(frozen=True)
class UnreadableLine:
    """A line that should be an entry or a checkpoint but cannot be read as one."""

    line: int
    section: Literal["entry", "checkpoint"]
    problem: str
    tree_size: int | None = None


@dataclass(frozen=True)
class LedgerExport:
    """An export as read, in file order; unreadable lines are kept where they were."""

    header: ExportHeader
    entries: list[ExportedEntry | UnreadableLine]
    checkpoints: list[ExportedCheckpoint | UnreadableLine]


def write_export(
    destination: Source,
    header: ExportHeader | audit_pb2.ExportHeader,
    entries: Iterable[audit_pb2.LedgerEntry],
    checkpoints: Iterable[audit_pb2.Checkpoint],
) -> tuple[int, int]:
    """Write an export file (header, entry lines, checkpoint lines); returns the two counts.

    A file name is written through a temporary file and renamed at the end, so an interrupted
    export never leaves a truncated file that looks complete.
    """
    if isinstance(header, audit_pb2.ExportHeader):
        header = ExportHeader.from_message(header)
    with _open_for_writing(destination) as stream:
        stream.write(_json_line(_header_json(header)))
        entry_count = 0
        for entry in entries:
            stream.write(_json_line(_entry_json(entry)))
            entry_count += 1
        checkpoint_count = 0
        for checkpoint in checkpoints:
            stream.write(_json_line(_checkpoint_message_json(checkpoint)))
            checkpoint_count += 1
    return entry_count, checkpoint_count


def write_export_stream(
    destination: Source, responses: Iterable[audit_pb2.ExportLedgerResponse]
) -> tuple[int, int]:
    """Write the items of an ``ExportLedger`` stream as an export file; returns the counts.

    Entries are written as they arrive; checkpoints are held back and written after them.
    """
    items = iter(responses)
    first = next(items, None)
    if first is None or first.WhichOneof("item") != "header":
        raise AuditFileError("the export stream did not start with a header")
    held: list[audit_pb2.Checkpoint] = []

    def entries() -> Iterator[audit_pb2.LedgerEntry]:
        for item in items:
            kind = item.WhichOneof("item")
            if kind == "entry":
                yield item.entry
            elif kind == "checkpoint":
                held.append(item.checkpoint)
            else:
                raise AuditFileError("the export stream sent a second header")

    return write_export(destination, first.header, entries(), held)


def read_export(source: Source) -> LedgerExport:
    """Read an export file; AuditFileError unless it starts with a valid header.

    Lines after the header that cannot be read become :class:`UnreadableLine` rather than
    errors, so a verifier can still say which entry they stand in for.
    """
    with _open_for_reading(source) as lines:
        header, items = _parse_export(lines)
        entries: list[ExportedEntry | UnreadableLine] = []
        checkpoints: list[ExportedCheckpoint | UnreadableLine] = []
        for item in items:
            if isinstance(item, ExportedEntry) or (
                isinstance(item, UnreadableLine) and item.section == "entry"
            ):
                entries.append(item)
            else:
                checkpoints.append(item)
    return LedgerExport(header, entries, checkpoints)


# Verification -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationReport:
    """The verdict on an export.

    ``ok`` is False for any failure; ``problem`` then explains the first one and
    ``first_bad_seq`` names the first seq that cannot be trusted (None when the failure is not
    about entries, e.g. a header naming another key). Entries after the newest verified
    checkpoint are reported in ``uncovered_from`` and ``warnings``: a warning, not a failure,
    because the ledger signs checkpoints periodically and its tail is always briefly unsigned.
    """

    ok: bool
    entries: int
    checkpoints_verified: int
    first_bad_seq: int | None
    problem: str
    checkpoints: int = 0
    uncovered_from: int | None = None
    bad_range: tuple[int, int] | None = None
    """Seqs covered by the first failing checkpoint since the last good one."""
    problems: tuple[str, ...] = ()
    """Every failure found, the one in ``problem`` first."""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Failure:
    problem: str
    first_bad_seq: int | None
    covers_up_to: int | None = None
    bad_range: tuple[int, int] | None = None


class _Entries:
    """Per-position facts about the entries, kept compactly so a million entries fit easily."""

    def __init__(self) -> None:
        self.leaves = bytearray()
        self.chains = bytearray()
        self.seqs = array("q")
        self.lines = array("q")

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, line: int, seq: int, leaf: bytes, chain: bytes) -> None:
        self.lines.append(line)
        self.seqs.append(seq)
        self.leaves += leaf
        self.chains += chain

    def leaf(self, position: int) -> bytes:
        return bytes(self.leaves[(position - 1) * HASH_BYTES : position * HASH_BYTES])

    def chain(self, position: int) -> bytes:
        if position == 0:
            return GENESIS
        return bytes(self.chains[(position - 1) * HASH_BYTES : position * HASH_BYTES])

    def seq(self, position: int) -> int:
        return self.seqs[position - 1]

    def line(self, position: int) -> int:
        return self.lines[position - 1]


_UNREADABLE_LEAF: Final = b"\xff" * HASH_BYTES


def verify_export(source: Source, public_key_pem: str) -> VerificationReport:
    """Check an export against the ledger's public key, the only thing trusted.

    Every leaf hash is recomputed from the canonical bytes, every seq must equal its position,
    every chain hash must follow from the one before, and every checkpoint must be signed by
    the given key over the root and chain hash of that many recomputed entries. AuditFileError
    when the file is not an export at all, KeyringError when the key is not an Ed25519 PEM key.
    """
    trusted_key_id = key_id_for_public_key(public_key_pem)
    with _open_for_reading(source) as lines:
        header, items = _parse_export(lines)
        entries = _Entries()
        entry_failure: _Failure | None = None
        misplaced: tuple[int, int, bytes] | None = None  # position, seq and claimed chain hash
        checkpoint_items: list[ExportedCheckpoint | UnreadableLine] = []
        for item in items:
            if isinstance(item, ExportedCheckpoint) or (
                isinstance(item, UnreadableLine) and item.section == "checkpoint"
            ):
                checkpoint_items.append(item)
                continue
            position = len(entries) + 1
            previous_chain = entries.chain(position - 1)
            if isinstance(item, UnreadableLine):
                entries.add(
                    item.line, 0, _UNREADABLE_LEAF, chain_hash(previous_chain, _UNREADABLE_LEAF)
                )
                if entry_failure is None and misplaced is None:
                    entry_failure = _Failure(
                        f"seq {position} was altered: line {item.line} is unreadable "
                        f"({item.problem})",
                        position,
                    )
                continue
            leaf = leaf_hash(item.canonical)
            chain = chain_hash(previous_chain, leaf)
            try:
                seq: int | None = record_from_canonical(item.canonical).seq
                parse_problem = ""
            except CanonicalError as error:
                seq, parse_problem = None, str(error)
            entries.add(item.line, seq or 0, leaf, chain)
            if entry_failure is not None or misplaced is not None:
                continue
            if seq is None:
                entry_failure = _Failure(
                    f"seq {position} was altered: the canonical bytes on line {item.line} are "
                    f"not a canonical ledger entry ({parse_problem})",
                    position,
                )
            elif item.leaf_hash != leaf:
                entry_failure = _Failure(
                    f"seq {position} was altered: the leaf hash on line {item.line} does not "
                    "match its canonical bytes",
                    position,
                )
            elif item.seq != seq:
                entry_failure = _Failure(
                    f"seq {position} was altered: line {item.line} says seq {item.seq} but its "
                    f"canonical bytes say seq {seq}",
                    position,
                )
            elif seq != position:
                misplaced = (position, seq, item.chain_hash)
            elif item.chain_hash != chain:
                after = f"seq {position - 1}" if position > 1 else "the genesis hash"
                entry_failure = _Failure(
                    f"seq {position} was altered: the chain hash on line {item.line} does not "
                    f"follow from {after}",
                    position,
                )
        if misplaced is not None:
            entry_failure = _misplaced_entry(entries, *misplaced)
    return _conclude(
        header, public_key_pem, trusted_key_id, entries, checkpoint_items, entry_failure
    )


def _misplaced_entry(entries: _Entries, position: int, seq: int, claimed_chain: bytes) -> _Failure:
    """Name what happened when the entry at ``position`` carries another ``seq``.

    Every position before it held its own seq, so a smaller seq was inserted again and a larger
    one means entries were removed, reordered, or something was inserted in front of them.
    """
    line = entries.line(position)
    if seq < position:
        if entries.leaf(seq) == entries.leaf(position):
            return _Failure(
                f"an entry was inserted at seq {position} (line {line}): it repeats seq {seq} "
                f"from line {entries.line(seq)}",
                position,
            )
        # The same seq again, but this copy continues the chain from seq - 1: the copy that came
        # first, and anything after it, was put in front of the genuine entry.
        genuine_chain = chain_hash(entries.chain(seq - 1), entries.leaf(position))
        if claimed_chain == genuine_chain:
            inserted = position - seq
            return _Failure(
                f"{_count(inserted, 'entry was', 'entries were')} inserted before seq {seq}, "
                f"from line {entries.line(seq)}: the genuine seq {seq} follows on line {line}",
                seq,
            )
        return _Failure(
            f"an entry was inserted at seq {position} (line {line}): it claims seq {seq}, which "
            f"is already on line {entries.line(seq)}",
            position,
        )
    occurrences = entries.seqs.count(seq)
    if occurrences > 1:
        return _Failure(
            f"an entry was inserted at seq {position} (line {line}): it claims seq {seq}, which "
            f"appears {occurrences} times",
            position,
        )
    try:
        later = entries.seqs.index(position, position) + 1
    except ValueError:
        present = set(entries.seqs)
        if seq - position > 1 and not any(s in present for s in range(position, seq)):
            what = f"seqs {position}-{seq - 1} were removed"
        else:
            what = f"seq {position} was removed"
        return _Failure(
            f"{what}: line {line} holds seq {seq} where seq {position} belongs", position
        )
    if later == position + 1 and seq != position + 1:
        return _Failure(
            f"an entry was inserted at seq {position} (line {line}): it claims seq {seq}, and "
            f"seq {position} follows on line {entries.line(later)}",
            position,
        )
    return _Failure(
        f"entries were reordered: line {line} holds seq {seq} where seq {position} belongs; "
        f"seq {position} is on line {entries.line(later)}",
        position,
    )


def _conclude(
    header: ExportHeader,
    public_key_pem: str,
    trusted_key_id: str,
    entries: _Entries,
    checkpoint_items: Sequence[ExportedCheckpoint | UnreadableLine],
    entry_failure: _Failure | None,
) -> VerificationReport:
    count = len(entries)
    header_problems = _header_problems(header, trusted_key_id)
    placed = [item for item in checkpoint_items if _tree_size(item) is not None]
    unplaced = [
        f"the checkpoint on line {item.line} is unreadable ({item.problem})"
        for item in checkpoint_items
        if isinstance(item, UnreadableLine) and item.tree_size is None
    ]
    placed.sort(key=lambda item: (_tree_size(item) or 0, item.line))
    roots = _roots_at(entries, {size for item in placed if (size := _tree_size(item)) is not None})

    verified: list[int] = []
    failures: list[tuple[_CheckpointFault, str, int, int]] = []
    for item in placed:
        size = _tree_size(item) or 0
        verdict = _checkpoint_failure(item, public_key_pem, entries, roots)
        if verdict is None:
            verified.append(size)
        else:
            failures.append((*verdict, size, max(verified, default=0)))

    checkpoint_failure: _Failure | None = None
    if failures:
        fault, problem, size, last_good = failures[0]
        checkpoint_failure = _range_failure(
            fault, problem, size, last_good, count, verified, entry_failure is None
        )
        if len(failures) > 1:
            more = _count(len(failures) - 1, "later checkpoint fails", "later checkpoints fail")
            checkpoint_failure = _Failure(
                f"{checkpoint_failure.problem} ({more} too)",
                checkpoint_failure.first_bad_seq,
                checkpoint_failure.covers_up_to,
                checkpoint_failure.bad_range,
            )

    ordered: list[_Failure] = []
    if entry_failure is not None and (
        checkpoint_failure is None
        or checkpoint_failure.covers_up_to is None
        or (entry_failure.first_bad_seq or 0) <= checkpoint_failure.covers_up_to
    ):
        ordered.append(entry_failure)
        if checkpoint_failure is not None:
            ordered.append(checkpoint_failure)
    else:
        if checkpoint_failure is not None:
            ordered.append(checkpoint_failure)
        if entry_failure is not None:
            ordered.append(entry_failure)
    ordered += [_Failure(problem, None) for problem in [*unplaced, *header_problems]]

    newest = max(verified, default=0)
    uncovered_from = newest + 1 if count > newest else None
    warnings: tuple[str, ...] = ()
    if uncovered_from is not None:
        which = f"entries after seq {newest} are not" if newest else "no entry is"
        warnings = (f"{which} covered by a signed checkpoint (seqs {newest + 1}-{count})",)
    primary = ordered[0] if ordered else None
    return VerificationReport(
        ok=primary is None,
        entries=count,
        checkpoints_verified=len(verified),
        first_bad_seq=primary.first_bad_seq if primary else None,
        problem=primary.problem if primary else "",
        checkpoints=len(checkpoint_items),
        uncovered_from=uncovered_from,
        bad_range=primary.bad_range if primary else None,
        problems=tuple(failure.problem for failure in ordered),
        warnings=warnings,
    )


_CheckpointFault: TypeAlias = Literal["unreadable", "unsigned", "beyond the end", "mismatch"]


def _checkpoint_failure(
    item: ExportedCheckpoint | UnreadableLine,
    public_key_pem: str,
    entries: _Entries,
    roots: dict[int, bytes],
) -> tuple[_CheckpointFault, str] | None:
    size = _tree_size(item) or 0
    where = f"checkpoint at tree size {size} (line {item.line})"
    if isinstance(item, UnreadableLine):
        return "unreadable", f"{where} is unreadable ({item.problem})"
    checkpoint = item.checkpoint
    problem = checkpoint_problem(public_key_pem, checkpoint)
    if problem is not None:
        return "unsigned", f"{where}: {problem}"
    if size > len(entries):
        return "beyond the end", (
            f"{where} covers seqs 1-{size}, but the export ends at seq {len(entries)}: "
            f"seqs {len(entries) + 1}-{size} were removed"
        )
    if checkpoint.root != roots[size]:
        return (
            "mismatch",
            f"{where}: the Merkle root of seqs 1-{size} does not match the signed root",
        )
    if checkpoint.chain_hash != entries.chain(size):
        return "mismatch", f"{where}: the chain hash of seq {size} does not match the signed one"
    return None


def _range_failure(
    fault: _CheckpointFault,
    problem: str,
    size: int,
    last_good: int,
    count: int,
    verified: Sequence[int],
    entries_consistent: bool,
) -> _Failure:
    """The first failing checkpoint as a failure of the seqs it covers since the last good one."""
    if fault == "beyond the end":
        return _Failure(problem, count + 1, size, (count + 1, size))
    if last_good >= size:
        return _Failure(
            f"{problem}; the checkpoint at tree size {last_good} verifies and covers the same "
            "entries, so only this checkpoint was altered",
            None,
        )
    since = f" (since the last good checkpoint at tree size {last_good})" if last_good else ""
    seqs = f"seqs {last_good + 1}-{size}"
    confirming = [good for good in verified if good >= size]
    if confirming:
        consequence = (
            f"; the later checkpoint at tree size {confirming[0]} verifies and covers {seqs}, "
            "so only this checkpoint was altered"
        )
    elif fault == "mismatch":
        consequence = (
            f": an entry among {seqs}{since} was altered, removed, inserted or reordered"
            + (", and the hashes after it were recomputed to hide it" if entries_consistent else "")
        )
    else:
        consequence = f"; {seqs}{since} are not confirmed by a signature"
    return _Failure(problem + consequence, last_good + 1, size, (last_good + 1, size))


def _roots_at(entries: _Entries, sizes: set[int]) -> dict[int, bytes]:
    roots = {0: EMPTY_ROOT}
    wanted = sorted(size for size in sizes if 0 < size <= len(entries))
    if not wanted:
        return roots
    frontier = MerkleFrontier()
    targets = iter(wanted)
    target = next(targets)
    for position in range(1, wanted[-1] + 1):
        frontier.append(entries.leaf(position))
        if position == target:
            roots[position] = frontier.root()
            target = next(targets, 0)
    return roots


def _header_problems(header: ExportHeader, trusted_key_id: str) -> list[str]:
    try:
        header_key_id = key_id_for_public_key(header.public_key_pem)
    except KeyringError:
        return ["the export's header carries an unreadable public key"]
    problems = []
    if header_key_id != trusted_key_id:
        problems.append(
            f"the export's header names public key {header_key_id!r}, not the given key "
            f"{trusted_key_id!r}; only the given key is trusted"
        )
    if header.key_id != header_key_id:
        problems.append(
            f"the export's header says key id {header.key_id!r}, but its public key's id is "
            f"{header_key_id!r}"
        )
    return problems


def _tree_size(item: ExportedCheckpoint | UnreadableLine) -> int | None:
    if isinstance(item, ExportedCheckpoint):
        return item.checkpoint.tree_size
    return item.tree_size


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number} {singular if number == 1 else plural}"


# Inclusion proofs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class InclusionProof:
    """What ``steward audit prove`` writes: an entry, its audit path and the signed checkpoint."""

    entry: bytes
    leaf_index: int
    tree_size: int
    audit_path: list[bytes]
    checkpoint: SignedCheckpoint | None


def proof_from_response(response: audit_pb2.GetInclusionProofResponse) -> InclusionProof:
    """The proof in a ``GetInclusionProof`` answer (CheckpointNoteError if its note is bad)."""
    checkpoint = (
        checkpoint_from_message(response.checkpoint) if response.HasField("checkpoint") else None
    )
    return InclusionProof(
        entry=response.entry.canonical_bytes,
        leaf_index=response.leaf_index,
        tree_size=response.tree_size,
        audit_path=list(response.audit_path),
        checkpoint=checkpoint,
    )


def write_proof(destination: Source, proof: InclusionProof) -> None:
    document = {
        "format": PROOF_FORMAT,
        "entry": _b64(proof.entry),
        "leaf_index": proof.leaf_index,
        "tree_size": proof.tree_size,
        "audit_path": [_b64(sibling) for sibling in proof.audit_path],
        "checkpoint": None if proof.checkpoint is None else _checkpoint_json(proof.checkpoint),
    }
    with _open_for_writing(destination) as stream:
        stream.write(json.dumps(document, indent=2) + "\n")


def read_proof(source: Source) -> InclusionProof:
    """Read a proof file; AuditFileError names what is wrong with it."""
    with _open_for_reading(source) as lines:
        text = "".join(text for _, text in lines)
    try:
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        if document.get("format", PROOF_FORMAT) != PROOF_FORMAT:
            raise ValueError(f"not a {PROOF_FORMAT} document")
        path = document["audit_path"]
        if not isinstance(path, list):
            raise ValueError("audit_path must be a list")
        checkpoint = document["checkpoint"]
        return InclusionProof(
            entry=_unb64(document["entry"], "entry"),
            leaf_index=_int(document["leaf_index"], "leaf_index"),
            tree_size=_int(document["tree_size"], "tree_size"),
            audit_path=[_unb64(sibling, "audit_path") for sibling in path],
            checkpoint=None if checkpoint is None else _checkpoint_from_json(checkpoint),
        )
    except KeyError as missing:
        raise AuditFileError(f"not an inclusion proof: {missing} is missing") from None
    except ValueError as error:
        raise AuditFileError(f"not an inclusion proof: {error}") from None


def check_inclusion_proof(
    entry_canonical: bytes,
    leaf_index: int,
    tree_size: int,
    audit_path: Sequence[bytes],
    checkpoint: SignedCheckpoint | None,
    public_key_pem: str,
) -> tuple[bool, str]:
    """Whether the entry is in the ledger as signed by that key, and a sentence saying why."""
    if checkpoint is None:
        return False, "the proof carries no signed checkpoint, so nothing trusted vouches for it"
    problem = checkpoint_problem(public_key_pem, checkpoint)
    if problem is not None:
        return False, f"the checkpoint at tree size {checkpoint.tree_size}: {problem}"
    if checkpoint.tree_size != tree_size:
        return False, (
            f"the proof is for tree size {tree_size}, but its checkpoint is for tree size "
            f"{checkpoint.tree_size}"
        )
    try:
        record = record_from_canonical(entry_canonical)
    except CanonicalError as error:
        return False, f"the entry is not a canonical ledger entry ({error})"
    if record.seq != leaf_index + 1:
        return False, (
            f"the entry is seq {record.seq}, but the proof is for leaf index {leaf_index} "
            f"(seq {leaf_index + 1})"
        )
    if not verify_inclusion(
        leaf_hash(entry_canonical), leaf_index, tree_size, audit_path, checkpoint.root
    ):
        return False, (
            f"the audit path does not lead from seq {record.seq} to the signed root of tree size "
            f"{tree_size}: the entry is not in the ledger as signed, or the proof was altered"
        )
    return True, (
        f"seq {record.seq} is in the ledger of {tree_size} entries signed at "
        f"{format_timestamp(checkpoint.timestamp)} by key {checkpoint.key_id}"
    )


# File plumbing ----------------------------------------------------------------------------------


_Item: TypeAlias = "ExportedEntry | ExportedCheckpoint | UnreadableLine"


@contextmanager
def _open_for_reading(source: Source) -> Iterator[Iterator[tuple[int, str]]]:
    """Numbered lines of ``source``; a line that is not UTF-8 becomes U+FFFD, not an error."""
    if isinstance(source, str | os.PathLike):
        try:
            handle = open(source, "rb")  # noqa: SIM115 - closed below
        except OSError as error:
            raise AuditFileError(f"the file cannot be opened ({error.strerror})") from None
        with handle:
            yield (
                (number, raw.decode("utf-8", errors="replace"))
                for number, raw in enumerate(handle, start=1)
            )
    else:
        yield ((number, text) for number, text in enumerate(source, start=1))


@contextmanager
def _open_for_writing(destination: Source) -> Iterator[IO[str]]:
    if not isinstance(destination, str | os.PathLike):
        yield destination
        return
    path = Path(destination)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8", newline="\n") as stream:
            yield stream
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _parse_export(lines: Iterator[tuple[int, str]]) -> tuple[ExportHeader, Iterator[_Item]]:
    first = next(lines, None)
    if first is None:
        raise AuditFileError("the file is empty, not a ledger export")
    header = _parse_header(first[1])

    def items() -> Iterator[_Item]:
        section: Literal["entry", "checkpoint"] = "entry"
        for number, text in lines:
            if not text.strip():
                continue
            item = _parse_item(number, text, section)
            if isinstance(item, ExportedCheckpoint) or (
                isinstance(item, UnreadableLine) and item.section == "checkpoint"
            ):
                section = "checkpoint"
            yield item

    return header, items()


def _parse_header(text: str) -> ExportHeader:
    try:
        document = json.loads(text)
    except ValueError:
        raise AuditFileError("line 1 is not JSON: not a ledger export") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise AuditFileError(f"line 1 is not a {EXPORT_FORMAT} header")
    try:
        return ExportHeader(
            exported_at=parse_timestamp(_str(document["exported_at"], "exported_at")),
            public_key_pem=_str(document["public_key_pem"], "public_key_pem"),
            key_id=_str(document["key_id"], "key_id"),
        )
    except KeyError as missing:
        raise AuditFileError(f"the header on line 1 lacks {missing}") from None
    except ValueError as error:
        raise AuditFileError(f"the header on line 1 is malformed: {error}") from None


def _parse_item(number: int, text: str, section: Literal["entry", "checkpoint"]) -> _Item:
    try:
        document = json.loads(text)
    except ValueError:
        return UnreadableLine(number, section, "not JSON")
    if not isinstance(document, dict):
        return UnreadableLine(number, section, "not a JSON object")
    if "canonical" in document or "leaf_hash" in document:
        try:
            return ExportedEntry(
                line=number,
                seq=_int(document["seq"], "seq"),
                canonical=_unb64(document["canonical"], "canonical"),
                leaf_hash=_unhex(document["leaf_hash"], "leaf_hash"),
                chain_hash=_unhex(document["chain_hash"], "chain_hash"),
            )
        except KeyError as missing:
            return UnreadableLine(number, "entry", f"{missing} is missing")
        except ValueError as error:
            return UnreadableLine(number, "entry", str(error))
    if {"tree_size", "root", "signed", "signature"} & document.keys():
        try:
            return ExportedCheckpoint(number, _checkpoint_from_json(document))
        except KeyError as missing:
            problem = f"{missing} is missing"
        except ValueError as error:
            problem = str(error)
        size = document.get("tree_size")
        return UnreadableLine(
            number, "checkpoint", problem, size if type(size) is int and size >= 0 else None
        )
    return UnreadableLine(number, section, "neither an entry nor a checkpoint")


def _header_json(header: ExportHeader) -> dict[str, Any]:
    return {
        "format": header.format,
        "exported_at": format_timestamp(header.exported_at),
        "public_key_pem": header.public_key_pem,
        "key_id": header.key_id,
    }


def _entry_json(entry: audit_pb2.LedgerEntry) -> dict[str, Any]:
    return {
        "seq": entry.seq,
        "canonical": _b64(entry.canonical_bytes),
        "leaf_hash": entry.leaf_hash.hex(),
        "chain_hash": entry.chain_hash.hex(),
    }


def _checkpoint_message_json(message: audit_pb2.Checkpoint) -> dict[str, Any]:
    try:
        return _checkpoint_json(checkpoint_from_message(message))
    except CheckpointNoteError:
        # Written as received, without a chain hash; the verifier reports the checkpoint.
        return {
            "tree_size": message.tree_size,
            "root": message.root_hash.hex(),
            "timestamp": format_timestamp(message.timestamp.ToDatetime(tzinfo=UTC)),
            "key_id": message.key_id,
            "chain_hash": "",
            "signed": _b64(message.signed_bytes),
            "signature": _b64(message.signature),
        }


def _checkpoint_json(checkpoint: SignedCheckpoint) -> dict[str, Any]:
    return {
        "tree_size": checkpoint.tree_size,
        "root": checkpoint.root.hex(),
        "timestamp": format_timestamp(checkpoint.timestamp),
        "key_id": checkpoint.key_id,
        "chain_hash": checkpoint.chain_hash.hex(),
        "signed": _b64(checkpoint.signed_bytes),
        "signature": _b64(checkpoint.signature),
    }


def _checkpoint_from_json(document: object) -> SignedCheckpoint:
    if not isinstance(document, dict):
        raise ValueError("checkpoint is not a JSON object")
    return SignedCheckpoint(
        tree_size=_int(document["tree_size"], "tree_size"),
        root=_unhex(document["root"], "root"),
        timestamp=parse_timestamp(_str(document["timestamp"], "timestamp")),
        key_id=_str(document["key_id"], "key_id"),
        signed_bytes=_unb64(document["signed"], "signed"),
        signature=_unb64(document["signature"], "signature"),
        chain_hash=_unhex(document["chain_hash"], "chain_hash"),
    )


def _json_line(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":")) + "\n"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(value: object, name: str) -> bytes:
    try:
        return base64.b64decode(_str(value, name), validate=True)
    except binascii.Error:
        raise ValueError(f"{name} is not base64") from None


def _unhex(value: object, name: str) -> bytes:
    if not isinstance(value, str) or not _HEX_HASH.fullmatch(value):
        raise ValueError(f"{name} is not a SHA-256 hash in lowercase hex")
    return bytes.fromhex(value)


def _str(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string")
    return value


def _int(value: object, name: str) -> int:
    if type(value) is not int:
        raise ValueError(f"{name} must be an integer")
    return value
