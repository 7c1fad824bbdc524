"""The reference gateway's partners: HTTP Basic credentials with scopes."""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from starlette.requests import Request
from starlette.types import Scope

from envelope_middleware import AuthForbidden, AuthInvalidCredential, AuthMissing

__all__ = ["CREDENTIALS", "Credential", "authorize"]

_REALM = {"WWW-Authenticate": 'Basic realm="partner-api"'}


@dataclass(frozen=True)
class Credential:
    """A partner's HTTP Basic credential and the scopes it grants."""

    partner_key: str
    secret: str
    scopes: frozenset[str]


CREDENTIALS = (
    Credential(
        "demo_partner", "demo_secret", frozenset({"orders:read", "brands:read", "menus:read", "menus:oos"})
    ),
    Credential("demo_readonly", "readonly_secret", frozenset({"orders:read"})),
    # A second partner that may write: the same Idempotency-Key from two partners
    # is two operations (issue #10), which curl can show with these two.
    Credential("demo_writer", "writer_secret", frozenset({"orders:read", "menus:oos"})),
)


def authorize(request: Request | Scope, credentials: Mapping[str, Credential], scope: str) -> Credential:
    # The ASGI scope is read as it is where there is no Request yet (the write
    # route's principal): building one costs more than the check itself.
    raw = request.scope["headers"] if isinstance(request, Request) else request["headers"]
    headers = [value.decode("latin-1") for name, value in raw if name == b"authorization"]
    if not headers:
        raise AuthMissing("Send HTTP Basic credentials: partner_key:secret_key.", headers=_REALM)
    if len(headers) > 1:
        # Which one counts would depend on who reads them: a proxy in front may
        # have checked the other one (issue #3 review).
        raise AuthMissing("Send one Authorization header.", headers=_REALM)
    header = headers[0]
    kind, _, encoded = header.partition(" ")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):  # ValueError also covers non-ASCII input and bad UTF-8
        decoded = ""
    key, colon, secret = decoded.partition(":")
    if kind.lower() != "basic" or not colon:
        raise AuthMissing(
            "The Authorization header is not HTTP Basic partner_key:secret_key.", headers=_REALM
        )
    credential = credentials.get(key)
    # Compare even for unknown keys, so the answer does not come faster for them.
    expected = credential.secret if credential is not None else "\x00" * len(secret)
    if not hmac.compare_digest(secret.encode(), expected.encode()) or credential is None:
        raise AuthInvalidCredential(headers=_REALM)
    if scope not in credential.scopes:
        raise AuthForbidden(f"This credential lacks the {scope} scope.", details={"required_scope": scope})
    return credential
