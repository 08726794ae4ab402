"""Recommend latency under an open-loop load, with 20,000 items and 1,000,000 interactions.

Target (recommend issue, DESIGN.md): Recommend with 20,000 items at 1,000 requests/s offered,
p50 <= 3 ms and p99 <= 10 ms, on the 2-core machine with client and server on it; training time
and resident memory printed.

The data is synthetic with planted structure: items belong to topics (a few hundred, each inside
one of 40 categories, with two words of its own in the titles and tags) and persons to taste
clusters (each liking three topics). A person's interactions come mostly from their cluster's
topics, the rest from overall popularity, popularity inside a topic is skewed, and event types
(view, dwell, search click, add to cart, purchase) and times (the last 90 days) are mixed as in a
shop. How much of the structure the service recovers is printed (the share of recommended items
from the person's own topics), so a fast but useless answer would show.

The recommend service runs in its own process (``steward serve --service recommend``) on a
temporary data directory: a SQLite file there, or a fresh PostgreSQL database that this script
creates and drops. Loading, by ``--load``:

- ``consumer`` (default): this script serves the event log itself (an ``EventLogService`` on a
  free port, named to the server by ``STEWARD_IDENTITY_TARGET``): consent's log holds a
  ``ConsentChanged`` granting ``personalisation`` to every person, then one
  ``BehaviourRecorded`` per interaction. The server's own consumers read it over gRPC and apply
  it exactly as in production; consent's Collect is not part of this figure (see
  ``bench/ingest.py``).
- ``direct``: the interactions and consents are bulk-inserted into the service's tables through
  its store (``services/recommend/store.py``) before the server starts. Quicker; the server then
  follows an empty log.

Either way the catalogue comes through ``PutItems`` and the models through ``Train`` (wait), whose
time is printed with each model's own training time and size and the offline metrics it reports.
Then Recommend is offered at ``--rate`` requests/s for ``--seconds``, open-loop: each call has a
scheduled send time and is started then on one of ``--senders`` connections, whatever the
answers so far, so queueing shows (``harness.open_loop``: one asyncio loop on grpc.aio). The
requests, built beforehand, are a shop's mix: 80% a consented person (k = 10, available items
only), 5% the same with diversity 0.5, 5% with a stated need, 5% an anonymous session of 1-5
items, 5% a person without consent (the non-personalised answer).

Printed: the answered rate, p50/p99 from the scheduled time (what a caller on a fixed schedule
sees) and from the actual send, the ratios to the targets, per-kind p50/p99, the server's CPU per
answered request (steadier than latency when other work shares the machine) and its resident
set (VmRSS; VmHWM is the peak) after loading, after training and at the end. After each rate the
same requests go at the same rate to the floor server (``bench/floor_server.py``: Steward's
server kit with its interceptors, answering every call with one stored Recommend answer), once
for each ``--floor-work`` value: the CPU time it spends per call before answering, a stand-in
for a handler's own work. So the run shows, on the machine it ran on, what gRPC and Python cost
before Recommend does anything, and how much work per call the target leaves room for. Figures only:
nothing about time is asserted. Run from the repository root::

    .venv/bin/python bench/recommend.py                       # SQLite, through the consumer
    .venv/bin/python bench/recommend.py --load direct --rate 500 1000 1500
    .venv/bin/python bench/recommend.py --backend postgres \\
        --postgres-url postgresql://postgres@127.0.0.1:5432/postgres

``STEWARD_BENCH_PY_SPY=out.svg`` (or ``.txt`` for raw folded stacks) records the server with
py-spy during each measured rate (``out-1000.svg``); ``STEWARD_BENCH_PY_SPY_ARGS`` adds options.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sqlite3
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import grpc
import numpy as np
import numpy.typing as npt
from harness import (
    OpenLoopResult,
    Server,
    analyze,
    floor_server,
    percentile,
    postgres_database,
    py_spy_from_env,
    server_version,
    steward_server,
)
from harness import open_loop as harness_open_loop
from steward.common.v1 import common_pb2
from steward.events.v1 import events_pb2, events_pb2_grpc
from steward.recommend.v1 import recommend_pb2, recommend_pb2_grpc

T = common_pb2
E = events_pb2
R = recommend_pb2

TARGET_RATE: Final = 1_000.0
TARGET_P50_MS: Final = 3.0
TARGET_P99_MS: Final = 10.0
SERVICE: Final = "steward.recommend.v1.RecommendService"
RECOMMEND_METHOD: Final = f"/{SERVICE}/Recommend"
CALL_DEADLINE_SECONDS: Final = 10.0
CATEGORIES: Final = [
    "kitchen",
    "garden",
    "books",
    "toys",
    "shoes",
    "jackets",
    "lamps",
    "rugs",
    "tools",
    "bikes",
    "tents",
    "watches",
    "bags",
    "hats",
    "mugs",
    "pans",
    "knives",
    "chairs",
    "desks",
    "beds",
    "games",
    "puzzles",
    "paints",
    "pens",
    "paper",
    "cameras",
    "phones",
    "cables",
    "speakers",
    "headphones",
    "socks",
    "gloves",
    "scarves",
    "soaps",
    "candles",
    "plants",
    "seeds",
    "pots",
    "frames",
    "clocks",
]
EVENT_TYPES: Final = (
    (T.EVENT_TYPE_VIEW, 0.55),
    (T.EVENT_TYPE_DWELL, 0.15),
    (T.EVENT_TYPE_SEARCH_CLICK, 0.10),
    (T.EVENT_TYPE_ADD_TO_CART, 0.12),
    (T.EVENT_TYPE_PURCHASE, 0.08),
)
EVENT_NAMES: Final = {
    T.EVENT_TYPE_VIEW: "view",
    T.EVENT_TYPE_DWELL: "dwell",
    T.EVENT_TYPE_SEARCH_CLICK: "search_click",
    T.EVENT_TYPE_ADD_TO_CART: "add_to_cart",
    T.EVENT_TYPE_PURCHASE: "purchase",
}
WEIGHTS: Final = {
    T.EVENT_TYPE_VIEW: 1.0,
    T.EVENT_TYPE_DWELL: 2.0,
    T.EVENT_TYPE_SEARCH_CLICK: 2.0,
    T.EVENT_TYPE_ADD_TO_CART: 4.0,
    T.EVENT_TYPE_PURCHASE: 8.0,
}
"""The service's default weights (services/recommend/interactions.py), for the direct load."""
DWELL_MS: Final = 45_000
TOPICS_PER_CLUSTER: Final = 3
IN_CLUSTER_SHARE: Final = 0.85


# The synthetic shop -------------------------------------------------------------------------


def words(rng: np.random.Generator, count: int) -> list[str]:
    """Distinct pronounceable nonsense words (so BM25 needs match only their own topic)."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    found: dict[str, None] = {}
    while len(found) < count:
        letters = [
            (consonants if position % 2 == 0 else vowels)[
                int(rng.integers(5 if position % 2 else 14))
            ]
            for position in range(6)
        ]
        found["".join(letters)] = None
    return list(found)


@dataclass(frozen=True)
class Shop:
    """Items, persons and interactions, with the structure planted in them."""

    item_ids: list[str]
    titles: list[str]
    categories: list[str]
    tags: list[list[str]]
    prices: npt.NDArray[np.float64]
    available: npt.NDArray[np.bool_]
    item_topic: npt.NDArray[np.int64]
    topic_words: list[tuple[str, str]]
    person_ids: list[str]
    person_topics: npt.NDArray[np.int64]  # persons x TOPICS_PER_CLUSTER
    outsiders: list[str]  # persons who never granted personalisation
    person: npt.NDArray[np.int64]  # per interaction
    item: npt.NDArray[np.int64]
    event_type: npt.NDArray[np.int64]
    occurred_at: npt.NDArray[np.float64]  # epoch seconds

    @property
    def interactions(self) -> int:
        return int(self.person.size)


def make_shop(
    n_items: int, n_interactions: int, n_persons: int, n_topics: int, n_clusters: int, seed: int
) -> Shop:
    rng = np.random.default_rng(seed)
    vocabulary = words(rng, 2 * n_topics + 50)
    topic_words = [(vocabulary[2 * t], vocabulary[2 * t + 1]) for t in range(n_topics)]
    general = vocabulary[2 * n_topics :]
    item_topic = rng.integers(n_topics, size=n_items).astype(np.int64)
    item_ids = [f"it-{index:05d}" for index in range(n_items)]
    categories = [CATEGORIES[int(topic) % len(CATEGORIES)] for topic in item_topic]
    titles, tags = [], []
    for index, topic in enumerate(item_topic.tolist()):
        first, second = topic_words[topic]
        extra = general[int(rng.integers(len(general)))]
        titles.append(f"{first.title()} {extra} {categories[index].rstrip('s')} {second}")
        tags.append([first, second, extra])
    prices = np.round(np.exp(rng.normal(3.0, 0.8, size=n_items)), 2)
    available = rng.random(n_items) < 0.97

    # Popularity inside a topic is skewed (Zipf-like by a random rank), and overall too.
    appeal = 1.0 / (1.0 + rng.permutation(n_items)) ** 0.6
    members = [np.flatnonzero(item_topic == topic) for topic in range(n_topics)]
    cumulative = [np.cumsum(appeal[m]) / appeal[m].sum() for m in members]
    overall = np.cumsum(appeal) / appeal.sum()

    clusters = rng.integers(n_clusters, size=n_persons)
    cluster_topics = np.array(
        [rng.choice(n_topics, TOPICS_PER_CLUSTER, replace=False) for _ in range(n_clusters)]
    )
    person_topics = cluster_topics[clusters]
    activity = rng.lognormal(0.0, 0.9, size=n_persons)
    counts = np.maximum(1, np.floor(activity / activity.sum() * n_interactions)).astype(np.int64)
    while counts.sum() > n_interactions:
        counts[np.argmax(counts)] -= counts.sum() - n_interactions
    counts[: n_interactions - int(counts.sum())] += 1
    person = np.repeat(np.arange(n_persons, dtype=np.int64), counts)
    item = np.empty(n_interactions, dtype=np.int64)
    in_cluster = rng.random(n_interactions) < IN_CLUSTER_SHARE
    topic = person_topics[person, rng.integers(TOPICS_PER_CLUSTER, size=n_interactions)]
    for t in range(n_topics):
        chosen = np.flatnonzero(in_cluster & (topic == t))
        if chosen.size and members[t].size:
            draws = np.searchsorted(cumulative[t], rng.random(chosen.size), side="right")
            item[chosen] = members[t][np.minimum(draws, members[t].size - 1)]
        elif chosen.size:
            in_cluster[chosen] = False
    outside = np.flatnonzero(~in_cluster)
    item[outside] = np.minimum(
        np.searchsorted(overall, rng.random(outside.size), side="right"), n_items - 1
    )
    types = np.array([kind for kind, _ in EVENT_TYPES], dtype=np.int64)
    shares = np.array([share for _, share in EVENT_TYPES])
    event_type = types[rng.choice(len(types), size=n_interactions, p=shares / shares.sum())]
    now = time.time()
    occurred_at = now - rng.random(n_interactions) * 90 * 86_400.0
    order = rng.permutation(n_interactions)  # the log interleaves persons
    order = order[np.argsort(occurred_at[order], kind="stable")]
    return Shop(
        item_ids=item_ids,
        titles=titles,
        categories=categories,
        tags=tags,
        prices=prices,
        available=available,
        item_topic=item_topic,
        topic_words=topic_words,
        person_ids=[f"p_{seed:08x}{index:024x}" for index in range(n_persons)],
        person_topics=person_topics,
        outsiders=[f"p_{seed:08x}ff{index:022x}" for index in range(max(100, n_persons // 20))],
        person=person[order],
        item=item[order],
        event_type=event_type[order],
        occurred_at=occurred_at[order],
    )


def put_items(target: str, shop: Shop) -> float:
    began = time.perf_counter()
    with grpc.insecure_channel(target) as channel:
        stub = recommend_pb2_grpc.RecommendServiceStub(channel)
        for start in range(0, len(shop.item_ids), 1000):
            stub.PutItems(
                R.PutItemsRequest(
                    items=[
                        R.Item(
                            item_id=shop.item_ids[index],
                            title=shop.titles[index],
                            category=shop.categories[index],
                            tags=shop.tags[index],
                            price=float(shop.prices[index]),
                            available=bool(shop.available[index]),
                        )
                        for index in range(start, min(start + 1000, len(shop.item_ids)))
                    ]
                ),
                timeout=60,
            )
    return time.perf_counter() - began


# The event log this script serves to the recommend server -----------------------------------


class EventLog(events_pb2_grpc.EventLogServiceServicer):
    """Consent's and identity's logs as the recommend server's consumers read them.

    Envelopes are made lazily from the shop's arrays, so a million need no memory up front.
    """

    def __init__(self, shop: Shop) -> None:
        self.shop = shop
        self.grants = len(shop.person_ids)
        self.size = {"consent": self.grants + shop.interactions, "identity": 0}
        self.acked: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.granted_at = datetime.now(UTC) - timedelta(days=100)

    def envelope(self, seq: int) -> events_pb2.Envelope:
        envelope = E.Envelope(id=f"consent-{seq}", seq=seq, producer="consent")
        envelope.occurred_at.FromDatetime(self.granted_at)
        if seq <= self.grants:
            changed = envelope.consent_changed
            changed.person_id = self.shop.person_ids[seq - 1]
            changed.purpose = "personalisation"
            changed.allowed = True
            changed.ledger_seq = seq
            return envelope
        n = seq - self.grants - 1
        shop = self.shop
        event = envelope.behaviour_recorded
        event.event_id = f"ev-{n}"
        event.person_id = shop.person_ids[int(shop.person[n])]
        event.type = int(shop.event_type[n])  # type: ignore[assignment]
        event.item_id = shop.item_ids[int(shop.item[n])]
        event.category = shop.categories[int(shop.item[n])]
        event.channel = "web"
        if event.type == T.EVENT_TYPE_DWELL:
            event.dwell_ms = DWELL_MS
        event.occurred_at.FromSeconds(int(shop.occurred_at[n]))
        event.purposes.append("personalisation")
        return envelope

    def Subscribe(
        self, request: events_pb2.SubscribeRequest, context: grpc.ServicerContext
    ) -> Iterator[events_pb2.SubscribeResponse]:
        size = self.size.get(request.producer, 0)
        for seq in range(max(1, request.from_seq), size + 1):
            if not context.is_active():
                return
            yield E.SubscribeResponse(envelope=self.envelope(seq))
        while not request.stop_at_end and context.is_active():
            time.sleep(0.2)  # the logs stay quiet while Recommend is measured

    def Ack(
        self, request: events_pb2.AckRequest, context: grpc.ServicerContext
    ) -> events_pb2.AckResponse:
        with self.lock:
            self.acked[request.producer] = max(self.acked[request.producer], request.seq)
            return E.AckResponse(acknowledged_seq=self.acked[request.producer])


@contextmanager
def event_log(shop: Shop) -> Iterator[tuple[EventLog, str]]:
    log = EventLog(shop)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    events_pb2_grpc.add_EventLogServiceServicer_to_server(log, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield log, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def wait_consumed(log: EventLog, server: Server, timeout: float) -> float:
    """Seconds until the server's consumer acknowledged the whole of consent's log."""
    began = time.perf_counter()
    total = log.size["consent"]
    last_report = began
    while log.acked["consent"] < total:
        if server.process.poll() is not None:
            raise SystemExit(f"the server exited:\n{server.log.read_text()[-5000:]}")
        if time.perf_counter() - began > timeout:
            raise SystemExit(f"consumer at {log.acked['consent']:,} of {total:,} after {timeout} s")
        if time.perf_counter() - last_report > 30:
            last_report = time.perf_counter()
            done = log.acked["consent"]
            rate = done / (last_report - began)
            print(f"  ... {done:,} of {total:,} envelopes applied ({rate:,.0f}/s)")
        time.sleep(0.5)
    return time.perf_counter() - began


def load_directly(database_url: str, shop: Shop) -> float:
    """Bulk-insert the interactions and the grants into the service's tables (its store)."""
    from sqlalchemy import insert

    from services.common.db import make_engine
    from services.common.migrations import upgrade
    from services.recommend.store import consents_table, interactions_table

    began = time.perf_counter()
    engine = make_engine(database_url)
    try:
        upgrade(engine, "recommend")
        with engine.begin() as connection:
            connection.execute(
                insert(consents_table),
                [
                    {"person_id": person, "allowed": True, "expires_at": None, "ledger_seq": n}
                    for n, person in enumerate(shop.person_ids, start=1)
                ],
            )
        chunk = 50_000
        for start in range(0, shop.interactions, chunk):
            rows = []
            for n in range(start, min(start + chunk, shop.interactions)):
                kind = int(shop.event_type[n])
                person = shop.person_ids[int(shop.person[n])]
                rows.append(
                    {
                        "event_id": f"ev-{n}",
                        "person_id": person,
                        "origin_person_id": person,
                        "item_id": shop.item_ids[int(shop.item[n])],
                        "event_type": EVENT_NAMES[kind],
                        "weight": WEIGHTS[kind],
                        "dwell_ms": DWELL_MS if kind == T.EVENT_TYPE_DWELL else 0,
                        "occurred_at": datetime.fromtimestamp(int(shop.occurred_at[n]), tz=UTC),
                    }
                )
            with engine.begin() as connection:
                connection.execute(insert(interactions_table), rows)
    finally:
        engine.dispose()
    return time.perf_counter() - began


# The server process -------------------------------------------------------------------------


@contextmanager
def recommend_server(data_dir: Path, database_url: str, log_target: str) -> Iterator[Server]:
    """``steward serve --service recommend`` on a free port, reading both logs at ``log_target``."""
    env = {
        "STEWARD_RECOMMEND_DB_URL": database_url,
        "STEWARD_IDENTITY_TARGET": log_target,
        "STEWARD_CONSENT_TARGET": log_target,
    }
    with steward_server(["recommend"], data_dir, env, health_service=SERVICE) as server:
        yield server


# Training and quality -----------------------------------------------------------------------


def train(target: str) -> tuple[float, recommend_pb2.TrainResponse]:
    with grpc.insecure_channel(target) as channel:
        stub = recommend_pb2_grpc.RecommendServiceStub(channel)
        began = time.perf_counter()
        answer = stub.Train(R.TrainRequest(wait=True), timeout=3_600)
        return time.perf_counter() - began, answer


def print_models(answer: recommend_pb2.TrainResponse) -> None:
    for model in answer.models:
        state = R.ModelState.Name(model.state).removeprefix("MODEL_STATE_").lower()
        metrics = ", ".join(
            f"{name} {value:.3f}"
            for name, value in sorted(model.metrics.items())
            if not name.endswith("_seconds") and name != "neighbour_pairs"
        )
        seconds = model.training_time.ToTimedelta().total_seconds()
        print(
            f"  {model.name:<9} {state:<9} {seconds:6.1f} s"
            f"  {model.size_bytes / 2**20:7.1f} MiB  {model.persons:,} persons, "
            f"{model.interactions:,} interactions" + (f"\n            {metrics}" if metrics else "")
        )


def planted_precision(target: str, shop: Shop, persons: int, seed: int) -> tuple[float, float]:
    """Share of the top 10 from the person's own topics, for Recommend and for chance."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(shop.person_ids), size=persons, replace=False)
    index = {item_id: n for n, item_id in enumerate(shop.item_ids)}
    hits = total = 0
    with grpc.insecure_channel(target) as channel:
        stub = recommend_pb2_grpc.RecommendServiceStub(channel)
        for person in chosen.tolist():
            answer = stub.Recommend(
                R.RecommendRequest(person_id=shop.person_ids[person], k=10), timeout=30
            )
            topics = set(shop.person_topics[person].tolist())
            for item in answer.items:
                total += 1
                hits += int(shop.item_topic[index[item.item_id]]) in topics
    own = np.mean([np.isin(shop.item_topic, shop.person_topics[p]).mean() for p in chosen])
    return hits / total if total else 0.0, float(own)


# Open-loop Recommend ------------------------------------------------------------------------

KINDS: Final = (
    ("personal", 0.80),
    ("diverse", 0.05),
    ("need", 0.05),
    ("session", 0.05),
    ("no consent", 0.05),
)


def requests_for(shop: Shop, count: int, seed: int) -> tuple[list[bytes], list[str]]:
    rng = np.random.default_rng(seed)
    kinds = [kind for kind, _ in KINDS]
    shares = np.array([share for _, share in KINDS])
    drawn = rng.choice(len(kinds), size=count, p=shares / shares.sum())
    active = np.unique(shop.person)
    requests: list[bytes] = []
    labels: list[str] = []
    for which in drawn.tolist():
        kind = kinds[which]
        person = int(rng.choice(active))
        request = R.RecommendRequest(k=10)
        if kind == "no consent":
            request.person_id = shop.outsiders[int(rng.integers(len(shop.outsiders)))]
        elif kind == "session":
            topic = int(rng.integers(len(shop.topic_words)))
            members = np.flatnonzero(shop.item_topic == topic)
            picked = rng.choice(members, size=min(members.size, int(rng.integers(1, 6))))
            request.session_item_ids.extend(shop.item_ids[int(i)] for i in picked)
        else:
            request.person_id = shop.person_ids[person]
            request.filters.available_only = True
            if kind == "diverse":
                request.diversity = 0.5
            elif kind == "need":
                topic = int(rng.choice(shop.person_topics[person]))
                first, second = shop.topic_words[topic]
                request.need = f"a {first} {second} please"
        requests.append(request.SerializeToString())
        labels.append(kind)
    return requests, labels


def open_loop(
    target: str,
    requests: Sequence[bytes],
    labels: Sequence[str],
    rate: float,
    seconds: float,
    senders: int,
) -> tuple[OpenLoopResult, list[str]]:
    """Recommend at ``rate`` calls/s on a fixed schedule (see ``harness.open_loop``); with the
    kind of each call."""
    result = harness_open_loop(
        target, RECOMMEND_METHOD, requests, rate, seconds, senders, deadline=CALL_DEADLINE_SECONDS
    )
    kinds = [labels[index % len(labels)] for index in range(len(result.responses))]
    return result, kinds


def personalised(result: OpenLoopResult) -> int:
    parse = R.RecommendResponse.FromString
    return sum(parse(r).personalised for r in result.responses if r is not None)


def warm_up(target: str, requests: Sequence[bytes], count: int) -> None:
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(RECOMMEND_METHOD)
        for index in range(count):
            call(requests[index % len(requests)], timeout=CALL_DEADLINE_SECONDS)


# Figures ------------------------------------------------------------------------------------


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
        f"grpcio {grpc.__version__}; load average {load_average()} "
        "(other work on the machine skews the figures)"
    )


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def settle(server: Server, timeout: float = 60.0) -> None:
    """Wait until the server is nearly idle (a background job or a backlog finished)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = server.cpu_seconds()
        time.sleep(0.5)
        if server.cpu_seconds() - before < 0.05:
            return


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(
    server: Server,
    requests: Sequence[bytes],
    labels: Sequence[str],
    rate: float,
    seconds: float,
    senders: int,
) -> tuple[OpenLoopResult, list[str], float, float, float]:
    """One open-loop part once the server is idle: the result, each call's kind, the server's
    and this process's CPU seconds and the wall time."""
    settle(server)
    server_cpu, own_cpu, wall = server.cpu_seconds(), client_cpu(), time.perf_counter()
    result, kinds = open_loop(server.target, requests, labels, rate, seconds, senders)
    return (
        result,
        kinds,
        server.cpu_seconds() - server_cpu,
        client_cpu() - own_cpu,
        time.perf_counter() - wall,
    )


def print_open_loop(
    result: OpenLoopResult,
    kinds: Sequence[str],
    server_cpu: float,
    own_cpu: float,
    wall: float,
    title: str = "",
) -> None:
    scheduled, sent = result.from_scheduled_ms(), result.from_sent_ms()
    lag = result.send_lag_ms()
    p50, p99 = percentile(scheduled, 0.5), percentile(scheduled, 0.99)
    answered = len(scheduled)
    print(f"Recommend{' ' + title if title else ''} at {result.offered_rate:,.0f}/s offered")
    print(
        f"  offered {result.offered_rate:,.0f}/s for {len(result.scheduled):,} calls; answered "
        f"{answered:,} at {result.achieved_rate():,.0f}/s "
        f"({result.achieved_rate() / TARGET_RATE:.2f} x target {TARGET_RATE:,.0f}/s); "
        f"{personalised(result):,} personalised"
        + (f"; errors {dict(result.errors)}" if result.errors else "")
    )
    print(
        f"  from scheduled:   p50 {p50:.2f} ms ({p50 / TARGET_P50_MS:.2f} x target "
        f"{TARGET_P50_MS:.0f} ms), p99 {p99:.2f} ms ({p99 / TARGET_P99_MS:.2f} x target "
        f"{TARGET_P99_MS:.0f} ms), p99.9 {percentile(scheduled, 0.999):.2f} ms, "
        f"max {max(scheduled, default=float('nan')):.1f} ms"
    )
    print(
        f"  from actual send: p50 {percentile(sent, 0.5):.2f} ms, "
        f"p99 {percentile(sent, 0.99):.2f} ms; send lag p50 {percentile(lag, 0.5):.2f} ms, "
        f"p99 {percentile(lag, 0.99):.2f} ms"
    )
    for kind, _ in KINDS:
        values = result.from_scheduled_ms(i for i, k in enumerate(kinds) if k == kind)
        print(
            f"    {kind:<11} {len(values):>6,} calls  p50 {percentile(values, 0.5):6.2f} ms  "
            f"p99 {percentile(values, 0.99):6.2f} ms"
        )
    print(
        f"  CPU: server {server_cpu / wall * 100:.0f}%, client {own_cpu / wall * 100:.0f}% of one "
        f"core; server CPU {server_cpu / max(answered, 1) * 1e6:,.0f} us per answered request"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--backend", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "STEWARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
        help="an account that may create databases; the run's database is created and dropped",
    )
    parser.add_argument("--load", choices=("consumer", "direct"), default="consumer")
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--persons", type=int, default=50_000)
    parser.add_argument("--topics", type=int, default=400)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rate", type=float, nargs="+", default=[TARGET_RATE])
    parser.add_argument("--seconds", type=float, default=20.0, help="per measured rate")
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--quality-persons", type=int, default=300)
    parser.add_argument(
        "--floor-work",
        type=float,
        nargs="*",
        default=[0.0, 200.0, 400.0],
        metavar="US",
        help="after each rate, the same load on the floor server spending this much CPU per "
        "call, one part each; none skips it",
    )
    args = parser.parse_args()

    print(f"machine: {machine()}")
    began = time.perf_counter()
    shop = make_shop(
        args.items, args.interactions, args.persons, args.topics, args.clusters, args.seed
    )
    print(
        f"shop: {len(shop.item_ids):,} items in {len(set(shop.categories))} categories and "
        f"{args.topics} topics; {len(shop.person_ids):,} persons in {args.clusters} taste "
        f"clusters of {TOPICS_PER_CLUSTER} topics ({IN_CLUSTER_SHARE:.0%} of their interactions), "
        f"{shop.interactions:,} interactions over 90 days (made in "
        f"{time.perf_counter() - began:.1f} s)"
    )
    with ExitStack() as stack:
        data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="steward-bench-")))
        if args.backend == "sqlite":
            database_url = f"sqlite:///{data_dir}/recommend.db"
            backend = f"SQLite {sqlite3.sqlite_version} (WAL) in {data_dir}"
        else:
            database_url = stack.enter_context(
                postgres_database(args.postgres_url, "steward_bench_recommend")
            )
            version = server_version(database_url)
            backend = f"PostgreSQL {version}, fresh database for the run"
        log, log_target = stack.enter_context(event_log(shop))
        if args.load == "direct":
            log.size["consent"] = 0
            seconds = load_directly(database_url, shop)
            print(
                f"load: DIRECT bulk insert of {shop.interactions:,} interactions and "
                f"{len(shop.person_ids):,} grants into the service's tables through its store "
                f"(not through the consumer) in {seconds:.1f} s"
            )
        server = stack.enter_context(recommend_server(data_dir, database_url, log_target))
        print(f"server: recommend alone (pid {server.process.pid}), {backend}")
        print(f"  RSS at start {server.status('VmRSS') / 1024:,.0f} MiB")
        seconds = put_items(server.target, shop)
        print(f"catalogue: PutItems of {len(shop.item_ids):,} items in {seconds:.1f} s")
        if args.load == "consumer":
            cpu = server.cpu_seconds()
            seconds = wait_consumed(log, server, timeout=3_600)
            total = log.size["consent"]
            print(
                f"load: through the server's consumer of consent's log (served by this script): "
                f"{total:,} envelopes ({len(shop.person_ids):,} grants, {shop.interactions:,} "
                f"interactions) in {seconds:.1f} s, {total / seconds:,.0f} envelopes/s; server "
                f"CPU {(server.cpu_seconds() - cpu) / total * 1e6:,.0f} us per envelope"
            )
        if args.backend == "postgres":
            analyze(database_url)
        print(f"  RSS after loading {server.status('VmRSS') / 1024:,.0f} MiB")

        cpu = server.cpu_seconds()
        seconds, trained = train(server.target)
        print(
            f"training: Train(wait) answered in {seconds:.1f} s (server CPU "
            f"{server.cpu_seconds() - cpu:.1f} s), RSS {server.status('VmRSS') / 1024:,.0f} MiB, "
            f"peak so far {server.status('VmHWM') / 1024:,.0f} MiB"
        )
        print_models(trained)

        requests, labels = requests_for(shop, 20_000, args.seed)
        warm_up(server.target, requests, 500)
        share, chance = planted_precision(server.target, shop, args.quality_persons, args.seed)
        print(
            f"quality: {share:.1%} of the top 10 come from the person's own topics "
            f"(those topics hold {chance:.1%} of the catalogue), {args.quality_persons} persons"
        )

        for rate in args.rate:
            with py_spy_from_env(server.process.pid, f"{rate:.0f}"):
                measured = measure(server, requests, labels, rate, args.seconds, args.senders)
            print_open_loop(*measured)
            answer = next((r for r in measured[0].responses if r is not None), None)
            for work_us in args.floor_work if answer is not None else ():
                with floor_server(data_dir, RECOMMEND_METHOD, answer, work_us) as floor:
                    measured = measure(floor, requests, labels, rate, args.seconds, args.senders)
                work = f"{work_us:,.0f} us of CPU per call" if work_us else "no work"
                print_open_loop(*measured, title=f"on the floor server (stored answer, {work})")
        print(
            f"server RSS: {server.status('VmRSS') / 1024:,.0f} MiB at end, peak "
            f"{server.status('VmHWM') / 1024:,.0f} MiB; load average {load_average()}"
        )


if __name__ == "__main__":
    main()
