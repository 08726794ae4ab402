"""The leak scanner (services.testing.leaks) finds an identifier in every form it may take, and
the OTLP collector (services.testing.otlp) receives what a real exporter sends."""

from __future__ import annotations

import json
from pathlib import Path

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from sqlalchemy import Column, LargeBinary, MetaData, String, Table, insert
from steward.common.v1 import common_pb2

from services.common.db import make_engine
from services.testing.leaks import Needles, rows_naming
from services.testing.otlp import OtlpCollector

T = common_pb2
DEVICE = "3f2b8c1e-6a4d-4e2b-9c7a-0d1e2f3a4b5c"


def shopper_needles() -> Needles:
    needles = Needles()
    needles.add_identifier(T.IDENTIFIER_TYPE_EMAIL, "Shopper7@Example.org")
    needles.add_identifier(T.IDENTIFIER_TYPE_PHONE, "+44 20 7946 0123")
    needles.add_identifier(T.IDENTIFIER_TYPE_DEVICE_ID, DEVICE.upper())
    return needles


def test_an_email_is_found_as_sent_and_normalised_in_any_case() -> None:
    needles = shopper_needles()
    assert needles.found_in('{"subject": "SHOPPER7@EXAMPLE.ORG"}') == {"shopper7@example.org"}
    assert needles.found_in("mailto:x.shopper7@example.org") == {"shopper7@example.org"}
    assert not needles.found_in("shopper70@example.org shopper7@example.com")


def test_a_phone_is_found_in_any_spelling_of_its_digits() -> None:
    needles = shopper_needles()
    for spelling in ("+442079460123", "020 7946 0123", "tel:+44-20-7946-0123", "(020) 79460123"):
        assert needles.found_in(f"caller {spelling} rang") == {"+44 20 7946 0123"}, spelling
    assert not needles.found_in("+44 20 7946 0124")


def test_digits_inside_a_hex_digest_are_not_a_phone_but_a_longer_number_holds_one() -> None:
    needles = shopper_needles()
    assert not needles.found_in("k1:9ab2079460123fe0 ab2079460123")
    assert needles.found_in("ref 442079460123") == {"+44 20 7946 0123"}
    assert needles.found_in("\x0d+442079460123B") == {"+44 20 7946 0123"}  # as in a protobuf


def test_a_device_id_and_a_person_id_are_found_in_any_case_inside_json() -> None:
    needles = shopper_needles()
    assert needles.found_in(json.dumps({"device": DEVICE})) == {DEVICE}
    person = "p_" + "ab" * 16
    erased = Needles.of([person])
    assert erased.found_in(f"person={person.upper()}") == {person}
    assert not erased.found_in(f"person=p_{'ab' * 15}cd")


def test_the_database_scan_names_each_table_that_holds_a_needle(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'scan.db'}"
    metadata = MetaData()
    clean = Table("clean", metadata, Column("value", String))
    dirty = Table("dirty", metadata, Column("value", String), Column("blob", LargeBinary))
    engine = make_engine(url)
    try:
        metadata.create_all(engine)
        with engine.begin() as connection:
            connection.execute(insert(clean), [{"value": "k1:0f3a"} for _ in range(3)])
            connection.execute(
                insert(dirty),
                [{"value": "fine", "blob": b'{"note": "call 020 7946 0123"}'}],
            )
    finally:
        engine.dispose()
    found = rows_naming({"one": url, "same again": url}, shopper_needles())
    assert found == {("one+same again", "dirty"): {"+44 20 7946 0123"}}


def test_the_collector_receives_what_an_otlp_exporter_sends_as_it_was_sent() -> None:
    kinds: list[str] = []
    with OtlpCollector(on_export=lambda kind, _request: kinds.append(kind), keep=True) as collector:
        provider = TracerProvider()  # no redacting processor: the attribute goes out as it is
        provider.add_span_processor(
            SimpleSpanProcessor(OTLPSpanExporter(endpoint=collector.endpoint, insecure=True))
        )
        tracer = provider.get_tracer("test")
        with tracer.start_as_current_span("leaky") as span:
            span.set_attribute("note", "Shopper7@Example.org")
        with tracer.start_as_current_span("clean"):
            pass
        provider.shutdown()
    assert collector.spans == 2
    assert kinds == ["spans", "spans"]
    texts = [request.decode("latin-1") for _kind, request in collector.requests]
    assert [shopper_needles().found_in(text) for text in texts] == [{"shopper7@example.org"}, set()]
