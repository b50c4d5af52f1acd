"""Retry-After parsing shared by every HTTP client of the agent."""

from __future__ import annotations

from email.utils import formatdate

from agent.httputil import parse_retry_after


def test_delta_seconds_and_http_dates() -> None:
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(formatdate(1_000_030, usegmt=True), now=1_000_000) == 30.0
    assert parse_retry_after(formatdate(999_000, usegmt=True), now=1_000_000) == 0.0


def test_hostile_or_malformed_hints_are_ignored() -> None:
    for bad in (None, "", "soon", "inf", "nan", "-5", "Mon, 23 Nov 2026 10:00:00"):
        assert parse_retry_after(bad) is None, bad
