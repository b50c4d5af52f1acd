"""The drift connector end to end: batches in, gauges/histograms and drift log records out."""

from __future__ import annotations

import asyncio
import json
import tomllib
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs
from opentelemetry import trace as otel_trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent.component import Kind, PermanentError, RetryableError, Signal, Status
from agent.config import decode_dataclass
from agent.connectors.drift import DriftConfig, factory
from agent.connectors.drift.reference import (
    NumericHist,
    Reference,
    SubjectKey,
    reference_from_values,
)
from agent.pdata import TraceBatch, attributes_to_dict
from agent.registry import FACTORIES
from agent.telemetry import Telemetry
from agent.testing import Sink, gauge, make_host, metric_batch, settings_for, span, trace_batch


def spans_of(rng: np.random.Generator, n: int, *, shift: float = 0.0, model: str | None = "m",
             version: str | None = "1", extra: dict[str, Any] | None = None) -> list:
    """``n`` prediction spans; feature ``x`` ~ N(shift, 1), ``c`` categorical."""
    labels = rng.choice(["cat", "dog"], size=n, p=[0.6, 0.4])
    scores = rng.beta(8, 2, n)
    xs = rng.normal(shift, 1.0, n)
    cs = rng.choice(["a", "b", "c"], size=n)
    out = []
    for i in range(n):
        attrs: dict[str, Any] = {"ml.prediction.label": str(labels[i]),
                                 "ml.prediction.score": float(scores[i]),
                                 "ml.feature.x": float(xs[i]), "ml.feature.c": str(cs[i]),
                                 **(extra or {})}
        if model is not None:
            attrs["ml.model.name"] = model
        if version is not None:
            attrs["ml.model.version"] = version
        out.append(span("predict", trace_id=rng.bytes(16), span_id=rng.bytes(8), attributes=attrs))
    return out


def batch_of(rng: np.random.Generator, n: int, service: str = "svc", **kw: Any) -> TraceBatch:
    return trace_batch({service: spans_of(rng, n, **kw)})


class Harness:
    """A connector wired to metric and log sinks, with its telemetry at hand."""

    def __init__(self, tmp_path: Any, cfg: DriftConfig | None = None, logs: bool = True) -> None:
        self.telemetry = Telemetry()
        self.metrics, self.logs = Sink(), Sink()
        nxt = {Signal.METRICS: self.metrics}
        if logs:
            nxt[Signal.LOGS] = self.logs
        self.conn = factory.create(settings_for("drift", Kind.CONNECTOR, self.telemetry),
                                   cfg or DriftConfig(), nxt)
        self.host = make_host(tmp_path / "state")
        self.statuses: list[tuple[Status, str | None]] = []
        self.host.report_status = lambda _id, s, e: self.statuses.append((s, e))

    async def __aenter__(self) -> Harness:
        await self.conn.start(self.host)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.shutdown()

    def points(self, name: str, batch: int = -1, **where: str) -> list[tuple[dict, Any]]:
        """``(attributes, data point)`` of metric ``name`` in one emitted batch."""
        out = []
        for rm in self.metrics.batches[batch].request.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name != name:
                        continue
                    kind = m.WhichOneof("data")
                    for dp in getattr(m, kind).data_points:
                        attrs = attributes_to_dict(dp.attributes)
                        if all(attrs.get(k) == v for k, v in where.items()):
                            out.append((attrs, dp))
        return out

    def detected(self, batch: int = -1, **where: str) -> dict[str, float]:
        """Verdicts by kind; against the reference unless ``baseline.version`` is given."""
        where.setdefault("baseline.version", None)  # type: ignore[arg-type]
        return {a["kind"]: dp.as_double for a, dp in self.points("mlagent.drift.detected", batch)
                if all(a.get(k) == v for k, v in where.items())}

    def dropped(self, reason: str) -> float:
        snap = self.telemetry.snapshot("drift")
        return sum(v for k, v in snap.items() if "dropped" in k and f"reason={reason}" in k)


# --------------------------------------------------------------------------- wiring and config


def test_factory_is_registered_and_declares_its_signals() -> None:
    assert "agent.connectors.drift:factory" in FACTORIES
    assert factory.type == "drift" and factory.kind is Kind.CONNECTOR
    assert factory.signals == {Signal.TRACES, Signal.LOGS}
    assert factory.output_signals == {Signal.METRICS, Signal.LOGS}


def _decode(text: str) -> tuple[DriftConfig, list[str]]:
    """What ``load_config`` does with a ``[connectors.drift]`` table."""
    errors: list[str] = []
    cfg = decode_dataclass(DriftConfig, tomllib.loads(text), "connectors.drift", errors)
    return cfg, errors


def test_config_from_toml_with_every_error_reported() -> None:
    cfg, errors = _decode('''
window = "1m"
reference_dir = "/tmp/refs"
reference_files = ["/tmp/a.json"]
correction = "bh"
''')
    assert errors == []
    assert cfg.window == 60.0 and cfg.correction == "bh" and str(cfg.reference_dir) == "/tmp/refs"
    assert [str(p) for p in cfg.reference_files] == ["/tmp/a.json"]
    _, errors = _decode('''
windw = "1m"
correction = "fdr"
''')
    assert "connectors.drift.windw: unknown key (did you mean 'window'?)" in errors
    assert any(e.startswith("connectors.drift.correction:") for e in errors)


def test_validate_reports_each_bad_value() -> None:
    errs = replace(DriftConfig(), alpha=0.9, bins=1, min_window_count=5, max_subjects=0).validate()
    assert {e.split(":")[0] for e in errs} >= {"alpha", "bins", "min_window_count", "max_subjects"}
    assert DriftConfig().validate() == []


# --------------------------------------------------------------------------- the main story


async def test_drift_appears_after_the_shift_and_not_before(tmp_path) -> None:
    rng = np.random.default_rng(1)
    async with Harness(tmp_path) as h:
        await h.conn.consume(batch_of(rng, 1000))  # the automatic baseline
        await h.conn.evaluate_now()
        assert h.points("mlagent.drift.insufficient_data")[0][1].as_double == 1.0
        assert h.detected() == {}
        for _ in range(2):
            await h.conn.consume(batch_of(rng, 600))
            await h.conn.evaluate_now()
            assert h.detected() == {"prediction": 0.0, "data": 0.0, "confidence": 0.0}
        assert h.logs.batches == []
        shifted = batch_of(rng, 600, shift=1.0)
        window_ids = {(s.trace_id, s.span_id)
                      for s in shifted.columns.spans_at(range(shifted.item_count))}
        await h.conn.consume(shifted)
        await h.conn.evaluate_now()
        assert h.detected()["data"] == 1.0
        psi = {a["signal"]: dp.as_double for a, dp in h.points("mlagent.drift.psi")}
        assert psi["feature:x"] > 0.2 and psi["feature:c"] < 0.05
        subject = {"service.name": "svc", "ml.model.name": "m", "ml.model.version": "1"}
        attrs, _ = h.points("mlagent.drift.detected", kind="data")[0]
        assert {k: attrs[k] for k in subject} == subject

        [rec] = h.logs.log_records()
        a = attributes_to_dict(rec.attributes)
        assert a["event.name"] == "mlagent.drift"
        assert a["mlagent.drift.kind"] == "data" and a["mlagent.drift.state"] == "detected"
        assert a["mlagent.drift.signals"] == ["feature:x"]
        assert "data drift detected for model m version 1" in rec.body.string_value
        examples = {bytes.fromhex(t) for t in a["mlagent.drift.example_trace_ids"]}
        assert examples and examples <= {t for t, _ in window_ids}
        assert (rec.trace_id, rec.span_id) in window_ids

        await h.conn.consume(batch_of(rng, 600))  # back to normal: one "resolved" record
        await h.conn.evaluate_now()
        await h.conn.consume(batch_of(rng, 600))
        await h.conn.evaluate_now()
        states = [attributes_to_dict(r.attributes)["mlagent.drift.state"]
                  for r in h.logs.log_records()]
        assert states == ["detected", "resolved"]


async def test_real_sdk_spans_through_the_connector(tmp_path) -> None:
    """Spans made by the OpenTelemetry SDK, encoded as the OTLP exporter encodes them."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "fraud-api",
                                                        "ml.model.name": "fraud",
                                                        "ml.model.version": "7"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    rng = np.random.default_rng(2)

    def export(n: int, shift: float) -> tuple[TraceBatch, set[bytes]]:
        exporter.clear()
        for x in rng.normal(shift, 1.0, n):
            with tracer.start_as_current_span("predict") as sp:
                sp.set_attribute("ml.prediction.label", "fraud" if x > 1 else "ok")
                sp.set_attribute("ml.prediction.score", float(rng.beta(9, 1)))
                sp.set_attribute("ml.feature.amount", float(x))
        finished = exporter.get_finished_spans()
        ids = {s.context.trace_id.to_bytes(16, "big") for s in finished}
        request = encode_spans(finished)
        return TraceBatch.from_bytes(request.SerializeToString()), ids

    async with Harness(tmp_path) as h:
        await h.conn.consume(export(1000, 0.0)[0])
        await h.conn.evaluate_now()
        batch, _ = export(500, 0.0)
        await h.conn.consume(batch)
        await h.conn.evaluate_now()
        assert h.detected() == {"prediction": 0.0, "data": 0.0, "confidence": 0.0}
        batch, ids = export(500, 0.8)
        await h.conn.consume(batch)
        await h.conn.evaluate_now()
        assert h.detected()["data"] == 1.0
        assert h.detected()["prediction"] == 1.0  # the label follows the feature
        recs = h.logs.log_records()
        assert {attributes_to_dict(r.attributes)["ml.model.name"] for r in recs} == {"fraud"}
        for r in recs:
            assert r.trace_id in ids
            assert {bytes.fromhex(t) for t in
                    attributes_to_dict(r.attributes)["mlagent.drift.example_trace_ids"]} <= ids
    provider.shutdown()
    otel_trace._TRACER_PROVIDER = None  # leave no global state behind (none was set)


# --------------------------------------------------------------------------- references


async def test_learned_baseline_survives_a_restart(tmp_path) -> None:
    rng = np.random.default_rng(3)
    async with Harness(tmp_path) as h:
        await h.conn.consume(batch_of(rng, 1000))
    saved = list((tmp_path / "state" / "references").glob("*.json"))
    assert len(saved) == 1
    assert json.loads(saved[0].read_text())["subject"]["ml.model.version"] == "1"
    async with Harness(tmp_path) as h:  # a new instance, as after a restart or reload
        await h.conn.consume(batch_of(rng, 200))
        await h.conn.evaluate_now()
        assert h.points("mlagent.drift.baseline.progress") == []
        assert h.points("mlagent.drift.insufficient_data")[0][1].as_double == 0.0
        assert h.detected()["data"] == 0.0


async def test_reference_files_take_precedence_most_specific_first(tmp_path) -> None:
    rng = np.random.default_rng(4)
    ref_dir = tmp_path / "refs"

    def ref_for(key: SubjectKey, shift: float) -> Reference:
        xs = rng.normal(shift, 1.0, 5000)
        return reference_from_values(key, labels=[], scores=[], features={"x": xs.tolist()},
                                     n=5000, bins=10, max_categories=50, low_cut=0.5,
                                     source="file")

    ref_for(SubjectKey(None, "m", None), 0.0).save(ref_dir / "any-version.json")
    ref_for(SubjectKey("svc", "m", "2"), 5.0).save(ref_dir / "v2.json")
    (ref_dir / "broken.json").write_text("{not json")
    cfg = replace(DriftConfig(), reference_dir=ref_dir)
    async with Harness(tmp_path, cfg) as h:
        assert h.statuses and h.statuses[0][0] is Status.DEGRADED
        assert "broken.json" in (h.statuses[0][1] or "")
        await h.conn.consume(batch_of(rng, 300, version="1"))  # judged at once: no baseline
        await h.conn.consume(batch_of(rng, 300, version="2"))
        await h.conn.evaluate_now()
        assert h.detected(**{"ml.model.version": "1"})["data"] == 0.0
        assert h.detected(**{"ml.model.version": "2"})["data"] == 1.0  # its own file: mean 5
        assert h.points("mlagent.drift.baseline.progress") == []
    assert not (tmp_path / "state" / "references").exists()


async def test_without_auto_baseline_a_subject_is_only_counted(tmp_path) -> None:
    rng = np.random.default_rng(5)
    async with Harness(tmp_path, replace(DriftConfig(), auto_baseline=False)) as h:
        await h.conn.consume(batch_of(rng, 1500))
        await h.conn.evaluate_now()
        assert h.points("mlagent.prediction.count")[0][1].as_double == 1500
        assert h.detected() == {}


# --------------------------------------------------------------------------- canary


async def test_canary_version_is_compared_with_the_stable_version(tmp_path) -> None:
    rng = np.random.default_rng(6)
    cfg = replace(DriftConfig(), baseline_size=500)
    async with Harness(tmp_path, cfg) as h:
        await h.conn.consume(batch_of(rng, 500, version="1"))  # v1: the anchor
        await h.conn.evaluate_now()
        await h.conn.consume(batch_of(rng, 400, version="1"))
        await h.conn.consume(batch_of(rng, 400, version="2"))
        await h.conn.evaluate_now()
        assert h.detected(**{"baseline.version": "1"}) == {
            "prediction": 0.0, "data": 0.0, "confidence": 0.0}
        await h.conn.consume(batch_of(rng, 400, version="1"))
        await h.conn.consume(batch_of(rng, 400, version="2", shift=0.7))
        await h.conn.evaluate_now()
        canary = h.detected(**{"baseline.version": "1", "ml.model.version": "2"})
        assert canary["data"] == 1.0
        # v2's own reference is its own first 500 predictions (also unshifted), so
        # both comparisons see the shift; v1 itself is fine.
        assert h.detected(**{"ml.model.version": "1"})["data"] == 0.0
        recs = [attributes_to_dict(r.attributes) for r in h.logs.log_records()]
        assert {"baseline.version": "1", "mlagent.drift.kind": "data"}.items() <= next(
            r for r in recs if "baseline.version" in r).items()


async def test_canary_needs_both_versions_live(tmp_path) -> None:
    rng = np.random.default_rng(7)
    async with Harness(tmp_path, replace(DriftConfig(), baseline_size=500)) as h:
        await h.conn.consume(batch_of(rng, 500, version="1"))
        await h.conn.consume(batch_of(rng, 600, version="2"))  # v1 silent this window
        await h.conn.evaluate_now()
        assert h.points("mlagent.drift.detected", **{"baseline.version": "1"}) == []


async def test_sampling_reads_a_share_and_still_detects(tmp_path) -> None:
    rng = np.random.default_rng(15)
    cfg = replace(DriftConfig(), sample=0.25, baseline_size=500)
    async with Harness(tmp_path, cfg) as h:
        for _ in range(4):
            await h.conn.consume(batch_of(rng, 1000))  # ~1000 examined: baseline + window
        await h.conn.evaluate_now()
        [(_, count)] = h.points("mlagent.prediction.count")
        assert 3600 <= count.as_double <= 4400  # scaled back up from ~1000 examined
        assert h.detected()["data"] == 0.0
        for _ in range(4):
            await h.conn.consume(batch_of(rng, 1000, shift=0.5))
        await h.conn.evaluate_now()
        assert h.detected()["data"] == 1.0
        assert h.logs.log_records()[0].trace_id  # examples come from the sampled items


# --------------------------------------------------------------------------- output shape


async def test_histograms_are_cumulative_on_frozen_edges(tmp_path) -> None:
    rng = np.random.default_rng(8)
    async with Harness(tmp_path, replace(DriftConfig(), baseline_size=500)) as h:
        await h.conn.consume(batch_of(rng, 500))
        await h.conn.consume(batch_of(rng, 150))
        await h.conn.evaluate_now()
        await h.conn.consume(batch_of(rng, 250))
        await h.conn.evaluate_now()
        [(a1, first)] = h.points("mlagent.drift.histogram", 0, signal="feature:x")
        [(_, second)] = h.points("mlagent.drift.histogram", 1, signal="feature:x")
        ref = Reference.load(next((tmp_path / "state" / "references").glob("*.json")))
        # OTLP bounds are upper-inclusive: one ulp below the (lower-inclusive) edges.
        assert list(first.explicit_bounds) == np.nextafter(ref.features["x"].edges,
                                                           -np.inf).tolist()
        assert len(first.bucket_counts) == len(first.explicit_bounds) + 1
        assert first.count == 150 and second.count == 400
        assert second.start_time_unix_nano == first.start_time_unix_nano
        assert a1["ml.model.name"] == "m"
        cats = {a["category"]: dp.as_int for a, dp in
                h.points("mlagent.drift.category.count", 1, signal="label")}
        assert set(cats) == {"cat", "dog", "other"} and sum(cats.values()) == 400


async def test_subject_falls_back_to_genai_model_then_service(tmp_path) -> None:
    rng = np.random.default_rng(9)
    async with Harness(tmp_path) as h:
        await h.conn.consume(trace_batch({"chat": spans_of(
            rng, 10, model=None, version=None, extra={"gen_ai.request.model": "llama"})}))
        await h.conn.consume(trace_batch({"svc2": spans_of(rng, 10, model=None, version=None)}))
        await h.conn.evaluate_now()
        models = {a["ml.model.name"] for a, _ in h.points("mlagent.prediction.count")}
        assert models == {"llama", "svc2"}


async def test_items_without_predictions_are_ignored(tmp_path) -> None:
    async with Harness(tmp_path) as h:
        await h.conn.consume(trace_batch({"svc": [span("GET /", attributes={"ml.model.name": "m"}),
                                                  span("db")]}))
        await h.conn.evaluate_now()
        assert h.metrics.batches == []


# --------------------------------------------------------------------------- bounds and bad input


async def test_bounds_are_enforced_and_counted(tmp_path) -> None:
    rng = np.random.default_rng(10)
    cfg = replace(DriftConfig(), max_subjects=2, max_features=1, baseline_size=100,
                  min_window_count=10, bins=5)
    async with Harness(tmp_path, cfg) as h:
        for v in ("1", "2", "3"):
            await h.conn.consume(batch_of(rng, 100, version=v))
        assert h.dropped("max_subjects") == 100
        assert h.dropped("max_features") == 200  # feature "x" of two baselines
        await h.conn.consume(batch_of(rng, 50, version="1"))
        assert h.dropped("feature_not_in_reference") == 50
        ref = Reference.load(next((tmp_path / "state" / "references").glob("m-1-*.json")))
        assert list(ref.features) == ["c"]  # the first name seen (alphabetical in a batch)


async def test_bad_values_are_dropped_and_counted_not_fatal(tmp_path) -> None:
    rng = np.random.default_rng(11)
    cfg = replace(DriftConfig(), baseline_size=100, min_window_count=10, bins=5)
    async with Harness(tmp_path, cfg) as h:
        await h.conn.consume(batch_of(rng, 100))
        bad = [span(attributes={"ml.model.name": "m", "ml.model.version": "1",
                                "ml.prediction.score": s, "ml.feature.x": x})
               for s, x in (("high", "tall"), (float("nan"), [1, 2]), (0.9, 1.0))]
        await h.conn.consume(trace_batch({"svc": bad}))
        assert h.dropped("invalid_score") == 2
        assert h.dropped("non_numeric_feature") == 2
        with pytest.raises(PermanentError):
            await h.conn.consume(metric_batch([gauge("g", [({}, 1.0)])]))
        await h.conn.evaluate_now()
        assert h.points("mlagent.prediction.count")[0][1].as_double == 103  # baseline + 3


attr_values = hs.one_of(
    hs.none(), hs.booleans(), hs.integers(-(2**63), 2**63 - 1), hs.floats(), hs.text(max_size=20),
    hs.binary(max_size=8), hs.lists(hs.integers(-(2**63), 2**63 - 1), max_size=3),
    hs.dictionaries(hs.text(max_size=3), hs.floats(), max_size=2))
attr_keys = hs.sampled_from(["ml.prediction.label", "ml.prediction.score", "ml.feature.a",
                             "ml.feature.b", "ml.model.name", "ml.model.version",
                             "gen_ai.request.model", "other"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.lists(hs.dictionaries(attr_keys, attr_values, max_size=6), min_size=1, max_size=40))
def test_any_attribute_values_are_survived(tmp_path_factory, items: list[dict]) -> None:
    """Bad input never crashes: whatever the attribute values, consume and evaluate work."""
    cfg = replace(DriftConfig(), baseline_size=20, min_window_count=10, bins=3)

    async def scenario() -> None:
        async with Harness(tmp_path_factory.mktemp("fuzz"), cfg) as h:
            for _ in range(2):  # baseline first, then a window on its bins
                await h.conn.consume(trace_batch({"svc": [span(attributes=a) for a in items]}))
                await h.conn.evaluate_now()

    asyncio.run(scenario())


async def test_downstream_refusal_is_counted(tmp_path) -> None:
    rng = np.random.default_rng(12)
    async with Harness(tmp_path) as h:
        h.metrics.fail_with = RetryableError("full")
        await h.conn.consume(batch_of(rng, 10))
        await h.conn.evaluate_now()
        assert h.dropped("downstream_refused") > 0


# --------------------------------------------------------------------------- lifecycle


async def test_without_logs_pipeline_and_shutdown_flushes(tmp_path) -> None:
    rng = np.random.default_rng(13)
    h = Harness(tmp_path, replace(DriftConfig(), baseline_size=100, min_window_count=10),
                logs=False)
    await h.conn.shutdown()  # safe without start
    h = Harness(tmp_path, replace(DriftConfig(), baseline_size=100, min_window_count=10),
                logs=False)
    async with h:
        await h.conn.consume(batch_of(rng, 100))
        await h.conn.consume(batch_of(rng, 100, shift=2.0))
    assert h.detected()["data"] == 1.0  # the flush at shutdown evaluated the window
    await h.conn.shutdown()  # idempotent
    assert len(h.metrics.batches) == 1


async def test_the_window_timer_closes_windows(tmp_path) -> None:
    rng = np.random.default_rng(14)
    async with Harness(tmp_path, replace(DriftConfig(), window=0.05)) as h:
        await h.conn.consume(batch_of(rng, 10))
        await h.metrics.wait_for(lambda s: len(s.batches) >= 1)
        counts = [dp.as_double for b in range(len(h.metrics.batches))
                  for _, dp in h.points("mlagent.prediction.count", b)]
        assert counts[0] == 10
        await asyncio.sleep(0)


@pytest.mark.parametrize("odd", [float("nan"), "n/a", True])
async def test_a_missing_value_in_a_numeric_baseline_keeps_the_feature_numeric(
        tmp_path, odd: Any) -> None:
    """One NaN/string/boolean among 1,000 numbers used to make ``x`` categorical (1,000
    one-off categories), so every later window alarmed (data drift, p ~ 0)."""
    rng = np.random.default_rng(12)

    def rows(n: int, first: Any = None) -> TraceBatch:
        xs: list[Any] = rng.normal(0.0, 1.0, n).tolist()
        if first is not None:
            xs[0] = first
        return trace_batch({"svc": [span(attributes={
            "ml.model.name": "m", "ml.model.version": "1",
            "ml.prediction.score": float(s), "ml.feature.x": x})
            for s, x in zip(rng.beta(8, 2, n), xs, strict=True)]})

    async with Harness(tmp_path) as h:
        await h.conn.consume(rows(1000, first=odd))
        assert h.dropped("non_numeric_feature") == 1
        ref = h.conn.subjects[SubjectKey("svc", "m", "1")].ref
        assert ref is not None and isinstance(ref.features["x"], NumericHist)
        assert ref.features["x"].counts.sum() == 999
        for _ in range(3):
            await h.conn.consume(rows(1000))
            await h.conn.evaluate_now()
            assert h.detected()["data"] == 0.0


async def test_histogram_buckets_mean_what_otlp_says(tmp_path) -> None:
    """OTLP bucket i counts (bounds[i-1], bounds[i]] (Prometheus: values <= le). Values
    exactly on an edge (every value of a 0/1 feature) used to be one bucket too high:
    the 68 zeros were not in `le="0"` but counted with the ones under `le="1"`."""
    rng = np.random.default_rng(13)
    cfg = replace(DriftConfig(), baseline_size=200, min_window_count=10)

    def rows(xs: np.ndarray) -> TraceBatch:
        return trace_batch({"svc": [span(attributes={
            "ml.model.name": "m", "ml.model.version": "1", "ml.feature.x": float(x)})
            for x in xs]})

    async with Harness(tmp_path, cfg) as h:
        await h.conn.consume(rows((rng.random(200) < 0.3).astype(float)))
        window = np.r_[(rng.random(100) < 0.3).astype(float), [-1.0, 0.5, 2.0]]
        await h.conn.consume(rows(window))
        await h.conn.evaluate_now()
        [(_, dp)] = h.points("mlagent.drift.histogram", signal="feature:x")
        bounds = np.asarray(dp.explicit_bounds)
        otlp = np.bincount(np.searchsorted(bounds, window, side="left"),
                           minlength=len(bounds) + 1)
        assert list(dp.bucket_counts) == otlp.tolist()
        for le, below in zip(bounds, np.cumsum(dp.bucket_counts), strict=False):
            assert below == np.sum(window <= le)  # what a Prometheus `le` bucket claims


async def test_canary_anchor_is_the_version_first_seen_live(tmp_path) -> None:
    """One per-model reference file serves "9" (stable, seen first) and "10" (canary):
    the anchor used to be the smaller version string, "10", so the stable version was
    judged against the canary. The first-seen times survive a restart."""
    rng = np.random.default_rng(14)
    ref = reference_from_values(SubjectKey(None, "m", None), labels=[], features={},
                                scores=rng.beta(8, 2, 5000).tolist(), n=5000, bins=10,
                                max_categories=50, low_cut=0.5, source="file")
    ref.save(tmp_path / "m.json")
    cfg = replace(DriftConfig(), reference_files=[tmp_path / "m.json"])
    now = [1000.0]

    def scores(version: str, n: int, beta: tuple[float, float]) -> TraceBatch:
        return trace_batch({"svc": [span(attributes={
            "ml.model.name": "m", "ml.model.version": version, "ml.prediction.score": float(s)})
            for s in rng.beta(*beta, n)]})

    for order in (("9", "10"), ("10", "9")):  # after the restart, the canary speaks first
        async with Harness(tmp_path, cfg) as h:
            h.conn.clock = lambda: now[0]
            for _ in range(2):
                for v in order:
                    now[0] += 1.0
                    await h.conn.consume(scores(v, 1000, (8, 2) if v == "9" else (3, 3)))
                await h.conn.evaluate_now()
            subjects = h.conn.subjects
            assert subjects[SubjectKey("svc", "m", "10")].anchor == SubjectKey("svc", "m", "9")
            assert subjects[SubjectKey("svc", "m", "9")].anchor is None
            assert h.detected(**{"baseline.version": "9", "ml.model.version": "10"})[
                "confidence"] == 1.0


async def test_learned_references_are_bounded_in_memory_and_on_disk(tmp_path) -> None:
    """30 rotating versions: every learned reference used to stay in memory (30) and on
    disk (30), and start read them all. Now memory holds at most max_subjects, disk at
    most max_learned_references (least recently used deleted), and a subject's file is
    read when it appears again."""
    rng = np.random.default_rng(15)
    cfg = replace(DriftConfig(), baseline_size=100, min_window_count=10, max_subjects=5,
                  max_learned_references=10)
    refs = tmp_path / "state" / "references"
    async with Harness(tmp_path, cfg) as h:
        for v in range(30):
            await h.conn.consume(batch_of(rng, 100, version=str(v)))
            for _ in range(12):  # idle long enough to be forgotten
                await h.conn.evaluate_now()
        assert len(h.conn._saved) <= 5
        assert len(list(refs.glob("*.json"))) == 10
    async with Harness(tmp_path, cfg) as h:
        assert len(h.conn._saved) == 0  # nothing read at start
        await h.conn.consume(batch_of(rng, 50, version="29"))
        subj = h.conn.subjects[SubjectKey("svc", "m", "29")]
        assert subj.ref is not None and subj.baseline is None  # its file, read on demand
        await h.conn.consume(batch_of(rng, 50, version="0"))  # pruned: learns again
        assert h.conn.subjects[SubjectKey("svc", "m", "0")].baseline is not None
