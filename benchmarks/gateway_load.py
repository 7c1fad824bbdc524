"""Load test of the reference gateway: what EnvelopeMiddleware costs it (issue #11).

The gateway (`python -m envelope_middleware.demo`, uvicorn with httptools and
uvloop, one process) runs four ways, against the same backends and driven by
the same wrk requests, and a fifth way over HTTP only:

    logged     the gateway as it ships: the envelope and its access log
    wheel      logged, the package imported from the compiled wheel (scripts/build-wheels)
    unlogged   the envelope without the access log (--no-access-log)
    plain      no EnvelopeMiddleware at all (--no-envelope): the baseline
    httpx2     logged, calling its services with httpx2 (--http-client httpx2): the
               forwarding before issue #11, the baseline of its 2x goal

each once with its backends in process and once calling them over HTTP, as
three uvicorn processes of their own on loopback (the deployed shape), and each
page of `GET /orders?size=2` and `size=100`. All nine gateways and the backends
start once; every round then visits the four (backends, page) pairs in a fresh
random order, and within each pair the gateways in a fresh random order,
one wrk run apiece (after a 1 s warm-up). A variant's ratio is the median over
rounds of its requests/s over the plain gateway's in the same round and pair;
the envelope's share is 1 - ratio. Goal: at most 3% on the small page. The
gateway's own CPU time per request (from /proc) is reported beside it, with
the same ratio computed from it: a neighbour that takes the core away moves
requests/s and not it, though one that shares the core's caches moves both.

    python benchmarks/gateway_load.py                          # ~11 minutes
    python benchmarks/gateway_load.py --duration 3 --repeats 1   # a quick look
    python benchmarks/gateway_load.py --replot                 # redraw the chart from the .json

The gateway is pinned to core 0 and wrk to core 1 (taskset, with two cores or
more); the HTTP backends are not pinned. Writes results/gateway_load.md, .json
and .png. Needs wrk (Debian's package). Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx2
from floor import compiled_wheel_package
from inprocess import code_version
from load import AUTH, RESULTS, cpu_seconds, free_port, launch, stop_server, uvicorn_command, wrk
from starlette.types import ASGIApp

from envelope_middleware.demo import create_backends

VARIANTS = {
    "logged": ("envelope + access log", []),
    # The same gateway importing the compiled wheel (scripts/build-wheels) instead of the checkout.
    "wheel": ("envelope + access log, compiled wheel", []),
    "unlogged": ("envelope, no access log", ["--no-access-log"]),
    "plain": ("no envelope", ["--no-envelope"]),
    # The forwarding before issue #11 (httpx2 over HTTP): the baseline of its 2x goal.
    "httpx2": ("envelope + access log, httpx2 client", ["--http-client", "httpx2"]),
}
BACKENDS = {"in-process": "in-process backends", "http": "HTTP backends"}
PAGES = (2, 100)  # orders per page: GET /orders?size=2 (the goal's small page) and a full page
SERVICES = ("orders", "branches", "brands")
GOAL = 0.97  # the envelope, access log included, keeps 97% of the plain gateway's requests/s
CLIENT_GOAL = 2.0  # aiohttp forwarding serves twice httpx2's requests/s, small page, HTTP backends


def variants(backends: str) -> list[str]:
    """The gateways run against `backends`: the client makes a difference only over HTTP."""
    return [variant for variant in VARIANTS if backends == "http" or variant != "httpx2"]


@dataclass
class Row:
    backends: str
    page: int
    variant: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    errors: int
    # Median over rounds of this variant's req/s over the plain gateway's in the same
    # round, for the same backends and page; and the lowest and highest of those ratios.
    vs_plain: float
    vs_plain_low: float
    vs_plain_high: float
    # The gateway process's own CPU time (user + system) per request, and the median over
    # rounds of the plain gateway's over this one's: the req/s ratio that CPU time allows,
    # which other processes on the machine disturb far less than req/s itself.
    cpu_us: float
    vs_plain_cpu: float
    busy: float  # the gateway's CPU time over the run's wall time: 1.0 is a saturated core
    body_bytes: int  # of one answer
    round_rps: list[float] = field(default_factory=list)  # each round's req/s, in round order


def backend() -> ASGIApp:
    """uvicorn's factory for one demo service on its own, named by BENCH_SERVICE."""
    return create_backends()[os.environ["BENCH_SERVICE"]]


@contextmanager
def services() -> Iterator[list[str]]:
    """The three demo services, a uvicorn process each (not pinned); yields the gateway's --backend flags."""
    with ExitStack() as stack:
        flags: list[str] = []
        for name in SERVICES:
            port = free_port()
            command = uvicorn_command("gateway_load:backend", port)
            ready = f"http://127.0.0.1:{port}/{name}"
            process = launch(command, ready, core=None, env={"BENCH_SERVICE": name})
            stack.callback(stop_server, process)
            flags += ["--backend", f"{name}=http://127.0.0.1:{port}"]
        yield flags


def start_gateway(
    variant: str, backend_flags: list[str]
) -> tuple[int, subprocess.Popen[bytes], dict[int, int]]:
    """One gateway on core 0, its access log (if on) to /dev/null; checks its answers' shape.

    Returns its port, its process and the size in bytes of each page's answer.
    """
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "envelope_middleware.demo",
        "--port",
        str(port),
        *VARIANTS[variant][1],
        *backend_flags,
    ]
    ready = f"http://127.0.0.1:{port}/health"
    if variant == "wheel":
        # `python -m` puts the working directory first on sys.path: the unpacked wheel, in
        # the checkout's place. No PYTHONPATH: one more entry on sys.path would cost every
        # failed import (httpx2's in-process transport tries one per request) a lookup more.
        process = launch(command, ready, core=0, cwd=Path(os.environ["WHEEL_DIR"]))
    else:
        process = launch(command, ready, core=0)
    sizes: dict[int, int] = {}
    for page in PAGES:
        response = httpx2.get(page_url(port, page), headers=AUTH, timeout=5)
        response.raise_for_status()
        if ("request_id" in response.json()) != (variant != "plain"):
            stop_server(process)
            raise RuntimeError(f"the {variant} gateway answered {response.text[:200]}")
        sizes[page] = len(response.content)
    return port, process, sizes


def page_url(port: int, page: int) -> str:
    return f"http://127.0.0.1:{port}/orders?size={page}"


Cell = tuple[str, int, str]  # backends, page, variant


def measure(args: argparse.Namespace) -> list[Row]:
    pairs = [(backends, page) for backends in BACKENDS for page in PAGES]
    samples: dict[Cell, list[dict[str, float]]] = {
        (backends, page, variant): [] for backends, page in pairs for variant in variants(backends)
    }
    gateways: dict[tuple[str, str], tuple[int, subprocess.Popen[bytes]]] = {}
    body_bytes: dict[Cell, int] = {}
    with ExitStack() as stack:
        backend_flags = {"in-process": [], "http": stack.enter_context(services())}
        for backends in BACKENDS:
            for variant in variants(backends):
                port, process, sizes = start_gateway(variant, backend_flags[backends])
                stack.callback(stop_server, process)
                gateways[backends, variant] = port, process
                body_bytes.update({(backends, page, variant): size for page, size in sizes.items()})
        for repeat in range(args.repeats):
            for backends, page in random.sample(pairs, len(pairs)):
                for variant in random.sample(variants(backends), len(variants(backends))):
                    port, process = gateways[backends, variant]
                    result = drive(page_url(port, page), process, args)
                    samples[backends, page, variant].append(result)
                    print(
                        f"#{repeat + 1} {BACKENDS[backends]:<19} size={page:<3} "
                        f"{VARIANTS[variant][0]:<23} {result['rps']:>7.0f} req/s "
                        f"p50 {result['p50']:.2f} ms p99 {result['p99']:.2f} ms "
                        f"{result['cpu_us']:.0f} µs CPU/request",
                        file=sys.stderr,
                    )
    return [
        summarise(samples, (backends, page, variant), body_bytes[backends, page, variant])
        for backends, page in pairs
        for variant in variants(backends)
    ]


def drive(url: str, process: subprocess.Popen[bytes], args: argparse.Namespace) -> dict[str, float]:
    """One wrk run after a 1 s warm-up, with the gateway's CPU time over it."""
    wrk(url, 1, args.connections, args.threads)
    cpu, started = cpu_seconds(process), time.monotonic()
    result = wrk(url, args.duration, args.connections, args.threads)
    cpu, elapsed = cpu_seconds(process) - cpu, time.monotonic() - started
    result["cpu_us"] = cpu / result["requests"] * 1e6
    result["busy"] = cpu / elapsed
    return result


def summarise(samples: dict[Cell, list[dict[str, float]]], cell: Cell, body_bytes: int) -> Row:
    backends, page, variant = cell
    runs, plain = samples[cell], samples[backends, page, "plain"]
    ratios = [s["rps"] / base["rps"] for s, base in zip(runs, plain, strict=True)]
    cpu_ratios = [base["cpu_us"] / s["cpu_us"] for s, base in zip(runs, plain, strict=True)]
    return Row(
        backends=backends,
        page=page,
        variant=variant,
        requests_per_s=statistics.median(s["rps"] for s in runs),
        p50_ms=statistics.median(s["p50"] for s in runs),
        p99_ms=statistics.median(s["p99"] for s in runs),
        non_2xx=int(sum(s["non_2xx"] for s in runs)),
        errors=int(sum(s["errors"] for s in runs)),
        vs_plain=statistics.median(ratios),
        vs_plain_low=min(ratios),
        vs_plain_high=max(ratios),
        cpu_us=statistics.median(s["cpu_us"] for s in runs),
        vs_plain_cpu=statistics.median(cpu_ratios),
        busy=statistics.median(s["busy"] for s in runs),
        body_bytes=body_bytes,
        round_rps=[s["rps"] for s in runs],
    )


def report(rows: list[Row], args: argparse.Namespace, version: str) -> str:
    lines = [
        f"# The reference gateway with and without the envelope ({version})",
        "",
        (
            "Command: `python benchmarks/gateway_load.py "
            f"--duration {args.duration} --repeats {args.repeats}`. "
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
            "The gateway: `python -m envelope_middleware.demo` (uvicorn, one process, httptools, uvloop) "
            f"on core 0; `wrk -t{args.threads} -c{args.connections} -d{args.duration}s` on core 1; "
            "the HTTP backends: three uvicorn processes (orders, branches, brands; only orders "
            "is called here), not pinned, so they share both cores with the gateway and wrk. "
            "The access log goes to the gateway's stdout, here /dev/null: what it costs is "
            "rendering each JSON line and its write(2), not a disk or a log shipper's pipe."
        ),
        "",
        (
            f"Median of {args.repeats} rounds; each round visits the (backends, page) pairs in a "
            "fresh random order, and within a pair the gateways in a fresh random order. "
            "`vs no envelope` is the median over rounds of the ratio of requests/s to the gateway "
            "without EnvelopeMiddleware in the same round; `share` is 1 - that ratio; `rounds` "
            "gives the lowest and highest of the per-round ratios. `CPU µs` is the gateway "
            "process's own CPU time (user + system, from /proc) per request and `by CPU` the "
            "median per-round ratio of the baseline's to it: the requests/s ratio that CPU time "
            "allows, which other processes on the machine disturb far less. `busy` is the "
            "gateway's CPU time over the run's wall time (1.00: a saturated core)."
        ),
        "",
        (
            "| backends | page | gateway | body B | req/s | vs no envelope | share | rounds "
            "| CPU µs | by CPU | busy | p50 ms | p99 ms | non-2xx | socket errors |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {BACKENDS[r.backends]} | size={r.page} | {VARIANTS[r.variant][0]} | {r.body_bytes} | "
        f"{r.requests_per_s:.0f} | {r.vs_plain:.3f} | {1 - r.vs_plain:+.1%} | "
        f"{r.vs_plain_low:.3f}-{r.vs_plain_high:.3f} | {r.cpu_us:.0f} | {r.vs_plain_cpu:.3f} | "
        f"{r.busy:.2f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.non_2xx} | {r.errors} |"
        for r in rows
    )
    lines += [
        "",
        (
            f"Goal (issue #11): the envelope, access log included, keeps at least {GOAL:.0%} of the "
            f"gateway's requests/s on the small page (`size={PAGES[0]}`):"
        ),
        "",
    ]
    for r in rows:
        if r.page == PAGES[0] and r.variant in ("logged", "wheel"):
            lines.append(
                f"- {BACKENDS[r.backends]}, {VARIANTS[r.variant][0]}: {r.vs_plain:.3f} "
                f"(share {1 - r.vs_plain:.1%}, rounds "
                f"{r.vs_plain_low:.3f}-{r.vs_plain_high:.3f}): {met(r.vs_plain)}; "
                f"by CPU time {r.vs_plain_cpu:.3f} (share {1 - r.vs_plain_cpu:.1%}): {met(r.vs_plain_cpu)}"
            )
    small = {r.variant: r for r in rows if r.backends == "http" and r.page == PAGES[0]}
    speedup = [a / b for a, b in zip(small["logged"].round_rps, small["httpx2"].round_rps, strict=True)]
    ratio = statistics.median(speedup)
    lines += [
        "",
        (
            f"Goal (issue #11): with HTTP backends, the gateway (aiohttp) serves at least {CLIENT_GOAL:.0f}x "
            f"the requests/s of the forwarding before it (httpx2) on the small page: {ratio:.2f}x "
            f"(rounds {min(speedup):.2f}-{max(speedup):.2f}; "
            f"{small['logged'].requests_per_s:.0f} against {small['httpx2'].requests_per_s:.0f} req/s): "
            f"{'met' if ratio >= CLIENT_GOAL else 'not met'}"
        ),
    ]
    return "\n".join(lines)


def met(ratio: float) -> str:
    return "met" if ratio >= GOAL else "not met"


def chart(rows: list[Row], path: Path) -> None:
    import matplotlib as mpl  # noqa: PLC0415 - only the report needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, len(BACKENDS), figsize=(11, 4.8), sharey=True)
    # The rounds' range can reach far on a busy machine: the axis stops short of wild ones.
    lowest = min(min(r.vs_plain_low, r.vs_plain_cpu) for r in rows)
    highest = max(max(r.vs_plain_high, r.vs_plain_cpu) for r in rows)
    for axis, backends in zip(axes, BACKENDS, strict=True):
        enveloped = [variant for variant in variants(backends) if variant != "plain"]
        width = 0.8 / len(enveloped)
        for index, variant in enumerate(enveloped):
            by_page = {r.page: r for r in rows if r.backends == backends and r.variant == variant}
            xs = [i + (index - (len(enveloped) - 1) / 2) * width for i in range(len(PAGES))]
            ratios = [by_page[page].vs_plain for page in PAGES]
            spread = [
                [by_page[page].vs_plain - by_page[page].vs_plain_low for page in PAGES],
                [by_page[page].vs_plain_high - by_page[page].vs_plain for page in PAGES],
            ]
            bars = axis.bar(xs, ratios, width, yerr=spread, capsize=4, label=VARIANTS[variant][0])
            axis.bar_label(bars, fmt="%.3f", padding=2, fontsize=8)
            axis.scatter(
                xs,
                [by_page[page].vs_plain_cpu for page in PAGES],
                marker="D",
                color="black",
                zorder=3,
                label="by CPU time per request" if index == 0 else None,
            )
        axis.axhline(1.0, color="black", linewidth=0.8, label="no envelope (1.0)")
        axis.axhline(GOAL, color="tab:red", linestyle="--", linewidth=1, label="goal: at most 3% (0.97)")
        axis.set_xticks(range(len(PAGES)), [f"GET /orders?size={page}" for page in PAGES])
        axis.set_title(BACKENDS[backends])
        axis.grid(axis="y", alpha=0.3)
        axis.set_ylim(max(0.5, min(0.9, lowest - 0.02)), min(1.2, max(1.04, highest + 0.02)))
    axes[0].set_ylabel("requests/s relative to the gateway without the envelope")
    figure.suptitle(
        "Reference gateway: what EnvelopeMiddleware keeps of its requests/s (bars: rounds' range)"
    )
    figure.legend(*axes[-1].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds of wrk per run")
    parser.add_argument("--repeats", type=int, default=8, help="interleaved rounds")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--output", default=str(RESULTS / "gateway_load"), help="path prefix for .md, .json, .png"
    )
    parser.add_argument("--replot", action="store_true", help="redraw the chart from the .json of a run")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.replot:
        rows = [Row(**row) for row in json.loads(output.with_suffix(".json").read_text())]
        chart(rows, output.with_suffix(".png"))
        return 0
    if shutil.which("wrk") is None:
        print("wrk is not installed: on Debian or Ubuntu, `apt-get install wrk`", file=sys.stderr)
        return 2
    version = code_version()  # before the gateways start: the code they load
    os.environ["WHEEL_DIR"] = compiled_wheel_package()
    rows = measure(args)
    text = report(rows, args, version)
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text(text + "\n")
    output.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    chart(rows, output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
