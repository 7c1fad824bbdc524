"""Per-request cost in process, for quick comparisons while developing (pytest-benchmark).

    .venv/bin/python -m pytest benchmarks/test_microbench.py

Each group holds one body size; pytest-benchmark prints each stack's time
with its ratio to the fastest, the bare app, measured in the same run.
Times are reported, never asserted: this machine is too noisy for that.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest
import structlog
from inprocess import SCOPE, payload, quiet_structlog, receive, send, stacks
from pytest_benchmark.fixture import BenchmarkFixture

BATCH = 50  # requests per timed call: the times shown are for 50 requests
STACKS = [
    "bare",
    "asgi-correlation-id",
    "buffered byte splice",
    "ours: trusted + context",
    "ours: validating + context",
    "ours: validating + context + access log",
]


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    quiet_structlog()
    event_loop = asyncio.new_event_loop()
    yield event_loop
    event_loop.close()
    structlog.reset_defaults()


@pytest.mark.parametrize("size", [200, 100_000], ids=["200B", "100KB"])
@pytest.mark.parametrize("stack", STACKS)
def test_microbench_request(
    benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop, stack: str, size: int
) -> None:
    app = stacks(payload(size))[stack]
    benchmark.group = f"{BATCH} requests, {size} B body"

    async def batch() -> None:
        # A batch per call: starting the event loop costs more than one request.
        for _ in range(BATCH):
            await app({**SCOPE, "state": {}}, receive, send)

    run: Callable[[], None] = lambda: loop.run_until_complete(batch())  # noqa: E731 - the benchmarked call
    benchmark.pedantic(run, rounds=100, iterations=3, warmup_rounds=5)
