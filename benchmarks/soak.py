"""Soak: minutes of mixed load on the reference gateway, checking every answer.

Starts the gateway (uvicorn, loopback only, its backends on their own ports)
and drives it with concurrent clients over a mix of success and error routes
for a bounded time. It checks that every response is a valid envelope whose
request_id matches its header, that every status is the one the route should
give, and that the server's memory stays flat (resident set sampled every few
seconds; the growth between the first and last quarter of the run, after
warm-up, must stay under a bound).

Some clients send keyed writes and retry them, one after another or two at
once (issue #10): each answer must be the first run, a replay of it, or the
in-progress 409. At the end the brands service's count of the writes it
applied must equal the number of distinct keys: each ran exactly once.

    python benchmarks/soak.py                  # 3 minutes
    python benchmarks/soak.py --duration 30    # a short look

Exit status 0 when every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inprocess import code_version
from load import free_port, stop_server

FULL = ("demo_partner", "demo_secret")
READ_ONLY = ("demo_readonly", "readonly_secret")
# (weight, method, path, auth, json body, expected status, expected error code or None)
ROUTES: list[tuple[int, str, str, tuple[str, str] | None, object, int, str | None]] = [
    (30, "GET", "/orders?page=3&size=20", FULL, None, 200, None),
    (10, "GET", "/orders/ord_00042", FULL, None, 200, None),
    (10, "GET", "/branches?size=10", FULL, None, 200, None),
    (10, "GET", "/brands", FULL, None, 200, None),
    (5, "GET", "/orders/ord_99999", FULL, None, 404, "resource_not_found"),
    (5, "GET", "/orders", None, None, 401, "auth_missing"),
    (3, "GET", "/orders", ("demo_partner", "nope"), None, 401, "auth_invalid_credential"),
    (3, "GET", "/brands", READ_ONLY, None, 403, "auth_forbidden"),
    (5, "GET", "/orders?brand_id=1", FULL, None, 400, "request_invalid"),
    (3, "PATCH", "/items/13/availability", FULL, {"available": True}, 422, "state_invalid_transition"),
    (3, "GET", "/orders/ord_crash", FULL, None, 500, "internal"),
    (3, "GET", "/orders/ord_garbled", FULL, None, 502, "downstream_invalid_response"),
    (1, "GET", "/orders/ord_slow", FULL, None, 504, "downstream_timeout"),
    (3, "DELETE", "/orders", FULL, None, 405, "method_not_allowed"),
    (1, "GET", "/health", None, None, 200, None),
]


@dataclass
class Tally:
    ok: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


def check(response: httpx2.Response, path: str, status: int, code: str | None) -> str | None:
    """Why this response breaks the contract, or None."""
    if response.status_code != status:
        return f"{path}: status {response.status_code}, expected {status}"
    ids = response.headers.get_list("x-request-id")
    if len(ids) != 1 or not re.fullmatch(r"[0-9a-f]{32}", ids[0]):
        return f"{path}: X-Request-ID {ids!r}"
    document = orjson.loads(response.content)
    if path == "/health":
        return None if document == {"status": "ok"} else f"{path}: {document!r}"
    if document.get("request_id") != ids[0]:
        return f"{path}: body request_id {document.get('request_id')!r} != header {ids[0]!r}"
    if code is None:
        return None if set(document) == {"request_id", "data"} else f"{path}: keys {sorted(document)}"
    error = document.get("error", {})
    if set(document) != {"request_id", "error"} or set(error) != {"code", "message", "details"}:
        return f"{path}: error shape {document!r}"
    return None if error["code"] == code else f"{path}: code {error['code']}, expected {code}"


async def client_loop(base: str, deadline: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    weights = [route[0] for route in ROUTES]
    async with httpx2.AsyncClient(base_url=base, timeout=10) as client:
        while time.monotonic() < deadline:
            _, method, path, auth, body, status, code = rng.choices(ROUTES, weights)[0]
            # Writes require a key; these are each their own operation.
            headers = {"Idempotency-Key": f"once-{seed}-{rng.random()}"} if method == "PATCH" else None
            started = time.perf_counter()
            try:
                response = await client.request(method, path, auth=auth, json=body, headers=headers)
            except httpx2.HTTPError as exc:
                tally.failures.append(f"{path}: {type(exc).__name__}")
                continue
            tally.latencies.append(time.perf_counter() - started)
            problem = check(response, path, status, code)
            if problem:
                tally.failures.append(problem)
            else:
                tally.ok[f"{method} {path} -> {status}"] += 1


@dataclass
class Keyed:
    """Keyed writes sent, and the keys whose write must have run once."""

    keys: set[str] = field(default_factory=set)
    attempts: int = 0


async def keyed_writes_loop(base: str, deadline: float, tally: Tally, keyed: Keyed, seed: int) -> None:
    rng = random.Random(seed)
    count = 0
    async with httpx2.AsyncClient(base_url=base, timeout=10) as client:
        while time.monotonic() < deadline:
            count += 1
            key = f"soak-{seed}-{count}"
            item = rng.choice([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
            body = {"available": rng.random() < 0.5}

            async def attempt(key: str = key, item: int = item, body: dict[str, bool] = body) -> None:
                headers = {"Idempotency-Key": key}
                try:
                    response = await client.patch(
                        f"/items/{item}/availability", json=body, headers=headers, auth=FULL
                    )
                except httpx2.HTTPError as exc:
                    tally.failures.append(f"keyed write: {type(exc).__name__}")
                    return
                keyed.attempts += 1
                problem = check(response, "keyed write", response.status_code, None)
                if response.status_code == 409:
                    problem = check(response, "keyed write", 409, "idempotency_key_conflict")
                    if problem is None and response.json()["error"]["details"] != {"reason": "in_progress"}:
                        problem = f"keyed write: 409 {response.json()['error']['details']}"
                elif response.status_code != 200:
                    problem = f"keyed write: status {response.status_code}"
                if problem:
                    tally.failures.append(problem)
                else:
                    replayed = response.headers.get("idempotent-replayed") == "true"
                    tally.ok[f"keyed PATCH -> {response.status_code}{' replay' if replayed else ''}"] += 1

            keyed.keys.add(key)
            # The retry a partner makes: after the answer, or racing the first attempt.
            if rng.random() < 0.3:
                await asyncio.gather(attempt(), attempt())
            else:
                await attempt()
            for _ in range(rng.choice([0, 1, 2])):
                await attempt()


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


async def soak(
    base: str, pid: int, duration: float, concurrency: int, *, sample_every: float, keyed: Keyed
) -> tuple[Tally, list[float]]:
    tally = Tally()
    samples: list[float] = []
    deadline = time.monotonic() + duration

    async def sampler() -> None:
        while time.monotonic() < deadline:
            samples.append(rss_mb(pid))
            await asyncio.sleep(sample_every)

    writers = max(1, concurrency // 4)
    await asyncio.gather(
        sampler(),
        *(client_loop(base, deadline, tally, seed) for seed in range(concurrency - writers)),
        *(keyed_writes_loop(base, deadline, tally, keyed, seed) for seed in range(writers)),
    )
    return tally, samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=180, help="seconds of load (bounded)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-growth-mb", type=float, default=15.0, help="allowed RSS growth after warm-up")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "soak.md"))
    args = parser.parse_args(argv)
    duration = min(args.duration, 1800)  # a soak here is bounded, whatever is asked
    port, backend_port = free_port(), free_port()
    while backend_port <= port < backend_port + 3 or backend_port > 65533:
        backend_port = free_port()
    command = [
        sys.executable,
        "-m",
        "envelope_middleware.demo",
        "--port",
        str(port),
        "--timeout",
        "0.5",
        "--serve-backends",
        "--backend-port",
        str(backend_port),
        # Bounded well below a soak's writes, so that memory levels off here too
        # (and eviction runs under load) rather than grow until the default bound.
        "--idempotency-max-entries",
        "5000",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ}
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                httpx2.get(f"{base}/health")
                break
            except httpx2.TransportError:
                time.sleep(0.1)
        keyed = Keyed()
        tally, samples = asyncio.run(
            soak(base, process.pid, duration, args.concurrency, sample_every=2.0, keyed=keyed)
        )
        # The brands service is the third of --serve-backends' ports.
        executed = httpx2.get(f"http://127.0.0.1:{backend_port + 2}/writes").json()["executed"]
    finally:
        stop_server(process)
    if executed != len(keyed.keys):
        tally.failures.append(f"keyed writes: {executed} executed for {len(keyed.keys)} distinct keys")

    quarter = max(1, len(samples) // 4)
    warm = samples[quarter:]  # the first quarter is warm-up: caches, pools, allocator arenas
    early, late = (
        statistics.median(warm[: max(1, len(warm) // 3)]),
        statistics.median(warm[-max(1, len(warm) // 3) :]),
    )
    growth = late - early
    total = sum(tally.ok.values()) + len(tally.failures)
    latencies = sorted(tally.latencies)
    p99 = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else 0.0
    lines = [
        (
            f"Soak of the reference gateway ({code_version()}): {duration:.0f} s, "
            f"{args.concurrency} concurrent clients, "
            f"{total} requests ({total / duration:.0f}/s), p99 {p99:.1f} ms."
        ),
        "",
        f"- responses breaking the contract or the expected status: {len(tally.failures)}",
        (
            f"- keyed writes: {len(keyed.keys)} distinct keys in {keyed.attempts} attempts (retries and "
            f"races included); the brands service applied {executed}: each key ran exactly once"
            if executed == len(keyed.keys)
            else f"- keyed writes: {len(keyed.keys)} distinct keys, but {executed} applied"
        ),
        (
            f"- RSS: {samples[0]:.1f} MiB at start, {early:.1f} after warm-up, {late:.1f} at the end, "
            f"max {max(samples):.1f} (growth after warm-up {growth:+.1f} MiB, bound {args.max_growth_mb} MiB)"
        ),
        "",
        "| request -> expected status | checked responses |",
        "|---|---|",
        *(f"| {path} | {count} |" for path, count in sorted(tally.ok.items())),
    ]
    if tally.failures:
        lines += ["", "First failures:", *(f"- {f}" for f in tally.failures[:20])]
    text = "\n".join(lines)
    print(text)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text + "\n")
    return 0 if not tally.failures and growth <= args.max_growth_mb else 1


if __name__ == "__main__":
    raise SystemExit(main())
