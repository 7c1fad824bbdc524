"""Log correlation beyond structlog: the request id on stdlib `logging` records."""

from __future__ import annotations

import logging

from envelope_middleware.request_id import get_request_id

__all__ = ["RequestIdFilter"]


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
