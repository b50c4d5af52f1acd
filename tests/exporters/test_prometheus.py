"""The ``prometheus`` exporter: /metrics in both formats, checked by promtool and scraped
by a real Prometheus 2.42 (values through PromQL, exemplars through query_exemplars)."""

from __future__ import annotations

import subprocess
import time

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric
from opentelemetry.sdk.metrics import Counter, Histogram, MeterProvider
from opentelemetry.sdk.metrics.export import AggregationTemporality as SdkTemporality
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as text_0_0_4_families

from agent.component import Kind
from agent.config import ConfigError, load_config
from agent.exporters.prometheus import PrometheusConfig, factory
from agent.exporters.prometheus.exposition import SeriesStore, wants_openmetrics
from agent.pdata import MetricBatch
from agent.promnames import TranslationConfig, Translator
from agent.telemetry import Telemetry
from agent.testing import gauge, make_host, metric_batch, monotonic_sum, settings_for
from tests import prom_server
from tests.prom_server import PromServer, prometheus_binary

RES = {"service.name": "infer", "service.namespace": "ml", "service.instance.id": "pod-1",
       "deployment.environment": "test"}
OM_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
             "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
NOW_NS = time.time_ns()


@pytest.fixture
async def exporter(tmp_path):
    telemetry = Telemetry()
    cfg = PrometheusConfig(endpoint="127.0.0.1:0")
    exp = factory.create(settings_for("prometheus", Kind.EXPORTER, telemetry), cfg, {})
    exp.telemetry = telemetry
    await exp.start(make_host(tmp_path / "state"))
    yield exp
    await exp.shutdown()


async def scrape(exp, accept: str | None = None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{exp.bound_port}/metrics", headers=headers) as r:
        assert r.status == 200
        return r.headers["Content-Type"], await r.text()


def histogram(name: str, bounds, counts, *, unit="s", attrs=None, exemplar=None,
              t=NOW_NS) -> Metric:
    m = Metric(name=name, unit=unit, description="Request latency.")
    m.histogram.aggregation_temporality = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    dp = m.histogram.data_points.add(time_unix_nano=t, start_time_unix_nano=1,
                                     explicit_bounds=bounds, bucket_counts=counts,
                                     count=sum(counts), sum=1.25)
    for k, v in (attrs or {}).items():
        dp.attributes.add(key=k).value.string_value = v
    if exemplar:
        value, trace_id, span_id = exemplar
        dp.exemplars.add(as_double=value, trace_id=trace_id, span_id=span_id, time_unix_nano=t)
    return m


def summary(name: str) -> Metric:
    m = Metric(name=name, unit="s")
    dp = m.summary.data_points.add(time_unix_nano=NOW_NS, count=10, sum=5.5)
    dp.quantile_values.add(quantile=0.5, value=0.5)
    dp.quantile_values.add(quantile=0.99, value=0.99)
    return m


def sample_batch() -> MetricBatch:
    counter = monotonic_sum("model.requests", [({"model": "resnet", "http.method": "GET"}, 7)],
                            time=NOW_NS)
    counter.sum.data_points[0].exemplars.add(as_int=1, trace_id=b"\xab" * 16, span_id=b"\xcd" * 8,
                                             time_unix_nano=NOW_NS)
    return metric_batch([
        gauge("gpu.utilization", [({"gpu": "0"}, 0.75), ({"gpu": "1"}, 0.25)], unit="1",
              time=NOW_NS),
        counter,
        histogram("request.duration", [0.1, 0.5, 1.0], [1, 2, 3, 1],
                  exemplar=(0.3, b"\x11" * 16, b"\x22" * 8)),
        summary("queue.wait"),
    ], resource=RES)


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([prometheus_binary("promtool"), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=60)


# ----------------------------------------------------------------------------- unit


async def test_text_format_by_default_and_it_passes_promtool(exporter):
    await exporter.consume(sample_batch())
    ctype, text = await scrape(exporter)
    assert ctype.startswith("text/plain; version=0.0.4")
    assert "# EOF" not in text and " # {" not in text  # no exemplars in 0.0.4
    lines = set(text.splitlines())
    labels = 'instance="pod-1",job="ml/infer"'
    assert f'gpu_utilization_ratio{{gpu="0",{labels}}} 0.75' in lines
    assert "# TYPE model_requests_total counter" in lines
    assert f'model_requests_total{{http_method="GET",{labels},model="resnet"}} 7.0' in lines
    assert f'request_duration_seconds_bucket{{{labels},le="0.5"}} 3.0' in lines
    assert f'request_duration_seconds_bucket{{{labels},le="+Inf"}} 7.0' in lines
    assert f"request_duration_seconds_count{{{labels}}} 7.0" in lines
    assert f'queue_wait_seconds{{{labels},quantile="0.99"}} 0.99' in lines
    assert f'target_info{{deployment_environment="test",{labels}}} 1.0' in lines
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_openmetrics_when_asked_with_exemplars_and_eof(exporter):
    await exporter.consume(sample_batch())
    ctype, text = await scrape(exporter, OM_ACCEPT)
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    lines = text.splitlines()
    assert "# TYPE model_requests counter" in lines
    assert "# TYPE target info" in lines
    counter = next(line for line in lines if line.startswith("model_requests_total{"))
    assert counter.endswith(f'# {{trace_id="{"ab" * 16}",span_id="{"cd" * 8}"}} 1.0 '
                            f"{NOW_NS // 1_000_000 / 1000:.3f}")
    bucket = next(line for line in lines if 'bucket{' in line and 'le="0.5"' in line)
    assert f'# {{trace_id="{"11" * 16}",span_id="{"22" * 8}"}} 0.3' in bucket
    assert sum(" # {" in line for line in lines) == 2  # nowhere else
    # promtool 2.42 only parses text 0.0.4; prometheus_client's OpenMetrics parser is
    # strict (EOF, exemplar syntax and size, info and counter naming, le ordering).
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["target"].type == "info"
    (ex_sample,) = [s for s in families["request_duration_seconds"].samples if s.exemplar]
    assert ex_sample.exemplar.labels["trace_id"] == "11" * 16


@pytest.mark.parametrize(("accept", "om"), [
    (OM_ACCEPT, True), ("text/plain", False), (None, False),
    ("application/openmetrics-text; version=1.0.0", True),
    ("application/openmetrics-text;q=0,text/plain", False),
])
def test_content_negotiation(accept, om):
    assert wants_openmetrics(accept) is om


async def test_delta_counter_is_exposed_cumulative(exporter):
    delta = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
    for i, v in enumerate([3, 4, 5]):
        await exporter.consume(metric_batch([monotonic_sum(
            "tokens", [({}, v)], start=NOW_NS + i, time=NOW_NS + i + 1, temporality=delta)],
            resource=RES))
    _, text = await scrape(exporter)
    assert 'tokens_total{instance="pod-1",job="ml/infer"} 12.0' in text.splitlines()


async def test_suffixes_off_leaves_counter_names_as_they_are(tmp_path):
    """``add_metric_suffixes = false``: a counter named ``requests_total`` keeps its one
    ``_total`` and ``tokens`` gets none in text 0.0.4; OpenMetrics, whose counter
    samples must end in ``_total``, names both families without it."""
    exp = factory.create(settings_for("prometheus", Kind.EXPORTER, Telemetry()),
                         PrometheusConfig(endpoint="127.0.0.1:0", add_metric_suffixes=False,
                                          target_info=False), {})
    await exp.start(make_host(tmp_path))
    try:
        await exp.consume(metric_batch([
            monotonic_sum("requests_total", [({}, 3)], time=NOW_NS),
            monotonic_sum("tokens", [({}, 5)], unit="{token}", time=NOW_NS)], resource=RES))
        _, text = await scrape(exp)
        _, om = await scrape(exp, OM_ACCEPT)
    finally:
        await exp.shutdown()
    labels = '{instance="pod-1",job="ml/infer"}'
    lines = text.splitlines()
    assert "# TYPE requests_total counter" in lines
    assert f"requests_total{labels} 3.0" in lines
    assert "# TYPE tokens counter" in lines
    assert f"tokens{labels} 5.0" in lines
    assert "_total_total" not in text
    om_lines = om.splitlines()
    assert "# TYPE requests counter" in om_lines and f"requests_total{labels} 3.0" in om_lines
    assert "# TYPE tokens counter" in om_lines and f"tokens_total{labels} 5.0" in om_lines
    families = {f.name: f for f in text_string_to_metric_families(om)}
    assert [s.value for s in families["requests"].samples] == [3.0]
    assert [s.value for s in families["tokens"].samples] == [5.0]
    parsed = {f.name: f for f in text_0_0_4_families(text)}
    assert parsed["requests"].samples[0].name == "requests_total"


async def test_newer_point_replaces_older_and_older_is_dropped(exporter):
    await exporter.consume(metric_batch([gauge("temp", [({}, 50)], time=NOW_NS + 10**7)]))
    await exporter.consume(metric_batch([gauge("temp", [({}, 40)], time=NOW_NS)]))
    _, text = await scrape(exporter)
    assert any(line.startswith("temp{") and line.endswith(" 50.0") for line in text.splitlines())
    assert exporter.telemetry.snapshot("prometheus")[
        "mlagent_agent_dropped_items_total{reason=out_of_order,signal=metrics}"] == 1


async def test_drops_from_translation_and_store_add_up(exporter):
    delta = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA

    def batch(t):
        return metric_batch([gauge("temp", [({}, 1)], time=t), monotonic_sum(
            "n", [({}, 1)], start=NOW_NS, time=t, temporality=delta)])

    await exporter.consume(batch(NOW_NS + 10**7))
    await exporter.consume(batch(NOW_NS))  # older gauge (store) and overlapping delta
    assert exporter.telemetry.snapshot("prometheus")[
        "mlagent_agent_dropped_items_total{reason=out_of_order,signal=metrics}"] == 2


async def test_series_that_stop_reporting_expire(exporter):
    now = [1000.0]
    exporter.store.clock = lambda: now[0]
    await exporter.consume(metric_batch([gauge("old", [({}, 1)], time=NOW_NS)]))
    now[0] += exporter.config.metric_expiration - 1
    await exporter.consume(metric_batch([gauge("fresh", [({}, 1)], time=NOW_NS)]))
    now[0] += 2  # "old" is now past metric_expiration, "fresh" is not
    _, text = await scrape(exporter)
    assert "fresh{" in text and "old{" not in text and "# TYPE old " not in text


async def test_type_conflicts_and_series_limit_are_dropped_and_counted(tmp_path):
    telemetry = Telemetry()
    exp = factory.create(settings_for("prometheus", Kind.EXPORTER, telemetry),
                         PrometheusConfig(endpoint="127.0.0.1:0", max_series=3,
                                          target_info=False), {})
    await exp.consume(metric_batch([gauge("x", [({"i": str(i)}, i) for i in range(5)])]))
    await exp.consume(metric_batch([monotonic_sum("x", [({}, 1)])]))  # a counter "x"
    snap = telemetry.snapshot("prometheus")
    assert snap["mlagent_agent_dropped_items_total{reason=series_limit,signal=metrics}"] == 2
    assert snap["mlagent_agent_dropped_items_total{reason=type_conflict,signal=metrics}"] == 1
    assert exp.store.series_count == 3
    await exp.shutdown()  # never started: still fine


async def test_no_recorded_value_removes_the_series(exporter):
    await exporter.consume(metric_batch([gauge("g", [({"a": "1"}, 1)], time=NOW_NS)]))
    ended = gauge("g", [({"a": "1"}, 0)], time=NOW_NS + 1)
    ended.gauge.data_points[0].flags = 1
    await exporter.consume(metric_batch([ended]))
    _, text = await scrape(exporter)
    assert 'g{a="1"' not in text


async def test_label_values_are_escaped_and_output_stays_valid(exporter):
    await exporter.consume(metric_batch([gauge("weird", [({"path": 'a"b\\c\nd'}, 1)],
                                               time=NOW_NS)]))
    _, text = await scrape(exporter)
    assert 'path="a\\"b\\\\c\\nd"' in text
    assert promtool_check(text).returncode == 0


async def test_shutdown_is_idempotent_and_frees_the_port(exporter):
    port = exporter.bound_port
    await exporter.shutdown()
    await exporter.shutdown()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as http:
            await http.get(f"http://127.0.0.1:{port}/metrics")


@settings(max_examples=150, deadline=None)
@given(name=st.text(min_size=1, max_size=20), unit=st.text(max_size=6),
       attrs=st.dictionaries(st.text(max_size=12), st.text(max_size=20), max_size=4),
       value=st.floats(allow_nan=False, allow_infinity=False, min_value=0))
def test_any_names_and_values_render_parseable_exposition(name, unit, attrs, value):
    """Whatever the sender names things, both formats parse (the OpenMetrics parser of
    prometheus_client is strict) and the value survives."""
    translator = Translator(TranslationConfig())
    store = SeriesStore(expiration=60, max_series=100)
    batch = metric_batch([monotonic_sum(name, [(attrs, value)], unit=unit, time=NOW_NS)],
                         resource={"service.name": name})
    for p in translator.translate(batch.request):
        assert store.update(p) is None
    om = {f.name: f for f in text_string_to_metric_families(
        store.render(openmetrics=True).decode())}
    counters = [f for f in om.values() if f.type == "counter"]
    assert [s.value for s in counters[0].samples] == [value]
    text = store.render(openmetrics=False).decode()
    parsed = {f.name: f for f in text_0_0_4_families(text)}
    assert any(s.value == value for f in parsed.values() if f.type == "counter"
               for s in f.samples)


def test_config_from_toml_with_typo():
    registry = {Kind.EXPORTER: {"prometheus": factory}, Kind.RECEIVER: {}}
    with pytest.raises(ConfigError) as e:
        load_config('[exporters.prometheus]\nendpont = "127.0.0.1:1"\nmetric_expiration = "x"\n'
                    '[service.pipelines.metrics]\nreceivers = []\nexporters = ["prometheus"]\n',
                    registry)
    text = "\n".join(e.value.errors)
    assert "exporters.prometheus.endpont: unknown key (did you mean 'endpoint'?)" in text
    assert "exporters.prometheus.metric_expiration:" in text


def test_missing_prometheus_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setattr(prom_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(prom_server.os.path, "exists", lambda path: False)
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="prometheus binary not found"):
        prometheus_binary()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        prometheus_binary()


# ----------------------------------------------------------------------------- real Prometheus


def sdk_batches(resource: Resource):
    """Real SDK instruments, exemplars taken from real SDK spans, delta temporality."""
    reader = InMemoryMetricReader(preferred_temporality={
        Counter: SdkTemporality.DELTA, Histogram: SdkTemporality.DELTA})
    provider = MeterProvider(resource=resource, metric_readers=[reader], views=[
        View(instrument_name="queue.size", aggregation=ExponentialBucketHistogramAggregation())])
    meter = provider.get_meter("test")
    tracer = TracerProvider(resource=resource).get_tracer("test")
    latency = meter.create_histogram("inference.latency", unit="s")
    requests = meter.create_counter("inference.requests")
    qsize = meter.create_histogram("queue.size")
    span_ids: list[tuple[str, str]] = []

    def record(n: int):
        for i in range(n):
            with tracer.start_as_current_span("predict") as span:
                ctx = span.get_span_context()
                span_ids.append((f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"))
                latency.record(0.2 + i / 100, {"model": "resnet"})
                requests.add(1, {"model": "resnet"})
                qsize.record(2 ** i)
        return MetricBatch(encode_metrics(reader.get_metrics_data()))

    return record, span_ids, provider


@pytest.mark.integration
async def test_real_prometheus_scrapes_values_and_exemplars(exporter, tmp_path):
    async with PromServer(tmp_path / "prom", scrape_targets=(
            f"127.0.0.1:{exporter.bound_port}",)) as prom:
        record, span_ids, provider = sdk_batches(Resource.create(
            {"service.name": "infer", "service.namespace": "ml",
             "service.instance.id": "pod-1"}))
        await exporter.consume(record(3))
        await exporter.consume(record(4))  # a second delta collection: totals must add up
        await exporter.consume(sample_batch())
        provider.shutdown()

        sel = '{job="ml/infer",instance="pod-1"}'
        got = await prom.wait_for(f"inference_requests_total{sel}", lambda v: v)
        assert list(got.values()) == [7.0]
        got = await prom.wait_for('inference_latency_seconds_count{model="resnet"}',
                                  lambda v: v)
        assert list(got.values()) == [7.0]
        got = await prom.values('inference_latency_seconds_bucket{le="+Inf"}')
        assert list(got.values()) == [7.0]
        # Exponential histogram -> power-of-two buckets: 1,2,4,1,2,4,8 recorded.
        got = await prom.values('queue_size_bucket{le="4.0"}')
        assert list(got.values()) == [6.0]
        got = await prom.values("gpu_utilization_ratio")
        assert sorted(got.values()) == [0.25, 0.75]
        got = await prom.values('queue_wait_seconds{quantile="0.5"}')
        assert list(got.values()) == [0.5]
        got = await prom.values('target_info{job="ml/infer"}')
        assert dict(next(iter(got))) ["deployment_environment"] == "test"

        # OpenMetrics was negotiated (exemplars only exist there) and parsed cleanly.
        (target,) = await prom.targets()
        assert target["health"] == "up" and target["lastError"] == ""
        exemplars = await prom.exemplars("inference_latency_seconds_bucket")
        got_ids = {(e["labels"]["trace_id"], e["labels"]["span_id"])
                   for series in exemplars for e in series["exemplars"]}
        assert got_ids and got_ids <= set(span_ids)
        exemplars = await prom.exemplars("model_requests_total")
        assert exemplars[0]["exemplars"][0]["labels"]["trace_id"] == "ab" * 16
