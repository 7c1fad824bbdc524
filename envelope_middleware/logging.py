"""Log correlation beyond structlog: the request id on stdlib `logging` records."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from envelope_middleware.request_id import get_request_id

__all__ = ["EventLogger", "RequestIdFilter"]


class EventLogger(Protocol):
    """What the middleware logs to: a structlog logger, bound or not.

    Events are a name and fields. structlog's filtering, stdlib and print
    loggers all have these; a stdlib `logging.Logger` does not take fields.
    """

    def info(self, event: str, *args: Any, **fields: Any) -> Any: ...
    def warning(self, event: str, *args: Any, **fields: Any) -> Any: ...
    def error(self, event: str, *args: Any, **fields: Any) -> Any: ...
    def exception(self, event: str, *args: Any, **fields: Any) -> Any: ...


class RequestIdFilter(logging.Filter):
    """Set `record.request_id` on every record (None outside a request).

    Attach it to a handler and use `%(request_id)s` in the format, so lines
    logged with the stdlib `logging` module during a request carry its id.
    The id is read where the filter runs: with a `QueueHandler`, attach it to
    the `QueueHandler`, not to the listener's handlers, which run in another
    thread. An id given with `extra={"request_id": ...}` is kept.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = get_request_id()
        return True
