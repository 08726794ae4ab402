"""What a demo run did and what each service knows at the end, and its rendering as tables.

The summary holds counts, states and item titles: never an identifier, raw or hashed, nor a
person id (shoppers are numbered).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.console import Group, RenderableType
from rich.table import Table

from services.demo.shop import CITATION, PURPOSES


@dataclass(slots=True)
class ErasureReport:
    """How an erasure went, service by service."""

    state: str
    services: dict[str, str]
    seconds: float
    consent_after: str = ""


@dataclass(slots=True)
class Recommended:
    """An answer of the recommender for one shopper (titles only)."""

    shopper: str
    personalised: bool
    model: str
    titles: list[str]


@dataclass(slots=True)
class DemoSummary:
    """What the run did and what each service knows at the end: counts, never identifiers."""

    run_tag: str
    seed: int
    shoppers: int
    items: int
    invoices_from: str
    invoices_to: str
    purposes_defined: list[str] = field(default_factory=list)
    rule_set_version: int = 0
    # identity
    persons_created: int = 0
    automatic_merges: int = 0
    persons_after_merging: int = 0
    explicit_merge_id: str = ""
    merged_person_identifiers: dict[str, list[str]] = field(default_factory=dict)
    identifiers_sent: int = 0
    # consent
    banner_choices: dict[str, int] = field(default_factory=dict)
    grants: dict[str, int] = field(default_factory=dict)
    decisions_recorded: int = 0
    gpc_marketing: str = ""
    gpc_marketing_allowed: bool = True
    gpc_analytics_allowed: bool = False
    withdrawn_purpose: str = ""
    withdrawal_reason: str = ""
    withdrawal_propagated: bool = False
    withdrawal_acknowledged_by: list[str] = field(default_factory=list)
    # collection
    events_sent: int = 0
    events_accepted: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    accepted_by_channel: dict[str, int] = field(default_factory=dict)
    accepted_by_purpose: dict[str, int] = field(default_factory=dict)
    purchases_sent: int = 0
    consumers_caught_up: bool = False
    # tagging
    tags_granted: dict[str, int] = field(default_factory=dict)
    audiences: dict[str, int | None] = field(default_factory=dict)
    k_floor: int = 0
    # recommend
    models: list[tuple[str, str, int, int, int]] = field(default_factory=list)
    pending_forgets: int = 0
    recommendations: list[Recommended] = field(default_factory=list)
    # erasure and audit
    erasure: ErasureReport | None = None
    ledger_entries: int = 0
    ledger_checkpoints: int = 0
    ledger_checkpoints_verified: int = 0
    ledger_verified: bool = False
    ledger_problem: str = ""
    ledger_key_id: str = ""
    seconds: float = 0.0
    phase_seconds: dict[str, float] = field(default_factory=dict)


def _percent(part: int, whole: int) -> str:
    return f"{part} ({100 * part / whole:.0f}%)" if whole else str(part)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counts.items())) or "none"


def summary_tables(summary: DemoSummary) -> RenderableType:
    """The summary as one renderable: a table per service, then the run's own figures."""
    shop = Table(title="The shop", show_header=False, title_justify="left")
    shop.add_row("shoppers (UCI customers)", str(summary.shoppers))
    shop.add_row("catalogue items", str(summary.items))
    shop.add_row("orders replayed", f"{summary.invoices_from} to {summary.invoices_to}")
    shop.add_row("purchase lines", str(summary.purchases_sent))
    shop.add_row("seed / run tag", f"{summary.seed} / {summary.run_tag}")

    consent = Table(title="consent", show_header=False, title_justify="left")
    consent.add_row("banner answers", _counts(summary.banner_choices))
    for purpose in PURPOSES:
        consent.add_row(
            f"granted {purpose}", _percent(summary.grants.get(purpose, 0), summary.shoppers)
        )
    consent.add_row("decisions recorded", str(summary.decisions_recorded))
    consent.add_row("purposes defined by the demo", ", ".join(summary.purposes_defined) or "none")
    consent.add_row("events sent / accepted", f"{summary.events_sent} / {summary.events_accepted}")
    consent.add_row("accepted by channel", _counts(summary.accepted_by_channel))
    consent.add_row("accepted for purpose", _counts(summary.accepted_by_purpose))
    consent.add_row("dropped by reason", _counts(summary.dropped))
    if summary.gpc_marketing:
        consent.add_row(
            "GPC shopper",
            f"marketing {'allowed' if summary.gpc_marketing_allowed else 'denied'} "
            f"({summary.gpc_marketing}); analytics "
            f"{'still allowed' if summary.gpc_analytics_allowed else 'not allowed'}",
        )
    if summary.withdrawn_purpose:
        acknowledged = ", ".join(summary.withdrawal_acknowledged_by) or "no consumer"
        consent.add_row(
            "withdrawal",
            f"{summary.withdrawn_purpose} {summary.withdrawal_reason}; acknowledged by "
            f"{acknowledged}; propagation "
            + ("complete" if summary.withdrawal_propagated else "not reported complete"),
        )
    if summary.erasure is not None:
        erasure = summary.erasure
        consent.add_row(
            "erasure",
            f"{erasure.state} in {erasure.seconds:.1f} s; "
            + ", ".join(f"{service} {state}" for service, state in erasure.services.items())
            + f"; consent now answers {erasure.consent_after}",
        )

    identity = Table(title="identity", show_header=False, title_justify="left")
    identity.add_row("identifiers sent by departments", str(summary.identifiers_sent))
    identity.add_row("persons created (one per department view)", str(summary.persons_created))
    identity.add_row("merged by CRM import and app logins", str(summary.automatic_merges))
    identity.add_row("persons after merging", str(summary.persons_after_merging))
    identity.add_row("explicit merge", "recorded" if summary.explicit_merge_id else "none")
    identity.add_row(
        "hand-merged shopper's identifiers",
        "; ".join(
            f"{kind.lower()} from {', '.join(sources)}"
            for kind, sources in sorted(summary.merged_person_identifiers.items())
        )
        or "-",
    )

    tagging = Table(
        "tag",
        "this run's shoppers",
        "audience (whole suite)",
        title="tagging",
        title_justify="left",
    )
    for tag_id, size in summary.audiences.items():
        audience = str(size) if size is not None else f"refused (< k = {summary.k_floor})"
        tagging.add_row(tag_id, str(summary.tags_granted.get(tag_id, 0)), audience)

    recommend = Table(
        "model",
        "state",
        "items",
        "persons",
        "interactions",
        title="recommend",
        title_justify="left",
    )
    for name, state, items, persons, interactions in summary.models:
        recommend.add_row(name, state, str(items), str(persons), str(interactions))
    answers = Table("asked for", "model", "personalised", "top items", show_lines=False)
    for answer in summary.recommendations:
        answers.add_row(
            answer.shopper,
            answer.model,
            "yes" if answer.personalised else "no",
            "; ".join(answer.titles[:3]) or "-",
        )

    audit = Table(title="audit", show_header=False, title_justify="left")
    verdict = "[green]verified[/green]" if summary.ledger_verified else "[red]FAILED[/red]"
    audit.add_row("ledger export", verdict)
    audit.add_row("entries", str(summary.ledger_entries))
    audit.add_row(
        "checkpoints verified",
        f"{summary.ledger_checkpoints_verified} of {summary.ledger_checkpoints}",
    )
    audit.add_row("signing key", summary.ledger_key_id)
    if not summary.ledger_verified:
        audit.add_row("problem", summary.ledger_problem)

    timing = Table(title="timing (s)", show_header=False, title_justify="left")
    for phase, seconds in summary.phase_seconds.items():
        timing.add_row(phase, f"{seconds:.2f}")
    timing.add_row("total", f"{summary.seconds:.1f}")
    pending = f"forgets pending until the next rebuild: {summary.pending_forgets}"
    caught_up = (
        "" if summary.consumers_caught_up else "\n[yellow]the consumers had not caught up[/]"
    )
    return Group(
        shop,
        consent,
        identity,
        tagging,
        recommend,
        answers,
        pending,
        audit,
        timing,
        CITATION + caught_up,
    )
