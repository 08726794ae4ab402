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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Final, TypeAlias

from steward.common.v1 import common_pb2
from steward.consent.v1 import consent_pb2

from services.consent.decisions import DecisionRecord, effective_state
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


@dataclass(frozen=True, slots=True)
class EventFields:
    """The content of a behaviour event, before minimisation."""

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
    """Why an event cannot be kept at all ("" when it can); names the offending field."""
    problems = [
        (not event.event_id, "event_id: is required"),
        (len(event.event_id) > MAX_ID_LENGTH, f"event_id: at most {MAX_ID_LENGTH} characters"),
        (event.type not in _EVENT_TYPE_NAMES, "type: must be a known event type"),
        (event.occurred_at is None, "occurred_at: is required"),
        (
            event.occurred_at is not None and event.occurred_at > now + FUTURE_TOLERANCE,
            "occurred_at: more than 5 minutes in the future",
        ),
        (len(event.item_id) > MAX_ID_LENGTH, f"item_id: at most {MAX_ID_LENGTH} characters"),
        (len(event.category) > MAX_TEXT_LENGTH, f"category: at most {MAX_TEXT_LENGTH} characters"),
        (not math.isfinite(event.value), "value: must be a finite number"),
        (event.dwell_ms < 0, "dwell_ms: must not be negative"),
        (event.quantity < 0, "quantity: must not be negative"),
        (len(event.query) > MAX_QUERY_LENGTH, f"query: at most {MAX_QUERY_LENGTH} characters"),
        (
            bool(event.channel) and not _CHANNEL.fullmatch(event.channel),
            "channel: lower snake case, at most 32 characters (web, app, store, call_centre)",
        ),
        (
            bool(event.currency) and not _CURRENCY.fullmatch(event.currency),
            "currency: an ISO 4217 code such as GBP",
        ),
        (len(event.attributes) > MAX_ATTRIBUTES, f"attributes: at most {MAX_ATTRIBUTES}"),
        (
            any(len(k) > 64 or len(v) > MAX_TEXT_LENGTH for k, v in event.attributes.items()),
            "attributes: keys at most 64 and values at most 256 characters",
        ),
        (
            event.type == common_pb2.EVENT_TYPE_DWELL and event.dwell_ms <= 0,
            "dwell_ms: required for DWELL",
        ),
        (
            event.type == common_pb2.EVENT_TYPE_SEARCH and not event.query,
            "query: required for SEARCH",
        ),
    ]
    return next((description for failed, description in problems if failed), "")


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
        own = by_purpose.get(purpose.id, [])
        then = effective_state(purpose, own, occurred_at)
        current = effective_state(purpose, own, now)
        if then.allowed and current.allowed:
            admitted.append(purpose.id)
        elif C.CONSENT_REASON_EXPIRED in (then.reason, current.reason):
            expired = True
    if admitted:
        return Admission(tuple(sorted(admitted)))
    return Admission((), C.DROP_REASON_CONSENT_EXPIRED if expired else C.DROP_REASON_NO_CONSENT)


def kept_fields(purposes: Iterable[PurposeDefinition]) -> frozenset[str]:
    """Every field some of the purposes may keep."""
    return frozenset(name for purpose in purposes for name in purpose.allowed_fields)


def minimise(event: EventFields, keep: frozenset[str]) -> EventFields:
    """The event with every field its purposes may not keep emptied."""
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
