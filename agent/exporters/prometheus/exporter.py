"""PrometheusExporter: keeps the latest value of every series and serves it on ``/metrics``.

``consume`` translates a batch (``agent.promnames``) and updates the series store in
memory; it never waits on I/O. A scrape renders the store in the format the
scraper's ``Accept`` asks for (Prometheus asks for OpenMetrics, which carries the
exemplars). Scrape with ``honor_labels: true`` so that the ``job``/``instance`` labels
taken from each resource are kept rather than renamed to ``exported_job``...
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent.component import Capabilities, Host, Settings, Signal, cancel_tasks
from agent.config import split_endpoint
from agent.exporters.prometheus.config import PrometheusConfig
from agent.exporters.prometheus.exposition import (
    OPENMETRICS_CONTENT_TYPE,
    TEXT_CONTENT_TYPE,
    SeriesStore,
    wants_openmetrics,
)
from agent.pdata import Batch, MetricBatch
from agent.promnames import Translator


class PrometheusExporter:
    """A METRICS exporter that is a scrape target. See the module docstring."""

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: PrometheusConfig) -> None:
        self.settings = settings
        self.config = config
        self.tel = settings.telemetry
        self.translator = Translator(config)
        self.store = SeriesStore(expiration=config.metric_expiration,
                                 max_series=config.max_series)
        self._series_gauge = self.tel.gauge(
            "mlagent_agent_prometheus_series", "Series exposed by a prometheus exporter.")
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.bound_port: int | None = None  # the real port (useful when configured as 0)

    async def start(self, host: Host) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        addr, port = split_endpoint(self.config.endpoint)
        site = web.TCPSite(runner, addr, port, reuse_address=True)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        if server is not None and server.sockets:  # type: ignore[attr-defined]
            self.bound_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._sweeper = asyncio.create_task(self._sweep(), name=f"{self.settings.id}-expiry")

    async def consume(self, batch: Batch) -> None:
        """Fold the batch's points into the store. Never blocks; bad points are dropped."""
        if not isinstance(batch, MetricBatch):
            return
        stored = 0
        drops: dict[str, int] = {}
        for p in self.translator.translate(batch.request):
            reason = self.store.update(p)
            if reason is None:
                stored += 1
            else:
                drops[reason] = drops.get(reason, 0) + 1
        for reason, n in self.translator.take_skipped().items():
            drops[reason] = drops.get(reason, 0) + n
        for reason, n in drops.items():
            self.tel.dropped(Signal.METRICS, n, reason)
        if stored:
            self.tel.accepted(Signal.METRICS, stored)
        self._series_gauge.labels().set(self.store.series_count)

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        om = wants_openmetrics(request.headers.get("Accept"))
        body = self.store.render(openmetrics=om, exemplars=self.config.exemplars)
        self._series_gauge.labels().set(self.store.series_count)
        resp = web.Response(body=body)
        # Set as a header: aiohttp's content_type= would drop the version parameter.
        resp.headers["Content-Type"] = OPENMETRICS_CONTENT_TYPE if om else TEXT_CONTENT_TYPE
        return resp

    async def _sweep(self) -> None:
        """Expire silent series and delta state even when nobody scrapes."""
        interval = max(1.0, min(self.config.metric_expiration / 2, 60.0))
        while True:
            await asyncio.sleep(interval)
            self.store.expire()
            self.translator.expire()
            self._series_gauge.labels().set(self.store.series_count)

    async def shutdown(self) -> None:
        """Stop serving. Idempotent; nothing is buffered, so nothing to flush."""
        await cancel_tasks(self._sweeper)
        self._sweeper = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
