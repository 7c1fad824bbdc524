"""Start the reference gateway under uvicorn: `python -m envelope_middleware.demo --help`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx2
import uvicorn
import uvloop
from starlette.types import ASGIApp

from envelope_middleware import configure_logging
from envelope_middleware.demo.backends import create_backends
from envelope_middleware.demo.forwarding import HttpClient
from envelope_middleware.demo.gateway import CREDENTIALS, create_gateway
from envelope_middleware.idempotency import IdempotencyStore, MemoryStore
from envelope_middleware.idempotency.redis_store import RedisStore

BACKENDS = ("orders", "branches", "brands")
_ENV = "ENVELOPE_DEMO_BACKENDS"  # how `--workers N` hands backend URLs to each worker


@dataclass
class Options:
    host: str = "127.0.0.1"
    port: int = 8000
    backends: dict[str, str] = field(default_factory=dict)
    serve_backends: bool = False
    backend_port: int = 9001
    timeout: float = 1.0
    workers: int = 1
    request_id_format: str = "hex"
    trusted: bool = False
    access_log: bool = True
    envelope: bool = True
    http_client: HttpClient = "aiohttp"
    redis_url: str | None = None
    idempotency_lease: float | None = None
    idempotency_max_entries: int = 100_000


def parse_args(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python -m envelope_middleware.demo",
        description="The envelope_middleware reference partner gateway.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=_port, default=8000)
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="send NAME (orders, branches, brands) to a real HTTP service, e.g. orders=http://127.0.0.1:9001",
    )
    parser.add_argument(
        "--serve-backends",
        action="store_true",
        help="also serve the demo backends on their own ports and reach them over HTTP",
    )
    parser.add_argument("--backend-port", type=_port, default=9001, help="first port for --serve-backends")
    parser.add_argument("--timeout", type=_seconds, default=1.0, help="seconds a backend may take")
    parser.add_argument("--workers", type=_count, default=1)
    parser.add_argument("--request-id-format", choices=["hex", "prefixed_uuid"], default="hex")
    parser.add_argument("--trusted", action="store_true", help="trust backend JSON: no validation")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false")
    parser.add_argument(
        "--http-client",
        choices=["aiohttp", "httpx2"],
        default="aiohttp",
        help="the client for --backend and --serve-backends services (httpx2: the forwarding "
        "before issue #11, kept as benchmarks/gateway_load.py's baseline)",
    )
    parser.add_argument(
        "--no-envelope",
        dest="envelope",
        action="store_false",
        help="serve without EnvelopeMiddleware: the baseline of benchmarks/gateway_load.py",
    )
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help="keep Idempotency-Key state in Redis (redis://host:port/db), shared by every worker; "
        "without it the embedded store of one process is used",
    )
    parser.add_argument(
        "--idempotency-lease",
        type=_seconds,
        metavar="SECONDS",
        help="how long a write in flight holds its key (default: the larger of 10 s and four timeouts)",
    )
    parser.add_argument(
        "--idempotency-max-entries",
        type=_count,
        default=100_000,
        metavar="N",
        help="how many recorded writes the embedded store keeps (oldest evicted first)",
    )
    args = parser.parse_args(argv)
    backends: dict[str, str] = {}
    for spec in args.backend:
        name, sep, url = spec.partition("=")
        if not sep or name not in BACKENDS or not _is_base_url(url):
            parser.error(
                f"--backend takes NAME=URL, NAME one of {', '.join(BACKENDS)} and URL "
                f"http(s)://host[:port][/path]: {spec!r}"
            )
        backends[name] = url
    if args.serve_backends and backends:
        parser.error("--serve-backends and --backend exclude each other")
    if args.serve_backends and args.workers > 1:
        parser.error("--serve-backends runs in one process; give --backend URLs to use --workers")
    if args.redis_url is not None and not args.redis_url.startswith(("redis://", "rediss://", "unix://")):
        parser.error(f"--redis-url takes redis://, rediss:// or unix:// URLs: {args.redis_url!r}")
    if args.workers > 1 and args.redis_url is None:
        # Each worker would keep its own embedded store: a retry that another
        # worker answers would run the write a second time (issue #10).
        parser.error("--workers needs --redis-url: the embedded idempotency store lives in one process")
    if args.idempotency_lease is not None and args.idempotency_lease <= args.timeout:
        parser.error(
            "--idempotency-lease must be longer than --timeout: a write waits that long on its backend"
        )
    if args.serve_backends and (
        args.backend_port + len(BACKENDS) > _MAX_PORT + 1
        or args.backend_port <= args.port < args.backend_port + len(BACKENDS)
    ):
        last = args.backend_port + len(BACKENDS) - 1
        parser.error(f"--serve-backends uses ports {args.backend_port}-{last}: they must be free of --port")
    return Options(
        host=args.host,
        port=args.port,
        backends=backends,
        serve_backends=args.serve_backends,
        backend_port=args.backend_port,
        timeout=args.timeout,
        workers=args.workers,
        request_id_format=args.request_id_format,
        trusted=args.trusted,
        access_log=args.access_log,
        envelope=args.envelope,
        http_client=args.http_client,
        redis_url=args.redis_url,
        idempotency_lease=args.idempotency_lease,
        idempotency_max_entries=args.idempotency_max_entries,
    )


_MAX_PORT = 65535


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= _MAX_PORT:
        raise argparse.ArgumentTypeError(f"a port is 1 to {_MAX_PORT}, not {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan, which compares false
        raise argparse.ArgumentTypeError(f"a timeout is a positive number of seconds, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"at least one worker, not {value}")
    return value


def _is_base_url(url: str) -> bool:
    # Backend paths are appended to it: a query or fragment, even an empty one,
    # would swallow them, and a bad port or host fails only at the first request.
    if "?" in url or "#" in url or any(char.isspace() for char in url):
        return False
    try:
        parsed = httpx2.URL(url)
    except (httpx2.InvalidURL, TypeError):
        return False
    port_ok = parsed.port is None or 1 <= parsed.port <= _MAX_PORT
    return parsed.scheme in ("http", "https") and bool(parsed.host) and port_ok


def build(options: Options) -> ASGIApp:
    """The gateway for these options: named backends over HTTP, the others in process."""
    embedded = create_backends()
    targets: dict[str, ASGIApp | str] = {
        name: options.backends.get(name) or embedded[name] for name in BACKENDS
    }
    store: IdempotencyStore = (
        RedisStore.from_url(options.redis_url)
        if options.redis_url
        else MemoryStore(max_entries=options.idempotency_max_entries)
    )
    return create_gateway(
        targets,
        idempotency_store=store,
        idempotency_lease=options.idempotency_lease,
        timeout=options.timeout,
        request_id_format="prefixed_uuid" if options.request_id_format == "prefixed_uuid" else "hex",
        validate_json=not options.trusted,
        access_log=options.access_log,
        envelope=options.envelope,
        http_client=options.http_client,
    )


def banner(options: Options) -> str:
    base = f"http://{options.host}:{options.port}"
    key, secret = CREDENTIALS[0].partner_key, CREDENTIALS[0].secret
    ro_key, ro_secret = CREDENTIALS[1].partner_key, CREDENTIALS[1].secret
    w_key, w_secret = CREDENTIALS[2].partner_key, CREDENTIALS[2].secret
    store = (
        f"Redis at {_without_password(options.redis_url)}" if options.redis_url else "embedded (this process)"
    )
    patch = f"curl -si -u {key}:{secret} -X PATCH {base}/items/1/availability"
    off, on = "-d '{\"available\": false}'", "-d '{\"available\": true}'"
    where = ", ".join(f"{name}={options.backends.get(name, 'in-process')}" for name in BACKENDS)
    garbled = (
        "200 with the broken body: --trusted skips the check"
        if options.trusted
        else "502 downstream_invalid_response"
    )
    return "\n".join(
        [
            f"partner gateway on {base}  (backends: {where})",
            f"credentials: {key}:{secret} (all scopes), {ro_key}:{ro_secret} (orders:read only),",
            f"             {w_key}:{w_secret} (orders:read, menus:oos)",
            f"idempotency store: {store}",
            "try:",
            f"  curl -si -u {key}:{secret} '{base}/orders?page=1&size=2'",
            f"  curl -si -u {key}:{secret} '{base}/branches?size=3'",
            f"  curl -si -u {key}:{secret} '{base}/brands'",
            (
                f"  curl -si -u {key}:{secret} -X PATCH {base}/items/13/availability "
                "-H 'Idempotency-Key: a13' -d '{\"available\": false}'   # 422 state_invalid_transition"
            ),
            f"  curl -si -u {key}:{secret} {base}/orders/ord_crash     # 500, nothing leaked",
            f"  curl -si -u {key}:{secret} {base}/orders/ord_slow      # 504 downstream_timeout",
            f"  curl -si -u {key}:{secret} {base}/orders/ord_garbled   # {garbled}",
            f"  curl -si -u {ro_key}:{ro_secret} {base}/brands         # 403 auth_forbidden",
            f"  curl -si '{base}/orders?brand_id=1'                     # 401 auth_missing",
            "writes need an Idempotency-Key; the same key again replays the first answer:",
            f"  {patch} -H 'Idempotency-Key: k1' {off}   # 200, runs",
            f"  {patch} -H 'Idempotency-Key: k1' {off}   # 200, replayed",
            f"  {patch} -H 'Idempotency-Key: k1' {on}    # 409 idempotency_key_conflict",
            f"  {patch} {on}        # 400 request_missing_idempotency_key",
            (
                f"  curl -si -u {w_key}:{w_secret} -X PATCH {base}/items/1/availability "
                f"-H 'Idempotency-Key: k1' {on}   # 200: another partner's k1 is its own"
            ),
        ]
    )


def _without_password(url: str) -> str:
    # The banner goes to terminals and logs; a Redis password does not.
    parsed = urllib.parse.urlsplit(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc))


def app_from_environment() -> ASGIApp:
    """Factory for `--workers N`: each worker process builds its own gateway."""
    configure_logging()
    options = Options()
    for spec in filter(None, os.environ.get(_ENV, "").split(",")):
        name, _, url = spec.partition("=")
        options.backends[name] = url
    options.timeout = float(os.environ.get(_ENV + "_TIMEOUT", "1.0"))
    options.trusted = os.environ.get(_ENV + "_TRUSTED") == "1"
    options.access_log = os.environ.get(_ENV + "_ACCESS_LOG", "1") == "1"
    options.envelope = os.environ.get(_ENV + "_ENVELOPE", "1") == "1"
    options.http_client = "httpx2" if os.environ.get(_ENV + "_HTTP_CLIENT") == "httpx2" else "aiohttp"
    options.request_id_format = os.environ.get(_ENV + "_REQUEST_ID_FORMAT", "hex")
    options.redis_url = os.environ.get(_ENV + "_REDIS_URL") or None
    lease = os.environ.get(_ENV + "_IDEMPOTENCY_LEASE")
    options.idempotency_lease = float(lease) if lease else None
    return build(options)


# The demo's logging is configured by configure_logging(), and the middleware
# writes the access log. No WebSocket protocol: the gateway has no WebSocket
# routes, and with one loaded uvicorn hands a request carrying `Upgrade:
# websocket` to the app as a websocket scope, which the middleware passes on
# untouched; the router's refusal then reaches the partner as a bare 403 with no
# request id. Without one, uvicorn serves that request as plain HTTP, under the
# contract like any other.
_UVICORN: dict[str, Any] = {"log_config": None, "access_log": False, "ws": "none"}


async def serve(options: Options) -> None:
    """Serve the gateway, and with --serve-backends the backends, in this process."""
    servers = []
    if options.serve_backends:
        for offset, (name, app) in enumerate(create_backends().items()):
            port = options.backend_port + offset
            options.backends[name] = f"http://127.0.0.1:{port}"
            config = uvicorn.Config(app, host="127.0.0.1", port=port, **_UVICORN)
            servers.append(uvicorn.Server(config))
    gateway = uvicorn.Config(build(options), host=options.host, port=options.port, **_UVICORN)
    servers.append(uvicorn.Server(gateway))
    print(banner(options), flush=True)  # noqa: T201 - the demo's start-up message
    await asyncio.gather(*(server.serve() for server in servers))


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    configure_logging()
    if options.workers > 1:
        os.environ[_ENV] = ",".join(f"{name}={url}" for name, url in options.backends.items())
        os.environ[_ENV + "_TIMEOUT"] = str(options.timeout)
        os.environ[_ENV + "_TRUSTED"] = "1" if options.trusted else "0"
        os.environ[_ENV + "_ACCESS_LOG"] = "1" if options.access_log else "0"
        os.environ[_ENV + "_ENVELOPE"] = "1" if options.envelope else "0"
        os.environ[_ENV + "_HTTP_CLIENT"] = options.http_client
        os.environ[_ENV + "_REQUEST_ID_FORMAT"] = options.request_id_format
        os.environ[_ENV + "_REDIS_URL"] = options.redis_url or ""
        os.environ[_ENV + "_IDEMPOTENCY_LEASE"] = str(options.idempotency_lease or "")
        print(banner(options), flush=True)  # noqa: T201 - the demo's start-up message
        uvicorn.run(
            "envelope_middleware.demo.__main__:app_from_environment",
            factory=True,
            host=options.host,
            port=options.port,
            workers=options.workers,
            **_UVICORN,
        )
        return 0
    # uvicorn re-raises the Ctrl-C it caught once it has shut down cleanly. The
    # servers share one loop, started here rather than by uvicorn: uvloop's, as
    # uvicorn's own start would pick (about a fifth of the gateway's CPU, issue #11).
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
