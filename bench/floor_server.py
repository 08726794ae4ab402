"""The floor under a Steward service's latency: its server kit answering with a stored answer.

Started by ``harness.floor_server``. It is built the way ``steward serve`` builds a service
(``build_server`` with the suite's interceptors, tracing, the concurrency limit and error
mapping, and the serving process's collector settings), but its one method answers every call
with the bytes of a file and does nothing else, or, with ``--work-us``, first keeps the
interpreter busy for that much CPU time (a stand-in for a handler's own work, holding the GIL as
Python code does). What a bench measures against it is what gRPC, Python and the shared machine
cost before the service does any work of its own, and how much work per call the rate leaves
room for, so a service's figures can be read against the floor measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import grpc

from services.cli import GC_THRESHOLDS
from services.common.config import Settings
from services.common.server import ServiceRegistration, build_server, serve
from services.common.telemetry import setup_telemetry
from services.runtime import call_interceptors


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", required=True, help="/package.Service/Method")
    parser.add_argument("--answer", type=Path, required=True, help="the serialized answer")
    parser.add_argument("--work-us", type=float, default=0.0, help="CPU time spent per call")
    args = parser.parse_args()

    service, method = args.method.strip("/").split("/")
    answer: bytes = args.answer.read_bytes()
    work = args.work_us / 1e6
    clock = time.thread_time

    def answer_stored(_request: bytes, _context: grpc.ServicerContext) -> bytes:
        if work > 0:
            until = clock() + work
            while clock() < until:
                pass
        return answer

    def add_to_server(_servicer: Any, server: grpc.Server) -> None:
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    service, {method: grpc.unary_unary_rpc_method_handler(answer_stored)}
                )
            ]
        )

    settings = Settings.from_env()
    telemetry = setup_telemetry(settings, "steward-floor")
    built = build_server(
        [ServiceRegistration(service, add_to_server, None)],
        host="127.0.0.1",
        port=args.port,
        max_message_bytes=settings.max_message_bytes,
        interceptors=call_interceptors(settings, telemetry),
        max_workers=settings.max_workers,
    )

    def started() -> None:
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)

    serve(built.server, built.health, settings.grace_seconds, on_started=started)
    telemetry.shutdown()


if __name__ == "__main__":
    main()
