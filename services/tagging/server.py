"""gRPC servicer of the tagging service: validates requests, maps them onto the use cases,
and runs the consumers of consent's and identity's event logs."""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from typing import Any, Final

import grpc
from google.protobuf import json_format, struct_pb2
from steward.tagging.v1 import tagging_pb2, tagging_pb2_grpc

from services.common.callers import caller_of
from services.common.config import Settings
from services.common.consumer import Consumer, start_log_consumers
from services.common.context import PeerChannels, ServiceContext, ServiceParts
from services.common.db import make_engine
from services.common.errors import FieldViolations, InvalidArgument
from services.common.eventlog import ProducerLog
from services.common.migrations import upgrade
from services.common.outbox import Outbox
from services.common.server import ServiceRegistration
from services.common.tasks import PeriodicTask, start_all, stop_all
from services.common.times import timestamp
from services.tagging.guardrails import AssignedTag, dry_run
from services.tagging.profile import ProfileColumns
from services.tagging.rules import ParsedRuleSet, parse_rule_set
from services.tagging.service import TaggingService
from services.tagging.store import CONSUMER_TABLES, OUTBOX_TABLES, PRODUCER

T = tagging_pb2
MAX_YAML: Final = 1024 * 1024
MAX_PAGE: Final = 10_000
ROLL_INTERVAL_SECONDS: Final = 3600.0
RFM_INTERVAL_SECONDS: Final = 24 * 3600.0
CONSUMER_BATCH_SIZE: Final = 1000
"""Most envelopes per consumer transaction. A batch costs about one profile recompute per person
it touches, however many of their events it holds, so a backlog is worked off in large batches;
a quiet log still goes in small ones (what arrived within the consumer's linger)."""


def _rule_set_message(parsed: ParsedRuleSet, row: Any) -> tagging_pb2.RuleSet:
    message = T.RuleSet(
        version=parsed.version,
        yaml=parsed.yaml,
        tag_budget=parsed.tag_budget,
        k_floor=parsed.k_floor,
        extra_banned_categories=list(parsed.extra_banned_categories),
        created_at=timestamp(row.created_at),
        actor=row.actor,
    )
    for rule in parsed.rules:
        entry = message.rules.add(
            id=rule.id,
            category=rule.category,
            description=rule.description,
            purpose=rule.purpose,
            condition=rule.condition_text,
            min_evidence=rule.min_evidence,
            evidence_window=rule.evidence_window,
            priority=rule.priority,
            fields_read=list(rule.fields_read),
        )
        entry.ttl.FromTimedelta(rule.ttl)
    return message


def _value(value: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    if isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, int | float):
        message.number_value = float(value)
    elif isinstance(value, str):
        message.string_value = value
    elif isinstance(value, dict):
        message.struct_value.update(value)
    else:
        message.string_value = str(value)
    return message


def _tag_message(tag: AssignedTag) -> tagging_pb2.Tag:
    return T.Tag(
        tag_id=tag.tag_id,
        category=tag.category,
        description=tag.description,
        purpose=tag.purpose,
        rule_id=tag.rule_id,
        rule_set_version=tag.rule_set_version,
        condition=tag.condition,
        field_values={k: _value(v) for k, v in tag.field_values.items()},
        evidence_count=tag.evidence_count,
        assigned_at=timestamp(tag.assigned_at),
        expires_at=timestamp(tag.expires_at),
        priority=tag.priority,
    )


def _person_id(value: str) -> None:
    if not value or len(value) > 64:
        raise InvalidArgument({"person_id": "is required (at most 64 characters)"})


class TaggingServicer(tagging_pb2_grpc.TaggingServiceServicer):
    """steward.tagging.v1.TaggingService."""

    def __init__(self, service: TaggingService) -> None:
        self._service = service

    def PutRuleSet(
        self, request: tagging_pb2.PutRuleSetRequest, context: grpc.ServicerContext
    ) -> tagging_pb2.PutRuleSetResponse:
        if not request.yaml.strip() or len(request.yaml.encode()) > MAX_YAML:
            raise InvalidArgument({"yaml": "a YAML rule set of at most 1 MiB"})
        parsed, row = self._service.put_rule_set(request.yaml, caller_of(context))
        return T.PutRuleSetResponse(rule_set=_rule_set_message(parsed, row))

    def ValidateRuleSet(
        self, request: tagging_pb2.ValidateRuleSetRequest, context: grpc.ServicerContext
    ) -> tagging_pb2.ValidateRuleSetResponse:
        if len(request.yaml.encode()) > MAX_YAML:
            raise InvalidArgument({"yaml": "at most 1 MiB"})
        try:
            parsed = parse_rule_set(request.yaml)
        except InvalidArgument as error:
            return T.ValidateRuleSetResponse(
                valid=False,
                errors=[T.RuleProblem(field=f, description=d) for f, d in error.violations],
            )
        profiles = self._service.population_columns()
        report = dry_run(parsed, ProfileColumns.from_profiles(profiles))
        return T.ValidateRuleSetResponse(
            valid=True,
            warnings=[T.RuleProblem(field=f, description=d) for f, d in report.warnings],
            coverage=[
                T.TagCoverage(
                    tag_id=c.tag_id, persons=c.persons, fewer_than_k=c.fewer_than_k, share=c.share
                )
                for c in report.coverage
            ],
            population=report.population,
            average_tags_per_person=report.average_tags_per_person,
        )

    def GetRuleSet(
        self, request: tagging_pb2.GetRuleSetRequest, context: grpc.ServicerContext
    ) -> tagging_pb2.GetRuleSetResponse:
        if request.version < 0:
            raise InvalidArgument({"version": "must not be negative"})
        parsed, row = self._service.stored_rule_set(request.version)
        return T.GetRuleSetResponse(rule_set=_rule_set_message(parsed, row))

    def GetTags(
        self, request: tagging_pb2.GetTagsRequest, context: grpc.ServicerContext
    ) -> tagging_pb2.GetTagsResponse:
        _person_id(request.person_id)
        tags = self._service.tags_of(request.person_id)
        return T.GetTagsResponse(
            person_id=request.person_id,
            tags=[_tag_message(t) for t in tags.tags],
            suppressed=[
                T.SuppressedTag(
                    tag_id=s.tag_id,
                    priority=s.priority,
                    evidence_count=s.evidence_count,
                    reason=s.reason,
                )
                for s in tags.suppressed
            ],
            objections=[
                T.Objection(
                    tag_id="" if tag == "*" else tag,
                    all_profiling=tag == "*",
                    reason=reason,
                    recorded_at=timestamp(at),
                )
                for tag, reason, at in tags.objections
            ],
        )

    def ObjectToTag(
        self, request: tagging_pb2.ObjectToTagRequest, context: grpc.ServicerContext
    ) -> tagging_pb2.ObjectToTagResponse:
        violations = FieldViolations()
        violations.check(bool(request.person_id), "person_id", "is required")
        violations.check(
            bool(request.tag_id) != request.all_profiling,
            "tag_id",
            "name one tag, or set all_profiling instead",
        )
        violations.check(len(request.reason) <= 1024, "reason", "at most 1024 characters")
        violations.raise_if_any()
        target = "*" if request.all_profiling else request.tag_id
        at, removed = self._service.object_to(request.person_id, target, request.reason)
        return T.ObjectToTagResponse(
            objection=T.Objection(
                tag_id=request.tag_id,
                all_profiling=request.all_profiling,
                reason=request.reason,
                recorded_at=timestamp(at),
            ),
            removed_tag_ids=removed,
        )

    def GetAudience(
        self, request: tagging_pb2.GetAudienceRequest, context: grpc.ServicerContext
    ) -> tagging_pb2.GetAudienceResponse:
        violations = FieldViolations()
        violations.check(bool(request.tag_id), "tag_id", "is required")
        violations.check(0 <= request.page_size <= MAX_PAGE, "page_size", f"0 to {MAX_PAGE}")
        after = ""
        if request.page_token:
            try:
                after = base64.urlsafe_b64decode(request.page_token.encode()).decode()
            except (ValueError, UnicodeDecodeError):
                violations.add("page_token", "is not a token this service issued")
        violations.raise_if_any()
        size = request.page_size or 500
        persons, total = self._service.audience(request.tag_id, size, after)
        token = (
            base64.urlsafe_b64encode(persons[-1].encode()).decode() if len(persons) == size else ""
        )
        return T.GetAudienceResponse(person_ids=persons, next_page_token=token, size=total)

    def GetProfile(
        self, request: tagging_pb2.GetProfileRequest, context: grpc.ServicerContext
    ) -> tagging_pb2.GetProfileResponse:
        _person_id(request.person_id)
        profile = self._service.profile_of(request.person_id)
        message = json_format.ParseDict(profile, T.Profile(), ignore_unknown_fields=True)
        return T.GetProfileResponse(profile=message)


def migrate(settings: Settings) -> None:
    """Bring tagging's database to the newest schema: ``build`` does so before serving,
    ``steward migrate`` once for a whole deployment."""
    upgrade(settings.db_url("tagging"), "tagging")


def build(context: ServiceContext) -> ServiceParts:
    """The tagging service on its database (migrated first), consuming consent's and identity's
    logs and producing its own (TagChanged)."""
    migrate(context.settings)
    engine = make_engine(context.settings.db_url("tagging"))
    outbox = Outbox(PRODUCER, OUTBOX_TABLES)
    service = TaggingService(engine, outbox, meter=context.telemetry.meter("steward.tagging"))
    consumers: list[Consumer] = []
    channels: list[PeerChannels] = []

    def start_consumers(own_target: str) -> None:
        # Each log from its producer: this process, or where the settings say it runs.
        peers = PeerChannels(context.settings, own_target)
        channels.append(peers)
        # Each envelope is only recorded; each person a batch touched is re-evaluated once at
        # its end, in the same transaction.
        feeds: Sequence[tuple[str, Callable[..., None]]] = (
            ("consent", service.ingest_consent_envelope),
            ("identity", service.ingest_identity_envelope),
        )

        consumers.extend(
            start_log_consumers(
                "tagging",
                feeds,
                peers.to,
                engine,
                tables=CONSUMER_TABLES,
                end_batch=service.end_batch,
                batch_size=CONSUMER_BATCH_SIZE,
                tracer_provider=context.telemetry.tracer_provider,
                sources=context.envelope_sources,
            )
        )

    tasks = [
        # Hourly, expired tags go. Daily, and once at start (in the background, so a restart
        # never leaves every buyer at the default score of 3 for a day): the RFM quintiles are
        # refreshed and every profile is recomputed, its windows having moved on.
        PeriodicTask("tag-expiry", ROLL_INTERVAL_SECONDS, service.expire),
        PeriodicTask("rfm-refresh", RFM_INTERVAL_SECONDS, service.refresh_rfm, run_at_start=True),
    ]

    def stop() -> None:
        stop_all(tasks)
        for consumer in consumers:
            consumer.stop()
        for channel in channels:
            channel.close()
        engine.dispose()

    return ServiceParts(
        [
            ServiceRegistration(
                "steward.tagging.v1.TaggingService",
                tagging_pb2_grpc.add_TaggingServiceServicer_to_server,
                TaggingServicer(service),
            )
        ],
        logs={PRODUCER: ProducerLog(outbox, engine)},
        on_start=[start_consumers, lambda _target: start_all(tasks)],
        on_stop=[stop],
    )
