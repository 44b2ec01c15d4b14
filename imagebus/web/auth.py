"""Who is calling: bearer tokens, the admin token, per-client rate limits, and the
error every handler raises (`ApiError`, rendered as JSON by app.py).

Handlers call `require_token(request)` before anything (a no-op when the server has no
token: it is bound to loopback) and `require_admin(request)` before admin actions.
A token comes as `Authorization: Bearer <token>`, or as `?token=` in the URL for what
a browser cannot send headers with (EventSource, <img src>).
"""

from __future__ import annotations

import hashlib
import hmac
import time
from dataclasses import dataclass

from starlette.requests import Request

from ..settings import WebSettings

# Buckets kept at most; full ones (idle clients) are forgotten first.
_MAX_BUCKETS = 10_000


class ApiError(Exception):
    """An HTTP error with a JSON body: {"error": {"message", "code", "field"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        field: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.field = field
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who made a request: `key` names the client (its address and the hash of the
    token it showed) for job ownership and rate limits; `admin` whether it showed the
    admin token."""

    key: str
    address: str
    admin: bool


def presented_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query_params.get("token") or None


def _matches(given: str | None, expected: str | None) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def require_token(request: Request) -> Caller:
    """The caller, or ApiError 401 when the server has a token and it was not shown."""
    settings: WebSettings = request.app.state.settings
    given = presented_token(request)
    admin = _matches(given, settings.admin_token)
    if settings.tokens and not (admin or any(_matches(given, t) for t in settings.tokens)):
        message = "a token is required" if given is None else "the token is not valid"
        raise ApiError(
            401, message, "unauthorized", headers={"WWW-Authenticate": 'Bearer realm="imagebus"'}
        )
    address = request.client.host if request.client else "unknown"
    # A token tells clients apart only where the server checks it: else any made-up
    # token would make a new client (and a fresh rate-limit bucket).
    checked = given if (settings.tokens or admin) else None
    digest = hashlib.sha256(checked.encode()).hexdigest()[:16] if checked else "-"
    return Caller(key=f"{address}/{digest}", address=address, admin=admin)


def require_admin(request: Request) -> Caller:
    """The caller if it showed the admin token: else 401 (no valid token) or 403."""
    caller = require_token(request)
    settings: WebSettings = request.app.state.settings
    if not settings.admin_token:
        raise ApiError(
            403, "admin actions need IMAGEBUS_WEB_ADMIN_TOKEN on the server", "forbidden"
        )
    if not caller.admin:
        raise ApiError(403, "this needs the admin token", "forbidden")
    return caller


class RateLimiter:
    """A token bucket per client: `burst` submissions at once, refilled at `per_minute`."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.per_second = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str) -> float | None:
        """None if `key` may submit now (one token taken), else seconds until it may."""
        if self.per_second <= 0:
            return None
        now = time.monotonic()
        tokens, at = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.per_second)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.per_second
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > _MAX_BUCKETS:
            self._forget_idle(now)
        return None

    def _forget_idle(self, now: float) -> None:
        refill_s = self.burst / self.per_second
        self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < refill_s}


def check_rate(request: Request, caller: Caller) -> None:
    """ApiError 429 (with Retry-After) when this client submits past its rate."""
    limiter: RateLimiter = request.app.state.limiter
    wait = limiter.take(caller.key)
    if wait is not None:
        raise ApiError(
            429,
            f"too many submissions; try again in {wait:.1f}s",
            "rate_limited",
            headers={"Retry-After": str(max(1, round(wait + 0.5)))},
        )
