"""How long ``services.testing.steward_suite()`` takes to start and stop the whole suite.

Target (suite issue): startup under 3 seconds, for other teams' integration tests. Each run
starts all four services in this process on a fresh temporary SQLite data directory (so it
includes creating development keys and running every migration), waits until consent answers
``ListPurposes``, and stops. The first run also pays for importing the services. Figures only.

    .venv/bin/python bench/suite_startup.py [--runs 5] [--database-url URL]
"""

from __future__ import annotations

import argparse
import statistics
import time

from steward.consent.v1 import consent_pb2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database-url", default=None, help="default: temporary SQLite files")
    options = parser.parse_args()

    started = time.perf_counter()
    from services.testing import steward_suite

    imported = time.perf_counter() - started
    print(f"import services.testing: {imported:.2f} s")
    starts, stops = [], []
    for run in range(options.runs):
        began = time.perf_counter()
        with steward_suite(database_url=options.database_url) as suite:
            suite.consent.ListPurposes(consent_pb2.ListPurposesRequest(), timeout=10)
            ready = time.perf_counter()
        done = time.perf_counter()
        starts.append(ready - began)
        stops.append(done - ready)
        print(f"run {run + 1}: ready in {ready - began:.2f} s, stopped in {done - ready:.2f} s")
    print(
        f"startup: median {statistics.median(starts):.2f} s, max {max(starts):.2f} s "
        f"(first run incl. import: {imported + starts[0]:.2f} s); "
        f"stop: median {statistics.median(stops):.2f} s"
    )


if __name__ == "__main__":
    main()
