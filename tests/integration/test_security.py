"""Authentication, scopes and rate limits of a running suite, by token and by certificate.

Every RPC of every service is called three times, with an empty request through a generic
channel method built from its descriptor: without credentials, with a caller holding every scope
but the one it declares, and with one holding that scope. The handler's own answer to an empty
request (INVALID_ARGUMENT, NOT_FOUND, …) shows the call got through.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select
from steward.common.v1 import common_pb2
from steward.consent.v1 import audit_pb2, audit_pb2_grpc, consent_pb2, consent_pb2_grpc
from steward.identity.v1 import identity_pb2
from typer.testing import CliRunner

from services.cli import app
from services.common.callers import Caller, Callers, RateLimitSpec, hash_token, new_token
from services.common.certs import IssuedPki, init_certificates
from services.common.channels import open_channel
from services.common.config import Settings
from services.common.db import make_engine
from services.common.errors import read_error_details
from services.common.scopes import RpcMethod, known_scopes, rpc_methods
from services.runtime import SERVICES, RunningSuite, start_suite
from services.tagging.store import CONSUMER_TABLES
from services.testing import steward_suite

StartServices = Callable[..., RunningSuite]
AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
EMAIL = "grace.hopper@example.org"
runner = CliRunner()


def call(
    channel: grpc.Channel, method: RpcMethod, token: str | None = None, timeout: float = 10
) -> grpc.StatusCode:
    """Call ``method`` with an empty request; the status it ended with (OK if it answered)."""
    descriptor = method.descriptor
    request_class = message_factory.GetMessageClass(descriptor.input_type)
    response_class = message_factory.GetMessageClass(descriptor.output_type)
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    serialise, parse = request_class.SerializeToString, response_class.FromString
    try:
        if descriptor.server_streaming and descriptor.client_streaming:
            stream = channel.stream_stream(method.path, serialise, parse)
            responses = stream(iter([request_class()]), metadata=metadata, timeout=timeout)
            next(responses, None)
            responses.cancel()
        elif descriptor.server_streaming:
            responses = channel.unary_stream(method.path, serialise, parse)(
                request_class(), metadata=metadata, timeout=timeout
            )
            next(responses, None)
            responses.cancel()
        elif descriptor.client_streaming:
            channel.stream_unary(method.path, serialise, parse)(
                iter([request_class()]), metadata=metadata, timeout=timeout
            )
        else:
            channel.unary_unary(method.path, serialise, parse)(
                request_class(), metadata=metadata, timeout=timeout
            )
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def write_callers(path: Path, *callers: Caller) -> Path:
    Callers(list(callers)).save(path)
    return path


def with_token(
    name: str, scopes: set[str] | frozenset[str], rate_limit: RateLimitSpec | None = None
) -> tuple[Caller, str]:
    """A caller authenticating with a fresh token, and the token."""
    token = new_token()
    caller = Caller(name, frozenset(scopes), token_sha256=hash_token(token), rate_limit=rate_limit)
    return caller, token


def by_email(email: str = EMAIL) -> common_pb2.PersonRef:
    return common_pb2.PersonRef(
        identifiers=[common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=email)]
    )


def grant_marketing(
    consent: consent_pb2_grpc.ConsentServiceStub,
    subject: str,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    purposes = consent.ListPurposes(consent_pb2.ListPurposesRequest(), timeout=10).purposes
    version = next(p.policy_version for p in purposes if p.id == "profiling")
    consent.RecordConsent(
        consent_pb2.RecordConsentRequest(
            subject=by_email(subject),
            decisions=[
                consent_pb2.DecisionInput(
                    purpose="profiling",
                    decision=common_pb2.DECISION_GRANTED,
                    policy_version=version,
                )
            ],
            source=consent_pb2.CONSENT_SOURCE_WEB_BANNER,
            locale="en-GB",
        ),
        metadata=metadata,
        timeout=10,
    )


def ledger_actors(channel: grpc.Channel) -> list[str]:
    auditor = audit_pb2_grpc.AuditServiceStub(channel)
    return [
        item.entry.actor
        for item in auditor.ExportLedger(audit_pb2.ExportLedgerRequest(), timeout=10)
        if item.WhichOneof("item") == "entry"
    ]


# Tokens ----------------------------------------------------------------------------------------


def test_every_rpc_needs_a_caller_holding_its_scope(
    start_services: StartServices, tmp_path: Path
) -> None:
    scopes = known_scopes()
    everything, everything_token = with_token("everything", scopes)
    lacking = {
        scope: with_token(f"without-{scope.replace(':', '-')}", scopes - {scope})
        for scope in scopes
    }
    callers = write_callers(
        tmp_path / "callers.yaml", everything, *(caller for caller, _ in lacking.values())
    )
    suite = start_services(*SERVICES, environ={"STEWARD_CALLERS_FILE": str(callers)})
    methods = rpc_methods()
    assert len(methods) > 30

    with grpc.insecure_channel(suite.target) as channel:
        for path, method in methods.items():
            assert call(channel, method) == grpc.StatusCode.UNAUTHENTICATED, path
            assert call(channel, method, "not-a-token") == grpc.StatusCode.UNAUTHENTICATED, path
            _, wrong_token = lacking[method.scope]
            assert call(channel, method, wrong_token) == grpc.StatusCode.PERMISSION_DENIED, path
            answered = call(channel, method, everything_token, timeout=3)
            # The handler's own answer: the suite serves the method and the caller got through.
            assert answered not in (*AUTH_CODES, grpc.StatusCode.UNIMPLEMENTED), (path, answered)


def test_health_and_reflection_stay_open_without_credentials(
    start_services: StartServices, tmp_path: Path
) -> None:
    callers = write_callers(tmp_path / "callers.yaml", with_token("shop", {"consent:read"})[0])
    suite = start_services("consent", "identity", environ={"STEWARD_CALLERS_FILE": str(callers)})

    result = runner.invoke(app, ["health", "--target", suite.target])

    assert result.exit_code == 0, result.output
    assert "steward.consent.v1.ConsentService" in result.output


def test_the_ledger_records_the_authenticated_caller_not_the_claimed_one(
    start_services: StartServices, tmp_path: Path
) -> None:
    crm, token = with_token("crm", {"consent:write", "consent:read", "audit:read"})
    suite = start_services(
        "consent",
        "identity",
        environ={"STEWARD_CALLERS_FILE": str(write_callers(tmp_path / "callers.yaml", crm))},
    )
    # The channel every Steward client opens, with STEWARD_TOKEN set.
    with open_channel(suite.target, Settings.from_env({"STEWARD_TOKEN": token})) as channel:
        consent = consent_pb2_grpc.ConsentServiceStub(channel)
        grant_marketing(consent, EMAIL, metadata=(("x-steward-caller", "mallory"),))
        actors = ledger_actors(channel)

    assert actors[-1] == "crm"
    assert "mallory" not in actors


def test_the_token_is_never_logged_nor_traced(
    start_services: StartServices, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shop, token = with_token("shop", {"consent:read"})
    callers = write_callers(tmp_path / "callers.yaml", shop)
    spans = InMemorySpanExporter()
    caplog.set_level(logging.DEBUG)
    suite = start_services(
        "consent", "identity", environ={"STEWARD_CALLERS_FILE": str(callers)}, span_exporter=spans
    )
    list_purposes = rpc_methods()["/steward.consent.v1.ConsentService/ListPurposes"]
    define_purpose = rpc_methods()["/steward.consent.v1.ConsentService/DefinePurpose"]

    with grpc.insecure_channel(suite.target) as channel:
        assert call(channel, list_purposes, token) == grpc.StatusCode.OK
        assert call(channel, define_purpose, token) == grpc.StatusCode.PERMISSION_DENIED
        assert call(channel, list_purposes, token + "x") == grpc.StatusCode.UNAUTHENTICATED

    suite.telemetry.tracer_provider.force_flush()
    assert token not in caplog.text
    traced = [str(span.to_json()) for span in spans.get_finished_spans()]
    assert traced, "the calls were traced"
    assert not any(token in text for text in traced)
    stored = callers.read_text()
    assert token not in stored and hash_token(token) in stored


def test_a_caller_over_its_rate_is_told_when_to_retry(
    start_services: StartServices, tmp_path: Path
) -> None:
    shop, token = with_token(
        "shop", {"consent:read"}, rate_limit=RateLimitSpec(per_second=0.05, burst=2)
    )
    other, other_token = with_token("crm", {"consent:read"})
    callers = write_callers(tmp_path / "callers.yaml", shop, other)
    suite = start_services("consent", "identity", environ={"STEWARD_CALLERS_FILE": str(callers)})
    metadata = (("authorization", f"Bearer {token}"),)

    with grpc.insecure_channel(suite.target) as channel:
        consent = consent_pb2_grpc.ConsentServiceStub(channel)
        for _ in range(2):
            consent.ListPurposes(consent_pb2.ListPurposesRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            consent.ListPurposes(consent_pb2.ListPurposesRequest(), metadata=metadata, timeout=10)
        # Another caller's bucket is its own.
        consent.ListPurposes(
            consent_pb2.ListPurposesRequest(),
            metadata=(("authorization", f"Bearer {other_token}"),),
            timeout=10,
        )

    details = read_error_details(refused.value)
    assert details.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.retry_delay is not None and 0 < details.retry_delay <= 20


def test_the_test_harness_calls_with_the_token_its_environment_gives(tmp_path: Path) -> None:
    harness, token = with_token("harness", {"consent:read"})
    callers = write_callers(tmp_path / "callers.yaml", harness)
    environ = {"STEWARD_CALLERS_FILE": str(callers), "STEWARD_TOKEN": token}

    with steward_suite(services=["consent", "identity"], environ=environ) as suite:
        assert suite.consent.ListPurposes(consent_pb2.ListPurposesRequest(), timeout=10).purposes
        with pytest.raises(grpc.RpcError) as denied:
            suite.identity.GetRules(identity_pb2.GetRulesRequest(), timeout=10)

    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_callers_file_naming_an_unknown_scope_stops_the_start(
    start_services: StartServices, tmp_path: Path
) -> None:
    callers = tmp_path / "callers.yaml"
    callers.write_text(
        f"callers: [{{name: shop, scopes: [consent:reed], token_sha256: {hash_token('t')}}}]\n"
    )

    with pytest.raises(ValueError, match="consent:reed"):
        start_services("consent", "identity", environ={"STEWARD_CALLERS_FILE": str(callers)})


# Mutual TLS ------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> IssuedPki:
    return init_certificates(tmp_path / "certs", services=list(SERVICES), callers=["alice"])


def tls_environ(pki: IssuedPki, service: str) -> dict[str, str]:
    issued = next(files for files in pki.services if files.name == service)
    return {
        "STEWARD_TLS_CERT": str(issued.certificate),
        "STEWARD_TLS_KEY": str(issued.private_key),
        "STEWARD_TLS_CA": str(pki.ca.certificate),
    }


def client_credentials(pki: IssuedPki, with_certificate: bool) -> grpc.ChannelCredentials:
    alice = pki.callers[0]
    if not with_certificate:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.certificate.read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.certificate.read_bytes(),
        private_key=alice.private_key.read_bytes(),
        certificate_chain=alice.certificate.read_bytes(),
    )


def test_a_tls_suite_admits_only_clients_with_a_certificate(
    start_services: StartServices, pki: IssuedPki, tmp_path: Path
) -> None:
    callers = write_callers(
        tmp_path / "callers.yaml",
        Caller("alice", frozenset({"consent:read"}), certificate_subject="alice"),
    )
    suite = start_services(
        "consent",
        "identity",
        environ={**tls_environ(pki, "consent"), "STEWARD_CALLERS_FILE": str(callers)},
    )
    request = consent_pb2.ListPurposesRequest()

    for refused in (
        grpc.secure_channel(suite.target, client_credentials(pki, with_certificate=False)),
        grpc.insecure_channel(suite.target),
    ):
        with refused as channel, pytest.raises(grpc.RpcError) as failure:
            consent_pb2_grpc.ConsentServiceStub(channel).ListPurposes(request, timeout=5)
        assert failure.value.code() == grpc.StatusCode.UNAVAILABLE

    credentials = client_credentials(pki, with_certificate=True)
    with grpc.secure_channel(suite.target, credentials) as channel:
        purposes = consent_pb2_grpc.ConsentServiceStub(channel).ListPurposes(request, timeout=10)
        assert purposes.purposes
        health = health_pb2_grpc.HealthStub(channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        # Alice's certificate authenticates her; her scopes still hold.
        define = rpc_methods()["/steward.consent.v1.ConsentService/DefinePurpose"]
        assert call(channel, define) == grpc.StatusCode.PERMISSION_DENIED


def test_steward_health_reaches_a_tls_suite_with_the_environments_certificate(
    start_services: StartServices, pki: IssuedPki
) -> None:
    suite = start_services("identity", environ=tls_environ(pki, "identity"))
    alice = pki.callers[0]
    environ = {
        "STEWARD_TLS_CERT": str(alice.certificate),
        "STEWARD_TLS_KEY": str(alice.private_key),
        "STEWARD_TLS_CA": str(pki.ca.certificate),
    }

    over_tls = runner.invoke(app, ["health", "--target", suite.target], env=environ)
    plaintext = runner.invoke(
        app,
        ["health", "--target", suite.target, "--timeout", "1"],
        env={name: "" for name in environ},
    )

    assert over_tls.exit_code == 0, over_tls.output
    assert "steward.identity.v1.IdentityService" in over_tls.output
    assert plaintext.exit_code == 1


def test_services_in_separate_processes_call_each_other_over_mutual_tls(
    pki: IssuedPki, tmp_path: Path
) -> None:
    """Each service in a suite of its own, presenting its own certificate: consent resolves at
    identity and gathers an export from tagging and recommend, which read consent's and
    identity's logs; the callers file says what each service may do."""
    callers = write_callers(
        tmp_path / "callers.yaml",
        Caller(
            "consent",
            frozenset(
                {
                    "identity:resolve",
                    "identity:read",
                    "subject:erase",
                    "events:read",
                    "tags:read",
                    "subject:export",
                }
            ),
            certificate_subject="consent",
        ),
        Caller("tagging", frozenset({"events:read"}), certificate_subject="tagging"),
        Caller("recommend", frozenset({"events:read"}), certificate_subject="recommend"),
        Caller(
            "alice",
            frozenset({"consent:read", "consent:write", "audit:read", "subject:export"}),
            certificate_subject="alice",
        ),
    )
    # Consent must know where tagging and recommend are, and they where consent is.
    consent_target = f"127.0.0.1:{_free_port()}"

    def settings(service: str, port: str = "0", **targets: str) -> Settings:
        environ = {
            "STEWARD_DATA_DIR": str(tmp_path / service),
            "STEWARD_CALLERS_FILE": str(callers),
            "STEWARD_PORT": port,
            **tls_environ(pki, service),
            **{f"STEWARD_{name.upper()}_TARGET": target for name, target in targets.items()},
        }
        return Settings.from_env(environ)

    started: list[RunningSuite] = []
    try:
        identity = start_suite(settings("identity"), ["identity"])
        started.append(identity)
        peers = {"consent": consent_target, "identity": identity.target}
        tagging_settings = settings("tagging", **peers)
        tagging = start_suite(tagging_settings, ["tagging"])
        started.append(tagging)
        recommend = start_suite(settings("recommend", **peers), ["recommend"])
        started.append(recommend)
        consent_settings = settings(
            "consent",
            port=consent_target.rsplit(":", 1)[1],
            identity=identity.target,
            tagging=tagging.target,
            recommend=recommend.target,
        )
        started.append(start_suite(consent_settings, ["consent"]))

        credentials = client_credentials(pki, with_certificate=True)
        with grpc.secure_channel(consent_target, credentials) as channel:
            consent = consent_pb2_grpc.ConsentServiceStub(channel)
            grant_marketing(consent, "split@example.org")
            assert ledger_actors(channel)[-1] == "alice"
            export = consent.ExportSubjectData(
                consent_pb2.ExportSubjectDataRequest(subject=by_email("split@example.org")),
                timeout=10,
            )

        assert export.bundle.HasField("tags") and export.bundle.HasField("recommendations")
        assert _consumed_seq(tagging_settings, "consent") >= 1
    finally:
        for running in reversed(started):
            running.stop(0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_services_apart_call_each_other_with_their_tokens_when_tls_is_off(
    tmp_path: Path,
) -> None:
    consent_caller, consent_token = with_token(
        "consent", {"identity:resolve", "identity:read", "events:read"}
    )
    tagging_caller, tagging_token = with_token("tagging", {"events:read"})
    shop, shop_token = with_token("shop", {"consent:read", "consent:write", "audit:read"})
    callers = write_callers(tmp_path / "callers.yaml", consent_caller, tagging_caller, shop)

    def settings(service: str, token: str | None, **targets: str) -> Settings:
        environ = {
            "STEWARD_DATA_DIR": str(tmp_path / service),
            "STEWARD_CALLERS_FILE": str(callers),
            "STEWARD_PORT": "0",
            **{f"STEWARD_{name.upper()}_TARGET": target for name, target in targets.items()},
        }
        if token is not None:
            environ["STEWARD_TOKEN"] = token
        return Settings.from_env(environ)

    started: list[RunningSuite] = []
    try:
        identity = start_suite(settings("identity", None), ["identity"])
        started.append(identity)
        consent_process = start_suite(
            settings("consent", consent_token, identity=identity.target), ["consent"]
        )
        started.append(consent_process)
        tagging_settings = settings(
            "tagging", tagging_token, consent=consent_process.target, identity=identity.target
        )
        started.append(start_suite(tagging_settings, ["tagging"]))

        shop_settings = Settings.from_env({"STEWARD_TOKEN": shop_token})
        with open_channel(consent_process.target, shop_settings) as channel:
            grant_marketing(consent_pb2_grpc.ConsentServiceStub(channel), "apart@example.org")
            assert ledger_actors(channel)[-1] == "shop"

        assert _consumed_seq(tagging_settings, "consent") >= 1
    finally:
        for running in reversed(started):
            running.stop(0)


def test_without_a_callers_file_the_suite_warns_that_calls_are_unauthenticated(
    start_services: StartServices, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="services.runtime")

    start_services("identity")

    warnings = [r.getMessage() for r in caplog.records if r.name == "services.runtime"]
    assert warnings == [
        "no callers file (STEWARD_CALLERS_FILE): every call is served unauthenticated"
    ]


def _consumed_seq(settings: Settings, producer: str) -> int:
    """The seq tagging has applied of ``producer``'s log, once it is past 0 (10 s at most)."""
    engine = make_engine(settings.db_url("tagging"))
    cursors = CONSUMER_TABLES.cursors
    deadline = time.monotonic() + 10
    seq = 0
    try:
        while time.monotonic() < deadline and seq < 1:
            with engine.connect() as connection:
                seq = (
                    connection.execute(
                        select(cursors.c.seq).where(cursors.c.producer == producer)
                    ).scalar_one_or_none()
                    or 0
                )
            time.sleep(0.05)
    finally:
        engine.dispose()
    return seq


# The access matrix -------------------------------------------------------------------------------


MATRIX_CALLERS = """\
# As an operator writes it (README, "The callers file"): one entry per system that calls.
callers:
  - name: shop-backend
    scopes: [events:write, consent:write, consent:read]
    token_sha256: <shop-backend>
  - name: crm
    scopes: [consent:read, identity:resolve, identity:read, tags:read, audience:read]
    token_sha256: <crm>
  - name: recommender-frontend
    scopes: [recommend:read, recommend:write]
    token_sha256: <recommender-frontend>
  - name: privacy-office
    scopes: [subject:erase, subject:export, audit:read, consent:read]
    token_sha256: <privacy-office>
  - name: data-steward
    scopes: [identity:admin, tags:admin, tags:write, recommend:admin, consent:admin]
    token_sha256: <data-steward>
  - name: tagging                   # a consumer run apart, reading the logs
    scopes: [events:read]
    token_sha256: <tagging>
  - name: auditor                   # by certificate only: its token-less calls are unknown
    scopes: [audit:read]
    certificate_subject: auditor
"""


def test_each_caller_of_a_callers_file_reaches_exactly_the_rpcs_of_its_scopes(
    start_services: StartServices, tmp_path: Path
) -> None:
    text = MATRIX_CALLERS
    token_of = {}
    for name in re.findall(r"<([a-z-]+)>", MATRIX_CALLERS):
        token_of[name] = new_token()
        text = text.replace(f"<{name}>", hash_token(token_of[name]))
    path = tmp_path / "callers.yaml"
    path.write_text(text)
    # The file, read back, is the reference the answers are checked against.
    callers = Callers.load(path, known_scopes())
    suite = start_services(*SERVICES, environ={"STEWARD_CALLERS_FILE": str(path)})
    methods = rpc_methods()
    covered = set().union(*(caller.scopes for caller in callers))
    assert {method.scope for method in methods.values()} <= covered | {None}, "a scope unused"

    mismatches = []
    admitted: Counter[str] = Counter()
    with grpc.insecure_channel(suite.target) as channel:
        for caller in callers:
            token = token_of.get(caller.name)
            for path_name, method in methods.items():
                answered = call(channel, method, token, timeout=3)
                if token is None:
                    expected_ok = False
                    wrong = answered != grpc.StatusCode.UNAUTHENTICATED
                elif method.scope in caller.scopes:
                    expected_ok = True
                    wrong = answered in (*AUTH_CODES, grpc.StatusCode.UNIMPLEMENTED)
                else:
                    expected_ok = False
                    wrong = answered != grpc.StatusCode.PERMISSION_DENIED
                if wrong:
                    mismatches.append((caller.name, path_name, expected_ok, answered.name))
                elif expected_ok:
                    admitted[caller.name] += 1
    assert not mismatches, mismatches
    expected = Counter(
        caller.name
        for caller in callers
        if caller.name in token_of
        for method in methods.values()
        if method.scope in caller.scopes
    )
    assert admitted == expected and set(expected) == set(token_of), admitted


def test_a_client_certificate_from_another_ca_is_refused(
    start_services: StartServices, pki: IssuedPki, tmp_path: Path
) -> None:
    # The same caller name under a CA the suite does not trust: a stranger, not alice.
    other = init_certificates(tmp_path / "other-ca", services=["consent"], callers=["alice"])
    callers = write_callers(
        tmp_path / "callers.yaml",
        Caller("alice", frozenset({"consent:read"}), certificate_subject="alice"),
    )
    suite = start_services(
        "consent",
        "identity",
        environ={**tls_environ(pki, "consent"), "STEWARD_CALLERS_FILE": str(callers)},
    )
    request = consent_pb2.ListPurposesRequest()
    impostor = other.callers[0]
    foreign = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.certificate.read_bytes(),  # it does trust the suite's server
        private_key=impostor.private_key.read_bytes(),
        certificate_chain=impostor.certificate.read_bytes(),
    )
    with grpc.secure_channel(suite.target, foreign) as channel, pytest.raises(grpc.RpcError) as no:
        consent_pb2_grpc.ConsentServiceStub(channel).ListPurposes(request, timeout=5)
    assert no.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails

    # A server certificate from the other CA does not fool a client of this one either.
    other_consent = next(files for files in other.services if files.name == "consent")
    impersonator = start_services(
        "consent",
        "identity",
        environ={
            "STEWARD_TLS_CERT": str(other_consent.certificate),
            "STEWARD_TLS_KEY": str(other_consent.private_key),
            "STEWARD_TLS_CA": str(other.ca.certificate),
            "STEWARD_CALLERS_FILE": str(callers),
        },
    )
    credentials = client_credentials(pki, with_certificate=True)
    with (
        grpc.secure_channel(impersonator.target, credentials) as channel,
        pytest.raises(grpc.RpcError) as no,
    ):
        consent_pb2_grpc.ConsentServiceStub(channel).ListPurposes(request, timeout=5)
    assert no.value.code() == grpc.StatusCode.UNAVAILABLE

    # Alice's genuine certificate still gets through the first suite.
    with grpc.secure_channel(suite.target, credentials) as channel:
        assert consent_pb2_grpc.ConsentServiceStub(channel).ListPurposes(request, timeout=10)


def test_a_certificate_of_the_right_ca_for_an_unlisted_name_is_unauthenticated(
    start_services: StartServices, pki: IssuedPki, tmp_path: Path
) -> None:
    callers = write_callers(
        tmp_path / "callers.yaml",
        Caller("bob", frozenset({"consent:read"}), certificate_subject="bob"),
    )
    suite = start_services(
        "consent",
        "identity",
        environ={**tls_environ(pki, "consent"), "STEWARD_CALLERS_FILE": str(callers)},
    )
    with grpc.secure_channel(suite.target, client_credentials(pki, True)) as channel:
        list_purposes = rpc_methods()["/steward.consent.v1.ConsentService/ListPurposes"]
        assert call(channel, list_purposes) == grpc.StatusCode.UNAUTHENTICATED
