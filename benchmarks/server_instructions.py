"""Instructions per request of load.py's stacks as uvicorn serves them over loopback (issue #11).

load.py's requests/s move with whatever else the machine runs: on a shared
2-core machine a round can be 1.6x another, and the server's CPU time per
request moves with them (the neighbours share its caches). This counts what
the server process executes instead: uvicorn (httptools, uvloop) serving a
stack at 200 B, run under valgrind's callgrind with a fixed hash seed, sent N
requests one after another on one keep-alive connection after a warm-up,
against the same server sent none. The difference over N is each request's
whole path through the server (the socket reads and writes, HTTP parsing,
Starlette, the stack), repeatable to within 1% whatever else the machine does
(uvicorn's timers and the access log's 50 ms flushes run by the clock, so a
run slowed down counts a few more of them per request); "vs bare" is the bare
app's count over the stack's, the requests/s ratio those instructions allow.

What it cannot show is what a count leaves out: cache misses, and the batching
of many connections' requests into one turn of the loop, which load.py's 64
connections give and one connection does not.

    python benchmarks/server_instructions.py        # needs valgrind; about 10 minutes
    python benchmarks/server_instructions.py --markdown benchmarks/results/server_instructions.md
"""

from __future__ import annotations

import argparse
import http.client
import os
import platform
import shutil
import signal
import sys
from pathlib import Path

from floor import CALLGRIND, build_compiled_layer, collected, compiled_wheel_package, publish
from inprocess import code_version
from load import AUTH, FACTORY, LABELS, free_port, start_server

DEFAULT_STACKS = [
    "bare",
    "correlation_id",
    "envelope_trusted",
    "envelope_validating",
    "envelope_validating_logged",
    "floor",
    "floor_logged",
    "wheel",
    "wheel_logged",
]
WARM_UP = 100


def count(stack: str, requests: int) -> int:
    """Instructions the server of `stack` runs from start to exit, sent `requests` after the warm-up."""
    port = free_port()
    # Python under callgrind starts about fifty times slower.
    process = start_server(stack, "200B", port, 1, under=CALLGRIND, timeout=300)
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for _ in range(WARM_UP + requests):
            connection.request("GET", "/orders", headers=AUTH)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{stack} answered {response.status}")
        connection.close()
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    return collected(stderr.decode())


def report(costs: dict[str, float], requests: int) -> str:
    bare = costs["bare"]
    lines = [
        f"Python {platform.python_version()}, {code_version()}.",
        "",
        (
            "Instructions per request of the uvicorn server (httptools, uvloop) serving each stack at "
            f"200 B (callgrind, PYTHONHASHSEED=0, {requests} requests on one keep-alive connection "
            f"after {WARM_UP} to warm up, against the warm-up alone); vs bare is the bare app's count "
            "over the stack's."
        ),
        "",
        "| stack | instructions per request | added to the bare app | vs bare |",
        "|---|---|---|---|",
    ]
    for stack, cost in costs.items():
        added = "" if stack == "bare" else f"+{(cost - bare) / 1000:.1f}k"
        lines.append(f"| {LABELS[stack]} | {cost / 1000:.1f}k | {added} | {bare / cost:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="requests counted, after the warm-up")
    parser.add_argument("--stacks", nargs="+", choices=list(LABELS), default=DEFAULT_STACKS)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: on Debian or Ubuntu, `apt-get install valgrind`", file=sys.stderr)
        return 2
    stacks = ["bare", *(stack for stack in args.stacks if stack != "bare")]
    os.environ["PYTHONHASHSEED"] = "0"  # inherited by the servers: the same dict layouts every run
    if "compiled" in stacks:
        os.environ["CFLOOR_DIR"] = build_compiled_layer()  # inherited by the servers
    if FACTORY.keys() & set(stacks):
        os.environ["WHEEL_DIR"] = compiled_wheel_package()
    costs: dict[str, float] = {}
    for stack in stacks:
        costs[stack] = (count(stack, args.requests) - count(stack, 0)) / args.requests
        print(f"{LABELS[stack]:<52} {costs[stack] / 1000:8.1f}k", file=sys.stderr)
    text = report(costs, args.requests)
    publish(text, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
