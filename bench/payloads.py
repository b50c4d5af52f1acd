"""Realistic OTLP trace payloads for benchmarks: ~250-byte spans, 6 attributes, 512 per request."""

from __future__ import annotations

import random

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

SPANS_PER_REQUEST = 512


def make_request(seed: int, spans: int = SPANS_PER_REQUEST, services: int = 4,
                 predictions: bool = False, features: int = 0) -> ExportTraceServiceRequest:
    """One request with ``spans`` spans spread over ``services`` resources.

    Spans form traces of 8 (a SERVER root, CLIENT/INTERNAL children) so trace-aware
    components see realistic structure. ``predictions`` adds ml.prediction.* and
    ``features`` numeric ml.feature.* attributes.
    """
    rnd = random.Random(seed)
    req = ExportTraceServiceRequest()
    per = spans // services
    base = 1_700_000_000_000_000_000 + seed * 1_000_000_000
    for s in range(services):
        rs = req.resource_spans.add()
        for k, v in (("service.name", f"svc-{s}"), ("service.version", "1.4.2"),
                     ("host.name", "inference-7"), ("process.pid", 4000 + s)):
            kv = rs.resource.attributes.add(key=k)
            if isinstance(v, int):
                kv.value.int_value = v
            else:
                kv.value.string_value = v
        ss = rs.scope_spans.add()
        ss.scope.name = "bench"
        trace_id = b""
        root = b""
        for i in range(per):
            if i % 8 == 0:
                trace_id = rnd.randbytes(16)
                root = rnd.randbytes(8)
                span_id, parent, kind, name = root, b"", Span.SPAN_KIND_SERVER, "POST /v1/predict"
            else:
                span_id, parent = rnd.randbytes(8), root
                kind = Span.SPAN_KIND_CLIENT if i % 8 == 7 else Span.SPAN_KIND_INTERNAL
                name = ("preprocess", "inference", "postprocess", "feature_store.get",
                        "tokenize", "queue", "GET /features")[i % 8 - 1]
            start = base + i * 1_000_000
            sp = ss.spans.add(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=name,
                              kind=kind, start_time_unix_nano=start,
                              end_time_unix_nano=start + rnd.randint(200_000, 50_000_000))
            attrs = {"http.method": "POST", "http.route": "/v1/predict", "http.status_code": 200,
                     "ml.model.name": "ranker", "net.peer.name": "10.0.3.17",
                     "request.id": f"{rnd.getrandbits(64):016x}"}
            if predictions:
                attrs["ml.prediction.label"] = rnd.choice(["click", "skip", "buy"])
                attrs["ml.prediction.score"] = rnd.random()
            for f in range(features):
                attrs[f"ml.feature.f{f}"] = rnd.gauss(0, 1)
            for k, v in attrs.items():
                kv = sp.attributes.add(key=k)
                if isinstance(v, bool):
                    kv.value.bool_value = v
                elif isinstance(v, int):
                    kv.value.int_value = v
                elif isinstance(v, float):
                    kv.value.double_value = v
                else:
                    kv.value.string_value = v
    return req


def make_payloads(n: int = 16, **kw: object) -> list[bytes]:
    return [make_request(i, **kw).SerializeToString() for i in range(n)]  # type: ignore[arg-type]
