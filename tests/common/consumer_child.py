"""A consumer in a process of its own, for the crash test in test_consumer.py.

    python consumer_child.py TARGET CONSUMER_DB_URL BATCH_SIZE [NATS_URL JETSTREAM_PREFIX]

Follows the `consent` log at TARGET (or, given NATS_URL, its JetStream stream under
JETSTREAM_PREFIX, acknowledging to TARGET; for test_jetstream.py) and applies each envelope by
inserting its id into ``applied`` (UNIQUE, so applying one twice would fail) and bumping
``apply_counter``; at the end of each batch it adds the batch's size to
``apply_counter.ended``. Runs until SIGTERM, or until
the test SIGKILLs it.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence

import grpc
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection
from steward.events.v1 import events_pb2

from services.common.consumer import (
    Consumer,
    EnvelopeSource,
    GrpcEnvelopeSource,
    consumer_tables,
)
from services.common.db import for_writes, make_engine
from services.common.jetstream import JetStreamConnection, JetStreamEnvelopeSource

CONSUMER = "crash-test"


def main(
    target: str, db_url: str, batch_size: int, nats_url: str | None, prefix: str | None
) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    engine = make_engine(db_url)
    metadata = MetaData()
    tables = consumer_tables(metadata)
    applied = Table(
        "applied",
        metadata,
        Column("envelope_id", String(36), primary_key=True),
        Column("seq", BigInteger, nullable=False, unique=True),
    )
    counter = Table(
        "apply_counter",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("applies", Integer, nullable=False),
        Column("ended", Integer, nullable=False),
    )
    metadata.create_all(engine)
    with for_writes(engine).begin() as connection:
        # Any backend (the JetStream crash test runs this on PostgreSQL too); one child at a time.
        if connection.execute(select(counter.c.id)).first() is None:
            connection.execute(insert(counter).values(id=1, applies=0, ended=0))

    def apply(connection: Connection, envelope: events_pb2.Envelope) -> None:
        connection.execute(insert(applied).values(envelope_id=envelope.id, seq=envelope.seq))
        connection.execute(update(counter).values(applies=counter.c.applies + 1))

    def end_batch(connection: Connection, envelopes: Sequence[events_pb2.Envelope]) -> None:
        connection.execute(update(counter).values(ended=counter.c.ended + len(envelopes)))

    channel = grpc.insecure_channel(target)
    source: EnvelopeSource = GrpcEnvelopeSource(channel, "consent", CONSUMER, timeout=5)
    connection = None
    if nats_url is not None and prefix is not None:
        connection = JetStreamConnection(nats_url, name=CONSUMER)
        source = JetStreamEnvelopeSource(
            connection, "consent", CONSUMER, prefix=prefix, producer_log=source
        )
    consumer = Consumer(
        CONSUMER,
        "consent",
        source,
        engine,
        apply,
        tables=tables,
        end_batch=end_batch,
        batch_size=batch_size,
        initial_backoff=0.05,
        max_backoff=0.5,
    )
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stopping.set())
    consumer.start()
    stopping.wait()
    consumer.stop()
    if connection is not None:
        connection.close()
    channel.close()
    engine.dispose()


if __name__ == "__main__":
    jetstream = sys.argv[4:6] if len(sys.argv) >= 6 else [None, None]
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), jetstream[0], jetstream[1])
