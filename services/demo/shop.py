"""The demo shop: the UCI Online Retail invoices as a shop's customers, catalogue and timeline.

Everything here is plain data, made from the CSV and a seed, with no gRPC: who the shoppers are
(identifiers split across the departments that see them), what each answered on the consent
banner, which channel each order went through, and the browsing before it. The same seed and
customer count give the same shop; only the moment the timeline ends (just before ``now``) and
the run tag in identifiers and event ids change between runs, so a second run against the same
suite is a second population rather than a replay of duplicates.
"""

from __future__ import annotations

import csv
import math
import random
import re
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp
from steward.common.v1 import common_pb2

DATA_FILE: Final = "online_retail_20k.csv"
CITATION: Final = (
    "Shop data: UCI Online Retail (first 20,000 rows), Chen, Sain and Guo (2012), Journal of "
    "Database Marketing and Customer Strategy Management 19(3):197-208; CC BY 4.0."
)
CURRENCY: Final = "GBP"
DEVICE_NAMESPACE: Final = uuid.UUID("5d3c8f0e-2b7a-4c1e-9a51-7e0d6c4b2f18")
"""Device ids are UUIDs made from the run tag and the seed's draws, so runs never share one."""
PURPOSES: Final = ("analytics", "personalisation", "profiling", "marketing")

# What shoppers answer on a banner with "Accept all", "Reject all" and "Settings" on its first
# layer. Field studies find that about half of visitors refuse when rejecting is as easy as
# accepting (Utz et al., "(Un)informed Consent", ACM CCS 2019: ~50% declined given a binary
# choice) and that few open the settings (Nouwens et al., "Dark Patterns after the GDPR", CHI
# 2020). So: 40% accept all, 45% reject all, 15% choose per purpose, which gives roughly 50%
# for analytics and 45% for marketing, inside the 40-60% band those studies report.
ACCEPT_ALL: Final = 0.40
REJECT_ALL: Final = 0.45
CUSTOM_GRANTS: Final = {
    "analytics": 0.70,
    "personalisation": 0.50,
    "profiling": 0.25,
    "marketing": 0.20,
}

# Which departments a shopper is known to besides the web shop (the UCI shop sold online; the
# app and the store are the demo's invention, as are the shares).
APP_SHARE: Final = 0.40
STORE_SHARE: Final = 0.30
CHANNEL_WEIGHTS: Final = {"web": 0.60, "app": 0.25, "store": 0.15}

BROWSED_LINES_PER_ORDER: Final = 12
"""Wholesale orders run to a hundred lines; a session views at most this many of them."""
SEARCH_SHARE: Final = 0.35
DWELL_SHARE: Final = 0.50
EXTRA_VIEWS: Final = (1, 3)
ABANDONED_CART_SHARE: Final = 0.25
BROWSE_ONLY_SESSIONS: Final = (0, 3)

# Departments of the catalogue, from the words of an item's description; the first department
# with a matching word wins (a CHRISTMAS T-LIGHT HOLDER is Christmas, a T-LIGHT HOLDER lighting).
DEPARTMENTS: Final = (
    ("christmas", "christmas xmas advent santa reindeer snowflake bauble nativity"),
    ("lighting", "candle candles light lights lantern lanterns incense nightlight"),
    (
        "kitchen",
        "mug mugs cup cups teacup tea teapot coffee cake cakes baking bowl bowls plate plates "
        "dish cutlery lunch jar jam breakfast napkin napkins apron kitchen tray spoon spoons "
        "milk diner dinner egg food saucer jug pantry recipe",
    ),
    (
        "garden",
        "garden bird birdhouse flower flowers plant planter pot watering parasol umbrella "
        "doormat zinc gnome",
    ),
    (
        "party",
        "party birthday wrap gift card cards bunting balloon balloons ribbon ribbons tissue "
        "tissues garland confetti",
    ),
    (
        "stationery",
        "notebook pen pens pencil pencils sticker stickers paper tape eraser journal drawing chalk",
    ),
    (
        "toys",
        "toy toys doll dolly jigsaw game games spaceboy childrens childs kit babushka "
        "dinosaur circus puzzle teddy magic ball skipping",
    ),
    (
        "jewellery",
        "bracelet necklace earrings charm bead beads diamante hairclip brooch",
    ),
    (
        "storage",
        "bag bags box boxes tin tins basket storage case cases purse drawer cabinet luggage",
    ),
)
DEFAULT_DEPARTMENT: Final = "home_decor"
_WORDS: Final = re.compile(r"[a-z]+")
_DEPARTMENT_WORDS: Final = tuple((name, frozenset(words.split())) for name, words in DEPARTMENTS)
_STOP_WORDS: Final = frozenset(["set", "of", "in", "with", "and", "the", "for", "pack", "assorted"])


class ShopDataError(ValueError):
    """The CSV is missing or is not the Online Retail columns."""


@dataclass(frozen=True, slots=True)
class Item:
    """A product of the catalogue."""

    item_id: str
    title: str
    department: str
    words: tuple[str, ...]
    price: float


@dataclass(frozen=True, slots=True)
class Line:
    """One line of an invoice."""

    item_id: str
    quantity: int
    unit_price: float


@dataclass(frozen=True, slots=True)
class Invoice:
    """One order of a customer, as the CSV has it (times still in December 2010)."""

    invoice_no: str
    customer_id: str
    at: datetime
    lines: tuple[Line, ...]


@dataclass(frozen=True, slots=True)
class RetailData:
    """The parsed CSV: the catalogue, the orders, and what was skipped."""

    items: dict[str, Item]
    invoices: list[Invoice]
    countries: dict[str, str]
    cancellation_lines: int


@dataclass(slots=True)
class Shopper:
    """One UCI customer, as the shop's departments know them.

    The web shop sees an e-mail address and a cookie; the app a device id; the store a loyalty
    card; the CRM its customer number. Values are synthetic and every one depends on the run
    tag, so two runs against one suite never share an identifier.
    """

    index: int
    customer_id: str
    country: str
    email: str
    cookie: str
    crm_id: str
    device_id: str = ""
    loyalty_card: str = ""
    banner: str = ""
    """``accept_all``, ``reject_all`` or ``custom``."""
    grants: dict[str, bool] = field(default_factory=dict)
    first_seen: datetime | None = None
    first_channel: str = "web"

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(
            channel
            for channel, present in (
                ("web", True),
                ("app", bool(self.device_id)),
                ("store", bool(self.loyalty_card)),
            )
            if present
        )

    def identifier(self, kind: str) -> common_pb2.Identifier:
        """The shopper's ``email``, ``cookie``, ``device``, ``card`` or ``crm`` identifier."""
        identifier_type, value = {
            "email": (common_pb2.IDENTIFIER_TYPE_EMAIL, self.email),
            "cookie": (common_pb2.IDENTIFIER_TYPE_COOKIE_ID, self.cookie),
            "device": (common_pb2.IDENTIFIER_TYPE_DEVICE_ID, self.device_id),
            "card": (common_pb2.IDENTIFIER_TYPE_LOYALTY_CARD, self.loyalty_card),
            "crm": (common_pb2.IDENTIFIER_TYPE_CRM_ID, self.crm_id),
        }[kind]
        return common_pb2.Identifier(type=identifier_type, value=value)

    def identifiers_on(self, channel: str) -> list[common_pb2.Identifier]:
        """What an event from ``channel`` carries: the cookie, the device id or the card."""
        return [self.identifier({"app": "device", "store": "card"}.get(channel, "cookie"))]


@dataclass(frozen=True, slots=True)
class PlannedEvent:
    """A behaviour event of the timeline and the shopper it belongs to."""

    shopper: int
    message: common_pb2.BehaviourEvent


@dataclass(slots=True)
class Shop:
    """The shop a demo run plays: catalogue, shoppers and their events in time order."""

    items: dict[str, Item]
    shoppers: list[Shopper]
    events: list[PlannedEvent]
    run_tag: str
    starts_at: datetime
    ends_at: datetime
    purchases: int = 0
    cancellation_lines: int = 0


def department_of(words: Sequence[str]) -> str:
    """The catalogue department a description's words put an item in."""
    present = set(words)
    for name, keywords in _DEPARTMENT_WORDS:
        if present & keywords:
            return name
    return DEFAULT_DEPARTMENT


def default_data_path() -> Path:
    """The CSV shipped in the package (services/demo/data)."""
    return Path(str(resources.files("services.demo").joinpath("data", DATA_FILE)))


def load_retail(path: Path | None = None) -> RetailData:
    """Parse the Online Retail CSV: items (first description and price seen), orders by invoice.

    Cancellation invoices (``C...``) and lines with a non-positive quantity are counted and
    skipped: the demo replays purchases, not returns.
    """
    source = path or default_data_path()
    items: dict[str, Item] = {}
    lines: dict[str, list[Line]] = defaultdict(list)
    heads: dict[str, tuple[str, datetime]] = {}
    countries: dict[str, str] = {}
    cancellations = 0
    required = {"InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice"}
    try:
        with source.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if not required | {"CustomerID", "Country"} <= set(reader.fieldnames or ()):
                raise ShopDataError(f"{source}: not the Online Retail columns")
            for row in reader:
                invoice = row["InvoiceNo"].strip()
                customer = row["CustomerID"].strip().removesuffix(".0")
                quantity = int(float(row["Quantity"]))
                if invoice.startswith("C") or quantity <= 0:
                    cancellations += 1
                    continue
                if not customer:
                    continue
                code = row["StockCode"].strip()
                price = float(row["UnitPrice"] or 0.0)
                if code not in items:
                    title = " ".join(row["Description"].replace("_", " ").split())
                    words = tuple(_WORDS.findall(title.casefold()))
                    items[code] = Item(code, title, department_of(words), words, price)
                moment = datetime.strptime(row["InvoiceDate"].strip(), "%Y-%m-%d %H:%M:%S")
                heads.setdefault(invoice, (customer, moment.replace(tzinfo=UTC)))
                lines[invoice].append(Line(code, quantity, price))
                countries.setdefault(customer, row["Country"].replace("_", " ").strip())
    except (OSError, ValueError, KeyError) as error:
        if isinstance(error, ShopDataError):
            raise
        raise ShopDataError(f"cannot read {source} as Online Retail: {error}") from error
    invoices = [
        Invoice(number, customer, at, tuple(lines[number]))
        for number, (customer, at) in heads.items()
    ]
    invoices.sort(key=lambda invoice: (invoice.at, invoice.invoice_no))
    return RetailData(items, invoices, countries, cancellations)


def plan_shop(data: RetailData, *, customers: int, seed: int, now: datetime, run_tag: str) -> Shop:
    """The shop of ``customers`` customers drawn with ``seed``, its timeline ending before now.

    The invoices move forward by whole weeks (weekdays and weekends stay as they were) so that
    the last one falls in the week before ``now``; every order is preceded by a browsing
    session on its channel (none for store purchases), and shoppers also browse on days they
    buy nothing.
    """
    rng = random.Random(seed)
    everyone = sorted({invoice.customer_id for invoice in data.invoices}, key=int)
    chosen = sorted(rng.sample(everyone, min(customers, len(everyone))), key=int)
    shoppers = [
        _shopper(index, customer, data, rng, run_tag) for index, customer in enumerate(chosen)
    ]
    by_customer = {shopper.customer_id: shopper for shopper in shoppers}
    invoices = [invoice for invoice in data.invoices if invoice.customer_id in by_customer]
    if not invoices:
        raise ShopDataError("no invoices for the chosen customers")
    latest = invoices[-1].at
    weeks = math.floor((now - timedelta(hours=1) - latest) / timedelta(weeks=1))
    shift = timedelta(weeks=weeks)
    starts_at = invoices[0].at + shift - timedelta(days=1)
    ends_at = latest + shift
    by_department = _items_by_department(data.items)
    planner = _Planner(rng, data.items, by_department, run_tag)
    for invoice in invoices:
        shopper = by_customer[invoice.customer_id]
        planner.order(shopper, invoice, invoice.at + shift)
    for shopper in shoppers:
        for _ in range(rng.randint(*BROWSE_ONLY_SESSIONS)):
            moment = starts_at + (ends_at - starts_at) * rng.random()
            planner.browse(shopper, moment, _channel(rng, shopper, browsing=True))
    planner.events.sort(key=lambda planned: _seconds(planned.message.occurred_at))
    for planned in planner.events:
        shopper = shoppers[planned.shopper]
        if shopper.first_seen is None:
            shopper.first_seen = planned.message.occurred_at.ToDatetime(tzinfo=UTC)
            shopper.first_channel = planned.message.channel
    return Shop(
        items=data.items,
        shoppers=shoppers,
        events=planner.events,
        run_tag=run_tag,
        starts_at=starts_at,
        ends_at=ends_at,
        purchases=planner.purchases,
        cancellation_lines=data.cancellation_lines,
    )


def _shopper(index: int, customer: str, data: RetailData, rng: random.Random, tag: str) -> Shopper:
    shopper = Shopper(
        index=index,
        customer_id=customer,
        country=data.countries.get(customer, ""),
        email=f"shopper{customer}.{tag}@example.org",
        cookie=f"ck.{tag}.{rng.getrandbits(64):016x}",
        crm_id=f"CRM-{tag}-{customer}",
    )
    if rng.random() < APP_SHARE:
        shopper.device_id = str(uuid.uuid5(DEVICE_NAMESPACE, f"{tag}:{rng.getrandbits(64)}"))
    if rng.random() < STORE_SHARE:
        shopper.loyalty_card = f"LC{tag}{rng.randrange(10**9):09d}"
    draw = rng.random()
    if draw < ACCEPT_ALL:
        shopper.banner, shopper.grants = "accept_all", dict.fromkeys(PURPOSES, True)
    elif draw < ACCEPT_ALL + REJECT_ALL:
        shopper.banner, shopper.grants = "reject_all", dict.fromkeys(PURPOSES, False)
    else:
        shopper.banner = "custom"
        shopper.grants = {purpose: rng.random() < CUSTOM_GRANTS[purpose] for purpose in PURPOSES}
    return shopper


def _items_by_department(items: Mapping[str, Item]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = defaultdict(list)
    for item in items.values():
        grouped[item.department].append(item.item_id)
    return {name: sorted(codes) for name, codes in grouped.items()}


def _channel(rng: random.Random, shopper: Shopper, *, browsing: bool = False) -> str:
    channels = [c for c in shopper.channels if not (browsing and c == "store")]
    weights = [CHANNEL_WEIGHTS[c] for c in channels]
    return rng.choices(channels, weights)[0]


def _seconds(stamp: Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def _stamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


class _Planner:
    """Writes the events of orders and browsing sessions, numbering them per run."""

    def __init__(
        self,
        rng: random.Random,
        items: Mapping[str, Item],
        by_department: Mapping[str, Sequence[str]],
        tag: str,
    ) -> None:
        self.rng = rng
        self.items = items
        self.by_department = by_department
        self.tag = tag
        self.events: list[PlannedEvent] = []
        self.purchases = 0
        self._sessions = 0

    def order(self, shopper: Shopper, invoice: Invoice, at: datetime) -> None:
        channel = _channel(self.rng, shopper)
        session = self._session()
        if channel != "store":
            browsed = invoice.lines[:BROWSED_LINES_PER_ORDER]
            start = at - timedelta(minutes=self.rng.uniform(8, 40))
            steps = self._browsing(browsed, [line.item_id for line in browsed])
            self._spread(shopper, channel, session, steps, start, at)
        for number, line in enumerate(invoice.lines):
            item = self.items[line.item_id]
            self._add(
                shopper,
                channel,
                f"{session}-p{number}",
                common_pb2.EVENT_TYPE_PURCHASE,
                item,
                at,
                value=round(line.quantity * line.unit_price, 2),
                quantity=line.quantity,
                attributes={"invoice": invoice.invoice_no},
            )
            self.purchases += 1

    def browse(self, shopper: Shopper, at: datetime, channel: str) -> None:
        """A visit without an order: some views, perhaps a cart left behind."""
        department = self.rng.choice(sorted(self.by_department))
        codes = self.by_department[department]
        looked = self.rng.sample(codes, min(len(codes), self.rng.randint(2, 6)))
        steps: list[tuple[common_pb2.EventType.ValueType, str, int]] = []
        for code in looked:
            steps.append((common_pb2.EVENT_TYPE_VIEW, code, 0))
            if self.rng.random() < DWELL_SHARE:
                steps.append((common_pb2.EVENT_TYPE_DWELL, code, self._dwell()))
        if self.rng.random() < ABANDONED_CART_SHARE * 2:
            steps.append((common_pb2.EVENT_TYPE_ADD_TO_CART, looked[0], 1))
        self._spread(shopper, channel, self._session(), steps, at, at + timedelta(minutes=15))

    def _browsing(
        self, lines: Sequence[Line], bought: Sequence[str]
    ) -> list[tuple[common_pb2.EventType.ValueType, str, int]]:
        """View, maybe dwell, add to cart for each line; searches, other views, a left cart."""
        steps: list[tuple[common_pb2.EventType.ValueType, str, int]] = []
        if self.rng.random() < SEARCH_SHARE:
            steps.append((common_pb2.EVENT_TYPE_SEARCH, bought[0], 0))
            steps.append((common_pb2.EVENT_TYPE_SEARCH_CLICK, bought[0], 0))
        department = self.items[bought[0]].department
        others = [code for code in self.by_department[department] if code not in bought]
        extra = self.rng.sample(others, min(len(others), self.rng.randint(*EXTRA_VIEWS)))
        for code in extra:
            steps.append((common_pb2.EVENT_TYPE_VIEW, code, 0))
        for line in lines:
            steps.append((common_pb2.EVENT_TYPE_VIEW, line.item_id, 0))
            if self.rng.random() < DWELL_SHARE:
                steps.append((common_pb2.EVENT_TYPE_DWELL, line.item_id, self._dwell()))
            steps.append((common_pb2.EVENT_TYPE_ADD_TO_CART, line.item_id, line.quantity))
        if extra and self.rng.random() < ABANDONED_CART_SHARE:
            steps.append((common_pb2.EVENT_TYPE_ADD_TO_CART, extra[0], 1))
            steps.append((common_pb2.EVENT_TYPE_REMOVE_FROM_CART, extra[0], 1))
        return steps

    def _spread(
        self,
        shopper: Shopper,
        channel: str,
        session: str,
        steps: Sequence[tuple[common_pb2.EventType.ValueType, str, int]],
        start: datetime,
        end: datetime,
    ) -> None:
        gap = (end - start) / (len(steps) + 1)
        for number, (kind, code, amount) in enumerate(steps):
            item = self.items[code]
            self._add(
                shopper,
                channel,
                f"{session}-b{number}",
                kind,
                item,
                start + gap * (number + 1),
                quantity=amount if kind != common_pb2.EVENT_TYPE_DWELL else 0,
                dwell_ms=amount if kind == common_pb2.EVENT_TYPE_DWELL else 0,
                query=_query(item) if kind == common_pb2.EVENT_TYPE_SEARCH else "",
            )

    def _add(
        self,
        shopper: Shopper,
        channel: str,
        event_id: str,
        kind: common_pb2.EventType.ValueType,
        item: Item,
        at: datetime,
        *,
        value: float = 0.0,
        quantity: int = 0,
        dwell_ms: int = 0,
        query: str = "",
        attributes: Mapping[str, str] | None = None,
    ) -> None:
        message = common_pb2.BehaviourEvent(
            event_id=event_id,
            identifiers=shopper.identifiers_on(channel),
            type=kind,
            item_id="" if kind == common_pb2.EVENT_TYPE_SEARCH else item.item_id,
            category=item.department,
            value=value,
            quantity=quantity,
            dwell_ms=dwell_ms,
            query=query,
            channel=channel,
            occurred_at=_stamp(at),
            currency=CURRENCY if value else "",
            attributes=attributes or {},
        )
        self.events.append(PlannedEvent(shopper.index, message))

    def _session(self) -> str:
        self._sessions += 1
        return f"demo-{self.tag}-s{self._sessions}"

    def _dwell(self) -> int:
        return int(self.rng.lognormvariate(math.log(20_000), 0.8))


def _query(item: Item) -> str:
    """What a shopper might type to find the item: two of its words."""
    words = [word for word in item.words if len(word) > 2 and word not in _STOP_WORDS]
    return " ".join(words[-2:]) if words else item.department
