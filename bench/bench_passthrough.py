"""Passthrough throughput: otlp receiver -> batch -> otlp exporter -> counting sink.

    python bench/bench_passthrough.py [--duration 15] [--variants memory,persistent]

Prints, from one run: spans/s accepted (acknowledged to the load generator) and
exported (counted by the sink) per pipeline variant, the raw upb decode rate of the
same payloads, their ratio, and the agent's peak RSS. The load generator and sink
run as separate processes beside the agent (all on this 2-core machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from harness import decode_rate, run_pipeline
from payloads import make_payloads

BASE = """
[receivers.otlp]
grpc.endpoint = "{GRPC}"
http.endpoint = "{HTTP}"
grpc.max_request_size = "64MiB"
[processors.batch]
[exporters.otlp]
endpoint = "{SINK}"
compression = "none"
{QUEUE}
[service]
state_dir = "{STATE}"
health.endpoint = "{HEALTH}"
telemetry.log_level = "warning"
[service.pipelines.traces]
receivers = ["otlp"]
processors = [{PROCESSORS}]
exporters = ["otlp"]
"""

VARIANTS = {
    "memory": ('sending_queue.persistent = false', '"batch"'),
    "persistent": ('sending_queue.persistent = true', '"batch"'),
    "memory-nobatch": ('sending_queue.persistent = false', ''),
}


def config(variant: str) -> str:
    queue, procs = VARIANTS[variant]
    return (BASE.replace("{QUEUE}", queue).replace("{PROCESSORS}", procs)
            .replace("{", "{{").replace("}", "}}")
            .replace("{{GRPC}}", "{GRPC}").replace("{{HTTP}}", "{HTTP}")
            .replace("{{SINK}}", "{SINK}").replace("{{STATE}}", "{STATE}")
            .replace("{{HEALTH}}", "{HEALTH}"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--variants", default="memory,persistent")
    a = ap.parse_args()
    results = [run_pipeline(v, config(v), a.duration) for v in a.variants.split(",")]
    dec = decode_rate(make_payloads(16))
    print(f"raw upb decode of the same payloads: {dec:,.0f} spans/s (one core)")
    for r in results:
        print(r.line() + f"   exported/decode {r.exported_per_s / dec:.3f}")
    if len(results) > 1:
        base = results[0]
        for r in results[1:]:
            print(f"ratio {r.name}/{base.name} (exported): {r.exported_per_s / base.exported_per_s:.2f}")


if __name__ == "__main__":
    main()
