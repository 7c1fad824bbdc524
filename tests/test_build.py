"""The build: ``COMPILED`` says truly which build of the hot path is running.

scripts/test runs the suite twice, once on the checkout (pure Python, with coverage) and once on
the compiled wheel with ``ENVELOPE_EXPECT_COMPILED=1``; these tests fail if either run is
not on the build it claims to test.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tomllib
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import pytest

import envelope_middleware

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def compiled_modules() -> list[str]:
    """The modules the wheel's mypyc hook compiles, as pyproject.toml lists them."""
    config = tomllib.loads(PYPROJECT.read_text())
    hook = config["tool"]["hatch"]["build"]["targets"]["wheel"]["hooks"]["mypyc"]
    return [path.strip("/").removesuffix(".py").replace("/", ".") for path in hook["include"]]


def test_compiled_matches_the_build_this_run_expects() -> None:
    expected = os.environ.get("ENVELOPE_EXPECT_COMPILED") == "1"
    assert envelope_middleware.COMPILED is expected


def test_compiled_build_covers_every_module_the_hook_lists() -> None:
    modules = compiled_modules()
    assert "envelope_middleware.middleware" in modules
    for name in modules:
        module_file = importlib.import_module(name).__file__
        assert module_file is not None
        assert module_file.endswith(tuple(EXTENSION_SUFFIXES)) is envelope_middleware.COMPILED, name


def test_compiled_build_is_the_one_the_servers_tests_start_import() -> None:
    # The tests start the demo with `python -m` from the checkout, whose working
    # directory would come first on sys.path but for PYTHONSAFEPATH.
    result = subprocess.run(
        [sys.executable, "-c", "import envelope_middleware; print(envelope_middleware.COMPILED)"],
        cwd=PYPROJECT.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == str(envelope_middleware.COMPILED)


def test_compiled_envelope_middleware_is_a_native_class() -> None:
    # What the compiled build gives up (README, "The compiled wheel"): subclasses that
    # override its methods, and attributes the class does not declare.
    class Subclass(envelope_middleware.EnvelopeMiddleware):
        def _make_request_id(self, _scope: Any) -> str:
            return "mine"

    middleware = envelope_middleware.EnvelopeMiddleware(_app)
    if envelope_middleware.COMPILED:
        with pytest.raises(TypeError, match="interpreted classes cannot inherit from compiled"):
            Subclass(_app)
        with pytest.raises(AttributeError):
            middleware.note = "x"  # type: ignore[attr-defined]
    else:
        assert Subclass(_app)._make_request_id({}) == "mine"
        middleware.note = "x"  # type: ignore[attr-defined]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    return None
