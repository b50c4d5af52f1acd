"""Typed configuration of the ``alerts`` exporter: evaluation, rules and notifiers.

Rules and notifiers are kept as raw tables in ``AlertsConfig`` and decoded by
``decode_rules`` / ``decode_notifiers`` below, for two reasons: a rule's hold duration
is written ``for`` (a Python keyword, so it cannot be a dataclass field name), and a
notifier table's schema depends on its type (``slack``, ``pagerduty``...). Both decoders
use ``agent.config.decode_dataclass``, so their errors carry the same key paths as the
rest of the config (``exporters.alerts.rules[2].op: ...``). Everything here is pure.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agent.config import ConfigError, Duration, _did_you_mean, decode_dataclass
from agent.queue import RetryConfig

LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")
# ``{{ value }}``, ``{{ labels.service_name }}``: the whole template language.
TEMPLATE_RE = re.compile(r"\{\{\s*(.*?)\s*\}\}")
TEMPLATE_NAMES = ("value", "threshold", "alertname", "metric", "severity")
# Matcher operators, written as a prefix of the matched value (see README).
MATCHER_PREFIXES = ("!~", "!=", "~", "!", "=")

Op = Literal[">", ">=", "<", "<=", "==", "!="]
Aggregate = Literal["max", "min", "avg", "sum", "count"]


def sanitize_label(name: str) -> str:
    """An attribute name as an Alertmanager label name (``service.name`` -> ``service_name``)."""
    out = _INVALID_LABEL_CHARS.sub("_", name)
    return out if out and not out[0].isdigit() else "_" + out


def check_template(text: str, path: str, *, allow_value: bool = True) -> list[str]:
    """Errors for placeholders that ``render`` would not understand."""
    errors = []
    for m in TEMPLATE_RE.finditer(text):
        name = m.group(1)
        if name.startswith("labels."):
            if not LABEL_NAME_RE.match(name[len("labels."):]):
                errors.append(f"{path}: {{{{ {name} }}}}: label names use [a-zA-Z0-9_] "
                              "(dots in attribute names become _)")
        elif name not in TEMPLATE_NAMES:
            errors.append(f"{path}: unknown placeholder {{{{ {name} }}}}"
                          + _did_you_mean(name, TEMPLATE_NAMES)
                          + f"; known: {', '.join(TEMPLATE_NAMES)}, labels.<name>")
        elif name == "value" and not allow_value:
            errors.append(f"{path}: {{{{ value }}}} is not allowed in a label: labels are the "
                          "alert's identity and would change on every evaluation")
    return errors


def check_matchers(matchers: Mapping[str, str], path: str) -> list[str]:
    """Regex matchers must compile (checked at config time, compiled again in ``rules``)."""
    errors = []
    for key, spec in matchers.items():
        if not isinstance(spec, str):
            continue
        for prefix in ("!~", "~"):
            if spec.startswith(prefix):
                try:
                    re.compile(spec[len(prefix):])
                except re.error as e:
                    errors.append(f"{path}.{key}: invalid regular expression: {e}")
                break
    return errors


@dataclass
class DivideBy:
    """``divide_by``: the denominator of a ratio rule (``errors / requests``).

    It is grouped and aggregated like the rule's own metric; ``matchers`` default to
    the rule's.
    """

    metric: str = ""
    matchers: dict[str, str] | None = None

    def validate(self) -> list[str]:
        errors = [] if self.metric else ["metric: is required"]
        return errors + check_matchers(self.matchers or {}, "matchers")


@dataclass
class RuleConfig:
    """One alerting rule (``[[exporters.alerts.rules]]`` or ``[[rules]]`` in a rules file).

    The rule's value per group is ``aggregate`` over the fresh series of ``metric`` that
    match ``matchers``, grouped by the attributes in ``by``; each series contributes its
    latest point (``stat``, ``quantile`` or ``rate`` of it). The alert for a group is
    pending while ``value op threshold`` holds and fires once it held for ``for_``.
    """

    name: str = ""
    metric: str = ""
    matchers: dict[str, str] = field(default_factory=dict)
    stat: Literal["value", "count", "sum", "mean"] = "value"
    quantile: float | None = None
    rate: bool = False
    divide_by: DivideBy | None = None
    aggregate: Aggregate = "max"
    by: list[str] = field(default_factory=list)
    op: Op = ">"
    threshold: float = 0.0
    for_: Duration = 0.0  # written ``for`` in TOML
    keep_firing_for: Duration = 0.0
    severity: str = "warning"
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)

    def validate(self) -> list[str]:
        errors = []
        if not self.name:
            errors.append("name: is required (it becomes the alertname label)")
        if not self.metric:
            errors.append("metric: is required")
        errors += check_matchers(self.matchers, "matchers")
        if self.quantile is not None:
            if not 0 < self.quantile < 1:
                errors.append("quantile: must be within 0..1 (exclusive), e.g. 0.99")
            if self.stat != "value":
                errors.append("quantile: cannot be combined with stat "
                              f"{self.stat!r}; use one of them")
            if self.rate:
                errors.append("rate: a quantile has no rate")
        if self.rate and self.stat == "mean":
            errors.append("rate: applies to value, count or sum, not mean")
        if not math.isfinite(self.threshold):
            errors.append("threshold: must be a finite number")
        for i, name in enumerate(self.by):
            if not name:
                errors.append(f"by[{i}]: attribute name is empty")
        if not self.severity:
            errors.append("severity: must not be empty")
        for key, value in self.labels.items():
            if not LABEL_NAME_RE.match(key):
                errors.append(f"labels.{key}: label names must match [a-zA-Z_][a-zA-Z0-9_]*")
            elif key in ("alertname", "severity"):
                errors.append(f"labels.{key}: is set from the rule's "
                              f"{'name' if key == 'alertname' else 'severity'}")
            errors += check_template(value, f"labels.{key}", allow_value=False)
        for key, value in self.annotations.items():
            if not LABEL_NAME_RE.match(key):
                # Alertmanager answers 400 "invalid annotations: invalid name" to every send.
                errors.append(f"annotations.{key}: rule {self.name!r}: annotation names must "
                              f"match [a-zA-Z_][a-zA-Z0-9_]* (Alertmanager refuses the alert "
                              f"otherwise), e.g. {sanitize_label(key)!r}")
            errors += check_template(value, f"annotations.{key}")
        return errors


@dataclass
class NotifierConfig:
    """Settings every sending notifier has: its own bounded queue and retry."""

    queue_size: int = 1000
    timeout: Duration = 10.0  # per HTTP request
    retry: RetryConfig = field(default_factory=lambda: RetryConfig(max_elapsed_time=120.0))
    send_resolved: bool = True

    def validate(self) -> list[str]:
        errors = []
        if self.queue_size < 1:
            errors.append("queue_size: must be at least 1")
        if self.timeout <= 0:
            errors.append("timeout: must be positive")
        return errors


def _check_url(url: str, key: str) -> list[str]:
    if not url:
        return [f"{key}: is required"]
    if not url.startswith(("http://", "https://")):
        return [f"{key}: {url!r} is not an http:// or https:// URL"]
    return []


@dataclass
class AlertmanagerConfig(NotifierConfig):
    """``notifiers.alertmanager``: Alertmanager API v2, every URL of an HA cluster."""

    urls: list[str] = field(default_factory=list)  # base URLs, e.g. http://127.0.0.1:9093
    resend_interval: Duration = 60.0
    resolved_retention: Duration = 900.0
    max_batch: int = 64  # alerts per POST

    def validate(self) -> list[str]:
        errors = super().validate()
        if not self.urls:
            errors.append("urls: at least one Alertmanager URL is required")
        for i, url in enumerate(self.urls):
            errors += _check_url(url, f"urls[{i}]")
        if self.resend_interval <= 0:
            errors.append("resend_interval: must be positive")
        if self.max_batch < 1:
            errors.append("max_batch: must be at least 1")
        return errors


@dataclass
class SlackConfig(NotifierConfig):
    """``notifiers.slack``: a Slack incoming webhook."""

    webhook_url: str = ""
    rate_limit: float = 1.0  # messages per second to this webhook

    def validate(self) -> list[str]:
        errors = super().validate() + _check_url(self.webhook_url, "webhook_url")
        if self.rate_limit <= 0:
            errors.append("rate_limit: must be positive (messages per second)")
        return errors


PagerDutySeverity = Literal["critical", "error", "warning", "info"]


@dataclass
class PagerDutyConfig(NotifierConfig):
    """``notifiers.pagerduty``: PagerDuty Events API v2."""

    routing_key: str = ""
    url: str = "https://events.pagerduty.com/v2/enqueue"
    source: str = ""  # payload.source; the host name when empty
    default_severity: PagerDutySeverity = "warning"  # for rule severities it cannot map

    def validate(self) -> list[str]:
        errors = super().validate() + _check_url(self.url, "url")
        if not self.routing_key:
            errors.append("routing_key: is required (the integration key of the service)")
        return errors


@dataclass
class WebhookConfig(NotifierConfig):
    """``notifiers.webhook``: Alertmanager-webhook-compatible JSON to any URL."""

    url: str = ""
    receiver: str = ""  # the payload's "receiver"; the notifier id when empty

    def validate(self) -> list[str]:
        return super().validate() + _check_url(self.url, "url")


@dataclass
class LogConfig:
    """``notifiers.log``: one structured log line per alert transition."""

    send_resolved: bool = True


NOTIFIER_TYPES: dict[str, type] = {
    "alertmanager": AlertmanagerConfig,
    "slack": SlackConfig,
    "pagerduty": PagerDutyConfig,
    "webhook": WebhookConfig,
    "log": LogConfig,
}
_NOTIFIER_ID_RE = re.compile(r"^[a-z]+(/[A-Za-z0-9_.\-]+)?$")


def decode_rules(raw: Any, path: str, errors: list[str]) -> list[RuleConfig]:
    """Decode a list of rule tables, appending ``path[i].key: message`` errors."""
    if not isinstance(raw, list):
        errors.append(f"{path}: expected a list of rule tables, got {raw!r}")
        return []
    rules: list[RuleConfig] = []
    first_index: dict[str, int] = {}
    for i, table in enumerate(raw):
        rpath = f"{path}[{i}]"
        if isinstance(table, Mapping):
            table = {("for_" if k == "for" else k): v for k, v in table.items()}
        local: list[str] = []
        rule = decode_dataclass(RuleConfig, table, rpath, local)
        errors.extend(e.replace(f"{rpath}.for_:", f"{rpath}.for:").replace("'for_'", "'for'")
                      for e in local)
        if rule.name and rule.name in first_index:
            errors.append(f"{rpath}.name: {rule.name!r} is already the name of rule "
                          f"[{first_index[rule.name]}]; alert identity needs unique names")
        first_index.setdefault(rule.name, i)
        if not local:
            rules.append(rule)
    return rules


def decode_notifiers(raw: Any, path: str, errors: list[str]) -> dict[str, Any]:
    """Decode ``{"type" or "type/name": table}`` into typed notifier configs."""
    if not isinstance(raw, Mapping):
        errors.append(f"{path}: expected a table of notifiers, got {raw!r}")
        return {}
    out: dict[str, Any] = {}
    for nid, body in raw.items():
        npath = f"{path}.{nid}"
        ntype = nid.split("/", 1)[0]
        cls = NOTIFIER_TYPES.get(ntype)
        if not _NOTIFIER_ID_RE.match(nid) or cls is None:
            errors.append(f"{npath}: unknown notifier type {ntype!r}"
                          + _did_you_mean(ntype, NOTIFIER_TYPES)
                          + f"; known: {', '.join(NOTIFIER_TYPES)} (id is 'type' or 'type/name')")
            continue
        out[nid] = decode_dataclass(cls, body, npath, errors)
    return out


@dataclass
class RulesFile:
    """A separate rules file: ``[[rules]]`` tables, as in the exporter config."""

    rules: list[dict[str, Any]] = field(default_factory=list)


def load_rules_file(path: Path) -> list[RuleConfig]:
    """Read and decode a rules file. Raises ``ConfigError`` naming the file and every problem."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError([f"cannot read rules file: {e.strerror or e}"], str(path)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"TOML syntax error: {e}"], str(path)) from None
    errors: list[str] = []
    body = decode_dataclass(RulesFile, raw, "", errors)
    rules = decode_rules(body.rules, "rules", errors) if not errors else []
    if errors:
        raise ConfigError(errors, str(path))
    return rules


@dataclass
class AlertsConfig:
    """``[exporters.alerts]``: rule evaluation over the metrics that flow through it."""

    interval: Duration = 15.0  # evaluation period
    staleness: Duration = 300.0  # a series not updated for this long does not count
    rules: list[dict[str, Any]] = field(default_factory=list)  # see RuleConfig
    rules_file: Path | None = None  # more rules, read at start (and so on every reload)
    # Include the rules shipped with the agent (config/alerts.toml in the source tree);
    # a rule of the same name in `rules` or `rules_file` replaces the shipped one.
    default_rules: bool = False
    notifiers: dict[str, dict[str, Any]] = field(default_factory=lambda: {"log": {}})
    trace_link_template: str = ""  # e.g. "http://jaeger:16686/trace/{trace_id}"
    external_url: str = ""  # generatorURL of Alertmanager alerts
    max_series: int = 10_000  # series kept for evaluation, over all rules
    max_alerts: int = 1_000  # pending + firing + recently resolved alerts
    max_exemplars: int = 3  # trace ids kept per series and shown per alert
    # After a restart, restored alerts whose series have not reported again yet are
    # held as they were (not resolved, pending time kept) for this long.
    restore_grace: Duration = 60.0
    shutdown_timeout: Duration = 5.0  # to drain notifier queues

    def validate(self) -> list[str]:
        errors: list[str] = []
        if self.interval <= 0:
            errors.append("interval: must be positive")
        if self.staleness <= 0:
            errors.append("staleness: must be positive")
        for key in ("max_series", "max_alerts", "max_exemplars"):
            if getattr(self, key) < 1:
                errors.append(f"{key}: must be at least 1")
        if self.external_url:
            # Alertmanager refuses every alert whose generatorURL is not a URL.
            errors += _check_url(self.external_url, "external_url")
        if self.trace_link_template and "{trace_id}" not in self.trace_link_template:
            errors.append("trace_link_template: must contain {trace_id}")
        decode_rules(self.rules, "rules", errors)
        decode_notifiers(self.notifiers, "notifiers", errors)
        return errors
