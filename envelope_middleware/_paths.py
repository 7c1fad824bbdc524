"""Excluded paths: which requests keep the app's own bodies (`exclude_paths`)."""

from __future__ import annotations

from collections.abc import Iterable

from starlette.types import Scope


class ExcludedPaths:
    """Paths parsed once; `matches` reads a request's path as the app sees it.

    As in Go's ServeMux: "/docs/" names a subtree, /docs included, and "/health"
    one path, so /health/deep stays in the contract. "/" is the root alone: a
    subtree of everything would exclude the app.
    """

    __slots__ = ("exact", "subtrees")

    def __init__(self, paths: Iterable[str]) -> None:
        exact: set[str] = set()
        subtrees: list[str] = []
        for path in paths:
            if not path.startswith("/"):
                raise ValueError(f"excluded paths start with '/': {path!r}")
            base = path.rstrip("/")
            if base and path.endswith("/"):
                subtrees.append(base + "/")
            exact.add(base or "/")
        self.exact = frozenset(exact)
        self.subtrees = tuple(subtrees)

    def matches(self, scope: Scope) -> bool:
        # Paths are the app's own: a mount point or a proxy's root_path in front
        # of them (which servers and Starlette put into scope["path"]) is not.
        path: str = scope["path"]
        root_path = scope.get("root_path")  # untyped: None is as good as "" here
        # Only a whole leading segment is the root: with root_path "/h", "/health" is
        # the app's own path, as Starlette's router reads it.
        if root_path and (path == root_path or path.startswith(root_path + "/")):
            path = path[len(root_path) :] or "/"
        return path in self.exact or (bool(self.subtrees) and path.startswith(self.subtrees))
