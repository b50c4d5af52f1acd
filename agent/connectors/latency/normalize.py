"""Span-name normalisation and stage matching, both cached per distinct name.

Span names should be low-cardinality (``GET /users/{id}``) but instrumentation often
puts ids in them (``GET /users/12345``). Left alone, each id becomes a metric series
and the ``max_series`` limit fills with junk. The normaliser replaces whole tokens
that look like ids with ``{id}``; tokens that merely contain digits (``v1``,
``resnet50``) are kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from agent.connectors.latency.config import SPAN_KINDS, StageConfig

PLACEHOLDER = "{id}"
# A token is delimited by anything but letters, digits and "_" (so "/", ".", "-", " ",
# ":", "="); only whole tokens are replaced. Order matters: a UUID contains hex runs.
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
# Hex ids (hashes, trace ids, object ids): 8+ hex digits with at least one decimal
# digit, so that words spelt with the letters a-f alone ("acceded") are kept.
_HEX = r"(?=[a-fA-F]*\d)[0-9a-fA-F]{8,}"
_NUMBER = r"\d+"
_ID_TOKEN = re.compile(rf"(?<![A-Za-z0-9_])(?:{_UUID}|{_HEX}|{_NUMBER})(?![A-Za-z0-9_])")

# Distinct raw names remembered; past this the cache starts afresh (a flood of
# distinct names must not grow memory, and recomputing is only a regex).
CACHE_SIZE = 8192


def normalize_name(name: str) -> str:
    """``"GET /users/12345/orders/9f8e7d6c5b4a"`` -> ``"GET /users/{id}/orders/{id}"``."""
    return _ID_TOKEN.sub(PLACEHOLDER, name)


class Names:
    """Maps raw span names to normalised names and stages, remembering recent answers.

    A stage applies to a span when one of its patterns matches and the span's kind is
    one of the stage's ``span_kinds``. Name patterns are resolved once per distinct
    name (``lookup``); attribute patterns are per span (``stage_of_attributes``).
    """

    def __init__(self, stages: list[StageConfig], *, normalize: bool = True) -> None:
        self._normalize = normalize
        self._name_rules = [(s.name, s.name_pattern()) for s in stages if s.span_names]
        self._attr_rules = [(s.name, [(k, re.compile(v)) for k, v in s.attributes.items()])
                            for s in stages if s.attributes]
        self._order = {s.name: i for i, s in enumerate(stages)}
        self._kinds = {s.name: frozenset(SPAN_KINDS[k] for k in s.span_kinds) for s in stages}
        self._cache: dict[str, tuple[str, tuple[str, ...]]] = {}

    @property
    def has_attribute_rules(self) -> bool:
        """True when some stage is matched by attributes (a per-span, slower path)."""
        return bool(self._attr_rules)

    def lookup(self, raw: str) -> tuple[str, tuple[str, ...]]:
        """``(normalised name, stages whose name patterns match it, in order)``."""
        hit = self._cache.get(raw)
        if hit is not None:
            return hit
        name = normalize_name(raw) if self._normalize else raw
        matches = tuple(s for s, rx in self._name_rules if rx.search(name))
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[raw] = (name, matches)
        return name, matches

    def stage(self, matches: tuple[str, ...], kind: int) -> str | None:
        """The first of ``matches`` (from ``lookup``) that admits spans of ``kind``."""
        return next((s for s in matches if kind in self._kinds[s]), None)

    def stage_of_attributes(self, attrs: Mapping[str, Any], kind: int,
                            by_name: str | None) -> str | None:
        """The stage of a span given its attributes, kind and the stage its name gave.

        Stages are tried in configured order, so an earlier attribute rule beats a
        later name rule and vice versa.
        """
        order = self._order
        for stage, rules in self._attr_rules:
            if by_name is not None and order[by_name] < order[stage]:
                break
            if kind not in self._kinds[stage]:
                continue
            for key, rx in rules:
                value = attrs.get(key)
                if value is not None and rx.search(str(value)):
                    return stage
        return by_name
