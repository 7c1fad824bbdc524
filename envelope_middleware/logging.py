"""Logging for a gateway: a fast JSON-lines set-up, and the request id on stdlib records.

`configure_logging()` is the recommended production set-up. Its events go
through a structlog pipeline of three steps (context; level, time and
exception; orjson) run by a bound logger that skips the generic dispatch
(about 1.2 us of the 3 us an event may cost, issue #11), into a `LineWriter`
that flushes 50 ms after the first line it holds, not line by line. Stdlib records (uvicorn's, a client
library's) are rendered as the same JSON lines, with the request id.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

import structlog
from structlog.typing import EventDict, Processor

from envelope_middleware._context import Merge, context_merger
from envelope_middleware._lines import (
    JSON_LINES_LOGGERS,
    NOT_WRITTEN,
    JsonLines,
    LineWriter,
    render,
    render_text,
    replace_writers,
    stamp,
)
from envelope_middleware.request_id import get_request_id

__all__ = ["EventLogger", "RequestIdFilter", "configure_logging"]


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


def configure_logging(level: int | str = logging.INFO, *, stream: BinaryIO | None = None) -> None:
    """Configure structlog and the stdlib root logger for JSON lines, each with the request id.

    Every line is one JSON object: the event's fields, the request's bound
    context (`request_id`, `method`, `path` and whatever the app binds),
    `level`, and `timestamp` (Unix time, seconds). Exceptions are rendered as
    text under `exception`. Lines go to `stream` (default: standard output)
    and are flushed 50 ms after the first line held, not line by line (a
    write costs more than the rendering): a process killed (SIGKILL) loses
    its last 50 ms of lines. Values JSON cannot hold are
    written as their `str()`.

    Calling it again replaces the configuration: the previous stream is
    flushed and no longer referenced. A logger structlog cached before that
    (a module-level one used already) still writes there, flushed within
    50 ms, but no longer at exit.

    uvicorn's error log (`uvicorn`, `uvicorn.error`) is taken over from the
    configuration uvicorn gave it, when that came first (`uvicorn app:app`
    configures logging before it imports the app). Run uvicorn with its access
    log off (`--no-access-log`): the middleware's `http_request` event is the
    access log.
    """
    names = structlog.processors.NAME_TO_LEVEL
    min_level = names.get(level.lower(), -1) if isinstance(level, str) else level
    if min_level not in names.values():
        # structlog's filtering loggers exist for the standard levels only.
        raise ValueError(f"level must be a standard logging level (name or number), not {level!r}")
    lines = replace_writers(stream if stream is not None else sys.stdout.buffer)
    # The earlier configurations' loggers are no longer the middleware's to write
    # through (their own `info` still does), and no longer kept alive here.
    JSON_LINES_LOGGERS.clear()
    merge = context_merger()
    chain: list[Processor] = [merge, stamp, render]
    structlog.configure(
        processors=chain,
        wrapper_class=_bound_logger_class(min_level, chain, merge),
        logger_factory=_LineLoggerFactory(lines),
        cache_logger_on_first_use=True,
    )
    handler = _LineHandler(lines)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            # The record's exc_info is put in the event after this chain. Its `extra`
            # fields come first, so that a request_id given there is kept.
            foreign_pre_chain=[_add_record_extras, merge, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, stamp, render_text],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(min_level)
    for name in _TAKEN_OVER:
        # uvicorn's own configuration gives these handlers of their own and
        # stops them at themselves: their lines would be neither JSON nor carry ids.
        taken = logging.getLogger(name)
        taken.handlers.clear()
        taken.propagate = True


_TAKEN_OVER = ("uvicorn", "uvicorn.error")

# A record's own attributes, on every Python this runs on; the rest came from `extra=`.
# uvicorn's `color_message` is its message again, with terminal colours.
_RECORD_ATTRIBUTES = frozenset(
    {*vars(logging.LogRecord("", 0, "", 0, "", (), None)), "message", "asctime", "color_message"}
)


def _add_record_extras(_logger: Any, _method_name: str, event_dict: EventDict) -> EventDict:
    """A stdlib record's `extra=` fields, as structlog's ExtraAdder adds them; uvicorn's colours left out."""
    # ProcessorFormatter puts the record there before its pre-chain runs. A None says
    # nothing (RequestIdFilter's request_id outside a request); `level`, `timestamp`,
    # `logger` and `exception` are the line's own, set after this.
    for key, value in vars(event_dict["_record"]).items():
        if value is not None and key not in _RECORD_ATTRIBUTES and key not in event_dict:
            event_dict[key] = value
    return event_dict


class _LineLogger:
    """structlog's wrapped logger: every level method writes the rendered line as it is."""

    __slots__ = _METHODS = (
        "critical",
        "debug",
        "error",
        "exception",
        "fatal",
        "info",
        "log",
        "msg",
        "warn",
        "warning",
    )

    def __init__(self, lines: LineWriter) -> None:
        # The writer's method itself, not a method calling it: one call less per line.
        for name in self._METHODS:
            setattr(self, name, lines.write)


class _LineLoggerFactory:
    def __init__(self, lines: LineWriter) -> None:
        self.logger = _LineLogger(lines)

    def __call__(self, *_args: Any) -> _LineLogger:
        return self.logger


class _LineHandler(logging.Handler):
    """A stdlib handler writing formatted records as lines of the same writer."""

    def __init__(self, lines: LineWriter) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.write(self.format(record).encode() + b"\n")
        except Exception:
            self.handleError(record)


def _bound_logger_class(min_level: int, chain: list[Processor], merge: Merge) -> type[Any]:
    """structlog's filtering logger for `min_level`, with a short `info` for `chain`.

    `info` (the access event's level, once per request) runs `chain` through
    `JsonLines`. The other levels, and `info` with positional arguments or
    any other processors (`capture_logs` in tests, a later `configure`), take
    structlog's own path.
    """
    filtering: type[Any] = structlog.make_filtering_bound_logger(min_level)
    if min_level > logging.INFO:
        return filtering
    generic_info: Callable[..., Any] = filtering.info
    lines = JsonLines(chain, merge)

    def info(self: Any, event: Any, *args: Any, **fields: Any) -> Any:
        if not args:
            written = lines.write(self, event, fields)
            if written is not NOT_WRITTEN:
                return written
        return generic_info(self, event, *args, **fields)

    bound: type[Any] = type("JsonLinesBoundLogger", (filtering,), {"info": info, "msg": info})
    JSON_LINES_LOGGERS[bound] = lines
    return bound
