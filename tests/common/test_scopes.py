"""Every RPC declares its scope in the protos, and the README's table of scopes is theirs."""

from __future__ import annotations

import re
from pathlib import Path

from services.common.scopes import known_scopes, required_scope, rpc_methods

README = Path(__file__).resolve().parents[2] / "README.md"


def scope_table() -> str:
    """The README's table, as the protos say it should read."""
    by_scope: dict[str, list[str]] = {}
    for method in rpc_methods().values():
        service = method.descriptor.containing_service.name
        by_scope.setdefault(method.scope, []).append(f"`{service}.{method.descriptor.name}`")
    rows = [f"| `{scope}` | {', '.join(sorted(by_scope[scope]))} |" for scope in sorted(by_scope)]
    return "\n".join(["| scope | RPCs |", "|---|---|", *rows])


def test_every_rpc_of_every_service_declares_a_well_formed_scope() -> None:
    methods = rpc_methods()
    services = {method.descriptor.containing_service.full_name for method in methods.values()}

    assert services >= {
        "steward.consent.v1.ConsentService",
        "steward.consent.v1.AuditService",
        "steward.events.v1.EventLogService",
        "steward.identity.v1.IdentityService",
        "steward.tagging.v1.TaggingService",
        "steward.recommend.v1.RecommendService",
    }
    undeclared = sorted(path for path, method in methods.items() if not method.scope)
    assert undeclared == [], "add `option (steward.common.v1.required_scope)` to these rpcs"
    for method in methods.values():
        assert re.fullmatch(r"[a-z]+:[a-z]+", method.scope), method.path


def test_scopes_are_looked_up_by_wire_path_and_unknown_methods_have_none() -> None:
    assert required_scope("/steward.consent.v1.ConsentService/Collect") == "events:write"
    assert required_scope("/steward.events.v1.EventLogService/Subscribe") == "events:read"
    assert required_scope("/steward.consent.v1.ConsentService/NoSuchMethod") is None
    assert {"consent:read", "subject:erase", "identity:resolve"} <= known_scopes()


def test_the_readme_lists_the_scope_of_every_rpc() -> None:
    expected = scope_table()
    assert expected in README.read_text(encoding="utf-8"), (
        "README.md's table of scopes is stale; replace it with:\n" + expected
    )
