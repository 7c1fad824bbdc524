"""LineWriter: lines held for FLUSH_DELAY inside a loop, never lost between loops."""

from __future__ import annotations

import asyncio
import threading

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
