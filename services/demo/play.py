"""Plays the demo shop against a running suite, as the shop's backends would, over gRPC.

Every call goes through the generated stubs with a deadline; nothing here reaches into a
service. The story, in order: purposes and rules are in place, the catalogue is loaded, each
department resolves the identifiers it sees and the CRM links them, shoppers answer the
consent banner at their first visit, the invoices and the browsing before them arrive in time
order (one shopper's browser sends GPC on the way, another withdraws personalisation in the
app), the recommender is trained and asked, one shopper is erased, and the ledger is exported
and verified offline. :func:`play` returns what each service then knows, as numbers.
"""

from __future__ import annotations

import io
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Final, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from rich.progress import Progress
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, audit_pb2_grpc, consent_pb2, consent_pb2_grpc
from steward.identity.v1 import identity_pb2, identity_pb2_grpc
from steward.recommend.v1 import recommend_pb2, recommend_pb2_grpc
from steward.tagging.v1 import tagging_pb2, tagging_pb2_grpc

from services.common.callers import CALLER_METADATA_KEY
from services.common.keyring import key_id_for_public_key
from services.consent.audit import verify_export, write_export_stream
from services.consent.purposes import DEFAULT_PURPOSES
from services.demo.shop import PURPOSES, PlannedEvent, Shop, Shopper, load_retail, plan_shop
from services.demo.summary import DemoSummary, ErasureReport, Recommended

CALLER: Final = "steward-demo"
CALL_DEADLINE: Final = 15.0
"""Seconds any one unary call may take."""
TRAIN_DEADLINE: Final = 180.0
EXPORT_DEADLINE: Final = 120.0
CONNECT_TIMEOUT: Final = 10.0
BATCH: Final = 500
CONSENT_THREADS: Final = 8
CATCH_UP_TIMEOUT: Final = 60.0
ERASURE_TIMEOUT: Final = 90.0
PROPAGATION_TIMEOUT: Final = 90.0
POLL_SECONDS: Final = 0.2
SIGNALS_AT: Final = 2 / 3
"""How far through the timeline the GPC signal and the withdrawal happen."""
RECOMMENDED: Final = 5
SERVING_MODEL: Final = "hybrid"
"""The recommender's default model: the demo trains only it (it blends the others)."""

SOURCES: Final = {
    "web": consent_pb2.CONSENT_SOURCE_WEB_BANNER,
    "app": consent_pb2.CONSENT_SOURCE_APP,
    "store": consent_pb2.CONSENT_SOURCE_STORE,
}
T = TypeVar("T")


class DemoError(RuntimeError):
    """The demo cannot go on (the suite is unreachable, or answered something unexpected)."""


@dataclass(slots=True)
class _Stubs:
    consent: consent_pb2_grpc.ConsentServiceStub
    audit: audit_pb2_grpc.AuditServiceStub
    identity: identity_pb2_grpc.IdentityServiceStub
    tagging: tagging_pb2_grpc.TaggingServiceStub
    recommend: recommend_pb2_grpc.RecommendServiceStub
    metadata: tuple[tuple[str, str], ...]


def call_metadata() -> tuple[tuple[str, str], ...]:
    """The demo names itself as the caller (credentials, if any, travel with the channel)."""
    return ((CALLER_METADATA_KEY, CALLER),)


def play(
    channel: grpc.Channel,
    *,
    customers: int,
    seed: int,
    progress: Progress | None = None,
    data_path: Path | None = None,
    run_tag: str | None = None,
    now: datetime | None = None,
) -> DemoSummary:
    """Run the whole story against the suite ``channel`` leads to (opened by the caller with
    whatever credentials the suite wants) and return what it now knows."""
    started = time.monotonic()
    tag = run_tag or uuid.uuid4().hex[:6]
    shop = plan_shop(
        load_retail(data_path),
        customers=customers,
        seed=seed,
        now=now or datetime.now(UTC),
        run_tag=tag,
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT)
    except grpc.FutureTimeoutError as error:
        raise DemoError("the suite is not reachable (is `steward serve` running?)") from error
    stubs = _Stubs(
        consent_pb2_grpc.ConsentServiceStub(channel),
        audit_pb2_grpc.AuditServiceStub(channel),
        identity_pb2_grpc.IdentityServiceStub(channel),
        tagging_pb2_grpc.TaggingServiceStub(channel),
        recommend_pb2_grpc.RecommendServiceStub(channel),
        call_metadata(),
    )
    summary = _Story(shop, stubs, seed, progress).run()
    summary.seconds = time.monotonic() - started
    return summary


class _Story:
    """One run: the shop, the stubs, and what has been learnt so far."""

    def __init__(self, shop: Shop, stubs: _Stubs, seed: int, progress: Progress | None) -> None:
        self.shop = shop
        self.stubs = stubs
        self.progress = progress
        self.persons: dict[int, str] = {}
        self.notices: dict[str, tuple[str, str]] = {}
        self.rule_ids: list[str] = []
        self.accepted: Counter[int] = Counter()
        self.profiled: Counter[int] = Counter()
        self.last_accepted: dict[str, tuple[int, common_pb2.BehaviourEvent]] = {}
        self.summary = DemoSummary(
            run_tag=shop.run_tag,
            seed=seed,
            shoppers=len(shop.shoppers),
            items=len(shop.items),
            invoices_from=shop.starts_at.date().isoformat(),
            invoices_to=shop.ends_at.date().isoformat(),
            purchases_sent=shop.purchases,
        )
        self.moment = shop.starts_at + (shop.ends_at - shop.starts_at) * SIGNALS_AT
        special = _pick_special(shop, self.moment)
        self.gpc_shopper, self.withdrawing, self.erased, self.hand_merged = special
        # Their consent changes during the run: they never serve to tell whether the consumers
        # have caught up.
        self.special = {s.index for s in special[:3] if s is not None}

    def run(self) -> DemoSummary:
        phases: list[tuple[str, Callable[[], None]]] = [
            ("purposes and rules", self.set_up),
            ("catalogue", self.load_catalogue),
            ("identities", self.resolve_identities),
            ("consents", self.record_consents),
            ("events", self.collect_events),
            ("consumers", self.wait_for_consumers),
            ("recommend", self.train_and_recommend),
            ("erasure", self.erase),
            ("what the suite knows", self.gather),
            ("ledger", self.verify_ledger),
        ]
        for name, phase in phases:
            began = time.monotonic()
            phase()
            self.summary.phase_seconds[name] = round(time.monotonic() - began, 2)
        return self.summary

    # Calls --------------------------------------------------------------------------------------

    def call(self, method: Callable[..., T], request: object, deadline: float = CALL_DEADLINE) -> T:
        return method(request, timeout=deadline, metadata=self.stubs.metadata)

    def _task(self, description: str, total: int) -> Callable[[int], None]:
        if self.progress is None:
            return lambda advance: None
        task = self.progress.add_task(description, total=total)
        progress = self.progress
        return lambda advance: progress.advance(task, advance)

    # Phases -------------------------------------------------------------------------------------

    def set_up(self) -> None:
        """Make sure the four purposes exist (defining only missing ones), then put the rules."""
        listed = self.call(
            self.stubs.consent.ListPurposes, consent_pb2.ListPurposesRequest(page_size=100)
        )
        current = {p.id: p for p in listed.purposes}
        defaults = {p.id: p for p in DEFAULT_PURPOSES}
        for purpose_id in PURPOSES:
            if purpose_id not in current:
                definition = defaults[purpose_id]
                answer = self.call(
                    self.stubs.consent.DefinePurpose,
                    consent_pb2.DefinePurposeRequest(
                        purpose=common_pb2.Purpose(
                            id=definition.id,
                            legal_basis=definition.legal_basis,
                            description=definition.description,
                            policy_version=definition.policy_version,
                            notice_sha256=definition.notice_sha256,
                            default_lifetime=Duration(
                                seconds=int(definition.default_lifetime.total_seconds())
                            ),
                            retention_days=definition.retention_days,
                            allowed_fields=list(definition.allowed_fields),
                            gpc_withdraws=definition.gpc_withdraws,
                        )
                    ),
                )
                current[purpose_id] = answer.purpose
                self.summary.purposes_defined.append(purpose_id)
        self.notices = {
            purpose_id: (current[purpose_id].policy_version, current[purpose_id].notice_sha256)
            for purpose_id in PURPOSES
        }
        rules = rules_yaml()
        stored = self.call(self.stubs.tagging.PutRuleSet, tagging_pb2.PutRuleSetRequest(yaml=rules))
        self.summary.rule_set_version = stored.rule_set.version
        self.summary.k_floor = stored.rule_set.k_floor
        self.rule_ids = [rule.id for rule in stored.rule_set.rules]

    def load_catalogue(self) -> None:
        items = [
            recommend_pb2.Item(
                item_id=item.item_id,
                title=item.title,
                category=item.department,
                tags=sorted({word for word in item.words if len(word) > 2})[:16],
                price=item.price,
                available=True,
            )
            for item in self.shop.items.values()
        ]
        advance = self._task("catalogue", len(items))
        for chunk in _chunks(items, BATCH):
            self.call(self.stubs.recommend.PutItems, recommend_pb2.PutItemsRequest(items=chunk))
            advance(len(chunk))

    def resolve_identities(self) -> None:
        """Each department resolves what it sees alone; then the CRM import and app logins link
        them (automatic merges); one store card the CRM never heard of is merged by hand."""
        shoppers = self.shop.shoppers
        seen: list[tuple[int, str, list[common_pb2.Identifier]]] = []
        for shopper in shoppers:
            seen.append(
                (shopper.index, "web", [shopper.identifier("email"), shopper.identifier("cookie")])
            )
            if shopper.device_id:
                seen.append((shopper.index, "app", [shopper.identifier("device")]))
            if shopper.loyalty_card:
                seen.append((shopper.index, "store", [shopper.identifier("card")]))
            seen.append((shopper.index, "crm", [shopper.identifier("crm")]))
        links: list[tuple[int, str, list[common_pb2.Identifier]]] = []
        for shopper in shoppers:
            crm = [shopper.identifier("crm"), shopper.identifier("email")]
            if shopper.loyalty_card and shopper is not self.hand_merged:
                crm.append(shopper.identifier("card"))
            links.append((shopper.index, "crm", crm))
            if shopper.device_id:
                links.append(
                    (
                        shopper.index,
                        "app",
                        [shopper.identifier("device"), shopper.identifier("email")],
                    )
                )
        self.summary.identifiers_sent = sum(len(ids) for _, _, ids in [*seen, *links])
        advance = self._task("identities", len(seen) + len(links))
        department_persons: dict[tuple[int, str], str] = {}
        for batch in _chunks(seen, BATCH):
            for (index, source, _), result in zip(batch, self._resolve(batch), strict=True):
                department_persons[index, source] = result.person_id
                self.summary.persons_created += int(result.created)
            advance(len(batch))
        for batch in _chunks(links, BATCH):
            for (index, _, _), result in zip(batch, self._resolve(batch), strict=True):
                self.persons[index] = result.person_id
                self.summary.automatic_merges += len(result.merged_person_ids)
            advance(len(batch))
        if self.hand_merged is not None:
            index = self.hand_merged.index
            self._merge_by_hand(index, department_persons[index, "store"])
        self.summary.persons_after_merging = len(set(self.persons.values()))

    def _merge_by_hand(self, index: int, store_person: str) -> None:
        """An operator merges the shopper's store person into the shopper, with a reason."""
        merged = self.call(
            self.stubs.identity.Merge,
            identity_pb2.MergeRequest(
                person_ids=[self.persons[index], store_person],
                reason="the customer showed their loyalty card at the service desk",
            ),
        )
        self.persons[index] = merged.merge.surviving_person_id
        self.summary.explicit_merge_id = merged.merge.merge_id
        person = self.call(
            self.stubs.identity.GetPerson,
            identity_pb2.GetPersonRequest(person_id=self.persons[index]),
        ).person
        self.summary.merged_person_identifiers = {
            _type_name(linked.type): sorted(linked.sources) for linked in person.identifiers
        }

    def _resolve(
        self, batch: Sequence[tuple[int, str, list[common_pb2.Identifier]]]
    ) -> Sequence[identity_pb2.ResolveResult]:
        answer = self.call(
            self.stubs.identity.Resolve,
            identity_pb2.ResolveRequest(
                items=[
                    identity_pb2.ResolveItem(identifiers=ids, source=source)
                    for _, source, ids in batch
                ]
            ),
        )
        return list(answer.results)

    def record_consents(self) -> None:
        """Each shopper answers the banner (or the app's or the till's prompt) at first sight."""
        shoppers = self.shop.shoppers
        advance = self._task("consents", len(shoppers))
        choices = Counter(shopper.banner for shopper in shoppers)
        self.summary.banner_choices = dict(choices)
        self.summary.grants = {
            purpose: sum(shopper.grants[purpose] for shopper in shoppers) for purpose in PURPOSES
        }

        def record(shopper: Shopper) -> int:
            first_seen = shopper.first_seen or self.shop.starts_at
            answer = self.call(
                self.stubs.consent.RecordConsent,
                consent_pb2.RecordConsentRequest(
                    subject=common_pb2.PersonRef(person_id=self.persons[shopper.index]),
                    decisions=[
                        self._decision(purpose, granted)
                        for purpose, granted in shopper.grants.items()
                    ],
                    source=SOURCES[shopper.first_channel],
                    locale="en-GB",
                    occurred_at=_stamp(first_seen - timedelta(minutes=2)),
                ),
            )
            advance(1)
            return len(answer.receipts)

        with futures.ThreadPoolExecutor(CONSENT_THREADS) as pool:
            self.summary.decisions_recorded = sum(pool.map(record, shoppers))

    def _decision(self, purpose: str, granted: bool) -> consent_pb2.DecisionInput:
        policy_version, notice = self.notices[purpose]
        return consent_pb2.DecisionInput(
            purpose=purpose,
            decision=common_pb2.DECISION_GRANTED if granted else common_pb2.DECISION_DENIED,
            policy_version=policy_version,
            notice_sha256=notice,
        )

    def collect_events(self) -> None:
        """The timeline in Collect batches; GPC and the withdrawal happen two thirds through.

        One batch is sent twice, as a client does when an answer is lost to a timeout: every
        event of the second copy is dropped as DUPLICATE.
        """
        events = self.shop.events
        moment = self.moment
        split = next(
            (n for n, planned in enumerate(events) if _when(planned.message) >= moment),
            len(events),
        )
        advance = self._task("events", len(events))
        dropped: Counter[str] = Counter()
        by_channel: Counter[str] = Counter()
        by_purpose: Counter[str] = Counter()
        sent = 0
        resent = False
        for part, signals in ((events[:split], True), (events[split:], False)):
            for batch in _chunks(part, BATCH):
                copies = 1 if resent else 2
                resent = True
                for _ in range(copies):
                    answer = self.call(
                        self.stubs.consent.Collect,
                        consent_pb2.CollectRequest(events=[planned.message for planned in batch]),
                    )
                    sent += len(batch)
                    for planned, result in zip(batch, answer.results, strict=True):
                        if result.accepted:
                            by_channel[planned.message.channel] += 1
                            by_purpose.update(result.purposes)
                            self.accepted[planned.shopper] += 1
                            if "profiling" in result.purposes:
                                self.profiled[planned.shopper] += 1
                            if planned.shopper not in self.special:
                                self._remember_last(planned, result.purposes)
                        else:
                            dropped[consent_pb2.DropReason.Name(result.drop_reason)] += 1
                advance(len(batch))
            if signals:
                self.signal_and_withdraw(moment)
        self.summary.events_sent = sent
        self.summary.events_accepted = sum(by_channel.values())
        self.summary.dropped = {
            reason.removeprefix("DROP_REASON_"): count for reason, count in dropped.items()
        }
        self.summary.accepted_by_channel = dict(by_channel)
        self.summary.accepted_by_purpose = dict(by_purpose)

    def _remember_last(self, planned: PlannedEvent, purposes: Iterable[str]) -> None:
        """The newest event each consumer must hold: tagging keeps every profiling event,
        recommend every personalisation event with an item (purchases surely so)."""
        for purpose in purposes:
            if purpose == "profiling" or (
                purpose == "personalisation"
                and planned.message.type == common_pb2.EVENT_TYPE_PURCHASE
            ):
                self.last_accepted[purpose] = (planned.shopper, planned.message)

    def signal_and_withdraw(self, moment: datetime) -> None:
        """A browser sends Global Privacy Control; another shopper withdraws in the app."""
        if self.gpc_shopper is not None:
            self.call(
                self.stubs.consent.ApplySignals,
                consent_pb2.ApplySignalsRequest(
                    subject=common_pb2.PersonRef(
                        identifiers=[self.gpc_shopper.identifier("cookie")]
                    ),
                    gpc=True,
                    occurred_at=_stamp(moment),
                    locale="en-GB",
                ),
            )
        if self.withdrawing is not None:
            self.call(
                self.stubs.consent.RecordConsent,
                consent_pb2.RecordConsentRequest(
                    subject=common_pb2.PersonRef(person_id=self.persons[self.withdrawing.index]),
                    decisions=[
                        consent_pb2.DecisionInput(
                            purpose="personalisation",
                            decision=common_pb2.DECISION_WITHDRAWN,
                            policy_version=self.notices["personalisation"][0],
                            notice_sha256=self.notices["personalisation"][1],
                        )
                    ],
                    source=consent_pb2.CONSENT_SOURCE_APP,
                    locale="en-GB",
                    occurred_at=_stamp(moment),
                ),
            )

    def wait_for_consumers(self) -> None:
        """Tagging and recommend follow consent's log: wait until each has applied the last
        event it was sent (both apply the log in order, so everything before it is in)."""
        deadline = time.monotonic() + CATCH_UP_TIMEOUT
        tagging_done = self._profiling_probe() is None
        recommend_done = self._personalisation_probe() is None
        while time.monotonic() < deadline and not (tagging_done and recommend_done):
            tagging_done = tagging_done or self._tagging_caught_up()
            recommend_done = recommend_done or self._recommend_caught_up()
            if not (tagging_done and recommend_done):
                time.sleep(POLL_SECONDS)
        self.summary.consumers_caught_up = tagging_done and recommend_done

    def _profiling_probe(self) -> tuple[str, int] | None:
        """A shopper whose events tagging holds, and how many of them it should hold."""
        last = self.last_accepted.get("profiling")
        if last is None:
            return None
        shopper, _ = last
        return self.persons[shopper], self.profiled[shopper]

    def _tagging_caught_up(self) -> bool:
        probe = self._profiling_probe()
        if probe is None:
            return True
        person, expected = probe
        try:
            profile = self.call(
                self.stubs.tagging.GetProfile, tagging_pb2.GetProfileRequest(person_id=person)
            ).profile
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:
                return False
            raise
        return profile.events_90d >= expected

    def _personalisation_probe(self) -> tuple[str, common_pb2.BehaviourEvent] | None:
        last = self.last_accepted.get("personalisation")
        if last is None:
            return None
        shopper, message = last
        return self.persons[shopper], message

    def _recommend_caught_up(self) -> bool:
        probe = self._personalisation_probe()
        if probe is None:
            return True
        person, message = probe
        held = self.call(
            self.stubs.recommend.ExportPerson, recommend_pb2.ExportPersonRequest(person_id=person)
        )
        return any(
            interaction.item_id == message.item_id
            and interaction.occurred_at.seconds >= message.occurred_at.seconds
            for interaction in held.interactions
        )

    def train_and_recommend(self) -> None:
        """Train the serving model, then ask it for the busiest shoppers and the one who
        withdrew personalisation."""
        self.train()
        asked = [
            s
            for s in sorted(
                (s for s in self.shop.shoppers if s.grants["personalisation"]),
                key=lambda s: -self.accepted[s.index],
            )
            if s is not self.withdrawing and s is not self.erased
        ][:2]
        if self.withdrawing is not None:
            asked.append(self.withdrawing)
        for shopper in asked:
            answer = self.call(
                self.stubs.recommend.Recommend,
                recommend_pb2.RecommendRequest(
                    person_id=self.persons[shopper.index], k=RECOMMENDED, diversity=0.3
                ),
            )
            label = f"shopper #{shopper.index + 1}"
            if shopper is self.withdrawing:
                label += " (withdrew personalisation)"
            self.summary.recommendations.append(
                Recommended(
                    shopper=label,
                    personalised=answer.personalised,
                    model=answer.model,
                    titles=[item.title for item in answer.items],
                )
            )

    def train(self) -> None:
        """Train the serving model and wait for it, its offline evaluation included: a
        background job would leave a training thread running after the demo, in whatever
        process hosts the suite (a test's, say), which would then hang at exit."""
        self.call(
            self.stubs.recommend.Train,
            recommend_pb2.TrainRequest(models=[SERVING_MODEL], wait=True),
            TRAIN_DEADLINE,
        )

    def erase(self) -> None:
        """A shopper's erasure request: erase, then follow it until every service is done."""
        if self.erased is None:
            return
        person = self.persons[self.erased.index]
        began = time.monotonic()
        erasure = self.call(
            self.stubs.consent.EraseSubject,
            consent_pb2.EraseSubjectRequest(
                subject=common_pb2.PersonRef(person_id=person),
                reason="demo: data subject request by e-mail",
            ),
        ).erasure
        deadline = began + ERASURE_TIMEOUT
        while erasure.state != consent_pb2.ERASURE_STATE_DONE and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            erasure = self.call(
                self.stubs.consent.GetErasure,
                consent_pb2.GetErasureRequest(erasure_id=erasure.erasure_id),
            ).erasure
        check = self.call(
            self.stubs.consent.CheckConsent,
            consent_pb2.CheckConsentRequest(
                subject=common_pb2.PersonRef(person_id=person), purpose="analytics"
            ),
        )
        self.summary.erasure = ErasureReport(
            state=_erasure_state(erasure.state),
            services={part.service: _erasure_state(part.state) for part in erasure.services},
            seconds=round(time.monotonic() - began, 2),
            consent_after=consent_pb2.ConsentReason.Name(check.reason).removeprefix(
                "CONSENT_REASON_"
            ),
        )

    def gather(self) -> None:
        """What the suite now knows: tags per shopper (GetTags), audiences (GetAudience, refused
        under the k floor), the GPC and withdrawal outcomes, and the models."""
        live = [s for s in self.shop.shoppers if s is not self.erased]
        granted: Counter[str] = Counter()
        advance = self._task("tags", len(live))
        for shopper in live:
            tags = self.call(
                self.stubs.tagging.GetTags,
                tagging_pb2.GetTagsRequest(person_id=self.persons[shopper.index]),
            )
            granted.update(tag.tag_id for tag in tags.tags)
            advance(1)
        self.summary.tags_granted = dict(granted)
        for tag_id in self.rule_ids:
            try:
                audience = self.call(
                    self.stubs.tagging.GetAudience,
                    tagging_pb2.GetAudienceRequest(tag_id=tag_id, page_size=1),
                )
                self.summary.audiences[tag_id] = audience.size
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.FAILED_PRECONDITION:
                    raise
                self.summary.audiences[tag_id] = None
        if self.gpc_shopper is not None:
            person = self.persons[self.gpc_shopper.index]
            marketing = self._check(person, "marketing")
            self.summary.gpc_marketing = consent_pb2.ConsentReason.Name(
                marketing.reason
            ).removeprefix("CONSENT_REASON_")
            self.summary.gpc_marketing_allowed = marketing.allowed
            self.summary.gpc_analytics_allowed = self._check(person, "analytics").allowed
        if self.withdrawing is not None:
            self._follow_withdrawal(self.persons[self.withdrawing.index])
        info = self.call(self.stubs.recommend.GetModelInfo, recommend_pb2.GetModelInfoRequest())
        self.summary.models = [
            (
                model.name,
                recommend_pb2.ModelState.Name(model.state).removeprefix("MODEL_STATE_"),
                model.items,
                model.persons,
                model.interactions,
            )
            for model in info.models
        ]
        self.summary.pending_forgets = info.pending_forgets

    def _check(self, person: str, purpose: str) -> consent_pb2.CheckConsentResponse:
        return self.call(
            self.stubs.consent.CheckConsent,
            consent_pb2.CheckConsentRequest(
                subject=common_pb2.PersonRef(person_id=person), purpose=purpose
            ),
        )

    def _follow_withdrawal(self, person: str) -> None:
        """Follow the withdrawn purpose's state until consent reports the withdrawal applied by
        every consumer (tagging, recommend), or ``PROPAGATION_TIMEOUT`` passes."""
        deadline = time.monotonic() + PROPAGATION_TIMEOUT
        while True:
            states = self.call(
                self.stubs.consent.GetConsent,
                consent_pb2.GetConsentRequest(subject=common_pb2.PersonRef(person_id=person)),
            ).states
            state = next(s for s in states if s.purpose == "personalisation")
            if state.propagation.complete or time.monotonic() >= deadline:
                break
            time.sleep(POLL_SECONDS)
        self.summary.withdrawn_purpose = state.purpose
        self.summary.withdrawal_reason = consent_pb2.ConsentReason.Name(state.reason).removeprefix(
            "CONSENT_REASON_"
        )
        self.summary.withdrawal_propagated = state.propagation.complete
        self.summary.withdrawal_acknowledged_by = sorted(
            ack.consumer for ack in state.propagation.acknowledgements
        )

    def verify_ledger(self) -> None:
        """Sign a checkpoint of everything so far, export the ledger, and verify the export
        offline with the public key its header names."""
        self.call(self.stubs.audit.GetCheckpoint, audit_pb2.GetCheckpointRequest(sign_now=True))
        header_keys: list[str] = []

        def keep_header(
            responses: Iterable[audit_pb2.ExportLedgerResponse],
        ) -> Iterator[audit_pb2.ExportLedgerResponse]:
            for response in responses:
                if response.WhichOneof("item") == "header":
                    header_keys.append(response.header.public_key_pem)
                yield response

        exported = io.StringIO()
        stream = self.stubs.audit.ExportLedger(
            audit_pb2.ExportLedgerRequest(), timeout=EXPORT_DEADLINE, metadata=self.stubs.metadata
        )
        entries, checkpoints = write_export_stream(exported, keep_header(stream))
        if not header_keys:
            raise DemoError("the ledger export carried no header")
        exported.seek(0)
        report = verify_export(exported, header_keys[0])
        self.summary.ledger_entries = entries
        self.summary.ledger_checkpoints = checkpoints
        self.summary.ledger_checkpoints_verified = report.checkpoints_verified
        self.summary.ledger_verified = report.ok
        self.summary.ledger_problem = report.problem
        self.summary.ledger_key_id = key_id_for_public_key(header_keys[0])


def rules_yaml() -> str:
    """The demo's rule set (services/demo/rules.yaml)."""
    return resources.files("services.demo").joinpath("rules.yaml").read_text(encoding="utf-8")


def _pick_special(
    shop: Shop, moment: datetime
) -> tuple[Shopper | None, Shopper | None, Shopper | None, Shopper | None]:
    """The GPC shopper, the one who withdraws, the one erased, the one merged by hand.

    Distinct shoppers who accepted everything, so each change is visible. The first two were
    seen before ``moment`` and shop again after it on the web or in the app, so their later
    events show the change; the hand-merged one has a loyalty card.
    """
    active_after = {
        planned.shopper
        for planned in shop.events
        if planned.message.channel != "store" and _when(planned.message) > moment
    }
    accepting = [s for s in shop.shoppers if s.banner == "accept_all"]
    carded = [s for s in accepting if s.loyalty_card]
    hand_merged = carded[0] if carded else None
    changing = (
        s
        for s in accepting
        if s is not hand_merged
        and s.index in active_after
        and s.first_seen is not None
        and s.first_seen < moment
    )
    gpc, withdrawing = next(changing, None), next(changing, None)
    erased = next(
        (s for s in accepting if s not in (hand_merged, gpc, withdrawing)),
        None,
    )
    return gpc, withdrawing, erased, hand_merged


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def _when(message: common_pb2.BehaviourEvent) -> datetime:
    return message.occurred_at.ToDatetime(tzinfo=UTC)


def _type_name(kind: common_pb2.IdentifierType.ValueType) -> str:
    return common_pb2.IdentifierType.Name(kind).removeprefix("IDENTIFIER_TYPE_")


def _erasure_state(state: consent_pb2.ErasureState.ValueType) -> str:
    return consent_pb2.ErasureState.Name(state).removeprefix("ERASURE_STATE_")
