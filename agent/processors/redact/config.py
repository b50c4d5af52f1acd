"""Configuration of the ``redact`` processor."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

# Keys whose values are secrets whatever they hold. Searched (not anchored), case-
# insensitive, so "http.request.header.authorization" and "db.password" match.
# "token$" matches access_token, x-auth-token, csrftoken but not gen_ai.usage.input_tokens.
DEFAULT_BLOCKED_KEYS = [
    "authorization",
    "passw(or)?d",
    r"(^|[._-])pwd$",
    r"api[._-]?key",
    "secret",
    "token$",
    "cookie",
    r"private[._-]?key",
    "credential",
]

ValuePattern = Literal["bearer", "url_password", "email", "card"]


@dataclass
class RedactConfig:
    """``[processors.redact]``. See README.md for the rules and what is scanned."""

    # Regexes (case-insensitive, searched) of attribute keys whose values are redacted.
    blocked_keys: list[str] = field(default_factory=lambda: list(DEFAULT_BLOCKED_KEYS))
    # Regexes of keys never touched (checked first: exempt from blocking and value scans).
    allowed_keys: list[str] = field(default_factory=list)
    # What happens to a blocked key: removed, its value replaced by the mask, or hashed.
    key_action: Literal["drop", "mask", "hash"] = "drop"
    # Built-in patterns looked for inside string values (under any key not allowed).
    value_patterns: list[ValuePattern] = field(
        default_factory=lambda: ["bearer", "url_password", "email", "card"])
    # More regexes; each match inside a string value is redacted.
    custom_value_patterns: list[str] = field(default_factory=list)
    # What replaces a matched part of a value.
    value_action: Literal["mask", "hash"] = "mask"
    mask: str = "****"
    # Hash = first hash_length hex digits of sha256(salt + value): stable, so equal
    # values still join, but not reversible by hashing a dictionary without the salt.
    salt: str = ""
    hash_length: int = 16
    resource_attributes: bool = True
    log_bodies: bool = True
    # Deeper nested maps/arrays are replaced by the mask whole (they cannot be checked).
    max_depth: int = 8

    def validate(self) -> list[str]:
        errors = []
        for name in ("blocked_keys", "allowed_keys", "custom_value_patterns"):
            for i, p in enumerate(getattr(self, name)):
                try:
                    re.compile(p)
                except re.error as e:
                    errors.append(f"{name}[{i}]: {p!r} is not a regex: {e}")
        if not 4 <= self.hash_length <= 64:
            errors.append("hash_length: must be between 4 and 64")
        if self.max_depth < 1:
            errors.append("max_depth: must be at least 1")
        return errors
