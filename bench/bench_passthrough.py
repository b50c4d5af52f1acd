"""Pipeline throughput, every variant against the same passthrough in ONE run.

    python bench/bench_passthrough.py [--duration 15] [--variants passthrough,persistent,...]

The agent runs through the CLI; a load generator process sends pre-serialised OTLP
requests (512 spans of ~250 bytes, 6 attributes) over gRPC and a sink process counts
what the otlp exporter delivers. Prints spans/s accepted (acknowledged to the
generator) and exported (counted by the sink) per variant, the raw upb decode rate of
the same payloads, each variant's ratio to the passthrough, and the agent's peak RSS.
All processes share this machine's cores.

Variants:
  passthrough   otlp -> batch -> otlp exporter (memory queue)
  persistent    the same with the SQLite queue (default durability)
  enrich        + the enrich processor
  latency       + the latency connector (traces -> metrics -> prometheus)
  drift         + the drift connector, every span carrying a prediction and 5 features
  elasticsearch + the elasticsearch exporter (to a counting bulk sink process; prints
                  bytes per span on the wire, gzip, and before compression)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import decode_rate, run_pipeline
from payloads import make_payloads

TEMPLATE = """
[receivers.otlp]
grpc.endpoint = "{GRPC}"
http.endpoint = "{HTTP}"
grpc.max_request_size = "64MiB"
[processors.batch]
@PROCESSOR_TABLES@
[exporters.otlp]
endpoint = "{SINK}"
compression = "none"
sending_queue.persistent = @PERSISTENT@
@EXTRA_TABLES@
[service]
state_dir = "{STATE}"
health.endpoint = "{HEALTH}"
telemetry.log_level = "warning"
[service.pipelines.traces]
receivers = ["otlp"]
processors = [@PROCESSORS@"batch"]
exporters = ["otlp"@EXPORTERS@]
@EXTRA_PIPELINES@
"""

METRICS_PIPELINE = """
[exporters.prometheus]
endpoint = "{PROM}"
"""


def variant(name: str) -> tuple[str, tuple[str, ...]]:
    """(config, extra load generator args) of one variant."""
    sub = {"@PROCESSOR_TABLES@": "", "@PERSISTENT@": "false", "@EXTRA_TABLES@": "",
           "@PROCESSORS@": "", "@EXPORTERS@": "", "@EXTRA_PIPELINES@": ""}
    args: tuple[str, ...] = ()
    if name == "persistent":
        sub["@PERSISTENT@"] = "true"
    elif name == "enrich":
        sub["@PROCESSOR_TABLES@"] = "[processors.enrich]"
        sub["@PROCESSORS@"] = '"enrich", '
    elif name in ("latency", "drift"):
        sub["@EXTRA_TABLES@"] = f"[connectors.{name}]\n" + METRICS_PIPELINE
        sub["@EXPORTERS@"] = f', "{name}"'
        sub["@EXTRA_PIPELINES@"] = (f'[service.pipelines.metrics]\nreceivers = ["{name}"]\n'
                                    'exporters = ["prometheus"]')
        if name == "drift":
            args = ("--predictions", "--features", "5")
    elif name == "elasticsearch":
        sub["@EXTRA_TABLES@"] = ('[exporters.elasticsearch]\nendpoint = "{ES}"\n'
                                 "sending_queue.persistent = false")
        sub["@EXPORTERS@"] = ', "elasticsearch"'
    elif name != "passthrough":
        raise SystemExit(f"unknown variant {name!r}")
    text = TEMPLATE
    for k, v in sub.items():
        text = text.replace(k, v)
    return text, args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--variants", default="passthrough,persistent,enrich,latency,drift")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the whole sequence this many times; ratios are per round, "
                         "and the median is reported (single runs swing on a shared machine)")
    a = ap.parse_args()
    names = a.variants.split(",")
    if names[0] != "passthrough":
        names.insert(0, "passthrough")
    ratios: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(a.rounds):
        results = []
        for n in names:
            cfg, args = variant(n)
            results.append(run_pipeline(n, cfg, a.duration, loadgen_args=args,
                                        es_sink=n == "elasticsearch"))
        base = results[0]
        print(f"round {rnd + 1}:")
        for r in results:
            ratio = r.exported_per_s / base.exported_per_s
            ratios[r.name].append(ratio)
            print(r.line() + f"   ratio to passthrough {ratio:.2f}")
            if r.es and r.es["spans"]:
                print(f"{'':<28} elasticsearch: {r.es['spans']:,} documents, "
                      f"{r.es['wire_bytes'] / r.es['spans']:.0f} bytes/span on the wire (gzip), "
                      f"{r.es['body_bytes'] / r.es['spans']:.0f} bytes/span of NDJSON")
    dec = decode_rate(make_payloads(16))
    print(f"raw upb decode of the same payloads: {dec:,.0f} spans/s (one core)")
    if a.rounds > 1:
        for n, rs in ratios.items():
            print(f"median ratio {n:<16} {statistics.median(rs):.2f}   "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in rs)})")


if __name__ == "__main__":
    main()
