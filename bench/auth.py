"""What authentication, scopes, rate limits and mutual TLS cost a call.

Identity alone serves ``GetRules`` (a cheap call, so the checks are a visible share of it) in
five set-ups: plaintext without a callers file (the embedded default), the same with the client
sending a token nobody checks (the client's share), a bearer token checked against a callers
file, the same with a rate limit high enough never to refuse, and mutual TLS
with the caller known by its certificate. Client and server share this process, so the CPU
figure is both ends of a call; rounds of each set-up are interleaved and the best round kept,
because the machine is shared. Figures only.

    .venv/bin/python bench/auth.py [--calls 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from steward.identity.v1 import identity_pb2, identity_pb2_grpc

from services.common.callers import Caller, Callers, RateLimitSpec, hash_token, new_token
from services.common.certs import init_certificates
from services.common.channels import open_channel
from services.common.config import Settings
from services.runtime import RunningSuite, start_suite

SetUp = tuple[dict[str, str], dict[str, str]]
"""(the server's environment, the client's environment)."""


def set_ups(directory: Path) -> dict[str, SetUp]:
    token = new_token()
    pki = init_certificates(directory / "certs", services=["identity"], callers=["bench"])
    identity, bench = pki.services[0], pki.callers[0]
    scopes = frozenset({"identity:read"})
    plain_callers = directory / "callers.yaml"
    Callers([Caller("bench", scopes, token_sha256=hash_token(token))]).save(plain_callers)
    limited_callers = directory / "limited.yaml"
    limit = RateLimitSpec(per_second=1e9, burst=10**9)
    Callers([Caller("bench", scopes, token_sha256=hash_token(token), rate_limit=limit)]).save(
        limited_callers
    )
    certificate_callers = directory / "certificate.yaml"
    Callers([Caller("bench", scopes, certificate_subject="bench")]).save(certificate_callers)
    ca = str(pki.ca.certificate)
    return {
        "no callers file": ({}, {}),
        "token sent, not checked": ({}, {"STEWARD_TOKEN": token}),
        "token": ({"STEWARD_CALLERS_FILE": str(plain_callers)}, {"STEWARD_TOKEN": token}),
        "token + rate limit": (
            {"STEWARD_CALLERS_FILE": str(limited_callers)},
            {"STEWARD_TOKEN": token},
        ),
        "mutual TLS, certificate": (
            {
                "STEWARD_CALLERS_FILE": str(certificate_callers),
                "STEWARD_TLS_CERT": str(identity.certificate),
                "STEWARD_TLS_KEY": str(identity.private_key),
                "STEWARD_TLS_CA": ca,
            },
            {
                "STEWARD_TLS_CERT": str(bench.certificate),
                "STEWARD_TLS_KEY": str(bench.private_key),
                "STEWARD_TLS_CA": ca,
            },
        ),
    }


def measure(call: Callable[[], object], calls: int) -> tuple[float, float]:
    """(wall, CPU) microseconds per call."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        call()
    return (
        (time.perf_counter() - wall) / calls * 1e6,
        (time.process_time() - cpu) / calls * 1e6,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    options = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="steward-bench-auth-"))
    chosen = set_ups(directory)
    suites: dict[str, RunningSuite] = {}
    channels: dict[str, grpc.Channel] = {}
    for name, (server_environ, client_environ) in chosen.items():
        base = {"STEWARD_DATA_DIR": str(directory / name.replace(" ", "-")), "STEWARD_PORT": "0"}
        settings = Settings.from_env({**base, "STEWARD_LOG_LEVEL": "ERROR", **server_environ})
        suites[name] = start_suite(dataclasses.replace(settings), ["identity"])
        channels[name] = open_channel(suites[name].target, Settings.from_env(client_environ))
    best: dict[str, tuple[float, float]] = {}
    try:
        stubs = {name: identity_pb2_grpc.IdentityServiceStub(c) for name, c in channels.items()}
        request = identity_pb2.GetRulesRequest()
        for stub in stubs.values():
            for _ in range(200):
                stub.GetRules(request, timeout=10)
        for _ in range(options.rounds):
            for name, stub in stubs.items():
                wall, cpu = measure(
                    lambda stub=stub: stub.GetRules(request, timeout=10), options.calls
                )
                previous = best.get(name)
                best[name] = (wall, cpu) if previous is None else min(previous, (wall, cpu))
    finally:
        for channel in channels.values():
            channel.close()
        for suite in suites.values():
            suite.stop(0)
    baseline = best["no callers file"]
    print(f"GetRules, {options.calls} calls x {options.rounds} rounds, best round:")
    for name, (wall, cpu) in best.items():
        print(
            f"  {name:26} {wall:7.0f} us/call wall  {cpu:7.0f} us/call CPU "
            f"({cpu - baseline[1]:+.0f} us CPU against no callers file)"
        )


if __name__ == "__main__":
    main()
