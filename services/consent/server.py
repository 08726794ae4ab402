"""gRPC servicers of the consent service: validate, resolve the subject, map onto the use cases."""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import grpc
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry import metrics
from sqlalchemy.engine import Connection
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, audit_pb2_grpc, consent_pb2, consent_pb2_grpc
from steward.events.v1 import events_pb2

from services.common.callers import caller_of
from services.common.config import Settings
from services.common.consumer import LOG_CONSUMERS, Consumer, start_log_consumers
from services.common.context import PeerChannels, ServiceContext, ServiceParts
from services.common.db import make_engine
from services.common.errors import (
    FailedPrecondition,
    FieldViolations,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from services.common.eventlog import ProducerLog
from services.common.identifiers import (
    IdentifierError,
    PseudonymisedIdentifier,
    pseudonymise_identifier,
)
from services.common.migrations import upgrade
from services.common.server import ServiceRegistration, deadline_remaining
from services.common.tasks import PeriodicTask, start_all
from services.common.telemetry import instrument_channel
from services.common.times import (
    INVALID_DURATION,
    INVALID_MOMENT,
    duration_of,
    moment_of,
    timestamp,
)
from services.consent import keystore as keystore_module
from services.consent import ledger, signals, tcf
from services.consent.access import PeerExports
from services.consent.collect import EventFields
from services.consent.collection import (
    CollectInput,
    CollectionService,
    CollectResult,
    ErasureView,
)
from services.consent.decisions import ConsentState
from services.consent.identity_client import IdentityClient
from services.consent.keystore import KeyStore
from services.consent.person_cache import PersonCache, cache_key
from services.consent.propagation import Propagation, WithdrawalPropagation
from services.consent.purposes import PurposeDefinition
from services.consent.service import ConsentService, DecisionInput, Receipt, entry_message
from services.consent.store import CONSUMER_TABLES, PRODUCER, ConsentStore

C = consent_pb2
A = audit_pb2
logger = logging.getLogger(__name__)
FUTURE_TOLERANCE: Final = timedelta(minutes=5)
MAX_DECISIONS: Final = 64
MAX_IDENTIFIERS: Final = 32
DB_POOL_SIZE: Final = 32
"""Pooled connections to the consent database: one per server worker thread (build_server's
max_workers). A checkout beyond the pool opens a connection and closes it on return, which
under load meant a new PostgreSQL backend for most CheckConsent calls."""
_PERSON_ID: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_LOCALE: Final = re.compile(r"[A-Za-z]{2,8}(-[A-Za-z0-9]{1,8})*")
SOURCE_NAMES: Final = {
    C.CONSENT_SOURCE_WEB_BANNER: "web",
    C.CONSENT_SOURCE_APP: "app",
    C.CONSENT_SOURCE_STORE: "store",
    C.CONSENT_SOURCE_CALL_CENTRE: "call_centre",
    C.CONSENT_SOURCE_IMPORT: "import",
    C.CONSENT_SOURCE_SIGNAL: "web",
}


_DROP_REASON_NAMES: Final = {
    value: name.removeprefix("DROP_REASON_").lower() for name, value in C.DropReason.items()
}


class SubjectResolver:
    """Turns a PersonRef into a person id: directly, or through identity for identifiers."""

    def __init__(self, context: ServiceContext, cache: PersonCache) -> None:
        self._keyring = context.keyring
        self._region = context.settings.phone_default_region
        self._lock = threading.Lock()
        self._client: IdentityClient | None = None
        self._cache = cache

    def connect(self, client: IdentityClient) -> None:
        with self._lock:
            self._client = client

    def identity(self) -> IdentityClient:
        with self._lock:
            if self._client is None:
                raise NotFound("service", "identity", "the identity service is not connected yet")
            return self._client

    def check(
        self, subject: common_pb2.PersonRef, violations: FieldViolations, path: str = "subject"
    ) -> list[PseudonymisedIdentifier]:
        """Validate a subject into ``violations``; returns its identifiers pseudonymised."""
        has_person = bool(subject.person_id)
        violations.check(
            has_person != bool(subject.identifiers),
            path,
            "give exactly one of person_id and identifiers",
        )
        if has_person:
            violations.check(
                bool(_PERSON_ID.fullmatch(subject.person_id)),
                f"{path}.person_id",
                "letters, digits, '_' or '-', at most 64",
            )
        violations.check(
            len(subject.identifiers) <= MAX_IDENTIFIERS,
            f"{path}.identifiers",
            f"at most {MAX_IDENTIFIERS}",
        )
        hashed = []
        for index, identifier in enumerate(subject.identifiers[:MAX_IDENTIFIERS]):
            try:
                hashed.append(
                    pseudonymise_identifier(identifier, self._keyring, phone_region=self._region)
                )
            except IdentifierError as error:
                violations.add(f"{path}.identifiers[{index}].{error.field}", error.description)
        violations.check(
            not hashed or not all(h.blocked for h in hashed),
            f"{path}.identifiers",
            "every identifier is a blocked value (e.g. test@test.com)",
        )
        return hashed

    def pseudonymise(self, identifier: common_pb2.Identifier) -> PseudonymisedIdentifier:
        return pseudonymise_identifier(identifier, self._keyring, phone_region=self._region)

    def resolve(
        self,
        subject: common_pb2.PersonRef,
        hashed: list[PseudonymisedIdentifier],
        source: str,
        context: grpc.ServicerContext,
    ) -> str:
        """The person of a checked subject, created through identity when only identifiers."""
        if subject.person_id:
            return subject.person_id
        [person] = self.identity().resolve([hashed], source, deadline_remaining(context))
        if not person:
            raise InvalidArgument({"subject.identifiers": "identity refused every identifier"})
        return person

    def lookup(self, subject: common_pb2.PersonRef, context: grpc.ServicerContext) -> str:
        """The person, or "" when the identifiers are unknown (nothing is created)."""
        violations = FieldViolations()
        hashed = self.check(subject, violations)
        violations.raise_if_any()
        if subject.person_id:
            return subject.person_id
        # Sets Collect or earlier checks resolved are known: identity is asked only for others.
        key = cache_key(hashed)
        known = self._cache.get(key)
        if known is not None:
            return known
        generation = self._cache.generation
        person = self.identity().lookup(hashed, deadline_remaining(context))
        self._cache.put(key, person, generation)
        return person


def _occurred_at(request_time: Timestamp, field: str, violations: FieldViolations) -> datetime:
    now = datetime.now(UTC)
    if not request_time.seconds and not request_time.nanos:
        return now
    moment = moment_of(request_time)
    if moment is None:
        violations.add(field, INVALID_MOMENT)
        return now
    violations.check(moment <= now + FUTURE_TOLERANCE, field, "is in the future")
    return moment


def _at(request_time: Timestamp) -> datetime:
    if not request_time.seconds and not request_time.nanos:
        return datetime.now(UTC)
    moment = moment_of(request_time)
    if moment is None:
        raise InvalidArgument({"at": INVALID_MOMENT})
    return moment


def _receipts(receipts: list[Receipt]) -> list[consent_pb2.LedgerReceipt]:
    return [C.LedgerReceipt(seq=r.seq, leaf_hash=r.leaf_hash, purpose=r.purpose) for r in receipts]


def _purpose_message(purpose: PurposeDefinition) -> common_pb2.Purpose:
    message = common_pb2.Purpose(
        id=purpose.id,
        legal_basis=purpose.legal_basis,
        description=purpose.description,
        policy_version=purpose.policy_version,
        notice_sha256=purpose.notice_sha256,
        retention_days=purpose.retention_days,
        allowed_fields=list(purpose.allowed_fields),
        gpc_withdraws=purpose.gpc_withdraws,
        revision=purpose.revision,
        updated_at=timestamp(purpose.updated_at),
    )
    message.default_lifetime.FromTimedelta(purpose.default_lifetime)
    return message


def _state_message(
    state: ConsentState, legal_basis: int, propagation: WithdrawalPropagation | None = None
) -> consent_pb2.PurposeState:
    deciding = state.deciding
    return C.PurposeState(
        purpose=state.purpose,
        allowed=state.allowed,
        reason=state.reason,
        legal_basis=legal_basis,  # type: ignore[arg-type]
        decision=deciding.decision if deciding else common_pb2.DECISION_UNSPECIFIED,
        ledger_seq=deciding.seq if deciding else 0,
        source=deciding.source if deciding else C.CONSENT_SOURCE_UNSPECIFIED,
        occurred_at=timestamp(deciding.occurred_at if deciding else None),
        expires_at=timestamp(state.expires_at),
        policy_version=deciding.policy_version if deciding else "",
        propagation=None if propagation is None else _propagation_message(propagation),
    )


def _propagation_message(propagation: WithdrawalPropagation) -> consent_pb2.WithdrawalPropagation:
    return C.WithdrawalPropagation(
        complete=propagation.complete,
        acknowledgements=[
            C.ConsumerAcknowledgement(consumer=consumer, acknowledged_at=timestamp(at))
            for consumer, at in propagation.acknowledgements.items()
        ],
        propagated_ledger_seq=propagation.propagated_seq,
    )


def _erasure_message(erasure: ErasureView) -> consent_pb2.Erasure:
    return C.Erasure(
        erasure_id=erasure.erasure_id,
        person_id=erasure.person_id,
        state=erasure.state,  # type: ignore[arg-type]
        requested_at=timestamp(erasure.requested_at),
        completed_at=timestamp(erasure.completed_at),
        services=[
            C.ServiceErasure(
                service=name,
                state=part["state"],
                completed_at=timestamp(
                    datetime.fromisoformat(part["completed_at"]) if part["completed_at"] else None
                ),
                detail=part.get("detail", ""),
            )
            for name, part in sorted(erasure.services.items())
        ],
        tombstone_ledger_seq=erasure.tombstone_seq,
    )


class CollectMetrics:
    """Counters of events accepted and dropped, by reason and channel (OpenTelemetry)."""

    def __init__(self, meter: metrics.Meter) -> None:
        self._events = meter.create_counter(
            "steward.consent.events",
            unit="{event}",
            description="Behaviour events offered to Collect, by outcome, drop reason and channel",
        )

    def record(self, results: Sequence[CollectResult]) -> None:
        counts: dict[tuple[str, str, str], int] = {}
        for result in results:
            outcome = "accepted" if result.accepted else "dropped"
            reason = "" if result.accepted else _DROP_REASON_NAMES[result.drop_reason]
            key = (outcome, reason, result.channel or "unknown")
            counts[key] = counts.get(key, 0) + 1
        for (outcome, reason, channel), count in counts.items():
            attributes = {"outcome": outcome, "channel": channel}
            if reason:
                attributes["reason"] = reason
            self._events.add(count, attributes)


class ConsentServicer(consent_pb2_grpc.ConsentServiceServicer):
    """steward.consent.v1.ConsentService."""

    def __init__(
        self,
        service: ConsentService,
        collection: CollectionService,
        subjects: SubjectResolver,
        mapping: signals.TcfMapping,
        *,
        cache: PersonCache,
        max_batch: int,
        metrics: CollectMetrics,
        propagation: Propagation,
        peers: PeerExports,
    ) -> None:
        self._service = service
        self._propagation = propagation
        self._peers = peers
        self._collection = collection
        self._subjects = subjects
        self._mapping = mapping
        self._cache = cache
        self._max_batch = max_batch
        self._metrics = metrics

    def _refuse_erased(self, person: str) -> None:
        if self._collection.is_erased(person):
            raise FailedPrecondition(
                [("ERASED", "persons/(erased)", "this person was erased")],
                "the person was erased; their identifiers start a new person",
            )

    def DefinePurpose(
        self, request: consent_pb2.DefinePurposeRequest, context: grpc.ServicerContext
    ) -> consent_pb2.DefinePurposeResponse:
        p = request.purpose
        lifetime = duration_of(p.default_lifetime)
        if lifetime is None:
            raise InvalidArgument({"purpose.default_lifetime": INVALID_DURATION})
        purpose = PurposeDefinition(
            id=p.id,
            legal_basis=p.legal_basis,
            description=p.description,
            policy_version=p.policy_version,
            notice_sha256=p.notice_sha256,
            default_lifetime=lifetime,
            retention_days=p.retention_days,
            allowed_fields=tuple(p.allowed_fields),
            gpc_withdraws=p.gpc_withdraws,
        )
        stored, receipt = self._service.define_purpose(purpose, caller_of(context))
        return C.DefinePurposeResponse(
            purpose=_purpose_message(stored),
            receipt=C.LedgerReceipt(
                seq=receipt.seq, leaf_hash=receipt.leaf_hash, purpose=stored.id
            ),
        )

    def ListPurposes(
        self, request: consent_pb2.ListPurposesRequest, context: grpc.ServicerContext
    ) -> consent_pb2.ListPurposesResponse:
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument({"page_size": "0 to 1000"})
        size = request.page_size or 100
        purposes = sorted(self._service.purposes().values(), key=lambda p: p.id)
        page = [p for p in purposes if p.id > request.page_token][: size + 1]
        token = page[size - 1].id if len(page) > size else ""
        return C.ListPurposesResponse(
            purposes=[_purpose_message(p) for p in page[:size]], next_page_token=token
        )

    def RecordConsent(
        self, request: consent_pb2.RecordConsentRequest, context: grpc.ServicerContext
    ) -> consent_pb2.RecordConsentResponse:
        violations = FieldViolations()
        violations.check(bool(request.decisions), "decisions", "at least one decision")
        violations.check(
            len(request.decisions) <= MAX_DECISIONS, "decisions", f"at most {MAX_DECISIONS}"
        )
        violations.check(
            request.source in SOURCE_NAMES and request.source != C.CONSENT_SOURCE_SIGNAL,
            "source",
            "must name where the decision was made (signals go through ApplySignals)",
        )
        violations.check(
            not request.locale or bool(_LOCALE.fullmatch(request.locale)),
            "locale",
            "a BCP 47 language tag",
        )
        occurred_at = _occurred_at(request.occurred_at, "occurred_at", violations)
        decisions = []
        for index, d in enumerate(request.decisions[:MAX_DECISIONS]):
            path = f"decisions[{index}]"
            violations.check(bool(d.purpose), f"{path}.purpose", "is required")
            violations.check(
                d.decision
                in (
                    common_pb2.DECISION_GRANTED,
                    common_pb2.DECISION_DENIED,
                    common_pb2.DECISION_WITHDRAWN,
                ),
                f"{path}.decision",
                "must be GRANTED, DENIED or WITHDRAWN",
            )
            violations.check(bool(d.policy_version), f"{path}.policy_version", "is required")
            expires_at = None
            if d.HasField("expires_at"):
                expires_at = moment_of(d.expires_at)
                if expires_at is None:
                    violations.add(f"{path}.expires_at", INVALID_MOMENT)
                    continue
                violations.check(
                    expires_at > occurred_at, f"{path}.expires_at", "must be after occurred_at"
                )
            decisions.append(
                DecisionInput(
                    purpose=d.purpose,
                    decision=d.decision,
                    expires_at=expires_at,
                    policy_version=d.policy_version,
                    notice_sha256=d.notice_sha256,
                )
            )
        hashed = self._subjects.check(request.subject, violations)
        violations.raise_if_any()
        person = self._subjects.resolve(
            request.subject, hashed, SOURCE_NAMES.get(request.source, "consent"), context
        )
        self._refuse_erased(person)
        receipts = self._service.record(
            person,
            decisions,
            source=request.source,
            occurred_at=occurred_at,
            actor=caller_of(context),
            locale=request.locale,
            acknowledge_gpc_conflict=request.acknowledge_gpc_conflict,
        )
        return C.RecordConsentResponse(person_id=person, receipts=_receipts(receipts))

    def ApplySignals(
        self, request: consent_pb2.ApplySignalsRequest, context: grpc.ServicerContext
    ) -> consent_pb2.ApplySignalsResponse:
        violations = FieldViolations()
        occurred_at = _occurred_at(request.occurred_at, "occurred_at", violations)
        violations.check(
            not request.locale or bool(_LOCALE.fullmatch(request.locale)),
            "locale",
            "a BCP 47 language tag",
        )
        parsed = None
        if request.tcf_string:
            try:
                parsed = tcf.parse_tc_string(request.tcf_string)
            except tcf.TCStringError as error:
                violations.add("tcf_string", str(error))
        mode = request.consent_mode
        consent_mode = {}
        for name in ("ad_storage", "analytics_storage", "ad_user_data", "ad_personalization"):
            value = getattr(mode, name)
            if value not in C.ConsentModeValue.values():
                violations.add(f"consent_mode.{name}", "GRANTED, DENIED or unset")
            elif value != C.CONSENT_MODE_VALUE_UNSPECIFIED:
                consent_mode[name] = C.ConsentModeValue.Name(value)
        gpc = request.gpc if request.HasField("gpc") else None
        violations.check(
            parsed is not None or gpc is not None or bool(consent_mode) or bool(violations),
            "tcf_string",
            "send at least one signal: tcf_string, gpc or consent_mode",
        )
        hashed = self._subjects.check(request.subject, violations)
        violations.raise_if_any()
        purposes = self._service.purposes()
        derived = signals.decisions_from_signals(
            parsed,
            gpc,
            consent_mode,
            {p.id: signals.PurposeInfo(p.legal_basis, p.gpc_withdraws) for p in purposes.values()},
            self._mapping,
        )
        person = self._subjects.resolve(request.subject, hashed, "web", context)
        self._refuse_erased(person)
        receipts: list[Receipt] = []
        if derived:
            receipts = self._service.record(
                person,
                [
                    DecisionInput(
                        purpose=d.purpose,
                        decision=d.decision,
                        signal=d.signal,
                        details=dict(d.detail),
                    )
                    for d in derived
                ],
                source=C.CONSENT_SOURCE_SIGNAL,
                occurred_at=occurred_at,
                actor=caller_of(context),
                locale=request.locale,
                kind=A.ENTRY_KIND_SIGNAL,
            )
        states = self._service.states(person, datetime.now(UTC))
        return C.ApplySignalsResponse(
            person_id=person,
            receipts=_receipts(receipts),
            states=[_state_message(s, purposes[s.purpose].legal_basis) for s in states],
        )

    def GetConsent(
        self, request: consent_pb2.GetConsentRequest, context: grpc.ServicerContext
    ) -> consent_pb2.GetConsentResponse:
        person = self._subjects.lookup(request.subject, context)
        if not person:
            raise NotFound("person", "(identifiers)", "no person has these identifiers")
        purposes = self._service.purposes()
        states = self._service.states(person, _at(request.at))
        propagations = self._propagation.of_entries(
            [s.deciding.seq for s in states if s.deciding is not None]
        )
        return C.GetConsentResponse(
            person_id=person,
            states=[
                _state_message(
                    s,
                    purposes[s.purpose].legal_basis,
                    propagations.get(s.deciding.seq) if s.deciding is not None else None,
                )
                for s in states
            ],
        )

    def CheckConsent(
        self, request: consent_pb2.CheckConsentRequest, context: grpc.ServicerContext
    ) -> consent_pb2.CheckConsentResponse:
        if not request.purpose:
            raise InvalidArgument({"purpose": "is required"})
        person = self._subjects.lookup(request.subject, context)
        if not person:
            if request.purpose not in self._service.purposes():
                raise NotFound("purpose", request.purpose)
            return C.CheckConsentResponse(allowed=False, reason=C.CONSENT_REASON_UNKNOWN_PERSON)
        state = self._service.check(
            person,
            request.purpose,
            _at(request.at),
            erasure_markers=lambda: self._collection.erased_digests(person),
        )
        return C.CheckConsentResponse(
            allowed=state.allowed,
            reason=state.reason,
            person_id=person,
            ledger_seq=state.deciding.seq if state.deciding else 0,
            expires_at=timestamp(state.expires_at),
        )

    # Collection, erasure and access ------------------------------------------------------------

    def _resolve_for_collect(
        self, context: grpc.ServicerContext
    ) -> Callable[[Sequence[Sequence[PseudonymisedIdentifier]], Sequence[str]], list[str]]:
        def resolve(
            sets: Sequence[Sequence[PseudonymisedIdentifier]], sources: Sequence[str]
        ) -> list[str]:
            answers: list[str] = [""] * len(sets)
            missing: dict[tuple[str, ...], list[int]] = {}
            keys = [cache_key(identifiers) for identifiers in sets]
            for position, (key, person) in enumerate(
                zip(keys, self._cache.get_many(keys), strict=True)
            ):
                if person is not None:
                    answers[position] = person
                else:
                    missing.setdefault(key, []).append(position)
            if missing:
                firsts = [positions[0] for positions in missing.values()]
                generation = self._cache.generation
                client = self._subjects.identity()
                persons = client.resolve_many(
                    [sets[p] for p in firsts],
                    [sources[p] for p in firsts],
                    deadline_remaining(context),
                )
                for (key, positions), person in zip(missing.items(), persons, strict=True):
                    self._cache.put(key, person, generation)
                    for position in positions:
                        answers[position] = person
            return answers

        return resolve

    def Collect(
        self, request: consent_pb2.CollectRequest, context: grpc.ServicerContext
    ) -> consent_pb2.CollectResponse:
        violations = FieldViolations()
        violations.check(bool(request.events), "events", "at least one event")
        violations.check(
            len(request.events) <= self._max_batch, "events", f"at most {self._max_batch} events"
        )
        violations.raise_if_any()
        inputs = [
            self._collect_input(index, event, violations)
            for index, event in enumerate(request.events)
        ]
        violations.raise_if_any("malformed events")
        results = self._collection.collect(inputs, self._resolve_for_collect(context))
        self._metrics.record(results)
        accepted = sum(r.accepted for r in results)
        response = C.CollectResponse(accepted=accepted, dropped=len(results) - accepted)
        # Added in place: results built apart would be copied into the response once more.
        add = response.results.add
        for r in results:
            add(
                index=r.index,
                event_id=r.event_id,
                accepted=r.accepted,
                drop_reason=r.drop_reason,
                detail=r.detail,
                person_id=r.person_id if r.accepted else "",
                purposes=r.purposes,
            )
        return response

    def _collect_input(
        self, index: int, event: common_pb2.BehaviourEvent, violations: FieldViolations
    ) -> CollectInput:
        occurred_at = moment_of(event.occurred_at) if event.HasField("occurred_at") else None
        if occurred_at is None and event.HasField("occurred_at"):
            violations.add(f"events[{index}].occurred_at", INVALID_MOMENT)
        fields = EventFields(
            event_id=event.event_id,
            type=event.type,
            occurred_at=occurred_at,
            item_id=event.item_id,
            category=event.category,
            value=event.value,
            dwell_ms=event.dwell_ms,
            query=event.query,
            channel=event.channel,
            quantity=event.quantity,
            currency=event.currency,
            # dict() of an empty map still costs 1.5 us, a tenth of reading the whole event
            attributes=dict(event.attributes) if event.attributes else {},
        )
        path = f"events[{index}]"
        person_id, identifiers = event.person_id, event.identifiers
        if bool(person_id) == bool(identifiers):
            return CollectInput(
                index, fields, invalid="give exactly one of person_id and identifiers"
            )
        if person_id:
            if not _PERSON_ID.fullmatch(person_id):
                violations.add(f"{path}.person_id", "letters, digits, '_' or '-', at most 64")
            return CollectInput(index, fields, person_id=person_id)
        if len(identifiers) > MAX_IDENTIFIERS:
            violations.add(f"{path}.identifiers", f"at most {MAX_IDENTIFIERS}")
            return CollectInput(index, fields, invalid="too many identifiers")
        hashed = []
        for position, identifier in enumerate(identifiers):
            try:
                hashed.append(self._subjects.pseudonymise(identifier))
            except IdentifierError as error:
                if error.field != "value" or identifier.pseudonymised:
                    violations.add(
                        f"{path}.identifiers[{position}].{error.field}", error.description
                    )
        if not hashed:
            return CollectInput(index, fields, invalid="identifiers: none is usable")
        return CollectInput(index, fields, identifiers=tuple(hashed))

    def EraseSubject(
        self, request: consent_pb2.EraseSubjectRequest, context: grpc.ServicerContext
    ) -> consent_pb2.EraseSubjectResponse:
        if len(request.reason) > 1024:
            raise InvalidArgument({"reason": "at most 1024 characters"})
        person = self._subjects.lookup(request.subject, context)
        if not person:
            raise NotFound("person", "(identifiers)", "no person has these identifiers")
        client = self._subjects.identity()
        known = client.person(person, deadline_remaining(context))
        root = known.person_id if known is not None else person
        aliases = list(known.alias_person_ids) if known is not None else []
        erasure = self._collection.begin_erasure(
            root, aliases, request.reason or "erasure request", caller_of(context)
        )
        # Not only when identity's PersonForgotten arrives: the identifiers start afresh now.
        self._cache.invalidate([root, *aliases])
        try:
            deleted = client.forget(root, "erasure", deadline_remaining(context))
            erasure = self._collection.finish_part(
                erasure.erasure_id, "identity", ok=True, detail=f"{deleted} identifiers deleted"
            )
        except Unavailable as error:
            erasure = self._collection.finish_part(
                erasure.erasure_id, "identity", ok=False, detail=error.message
            )
        return C.EraseSubjectResponse(erasure=_erasure_message(erasure))

    def GetErasure(
        self, request: consent_pb2.GetErasureRequest, context: grpc.ServicerContext
    ) -> consent_pb2.GetErasureResponse:
        if not request.erasure_id:
            raise InvalidArgument({"erasure_id": "is required"})
        return C.GetErasureResponse(
            erasure=_erasure_message(self._collection.erasure(request.erasure_id))
        )

    def ExportSubjectData(
        self, request: consent_pb2.ExportSubjectDataRequest, context: grpc.ServicerContext
    ) -> consent_pb2.ExportSubjectDataResponse:
        person = self._subjects.lookup(request.subject, context)
        if not person:
            raise NotFound("person", "(identifiers)", "no person has these identifiers")
        known = self._subjects.identity().person(person, deadline_remaining(context))
        root = known.person_id if known is not None else person
        aliases = list(known.alias_person_ids) if known is not None else []
        data = self._collection.subject_data(root, aliases)
        tags = self._peers.tags(root, deadline_remaining(context))
        recommendations = self._peers.recommendations(root, deadline_remaining(context))
        bundle = C.SubjectDataBundle(
            person_id=root,
            generated_at=timestamp(datetime.now(UTC)),
            consent_history=[
                C.ConsentRecord(
                    seq=d.seq,
                    purpose=d.purpose,
                    decision=d.decision,
                    source=d.source,
                    occurred_at=timestamp(d.occurred_at),
                    expires_at=timestamp(d.expires_at),
                    policy_version=d.policy_version,
                )
                for d in data.history
            ],
            events=[
                C.StoredEvent(
                    event_id=e["event_id"],
                    type=e["type"],
                    item_id=e["item_id"],
                    category=e["category"],
                    value=e["value"],
                    dwell_ms=e["dwell_ms"],
                    query=e["query"],
                    channel=e["channel"],
                    occurred_at=timestamp(e["occurred_at"]),
                    purposes=e["purposes"],
                    attributes=e["attributes"],
                    quantity=e["quantity"],
                )
                for e in data.events
            ],
            identity=known,
            tags=tags,
            recommendations=recommendations,
        )
        return C.ExportSubjectDataResponse(
            bundle=bundle,
            json=json_format.MessageToJson(bundle, preserving_proto_field_name=True),
        )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    """steward.consent.v1.AuditService: read-only access to the consent ledger."""

    def __init__(self, service: ConsentService) -> None:
        self._service = service

    def GetCheckpoint(
        self, request: audit_pb2.GetCheckpointRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetCheckpointResponse:
        checkpoint = self._service.checkpoint(sign_now=request.sign_now)
        return A.GetCheckpointResponse(checkpoint=ledger.to_checkpoint_message(checkpoint))

    def GetInclusionProof(
        self, request: audit_pb2.GetInclusionProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetInclusionProofResponse:
        if request.seq < 1 or request.tree_size < 0:
            raise InvalidArgument({"seq": "must be at least 1"})
        tree_size, leaf, path, checkpoint, row = self._service.inclusion(
            request.seq, request.tree_size
        )
        return A.GetInclusionProofResponse(
            leaf_index=request.seq - 1,
            tree_size=tree_size,
            leaf_hash=leaf,
            audit_path=path,
            checkpoint=ledger.to_checkpoint_message(checkpoint) if checkpoint else None,
            entry=entry_message(row),
        )

    def GetConsistencyProof(
        self, request: audit_pb2.GetConsistencyProofRequest, context: grpc.ServicerContext
    ) -> audit_pb2.GetConsistencyProofResponse:
        second, proof = self._service.consistency(request.first_tree_size, request.second_tree_size)
        return A.GetConsistencyProofResponse(
            first_tree_size=request.first_tree_size, second_tree_size=second, proof=proof
        )

    def ExportLedger(
        self, request: audit_pb2.ExportLedgerRequest, context: grpc.ServicerContext
    ) -> Iterator[audit_pb2.ExportLedgerResponse]:
        if request.from_seq < 0 or request.to_seq < 0:
            raise InvalidArgument({"from_seq": "must not be negative"})
        if request.to_seq and request.to_seq < request.from_seq:
            raise InvalidArgument({"to_seq": "must not be below from_seq"})
        yield from self._service.export(request.from_seq, request.to_seq)


SWEEP_INTERVAL_SECONDS: Final = 3600.0
RECONCILE_INTERVAL_SECONDS: Final = 5.0
"""How often withdrawals and erasures are checked against every consumer's stored
acknowledgement, beside the check each acknowledgement triggers."""
IDENTITY_CONSUMER: Final = LOG_CONSUMERS["identity"]["consent"]
"""Consent's consumer of identity's log (person links and the person cache)."""


def _logged_sweep(collection: CollectionService) -> Callable[[], None]:
    def sweep() -> None:
        removed = collection.sweep()
        if removed:
            logger.info("retention sweep removed %d events", sum(removed.values()), extra=removed)

    return sweep


def migrate(settings: Settings) -> None:
    """Bring consent's database and its key store to the newest schema: ``build`` does so
    before serving, ``steward migrate`` once for a whole deployment."""
    upgrade(settings.db_url("consent"), "consent")
    keystore_module.migrate(settings.db_url("keystore"))


def build(context: ServiceContext) -> ServiceParts:
    """The consent service on its database and key store (both migrated first)."""
    settings = context.settings
    migrate(settings)
    engine = make_engine(settings.db_url("consent"), pool_size=DB_POOL_SIZE)
    keystore_engine = make_engine(settings.db_url("keystore"))
    store = ConsentStore(engine)
    keyring = context.keyring
    log_consumers = [
        consumer
        for service_name, consumer in LOG_CONSUMERS[PRODUCER].items()
        if context.deployed(service_name)
    ]
    service = ConsentService(
        store,
        KeyStore(keystore_engine, keyring),
        keyring.sign,
        keyring.signing_key_id,
        keyring.public_key_pem(),
        checkpoint_every=settings.checkpoint_every,
        consumers=log_consumers,
        meter=context.telemetry.meter("steward.consent"),
    )
    service.ensure_default_purposes()
    cache = PersonCache()
    subjects = SubjectResolver(context, cache)
    collection = CollectionService(service, keyring)
    propagation = Propagation(service, collection)
    exports = PeerExports()
    tasks = [
        PeriodicTask(
            "ledger-checkpoints", settings.checkpoint_seconds, service.checkpoint_if_grown
        ),
        PeriodicTask("retention-sweep", SWEEP_INTERVAL_SECONDS, _logged_sweep(collection)),
        PeriodicTask("propagation", RECONCILE_INTERVAL_SECONDS, propagation.reconcile),
    ]
    consumers: list[Consumer] = []
    channels: list[PeerChannels] = []

    def follow_identity(connection: Connection, envelope: events_pb2.Envelope) -> None:
        """Merges, unmerges and forgets: fold or split the persons' consent, refresh the cache."""
        service.follow_identity(connection, envelope)
        cache.apply(connection, envelope)

    def connect_identity(own_target: str) -> None:
        peers = PeerChannels(settings, own_target)
        channels.append(peers)
        subjects.connect(
            IdentityClient(instrument_channel(peers.to("identity"), context.telemetry))
        )
        exports.connect(
            **{
                name: instrument_channel(peers.to(name), context.telemetry)
                for name in ("tagging", "recommend")
                if context.deployed(name)
            }
        )
        # The log is read on the plain channel: its envelopes carry their own trace context.
        consumers.extend(
            start_log_consumers(
                IDENTITY_CONSUMER,
                [("identity", follow_identity)],
                peers.to,
                engine,
                tables=CONSUMER_TABLES,
                # Links changed: CheckConsent's cache lets go of everyone, once they are stored.
                after_commit=lambda _envelopes: store.checks.changed(),
                tracer_provider=context.telemetry.tracer_provider,
                sources=context.envelope_sources,
            )
        )

    def close() -> None:
        for task in tasks:
            task.stop()
        for consumer in consumers:
            consumer.stop()
        for channel in channels:
            channel.close()
        store.close()
        engine.dispose()
        keystore_engine.dispose()

    registrations: list[ServiceRegistration[Any]] = [
        ServiceRegistration(
            "steward.consent.v1.ConsentService",
            consent_pb2_grpc.add_ConsentServiceServicer_to_server,
            ConsentServicer(
                service,
                collection,
                subjects,
                signals.TcfMapping(),
                cache=cache,
                max_batch=settings.max_batch,
                metrics=CollectMetrics(context.telemetry.meter("steward.consent")),
                propagation=propagation,
                peers=exports,
            ),
        ),
        ServiceRegistration(
            "steward.consent.v1.AuditService",
            audit_pb2_grpc.add_AuditServiceServicer_to_server,
            AuditServicer(service),
        ),
    ]
    return ServiceParts(
        registrations,
        logs={PRODUCER: ProducerLog(store.outbox, engine, on_ack=propagation.acknowledged)},
        on_start=[connect_identity, lambda _target: start_all(tasks)],
        on_stop=[close],
    )
