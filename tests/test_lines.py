"""LineWriter: lines held for FLUSH_DELAY inside a loop, never lost between loops."""

from __future__ import annotations

import asyncio
import os
import threading
import warnings

from envelope_middleware._lines import FLUSH_DELAY, LineWriter
from tests.test_logging_setup import Stream


def test_line_writer_holds_lines_for_its_delay_then_writes_them_in_one_flush() -> None:
    out = Stream()
    writer = LineWriter(out)
    seen: list[int] = []

    async def main() -> None:
        writer.write(b"a\n")
        await asyncio.sleep(0)
        writer.write(b"b\n")
        seen.append(out.flushes)  # turns have passed, the delay has not
        await asyncio.sleep(FLUSH_DELAY * 2)
        seen.append(out.flushes)
        writer.write(b"c\n")
        await asyncio.sleep(FLUSH_DELAY * 2)
        seen.append(out.flushes)

    asyncio.run(main())
    assert seen == [0, 1, 2]
    assert out.getvalue() == b"a\nb\nc\n"


def test_line_writer_still_flushes_after_a_loop_closed_with_its_flush_pending() -> None:
    out = Stream()
    writer = LineWriter(out)

    async def write(line: bytes) -> None:
        writer.write(line)

    loop = asyncio.new_event_loop()
    task = loop.create_task(write(b"lost turn\n"))
    loop.call_soon(loop.stop)  # stops after the turn that schedules the flush, long before it is due
    loop.run_forever()
    loop.close()
    assert task.done()
    assert out.flushes == 0

    async def write_and_wait(line: bytes) -> None:
        writer.write(line)
        await asyncio.sleep(FLUSH_DELAY * 2)

    asyncio.run(write_and_wait(b"next loop\n"))
    assert out.flushes == 1
    assert out.getvalue() == b"lost turn\nnext loop\n"


def test_line_writer_flushes_at_once_in_a_thread_without_a_loop() -> None:
    out = Stream()
    writer = LineWriter(out)
    thread = threading.Thread(target=writer.write, args=(b"from a worker thread\n",))
    thread.start()
    thread.join()
    assert out.flushes == 1
    assert out.getvalue() == b"from a worker thread\n"


def test_line_writer_flushes_a_threads_line_at_once_while_the_loop_holds_its_own() -> None:
    out = Stream()
    writer = LineWriter(out)
    seen: list[int] = []

    async def main() -> None:
        writer.write(b"from the loop\n")
        seen.append(out.flushes)  # held: its flush is due on this loop
        # The loop is blocked here, joining: the thread's line must not wait for it.
        thread = threading.Thread(target=writer.write, args=(b"from a worker thread\n",))
        thread.start()
        thread.join()
        seen.append(out.flushes)

    asyncio.run(main())
    assert seen == [0, 1]
    assert out.getvalue() == b"from the loop\nfrom a worker thread\n"


def test_line_writer_flushes_at_once_outside_a_loop_stopped_with_its_flush_pending() -> None:
    out = Stream()
    writer = LineWriter(out)

    async def write(line: bytes) -> None:
        writer.write(line)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(write(b"in the loop\n"))  # the loop stops, open, flush pending
        assert out.flushes == 0
        writer.write(b"after it stopped\n")
        assert out.flushes == 1
        assert out.getvalue() == b"in the loop\nafter it stopped\n"
    finally:
        loop.close()


def test_line_writer_in_a_child_forked_with_a_flush_pending_flushes_its_own_lines() -> None:
    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "wb")
    writer = LineWriter(stream)

    async def fork_with_a_flush_pending() -> int:
        writer.write(b"parent\n")  # held: its flush is due on this loop
        with warnings.catch_warnings():
            # Python 3.12 warns of fork() in a process with threads; this child runs no thread.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: no loop runs here, so its line is flushed at once
            writer.write(b"child\n")
            os._exit(0)  # no exit handlers, no buffers flushed: only what was written
        return pid

    pid = asyncio.run(fork_with_a_flush_pending())
    assert os.waitpid(pid, 0)[1] == 0
    stream.close()
    with os.fdopen(read_end, "rb") as pipe:
        written = pipe.read()
    # The parent's held line was flushed before the fork, once; the child's at once.
    assert written == b"parent\nchild\n"
