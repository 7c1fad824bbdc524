"""Log lines: events rendered as JSON, written to a binary stream flushed at most every FLUSH_DELAY seconds.

The rendering steps are configure_logging's processors; they live here, apart
from the configuration, so that the compiled build compiles them with the
writer (issue #11: they run once per access event).

A logger that flushes every line makes one `write` system call per line. On
the benchmark machine a write costs the gateway more CPU than rendering the
access event (about 10 us against 3, issue #11), whether flushed per line or
once per event-loop turn, since a request's last turn is rarely shared.
Holding lines for a moment writes a busy gateway's lines in a few calls a
second, and an idle gateway's line still reaches the stream within that moment.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import threading
import time
from typing import Any, BinaryIO, Final

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from envelope_middleware._context import Merge

# Long enough to gather a busy gateway's lines into few writes; short enough that
# a person watching the log, or a shipper tailing it, sees no delay.
FLUSH_DELAY: Final = 0.05


class LineWriter:
    """Write lines to `stream`, flushed FLUSH_DELAY seconds after the first one held.

    On a running loop's thread the flush is scheduled on that loop; anywhere
    else (a thread, a script) a line is flushed at once. Lines are as durable
    as the process: one killed (SIGKILL) loses the lines of its last
    FLUSH_DELAY seconds, which a line-by-line flush would have written.
    `flush()` writes what is held; every writer is flushed at exit and before
    the process forks.
    """

    # Not `_thread`: mypyc names the C field `__thread`, a C keyword.
    __slots__ = ("_flush", "_flushing_on", "_loop_thread", "_write")

    def __init__(self, stream: BinaryIO) -> None:
        self._write = stream.write
        self._flush = stream.flush
        # The loop a flush is scheduled on (None when none is), and its thread.
        self._flushing_on: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        _WRITERS.append(self)

    def write(self, line: bytes) -> None:
        self._write(line)
        pending = self._flushing_on
        # Held if a flush is due on a loop running on this thread. Asked of that loop and
        # of the thread, not of asyncio._get_running_loop(): CPython 3.11's calls getpid(),
        # a system call, every time, and this runs for every line (issue #11). A loop
        # closed with its flush pending (asyncio.run's end) never runs it, a stopped one
        # may not run again, and another thread's loop may be blocked: then the line is
        # flushed on this thread's loop, or at once.
        if pending is None or self._loop_thread != threading.get_ident() or not pending.is_running():
            self._schedule()

    def _schedule(self) -> None:
        loop = asyncio._get_running_loop()  # noqa: SLF001 - public in asyncio.events, re-exported
        if loop is None:
            self._flush()  # a thread or a script: nothing will flush it later
        else:
            # Not the loop a flush is due on, or not on its thread: `write` checked.
            self._flushing_on = loop
            self._loop_thread = threading.get_ident()
            loop.call_later(FLUSH_DELAY, self.flush)

    def flush(self) -> None:
        self._flushing_on = None
        self._flush()


# Every writer, for the exit and fork hooks below: a process normally has one, from configure_logging().
_WRITERS: list[LineWriter] = []


def replace_writers(stream: BinaryIO) -> LineWriter:
    """A writer for `stream` in place of every earlier one, which is flushed and forgotten.

    configure_logging() replaces the process's logging configuration, and a
    test suite that configures it per test would otherwise keep every test's
    stream alive (and a file's descriptor open) until it exits. A logger that
    structlog cached under an earlier configuration still writes to its writer,
    which flushes within FLUSH_DELAY, or at once outside a loop, but no longer
    at exit.
    """
    _flush_all()
    _WRITERS.clear()
    return LineWriter(stream)


def _flush_all() -> None:
    # At exit, whichever loop was running; before a fork, so that a child does not
    # write the parent's lines again; and when writers are replaced.
    for writer in _WRITERS:
        # A stream its owner closed has nothing left to write.
        with contextlib.suppress(ValueError, OSError):
            writer.flush()


def _forget_flushes_in_child() -> None:  # pragma: no cover - runs in a forked child, ended by os._exit
    # The parent's loop looks running to the child, which may never run it: the
    # child's first line schedules its own flush, or is flushed at once.
    for writer in _WRITERS:
        writer._flushing_on = None  # noqa: SLF001 - the module's own class


atexit.register(_flush_all)
os.register_at_fork(before=_flush_all, after_in_child=_forget_flushes_in_child)


# structlog's method names as the level each line states (structlog's add_log_level does the same).
_LEVEL_NAMES = {"exception": "error", "warn": "warning", "msg": "info", "fatal": "critical"}
_format_exc_info = structlog.processors.format_exc_info
_LINE = orjson.OPT_APPEND_NEWLINE


def stamp(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
    """Level, time, and the exception as text: one step, not three, since it runs on every event."""
    event_dict["level"] = _LEVEL_NAMES.get(method_name, method_name)
    # Unix time, as structlog's TimeStamper writes by default: an RFC 3339
    # string would cost 0.3 us more per line, a tenth of the access event's budget.
    event_dict["timestamp"] = time.time()
    if "exc_info" in event_dict:
        return _format_exc_info(logger, method_name, event_dict)
    return event_dict


def render(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> bytes:
    try:
        return orjson.dumps(event_dict, default=str, option=_LINE)
    except TypeError:
        return _render_refused(event_dict) + b"\n"


def render_text(_logger: WrappedLogger, _method_name: str, event_dict: EventDict) -> str:
    # A logging.Formatter returns text; the handler adds the newline.
    try:
        return orjson.dumps(event_dict, default=str).decode()
    except TypeError:
        return _render_refused(event_dict).decode()


def _render_refused(event_dict: EventDict) -> bytes:
    # Keys that are not text are tried only once they were refused: orjson's
    # option for them costs about 1.3k instructions on every line (issue #11).
    try:
        return orjson.dumps(event_dict, default=str, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        return _render_anything(event_dict)


def _render_anything(event_dict: EventDict) -> bytes:
    """What orjson refuses even with keys as text: tuple keys, integers past 64 bits, lone surrogates.

    A log call must not fail the request it describes: keys become their
    `str()`, the stdlib writes integers of any size, and what UTF-8 cannot
    hold becomes "?".
    """
    text = json.dumps(_str_keys(event_dict), default=str, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "replace")


# What JsonLines.write returns when the logger's processors are no longer its own.
NOT_WRITTEN: Final = object()


class JsonLines:
    """configure_logging's processors (context, `stamp`, `render`) run as one step for an `info` event.

    structlog's dispatch takes two calls, copies the context and checks what
    the last processor returned, for any processors: about 1.2 us of the
    3 us an event may cost (issue #11). `write` runs these three in one call,
    for as long as the logger's processors are still these.
    """

    __slots__ = ("_chain", "_merge")

    def __init__(self, chain: list[Processor], merge: Merge) -> None:
        # Compared by value: capture_logs() swaps the processors inside the same list.
        self._chain = list(chain)
        self._merge = merge

    def write(self, logger: Any, event: Any, fields: dict[str, Any]) -> object:
        """Write `event` with `fields` as `logger`'s processors would: it is one of this configuration's.

        Returns what the wrapped logger returns, as structlog does, or
        NOT_WRITTEN, with nothing written and `fields` untouched, when the
        logger's processors are no longer these. `fields` becomes the event
        unless the logger has bound context to put first. `event` is anything
        structlog takes (an Enum, an exception), hence untyped: the compiled
        build would check a `str`.
        """
        if logger._processors != self._chain:  # noqa: SLF001 - structlog's bound logger, stable since 20.1
            return NOT_WRITTEN
        context = logger._context  # noqa: SLF001 - as above
        if context:
            # As structlog's own dispatch builds it: the context class's copy, then the fields.
            event_dict = context.copy()
            event_dict.update(fields)
        else:
            event_dict = fields
        if event is not None:  # structlog leaves a None event out
            event_dict["event"] = event
        wrapped = logger._logger  # noqa: SLF001 - as above
        merged = self._merge(wrapped, "info", event_dict)
        return wrapped.info(render(wrapped, "info", stamp(wrapped, "info", merged)))


# The bound logger classes configure_logging() made, each with the JsonLines its
# `info` writes through; the middleware writes its access event the same way
# when its logger is one of them, without the keyword call (issue #11).
JSON_LINES_LOGGERS: dict[type, JsonLines] = {}


def _str_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key if isinstance(key, str) else str(key): _str_keys(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_str_keys(item) for item in value]
    return value
