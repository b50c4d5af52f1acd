"""agent.promnames: the OTel -> Prometheus translation both Prometheus exporters share."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality, Metric
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View

from agent.pdata import MetricBatch
from agent.promnames import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    TARGET_INFO,
    HistogramValue,
    TranslationConfig,
    Translator,
    job_instance,
    label_name,
    metric_name,
    unit_suffix,
)
from agent.testing import gauge, metric_batch, monotonic_sum

DELTA = AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA
RES = {"service.name": "svc", "service.namespace": "ml", "service.instance.id": "i-1",
       "host.name": "gpu-01", "cloud.region": "eu-west-1"}


@pytest.mark.parametrize(("name", "unit", "kind", "expected"), [
    ("http.server.duration", "s", HISTOGRAM, "http_server_duration_seconds"),
    ("gpu.memory.used", "By", GAUGE, "gpu_memory_used_bytes"),
    ("gpu.utilization", "1", GAUGE, "gpu_utilization_ratio"),
    ("requests", "1", COUNTER, "requests"),
    ("http.requests", "{requests}", COUNTER, "http_requests"),
    ("net.io", "By/s", GAUGE, "net_io_bytes_per_second"),
    ("latency_seconds", "s", GAUGE, "latency_seconds"),  # no doubled unit
    ("requests_total", "", COUNTER, "requests"),  # _total belongs to the sample name
    ("2xx-count!", "", GAUGE, "_2xx_count"),
    ("mlagent.drift.psi", "", GAUGE, "mlagent_drift_psi"),
])
def test_metric_names_follow_the_otel_prometheus_rules(name, unit, kind, expected):
    assert metric_name(name, unit, kind=kind) == expected


def test_suffixes_can_be_turned_off_and_namespace_prefixes():
    assert metric_name("a.b", "s", kind=GAUGE, add_suffixes=False) == "a_b"
    assert metric_name("a.b", "s", kind=GAUGE, namespace="ml") == "ml_a_b_seconds"


def test_unit_annotations_are_dropped():
    assert unit_suffix("{tokens}", gauge=True) == ""
    assert unit_suffix("ms", gauge=False) == "milliseconds"


@pytest.mark.parametrize(("key", "expected"), [
    ("http.method", "http_method"), ("9lives", "key_9lives"), ("_x", "key_x"),
    ("__x", "key__x"), ("ok", "ok"), ("", "key_empty"),
])
def test_label_names_are_sanitized(key, expected):
    assert label_name(key) == expected


@given(st.text(max_size=40))
def test_any_key_gives_a_valid_label_name(key):
    name = label_name(key)
    assert name and not name.startswith("__") and not name[0].isdigit()
    assert all(c.isascii() and (c.isalnum() or c == "_") for c in name)


def test_job_and_instance_from_resource():
    assert job_instance(RES) == ("ml/svc", "i-1")
    assert job_instance({"service.name": "svc", "host.name": "h"}) == ("svc", "h")
    job, inst = job_instance({"service.name": "svc", "x": 1})
    assert job == "svc" and len(inst) == 16
    assert job_instance({"service.name": "svc", "x": 1})[1] == inst  # stable


def _points(translator, batch):
    return list(translator.translate(batch.request))


def test_resource_attributes_go_to_target_info_not_to_every_series():
    t = Translator(TranslationConfig())
    info, p = _points(t, metric_batch([gauge("g", [({"a": "1"}, 2.0)])], resource=RES))
    assert info.family == TARGET_INFO
    assert dict(info.labels) == {"job": "ml/svc", "instance": "i-1", "host_name": "gpu-01",
                                 "cloud_region": "eu-west-1"}
    assert dict(p.labels) == {"a": "1", "job": "ml/svc", "instance": "i-1"}


def test_resource_attributes_can_be_promoted():
    t = Translator(TranslationConfig(promote_resource_attributes=["cloud.region"],
                                     target_info=False))
    (p,) = _points(t, metric_batch([gauge("g", [({}, 2.0)])], resource=RES))
    assert dict(p.labels) == {"cloud_region": "eu-west-1", "job": "ml/svc", "instance": "i-1"}
    t = Translator(TranslationConfig(resource_to_telemetry_conversion=True, target_info=False))
    (p,) = _points(t, metric_batch([gauge("g", [({}, 2.0)])], resource=RES))
    assert dict(p.labels)["host_name"] == "gpu-01"


def test_point_attributes_cannot_override_job_and_instance():
    t = Translator(TranslationConfig(target_info=False))
    (p,) = _points(t, metric_batch([gauge("g", [({"job": "evil", "instance": "x"}, 2.0)])],
                                   resource=RES))
    assert dict(p.labels)["job"] == "ml/svc" and dict(p.labels)["instance"] == "i-1"


def test_colliding_label_names_join_values_with_semicolon():
    t = Translator(TranslationConfig(target_info=False))
    (p,) = _points(t, metric_batch([gauge("g", [({"a.b": "1", "a_b": "2"}, 2.0)])]))
    assert dict(p.labels)["a_b"] == "1;2"


def _delta_sum(value, start, end):
    return monotonic_sum("req", [({"k": "v"}, value)], start=start, time=end, temporality=DELTA)


def test_delta_sums_accumulate_into_a_cumulative_counter():
    t = Translator(TranslationConfig(target_info=False))
    got = [p.value for b in (_delta_sum(2, 1, 10), _delta_sum(3, 10, 20), _delta_sum(5, 25, 30))
           for p in _points(t, metric_batch([b]))]
    assert got == [2.0, 5.0, 10.0]


def test_overlapping_delta_is_skipped_and_counted():
    t = Translator(TranslationConfig(target_info=False))
    _points(t, metric_batch([_delta_sum(2, 1, 10)]))
    assert _points(t, metric_batch([_delta_sum(3, 5, 15)])) == []
    assert t.take_skipped() == {"out_of_order": 1}
    assert t.take_skipped() == {}


def test_delta_state_expires():
    t = Translator(TranslationConfig(target_info=False, metric_expiration=60))
    _points(t, metric_batch([_delta_sum(2, 1, 10)]))
    assert t.expire(now=math.inf) == 1
    (p,) = _points(t, metric_batch([_delta_sum(3, 10, 20)]))
    assert p.value == 3.0  # started over


def _hist(bounds, counts, *, start=1, end=10, delta=False, exemplars=()):
    m = Metric(name="lat", unit="s")
    if delta:
        m.histogram.aggregation_temporality = DELTA
    dp = m.histogram.data_points.add(start_time_unix_nano=start, time_unix_nano=end,
                                     explicit_bounds=bounds, bucket_counts=counts,
                                     count=sum(counts), sum=1.5)
    for v, tid in exemplars:
        dp.exemplars.add(as_double=v, trace_id=tid, span_id=b"\x02" * 8, time_unix_nano=end)
    return m


def test_delta_histograms_accumulate_bucket_by_bucket():
    t = Translator(TranslationConfig(target_info=False))
    _points(t, metric_batch([_hist([1, 2], [1, 0, 1], delta=True)]))
    (p,) = _points(t, metric_batch([_hist([1, 2], [0, 2, 1], start=10, end=20, delta=True)]))
    assert isinstance(p.value, HistogramValue)
    assert p.value.counts.tolist() == [1, 2, 2] and p.value.count == 5 and p.value.sum == 3.0


def test_histogram_exemplars_land_in_their_bucket():
    t = Translator(TranslationConfig(target_info=False))
    (p,) = _points(t, metric_batch([_hist([1, 2], [1, 1, 1], exemplars=[
        (1.5, b"\x01" * 16), (7.0, b"\x03" * 16)])]))
    assert p.value.exemplars[1].labels == {"trace_id": "01" * 16, "span_id": "02" * 8}
    assert p.value.exemplars[2].labels["trace_id"] == "03" * 16


def test_invalid_histograms_are_skipped_not_raised():
    t = Translator(TranslationConfig(target_info=False))
    bad = [_hist([2, 1], [1, 1, 1]), _hist([1], [1]), _hist([float("nan")], [1, 1]),
           _exp(-2000, 0, [1]), _exp(2000, 0, [1])]
    assert _points(t, metric_batch(bad)) == []
    assert t.take_skipped() == {"invalid_histogram": 5}


def _exp(scale, offset, counts, *, zero=0, neg=(), delta=False, start=1, end=10):
    m = Metric(name="lat", unit="s")
    eh = m.exponential_histogram
    if delta:
        eh.aggregation_temporality = DELTA
    dp = eh.data_points.add(start_time_unix_nano=start, time_unix_nano=end, scale=scale,
                            zero_count=zero, count=sum(counts) + zero + sum(neg), sum=10.0)
    dp.positive.offset = offset
    dp.positive.bucket_counts.extend(counts)
    if neg:
        dp.negative.offset = 0
        dp.negative.bucket_counts.extend(neg)
    return m


def test_exponential_histogram_becomes_power_of_two_buckets():
    t = Translator(TranslationConfig(target_info=False))
    # scale 0: bucket i is (2**i, 2**(i+1)]; offset 0 -> (1,2], (2,4], (4,8]
    (p,) = _points(t, metric_batch([_exp(0, 0, [1, 2, 3], zero=1)]))
    h = p.value
    assert h.bounds == (0.0, 2.0, 4.0, 8.0)
    assert h.cumulative().tolist() == [1, 2, 4, 7, 7] and h.count == 7


def test_exponential_histogram_scale_is_lowered_to_fit_max_buckets():
    t = Translator(TranslationConfig(target_info=False, exponential_histogram_max_buckets=4))
    counts = [1] * 16  # scale 3, 16 buckets -> scale 1, 4 buckets
    (p,) = _points(t, metric_batch([_exp(3, 0, counts)]))
    h = p.value
    assert h.bounds == (0.0, 2 ** 0.5, 2.0, 2 ** 1.5, 4.0)  # the zero bucket, then scale 1
    assert h.counts.tolist() == [0, 4, 4, 4, 4, 0]


def test_exponential_buckets_either_side_of_one_never_merge_but_conversion_ends():
    t = Translator(TranslationConfig(target_info=False, exponential_histogram_max_buckets=1))
    (p,) = _points(t, metric_batch([_exp(0, -1, [1, 1])]))  # (0.5, 1] and (1, 2]
    assert p.value.bounds[1:] == (1.0, 2.0) and p.value.cumulative()[-1] == 2


def test_exponential_bucket_beyond_the_largest_double_goes_to_inf():
    t = Translator(TranslationConfig(target_info=False))
    (p,) = _points(t, metric_batch([_exp(0, 1022, [1, 1])]))  # (2**1022, 2**1023], (2**1023, inf)
    assert p.value.bounds == (0.0, 2.0 ** 1023)
    assert p.value.counts.tolist() == [0, 1, 1]


def test_exponential_negative_buckets_come_first():
    t = Translator(TranslationConfig(target_info=False))
    (p,) = _points(t, metric_batch([_exp(0, 0, [1], neg=[2, 3])]))
    # negative bucket j covers [-(2**(j+1)), -(2**j)): upper bounds -2 then -1
    assert p.value.bounds == (-2.0, -1.0, 0.0, 2.0)
    assert p.value.counts.tolist() == [3, 2, 0, 1, 0]


def test_delta_exponential_histograms_merge_at_the_coarser_scale():
    t = Translator(TranslationConfig(target_info=False))
    _points(t, metric_batch([_exp(1, 0, [1, 1], delta=True)]))
    (p,) = _points(t, metric_batch([_exp(0, 0, [4], delta=True, start=10, end=20)]))
    assert p.value.count == 6
    np.testing.assert_array_equal(p.value.counts[-2:], [6, 0])


def test_delta_exponential_points_far_apart_merge_into_bounded_buckets():
    """One observation of 1e-6, then one of 1000, both at scale 20: merged, they would
    span 31 million scale-20 buckets (1 GB while merging, 250 MB kept for the series,
    seconds of event-loop time). The scale is lowered before merging instead."""
    t = Translator(TranslationConfig(target_info=False))
    small, large = (math.ceil(math.log2(v) * 2 ** 20) - 1 for v in (1e-6, 1000.0))
    _points(t, metric_batch([_exp(20, small, [1], delta=True)]))
    tracemalloc.start()
    try:
        (p,) = _points(t, metric_batch([_exp(20, large, [1], delta=True, start=10, end=20)]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000
    h = p.value
    assert len(h.bounds) <= 1 + TranslationConfig().exponential_histogram_max_buckets
    assert h.count == 2 and h.sum == 20.0 and h.cumulative()[-1] == 2
    # Scale 2 (bounds 2**(i/4) apart), the finest at which 1e-6..1000 fits 160 buckets.
    assert h.bounds[2] / h.bounds[1] == pytest.approx(2 ** 0.25)
    # Each value is still counted in the bucket of its bound.
    cum = dict(zip(h.bounds, h.cumulative(), strict=False))
    assert cum[min(b for b in h.bounds if b >= 1e-6)] == 1
    assert cum[max(b for b in h.bounds if b < 1e-6)] == 0
    assert cum[min(b for b in h.bounds if b >= 1000)] == 2
    assert cum[max(b for b in h.bounds if b < 1000)] == 1


def test_no_recorded_value_marks_the_point_stale():
    t = Translator(TranslationConfig(target_info=False))
    m = gauge("g", [({}, 1.0)])
    m.gauge.data_points[0].flags = 1
    (p,) = _points(t, metric_batch([m]))
    assert p.stale


def test_validate_reports_bad_settings():
    errs = TranslationConfig(namespace="9x", exponential_histogram_max_buckets=0,
                             metric_expiration=0, max_series=0).validate()
    assert [e.split(":")[0] for e in errs] == [
        "namespace", "exponential_histogram_max_buckets", "metric_expiration", "max_series"]


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.just(0.0), st.floats(min_value=1e-3, max_value=1e6)),
                       min_size=1, max_size=60),
       sdk_max_size=st.integers(2, 40), max_buckets=st.integers(1, 20))
def test_exponential_conversion_counts_every_value_below_its_bound(values, sdk_max_size,
                                                                   max_buckets):
    """Real SDK exponential histograms of random values (the SDK takes no negative
    ones): after conversion, each ``le`` bucket holds exactly the values <= its bound
    (up to float rounding at the bound)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], views=[View(
        instrument_name="h", aggregation=ExponentialBucketHistogramAggregation(
            max_size=sdk_max_size))])
    hist = provider.get_meter("t").create_histogram("h")
    for v in values:
        hist.record(v)
    batch = MetricBatch(encode_metrics(reader.get_metrics_data()))
    provider.shutdown()
    t = Translator(TranslationConfig(target_info=False,
                                     exponential_histogram_max_buckets=max_buckets))
    (p,) = _points(t, batch)
    h = p.value
    assert list(h.bounds) == sorted(set(h.bounds))
    populated = len(h.bounds) - 1  # the zero bucket is always there
    assert populated <= max(max_buckets, 4)  # +-1 is a bound at every scale
    cum = h.cumulative()
    assert cum[-1] == len(values) == h.count
    arr = np.asarray(values)
    for b, c in zip(h.bounds, cum[:-1], strict=True):
        lo = int(np.sum(arr <= b * (1 - 1e-9) if b > 0 else arr <= b * (1 + 1e-9)))
        hi = int(np.sum(arr <= b * (1 + 1e-9) if b > 0 else arr <= b * (1 - 1e-9)))
        assert lo <= c <= hi, (b, c, lo, hi)
