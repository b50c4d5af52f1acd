"""The ``redact`` processor: secrets and personal data out of attributes and log bodies.

Two kinds of rule:

- **keys**: an attribute (at any depth of a map value) whose key matches a blocked
  pattern is dropped, masked or hashed whole, unless it matches an allowed pattern;
- **values**: inside every string value (attributes, array items, map values, string
  log bodies) the built-in patterns (bearer tokens, ``scheme://user:pass@host``
  passwords, e-mail addresses, card numbers passing the Luhn check) and custom
  regexes are replaced by the mask or their hash; the rest of the string stays.

Every redaction is counted by reason (``mlagent_redact_redactions_total{reason}``);
values are never logged. Scanned: resource attributes, span, span event and link
attributes, log record attributes and bodies, metric data point attributes. Not
scanned: names (span, event, metric) and bytes values.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from agent.component import Capabilities, Consumer, Host, Settings, Signal
from agent.pdata import Batch, LogBatch, TraceBatch, anyvalue_to_python, data_points, iter_metrics
from agent.processors.redact.config import RedactConfig

# Built-in value patterns (case-insensitive). Each match is redacted, except card
# numbers failing Luhn.
BUILTIN_PATTERNS: dict[str, str] = {
    # RFC 6750 token68 after the scheme; 8+ chars so "bearer of bad news" survives.
    "bearer": r"\b(bearer\s+)([A-Za-z0-9\-._~+/]{8,}=*)",
    "url_password": r"\b([a-z][a-z0-9+.\-]*://[^\s/:@]+:)([^\s/@]+)(?=@)",
    "email": r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b",
    "card": r"\b(?:\d[ -]?){12,18}\d\b",
}
# Patterns whose first group is kept (the scheme, the URL up to the password).
_KEEP_PREFIX = {"bearer", "url_password"}

_PLAIN, _BLOCKED, _ALLOWED = 0, 1, 2
# Distinct keys remembered with their verdict; keys are few, but senders are untrusted.
_KEY_CACHE_LIMIT = 4096


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a 13–19 digit card number."""
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _either(patterns: list[str]) -> re.Pattern[str] | None:
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


class Redactor:
    """Applies the rules to OTLP values in place and counts what it redacted by reason.

    ``counts`` accumulates until the caller takes it (``take_counts``).
    """

    def __init__(self, config: RedactConfig) -> None:
        self.config = config
        self._blocked = _either(config.blocked_keys)
        self._allowed = _either(config.allowed_keys)
        self._verdicts: dict[str, int] = {}
        self.counts: dict[str, int] = {}
        rules: list[tuple[str, re.Pattern[str]]] = [
            (name, re.compile(BUILTIN_PATTERNS[name], re.IGNORECASE))
            for name in dict.fromkeys(config.value_patterns)]
        rules += [("custom", re.compile(p)) for p in config.custom_value_patterns]
        self._rules = [(name, rx, self._replacer(name)) for name, rx in rules]
        # One search rejects the common clean string before any rule runs. It may match
        # more than the rules do (it is case-insensitive throughout), never less; a
        # custom pattern with inline global flags cannot be combined, so no prefilter.
        try:
            self._prefilter: re.Pattern[str] | None = _either([rx.pattern for _n, rx in rules])
        except re.error:
            self._prefilter = None

    def take_counts(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts

    def _count(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1

    def _hash(self, text: str) -> str:
        digest = hashlib.sha256((self.config.salt + text).encode("utf-8", "surrogatepass"))
        return digest.hexdigest()[: self.config.hash_length]

    def _conceal(self, text: str) -> str:
        return self._hash(text) if self.config.value_action == "hash" else self.config.mask

    def _replacer(self, name: str) -> Callable[[re.Match[str]], str]:
        if name in _KEEP_PREFIX:
            def keep_prefix(m: re.Match[str]) -> str:
                self._count(name)
                return m.group(1) + self._conceal(m.group(2))
            return keep_prefix
        if name == "card":
            def card(m: re.Match[str]) -> str:
                digits = re.sub(r"\D", "", m.group(0))
                if not luhn_ok(digits):
                    return m.group(0)  # an id or a timestamp, not a card
                self._count(name)
                return self._conceal(digits)
            return card

        def whole(m: re.Match[str]) -> str:
            self._count(name)
            return self._conceal(m.group(0))
        return whole

    def scan(self, text: str) -> str:
        """``text`` with every value-pattern match redacted."""
        if not self._rules or (self._prefilter is not None
                                and self._prefilter.search(text) is None):
            return text
        for _name, rx, repl in self._rules:
            text = rx.sub(repl, text)
        return text

    def _verdict(self, key: str) -> int:
        verdict = self._verdicts.get(key)
        if verdict is None:
            if self._allowed is not None and self._allowed.search(key):
                verdict = _ALLOWED
            elif self._blocked is not None and self._blocked.search(key):
                verdict = _BLOCKED
            else:
                verdict = _PLAIN
            if len(self._verdicts) >= _KEY_CACHE_LIMIT:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    def attributes(self, attrs: Any, depth: int = 0) -> None:
        """Redact a repeated ``KeyValue`` field (and the maps and arrays inside it)."""
        dropped = []
        for i, kv in enumerate(attrs):
            verdict = self._verdict(kv.key)
            if verdict == _ALLOWED:
                continue
            if verdict == _BLOCKED:
                self._count("blocked_key")
                action = self.config.key_action
                if action == "drop":
                    dropped.append(i)
                elif action == "mask":
                    kv.value.string_value = self.config.mask
                else:
                    kv.value.string_value = self._hash(_canonical(kv.value))
                continue
            self.value(kv.value, depth)
        for i in reversed(dropped):
            del attrs[i]

    def value(self, v: Any, depth: int = 0) -> None:
        """Redact one ``AnyValue`` in place."""
        which = v.WhichOneof("value")
        if which == "string_value":
            text = v.string_value
            redacted = self.scan(text)
            if redacted is not text:
                v.string_value = redacted
        elif which in ("kvlist_value", "array_value"):
            if depth >= self.config.max_depth:
                self._count("too_deep")
                v.string_value = self.config.mask
            elif which == "kvlist_value":
                self.attributes(v.kvlist_value.values, depth + 1)
            else:
                for item in v.array_value.values:
                    self.value(item, depth + 1)


def _canonical(v: Any) -> str:
    """A stable text form of any value, for hashing."""
    value = anyvalue_to_python(v)
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=repr)


class RedactProcessor:
    """Runs a ``Redactor`` over every batch; see the module docstring."""

    capabilities = Capabilities(mutates_data=True)

    def __init__(self, settings: Settings, config: RedactConfig,
                 next: Mapping[Signal, Consumer]) -> None:
        self.settings = settings
        self.config = config
        self.telemetry = settings.telemetry
        (self.signal, self.next), = next.items()
        self.redactor = Redactor(config)
        self._redactions = settings.telemetry.counter(
            "mlagent_redact_redactions", "Values redacted by the redact processor, by reason.",
            ("reason",))

    async def start(self, host: Host) -> None:
        """Nothing to start: the rules were compiled at creation."""

    async def shutdown(self) -> None:
        """Nothing held between batches."""

    async def consume(self, batch: Batch) -> None:
        self.redact(batch)
        for reason, n in self.redactor.take_counts().items():
            self._redactions.labels(reason).inc(n)
        batch.invalidate()
        await self.next.consume(batch)

    def redact(self, batch: Batch) -> None:
        """Redact ``batch`` in place (does not call ``invalidate``)."""
        r = self.redactor
        if self.config.resource_attributes:
            for res in batch.resources():
                r.attributes(res.resource.attributes)
        if isinstance(batch, TraceBatch):
            for rs in batch.request.resource_spans:
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        r.attributes(s.attributes)
                        for ev in s.events:
                            r.attributes(ev.attributes)
                        for link in s.links:
                            r.attributes(link.attributes)
        elif isinstance(batch, LogBatch):
            bodies = self.config.log_bodies
            for rl in batch.request.resource_logs:
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        r.attributes(rec.attributes)
                        if bodies:
                            r.value(rec.body)
        else:
            for _rm, _sm, metric in iter_metrics(batch.request):
                for dp in data_points(metric):
                    r.attributes(dp.attributes)
