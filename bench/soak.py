"""Soak: a shop's mixed traffic against the four services, each in a process of its own, for a
set time; then a consistency check across the services and a scan for leaked identifiers.

The services run as a deployment runs them (compose.yaml): ``steward serve --service X`` once per
service on its own port, ``STEWARD_<SERVICE>_TARGET`` pointing each at the others, one keyring,
logs as JSON lines in each process's ``server.log`` (level INFO), spans and metrics exported by
OTLP to a collector in this process (``services.testing.otlp``). Storage is SQLite (a data
directory per process) or, with ``--database-url``, a fresh PostgreSQL database
``steward_soak_<random>`` made on that server for the run and dropped after it.

The shop is the UCI Online Retail slice (``/work/shared/data/online_retail_20k.csv``: its 2,226
products go into recommend's catalogue; each shopper replays the purchases of one of its 756
customers, cycling). The shoppers are synthetic: ``shopperN@example.org`` (sometimes sent as
``ShopperN@Example.org``), a phone in Ofcom's drama range ``+44 20 7946 0NNN`` (written three
ways) for the first 1,000, and two device ids (UUIDs, sometimes upper-case). Each starts with
consent recorded by identifiers: most grant every purpose, some only analytics and
personalisation, some only analytics, a few deny all.

For ``--seconds``, ``--clients`` threads each send their share of ``--rate`` operations a second
on a fixed schedule, picking by weight: Collect batches of ``--batch`` events from a few shoppers
(views, dwells, searches, carts and purchases of their template's items, identified by person
id, e-mail, phone or a linked device; one batch in 30 is sent again as a client retry would, and
must come back all DUPLICATE), consent changes (a purpose granted or denied), Resolve (e-mail
seen with the second device, as an app login), GetTags, Recommend, withdrawals (one or two
granted purposes withdrawn) and erasures (by identifiers or person id; the shopper is replaced
by a new one, so the population stays the same size). One shopper's operations never overlap
(a lock each), so the client knows what each shopper has granted.

Printed: the machine and its load average, throughput, p50/p99/max latency per RPC, errors by
status code, resident memory (VmRSS) of each service sampled every ``--sample-seconds`` with
the load average beside it, then the consistency check, run once the traffic has stopped and
retried until it holds or ``--settle-seconds`` pass:

- every erasure's GetErasure is DONE for consent, identity, tagging and recommend; the erased
  person is unknown to identity and has no tags and no interactions;
- for ``--check-sample`` shoppers (all of them when 0): what GetConsent allows is what the client
  granted; every tag GetTags shows is gated on an allowed purpose; without personalisation,
  recommend holds no interaction; a shopper who never lost personalisation and had an event
  accepted for it has some; every propagation GetConsent shows is complete;
- every withdrawal that stopped a granted purpose has its WITHDRAWAL_PROPAGATED ledger entry;
- every event the client saw accepted is in consent's ``consent_events`` exactly once (none of
  an erased person's), no event was accepted twice, and nothing the client saw dropped is stored.

Last, with the services stopped (so every span has been flushed): every table of every database,
every log line and every exported span and metric is scanned for each raw identifier the
workload sent, in the forms sent and normalised (``services.testing.leaks``), and the tables also
for the erased persons' ids. Figures only: nothing about time or memory is asserted here;
``tests/reliability/test_soak.py`` runs the same code for a short while and asserts the
consistency check, the scan and that no call ended UNKNOWN or INTERNAL. Run from the
repository root::

    .venv/bin/python bench/soak.py --seconds 600
    .venv/bin/python bench/soak.py --seconds 600 \\
        --database-url postgresql://postgres@127.0.0.1:5432/postgres

Data: D. Chen, S. L. Sain and K. Guo (2012), UCI Online Retail, CC BY 4.0 (first 20,000 rows).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from harness import (
    Server,
    ServerSpec,
    free_port,
    percentile,
    postgres_database,
    steward_servers,
)
from sqlalchemy import select, text
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, audit_pb2_grpc, consent_pb2, consent_pb2_grpc
from steward.identity.v1 import identity_pb2, identity_pb2_grpc
from steward.recommend.v1 import recommend_pb2, recommend_pb2_grpc
from steward.tagging.v1 import tagging_pb2, tagging_pb2_grpc

from services.common.config import SERVICE_DATABASES, Settings
from services.common.db import make_engine
from services.common.keyring import init_keys
from services.consent.store import EventRow
from services.recommend.evaluation import load_online_retail
from services.testing.leaks import Needles, rows_naming
from services.testing.otlp import OtlpCollector

T = common_pb2
C = consent_pb2
A = audit_pb2

ROOT: Final = Path(__file__).resolve().parents[1]
RETAIL_CSV: Final = ROOT.parent / "shared" / "data" / "online_retail_20k.csv"
RULES: Final = ROOT / "rules" / "example.yaml"
SERVICES: Final = ("identity", "consent", "tagging", "recommend")
HEALTH: Final = {
    "identity": "steward.identity.v1.IdentityService",
    "consent": "steward.consent.v1.ConsentService",
    "tagging": "steward.tagging.v1.TaggingService",
    "recommend": "steward.recommend.v1.RecommendService",
}
PURPOSES: Final = ("analytics", "personalisation", "profiling", "marketing")
STOPPABLE: Final = ("personalisation", "profiling", "marketing")
DRAMA_PHONES: Final = 1000
"""Ofcom keeps 020 7946 0000-0999 for fiction: the only London numbers that are nobody's."""
DEADLINE: Final = 30.0
RETRY_EVERY: Final = 30
WEIGHTS: Final = {
    "collect": 30,
    "consent_change": 8,
    "resolve": 10,
    "get_tags": 20,
    "recommend": 20,
    "withdrawal": 4,
    "erasure": 1,
}
CHANNELS: Final = ("web", "app", "store", "call_centre")
EVENT_TYPES: Final = (
    (T.EVENT_TYPE_VIEW, 45),
    (T.EVENT_TYPE_DWELL, 15),
    (T.EVENT_TYPE_SEARCH, 5),
    (T.EVENT_TYPE_SEARCH_CLICK, 5),
    (T.EVENT_TYPE_ADD_TO_CART, 15),
    (T.EVENT_TYPE_PURCHASE, 15),
)


# The shop -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shop:
    """The catalogue and, per customer of the data set, the items they bought."""

    items: list[recommend_pb2.Item]
    baskets: list[list[str]]

    @property
    def prices(self) -> dict[str, float]:
        return {item.item_id: item.price for item in self.items}


def load_shop(path: Path = RETAIL_CSV) -> Shop:
    dataset = load_online_retail(path)
    items = [
        recommend_pb2.Item(
            item_id=item.item_id,
            title=item.title,
            category=item.category,
            tags=list(item.tags),
            price=item.price,
            available=True,
        )
        for item in dataset.catalogue.items
    ]
    bought: dict[str, list[str]] = defaultdict(list)
    for interaction in dataset.interactions:
        bought[interaction.person_id].append(interaction.item_id)
    return Shop(items, [bought[customer] for customer in sorted(bought)])


@dataclass(eq=False)
class Shopper:
    """A synthetic shopper, the template customer whose purchases they replay, and what the
    client knows of them."""

    index: int
    basket: list[str]
    devices: tuple[str, str]
    person_id: str = ""
    granted: set[str] = field(default_factory=set)
    linked_second_device: bool = False
    erased: bool = False
    uncertain: bool = False
    """A change of theirs failed without an answer: the client's view may be wrong."""
    lost_personalisation: bool = False
    personalised_events: int = 0
    """Events accepted for personalisation that recommend learns from."""
    next_item: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def email(self) -> str:
        return f"shopper{self.index}@example.org"

    @property
    def phone(self) -> str | None:
        return f"+44 20 7946 {self.index:04d}" if self.index < DRAMA_PHONES else None

    def sent_email(self, rng: random.Random) -> str:
        return f"Shopper{self.index}@Example.org" if rng.random() < 0.3 else self.email

    def sent_phone(self, rng: random.Random) -> str | None:
        if self.phone is None:
            return None
        return rng.choice((self.phone, f"020 7946 {self.index:04d}", f"+44207946{self.index:04d}"))

    def sent_device(self, which: int, rng: random.Random) -> str:
        device = self.devices[which]
        return device.upper() if rng.random() < 0.3 else device

    def raw_identifiers(self) -> list[tuple[int, str]]:
        """Every identifier value the workload may send for this shopper, in every form."""
        values = [
            (T.IDENTIFIER_TYPE_EMAIL, self.email),
            (T.IDENTIFIER_TYPE_EMAIL, f"Shopper{self.index}@Example.org"),
        ]
        if self.phone is not None:
            values += [
                (T.IDENTIFIER_TYPE_PHONE, self.phone),
                (T.IDENTIFIER_TYPE_PHONE, f"020 7946 {self.index:04d}"),
            ]
        for device in self.devices:
            values += [(T.IDENTIFIER_TYPE_DEVICE_ID, device)]
        return values

    def known_identifiers(self, rng: random.Random) -> list[common_pb2.Identifier]:
        """The identifiers the shopper gave when they first consented."""
        identifiers = [
            T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=self.sent_email(rng)),
            T.Identifier(type=T.IDENTIFIER_TYPE_DEVICE_ID, value=self.sent_device(0, rng)),
        ]
        phone = self.sent_phone(rng)
        if phone is not None:
            identifiers.append(T.Identifier(type=T.IDENTIFIER_TYPE_PHONE, value=phone))
        return identifiers


def first_grants(rng: random.Random) -> tuple[set[str], set[str]]:
    """(granted, denied) for a new shopper, in the proportions of a cookie banner's answers."""
    draw = rng.random()
    if draw < 0.70:
        granted = set(PURPOSES)
    elif draw < 0.85:
        granted = {"analytics", "personalisation"}
    elif draw < 0.95:
        granted = {"analytics"}
    else:
        granted = set()
    return granted, set(PURPOSES) - granted


def makes_interaction(event: T.BehaviourEvent) -> bool:
    """Whether recommend learns from the event: a search, or a dwell under 30 s, it does not
    (``services/recommend/interactions.py``)."""
    if event.type == T.EVENT_TYPE_DWELL:
        return event.dwell_ms >= 30_000
    return event.type != T.EVENT_TYPE_SEARCH


# Measuring ----------------------------------------------------------------------------------


@dataclass
class Calls:
    """Latency and status code of every call, by RPC."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    codes: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def call(self, name: str, method: Callable[..., Any], request: Any) -> Any:
        """``method(request)`` timed; the answer, or the RpcError raised again."""
        start = time.perf_counter()
        try:
            answer = method(request, timeout=DEADLINE)
        except grpc.RpcError as error:
            with self._lock:
                self.codes[name][error.code().name] += 1
            raise
        elapsed = (time.perf_counter() - start) * 1000
        with self._lock:
            self.latencies[name].append(elapsed)
            self.codes[name]["OK"] += 1
        return answer

    def errors(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for codes in self.codes.values():
            total.update({code: n for code, n in codes.items() if code != "OK"})
        return total


@dataclass
class Stubs:
    consent: consent_pb2_grpc.ConsentServiceStub
    audit: audit_pb2_grpc.AuditServiceStub
    identity: identity_pb2_grpc.IdentityServiceStub
    tagging: tagging_pb2_grpc.TaggingServiceStub
    recommend: recommend_pb2_grpc.RecommendServiceStub


# The workload -------------------------------------------------------------------------------


@dataclass
class Options:
    seconds: float = 600.0
    rate: float = 40.0
    clients: int = 8
    batch: int = 12
    persons: int = 756
    sample_seconds: float = 30.0
    check_sample: int = 300
    settle_seconds: float = 120.0
    seed: int = 9
    database_url: str | None = None
    """A PostgreSQL server's URL: the run makes and drops a database of its own there."""
    data: Path = RETAIL_CSV
    work_dir: Path | None = None
    quiet: bool = False


@dataclass
class Report:
    """What a soak run found; ``bench/soak.py`` prints it, the test asserts on it."""

    backend: str = "sqlite"
    seconds: float = 0.0
    setup_seconds: float = 0.0
    operations: Counter[str] = field(default_factory=Counter)
    calls: Calls = field(default_factory=Calls)
    rss_kb: list[tuple[float, str, dict[str, int]]] = field(default_factory=list)
    """(seconds since the traffic started, load average, VmRSS in kB by service)."""
    events_sent: int = 0
    events_accepted: int = 0
    drops: Counter[str] = field(default_factory=Counter)
    shoppers: int = 0
    erasures: int = 0
    stopped_purposes: int = 0
    checked_persons: int = 0
    consistency: list[str] = field(default_factory=list)
    consistency_seconds: float = 0.0
    leaks: dict[str, set[str]] = field(default_factory=dict)
    """Where raw identifiers (or erased persons' ids) were found: place -> values."""
    scanned: dict[str, int] = field(default_factory=dict)
    """What the scan read: tables, log lines, spans, metric exports, identifiers."""
    load_average: tuple[str, str] = ("", "")
    lag_after_traffic: dict[str, int] = field(default_factory=dict)
    """Envelopes of consent's log each consumer had still to apply when the traffic stopped."""
    lag_after_check: dict[str, int] = field(default_factory=dict)


class Workload:
    """The shoppers, the client's view of them, and the operations on them."""

    def __init__(
        self,
        shop: Shop,
        stubs: Stubs,
        options: Options,
        report: Report,
        needles: Needles,
        needles_lock: threading.Lock,
    ) -> None:
        self.needles, self.needles_lock = needles, needles_lock
        self.shop = shop
        self.prices = shop.prices
        self.item_ids = [item.item_id for item in shop.items]
        self.stubs = stubs
        self.options = options
        self.report = report
        self.calls = report.calls
        self.rng = random.Random(options.seed)
        self.shoppers: list[Shopper] = []
        self.everyone: list[Shopper] = []
        self.erasure_ids: list[tuple[str, Shopper]] = []
        self.stops: list[tuple[int, Shopper]] = []
        self.accepted: dict[str, Shopper] = {}
        self.accepted_twice: list[str] = []
        self.dropped: set[str] = set()
        self.unanswered: set[str] = set()
        self.policy = "2026-01"
        self._lock = threading.Lock()
        self._next_index = 0
        self._next_event = 0
        self.run_tag = uuid.uuid4().hex[:8]
        self.halt = threading.Event()
        """Set to stop the traffic before its time (a service exited, Ctrl-C)."""

    # setting up -------------------------------------------------------------------------------

    def set_up(self) -> None:
        purposes = self.stubs.consent.ListPurposes(C.ListPurposesRequest(), timeout=DEADLINE)
        self.policy = next(p.policy_version for p in purposes.purposes if p.id == "analytics")
        self.stubs.tagging.PutRuleSet(
            tagging_pb2.PutRuleSetRequest(yaml=RULES.read_text()), timeout=DEADLINE
        )
        for start in range(0, len(self.shop.items), 1000):
            self.stubs.recommend.PutItems(
                recommend_pb2.PutItemsRequest(items=self.shop.items[start : start + 1000]),
                timeout=DEADLINE,
            )
        # Models trained before the traffic, as an operator does after loading a catalogue:
        # otherwise the first Recommend trains them while its caller waits.
        self.stubs.recommend.Train(recommend_pb2.TrainRequest(wait=True), timeout=600)
        shoppers = [self.new_shopper() for _ in range(self.options.persons)]
        failures: list[BaseException] = []

        def enrol(offset: int) -> None:
            rng = random.Random(self.options.seed * 7919 + offset)
            for shopper in shoppers[offset::4]:
                try:
                    self.first_consent(shopper, rng)
                except grpc.RpcError as error:
                    failures.append(error)

        threads = [threading.Thread(target=enrol, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise RuntimeError(f"{len(failures)} shoppers could not consent: {failures[0]}")
        self.shoppers = shoppers

    def new_shopper(self) -> Shopper:
        with self._lock:
            index = self._next_index
            self._next_index += 1
            devices = (
                str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
                str(uuid.UUID(int=self.rng.getrandbits(128), version=4)),
            )
            shopper = Shopper(index, self.shop.baskets[index % len(self.shop.baskets)], devices)
            self.everyone.append(shopper)
        with self.needles_lock:
            for kind, value in shopper.raw_identifiers():
                self.needles.add_identifier(kind, value)
        return shopper

    def first_consent(self, shopper: Shopper, rng: random.Random) -> None:
        granted, denied = first_grants(rng)
        answer = self.calls.call(
            "RecordConsent",
            self.stubs.consent.RecordConsent,
            C.RecordConsentRequest(
                subject=T.PersonRef(identifiers=shopper.known_identifiers(rng)),
                decisions=[self.decision(p, T.DECISION_GRANTED) for p in sorted(granted)]
                + [self.decision(p, T.DECISION_DENIED) for p in sorted(denied)],
                source=C.CONSENT_SOURCE_WEB_BANNER,
                locale="en-GB",
            ),
        )
        shopper.person_id = answer.person_id
        shopper.granted = granted

    def decision(self, purpose: str, decision: int) -> C.DecisionInput:
        return C.DecisionInput(purpose=purpose, decision=decision, policy_version=self.policy)

    # running ----------------------------------------------------------------------------------

    def run(self, seconds: float, clients: int, rate: float) -> None:
        names = list(WEIGHTS)
        weights = [WEIGHTS[name] for name in names]
        stop_at = time.monotonic() + seconds
        interval = clients / rate
        # The figures are the traffic's: setting up's calls are left out.
        self.calls = self.report.calls = Calls()
        failures: list[BaseException] = []
        halt = self.halt

        def client(number: int) -> None:
            try:
                send(number)
            except BaseException as error:
                failures.append(error)
                raise

        def send(number: int) -> None:
            rng = random.Random(self.options.seed * 104729 + number)
            due = time.monotonic() + rng.random() * interval
            while True:
                now = time.monotonic()
                if now >= stop_at or halt.is_set():
                    return
                if due > now:
                    time.sleep(min(due - now, stop_at - now))
                    continue
                due = max(due + interval, now - 1.0)
                operation = rng.choices(names, weights)[0]
                with suppress(grpc.RpcError):  # counted by code in Calls
                    getattr(self, operation)(rng)
                with self._lock:
                    self.report.operations[operation] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        finally:
            halt.set()  # on Ctrl-C too: the clients stop after their current call
            for thread in threads:
                thread.join()
        if failures:
            raise RuntimeError("a client thread failed") from failures[0]

    def pick(self, rng: random.Random, count: int = 1) -> list[Shopper]:
        with self._lock:
            return rng.sample(self.shoppers, min(count, len(self.shoppers)))

    @contextmanager
    def holding(self, shoppers: Sequence[Shopper]) -> Iterator[list[Shopper]]:
        """The shoppers' locks, in a fixed order; yields those not erased meanwhile."""
        ordered = sorted(set(shoppers), key=lambda s: s.index)
        for shopper in ordered:
            shopper.lock.acquire()
        try:
            yield [s for s in ordered if not s.erased]
        finally:
            for shopper in reversed(ordered):
                shopper.lock.release()

    def event_id(self) -> str:
        with self._lock:
            self._next_event += 1
            return f"soak-{self.run_tag}-{self._next_event}"

    def event(self, shopper: Shopper, rng: random.Random, now: datetime) -> T.BehaviourEvent:
        kinds, weights = zip(*EVENT_TYPES, strict=True)
        kind = rng.choices(kinds, weights)[0]
        if kind in (T.EVENT_TYPE_ADD_TO_CART, T.EVENT_TYPE_PURCHASE):
            item = shopper.basket[shopper.next_item % len(shopper.basket)]
            shopper.next_item += 1
        else:
            item = rng.choice(shopper.basket if rng.random() < 0.6 else self.item_ids)
        quantity = rng.randint(1, 6)
        channel = rng.choice(CHANNELS)
        event = T.BehaviourEvent(
            event_id=self.event_id(),
            type=kind,
            item_id=item,
            channel=channel,
            occurred_at=stamp(now - timedelta(milliseconds=rng.randint(0, 1500))),
        )
        if kind == T.EVENT_TYPE_PURCHASE:
            event.value = round(self.prices.get(item, 1.0) * quantity, 2)
            event.quantity = quantity
            event.currency = "GBP"
        elif kind == T.EVENT_TYPE_DWELL:
            event.dwell_ms = rng.randint(2_000, 90_000)
        elif kind == T.EVENT_TYPE_SEARCH:
            event.query = rng.choice(("lantern", "heart holder", "mug", "cake tin", "bag"))
        self.identify(event, shopper, channel, rng)
        return event

    def identify(
        self, event: T.BehaviourEvent, shopper: Shopper, channel: str, rng: random.Random
    ) -> None:
        """By person id (a backend that knows the customer) or by an identifier the channel
        sees, always one identity already holds for the shopper."""
        draw = rng.random()
        if draw < 0.35:
            event.person_id = shopper.person_id
            return
        if channel == "app":
            which = 1 if shopper.linked_second_device and rng.random() < 0.5 else 0
            kind, value = T.IDENTIFIER_TYPE_DEVICE_ID, shopper.sent_device(which, rng)
        elif channel in ("store", "call_centre") and shopper.phone is not None:
            kind, value = T.IDENTIFIER_TYPE_PHONE, shopper.sent_phone(rng) or ""
        else:
            kind, value = T.IDENTIFIER_TYPE_EMAIL, shopper.sent_email(rng)
        event.identifiers.append(T.Identifier(type=kind, value=value))

    # the operations ---------------------------------------------------------------------------

    def collect(self, rng: random.Random) -> None:
        with self.holding(self.pick(rng, rng.randint(3, 8))) as shoppers:
            if not shoppers:
                return
            now = datetime.now(UTC)
            events = [
                (self.event(s, rng, now), s)
                for s in (rng.choice(shoppers) for _ in range(self.options.batch))
            ]
            request = C.CollectRequest(events=[event for event, _ in events])
            try:
                answer = self.calls.call("Collect", self.stubs.consent.Collect, request)
            except grpc.RpcError:
                with self._lock:
                    self.unanswered.update(event.event_id for event, _ in events)
                raise
            self.tally(answer, events)
            if rng.randrange(RETRY_EVERY) == 0:
                again = self.calls.call("Collect", self.stubs.consent.Collect, request)
                with self._lock:
                    self.report.operations["collect_retry"] += 1
                self.tally(again, events)

    def tally(
        self, answer: C.CollectResponse, events: list[tuple[T.BehaviourEvent, Shopper]]
    ) -> None:
        with self._lock:
            self.report.events_sent += len(events)
            for result, (event, shopper) in zip(answer.results, events, strict=True):
                if result.accepted:
                    self.report.events_accepted += 1
                    if event.event_id in self.accepted:
                        self.accepted_twice.append(event.event_id)
                    self.accepted[event.event_id] = shopper
                    if "personalisation" in result.purposes and makes_interaction(event):
                        shopper.personalised_events += 1
                else:
                    self.report.drops[C.DropReason.Name(result.drop_reason)] += 1
                    if event.event_id not in self.accepted:
                        self.dropped.add(event.event_id)

    def consent_change(self, rng: random.Random) -> None:
        with self.holding(self.pick(rng)) as shoppers:
            for shopper in shoppers:
                purpose = rng.choice(PURPOSES)
                grant = purpose not in shopper.granted
                self.record(shopper, {purpose: T.DECISION_GRANTED if grant else T.DECISION_DENIED})

    def withdrawal(self, rng: random.Random) -> None:
        with self.holding(self.pick(rng)) as shoppers:
            for shopper in shoppers:
                held = [p for p in STOPPABLE if p in shopper.granted]
                if not held:
                    # Nothing to withdraw: the shopper grants personalisation again first.
                    self.record(shopper, {"personalisation": T.DECISION_GRANTED})
                    continue
                chosen = rng.sample(held, min(len(held), rng.randint(1, 2)))
                self.record(shopper, dict.fromkeys(chosen, T.DECISION_WITHDRAWN))
                with self._lock:
                    self.report.operations["purposes_withdrawn"] += len(chosen)

    def record(self, shopper: Shopper, decisions: dict[str, int]) -> None:
        request = C.RecordConsentRequest(
            subject=T.PersonRef(person_id=shopper.person_id),
            decisions=[self.decision(p, d) for p, d in decisions.items()],
            source=C.CONSENT_SOURCE_APP,
            locale="en-GB",
        )
        try:
            answer = self.calls.call("RecordConsent", self.stubs.consent.RecordConsent, request)
        except grpc.RpcError:
            shopper.uncertain = True
            raise
        for receipt in answer.receipts:
            stops = (
                decisions[receipt.purpose] != T.DECISION_GRANTED
                and receipt.purpose in shopper.granted
            )
            if stops:
                with self._lock:
                    self.stops.append((receipt.seq, shopper))
                if receipt.purpose == "personalisation":
                    shopper.lost_personalisation = True
        for purpose, decision in decisions.items():
            if decision == T.DECISION_GRANTED:
                shopper.granted.add(purpose)
            else:
                shopper.granted.discard(purpose)

    def resolve(self, rng: random.Random) -> None:
        with self.holding(self.pick(rng, rng.randint(1, 10))) as shoppers:
            if not shoppers:
                return
            request = identity_pb2.ResolveRequest(
                source="app",
                items=[
                    identity_pb2.ResolveItem(
                        identifiers=[
                            T.Identifier(type=T.IDENTIFIER_TYPE_EMAIL, value=s.sent_email(rng)),
                            T.Identifier(
                                type=T.IDENTIFIER_TYPE_DEVICE_ID, value=s.sent_device(1, rng)
                            ),
                        ]
                    )
                    for s in shoppers
                ],
            )
            answer = self.calls.call("Resolve", self.stubs.identity.Resolve, request)
            for result, shopper in zip(answer.results, shoppers, strict=True):
                if result.person_id == shopper.person_id:
                    shopper.linked_second_device = True
                else:
                    with self._lock:
                        self.report.consistency.append(
                            f"Resolve answered {result.person_id} for shopper {shopper.index} "
                            f"({shopper.person_id})"
                        )

    def get_tags(self, rng: random.Random) -> None:
        [shopper] = self.pick(rng)
        self.calls.call(
            "GetTags",
            self.stubs.tagging.GetTags,
            tagging_pb2.GetTagsRequest(person_id=shopper.person_id),
        )

    def recommend(self, rng: random.Random) -> None:
        [shopper] = self.pick(rng)
        request = recommend_pb2.RecommendRequest(person_id=shopper.person_id, k=10)
        if rng.random() < 0.3:
            request.session_item_ids.extend(rng.sample(shopper.basket, min(2, len(shopper.basket))))
        if rng.random() < 0.2:
            request.diversity = 0.5
        self.calls.call("Recommend", self.stubs.recommend.Recommend, request)

    def erasure(self, rng: random.Random) -> None:
        with self.holding(self.pick(rng)) as shoppers:
            for shopper in shoppers:
                subject = (
                    T.PersonRef(person_id=shopper.person_id)
                    if rng.random() < 0.5
                    else T.PersonRef(
                        identifiers=[
                            T.Identifier(
                                type=T.IDENTIFIER_TYPE_EMAIL, value=shopper.sent_email(rng)
                            )
                        ]
                    )
                )
                try:
                    answer = self.calls.call(
                        "EraseSubject",
                        self.stubs.consent.EraseSubject,
                        C.EraseSubjectRequest(subject=subject, reason="soak: customer request"),
                    )
                except grpc.RpcError:
                    shopper.uncertain = True
                    raise
                shopper.erased = True
                with self._lock:
                    self.erasure_ids.append((answer.erasure.erasure_id, shopper))
        if shoppers:
            replacement = self.new_shopper()
            self.first_consent(replacement, rng)
            with self._lock:
                self.shoppers[self.shoppers.index(shoppers[0])] = replacement


# The consistency check ----------------------------------------------------------------------


def check_consistency(workload: Workload, consent_db_url: str, sample: int) -> list[str]:
    """Every way the services disagree with each other or with what the client was told."""
    stubs = workload.stubs
    problems: list[str] = []
    for erasure_id, shopper in workload.erasure_ids:
        report = stubs.consent.GetErasure(
            C.GetErasureRequest(erasure_id=erasure_id), timeout=DEADLINE
        ).erasure
        states = {s.service: C.ErasureState.Name(s.state) for s in report.services}
        if (
            report.state != C.ERASURE_STATE_DONE
            or set(states) != set(SERVICES)
            or any(state != "ERASURE_STATE_DONE" for state in states.values())
        ):
            problems.append(f"erasure {erasure_id}: {C.ErasureState.Name(report.state)} {states}")
        problems += erased_everywhere(stubs, shopper)
    living = [s for s in workload.shoppers if not s.erased]
    chosen = living if sample <= 0 else random.Random(1).sample(living, min(sample, len(living)))
    for shopper in chosen:
        problems += person_consistent(stubs, shopper)
    problems += withdrawals_propagated(workload)
    problems += events_stored_once(workload, consent_db_url)
    return problems


def erased_everywhere(stubs: Stubs, shopper: Shopper) -> list[str]:
    problems = []
    try:
        stubs.identity.GetPerson(
            identity_pb2.GetPersonRequest(person_id=shopper.person_id), timeout=DEADLINE
        )
        problems.append(f"erased person {shopper.person_id} still known to identity")
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.NOT_FOUND:
            raise
    tags = stubs.tagging.GetTags(
        tagging_pb2.GetTagsRequest(person_id=shopper.person_id), timeout=DEADLINE
    ).tags
    if tags:
        problems.append(
            f"erased person {shopper.person_id} still has tags {[t.tag_id for t in tags]}"
        )
    held = stubs.recommend.ExportPerson(
        recommend_pb2.ExportPersonRequest(person_id=shopper.person_id), timeout=DEADLINE
    ).interactions
    if held:
        problems.append(f"erased person {shopper.person_id}: {len(held)} interactions in recommend")
    return problems


def person_consistent(stubs: Stubs, shopper: Shopper) -> list[str]:
    who = f"shopper {shopper.index} ({shopper.person_id})"
    problems = []
    states = stubs.consent.GetConsent(
        C.GetConsentRequest(subject=T.PersonRef(person_id=shopper.person_id)), timeout=DEADLINE
    ).states
    allowed = {s.purpose for s in states if s.allowed}
    if not shopper.uncertain and allowed != shopper.granted:
        problems.append(
            f"{who}: consent allows {sorted(allowed)}, the client granted {sorted(shopper.granted)}"
        )
    for state in states:
        if state.HasField("propagation") and not state.propagation.complete:
            problems.append(f"{who}: withdrawal of {state.purpose} not propagated")
    tags = stubs.tagging.GetTags(
        tagging_pb2.GetTagsRequest(person_id=shopper.person_id), timeout=DEADLINE
    ).tags
    for tag in tags:
        if tag.purpose not in allowed:
            problems.append(f"{who}: tag {tag.tag_id} gated on {tag.purpose}, not allowed")
    held = len(
        stubs.recommend.ExportPerson(
            recommend_pb2.ExportPersonRequest(person_id=shopper.person_id), timeout=DEADLINE
        ).interactions
    )
    if "personalisation" not in allowed and held:
        problems.append(f"{who}: {held} interactions in recommend without personalisation")
    if (
        "personalisation" in allowed
        and not shopper.lost_personalisation
        and not shopper.uncertain
        and shopper.personalised_events
        and not held
    ):
        problems.append(
            f"{who}: {shopper.personalised_events} events accepted for personalisation, "
            "none in recommend"
        )
    return problems


def withdrawals_propagated(workload: Workload) -> list[str]:
    propagated = set()
    for item in workload.stubs.audit.ExportLedger(A.ExportLedgerRequest(), timeout=120):
        if item.HasField("entry") and item.entry.kind == A.ENTRY_KIND_WITHDRAWAL_PROPAGATED:
            propagated.add(int(item.entry.details["withdrawal_seq"]))
    return [
        f"withdrawal at ledger seq {seq} (shopper {shopper.index}) has no propagated entry"
        for seq, shopper in workload.stops
        if not shopper.erased and seq not in propagated
    ]


def events_stored_once(workload: Workload, consent_db_url: str) -> list[str]:
    engine = make_engine(consent_db_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(EventRow.__table__.c.event_id))
            stored = Counter(row[0] for row in rows if row[0].startswith("soak-"))
    finally:
        engine.dispose()
    problems = [f"event {e} accepted twice" for e in workload.accepted_twice]
    for event_id, shopper in workload.accepted.items():
        expected = 0 if shopper.erased else 1
        if stored[event_id] != expected:
            problems.append(
                f"event {event_id} accepted for shopper {shopper.index}: stored "
                f"{stored[event_id]} times, expected {expected}"
            )
    unexpected = [e for e in stored if e not in workload.accepted and e not in workload.unanswered]
    problems += [f"event {e} stored but never accepted" for e in unexpected[:20]]
    return problems


# The services -------------------------------------------------------------------------------


@dataclass
class Deployment:
    servers: dict[str, Server]
    settings: dict[str, Settings]
    """Each process's settings, as it reads them (for its database URLs)."""

    def databases(self) -> dict[str, str]:
        """Every database the processes opened: ``service/database`` -> URL."""
        found: dict[str, str] = {}
        for service, settings in self.settings.items():
            for database in SERVICE_DATABASES:
                url = settings.db_url(database)
                if (
                    url.startswith("sqlite:///")
                    and not Path(url.removeprefix("sqlite:///")).exists()
                ):
                    continue
                if url not in found.values():
                    found[f"{service}/{database}"] = url
        return found

    def consumer_lag(self) -> dict[str, int]:
        """How many envelopes of consent's log each consumer has still to apply."""
        produced = scalar(
            self.settings["consent"].db_url("consent"),
            "SELECT coalesce(max(seq), 0) FROM consent_outbox",
        )
        return {
            consumer: produced
            - scalar(
                self.settings[consumer].db_url(consumer),
                f"SELECT coalesce(max(seq), 0) FROM {consumer}_consumer_cursors "
                "WHERE producer = 'consent'",
            )
            for consumer in ("tagging", "recommend")
        }

    def rss_kb(self) -> dict[str, int]:
        return {name: server.status("VmRSS") for name, server in self.servers.items()}


def scalar(url: str, statement: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return int(connection.execute(text(statement)).scalar_one())
    finally:
        engine.dispose()


@contextmanager
def deployment(
    work_dir: Path, database_url: str | None, otlp_endpoint: str
) -> Iterator[Deployment]:
    """The four services, a process each, on ports chosen up front so each knows the others."""
    ports = {service: free_port() for service in SERVICES}
    keys = work_dir / "keys"
    init_keys(keys, development=True)
    common = {
        "STEWARD_KEYS_DIR": str(keys),
        "STEWARD_LOG_LEVEL": "INFO",
        "STEWARD_LOG_FORMAT": "json",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
        **{f"STEWARD_{s.upper()}_TARGET": f"127.0.0.1:{p}" for s, p in ports.items()},
    }
    if database_url:
        common["STEWARD_DATABASE_URL"] = database_url
    specs = []
    settings: dict[str, Settings] = {}
    for service in SERVICES:
        data_dir = work_dir / service
        data_dir.mkdir(parents=True, exist_ok=True)
        settings[service] = Settings.from_env({**common, "STEWARD_DATA_DIR": str(data_dir)})
        specs.append(ServerSpec([service], data_dir, common, HEALTH[service], ports[service]))
    with steward_servers(specs) as servers:
        yield Deployment(dict(zip(SERVICES, servers, strict=True)), settings)


def stubs_for(stack: ExitStack, servers: dict[str, Server]) -> Stubs:
    def channel(service: str) -> grpc.Channel:
        return stack.enter_context(grpc.insecure_channel(servers[service].target))

    consent = channel("consent")
    return Stubs(
        consent=consent_pb2_grpc.ConsentServiceStub(consent),
        audit=audit_pb2_grpc.AuditServiceStub(consent),
        identity=identity_pb2_grpc.IdentityServiceStub(channel("identity")),
        tagging=tagging_pb2_grpc.TaggingServiceStub(channel("tagging")),
        recommend=recommend_pb2_grpc.RecommendServiceStub(channel("recommend")),
    )


# One run ------------------------------------------------------------------------------------


def run_soak(options: Options, say: Callable[[str], None] = print) -> Report:
    """Set up, run the traffic, check consistency, stop the services, scan for leaks."""
    report = Report(backend="postgresql" if options.database_url else "sqlite")
    shop = load_shop(options.data)
    with ExitStack() as stack:
        work_dir = options.work_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="steward-soak-"))
        )
        database_url = None
        if options.database_url:
            database_url = stack.enter_context(
                postgres_database(options.database_url, "steward_soak")
            )
        span_hits: dict[str, set[str]] = defaultdict(set)
        needles = Needles()
        scan_lock = threading.Lock()

        def scan_export(kind: str, request: bytes) -> None:
            text = request.decode("latin-1")
            with scan_lock:
                found = needles.found_in(text)
                if found:
                    span_hits[kind].update(found)

        collector = stack.enter_context(OtlpCollector(on_export=scan_export))
        report.load_average = (load_average(), "")
        with ExitStack() as running:
            started = time.monotonic()
            suite = running.enter_context(deployment(work_dir, database_url, collector.endpoint))
            stubs = stubs_for(running, suite.servers)
            say(f"services serving in {time.monotonic() - started:.1f} s")
            workload = Workload(shop, stubs, options, report, needles, scan_lock)
            workload.set_up()
            report.setup_seconds = time.monotonic() - started
            say(
                f"set up in {report.setup_seconds:.1f} s: {len(shop.items):,} items, "
                f"{options.persons} shoppers with consent; RSS (MiB) "
                + ", ".join(f"{k} {v / 1024:.0f}" for k, v in suite.rss_kb().items())
            )
            sampler = RssSampler(suite, report, options.sample_seconds, say, workload.halt.set)
            sampler.start()
            traffic_started = time.monotonic()
            workload.run(options.seconds, options.clients, options.rate)
            report.seconds = time.monotonic() - traffic_started
            sampler.stop()
            report.load_average = (report.load_average[0], load_average())
            report.lag_after_traffic = suite.consumer_lag()
            say(f"consent's log envelopes not yet applied: {report.lag_after_traffic}")
            report.shoppers = len(workload.everyone)
            report.erasures = len(workload.erasure_ids)
            report.stopped_purposes = len(workload.stops)
            consent_db = suite.settings["consent"].db_url("consent")
            checked = time.monotonic()
            deadline = checked + options.settle_seconds
            while not sampler.exited:
                problems = check_consistency(workload, consent_db, options.check_sample)
                if not problems or time.monotonic() >= deadline:
                    report.consistency += problems
                    break
                time.sleep(2)
            report.consistency_seconds = time.monotonic() - checked
            if not sampler.exited:
                report.lag_after_check = suite.consumer_lag()
            report.checked_persons = (
                len([s for s in workload.shoppers if not s.erased])
                if options.check_sample <= 0
                else options.check_sample
            )
            databases = suite.databases()
            logs = {name: server.log for name, server in suite.servers.items()}
            stopping = time.monotonic()
        # The services have stopped: every span has been exported, every log line written.
        collector.stop()
        say(f"services stopped in {time.monotonic() - stopping:.1f} s; scanning")
        scanning = time.monotonic()
        report.leaks.update({f"spans ({kind})": found for kind, found in span_hits.items()})
        erased_ids = Needles.of(shopper.person_id for _, shopper in workload.erasure_ids)
        for (database, table), found in rows_naming(databases, needles).items():
            report.leaks[f"table {database}.{table}"] = found
        for (database, table), found in rows_naming(databases, erased_ids).items():
            report.leaks[f"table {database}.{table} (erased person ids)"] = found
        lines = 0
        for name, log in logs.items():
            text = log.read_text(errors="replace")
            lines += text.count("\n")
            found = needles.found_in(text)
            if found:
                report.leaks[f"log of {name}"] = found
        say(f"scanned in {time.monotonic() - scanning:.1f} s")
        report.scanned = {
            "databases": len(databases),
            "log lines": lines,
            "spans": collector.spans,
            "metric exports": collector.metric_exports,
            "identifier forms": len(needles),
            "erased person ids": len(erased_ids),
        }
    return report


class RssSampler:
    """VmRSS of every service every ``every`` seconds while the traffic runs."""

    def __init__(
        self,
        suite: Deployment,
        report: Report,
        every: float,
        say: Callable[[str], None],
        on_exit: Callable[[], None],
    ) -> None:
        self.suite, self.report, self.every, self.say = suite, report, every, say
        self.on_exit = on_exit
        self.exited: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = 0.0

    def start(self) -> None:
        self._started = time.monotonic()
        self._sample()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def _sample(self) -> None:
        elapsed = time.monotonic() - self._started
        for name, server in self.suite.servers.items():
            code = server.process.poll()
            if code is not None and name not in self.exited:
                # A stopped service is a failed run, whoever stopped it: no figure after it means
                # anything, so the traffic stops and the run ends with the problem named.
                self.exited.add(name)
                self.report.consistency.append(f"{name} exited with {code} after {elapsed:.0f} s")
                self.say(f"  {name} exited with {code}: stopping the traffic")
                self.on_exit()
        rss = self.suite.rss_kb()
        self.report.rss_kb.append((elapsed, load_average(), rss))
        calls = sum(len(v) for v in self.report.calls.latencies.values())
        self.say(
            f"  {elapsed:6.0f} s  load {load_average():<15}  calls {calls:>8,}  RSS (MiB) "
            + "  ".join(f"{k} {v / 1024:6.1f}" for k, v in rss.items())
        )


# Printing -----------------------------------------------------------------------------------


def stamp(moment: datetime) -> Timestamp:
    value = Timestamp()
    value.FromDatetime(moment)
    return value


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return (
        f"{os.cpu_count()} cores ({model}); Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}"
    )


def print_report(report: Report, options: Options) -> None:
    print()
    print(
        f"traffic: {report.seconds:.0f} s on {report.backend}, {options.clients} clients, "
        f"{options.rate:g} operations/s offered; load average {report.load_average[0]} before, "
        f"{report.load_average[1]} after (other work on the machine skews the figures)"
    )
    operations = sum(n for k, n in report.operations.items() if k in WEIGHTS)
    print(
        f"  operations {operations:,} ({operations / max(report.seconds, 1e-9):.1f}/s): "
        + ", ".join(f"{k} {n:,}" for k, n in sorted(report.operations.items()))
    )
    print(
        f"  events sent {report.events_sent:,} "
        f"({report.events_sent / max(report.seconds, 1e-9):,.0f}/s), "
        f"accepted {report.events_accepted:,}; dropped by reason {dict(report.drops.most_common())}"
    )
    print(
        f"  shoppers {report.shoppers:,} ({report.erasures} erased and replaced), "
        f"{report.stopped_purposes} purposes stopped by a withdrawal or denial"
    )
    print(
        f"  {'RPC':<14} {'calls':>8} {'per s':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  errors"
    )
    for name in sorted(report.calls.codes):
        latencies = report.calls.latencies.get(name, [])
        errors = {k: v for k, v in report.calls.codes[name].items() if k != "OK"}
        print(
            f"  {name:<14} {len(latencies):>8,} {len(latencies) / max(report.seconds, 1e-9):>7.1f} "
            f"{percentile(latencies, 0.5):>8.1f} {percentile(latencies, 0.99):>8.1f} "
            f"{max(latencies, default=0):>8.1f}  {errors or 'none'}"
        )
    print("resident memory (VmRSS, MiB) over the traffic:")
    for elapsed, load, rss in report.rss_kb:
        print(
            f"  {elapsed:6.0f} s  load {load:<15} "
            + "  ".join(f"{k} {v / 1024:6.1f}" for k, v in rss.items())
        )
    if report.rss_kb:
        first, last = report.rss_kb[0][2], report.rss_kb[-1][2]
        print(
            "  start -> end: "
            + ", ".join(f"{k} {first[k] / 1024:.0f} -> {last[k] / 1024:.0f}" for k in first)
        )
    print(
        f"consistency ({report.checked_persons} shoppers checked, {report.erasures} erasures, "
        f"{report.consistency_seconds:.1f} s to hold): "
        + ("holds" if not report.consistency else f"{len(report.consistency)} problems")
    )
    print(
        f"  consent's log envelopes not yet applied: {report.lag_after_traffic} when the traffic "
        f"stopped, {report.lag_after_check} after the check"
    )
    for problem in report.consistency[:40]:
        print(f"  {problem}")
    print(
        "leak scan ("
        + ", ".join(f"{k} {v:,}" for k, v in report.scanned.items())
        + "): "
        + ("no raw identifier and no erased person id anywhere" if not report.leaks else "FOUND")
    )
    for place, found in sorted(report.leaks.items()):
        print(f"  {place}: {sorted(found)[:10]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long the traffic runs")
    parser.add_argument("--rate", type=float, default=40.0, help="operations per second offered")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=12, help="events per Collect")
    parser.add_argument("--persons", type=int, default=756, help="shoppers at any time")
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument("--check-sample", type=int, default=300, help="0: every shopper")
    parser.add_argument("--settle-seconds", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument(
        "--database-url", help="a PostgreSQL server (a database is made for the run)"
    )
    parser.add_argument("--data", type=Path, default=RETAIL_CSV)
    parser.add_argument(
        "--work-dir", type=Path, help="keep the data directories and logs here (default: removed)"
    )
    args = parser.parse_args()
    options = Options(
        seconds=args.seconds,
        rate=args.rate,
        clients=args.clients,
        batch=args.batch,
        persons=args.persons,
        sample_seconds=args.sample_seconds,
        check_sample=args.check_sample,
        settle_seconds=args.settle_seconds,
        seed=args.seed,
        database_url=args.database_url,
        data=args.data,
        work_dir=args.work_dir,
    )
    print(f"machine: {machine()}; load average {load_average()}")
    print(
        f"services: identity, consent, tagging, recommend, a process each, on "
        f"{'PostgreSQL' if options.database_url else 'SQLite'}; spans and metrics by OTLP to "
        "this process"
    )
    report = run_soak(options)
    print_report(report, options)
    print(
        "Data: D. Chen, S. L. Sain and K. Guo (2012), UCI Online Retail (first 20,000 rows), "
        "CC BY 4.0."
    )


if __name__ == "__main__":
    main()
