"""Strict contract servers for Slack incoming webhooks and PagerDuty Events API v2.

Neither service can be run locally, so these servers enforce the published request
contract (PROTOCOLS.md): a request that the real service would refuse gets the real
service's 400, and only valid requests are recorded. ``fail_next`` scripts the
next answers (429 with ``Retry-After``, 5xx, 400) to test retries. Servers listen on
127.0.0.1 with an ephemeral port.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from aiohttp import web

SLACK_TOP_KEYS = {"text", "blocks", "attachments", "username", "icon_emoji", "icon_url",
                  "channel", "thread_ts", "mrkdwn", "unfurl_links", "unfurl_media"}
SLACK_BLOCK_TYPES = {"header", "section", "context", "divider", "actions", "image"}
PD_TOP_KEYS = {"routing_key", "event_action", "dedup_key", "payload", "images", "links",
               "client", "client_url"}
PD_PAYLOAD_KEYS = {"summary", "source", "severity", "timestamp", "component", "group", "class",
                   "custom_details"}
PD_SEVERITIES = {"critical", "error", "warning", "info"}


class ContractServer:
    """An aiohttp server on 127.0.0.1 that validates, records and answers requests.

    ``attempts`` holds every well-formed request body in arrival order (scripted
    failures included, so retries can be compared); ``accepted`` only those answered
    with success; ``rejected`` the problems found in invalid requests.
    """

    path = "/"

    def __init__(self) -> None:
        self.attempts: list[Any] = []
        self.accepted: list[Any] = []
        self.rejected: list[list[str]] = []
        self._script: list[tuple[int, dict[str, str], str]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def fail_next(self, status: int, headers: Mapping[str, str] | None = None,
                  body: str = "") -> None:
        """Answer the next valid request with ``status`` instead of success."""
        self._script.append((status, dict(headers or {}), body))

    async def start(self) -> ContractServer:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ContractServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path != self.path:
            return web.Response(status=404, text="not found")
        if request.method != "POST":
            return web.Response(status=405, text="method not allowed")
        if request.content_type != "application/json":
            return self.invalid([f"content type {request.content_type!r} is not JSON"])
        try:
            body = json.loads(await request.read())
        except ValueError as e:
            return self.invalid([f"body is not JSON: {e}"])
        problems = self.validate(body)
        if problems:
            return self.invalid(problems)
        self.attempts.append(body)
        if self._script:
            status, headers, text = self._script.pop(0)
            return web.Response(status=status, headers=headers, text=text)
        self.accepted.append(body)
        return self.success(body)

    def validate(self, body: Any) -> list[str]:
        raise NotImplementedError

    def invalid(self, problems: list[str]) -> web.Response:
        self.rejected.append(problems)
        return web.Response(status=400, text="; ".join(problems))

    def success(self, body: Any) -> web.Response:
        return web.Response(status=200, text="ok")


def _text_object(obj: Any, where: str, limit: int, kinds: tuple[str, ...]) -> list[str]:
    if not isinstance(obj, dict) or obj.get("type") not in kinds:
        return [f"{where}: must be a text object of type {' or '.join(kinds)}"]
    text = obj.get("text")
    if not isinstance(text, str) or not text:
        return [f"{where}.text: must be a non-empty string"]
    if len(text) > limit:
        return [f"{where}.text: longer than {limit} characters"]
    return []


class SlackServer(ContractServer):
    """A Slack incoming webhook: ``{"text", "blocks"}`` per Block Kit's limits; 200 ``ok``."""

    path = "/services/T0000/B0000/XXXXXXXX"

    def validate(self, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return ["invalid_payload: body must be an object"]
        problems = [f"invalid_payload: unknown key {k!r}" for k in body if k not in SLACK_TOP_KEYS]
        if not isinstance(body.get("text"), str) or not body["text"]:
            problems.append("no_text: text must be set (it is the notification fallback)")
        blocks = body.get("blocks", [])
        if not isinstance(blocks, list) or len(blocks) > 50:
            return [*problems, "invalid_blocks: blocks must be a list of at most 50"]
        for i, b in enumerate(blocks):
            where = f"invalid_blocks: blocks[{i}]"
            if not isinstance(b, dict) or b.get("type") not in SLACK_BLOCK_TYPES:
                problems.append(f"{where}: unknown block type")
                continue
            if b["type"] == "header":
                problems += _text_object(b.get("text"), f"{where}.text", 150, ("plain_text",))
            elif b["type"] == "section":
                if "text" not in b and "fields" not in b:
                    problems.append(f"{where}: a section needs text or fields")
                if "text" in b:
                    problems += _text_object(b["text"], f"{where}.text", 3000,
                                             ("mrkdwn", "plain_text"))
                fields = b.get("fields", [])
                if not isinstance(fields, list) or len(fields) > 10:
                    problems.append(f"{where}.fields: at most 10")
                else:
                    for j, f in enumerate(fields):
                        problems += _text_object(f, f"{where}.fields[{j}]", 2000,
                                                 ("mrkdwn", "plain_text"))
            elif b["type"] == "context":
                elements = b.get("elements")
                if not isinstance(elements, list) or not 1 <= len(elements) <= 10:
                    problems.append(f"{where}.elements: 1 to 10 elements")
                else:
                    for j, e in enumerate(elements):
                        problems += _text_object(e, f"{where}.elements[{j}]", 3000,
                                                 ("mrkdwn", "plain_text"))
        return problems


class PagerDutyServer(ContractServer):
    """PagerDuty Events API v2 ``POST /v2/enqueue``; 202 with the dedup key.

    ``incidents`` maps each dedup key to ``"triggered"`` or ``"resolved"``, as PagerDuty
    would track the incident the events open and close.
    """

    path = "/v2/enqueue"

    def __init__(self) -> None:
        super().__init__()
        self.incidents: dict[str, str] = {}

    def validate(self, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return ["Event object is invalid: must be an object"]
        problems = [f"unknown field {k!r}" for k in body if k not in PD_TOP_KEYS]
        key = body.get("routing_key")
        if not isinstance(key, str) or len(key) != 32:
            problems.append("routing_key: must be a 32-character integration key")
        action = body.get("event_action")
        if action not in ("trigger", "acknowledge", "resolve"):
            problems.append("event_action: must be trigger, acknowledge or resolve")
        dedup = body.get("dedup_key")
        if dedup is not None and (not isinstance(dedup, str) or not dedup or len(dedup) > 255):
            problems.append("dedup_key: must be a string of 1 to 255 characters")
        if action in ("acknowledge", "resolve") and dedup is None:
            problems.append(f"dedup_key: is required to {action}")
        if action == "trigger":
            problems += self._payload(body.get("payload"))
        for i, link in enumerate(body.get("links", [])):
            if not isinstance(link, dict) or not isinstance(link.get("href"), str) \
                    or set(link) - {"href", "text"}:
                problems.append(f"links[{i}]: must be {{href, text}}")
        return problems

    def _payload(self, p: Any) -> list[str]:
        if not isinstance(p, dict):
            return ["payload: is required to trigger"]
        problems = [f"payload: unknown field {k!r}" for k in p if k not in PD_PAYLOAD_KEYS]
        summary = p.get("summary")
        if not isinstance(summary, str) or not 1 <= len(summary) <= 1024:
            problems.append("payload.summary: must be 1 to 1024 characters")
        if not isinstance(p.get("source"), str) or not p["source"]:
            problems.append("payload.source: is required")
        if p.get("severity") not in PD_SEVERITIES:
            problems.append("payload.severity: must be critical, error, warning or info")
        if "timestamp" in p:
            try:
                datetime.fromisoformat(str(p["timestamp"]).replace("Z", "+00:00"))
            except ValueError:
                problems.append("payload.timestamp: not ISO 8601")
        if "custom_details" in p and not isinstance(p["custom_details"], dict):
            problems.append("payload.custom_details: must be an object")
        return problems

    def invalid(self, problems: list[str]) -> web.Response:
        self.rejected.append(problems)
        return web.json_response({"status": "invalid event", "message": "Event object is invalid",
                                  "errors": problems}, status=400)

    def success(self, body: Any) -> web.Response:
        key = body.get("dedup_key") or f"generated-{len(self.accepted)}"
        if body["event_action"] == "trigger":
            self.incidents[key] = "triggered"
        elif body["event_action"] == "resolve" and key in self.incidents:
            self.incidents[key] = "resolved"
        return web.json_response({"status": "success", "message": "Event processed",
                                  "dedup_key": key}, status=202)


class WebhookServer(ContractServer):
    """Records Alertmanager-webhook-format notifications (``version`` "4")."""

    path = "/hook"

    def validate(self, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return ["body must be an object"]
        required = {"version": str, "groupKey": str, "status": str, "receiver": str,
                    "groupLabels": dict, "commonLabels": dict, "commonAnnotations": dict,
                    "externalURL": str, "alerts": list, "truncatedAlerts": int}
        problems = [f"{k}: missing or not {t.__name__}" for k, t in required.items()
                    if not isinstance(body.get(k), t)]
        if body.get("version") != "4":
            problems.append("version: must be \"4\"")
        for i, a in enumerate(body.get("alerts") or []):
            for k in ("status", "labels", "annotations", "startsAt", "endsAt", "generatorURL",
                      "fingerprint"):
                if k not in a:
                    problems.append(f"alerts[{i}].{k}: missing")
        return problems
