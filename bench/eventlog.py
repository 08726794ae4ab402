"""The event log on each transport: how fast envelopes get from an outbox to a consumer.

    python bench/eventlog.py [--envelopes 20000] [--nats nats://127.0.0.1:4222]

An outbox on a temporary SQLite file holds ``--envelopes`` envelopes (PersonForgotten, the
smallest body, so the figures are the transport's, not serialisation's). Printed, figures only:

- **relay**: the JetStream relay publishing the whole outbox to a stream of its own (pipelined a
  page of 500 at a time, each page's acks awaited), in envelopes/s;
- **consumer, embedded**: a consumer with a no-op ``apply`` reading the log over the producer's
  ``Subscribe`` stream (a gRPC server in this process), batches of 200, in envelopes/s;
- **consumer, jetstream**: the same consumer reading the stream through its durable pull
  consumer, acknowledging to the producer's ``Ack`` as in production.

The stream is deleted afterwards. Both consumers run in this process beside the producer, so
they share its interpreter; in a deployment the consumer is a process of its own.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

import grpc
from sqlalchemy import MetaData
from steward.events.v1 import events_pb2

from services.common.consumer import Consumer, EnvelopeSource, GrpcEnvelopeSource, consumer_tables
from services.common.db import make_engine
from services.common.eventlog import ProducerLog, registration
from services.common.jetstream import (
    JetStreamConnection,
    JetStreamEnvelopeSource,
    Relay,
    delete_streams,
)
from services.common.outbox import Outbox, outbox_tables
from services.common.server import build_server


def consume(source: EnvelopeSource, directory: Path, name: str) -> tuple[int, float]:
    """Envelopes applied by a fresh no-op consumer reading ``source`` to the end, and seconds."""
    engine = make_engine(f"sqlite:///{directory / f'{name}.db'}")
    metadata = MetaData()
    tables = consumer_tables(metadata)
    metadata.create_all(engine)
    consumer = Consumer(name, "consent", source, engine, lambda _c, _e: None, tables=tables)
    started = time.perf_counter()
    applied = consumer.run_once()
    elapsed = time.perf_counter() - started
    engine.dispose()
    return applied, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envelopes", type=int, default=20_000)
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="steward-bench-eventlog-") as temporary:
        directory = Path(temporary)
        engine = make_engine(f"sqlite:///{directory / 'producer.db'}")
        metadata = MetaData()
        outbox = Outbox("consent", outbox_tables(metadata))
        metadata.create_all(engine)
        for start in range(0, options.envelopes, 500):
            count = min(500, options.envelopes - start)
            bodies = [events_pb2.PersonForgotten(person_id=f"p{start + n}") for n in range(count)]
            with outbox.begin(engine) as connection:
                outbox.append(connection, bodies)
        log = ProducerLog(outbox, engine)
        built = build_server(
            [registration({"consent": log})],
            host="127.0.0.1",
            port=0,
            max_message_bytes=4 * 1024 * 1024,
        )
        built.server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{built.port}")
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        connection = JetStreamConnection(options.nats, name="bench")
        try:
            started = time.perf_counter()
            published = Relay(connection, log, prefix=prefix).run_once()
            relay_seconds = time.perf_counter() - started
            print(f"relay              {published / relay_seconds:10,.0f} envelopes/s")

            embedded = GrpcEnvelopeSource(channel, "consent", "bench-embedded")
            applied, seconds = consume(embedded, directory, "bench-embedded")
            print(f"consumer, embedded {applied / seconds:10,.0f} envelopes/s")

            jetstream = JetStreamEnvelopeSource(
                connection,
                "consent",
                "bench-jetstream",
                prefix=prefix,
                producer_log=GrpcEnvelopeSource(channel, "consent", "bench-jetstream"),
            )
            applied, seconds = consume(jetstream, directory, "bench-jetstream")
            print(f"consumer, jetstream {applied / seconds:9,.0f} envelopes/s")
        finally:
            connection.close()
            delete_streams(options.nats, prefix, ("consent",))
            channel.close()
            built.server.stop(None).wait(5)
            engine.dispose()


if __name__ == "__main__":
    main()
