"""The scope every RPC requires, as the protos declare it.

Each rpc in ``protos/`` carries ``option (steward.common.v1.required_scope) = "area:verb"``: the
proto is the API documentation, so the permission a method needs is written beside it rather
than in a table here that could drift from it. This module reads those options from the
generated descriptors, once, for the authorisation interceptor, the ``steward callers`` command
(which refuses unknown scopes) and the tests that check every method has one.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Final

import steward
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from steward.common.v1 import options_pb2

SCOPE_FORMAT: Final = "area:verb"
"""How a scope reads: lower-case words joined by one colon, e.g. ``consent:read``."""


@dataclass(frozen=True, slots=True)
class RpcMethod:
    """One method of a Steward service and what calling it requires."""

    path: str
    """The method as gRPC names it on the wire: ``/steward.consent.v1.ConsentService/Collect``."""
    descriptor: MethodDescriptor
    scope: str
    """Empty when the proto declares none (refused by the interceptor, failed by the tests)."""


def service_descriptors() -> Iterator[ServiceDescriptor]:
    """Every service of every generated Steward proto module."""
    for module_info in pkgutil.walk_packages(steward.__path__, prefix="steward."):
        if not module_info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(module_info.name)
        yield from module.DESCRIPTOR.services_by_name.values()


@cache
def rpc_methods() -> dict[str, RpcMethod]:
    """Every Steward RPC by its wire path, with its declared scope."""
    methods: dict[str, RpcMethod] = {}
    for service in service_descriptors():
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            scope = method.GetOptions().Extensions[options_pb2.required_scope]
            methods[path] = RpcMethod(path, method, scope)
    return methods


def required_scope(path: str) -> str | None:
    """The scope the method at ``path`` requires; None for a method no Steward proto declares
    or one that declares no scope, which callers must treat as closed to everyone."""
    method = rpc_methods().get(path)
    return method.scope if method is not None and method.scope else None


def known_scopes() -> frozenset[str]:
    """Every scope some RPC requires: a callers file naming any other has a typo in it."""
    return frozenset(method.scope for method in rpc_methods().values() if method.scope)
