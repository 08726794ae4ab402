"""Following withdrawals and erasures to every consumer of consent's log.

A withdrawal or an erasure has taken effect only once tagging and recommend have applied it.
Each consumer acknowledges what it has applied (``EventLogService.Ack``, whichever transport
carries the envelopes), and consent compares the acknowledged seq with the envelope of every
withdrawal and erasure still under way:

- a withdrawal is followed from the ConsentChanged envelope that published it; once every
  registered consumer has acknowledged it, a "propagated" entry on the ledger records when, with
  the time each consumer took (GetConsent shows the same);
- an erasure waits for each consumer's acknowledgement of its SubjectErased envelope, which is
  that consumer's part done (GetErasure); the last part done completes the erasure on the ledger.

Once every consumer has acknowledged a SubjectErased envelope, the envelopes that named the
person (behaviour, consent changes, the SubjectErased itself) are redacted from the log.

The registered consumers are those of the services deployed with this consent (see
``ServiceContext.deployed`` and ``LOG_CONSUMERS``): one that is not deployed holds nothing to
wait for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Connection
from steward.consent.v1 import audit_pb2 as A
from steward.consent.v1 import consent_pb2 as C

from services.common.times import utc
from services.consent import ledger
from services.consent.collection import CollectionService
from services.consent.service import ConsentService
from services.consent.store import PRODUCER, WithdrawalStore


@dataclass(frozen=True, slots=True)
class WithdrawalPropagation:
    """How far a withdrawal has reached: who acknowledged it when, and the ledger entry that
    says everyone has (0 until then)."""

    complete: bool
    acknowledgements: dict[str, datetime]
    propagated_seq: int


def took_ms(since: datetime, acknowledgements: dict[str, datetime]) -> dict[str, str]:
    """The ledger details naming how long each consumer took, in whole milliseconds."""
    return {
        f"took_ms.{consumer}": str(max(0, round((at - since).total_seconds() * 1000)))
        for consumer, at in sorted(acknowledgements.items())
    }


class Propagation:
    """Records consumers' acknowledgements against pending withdrawals and erasures."""

    def __init__(self, consent: ConsentService, collection: CollectionService) -> None:
        self._consent = consent
        self._collection = collection

    @property
    def consumers(self) -> tuple[str, ...]:
        return self._consent.consumers

    def acknowledged(self, producer: str, consumer: str, seq: int) -> None:
        """``consumer`` has applied consent's log up to ``seq``: advance what it completes.

        Consumers acknowledge often, mostly with nothing pending, so a short read decides
        whether a write transaction is needed at all.
        """
        if producer != PRODUCER or consumer not in self.consumers:
            return
        store = self._consent.store
        with store.reading() as connection:
            pending = self._pending(connection, consumer, seq)
        if not any(pending):
            return
        now = self._consent.clock()
        with store.writing() as connection:
            store.changes_checks_of(connection, ())  # nobody's consent changes here
            withdrawals, erasures = self._pending(connection, consumer, seq)
            for row in withdrawals:
                self._acknowledge_withdrawal(connection, row, consumer, now)
            for row in erasures:
                applied = f"applied SubjectErased (seq {row.services[consumer]['awaits_seq']})"
                self._collection.finish_parts(connection, row, {consumer: (True, applied)}, now)
            if erasures:
                store.outbox.redact_settled(connection, self.consumers)

    def reconcile(self) -> None:
        """Apply every consumer's stored acknowledgement again: what an acknowledgement left
        undone (its callback failed, or another replica of consent took it) is done here, on a
        timer, instead of waiting for the consumer's next one."""
        store = self._consent.store
        with store.reading() as connection:
            acknowledged = store.outbox.acknowledgements(connection)
        for consumer in self.consumers:
            if consumer in acknowledged:
                self.acknowledged(PRODUCER, consumer, acknowledged[consumer].seq)

    def _pending(
        self, connection: Connection, consumer: str, seq: int
    ) -> tuple[list[Any], list[Any]]:
        """The withdrawals and open erasures an acknowledgement of ``seq`` by ``consumer``
        advances."""
        withdrawals = [
            row
            for row in WithdrawalStore.unpropagated_up_to(connection, seq)
            if consumer not in row.acknowledgements
        ]
        erasures = [
            row
            for row in self._collection.store.open_erasures(connection)
            if (part := row.services.get(consumer)) is not None
            and part["state"] == C.ERASURE_STATE_PENDING
            and 0 < part.get("awaits_seq", 0) <= seq
        ]
        return withdrawals, erasures

    def _acknowledge_withdrawal(
        self, connection: Connection, row: Any, consumer: str, now: datetime
    ) -> None:
        acknowledgements = {**row.acknowledgements, consumer: now.isoformat()}
        values: dict[str, Any] = {"acknowledgements": acknowledgements}
        if set(self.consumers) <= acknowledgements.keys():
            times = {name: utc(datetime.fromisoformat(at)) for name, at in acknowledgements.items()}
            [entry] = self._consent.store.append_ledger(
                connection,
                [
                    ledger.LedgerRecord(
                        seq=0,
                        recorded_at=now,
                        kind=A.ENTRY_KIND_WITHDRAWAL_PROPAGATED,
                        subject=row.subject,
                        purpose=row.purpose,
                        actor="system",
                        occurred_at=now,
                        details={
                            "withdrawal_seq": str(row.ledger_seq),
                            **took_ms(utc(row.withdrawn_at), times),
                        },
                    )
                ],
            )
            values["propagated_seq"] = entry.record.seq
        WithdrawalStore.update(connection, row.ledger_seq, values)

    def of_entries(self, ledger_seqs: Sequence[int]) -> dict[int, WithdrawalPropagation]:
        """The propagation of the withdrawals among these ledger entries, by ledger seq."""
        with self._consent.store.reading() as connection:
            rows = WithdrawalStore.of_entries(connection, ledger_seqs)
        return {
            seq: WithdrawalPropagation(
                complete=row.propagated_seq is not None,
                acknowledgements={
                    name: utc(datetime.fromisoformat(at))
                    for name, at in sorted(row.acknowledgements.items())
                },
                propagated_seq=row.propagated_seq or 0,
            )
            for seq, row in rows.items()
        }
