"""Load test: each stack under uvicorn (httptools, uvloop), driven by wrk over loopback.

For every body size the stacks are started in turn, in a fresh random order
per repetition, and each gets the same fixed-time wrk run. Reported per stack
and size: requests/s, p50 and p99 latency (medians over repetitions), peak RSS
of the server, and the ratio of requests/s to the bare app's.

    python benchmarks/load.py                        # all stacks and sizes, ~20 minutes
    python benchmarks/load.py --duration 3 --repeats 1 --sizes 200B   # a quick look
    python benchmarks/load.py --workers 2
    python benchmarks/load.py --sizes 200B --stacks compiled   # floor.py's compiled layer, opt-in
    python benchmarks/load.py --sizes 200B --stacks floor compiled wheel envelope_validating

The reference gateway, with and without the envelope, has a benchmark of its
own: gateway_load.py.

wrk comes from Debian's package (`apt-get install wrk`). The server and wrk are
pinned to separate cores with taskset when the machine has two or more.
Only loopback addresses are used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx2
from floor import build_compiled_layer, compiled_wheel_package
from inprocess import code_version

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
SIZES = {"200B": 200, "100KB": 100_000, "1MB": 1_000_000}
STACKS = [
    "bare",
    "correlation_id",
    "naive",
    "envelope_trusted",
    "envelope_validating",
    "envelope_validating_logged",
]
# Not run unless named, since they answer one question (what would a faster
# implementation keep under load?) rather than compare stacks a user would mount:
# floor.py's `checked` layer (the contract's required work in Python) and the same
# in C (needs a C compiler), both serving only this benchmark's response shape;
# and EnvelopeMiddleware, validating, from the compiled wheel (scripts/build-wheels),
# with and without its access log.
OPT_IN = ["floor", "floor_logged", "compiled", "wheel", "wheel_logged"]
LABELS = {
    "bare": "bare Starlette",
    "correlation_id": "asgi-correlation-id",
    "naive": "naive BaseHTTP + json",
    "envelope_trusted": "envelope, trusted",
    "envelope_validating": "envelope, validating",
    "envelope_validating_logged": "envelope, validating + access log",
    "floor": "Python floor (floor.py's checked)",
    "floor_logged": "Python floor + one log line (floor.py)",
    "compiled": "compiled floor (C, floor.py)",
    "wheel": "envelope, validating, compiled wheel",
    "wheel_logged": "envelope, validating + access log, compiled wheel",
}
# The app factory in apps.py each stack is served by, where it is not the stack's own name.
FACTORY = {"wheel": "envelope_validating", "wheel_logged": "envelope_validating_logged"}
# The reference gateway's credentials (demo_partner:demo_secret), as wrk_auth.lua sends them.
AUTH = {"Authorization": "Basic ZGVtb19wYXJ0bmVyOmRlbW9fc2VjcmV0"}


@dataclass
class Run:
    stack: str
    size: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    peak_rss_mb: float
    non_2xx: int
    errors: int
    # Median over rounds of (this stack's req/s / the bare app's in the same round):
    # pairing cancels the drift between rounds that a ratio of medians keeps.
    vs_bare: float
    # The server's own CPU time per request, and the median over rounds of the bare
    # app's over this one's: the req/s ratio that CPU time allows. A busy neighbour
    # slows a server down without making its requests take more of its own CPU time,
    # so on a shared machine this ratio moves less than the req/s one.
    cpu_us: float
    vs_bare_cpu: float
    round_rps: list[float] = field(default_factory=list)  # each round's req/s, in round order


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def pinned(command: list[str], core: int) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) >= 2:
        return ["taskset", "-c", str(core), *command]
    return command


def start_server(
    stack: str, size: str, port: int, workers: int, *, under: Sequence[str] = (), timeout: float = 30
) -> subprocess.Popen[bytes]:
    """Serve `stack` at `size` on `port`; `under` is a command the server runs under (valgrind)."""
    # The compiled wheel is unpacked elsewhere; `python -m` puts the working
    # directory first on sys.path, so it is both that and PYTHONPATH.
    root = Path(os.environ["WHEEL_DIR"]) if stack in FACTORY else ROOT
    # The interface is said, not detected: the compiled layer is no coroutine function.
    command = uvicorn_command(
        f"apps:{FACTORY.get(stack, stack)}", port, "--workers", str(workers), "--interface", "asgi3"
    )
    env = {"BENCH_BODY_BYTES": str(SIZES[size]), "PYTHONPATH": str(root)}
    ready = f"http://127.0.0.1:{port}/orders"
    return launch([*under, *command], ready, core=0, env=env, cwd=root, timeout=timeout)


def launch(
    command: list[str],
    ready: str,
    *,
    core: int | None,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    timeout: float = 30,
) -> subprocess.Popen[bytes]:
    """Start a server, pinned to `core` (None: where the scheduler puts it); return once `ready` answers.

    Its stdout goes to /dev/null: what a server logs there costs it the rendering
    and the write, nothing more.
    """
    process = subprocess.Popen(
        command if core is None else pinned(command, core),
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=cwd,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx2.get(ready, headers=AUTH, timeout=5).raise_for_status()
        except httpx2.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_server(process)
                stderr = process.stderr.read().decode() if process.stderr else ""
                raise RuntimeError(f"{' '.join(command)} did not start: {stderr}") from None
            time.sleep(0.1)
        else:
            return process


def uvicorn_command(factory: str, port: int, *options: str) -> list[str]:
    """uvicorn serving `factory` from benchmarks/ on loopback, as every load run serves an app."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        factory,
        "--factory",
        "--app-dir",
        str(HERE),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--http",
        "httptools",
        "--loop",
        "uvloop",
        "--log-level",
        "warning",
        "--no-access-log",
        *options,
    ]


def peak_rss_mb(process: subprocess.Popen[bytes]) -> float:
    """VmHWM of the server and its worker processes, in MiB."""
    pids = [process.pid]
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    if children.exists():
        pids += [int(pid) for pid in children.read_text().split()]
    total_kb = 0
    for pid in pids:
        status = Path(f"/proc/{pid}/status")
        if status.exists():
            match = re.search(r"VmHWM:\s+(\d+) kB", status.read_text())
            total_kb += int(match.group(1)) if match else 0
    return total_kb / 1024


def cpu_seconds(process: subprocess.Popen[bytes]) -> float:
    """User and system CPU time of the process, all its threads, from /proc."""
    # The fields after the command's closing parenthesis start at the third, the state.
    fields = Path(f"/proc/{process.pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wrk(url: str, duration: int, connections: int, threads: int) -> dict[str, float]:
    script = HERE / "wrk_auth.lua"
    command = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    output = subprocess.run(pinned(command, 1), capture_output=True, text=True, check=True).stdout
    return parse_wrk(output)


def parse_wrk(output: str) -> dict[str, float]:
    def latency(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
        if not match:
            raise ValueError(f"no {label}% latency in wrk output:\n{output}")
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    requests = re.search(r"(\d+) requests in", output)
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if rps is None or requests is None:
        raise ValueError(f"no Requests/sec or request count in wrk output:\n{output}")
    return {
        "rps": float(rps.group(1)),
        "requests": float(requests.group(1)),
        "p50": latency("50"),
        "p99": latency("99"),
        "non_2xx": float(non_2xx.group(1)) if non_2xx else 0.0,
        "errors": float(sum(int(g) for g in errors.groups())) if errors else 0.0,
    }


def measure(args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    for size in args.sizes:
        samples: dict[str, list[dict[str, float]]] = {stack: [] for stack in args.stacks}
        rss: dict[str, float] = {}
        for repeat in range(args.repeats):
            order = list(args.stacks)
            random.shuffle(order)
            for stack in order:
                port = free_port()
                process = start_server(stack, size, port, args.workers)
                try:
                    url = f"http://127.0.0.1:{port}/orders"
                    wrk(url, 1, args.connections, args.threads)  # warm-up
                    cpu = cpu_seconds(process)
                    result = wrk(url, args.duration, args.connections, args.threads)
                    result["cpu_us"] = (cpu_seconds(process) - cpu) / result["requests"] * 1e6
                    rss[stack] = max(rss.get(stack, 0.0), peak_rss_mb(process))
                finally:
                    stop_server(process)
                samples[stack].append(result)
                print(
                    f"{size:>6} #{repeat + 1} {LABELS[stack]:<36} {result['rps']:>9.0f} req/s "
                    f"p50 {result['p50']:.2f} ms p99 {result['p99']:.2f} ms",
                    file=sys.stderr,
                )
        bare = samples["bare"]
        runs.extend(
            Run(
                stack=stack,
                size=size,
                requests_per_s=statistics.median(s["rps"] for s in samples[stack]),
                p50_ms=statistics.median(s["p50"] for s in samples[stack]),
                p99_ms=statistics.median(s["p99"] for s in samples[stack]),
                peak_rss_mb=rss[stack],
                non_2xx=int(sum(s["non_2xx"] for s in samples[stack])),
                errors=int(sum(s["errors"] for s in samples[stack])),
                vs_bare=statistics.median(
                    s["rps"] / base["rps"] for s, base in zip(samples[stack], bare, strict=True)
                ),
                cpu_us=statistics.median(s["cpu_us"] for s in samples[stack]),
                vs_bare_cpu=statistics.median(
                    base["cpu_us"] / s["cpu_us"] for s, base in zip(samples[stack], bare, strict=True)
                ),
                round_rps=[s["rps"] for s in samples[stack]],
            )
            for stack in args.stacks
        )
    return runs


def table(runs: list[Run], args: argparse.Namespace) -> str:
    lines = [
        (
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
            f"{code_version()}; "
            f"uvicorn ({args.workers} worker(s), httptools, uvloop) on core 0, "
            f"`wrk -t{args.threads} -c{args.connections} -d{args.duration}s` on core 1; "
            f"median of {args.repeats} interleaved rounds; vs bare is the median of the "
            "per-round ratios to the bare app; CPU is the server's own CPU time per request "
            "(/proc), and its vs bare the bare app's over the stack's, per round: the ratio "
            "that CPU time allows, which a busy neighbour on the machine moves less."
        ),
        "",
        (
            "| size | stack | req/s | vs bare | CPU µs/request | vs bare by CPU | p50 ms | p99 ms "
            "| peak RSS MiB | non-2xx | socket errors |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r.size} | {LABELS[r.stack]} | {r.requests_per_s:.0f} | {r.vs_bare:.2f} | {r.cpu_us:.1f} | "
        f"{r.vs_bare_cpu:.2f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.peak_rss_mb:.0f} | "
        f"{r.non_2xx} | {r.errors} |"
        for r in runs
    )
    return "\n".join(lines)


def chart(runs: list[Run], path: Path) -> None:
    import matplotlib as mpl  # noqa: PLC0415 - only the report needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    sizes = list(dict.fromkeys(r.size for r in runs))
    stacks = list(dict.fromkeys(r.stack for r in runs))
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(stacks)
    for index, stack in enumerate(stacks):
        by_size = {r.size: r for r in runs if r.stack == stack}
        xs = [i + index * width for i in range(len(sizes))]
        axes[0].bar(xs, [by_size[s].vs_bare for s in sizes], width, label=LABELS[stack])
        axes[1].bar(xs, [by_size[s].peak_rss_mb for s in sizes], width, label=LABELS[stack])
    for axis, title in zip(axes, ["requests/s relative to bare Starlette", "peak RSS (MiB)"], strict=True):
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], sizes)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=6, help="seconds of wrk per run")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--stacks", nargs="+", choices=STACKS + OPT_IN, default=STACKS)
    parser.add_argument("--output", default=str(RESULTS / "load"), help="path prefix for .md, .json, .png")
    parser.add_argument("--replot", action="store_true", help="redraw the chart from the .json of a run")
    args = parser.parse_args(argv)
    output = Path(args.output)
    if args.replot:
        chart(
            [Run(**row) for row in json.loads(output.with_suffix(".json").read_text())],
            output.with_suffix(".png"),
        )
        return 0
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: on Debian or Ubuntu, `apt-get install wrk`",
            file=sys.stderr,
        )
        return 2
    if "bare" not in args.stacks:
        args.stacks.insert(0, "bare")
    if "compiled" in args.stacks:
        os.environ["CFLOOR_DIR"] = build_compiled_layer()  # inherited by the servers
    if FACTORY.keys() & set(args.stacks):
        os.environ["WHEEL_DIR"] = compiled_wheel_package()
    runs = measure(args)
    text = table(runs, args)
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".md").write_text(text + "\n")
    output.with_suffix(".json").write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    chart(runs, output.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
