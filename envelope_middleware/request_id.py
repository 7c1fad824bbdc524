"""Request ids: how they are made, which incoming ones are trusted, and where to read them."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from typing import Literal, TypeAlias

__all__ = [
    "RequestIdFormat",
    "RequestIdGenerator",
    "get_request_id",
    "hex_request_id",
    "is_safe_request_id",
    "prefixed_uuid_request_id",
]

RequestIdGenerator: TypeAlias = Callable[[], str]
RequestIdFormat: TypeAlias = Literal["hex", "prefixed_uuid"] | RequestIdGenerator

# Every id, generated or received, is spliced unescaped into JSON bodies and
# response headers, so it must hold no quote, backslash, CR/LF or control
# character. This allowlist covers hex ids, `req_<uuid4>`, ULIDs and the usual
# trace-id spellings while leaving no way to break either format.
_SAFE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}", re.ASCII)

_request_id: ContextVar[str | None] = ContextVar("envelope_middleware.request_id", default=None)


# Undrawn hex ids. One `os.urandom` call per request is a system call, about
# 0.6 us on the benchmark machine; drawing 4 KiB at once amortises it to
# nothing. `list.pop` is atomic under the GIL, so two threads never get the
# same id; two threads refilling at once both add fresh ids, none repeated.
_hex_pool: list[str] = []
_HEX_BATCH = 256


def hex_request_id() -> str:
    """Return a production-style id: 32 lowercase hex characters (128 random bits)."""
    try:
        return _hex_pool.pop()
    except IndexError:
        raw = os.urandom(16 * _HEX_BATCH).hex()
        _hex_pool.extend([raw[i : i + 32] for i in range(0, len(raw), 32)])
        return _hex_pool.pop()


# A forked child (gunicorn --preload, multiprocessing) must not reuse the
# parent's undrawn ids: that would give two processes the same ids.
os.register_at_fork(after_in_child=_hex_pool.clear)


def prefixed_uuid_request_id() -> str:
    """Return a development-style id: `req_` followed by a UUID4."""
    return f"req_{uuid.uuid4()}"


def is_safe_request_id(value: str) -> bool:
    """Tell whether `value` may be used as a request id as it is."""
    return _SAFE_ID.fullmatch(value) is not None


def get_request_id() -> str | None:
    """Return the id of the request being handled, or None outside a request."""
    return _request_id.get()


def resolve_generator(request_id_format: RequestIdFormat) -> RequestIdGenerator:
    if request_id_format == "hex":
        return hex_request_id
    if request_id_format == "prefixed_uuid":
        return prefixed_uuid_request_id
    if callable(request_id_format):
        return request_id_format
    raise ValueError(
        f"request_id_format must be 'hex', 'prefixed_uuid' or a callable, not {request_id_format!r}"
    )
