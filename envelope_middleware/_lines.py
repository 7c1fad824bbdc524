"""Log lines written to a binary stream, flushed once per event-loop turn.

A logger that flushes every line makes one `write` system call per line: at a
gateway's rate, most of what the access log costs (issue #11). Holding lines
until the event loop's current turn is over writes a busy turn's lines in one
call, and an idle gateway's line as soon as its request is done.
"""

from __future__ import annotations

import asyncio
from typing import BinaryIO


class LineWriter:
    """Write lines to `stream`; flush when the running loop's turn ends, or at once outside a loop.

    Lines are as durable as the loop: a process killed mid-turn loses that
    turn's lines, which a line-by-line flush would have written.
    """

    __slots__ = ("_flush", "_flushing_on", "_write")

    def __init__(self, stream: BinaryIO) -> None:
        self._write = stream.write
        self._flush = stream.flush
        # The loop a flush is scheduled on. A loop closed with the flush still
        # queued (asyncio.run's end) never runs it, so the check is by loop,
        # not a flag: the next loop schedules its own.
        self._flushing_on: asyncio.AbstractEventLoop | None = None

    def write(self, line: bytes) -> None:
        self._write(line)
        # The C accessor: this runs for every line, and get_running_loop() would raise outside a loop.
        loop = asyncio._get_running_loop()  # noqa: SLF001 - public in asyncio.events, re-exported
        if loop is None:
            self._flush()  # a thread or a script: no turn to wait for
        elif loop is not self._flushing_on:
            self._flushing_on = loop
            loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        self._flushing_on = None
        self._flush()
