"""HTTP client helpers shared by every exporter and notifier that talks HTTP."""

from __future__ import annotations

import email.utils
import math
import time

import aiohttp

# The most of a response body any client reads (error messages, partial success).
MAX_RESPONSE_BYTES = 1 << 20


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date (RFC 9110).

    None when absent or malformed (``inf``, ``nan``, a negative number, a date
    without its GMT zone); the caller then backs off on its own schedule. The
    sending queue caps whatever comes back, so a hostile hint cannot park a worker.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is always GMT
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


async def read_bounded(resp: aiohttp.ClientResponse, limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """At most ``limit`` bytes of the response body."""
    out = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        out += chunk
        if len(out) >= limit:
            break
    return bytes(out[:limit])
