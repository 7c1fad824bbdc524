"""configure_logging(): the recommended production set-up, read back as JSON lines."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import io
import logging
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from structlog.contextvars import bound_contextvars

from envelope_middleware import EnvelopeMiddleware, configure_logging
from envelope_middleware._lines import FLUSH_DELAY, render
from tests.conftest import body, drive, plain_structlog, scripted, start


def app_log() -> Any:
    # A logger per use: with configure_logging's caching, a module-level proxy
    # would keep writing to the first test's stream.
    return structlog.get_logger("app")


class Stream(io.BytesIO):
    """A binary stream that counts its flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()

    def lines(self) -> list[dict[str, Any]]:
        # TestClient's own client logs each request it makes: not the app's lines.
        lines = [orjson.loads(line) for line in self.getvalue().splitlines()]
        return [line for line in lines if line.get("logger") != "httpx2"]


@contextlib.contextmanager
def configured(level: int | str = logging.INFO) -> Iterator[Stream]:
    """configure_logging() into a Stream; the loggers it changes restored after."""
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    out = Stream()
    configure_logging(level, stream=out)
    try:
        yield out
    finally:
        for logger, (handlers, level_was, propagate) in zip(loggers, saved, strict=True):
            logger.handlers[:] = handlers
            logger.setLevel(level_was)
            logger.propagate = propagate
        plain_structlog()


@pytest.fixture
def stream() -> Iterator[Stream]:
    with configured() as out:
        yield out


async def orders(request: Request) -> Response:
    app_log().info("orders_listed", count=2)
    logging.getLogger("legacy.module").warning("from the stdlib")
    return JSONResponse({"orders": [1, 2]})


async def crash(request: Request) -> Response:
    raise RuntimeError("db-7.internal refused")


def gateway() -> EnvelopeMiddleware:
    return EnvelopeMiddleware(Starlette(routes=[Route("/orders", orders), Route("/crash", crash)]))


def test_configure_logging_writes_every_line_of_a_request_as_json_with_its_id(stream: Stream) -> None:
    before = time.time()
    with TestClient(gateway()) as client:
        response = client.get("/orders")
    request_id = response.headers["x-request-id"]
    app_line, stdlib_line, access = stream.lines()
    assert app_line == {
        "event": "orders_listed",
        "count": 2,
        "request_id": request_id,
        "method": "GET",
        "path": "/orders",
        "level": "info",
        "timestamp": app_line["timestamp"],
    }
    assert stdlib_line["event"] == "from the stdlib"
    assert stdlib_line["logger"] == "legacy.module"
    assert stdlib_line["level"] == "warning"
    assert stdlib_line["request_id"] == request_id
    assert access["event"] == "http_request"
    assert access["request_id"] == request_id
    assert access["status"] == 200
    assert access["bytes_sent"] == len(response.content)
    assert access["error_code"] is None
    assert isinstance(access["duration_ms"], float)
    assert access["level"] == "info"
    for line in (app_line, stdlib_line, access):
        assert before <= line["timestamp"] <= time.time()


def test_configure_logging_writes_the_traceback_to_the_log_and_not_to_the_partner(stream: Stream) -> None:
    with TestClient(gateway(), raise_server_exceptions=False) as client:
        response = client.get("/crash")
    assert response.status_code == 500
    assert b"db-7" not in response.content
    # Starlette's error middleware answers the 500 and re-raises: the middleware logs it as it passes.
    (failure,) = [line for line in stream.lines() if "exception" in line]
    assert failure["request_id"] == response.headers["x-request-id"]
    assert failure["level"] == "error"
    assert "RuntimeError: db-7.internal refused" in failure["exception"]
    assert "exc_info" not in failure


def test_configure_logging_renders_a_stdlib_records_exception(stream: Stream) -> None:
    try:
        int("bad frame")
    except ValueError:
        logging.getLogger("uvicorn.error").exception("connection failed")
    (line,) = stream.lines()
    assert line["event"] == "connection failed"
    assert line["logger"] == "uvicorn.error"
    assert line["level"] == "error"
    assert "ValueError: invalid literal for int()" in line["exception"]


def test_configure_logging_keeps_bound_and_context_fields_with_the_events_own_first(stream: Stream) -> None:
    with bound_contextvars(tenant="acme", status="from-context"):
        app_log().bind(partner="p1").info("written", status="from-event")
    (line,) = stream.lines()
    assert line["tenant"] == "acme"
    assert line["partner"] == "p1"
    assert line["status"] == "from-event"


def test_configure_logging_writes_values_json_cannot_hold_as_text(stream: Stream) -> None:
    class Money:
        def __str__(self) -> str:
            return "12.50 EUR"

    app_log().info("charged", amount=Money(), by_id={7: "seven"})
    (line,) = stream.lines()
    assert line["amount"] == "12.50 EUR"
    assert line["by_id"] == {"7": "seven"}


def test_configure_logging_interpolates_positional_arguments(stream: Stream) -> None:
    app_log().info("%d orders for %s", 3, "acme")
    app_log().warning("%s left", "partner")
    assert [line["event"] for line in stream.lines()] == ["3 orders for acme", "partner left"]


def test_configure_logging_drops_events_below_its_level() -> None:
    with configured("WARNING") as out:
        with TestClient(gateway()) as client:
            client.get("/orders")
        logging.getLogger("legacy.module").info("not written")
    assert [line["event"] for line in out.lines()] == ["from the stdlib"]


def test_configure_logging_takes_over_uvicorns_own_logging_configuration() -> None:
    uvicorn.config.Config(app=gateway(), log_config=uvicorn.config.LOGGING_CONFIG)  # as `uvicorn app:app`
    with configured() as out:
        logging.getLogger("uvicorn.error").info("Started server process")
    (line,) = out.lines()
    assert line["event"] == "Started server process"
    assert line["logger"] == "uvicorn.error"


def test_configure_logging_keeps_lines_a_handler_fails_to_write_from_raising(
    stream: Stream, capsys: pytest.CaptureFixture[str]
) -> None:
    stream.close()  # a closed stream: writing raises ValueError
    logging.getLogger("legacy.module").warning("lost")
    assert "--- Logging error ---" in capsys.readouterr().err  # logging's own report, not an exception


def test_configure_logging_leaves_structlogs_capture_logs_working(stream: Stream) -> None:
    with structlog.testing.capture_logs() as captured:
        app_log().info("captured", n=1)
    assert captured == [{"event": "captured", "n": 1, "log_level": "info"}]
    assert stream.getvalue() == b""


# Keys an app or a logger may bind, the access event's own among them.
_CONTEXT = st.dictionaries(
    st.sampled_from(["tenant", "event", "status", "request_id", "level", "path", "trace"]),
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=6),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=5,
    ),
    max_size=4,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    bound=_CONTEXT,
    logger_context=_CONTEXT,
    status=st.sampled_from([200, 201, 204, 404, 409, 500, 503]),
    path=st.text(min_size=1, max_size=12).map(lambda text: "/" + text),
)
def test_configure_logging_access_line_is_what_structlogs_own_dispatch_writes(
    bound: dict[str, Any], logger_context: dict[str, Any], status: int, path: str
) -> None:
    # The middleware writes its access event straight through configure_logging's
    # processors; with them wrapped, structlog dispatches the same event itself.
    payload = b"" if status == 204 else b'{"n":1}'
    answer = [start(status, [(b"content-type", b"application/json")]), body(payload)]
    with configured() as out:
        logger = structlog.get_logger("gateway").bind(**logger_context)
        app = EnvelopeMiddleware(scripted(*answer), logger=logger, trust_request_id=True)
        headers = [("x-request-id", "partner-retry-7")]
        processors = structlog.get_config()["processors"]
        chain = processors[:]
        with bound_contextvars(**bound):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(type(logger), "info", _not_called)
                drive(app, "GET", path, headers=headers)
            processors[:] = [*chain[:-1], _render_too]
            try:
                drive(app, "GET", path, headers=headers)
            finally:
                processors[:] = chain
        direct, dispatched = (line for line in out.lines() if line["event"] == "http_request")
    for line in (direct, dispatched):
        assert isinstance(line.pop("timestamp"), float)
        assert isinstance(line.pop("duration_ms"), float)
    assert list(direct.items()) == list(dispatched.items())  # the same fields, in the same order
    assert direct["request_id"] == "partner-retry-7"
    assert direct["status"] == status


class Audit(enum.Enum):
    ORDER_PLACED = "order_placed"


def test_configure_logging_writes_events_that_are_not_text_as_structlog_does(stream: Stream) -> None:
    # structlog takes any event; the compiled build must not insist on a str.
    async def place(request: Request) -> Response:
        app_log().info(Audit.ORDER_PLACED, order=7)
        return JSONResponse({"ok": True})

    app = EnvelopeMiddleware(Starlette(routes=[Route("/place", place)]))
    with TestClient(app) as client:
        assert client.get("/place").status_code == 200
    app_log().info(ValueError("stock ran out"), sku="sku-1")
    app_log().info(None, n=1)
    placed, error, unnamed = (line for line in stream.lines() if line.get("event") != "http_request")
    assert (placed["event"], placed["order"]) == ("order_placed", 7)
    assert (error["event"], error["sku"]) == ("stock ran out", "sku-1")
    assert "event" not in unnamed  # as structlog's own dispatch leaves a None event out
    assert unnamed["n"] == 1


def test_configure_logging_info_returns_what_the_wrapped_logger_returns() -> None:
    with configured():
        # A later configure that changes only the factory keeps configure_logging's processors.
        structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
        line = structlog.get_logger().info("order_placed", n=1)
        warned = structlog.get_logger().warning("order_placed", n=1)
    assert isinstance(line, bytes)
    assert isinstance(warned, bytes)
    assert orjson.loads(line)["level"] == "info"
    assert orjson.loads(line).keys() == orjson.loads(warned).keys()


def test_configure_logging_access_line_copies_the_context_as_its_context_class_does() -> None:
    # structlog builds an event from the context class's copy() and update(); a
    # context class need not support `**` (structlog.threadlocal's does not).
    import structlog.threadlocal  # noqa: PLC0415 - deprecated, imported for this test only

    with pytest.warns(DeprecationWarning, match="threadlocal"):
        context_class = structlog.threadlocal.wrap_dict(dict)
    with configured() as out:
        structlog.configure(context_class=context_class)
        logger = structlog.get_logger("gateway").bind(tenant="acme")
        app = EnvelopeMiddleware(scripted(start(200), body(b'{"n":1}')), logger=logger)
        drive(app)
    (access,) = (line for line in out.lines() if line["event"] == "http_request")
    assert access["tenant"] == "acme"
    assert access["status"] == 200


def _render_too(logger: Any, method_name: str, event_dict: Any) -> bytes:
    # configure_logging's last step under another name: no longer its processors.
    return render(logger, method_name, event_dict)


def _not_called(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("the access event went through the logger's info()")


async def test_configure_logging_writes_a_busy_moments_lines_in_one_flush(stream: Stream) -> None:
    for n in range(50):
        app_log().info("line", n=n)
        await asyncio.sleep(0)  # each line in a turn of its own
    assert stream.flushes == 0
    await asyncio.sleep(FLUSH_DELAY * 2)
    assert stream.flushes == 1
    assert [line["n"] for line in stream.lines()] == list(range(50))


def test_configure_logging_flushes_what_it_holds_when_the_process_exits(tmp_path: Path) -> None:
    # A stream that writes out only when flushed: a file would also be written by
    # its own finalisation, whether or not the writer flushed it.
    script = (
        "import asyncio, structlog\n"
        "from envelope_middleware import configure_logging\n"
        "class Held:\n"
        "    pending = b''\n"
        "    def write(self, line):\n"
        "        self.pending += line\n"
        "    def flush(self):\n"
        f"        with open({str(tmp_path / 'log')!r}, 'ab') as out:\n"
        "            out.write(self.pending)\n"
        "        self.pending = b''\n"
        "configure_logging(stream=Held())\n"
        "async def main():\n"
        "    structlog.get_logger().info('last words')\n"  # the loop ends before the flush is due
        "asyncio.run(main())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
    assert orjson.loads((tmp_path / "log").read_bytes())["event"] == "last words"


async def test_configure_logging_again_flushes_the_previous_stream_and_lets_it_go() -> None:
    with configured() as first:
        app_log().info("held")  # in a running loop: flushed FLUSH_DELAY later
        assert first.flushes == 0
        configure_logging(stream=Stream())
        assert first.flushes == 1
        assert [line["event"] for line in first.lines()] == ["held"]
        await asyncio.sleep(FLUSH_DELAY * 2)  # the flush it had scheduled has run
    released = weakref.ref(first)
    del first
    gc.collect()
    assert released() is None


def test_configure_logging_again_releases_the_previous_configurations_logger_class() -> None:
    replaced = []
    for _ in range(3):
        with configured():
            replaced.append(weakref.ref(structlog.get_config()["wrapper_class"]))
    with configured() as out:
        gc.collect()
        assert [cls() for cls in replaced] == [None, None, None]
        # The current one still writes the access line through its own path.
        drive(EnvelopeMiddleware(scripted(start(204), body())))
        assert [line["event"] for line in out.lines()] == ["http_request"]


def test_configure_logging_keeps_a_stdlib_records_extra_fields(stream: Stream) -> None:
    async def legacy(request: Request) -> Response:
        log = logging.getLogger("legacy.module")
        log.warning("shipped", extra={"order_id": "ord_1"})
        log.warning("relayed", extra={"request_id": "from-the-caller", "nothing": None})
        return JSONResponse({})

    with TestClient(EnvelopeMiddleware(Starlette(routes=[Route("/", legacy)]))) as client:
        request_id = client.get("/").headers["x-request-id"]
    shipped, relayed, _access = stream.lines()
    assert (shipped["order_id"], shipped["request_id"]) == ("ord_1", request_id)
    assert relayed["request_id"] == "from-the-caller"  # an id given with the record is kept
    assert "nothing" not in relayed
    logging.getLogger("uvicorn.error").info("Started", extra={"color_message": "\x1b[1mStarted\x1b[0m"})
    assert "color_message" not in stream.lines()[-1]


def test_configure_logging_flushes_each_line_at_once_outside_an_event_loop(stream: Stream) -> None:
    app_log().info("first")
    assert stream.flushes == 1
    logging.getLogger("script").warning("second")
    assert stream.flushes == 2


def test_configure_logging_writes_what_orjson_refuses_rather_than_failing_the_request(stream: Stream) -> None:
    async def cart(request: Request) -> Response:
        app_log().info(
            "cart_priced",
            by_sku_and_size={("sku-1", "L"): 3},
            lines=[{("sku-2", "M"): 1}],
            big=2**70,
            name="caf\udce9",
        )
        logging.getLogger("legacy.module").warning("file caf\udce9.csv")
        return JSONResponse({"ok": True})

    app = EnvelopeMiddleware(Starlette(routes=[Route("/cart", cart)]))
    with TestClient(app) as client:
        response = client.get("/cart")
    assert response.status_code == 200
    priced = next(line for line in stream.lines() if line["event"] == "cart_priced")
    assert priced["by_sku_and_size"] == {"('sku-1', 'L')": 3}
    assert priced["big"] == 2**70
    assert priced["lines"] == [{"('sku-2', 'M')": 1}]
    assert priced["name"] == "caf?"
    assert priced["request_id"] == response.headers["x-request-id"]
    stdlib = next(line for line in stream.lines() if line.get("logger") == "legacy.module")
    assert stdlib["event"] == "file caf?.csv"
    assert stdlib["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize("level", [25, "verbose"])
def test_configure_logging_refuses_a_level_it_cannot_filter_by(level: int | str) -> None:
    with pytest.raises(ValueError, match="standard logging level"):
        configure_logging(level)
