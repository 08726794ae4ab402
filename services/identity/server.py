"""gRPC servicer of the identity service: validates requests, maps them onto the use cases."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final

import grpc
from steward.common.v1 import common_pb2
from steward.identity.v1 import identity_pb2, identity_pb2_grpc

from services.common.callers import caller_of
from services.common.config import Settings
from services.common.consumer import LOG_CONSUMERS
from services.common.context import ServiceContext, ServiceParts
from services.common.db import make_engine
from services.common.errors import FieldViolations, InvalidArgument
from services.common.eventlog import ProducerLog
from services.common.identifiers import IdentifierError, pseudonymise_identifier
from services.common.migrations import upgrade
from services.common.server import ServiceRegistration
from services.common.tasks import PeriodicTask, start_all, stop_all
from services.common.times import INVALID_MOMENT, moment_of, timestamp
from services.identity.graph import IdentifierInput, ItemInput, ItemResult, MergeRecord
from services.identity.rules import MergeRules, TypeLimit, validate_rules
from services.identity.service import IdentityService
from services.identity.store import PRODUCER, IdentityStore

MAX_IDENTIFIERS_PER_ITEM: Final = 32
MAX_SOURCE_LENGTH: Final = 64
MAX_REASON_LENGTH: Final = 1024
MAX_PAGE_SIZE: Final = 1000
DEFAULT_PAGE_SIZE: Final = 100
FUTURE_TOLERANCE: Final = timedelta(minutes=5)


class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    """steward.identity.v1.IdentityService."""

    def __init__(self, service: IdentityService, *, max_batch: int, phone_region: str) -> None:
        self._service = service
        self._max_batch = max_batch
        self._phone_region = phone_region

    # Resolve and Lookup --------------------------------------------------------------------------

    def _identifier_input(
        self,
        identifier: common_pb2.Identifier,
        index: int,
        list_path: Callable[[], str],
        violations: FieldViolations,
        is_blocked: Callable[[str], bool],
    ) -> IdentifierInput:
        try:
            pseudonymised = pseudonymise_identifier(
                identifier,
                self._service.keyring,
                phone_region=self._phone_region,
                is_blocked=is_blocked,
            )
        except IdentifierError as error:
            if error.field == "value" and not identifier.pseudonymised:
                return IdentifierInput(
                    index, identifier.type, identifier.namespace, invalid=error.description
                )
            violations.add(f"{list_path()}[{index}].{error.field}", error.description)
            return IdentifierInput(index, identifier.type, identifier.namespace, invalid="refused")
        return IdentifierInput(
            index,
            pseudonymised.type,
            pseudonymised.namespace,
            pseudonymised.digest,
            pseudonymised.candidates,
            blocked=pseudonymised.blocked,
        )

    def Resolve(
        self, request: identity_pb2.ResolveRequest, context: grpc.ServicerContext
    ) -> identity_pb2.ResolveResponse:
        violations = FieldViolations()
        violations.check(bool(request.items), "items", "at least one item is required")
        violations.check(
            len(request.items) <= self._max_batch, "items", f"at most {self._max_batch} items"
        )
        violations.check(
            len(request.source) <= MAX_SOURCE_LENGTH,
            "source",
            f"at most {MAX_SOURCE_LENGTH} characters",
        )
        violations.raise_if_any()
        now = datetime.now(UTC)
        is_blocked = self._service.rules.is_blocked
        default_source = request.source or "unknown"
        items = []
        identifier_input = self._identifier_input
        for item_index, item in enumerate(request.items):
            path = f"items[{item_index}]"
            wire_identifiers: Sequence[common_pb2.Identifier] = item.identifiers
            count = len(wire_identifiers)
            if not 0 < count <= MAX_IDENTIFIERS_PER_ITEM:
                violations.check(count > 0, f"{path}.identifiers", "at least one identifier")
                violations.check(
                    count <= MAX_IDENTIFIERS_PER_ITEM,
                    f"{path}.identifiers",
                    f"at most {MAX_IDENTIFIERS_PER_ITEM} identifiers",
                )
                wire_identifiers = wire_identifiers[:MAX_IDENTIFIERS_PER_ITEM]
            source = item.source
            if len(source) > MAX_SOURCE_LENGTH:
                violations.add(f"{path}.source", f"at most {MAX_SOURCE_LENGTH} characters")
            seen_at = now
            if item.HasField("seen_at"):
                moment = moment_of(item.seen_at)
                if moment is None:
                    violations.add(f"{path}.seen_at", INVALID_MOMENT)
                else:
                    seen_at = moment
                    violations.check(
                        seen_at <= now + FUTURE_TOLERANCE, f"{path}.seen_at", "is in the future"
                    )

            def list_path(path: str = path) -> str:
                return f"{path}.identifiers"

            identifiers = tuple(
                identifier_input(identifier, index, list_path, violations, is_blocked)
                for index, identifier in enumerate(wire_identifiers)
            )
            items.append(ItemInput(item_index, identifiers, source or default_source, seen_at))
        violations.raise_if_any()
        response = identity_pb2.ResolveResponse()
        for result in self._service.resolve(items):
            _add_result(response, result)
        return response

    def Lookup(
        self, request: identity_pb2.LookupRequest, context: grpc.ServicerContext
    ) -> identity_pb2.LookupResponse:
        violations = FieldViolations()
        violations.check(bool(request.identifiers), "identifiers", "at least one identifier")
        violations.check(
            len(request.identifiers) <= self._max_batch,
            "identifiers",
            f"at most {self._max_batch} identifiers",
        )
        violations.raise_if_any()
        is_blocked = self._service.rules.is_blocked
        inputs = [
            self._identifier_input(identifier, index, lambda: "identifiers", violations, is_blocked)
            for index, identifier in enumerate(request.identifiers)
        ]
        violations.raise_if_any()
        answers = self._service.lookup([i.candidates for i in inputs])
        return identity_pb2.LookupResponse(
            matches=[
                identity_pb2.LookupMatch(index=index, person_id=person, hashed_value=digest)
                for index, (person, digest) in enumerate(answers)
            ]
        )

    # Persons -------------------------------------------------------------------------------------

    def GetPerson(
        self, request: identity_pb2.GetPersonRequest, context: grpc.ServicerContext
    ) -> identity_pb2.GetPersonResponse:
        _require_id(request.person_id, "person_id")
        person = self._service.person(request.person_id)
        return identity_pb2.GetPersonResponse(
            person=identity_pb2.Person(
                person_id=person.person_id,
                created_at=timestamp(person.created_at),
                alias_person_ids=person.alias_person_ids,
                identifiers=[
                    identity_pb2.LinkedIdentifier(
                        type=i.type,  # type: ignore[arg-type]
                        namespace=i.namespace,
                        hashed_value=i.hashed_value,
                        sources=i.sources,
                        first_seen=timestamp(i.first_seen),
                        last_seen=timestamp(i.last_seen),
                        quarantined=i.quarantined,
                    )
                    for i in person.identifiers
                ],
            )
        )

    def Merge(
        self, request: identity_pb2.MergeRequest, context: grpc.ServicerContext
    ) -> identity_pb2.MergeResponse:
        violations = FieldViolations()
        violations.check(len(request.person_ids) >= 2, "person_ids", "at least two persons")
        violations.check(len(request.person_ids) <= 100, "person_ids", "at most 100 persons")
        for index, person_id in enumerate(request.person_ids):
            violations.check(bool(person_id), f"person_ids[{index}]", "must not be empty")
        _check_reason(request.reason, violations)
        violations.raise_if_any()
        merge = self._service.merge(list(request.person_ids), caller_of(context), request.reason)
        return identity_pb2.MergeResponse(merge=_merge_message(merge))

    def Unmerge(
        self, request: identity_pb2.UnmergeRequest, context: grpc.ServicerContext
    ) -> identity_pb2.UnmergeResponse:
        violations = FieldViolations()
        violations.check(bool(request.merge_id), "merge_id", "is required")
        _check_reason(request.reason, violations)
        violations.raise_if_any()
        merge, restored = self._service.unmerge(
            request.merge_id, caller_of(context), request.reason
        )
        message = _merge_message(merge)
        message.undone = True
        return identity_pb2.UnmergeResponse(merge=message, restored_person_ids=restored)

    def GetHistory(
        self, request: identity_pb2.GetHistoryRequest, context: grpc.ServicerContext
    ) -> identity_pb2.GetHistoryResponse:
        _require_id(request.person_id, "person_id")
        violations = FieldViolations()
        violations.check(
            0 <= request.page_size <= MAX_PAGE_SIZE, "page_size", f"0 to {MAX_PAGE_SIZE}"
        )
        after = None
        if request.page_token:
            try:
                decoded = json.loads(base64.urlsafe_b64decode(request.page_token.encode()))
                after = (datetime.fromisoformat(decoded["at"]), str(decoded["id"]))
            except (ValueError, KeyError, TypeError):
                violations.add("page_token", "is not a token this service issued")
        violations.raise_if_any()
        size = request.page_size or DEFAULT_PAGE_SIZE
        entries = self._service.history(request.person_id, size + 1, after)
        token = ""
        if len(entries) > size:
            entries = entries[:size]
            last = entries[-1]
            token = base64.urlsafe_b64encode(
                json.dumps({"at": last.at.isoformat(), "id": last.id}).encode()
            ).decode()
        return identity_pb2.GetHistoryResponse(
            entries=[
                identity_pb2.HistoryEntry(
                    id=entry.id,
                    kind=entry.kind,  # type: ignore[arg-type]
                    at=timestamp(entry.at),
                    actor=entry.actor,
                    source=entry.source,
                    person_ids=entry.person_ids,
                    evidence=[
                        identity_pb2.Evidence(type=t, hashed_value=d)  # type: ignore[arg-type]
                        for t, d in entry.evidence
                    ],
                    rules_version=entry.rules_version,
                    reason=entry.reason,
                    merge_id=entry.merge_id,
                )
                for entry in entries
            ],
            next_page_token=token,
        )

    def Forget(
        self, request: identity_pb2.ForgetRequest, context: grpc.ServicerContext
    ) -> identity_pb2.ForgetResponse:
        _require_id(request.person_id, "person_id")
        violations = FieldViolations()
        violations.check(len(request.reason) <= MAX_REASON_LENGTH, "reason", "too long")
        violations.raise_if_any()
        result = self._service.forget(request.person_id, request.reason or "forget")
        return identity_pb2.ForgetResponse(
            person_id=result.person_id,
            alias_person_ids=result.alias_person_ids,
            identifiers_deleted=result.identifiers_deleted,
        )

    # Rules ---------------------------------------------------------------------------------------

    def PutRules(
        self, request: identity_pb2.PutRulesRequest, context: grpc.ServicerContext
    ) -> identity_pb2.PutRulesResponse:
        proposed = request.rules
        limits = [
            TypeLimit(limit.type, limit.max_per_person, limit.namespace, limit.source)
            for limit in proposed.limits
        ]
        threshold = proposed.hub_threshold or MergeRules().hub_threshold
        violations = validate_rules(
            proposed.priority,
            limits,
            proposed.blocked_values,
            proposed.blocked_patterns,
            threshold,
        )
        violations.raise_if_any("invalid rules")
        rules = MergeRules(
            priority=tuple(proposed.priority) or MergeRules().priority,
            limits=tuple(limits),
            blocked_values=frozenset(v.strip().casefold() for v in proposed.blocked_values),
            blocked_patterns=tuple(proposed.blocked_patterns),
            hub_threshold=threshold,
        )
        stored = self._service.put_rules(rules, caller_of(context))
        return identity_pb2.PutRulesResponse(rules=_rules_message(stored))

    def GetRules(
        self, request: identity_pb2.GetRulesRequest, context: grpc.ServicerContext
    ) -> identity_pb2.GetRulesResponse:
        if request.version < 0:
            raise InvalidArgument({"version": "must not be negative"})
        return identity_pb2.GetRulesResponse(
            rules=_rules_message(self._service.get_rules(request.version))
        )


def _require_id(value: str, field: str) -> None:
    if not value or len(value) > 64:
        raise InvalidArgument({field: "is required (at most 64 characters)"})


def _check_reason(reason: str, violations: FieldViolations) -> None:
    violations.check(bool(reason.strip()), "reason", "is required")
    violations.check(
        len(reason) <= MAX_REASON_LENGTH, "reason", f"at most {MAX_REASON_LENGTH} characters"
    )


def _add_result(response: identity_pb2.ResolveResponse, result: ItemResult) -> None:
    # Built in place: a message passed to a constructor is copied.
    message = response.results.add(
        index=result.index,
        person_id=result.person_id,
        created=result.created,
        merge_id=result.merge_id,
    )
    if result.merged_person_ids:
        message.merged_person_ids.extend(result.merged_person_ids)
    add_outcome = message.identifiers.add
    for o in result.identifiers:
        add_outcome(
            index=o.index,
            type=o.type,
            hashed_value=o.hashed_value,
            status=o.status,
            detail=o.detail,
        )


def _merge_message(merge: MergeRecord) -> identity_pb2.MergeRecord:
    return identity_pb2.MergeRecord(
        merge_id=merge.merge_id,
        surviving_person_id=merge.survivor,
        absorbed_person_ids=list(merge.absorbed),
        actor=merge.actor,
        reason=merge.reason,
        merged_at=timestamp(merge.merged_at),
        undone=merge.undone_at is not None,
    )


def _rules_message(rules: MergeRules) -> identity_pb2.MergeRules:
    return identity_pb2.MergeRules(
        version=rules.version,
        priority=list(rules.priority),
        limits=[
            identity_pb2.TypeLimit(
                type=limit.type,
                namespace=limit.namespace,
                max_per_person=limit.max_per_person,
                source=limit.source,
            )
            for limit in rules.limits
        ],
        blocked_values=sorted(rules.blocked_values),
        blocked_patterns=list(rules.blocked_patterns),
        hub_threshold=rules.hub_threshold,
        actor=rules.actor,
        created_at=timestamp(rules.created_at),
    )


SETTLE_INTERVAL_SECONDS: Final = 5.0
"""How often forgets are checked against the consumers' stored acknowledgements, beside the
check each acknowledgement triggers."""


def migrate(settings: Settings) -> None:
    """Bring identity's database to the newest schema: ``build`` does so before serving,
    ``steward migrate`` once for a whole deployment."""
    upgrade(settings.db_url("identity"), "identity")


def build(context: ServiceContext) -> ServiceParts:
    """The identity service on its database (migrated first), with its event log."""
    migrate(context.settings)
    engine = make_engine(context.settings.db_url("identity"))
    store = IdentityStore(
        engine,
        consumers=[
            consumer
            for service_name, consumer in LOG_CONSUMERS[PRODUCER].items()
            if context.deployed(service_name)
        ],
    )
    tasks = [PeriodicTask("settle-forgotten", SETTLE_INTERVAL_SECONDS, store.reconcile)]
    servicer = IdentityServicer(
        IdentityService(store, context.keyring),
        max_batch=context.settings.max_batch,
        phone_region=context.settings.phone_default_region,
    )
    return ServiceParts(
        registrations=[
            ServiceRegistration(
                "steward.identity.v1.IdentityService",
                identity_pb2_grpc.add_IdentityServiceServicer_to_server,
                servicer,
            )
        ],
        logs={PRODUCER: ProducerLog(store.outbox, engine, on_ack=store.acknowledged)},
        on_start=[lambda _target: start_all(tasks)],
        on_stop=[lambda: stop_all(tasks), engine.dispose, store.close],
    )
