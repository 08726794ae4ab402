"""Consented collection: which behaviour events may be kept, for which purposes, with which fields.

An event is kept for a purpose only when the purpose was allowed at the event's ``occurred_at``
*and* is still allowed when the event arrives, so neither a grant given afterwards nor a
withdrawal made in between lets it in. It keeps only the fields its purposes allow (the union
over the purposes it may serve) and records those purposes, so every consumer can use it only
for its own.
"""

from __future__ import annotations

import math
import re
import sys
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, TypeAlias

from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2

from services.consent.decisions import ConsentSource, Decision, DecisionRecord, effective_state
from services.consent.purposes import PurposeDefinition

DropReason: TypeAlias = consent_pb2.DropReason.ValueType
EventType: TypeAlias = common_pb2.EventType.ValueType
C = consent_pb2

FUTURE_TOLERANCE: Final = timedelta(minutes=5)
MAX_ID_LENGTH: Final = 128
MAX_TEXT_LENGTH: Final = 256
MAX_QUERY_LENGTH: Final = 1024
MAX_ATTRIBUTES: Final = 32
_CHANNEL: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
_EVENT_TYPE_NAMES: Final = {
    value: name.removeprefix("EVENT_TYPE_").lower()
    for name, value in common_pb2.EventType.items()
    if value
}


def event_type_name(event_type: EventType) -> str:
    """``view`` for EVENT_TYPE_VIEW."""
    return _EVENT_TYPE_NAMES.get(event_type, "unspecified")


@dataclass(slots=True)
class EventFields:
    """The content of a behaviour event, before minimisation.

    Not frozen, but never changed once made: one is made for every event Collect receives,
    and a frozen dataclass takes three times as long to make (4 us against 1.4 us).
    """

    event_id: str
    type: EventType
    occurred_at: datetime | None
    item_id: str = ""
    category: str = ""
    value: float = 0.0
    dwell_ms: int = 0
    query: str = ""
    channel: str = ""
    quantity: int = 0
    currency: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)


def invalid_reason(event: EventFields, now: datetime) -> str:
    """Why an event cannot be kept at all ("" when it can); names the offending field.

    The checks run in order and stop at the first failure; every event of every batch passes
    through here, so nothing is computed for checks that are never reached.
    """
    event_id, occurred_at, attributes = event.event_id, event.occurred_at, event.attributes
    if not event_id:
        return "event_id: is required"
    if len(event_id) > MAX_ID_LENGTH:
        return f"event_id: at most {MAX_ID_LENGTH} characters"
    if event.type not in _EVENT_TYPE_NAMES:
        return "type: must be a known event type"
    if occurred_at is None:
        return "occurred_at: is required"
    if occurred_at > now + FUTURE_TOLERANCE:
        return "occurred_at: more than 5 minutes in the future"
    if len(event.item_id) > MAX_ID_LENGTH:
        return f"item_id: at most {MAX_ID_LENGTH} characters"
    if len(event.category) > MAX_TEXT_LENGTH:
        return f"category: at most {MAX_TEXT_LENGTH} characters"
    if not math.isfinite(event.value):
        return "value: must be a finite number"
    if event.dwell_ms < 0:
        return "dwell_ms: must not be negative"
    if event.quantity < 0:
        return "quantity: must not be negative"
    if len(event.query) > MAX_QUERY_LENGTH:
        return f"query: at most {MAX_QUERY_LENGTH} characters"
    if event.channel and not _CHANNEL.fullmatch(event.channel):
        return "channel: lower snake case, at most 32 characters (web, app, store, call_centre)"
    if event.currency and not _CURRENCY.fullmatch(event.currency):
        return "currency: an ISO 4217 code such as GBP"
    if attributes:
        if len(attributes) > MAX_ATTRIBUTES:
            return f"attributes: at most {MAX_ATTRIBUTES}"
        if any(len(k) > 64 or len(v) > MAX_TEXT_LENGTH for k, v in attributes.items()):
            return "attributes: keys at most 64 and values at most 256 characters"
    if event.type == common_pb2.EVENT_TYPE_DWELL and event.dwell_ms <= 0:
        return "dwell_ms: required for DWELL"
    if event.type == common_pb2.EVENT_TYPE_SEARCH and not event.query:
        return "query: required for SEARCH"
    return ""


@dataclass(frozen=True, slots=True)
class Admission:
    """Whether an event may be kept, and for which purposes."""

    purposes: tuple[str, ...]
    drop_reason: DropReason = C.DROP_REASON_UNSPECIFIED


def admit(
    purposes: Iterable[PurposeDefinition],
    decisions: Sequence[DecisionRecord],
    occurred_at: datetime,
    now: datetime,
) -> Admission:
    """The purposes an event of this person may serve: allowed then *and* now.

    Without any, the drop reason is CONSENT_EXPIRED when a grant that would have admitted it
    has lapsed, NO_CONSENT otherwise.
    """
    by_purpose: dict[str, list[DecisionRecord]] = {}
    for decision in decisions:
        by_purpose.setdefault(decision.purpose, []).append(decision)
    admitted = []
    expired = False
    for purpose in purposes:
        own = by_purpose.get(purpose.id)
        if not own:
            # Undecided: the legal basis alone answers, the same then as now.
            if not purpose.needs_consent:
                admitted.append(purpose.id)
            continue
        then = effective_state(purpose, own, occurred_at)
        current = effective_state(purpose, own, now)
        if then.allowed and current.allowed:
            admitted.append(purpose.id)
        elif C.CONSENT_REASON_EXPIRED in (then.reason, current.reason):
            expired = True
    if admitted:
        return Admission(tuple(sorted(admitted)))
    return Admission((), C.DROP_REASON_CONSENT_EXPIRED if expired else C.DROP_REASON_NO_CONSENT)


_DecisionRow: TypeAlias = tuple[
    int, str, Decision, datetime, datetime | None, ConsentSource, str, str
]
"""A DecisionRecord without its person."""
_ADMISSIONS: Final[dict[tuple[tuple[str, ...], DropReason], Admission]] = {}
"""Each distinct answer once, by its content: what timelines keep."""


class ConsentTimeline:
    """One person's decisions, answering ``admit`` for any event from a few worked-out spans.

    ``admit`` depends on the event's time and on the arrival time only through which of the
    person's decisions had been made, and which of their grants had lapsed, by then: the
    moments of the decisions and of their expiries cut time into spans, and two events whose
    times fall in the same spans get the same answer. The answer of the last pair of spans
    asked about is kept, for the purposes of one ``generation``.

    A hundred thousand are held at once (:mod:`services.consent.timelines`), so everything is
    kept in plain tuples, which the garbage collector stops scanning (its full collections
    stall every thread), sharing their strings and moments: 1 kB a person instead of 2. The
    decisions are made records again only when an answer has to be worked out.
    """

    __slots__ = ("_answer", "_moments", "_person", "_rows")

    def __init__(self, decisions: Sequence[DecisionRecord]) -> None:
        moments: dict[datetime, datetime] = {}
        self._person = decisions[0].person_id if decisions else ""
        self._rows: tuple[_DecisionRow, ...] = tuple(
            (
                d.seq,
                sys.intern(d.purpose),
                d.decision,
                moments.setdefault(d.occurred_at, d.occurred_at),
                None if d.expires_at is None else moments.setdefault(d.expires_at, d.expires_at),
                d.source,
                sys.intern(d.policy_version),
                sys.intern(d.signal),
            )
            for d in decisions
        )
        self._moments = tuple(sorted(moments))
        self._answer: tuple[int, int, int, tuple[tuple[str, ...], DropReason]] | None = None
        """(generation, span of the event, span of the arrival, answer) last worked out."""

    @property
    def decisions(self) -> tuple[DecisionRecord, ...]:
        """In ledger order."""
        person = self._person
        return tuple(DecisionRecord(row[0], person, *row[1:]) for row in self._rows)

    @property
    def last_seq(self) -> int:
        return self._rows[-1][0] if self._rows else 0

    def with_decisions(self, later: Sequence[DecisionRecord]) -> ConsentTimeline:
        """The timeline with decisions recorded after the ones it holds (older ones skipped)."""
        last = self.last_seq
        return ConsentTimeline([*self.decisions, *(d for d in later if d.seq > last)])

    def admit(
        self,
        purposes: Sequence[PurposeDefinition],
        occurred_at: datetime,
        now: datetime,
        *,
        generation: int | None = None,
    ) -> Admission:
        """``admit(purposes, self.decisions, occurred_at, now)``.

        ``generation`` stands for the purposes (the caller changes it whenever they change):
        with one, the answer is kept for the next event that falls in the same spans.
        """
        then = bisect_right(self._moments, occurred_at)
        current = bisect_right(self._moments, now)
        known = self._answer
        if (
            generation is not None
            and known is not None
            and known[:3] == (generation, then, current)
        ):
            return _ADMISSIONS[known[3]]
        answer = admit(purposes, self.decisions, occurred_at, now)
        content = (answer.purposes, answer.drop_reason)
        _ADMISSIONS.setdefault(content, answer)
        if generation is not None:
            self._answer = (generation, then, current, content)
        return answer


def kept_fields(purposes: Iterable[PurposeDefinition]) -> frozenset[str]:
    """Every field some of the purposes may keep."""
    return frozenset(name for purpose in purposes for name in purpose.allowed_fields)


def minimise(event: EventFields, keep: frozenset[str]) -> EventFields:
    """The event with every field its purposes may not keep emptied (itself when none is)."""
    if (
        not event.attributes
        and (not event.item_id or "item_id" in keep)
        and (not event.category or "category" in keep)
        and ("value" in keep or (event.value == 0.0 and math.copysign(1.0, event.value) > 0))
        and (not event.dwell_ms or "dwell_ms" in keep)
        and (not event.query or "query" in keep)
        and (not event.channel or "channel" in keep)
        and (not event.quantity or "quantity" in keep)
        and (not event.currency or "currency" in keep)
    ):
        return event
    return EventFields(
        event_id=event.event_id,
        type=event.type,
        occurred_at=event.occurred_at,
        item_id=event.item_id if "item_id" in keep else "",
        category=event.category if "category" in keep else "",
        value=event.value if "value" in keep else 0.0,
        dwell_ms=event.dwell_ms if "dwell_ms" in keep else 0,
        query=event.query if "query" in keep else "",
        channel=event.channel if "channel" in keep else "",
        quantity=event.quantity if "quantity" in keep else 0,
        currency=event.currency if "currency" in keep else "",
        attributes={k: v for k, v in event.attributes.items() if f"attributes.{k}" in keep},
    )


def retain_until(occurred_at: datetime, purposes: Iterable[PurposeDefinition]) -> datetime:
    """When the event must go: after the longest retention among the purposes it serves."""
    days = max((p.retention_days for p in purposes), default=0)
    return occurred_at + timedelta(days=days)
