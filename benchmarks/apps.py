"""ASGI app factories for the load harness: `uvicorn --app-dir benchmarks apps:<stack> --factory`.

Each serves `GET /orders` with a pre-encoded JSON body of BENCH_BODY_BYTES bytes,
behind the stack's middleware, the same stacks `inprocess.py` measures.
"""

from __future__ import annotations

import os

import orjson
import structlog
from floor import CheckedLayer, LoggedLayer, compiled_layer
from inprocess import payload, quiet_structlog, stacks
from starlette.types import ASGIApp

STACKS = {
    "bare": "bare",
    "correlation_id": "asgi-correlation-id",
    "naive": "naive BaseHTTP + json",
    "envelope_trusted": "ours: trusted + context",
    "envelope_validating": "ours: validating + context",
    "envelope_validating_logged": "ours: validating + context + access log",
}


def _stack(name: str) -> ASGIApp:
    quiet_structlog()
    structlog.get_logger().debug("warm")  # resolve the cached logger once
    body = payload(int(os.environ.get("BENCH_BODY_BYTES", "200")))
    orjson.loads(body)  # the payload must be JSON for every stack
    return stacks(body)[STACKS[name]]


def bare() -> ASGIApp:
    return _stack("bare")


def correlation_id() -> ASGIApp:
    return _stack("correlation_id")


def naive() -> ASGIApp:
    return _stack("naive")


def envelope_trusted() -> ASGIApp:
    return _stack("envelope_trusted")


def envelope_validating() -> ASGIApp:
    return _stack("envelope_validating")


def envelope_validating_logged() -> ASGIApp:
    return _stack("envelope_validating_logged")


def compiled() -> ASGIApp:
    """floor.py's compiled layer around the bare app; load.py builds it into $CFLOOR_DIR."""
    return compiled_layer(_stack("bare"))


def floor() -> ASGIApp:
    """floor.py's `checked` layer around the bare app: the contract's required work, in Python."""
    return CheckedLayer(_stack("bare"))


def floor_logged() -> ASGIApp:
    """`floor`, then one JSON access line per request: the least an access log can cost (issue #11)."""
    return LoggedLayer(_stack("bare"))
