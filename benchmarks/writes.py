"""Keyed writes: what idempotency adds to a write, in process and under load (issue #10).

Every stack is the reference gateway's `PATCH /items/1/availability` (auth,
body validation, a call to the brands service, the envelope). The brands
service runs under uvicorn in a process of its own and is called over HTTP
on loopback, as a gateway calls its services (`--backends in-process` calls
it in the gateway's own process instead, which makes a write far cheaper
than it is in a deployment):

    plain          no idempotency mounted: the write as it runs without it
    memory_first   the embedded store, a new key on every request: claim, run, record
    memory_replay  the embedded store, one key: the claim finds the record, nothing runs
    redis_first    the same as memory_first on Redis (a redis-server on loopback)
    redis_replay   the same as memory_replay on Redis

In process, the stacks are driven in interleaved rounds in a fresh random
order; each stack's cost is the median over rounds of its time per request,
and what it adds is the median of its difference from `plain` in the same
round. Under load, each stack runs under uvicorn (httptools, uvloop, one
worker) and wrk drives it over loopback (`wrk_writes.lua` makes the keys);
Redis's own count of script calls gives the round trips per request.

    python benchmarks/writes.py                 # ~3 minutes
    python benchmarks/writes.py --quick         # a look
    python benchmarks/writes.py --markdown benchmarks/results/writes.md

Needs redis-server and wrk (Debian's packages). Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import redis
from inprocess import code_version, quiet_structlog
from load import free_port, parse_wrk, pinned, stop_server, uvicorn_command
from starlette.types import ASGIApp, Message

from envelope_middleware import MemoryStore
from envelope_middleware.demo import create_backends, create_gateway
from envelope_middleware.idempotency.redis_store import RedisStore

HERE = Path(__file__).resolve().parent
STACKS = ["plain", "memory_first", "memory_replay", "redis_first", "redis_replay"]
AUTH = b"Basic ZGVtb19wYXJ0bmVyOmRlbW9fc2VjcmV0"  # demo_partner:demo_secret
BODY = b'{"available": true}'
PATH = "/items/1/availability"


@contextmanager
def redis_server() -> Iterator[str]:
    """A redis-server of this run's own on a free loopback port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("writes.py needs redis-server (apt-get install redis-server)")
    port = free_port()
    directory = tempfile.mkdtemp(prefix="writes-redis-")
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory]
    process = subprocess.Popen(pinned(command, 1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def gateway(stack: str, redis_url: str | None, brands_url: str | None = None) -> ASGIApp:
    quiet_structlog()
    store: Any = None
    if stack.startswith("memory"):
        store = MemoryStore()
    elif stack.startswith("redis"):
        store = RedisStore.from_url(redis_url or "")
    backends: dict[str, Any] = create_backends()
    if brands_url:
        backends["brands"] = brands_url
    return create_gateway(
        backends, idempotency_store=store, idempotent_writes=stack != "plain", access_log=False
    )


def brands() -> ASGIApp:
    """uvicorn's factory for the brands service on its own (`--backends http`)."""
    return create_backends()["brands"]


@contextmanager
def brands_server(kind: str) -> Iterator[str | None]:
    """The brands service under uvicorn in a process of its own; yields its URL (None: in process)."""
    if kind == "in-process":
        yield None
        return
    port = free_port()
    process = serve_app("writes:brands", port, {}, health=f"http://127.0.0.1:{port}/writes")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_server(process)


# -- in process ------------------------------------------------------------------


class Driver:
    """One started gateway, called as a server would, with keys as its stack wants them."""

    def __init__(self, stack: str, app: ASGIApp) -> None:
        self.stack = stack
        self.app = app
        self.count = 0
        self.lifespan: asyncio.Queue[Message] = asyncio.Queue()

    async def start(self) -> None:
        started = asyncio.Event()

        async def send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                started.set()

        await self.lifespan.put({"type": "lifespan.startup"})
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.ensure_future(self.app(scope, self.lifespan.get, send))
        await started.wait()
        await self.write()  # the replay stacks' one key is recorded here

    async def stop(self) -> None:
        await self.lifespan.put({"type": "lifespan.shutdown"})
        await self.task

    async def write(self) -> int:
        self.count += 1
        key = b"replayed" if self.stack.endswith("replay") else b"k%d" % self.count
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.4"},
            "http_version": "1.1",
            "method": "PATCH",
            "scheme": "http",
            "path": PATH,
            "raw_path": PATH.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [
                (b"authorization", AUTH),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(BODY)),
                (b"idempotency-key", key),
            ],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        status = 0
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": BODY, "more_body": False}
            await asyncio.sleep(3600)
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        await self.app(scope, receive, send)
        return status

    async def batch(self, count: int) -> float:
        started = time.perf_counter()
        for _ in range(count):
            await self.write()
        return (time.perf_counter() - started) / count


def in_process(
    redis_url: str, brands_url: str | None, rounds: int, count: int
) -> dict[str, dict[str, float]]:
    loop = asyncio.new_event_loop()
    drivers = {stack: Driver(stack, gateway(stack, redis_url, brands_url)) for stack in STACKS}
    for driver in drivers.values():
        loop.run_until_complete(driver.start())
        statuses = {loop.run_until_complete(driver.write()) for _ in range(20)}
        if statuses != {200}:
            raise RuntimeError(f"{driver.stack} answered {statuses}")
    times: dict[str, list[float]] = {stack: [] for stack in STACKS}
    added: dict[str, list[float]] = {stack: [] for stack in STACKS}
    for _ in range(rounds):
        order = random.sample(STACKS, len(STACKS))
        this_round = {stack: loop.run_until_complete(drivers[stack].batch(count)) for stack in order}
        for stack in STACKS:
            times[stack].append(this_round[stack])
            added[stack].append(this_round[stack] - this_round["plain"])
    for driver in drivers.values():
        loop.run_until_complete(driver.stop())
    loop.close()
    return {
        stack: {
            "us": statistics.median(times[stack]) * 1e6,
            "added_us": statistics.median(added[stack]) * 1e6,
        }
        for stack in STACKS
    }


# -- under load ------------------------------------------------------------------


def serve(stack: str, redis_url: str, brands_url: str | None, port: int) -> subprocess.Popen[bytes]:
    env = {"BENCH_WRITES_STACK": stack, "BENCH_REDIS_URL": redis_url, "BENCH_BRANDS_URL": brands_url or ""}
    return serve_app("writes:factory", port, env, health=f"http://127.0.0.1:{port}/health")


def serve_app(factory: str, port: int, env: dict[str, str], *, health: str) -> subprocess.Popen[bytes]:
    command = uvicorn_command(factory, port, "--lifespan", "on")
    process = subprocess.Popen(
        pinned(command, 0), env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx2.get(health, timeout=5).raise_for_status()
        except httpx2.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(process)
                raise RuntimeError(f"{factory} did not start") from None
            time.sleep(0.1)
        else:
            return process


def factory() -> ASGIApp:
    """uvicorn's factory for one stack, named by BENCH_WRITES_STACK."""
    return gateway(
        os.environ["BENCH_WRITES_STACK"],
        os.environ.get("BENCH_REDIS_URL"),
        os.environ.get("BENCH_BRANDS_URL"),
    )


def wrk(stack: str, port: int, duration: int, connections: int, run: str) -> dict[str, float]:
    env = {**os.environ, "WRK_KEYS": "same" if stack.endswith("replay") else "unique", "WRK_RUN": run}
    command = [
        "wrk",
        f"-t{min(2, connections)}",  # wrk needs a connection per thread
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(HERE / "wrk_writes.lua"),
        f"http://127.0.0.1:{port}{PATH}",
    ]
    output = subprocess.run(pinned(command, 1), capture_output=True, text=True, check=True, env=env).stdout
    result = parse_wrk(output)
    requests = re.search(r"(\d+) requests in", output)
    result["requests"] = float(requests.group(1)) if requests else 0.0
    return result


def under_load(
    redis_url: str, brands_url: str | None, repeats: int, duration: int, connections: int
) -> dict[str, dict[str, float]]:
    sync = redis.Redis.from_url(redis_url)
    samples: dict[str, list[dict[str, float]]] = {stack: [] for stack in STACKS}
    for repeat in range(repeats):
        for stack in random.sample(STACKS, len(STACKS)):
            port = free_port()
            process = serve(stack, redis_url, brands_url, port)
            try:
                single = wrk(stack, port, duration, 1, run=f"{repeat}-1-{time.time_ns()}")
                sync.config_resetstat()
                result = wrk(stack, port, duration, connections, run=f"{repeat}-{time.time_ns()}")
                result["p50_1"] = single["p50"]
                stats = sync.info("commandstats")
                scripts = sum(
                    int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval")
                )
                result["round_trips"] = scripts / result["requests"] if result["requests"] else 0.0
            finally:
                stop_server(process)
            samples[stack].append(result)
    sync.close()
    report: dict[str, dict[str, float]] = {}
    for stack in STACKS:
        runs = samples[stack]
        report[stack] = {
            name: statistics.median(run[name] for run in runs)
            for name in ("rps", "p50", "p99", "non_2xx", "errors", "round_trips", "p50_1")
        }
    return report


def render(
    inproc: dict[str, dict[str, float]], load: dict[str, dict[str, float]], args: argparse.Namespace
) -> str:
    plain_p50 = load["plain"]["p50"]
    quick = " --quick" if args.quick else ""
    where = "over HTTP, in a process of its own" if args.backends == "http" else "in the gateway's process"
    memory_added = inproc["memory_first"]["added_us"]
    redis_added = load["redis_first"]["p50_1"] - load["plain"]["p50_1"]
    replays = (inproc["memory_replay"]["us"], inproc["redis_replay"]["us"], inproc["plain"]["us"])
    lines = [
        f"# Keyed writes ({code_version()})",
        "",
        (
            f"Command: `python benchmarks/writes.py{quick} --backends {args.backends}`; "
            f"the brands service {where}; "
            f"{args.rounds} interleaved in-process rounds "
            f"of {args.count} writes; {args.repeats} load rounds of {args.duration} s per stack, "
            f"one with 1 connection (latency) and one with {args.connections} (throughput)."
        ),
        "",
        "## In process (µs per write, median over rounds; added = paired difference from plain)",
        "",
        "| stack | µs per write | added µs |",
        "|---|---|---|",
        *(f"| {stack} | {inproc[stack]['us']:.1f} | {inproc[stack]['added_us']:+.1f} |" for stack in STACKS),
        "",
        "## Under load (uvicorn, wrk; medians over rounds)",
        "",
        (
            f"| stack | p50 ms, 1 connection | added | requests/s, {args.connections} connections "
            f"| p50 ms | p99 ms | non-2xx | Redis round trips per request |"
        ),
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {stack} | {row['p50_1']:.3f} | {row['p50_1'] - load['plain']['p50_1']:+.3f} | "
            f"{row['rps']:.0f} | {row['p50']:.2f} | {row['p99']:.2f} | {row['non_2xx']:.0f} | "
            f"{row['round_trips']:.2f} |"
            for stack, row in load.items()
        ),
        "",
        "## Goals (issue #10)",
        "",
        f"- the embedded store adds at most 30 µs to a write in process: {memory_added:+.1f} µs",
        f"- Redis on loopback adds at most 0.5 ms to a first write's p50: {redis_added:+.3f} ms (1 conn.)",
        (
            f"- round trips: {load['redis_first']['round_trips']:.2f} per first write, "
            f"{load['redis_replay']['round_trips']:.2f} per replay (at most 2 and 1 asked)"
        ),
        (
            "- a replay costs less than running the write: in process {:.1f} µs (embedded) and {:.1f} µs "
            "(Redis) against {:.1f} µs".format(*replays)
        ),
        (
            f"- under load, {load['memory_replay']['rps']:.0f} (embedded) and "
            f"{load['redis_replay']['rps']:.0f} (Redis) replays/s against {load['plain']['rps']:.0f} "
            f"writes/s; plain p50 {plain_p50:.2f} ms at {args.connections} connections"
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter runs")
    parser.add_argument("--markdown", help="write the report here too")
    parser.add_argument(
        "--backends",
        choices=["http", "in-process"],
        default="http",
        help="how the gateway reaches its services",
    )
    args = parser.parse_args(argv)
    args.rounds, args.count = (5, 200) if args.quick else (15, 400)
    args.repeats, args.duration, args.connections = (1, 3, 32) if args.quick else (3, 5, 32)
    if shutil.which("wrk") is None:
        raise SystemExit("writes.py needs wrk (apt-get install wrk)")
    with redis_server() as redis_url, brands_server(args.backends) as brands_url:
        inproc = in_process(redis_url, brands_url, args.rounds, args.count)
        redis.Redis.from_url(redis_url).flushdb()
        load = under_load(redis_url, brands_url, args.repeats, args.duration, args.connections)
    text = render(inproc, load, args)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
