"""The consent service's use cases: purposes, decisions, signals and the ledger behind them.

Every decision is appended to the ledger, stored for quick answers and — when it changes what
the person allows — published as ConsentChanged on consent's event log, all in one transaction.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, TypeAlias

from opentelemetry import metrics
from sqlalchemy.engine import Connection
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, consent_pb2
from steward.events.v1 import events_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.times import timestamp, utc, utc_now
from services.consent import ledger
from services.consent.check_cache import CheckInputs, by_purpose
from services.consent.decisions import (
    ConsentSource,
    ConsentState,
    Decision,
    DecisionRecord,
    effective_state,
)
from services.consent.keystore import KeyStore
from services.consent.purposes import DEFAULT_PURPOSES, PurposeDefinition, validate_purpose
from services.consent.signals import gpc_conflict_violation, requires_gpc_acknowledgement
from services.consent.store import (
    PERSON_LINKS,
    AppendedEntry,
    ConsentStore,
    WithdrawalStore,
    person_group,
)

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
EntryKind: TypeAlias = audit_pb2.EntryKind.ValueType
A = audit_pb2

SYSTEM_ACTOR = "system"


@dataclass(frozen=True, slots=True)
class DecisionInput:
    """One decision as a caller (or a signal) states it."""

    purpose: str
    decision: Decision
    expires_at: datetime | None = None
    policy_version: str = ""
    notice_sha256: str = ""
    signal: str = ""
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Receipt:
    seq: int
    leaf_hash: bytes
    purpose: str


class LedgerTree:
    """The ledger's leaf hashes in memory, for roots and proofs without re-reading the table."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._leaves: list[bytes] = []
        self._frontier = ledger.MerkleFrontier()

    def sync(self, store: ConsentStore, connection: Connection) -> int:
        with self._lock:
            for leaf in store.leaf_hashes(connection, len(self._leaves)):
                self._leaves.append(leaf)
                self._frontier.append(leaf)
            return len(self._leaves)

    def root(self, tree_size: int) -> bytes:
        with self._lock:
            if tree_size == len(self._leaves):
                return self._frontier.root()
            return ledger.merkle_root(self._leaves[:tree_size])

    def inclusion_proof(self, index: int, tree_size: int) -> list[bytes]:
        with self._lock:
            return ledger.inclusion_proof(self._leaves, index, tree_size)

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        with self._lock:
            return ledger.consistency_proof(self._leaves, first, second)

    def leaf(self, index: int) -> bytes:
        with self._lock:
            return self._leaves[index]


class ConsentService:
    """Purposes, decisions, signals and the ledger, over one consent store."""

    def __init__(
        self,
        store: ConsentStore,
        keystore: KeyStore,
        signer: Callable[[bytes], bytes],
        signing_key_id: str,
        public_key_pem: str,
        *,
        clock: Clock = utc_now,
        checkpoint_every: int = 1000,
        consumers: Sequence[str] = (),
        meter: metrics.Meter | None = None,
    ) -> None:
        self.store = store
        self._decisions = (
            None
            if meter is None
            else meter.create_counter(
                "steward.consent.decisions",
                unit="{decision}",
                description="Consent decisions recorded, by purpose, decision, source and kind",
            )
        )
        self.consumers = tuple(consumers)
        """The consumers of consent's log that a withdrawal or erasure must reach (see
        services/consent/propagation.py)."""
        self.keystore = keystore
        self._sign = signer
        self.signing_key_id = signing_key_id
        self.public_key_pem = public_key_pem
        self.clock = clock
        self.checkpoint_every = checkpoint_every
        self.tree = LedgerTree()
        self._purposes_lock = threading.Lock()
        self._purposes: dict[str, PurposeDefinition] | None = None

    # Purposes ------------------------------------------------------------------------------------

    def purposes(self) -> dict[str, PurposeDefinition]:
        with self._purposes_lock:
            if self._purposes is None:
                with self.store.reading() as connection:
                    self._purposes = self.store.current_purposes(connection)
            return dict(self._purposes)

    def ensure_default_purposes(self) -> None:
        """On first start, create the default purposes (each recorded on the ledger)."""
        if self.purposes():
            return
        for purpose in DEFAULT_PURPOSES:
            self.define_purpose(purpose, SYSTEM_ACTOR)

    def define_purpose(
        self, purpose: PurposeDefinition, actor: str
    ) -> tuple[PurposeDefinition, Receipt]:
        validate_purpose(purpose).raise_if_any("invalid purpose")
        now = self.clock()
        with self.store.writing() as connection:
            stored = self.store.save_purpose(connection, _replace_time(purpose, now))
            [entry] = self.store.append_ledger(
                connection,
                [
                    ledger.LedgerRecord(
                        seq=0,
                        recorded_at=now,
                        kind=A.ENTRY_KIND_PURPOSE_CHANGE,
                        subject="",
                        purpose=stored.id,
                        decision=common_pb2.DECISION_UNSPECIFIED,
                        source=consent_pb2.CONSENT_SOURCE_UNSPECIFIED,
                        policy_version=stored.policy_version,
                        notice_sha256=stored.notice_sha256,
                        expires_at=None,
                        actor=actor,
                        occurred_at=now,
                        details=_purpose_details(stored),
                    )
                ],
            )
            self._after_append(connection)
        with self._purposes_lock:
            self._purposes = None
        return stored, Receipt(entry.record.seq, entry.leaf_hash, stored.id)

    # Decisions -----------------------------------------------------------------------------------

    def record(
        self,
        person_id: str,
        decisions: Sequence[DecisionInput],
        *,
        source: ConsentSource,
        occurred_at: datetime,
        actor: str,
        locale: str = "",
        acknowledge_gpc_conflict: bool = False,
        kind: EntryKind = A.ENTRY_KIND_DECISION,
    ) -> list[Receipt]:
        """Record decisions of one person; refuses unknown purposes and outdated notices.

        A grant for a purpose that a GPC signal withdrew needs ``acknowledge_gpc_conflict``;
        signals (``kind`` SIGNAL) cannot acknowledge, so such grants from signals are dropped.
        """
        purposes = self.purposes()
        self._check_decisions(decisions, purposes, explicit=kind == A.ENTRY_KIND_DECISION)
        subject = self.keystore.subject(person_id)
        now = self.clock()
        with self.store.writing() as connection:
            existing = self.store.decisions_of(connection, person_id)
            before = {p: self._state(purposes[p], existing, now) for p in purposes}
            gpc_blocked = [
                (index, d.purpose)
                for index, d in enumerate(decisions)
                if requires_gpc_acknowledgement(before[d.purpose].withdrawn_by_gpc, d.decision)
                and not acknowledge_gpc_conflict
            ]
            if gpc_blocked and kind == A.ENTRY_KIND_SIGNAL:
                blocked = {index for index, _ in gpc_blocked}
                decisions = [d for i, d in enumerate(decisions) if i not in blocked]
                if not decisions:
                    return []
            elif gpc_blocked:
                raise FailedPrecondition(
                    [gpc_conflict_violation(purpose) for _, purpose in gpc_blocked],
                    "a Global Privacy Control signal withdrew these purposes",
                )
            records = []
            for decision in decisions:
                purpose = purposes[decision.purpose]
                expires_at = decision.expires_at
                if expires_at is None and decision.decision == common_pb2.DECISION_GRANTED:
                    expires_at = occurred_at + purpose.default_lifetime
                details = dict(decision.details)
                if locale:
                    details["locale"] = locale
                overrides_gpc = before[decision.purpose].withdrawn_by_gpc and (
                    decision.decision == common_pb2.DECISION_GRANTED
                )
                if overrides_gpc:
                    details["gpc_conflict_acknowledged"] = "true"
                if decision.signal:
                    details["signal"] = decision.signal
                records.append(
                    ledger.LedgerRecord(
                        seq=0,
                        recorded_at=now,
                        kind=kind,
                        subject=subject,
                        purpose=purpose.id,
                        decision=decision.decision,
                        source=source,
                        policy_version=decision.policy_version or purpose.policy_version,
                        notice_sha256=decision.notice_sha256 or purpose.notice_sha256,
                        expires_at=expires_at,
                        actor=actor,
                        occurred_at=occurred_at,
                        details=details,
                    )
                )
            appended = self.store.append_ledger(connection, records)
            stored = [
                (
                    DecisionRecord(
                        seq=entry.record.seq,
                        person_id=person_id,
                        purpose=entry.record.purpose,
                        decision=entry.record.decision,
                        occurred_at=occurred_at,
                        expires_at=entry.record.expires_at,
                        source=source,
                        policy_version=entry.record.policy_version,
                        signal=decision.signal,
                    ),
                    "gpc_conflict_acknowledged" in entry.record.details,
                )
                for entry, decision in zip(appended, decisions, strict=True)
            ]
            self.store.save_decisions(connection, stored)
            after_all = [*existing, *(d for d, _ in stored)]
            # Published under the person the group resolves to, whose consent it now is.
            group = person_group(connection, person_id)
            root = group[0]
            self.store.changes_checks_of(connection, group)
            changes = []
            withdrawn = []
            for purpose_id in dict.fromkeys(d.purpose for d in decisions):
                after = self._state(purposes[purpose_id], after_all, now)
                if _changed(before[purpose_id], after):
                    changes.append(_consent_changed(root, after))
                    withdrawn.append(before[purpose_id].allowed and not after.allowed)
            envelopes = self.store.outbox.append(connection, changes, occurred_at=now)
            if self.consumers:
                WithdrawalStore.save(
                    connection,
                    [
                        {
                            "ledger_seq": envelope.consent_changed.ledger_seq,
                            "envelope_seq": envelope.seq,
                            "person_id": person_id,
                            "purpose": envelope.consent_changed.purpose,
                            "subject": subject,
                            "withdrawn_at": now,
                            "acknowledgements": {},
                        }
                        for envelope, stops in zip(envelopes, withdrawn, strict=True)
                        if stops
                    ],
                )
            self._after_append(connection)
        if self._decisions is not None:
            for entry in appended:
                self._decisions.add(
                    1,
                    {
                        "purpose": entry.record.purpose,
                        "decision": common_pb2.Decision.Name(entry.record.decision),
                        "source": consent_pb2.ConsentSource.Name(entry.record.source),
                        "kind": audit_pb2.EntryKind.Name(entry.record.kind),
                    },
                )
        return [Receipt(e.record.seq, e.leaf_hash, e.record.purpose) for e in appended]

    def _check_decisions(
        self,
        decisions: Sequence[DecisionInput],
        purposes: dict[str, PurposeDefinition],
        *,
        explicit: bool,
    ) -> None:
        unknown = [
            (f"decisions[{i}].purpose", f"unknown purpose {d.purpose!r}")
            for i, d in enumerate(decisions)
            if d.purpose not in purposes
        ]
        if unknown:
            raise InvalidArgument(unknown, "unknown purpose")
        outdated = []
        for decision in decisions:
            purpose = purposes[decision.purpose]
            if explicit and decision.policy_version != purpose.policy_version:
                outdated.append(
                    (
                        "POLICY_VERSION",
                        f"purposes/{purpose.id}",
                        f"the current policy version is {purpose.policy_version!r}, "
                        f"not {decision.policy_version!r}",
                    )
                )
            elif decision.notice_sha256 and decision.notice_sha256 != purpose.notice_sha256:
                outdated.append(
                    (
                        "NOTICE",
                        f"purposes/{purpose.id}",
                        "the notice text hash is not that of the current notice",
                    )
                )
        if outdated:
            raise FailedPrecondition(outdated, "decision refers to an outdated notice")

    @staticmethod
    def _state(
        purpose: PurposeDefinition, decisions: Sequence[DecisionRecord], at: datetime
    ) -> ConsentState:
        return effective_state(purpose, (d for d in decisions if d.purpose == purpose.id), at)

    def states(self, person_id: str, at: datetime) -> list[ConsentState]:
        """The person's effective consent for every purpose, by purpose id."""
        with self.store.reading() as connection:
            return list(self.states_in(connection, person_id, at).values())

    def states_in(
        self, connection: Connection, person_id: str, at: datetime
    ) -> dict[str, ConsentState]:
        """``states`` read on the caller's connection, by purpose id."""
        purposes = self.purposes()
        decisions = self.store.decisions_of(connection, person_id)
        return {p: self._state(purposes[p], decisions, at) for p in sorted(purposes)}

    def follow_identity(self, connection: Connection, envelope: events_pb2.Envelope) -> None:
        """Apply a merge, unmerge or forget from identity's log to the person links, in the
        consumer's transaction, and publish ConsentChanged for each person a group now resolves
        to whose consent the change altered (a merge can join a grant to a person without one;
        an unmerge takes it away again)."""
        body = envelope.WhichOneof("body")
        if body == "persons_merged":
            named = [envelope.persons_merged.surviving_person_id]
        elif body == "person_unmerged":
            split = envelope.person_unmerged
            named = [split.surviving_person_id, split.restored_person_id]
        else:
            PERSON_LINKS.apply(connection, envelope)
            return
        now = self.clock()
        before = {person: self.states_in(connection, person, now) for person in named}
        PERSON_LINKS.apply(connection, envelope)
        changes: list[events_pb2.ConsentChanged] = []
        for person in named:
            root = person_group(connection, person)[0]
            if root != person:
                continue  # an alias now: consumers follow the group's root
            after = self.states_in(connection, person, now)
            changes.extend(
                _consent_changed(person, state)
                for purpose, state in after.items()
                if _changed(before[person][purpose], state)
            )
        self.store.outbox.append(connection, changes, occurred_at=now)

    def check(
        self,
        person_id: str,
        purpose_id: str,
        at: datetime,
        *,
        erasure_markers: Callable[[], Sequence[str]] | None = None,
    ) -> ConsentState:
        """Whether one purpose is allowed; ERASED when one of ``erasure_markers()`` is recorded.

        The inputs come from the store's cache of recent persons (``ConsentStore.checks``), read
        on a miss: the group's decisions, and whether the person was erased only for a purpose
        without any decision (erasure deletes a person's decisions and none is accepted for an
        erased person, so almost every check needs just the decisions). The state itself is
        computed here, at ``at``, so an expiry needs no invalidation.
        """
        purpose = self.purposes().get(purpose_id)
        if purpose is None:
            raise NotFound("purpose", purpose_id)
        checks = self.store.checks
        generation = checks.generation
        inputs = checks.get(person_id)
        if inputs is None:
            inputs = CheckInputs(by_purpose(self.store.check_decisions(person_id)))
            checks.offer(person_id, inputs, generation)
        decisions = inputs.decisions.get(purpose_id, ())
        if not decisions and erasure_markers is not None:
            if inputs.erased is None:
                inputs = inputs.with_erased(self.store.erased_among(erasure_markers()))
                checks.offer(person_id, inputs, generation)
            if inputs.erased:
                return ConsentState(purpose.id, False, consent_pb2.CONSENT_REASON_ERASED)
        return effective_state(purpose, decisions, at)

    # Ledger and checkpoints ----------------------------------------------------------------------

    def _after_append(self, connection: Connection) -> None:
        """Sign a checkpoint once ``checkpoint_every`` entries have gathered since the last."""
        size = self.store.ledger_size(connection)
        latest = self.store.checkpoint(connection)
        if size - (latest.tree_size if latest else 0) >= self.checkpoint_every:
            self._sign_checkpoint(connection, size)

    def _sign_checkpoint(self, connection: Connection, size: int) -> ledger.SignedCheckpoint:
        self.tree.sync(self.store, connection)
        checkpoint = ledger.sign_checkpoint(
            self._sign,
            size,
            self.tree.root(size),
            self.clock(),
            self.store.chain_hash_at(connection, size),
            key_id=self.signing_key_id,
        )
        self.store.save_checkpoint(connection, checkpoint)
        return checkpoint

    def checkpoint(self, *, sign_now: bool) -> ledger.SignedCheckpoint:
        """The newest checkpoint; with ``sign_now`` (or none yet), one of the current tree."""
        with self.store.writing() as connection:
            self.store.changes_checks_of(connection, ())  # the ledger's tree only
            latest = self.store.checkpoint(connection)
            size = self.store.ledger_size(connection)
            if latest is not None and (not sign_now or latest.tree_size == size):
                return latest
            if size == 0:
                raise FailedPrecondition([("LEDGER", "ledger", "the ledger is empty")])
            return self._sign_checkpoint(connection, size)

    def checkpoint_if_grown(self) -> ledger.SignedCheckpoint | None:
        """Sign a checkpoint when entries were appended since the last one (the timer's job)."""
        with self.store.writing() as connection:
            self.store.changes_checks_of(connection, ())  # the ledger's tree only
            latest = self.store.checkpoint(connection)
            size = self.store.ledger_size(connection)
            if size == 0 or (latest is not None and latest.tree_size >= size):
                return None
            return self._sign_checkpoint(connection, size)

    def inclusion(
        self, seq: int, tree_size: int
    ) -> tuple[int, bytes, list[bytes], ledger.SignedCheckpoint | None, object]:
        """(tree size, leaf hash, audit path, checkpoint at that size, entry row) for ``seq``."""
        if tree_size == 0:
            # Against the newest checkpoint; one is signed now if none covers the entry yet.
            latest = self.checkpoint(sign_now=False)
            if latest.tree_size < seq:
                latest = self.checkpoint(sign_now=True)
            tree_size = latest.tree_size
        with self.store.reading() as connection:
            size = self.tree.sync(self.store, connection)
            if not 0 < tree_size <= size:
                raise InvalidArgument({"tree_size": f"must be between 1 and {size}"})
            if not 0 < seq <= tree_size:
                raise InvalidArgument({"seq": f"must be between 1 and {tree_size}"})
            entry = self.store.entry(connection, seq)
            checkpoint = self.store.checkpoint(connection, tree_size)
        return (
            tree_size,
            self.tree.leaf(seq - 1),
            self.tree.inclusion_proof(seq - 1, tree_size),
            checkpoint,
            entry,
        )

    def consistency(self, first: int, second: int) -> tuple[int, list[bytes]]:
        with self.store.reading() as connection:
            size = self.tree.sync(self.store, connection)
            if second == 0:
                latest = self.store.checkpoint(connection)
                second = latest.tree_size if latest is not None else size
        if not 0 < second <= size:
            raise InvalidArgument({"second_tree_size": f"must be between 1 and {size}"})
        if not 0 < first <= second:
            raise InvalidArgument({"first_tree_size": f"must be between 1 and {second}"})
        return second, self.tree.consistency_proof(first, second)

    def export(self, from_seq: int, to_seq: int) -> Iterator[audit_pb2.ExportLedgerResponse]:
        """Header, entries in seq order, then the checkpoints up to ``to_seq`` (every one when
        it is 0), also those beyond the newest entry the table holds."""
        with self.store.reading() as connection:
            size = self.store.ledger_size(connection)
        last = min(to_seq or size, size)
        header = audit_pb2.ExportHeader(
            format_version=1,
            public_key_pem=self.public_key_pem,
            exported_at=timestamp(self.clock()),
        )
        yield audit_pb2.ExportLedgerResponse(header=header)
        seq = max(from_seq, 1)
        while seq <= last:
            with self.store.reading() as connection:
                rows = self.store.entries(connection, seq, last)
            if not rows:
                break
            for row in rows:
                yield audit_pb2.ExportLedgerResponse(entry=entry_message(row))
            seq = rows[-1].seq + 1
        with self.store.reading() as connection:
            # Up to the seq asked for, not to the table's last row: a checkpoint beyond the last
            # row is what shows an auditor that rows were cut off the end of the table.
            checkpoints = self.store.checkpoints(connection, to_seq or _ALL_SEQS)
        for checkpoint in checkpoints:
            yield audit_pb2.ExportLedgerResponse(
                checkpoint=ledger.to_checkpoint_message(checkpoint)
            )


_ALL_SEQS: Final = 2**63 - 1


def record_from_row(row: Any) -> ledger.LedgerRecord:
    """The entry as the table's columns say now (not as its stored canonical bytes say)."""
    return ledger.LedgerRecord(
        seq=row.seq,
        recorded_at=utc(row.recorded_at),
        kind=row.kind,
        subject=row.subject,
        purpose=row.purpose,
        decision=row.decision,
        source=row.source,
        policy_version=row.policy_version,
        notice_sha256=row.notice_sha256,
        expires_at=None if row.expires_at is None else utc(row.expires_at),
        actor=row.actor,
        occurred_at=None if row.occurred_at is None else utc(row.occurred_at),
        details=dict(row.details),
    )


def entry_message(row: Any) -> audit_pb2.LedgerEntry:
    """An exported entry, re-encoded from its columns next to its stored hashes.

    Re-encoding makes a column changed by hand visible to the verifier as a leaf that no longer
    matches, even when the stored canonical bytes were left alone.
    """
    record = record_from_row(row)
    return ledger.to_entry_message(
        record, ledger.canonical_bytes(record), bytes(row.leaf_hash), bytes(row.chain_hash)
    )


def _replace_time(purpose: PurposeDefinition, now: datetime) -> PurposeDefinition:
    from dataclasses import replace

    return replace(purpose, updated_at=now)


def _purpose_details(purpose: PurposeDefinition) -> dict[str, str]:
    return {
        "legal_basis": common_pb2.LegalBasis.Name(purpose.legal_basis),
        "revision": str(purpose.revision),
        "default_lifetime_seconds": str(int(purpose.default_lifetime.total_seconds())),
        "retention_days": str(purpose.retention_days),
        "allowed_fields": ",".join(purpose.allowed_fields),
        "gpc_withdraws": "true" if purpose.gpc_withdraws else "false",
    }


def _changed(before: ConsentState, after: ConsentState) -> bool:
    return (before.allowed, before.reason, before.expires_at) != (
        after.allowed,
        after.reason,
        after.expires_at,
    )


def _consent_changed(person_id: str, state: ConsentState) -> events_pb2.ConsentChanged:
    deciding = state.deciding
    return events_pb2.ConsentChanged(
        person_id=person_id,
        purpose=state.purpose,
        decision=deciding.decision if deciding else common_pb2.DECISION_UNSPECIFIED,
        allowed=state.allowed,
        effective_at=timestamp(deciding.occurred_at if deciding else None),
        expires_at=timestamp(state.expires_at),
        ledger_seq=deciding.seq if deciding else 0,
    )


__all__ = ["AppendedEntry", "ConsentService", "DecisionInput", "LedgerTree", "Receipt"]
