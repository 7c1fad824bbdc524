"""The error catalogue: every error code a partner can see, as data.

The exception classes, the docs' error table and the status fallback all read
from here, so a code is defined once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_CATALOGUE", "Catalogue", "ErrorSpec"]

# Codes are identifiers partners branch on: lower snake case, nothing else.
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}", re.ASCII)


def is_valid_code(code: object) -> bool:
    return isinstance(code, str) and _CODE.fullmatch(code) is not None


def _is_error_status(status: object) -> bool:
    # bool is an int, and 404.0 compares equal to 404: neither is a status line's number.
    return type(status) is int and 400 <= status <= 599


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    """One error code: its HTTP status, default message and whether a retry may succeed."""

    code: str
    status: int
    message: str
    retryable: bool = False

    def __post_init__(self) -> None:
        if not is_valid_code(self.code):
            raise ValueError(f"error code must be lower_snake_case, at most 64 chars: {self.code!r}")
        if not _is_error_status(self.status):
            raise ValueError(f"error status must be an int from 400 to 599, not {self.status!r}")
        if not isinstance(self.message, str) or not self.message:
            raise ValueError(f"an error's default message is a non-empty str, not {self.message!r}")


class Catalogue(Mapping[str, ErrorSpec]):
    """An immutable set of error codes, plus the code each status falls back to.

    The first code listed for a status is that status's fallback unless
    `status_defaults` names another. A status with no code of its own falls
    back to `request_invalid` (4xx) or `internal` (5xx), which every
    catalogue must therefore hold.
    """

    __slots__ = ("_by_code", "_by_status")

    def __init__(
        self, specs: Iterable[ErrorSpec], *, status_defaults: Mapping[int, str] | None = None
    ) -> None:
        by_code: dict[str, ErrorSpec] = {}
        by_status: dict[int, ErrorSpec] = {}
        for spec in specs:
            if spec.code in by_code:
                raise ValueError(f"error code listed twice: {spec.code!r}")
            by_code[spec.code] = spec
            by_status.setdefault(spec.status, spec)
        for status, code in (status_defaults or {}).items():
            if not _is_error_status(status):
                raise ValueError(f"a status default is for an int status from 400 to 599, not {status!r}")
            if code not in by_code:
                raise ValueError(f"status default {status} names an unknown code {code!r}")
            if by_code[code].status // 100 != status // 100:
                # A server error answered with a client error's code, or the reverse,
                # misleads the partner about whose fault it is and whether to retry.
                raise ValueError(
                    f"status default {status} names {code!r}, a {by_code[code].status} code of another class"
                )
            by_status[status] = by_code[code]
        for required in ("request_invalid", "internal"):
            if required not in by_code:
                raise ValueError(f"a catalogue must define {required!r}")
        self._by_code = by_code
        self._by_status = by_status

    def __getitem__(self, code: str) -> ErrorSpec:
        return self._by_code[code]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_code)

    def __len__(self) -> int:
        return len(self._by_code)

    def __repr__(self) -> str:
        return f"Catalogue({list(self._by_code)!r})"

    def for_status(self, status: int) -> ErrorSpec:
        """Return the code a response with this status gets when nothing more specific is known."""
        spec = self._by_status.get(status)
        if spec is not None:
            return spec
        return self._by_code["internal" if status >= 500 else "request_invalid"]

    def extend(
        self, specs: Iterable[ErrorSpec] = (), *, status_defaults: Mapping[int, str] | None = None
    ) -> Catalogue:
        """Return a new catalogue with more codes (a gateway's own) and status defaults."""
        defaults = {status: spec.code for status, spec in self._by_status.items()}
        defaults.update(status_defaults or {})
        return Catalogue([*self._by_code.values(), *specs], status_defaults=defaults)


DEFAULT_CATALOGUE = Catalogue(
    [
        ErrorSpec("request_invalid", 400, "The request is invalid."),
        ErrorSpec(
            "request_missing_idempotency_key", 400, "This endpoint requires an Idempotency-Key header."
        ),
        ErrorSpec("auth_missing", 401, "Credentials are missing or malformed."),
        ErrorSpec("auth_invalid_credential", 401, "The credentials are not valid."),
        ErrorSpec("auth_forbidden", 403, "The credential lacks the scope this request needs."),
        ErrorSpec("resource_not_found", 404, "The resource was not found."),
        ErrorSpec("method_not_allowed", 405, "The method is not allowed on this resource."),
        ErrorSpec(
            "idempotency_key_conflict",
            409,
            "The Idempotency-Key was already used with a different request.",
        ),
        ErrorSpec("state_invalid_transition", 422, "The requested state change is not allowed."),
        ErrorSpec("rate_limited", 429, "Too many requests; retry later.", retryable=True),
        ErrorSpec("internal", 500, "An internal error occurred.", retryable=True),
        ErrorSpec("downstream_unavailable", 502, "A backend service is unavailable.", retryable=True),
        ErrorSpec("downstream_invalid_response", 502, "A backend service sent an invalid response."),
        ErrorSpec("service_unavailable", 503, "The service is temporarily unavailable.", retryable=True),
        ErrorSpec("downstream_timeout", 504, "A backend service timed out.", retryable=True),
    ]
)


def render_markdown_table(catalogue: Catalogue) -> str:
    """The catalogue as the markdown table of docs/errors.md."""
    lines = ["| code | status | retryable | default message |", "|---|---|---|---|"]
    lines += [
        f"| `{spec.code}` | {spec.status} | {'yes' if spec.retryable else 'no'} | {spec.message} |"
        for spec in catalogue.values()
    ]
    return "\n".join(lines)
