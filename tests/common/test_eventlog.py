from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from sqlalchemy import MetaData
from sqlalchemy.engine import Engine
from steward.events.v1 import events_pb2, events_pb2_grpc

from services.common.errors import read_error_details
from services.common.eventlog import (
    SERVICE_NAME,
    AckCallback,
    EventLogServicer,
    ProducerLog,
    registration,
)
from services.common.outbox import Outbox, outbox_tables
from services.common.server import ServiceRegistration, build_server

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class Served:
    outbox: Outbox
    engine: Engine
    servicer: EventLogServicer
    stub: events_pb2_grpc.EventLogServiceStub
    server: grpc.Server

    def append(self, count: int) -> list[events_pb2.Envelope]:
        bodies = [events_pb2.PersonForgotten(person_id=f"person-{n}") for n in range(count)]
        with self.outbox.begin(self.engine) as connection:  # notifies followers on commit
            return self.outbox.append(connection, bodies)

    def subscribe(
        self, from_seq: int = 0, *, stop_at_end: bool = True, consumer: str = "tagging"
    ) -> list[events_pb2.Envelope]:
        request = events_pb2.SubscribeRequest(
            producer="consent", consumer=consumer, from_seq=from_seq, stop_at_end=stop_at_end
        )
        return [response.envelope for response in self.stub.Subscribe(request, timeout=10)]

    def ack(self, seq: int, consumer: str = "tagging") -> int:
        request = events_pb2.AckRequest(producer="consent", consumer=consumer, seq=seq)
        return self.stub.Ack(request, timeout=10).acknowledged_seq


ServeFactory = Callable[..., Served]


@pytest.fixture
def serve(engine: Engine) -> Iterator[ServeFactory]:
    """Starts an event-log server for a `consent` outbox on ``engine``, stopped afterwards."""
    metadata = MetaData()
    tables = outbox_tables(metadata)
    metadata.create_all(engine)
    started: list[tuple[grpc.Server, grpc.Channel, EventLogServicer]] = []

    def start(on_ack: AckCallback | None = None, **options: object) -> Served:
        outbox = Outbox("consent", tables)
        log = ProducerLog(outbox, engine, on_ack)
        servicer = EventLogServicer({"consent": log}, **options)  # type: ignore[arg-type]
        built = build_server(
            [
                ServiceRegistration(
                    SERVICE_NAME, events_pb2_grpc.add_EventLogServiceServicer_to_server, servicer
                )
            ],
            host="127.0.0.1",
            port=0,
            max_message_bytes=MAX_MESSAGE_BYTES,
        )
        built.server.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{built.port}")
        started.append((built.server, channel, servicer))
        stub = events_pb2_grpc.EventLogServiceStub(channel)
        return Served(outbox, engine, servicer, stub, built.server)

    yield start
    for server, channel, servicer in started:
        servicer.close()
        channel.close()
        server.stop(None).wait(5)


def test_subscribe_reads_from_any_seq_across_pages_and_stops_at_end(serve: ServeFactory) -> None:
    served = serve(page_size=7)
    written = served.append(20) + served.append(3)

    assert served.subscribe(0) == written
    assert served.subscribe(1) == written
    assert served.subscribe(7) == written[6:]
    assert served.subscribe(8) == written[7:]
    assert served.subscribe(23) == written[22:]
    assert served.subscribe(24) == []


def test_subscribe_to_an_empty_log_with_stop_at_end_ends_at_once(serve: ServeFactory) -> None:
    assert serve().subscribe(0) == []


def follow(
    served: Served, from_seq: int
) -> tuple[queue.Queue[events_pb2.Envelope], grpc.CallIterator[events_pb2.SubscribeResponse]]:
    """Start a following subscription; its envelopes arrive on the returned queue."""
    received: queue.Queue[events_pb2.Envelope] = queue.Queue()
    call = served.stub.Subscribe(
        events_pb2.SubscribeRequest(producer="consent", consumer="tagging", from_seq=from_seq),
        timeout=30,
    )

    def drain() -> None:
        try:
            for response in call:
                received.put(response.envelope)
        except grpc.RpcError:
            pass

    threading.Thread(target=drain, daemon=True).start()
    return received, call


def take(received: queue.Queue[events_pb2.Envelope], count: int) -> list[events_pb2.Envelope]:
    return [received.get(timeout=5) for _ in range(count)]


def test_a_follower_receives_new_appends_as_soon_as_they_commit(serve: ServeFactory) -> None:
    # Polling is slowed to a crawl: only the writer's notification can deliver in time.
    served = serve(poll_interval=60.0)
    before = served.append(2)
    received, call = follow(served, 0)

    assert take(received, 2) == before
    for _ in range(3):
        written = served.append(4)
        assert take(received, 4) == written
    call.cancel()


def test_a_follower_sees_writers_of_other_processes_by_polling(serve: ServeFactory) -> None:
    served = serve(poll_interval=0.05)
    received, call = follow(served, 0)
    other_process = Outbox("consent", served.outbox.tables)  # never notifies our follower

    with other_process.begin(served.engine) as connection:
        written = other_process.append(connection, [events_pb2.PersonForgotten(person_id="p")])

    assert take(received, 1) == written
    call.cancel()


def test_close_ends_following_streams_with_unavailable(serve: ServeFactory) -> None:
    served = serve(poll_interval=60.0)
    served.append(1)
    request = events_pb2.SubscribeRequest(producer="consent", consumer="tagging")
    call = served.stub.Subscribe(request, timeout=30)
    assert next(call).envelope.seq == 1

    served.servicer.close()

    with pytest.raises(grpc.RpcError) as failure:
        next(call)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.RpcError) as refused:
        served.subscribe(0)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_stop_is_not_held_up_by_a_follower(serve: ServeFactory) -> None:
    served = serve(poll_interval=0.05)
    received, _call = follow(served, 0)
    served.append(1)
    take(received, 1)

    assert served.server.stop(0.1).wait(5)


def test_subscribe_to_a_producer_not_hosted_here_is_not_found(serve: ServeFactory) -> None:
    served = serve()
    request = events_pb2.SubscribeRequest(producer="identity", consumer="tagging")

    with pytest.raises(grpc.RpcError) as failure:
        list(served.stub.Subscribe(request, timeout=10))

    details = read_error_details(failure.value)
    assert details.code == grpc.StatusCode.NOT_FOUND
    assert details.resource_info is not None
    assert details.resource_info.resource_name == "identity"


def test_subscribe_without_consumer_or_with_negative_seq_is_invalid(serve: ServeFactory) -> None:
    served = serve()
    request = events_pb2.SubscribeRequest(producer="consent", consumer="", from_seq=-1)

    with pytest.raises(grpc.RpcError) as failure:
        list(served.stub.Subscribe(request, timeout=10))

    details = read_error_details(failure.value)
    assert details.code == grpc.StatusCode.INVALID_ARGUMENT
    assert set(details.field_violations) == {"consumer", "from_seq"}


def test_ack_is_monotonic_and_reported(serve: ServeFactory) -> None:
    reported: list[tuple[str, str, int]] = []
    served = serve(on_ack=lambda *ack: reported.append(ack))
    served.append(10)

    assert served.ack(4) == 4
    assert served.ack(2) == 4
    assert served.ack(10) == 10
    assert served.ack(0, consumer="recommend") == 0

    assert reported == [
        ("consent", "tagging", 4),
        ("consent", "tagging", 4),
        ("consent", "tagging", 10),
        ("consent", "recommend", 0),
    ]
    with served.engine.connect() as connection:
        acknowledged = served.outbox.acknowledgements(connection)
    assert {consumer: ack.seq for consumer, ack in acknowledged.items()} == {
        "tagging": 10,
        "recommend": 0,
    }


def test_ack_beyond_the_end_of_the_log_fails_precondition(serve: ServeFactory) -> None:
    served = serve()
    served.append(3)

    with pytest.raises(grpc.RpcError) as failure:
        served.ack(4)

    details = read_error_details(failure.value)
    assert details.code == grpc.StatusCode.FAILED_PRECONDITION
    assert details.precondition_failures[0][2] == "the log ends at seq 3"
    assert served.ack(3) == 3


def test_ack_checks_its_arguments_and_producer(serve: ServeFactory) -> None:
    served = serve()

    with pytest.raises(grpc.RpcError) as invalid:
        served.stub.Ack(events_pb2.AckRequest(producer="consent", seq=-2), timeout=10)
    with pytest.raises(grpc.RpcError) as unknown:
        served.stub.Ack(events_pb2.AckRequest(producer="shop", consumer="x"), timeout=10)

    assert set(read_error_details(invalid.value).field_violations) == {"consumer", "seq"}
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_registration_serves_the_given_logs(engine: Engine) -> None:
    outbox = Outbox("identity", outbox_tables(MetaData()))
    registered = registration({"identity": ProducerLog(outbox, engine)})

    assert registered.name == SERVICE_NAME
    assert registered.servicer.producers == ("identity",)
    with pytest.raises(ValueError, match="outbox of 'identity'"):
        EventLogServicer({"consent": ProducerLog(outbox, engine)})
