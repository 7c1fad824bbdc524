"""A reference partner-API gateway with demo backend services (issue #3).

Run it with `python -m envelope_middleware.demo` (or `scripts/demo`); build it
in code with `create_gateway` and `create_backends`.
"""

from envelope_middleware.demo.backends import create_backends
from envelope_middleware.demo.gateway import CREDENTIALS, Credential, create_gateway

__all__ = ["CREDENTIALS", "Credential", "create_backends", "create_gateway"]
