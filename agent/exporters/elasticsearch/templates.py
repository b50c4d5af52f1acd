"""Index templates for the exporter's data streams (``create_index_templates = true``).

Without them Elasticsearch's built-in ``logs-*-*`` / ``traces-*-*`` templates apply
and maps ``attributes.*`` dynamically, where an attribute ``a`` next to ``a.b``
is a mapping conflict. These templates map ``attributes`` as one ``flattened``
field, ids as keywords and the timestamp with nanosecond precision.
"""

from __future__ import annotations

from typing import Any

# Above the built-in templates (priority 100), so ours wins for our dataset.
PRIORITY = 200

_KEYWORD = {"type": "keyword", "ignore_above": 1024}


def template_name(kind: str, dataset: str) -> str:
    return f"mlagent-{kind}-{dataset}"


def index_template(kind: str, dataset: str) -> dict[str, Any]:
    """The body of ``PUT _index_template/<template_name>`` for ``<kind>-<dataset>-*``."""
    properties: dict[str, Any] = {
        "@timestamp": {"type": "date_nanos"},
        "data_stream": {"properties": {k: {"type": "constant_keyword"}
                                       for k in ("type", "dataset", "namespace")}},
        "event": {"properties": {"dataset": _KEYWORD, "duration": {"type": "long"},
                                 "outcome": _KEYWORD, "severity": {"type": "long"}}},
        "trace": {"properties": {"id": _KEYWORD}},
        "span": {"properties": {"id": _KEYWORD, "name": _KEYWORD, "kind": _KEYWORD,
                                "status": {"properties": {"code": _KEYWORD,
                                                          "message": {"type": "text"}}}}},
        "parent": {"properties": {"id": _KEYWORD}},
        "service": {"properties": {"name": _KEYWORD, "version": _KEYWORD,
                                   "environment": _KEYWORD}},
        "host": {"properties": {"name": _KEYWORD}},
        "labels": {"type": "object", "dynamic": True},
        "attributes": {"type": "flattened"},
    }
    if kind == "logs":
        properties["message"] = {"type": "match_only_text"}
        properties["log"] = {"properties": {"level": _KEYWORD, "logger": _KEYWORD}}
    return {
        "index_patterns": [f"{kind}-{dataset}-*"],
        "data_stream": {},
        "priority": PRIORITY,
        "template": {"mappings": {
            "dynamic_templates": [{"labels_as_keywords": {
                "path_match": "labels.*", "mapping": _KEYWORD}}],
            "properties": properties,
        }},
        "_meta": {"managed_by": "mlagent"},
    }
