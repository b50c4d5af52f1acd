"""The host receiver: GPU readings through an NVML double, real psutil on this machine."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

import psutil
import pynvml
import pytest

from agent.component import Kind, PermanentError, RetryableError, Signal
from agent.config import decode_dataclass
from agent.hardware import HardwareSnapshot
from agent.pdata import attributes_to_dict, data_points, iter_metrics
from agent.receivers.host import HostConfig, HostFactory, HostReceiver, factory
from agent.telemetry import Telemetry
from agent.testing import Sink, make_host, settings_for

# tests/ is on sys.path (pytest puts the rootdir conftest's folder there)
from nvml_double import FakeGpu, FakeNvml  # isort: skip

MiB = 2**20


def points(batch: Any) -> dict[str, list[tuple[dict, dict, float, Any]]]:
    """name -> [(resource attrs, point attrs, value, metric)]."""
    out: dict[str, list] = {}
    for rm, _sm, m in iter_metrics(batch.request):
        res = attributes_to_dict(rm.resource.attributes)
        for dp in data_points(m):
            out.setdefault(m.name, []).append((res, attributes_to_dict(dp.attributes),
                                               dp.as_double, m))
    return out


def gpu_value(pts: dict, name: str, gpu: str) -> float | None:
    vals = [v for _r, a, v, _m in pts.get(name, []) if a.get("gpu.id") == gpu]
    assert len(vals) <= 1
    return vals[0] if vals else None


def make(tmp_path, nvml=None, telemetry=None, **cfg: Any) -> tuple[HostReceiver, Sink, Any]:
    """A host receiver (real NVML unless ``nvml`` is given), its sink and a host."""
    sink = Sink()
    config = HostConfig(**cfg)
    settings = settings_for("host", Kind.RECEIVER, telemetry)
    f = factory if nvml is None else HostFactory(nvml=nvml)
    return f.create(settings, config, {Signal.METRICS: sink}), sink, make_host(tmp_path)


def two_gpus() -> FakeNvml:
    return FakeNvml([
        FakeGpu("GPU-aaaa", processes=[(4242, 3 * 2**30), (4343, None)]),
        FakeGpu("GPU-bbbb", util_gpu=90, power_mw=300_000,
                errors={"power_mw": pynvml.NVML_ERROR_NOT_SUPPORTED}),
    ])


async def test_every_gpu_reading_with_units_and_dcgm_scaling(tmp_path):
    nvml = two_gpus()
    r, _sink, host = make(tmp_path, nvml)
    await r.start(host)
    try:
        batch = await r.collect()
    finally:
        await r.shutdown()
    pts = points(batch)
    assert gpu_value(pts, "hw.gpu.utilization", "0") == pytest.approx(0.37)
    assert gpu_value(pts, "hw.gpu.utilization", "1") == pytest.approx(0.90)
    assert gpu_value(pts, "hw.gpu.memory.bandwidth.utilization", "0") == pytest.approx(0.12)
    assert gpu_value(pts, "hw.gpu.memory.usage", "0") == 30 * 2**30
    assert gpu_value(pts, "hw.gpu.memory.free", "0") == 50 * 2**30
    assert gpu_value(pts, "hw.gpu.memory.limit", "0") == 80 * 2**30
    assert gpu_value(pts, "hw.gpu.power", "0") == pytest.approx(215.5)  # mW -> W
    assert gpu_value(pts, "hw.gpu.energy", "0") == pytest.approx(9876.543)  # mJ -> J
    assert gpu_value(pts, "hw.gpu.temperature", "0") == 54
    assert gpu_value(pts, "hw.gpu.clock.sm", "0") == 1980
    per_proc = {a["process.pid"]: v for _r, a, v, _m in pts["hw.gpu.process.memory.usage"]}
    assert per_proc == {4242: 3 * 2**30}  # a process whose usage NVML withholds has no point

    units = {name: rows[0][3].unit for name, rows in pts.items()}
    assert units["hw.gpu.utilization"] == "1"
    assert units["hw.gpu.memory.usage"] == "By"
    assert units["hw.gpu.power"] == "W"
    assert units["hw.gpu.energy"] == "J"
    assert units["hw.gpu.temperature"] == "Cel"
    energy = pts["hw.gpu.energy"][0][3]
    assert energy.sum.is_monotonic and energy.sum.aggregation_temporality == 2
    desc = pts["hw.gpu.utilization"][0][3].description
    assert "some kernel was running" in desc and "not SM" in desc
    _res, attrs, _v, _m = pts["hw.gpu.utilization"][0]
    assert attrs == {"hw.id": "GPU-aaaa", "hw.name": "NVIDIA H100 80GB HBM3", "gpu.id": "0"}


async def test_not_supported_field_is_skipped_for_that_gpu_and_logged_once(tmp_path, caplog):
    nvml = two_gpus()
    r, _sink, host = make(tmp_path, nvml)
    caplog.set_level(logging.INFO, logger="mlagent")
    await r.start(host)
    try:
        first = points(await r.collect())
        second = points(await r.collect())
    finally:
        await r.shutdown()
    for pts in (first, second):
        assert gpu_value(pts, "hw.gpu.power", "1") is None
        assert gpu_value(pts, "hw.gpu.power", "0") == pytest.approx(215.5)
        assert gpu_value(pts, "hw.gpu.utilization", "1") == pytest.approx(0.9)
    notes = [rec for rec in caplog.records if "not supported" in rec.getMessage()]
    assert len(notes) == 1
    # GPU 0 was asked twice, GPU 1 only the first time.
    assert nvml.calls["power_mw"] == 3


async def test_lost_gpu_is_dropped_and_the_other_keeps_reporting(tmp_path, caplog):
    nvml = two_gpus()
    r, sink, host = make(tmp_path, nvml)
    await r.start(host)
    try:
        await r.collect()
        nvml.lose(0)
        after = points(await r.collect())
        again = points(await r.collect())
    finally:
        await r.shutdown()
    for pts in (after, again):
        assert gpu_value(pts, "hw.gpu.utilization", "0") is None
        assert gpu_value(pts, "hw.gpu.utilization", "1") == pytest.approx(0.9)
        assert "system.memory.usage" in pts
    assert len(sink.batches) == 3
    assert len([rec for rec in caplog.records if "GPU lost" in rec.getMessage()]) == 1
    assert [g.index for g in HardwareSnapshot.of(host).latest.gpus] == [1]


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
                                  pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
async def test_machine_without_nvml_runs_cleanly_and_says_so_once(tmp_path, caplog, code):
    caplog.set_level(logging.INFO, logger="mlagent")
    r, _sink, host = make(tmp_path, FakeNvml([], init_error=code))
    await r.start(host)
    try:
        await r.collect()
        pts = points(await r.collect())
    finally:
        await r.shutdown()
    assert not [n for n in pts if n.startswith("hw.")]
    assert "system.memory.usage" in pts
    assert len([rec for rec in caplog.records if "GPU sampling is off" in rec.getMessage()]) == 1


async def test_real_nvml_on_this_machine_does_not_break_sampling(tmp_path):
    # Uses pynvml for real: without a driver here this checks the "off" path; on a
    # GPU machine it samples real GPUs. Either way system metrics must flow.
    r, _sink, host = make(tmp_path)
    await r.start(host)
    try:
        pts = points(await r.collect())
    finally:
        await r.shutdown()
    assert "system.cpu.utilization" in pts
    if r.gpu.enabled:
        assert gpu_value(pts, "hw.gpu.memory.limit", "0") > 0


async def test_system_metrics_from_real_psutil(tmp_path):
    r, _sink, host = make(tmp_path, FakeNvml([]))
    await r.start(host)
    try:
        pts = points(await r.collect())
    finally:
        await r.shutdown()
    ((_res, _attrs, total, _m),) = pts["system.cpu.utilization"]
    assert 0.0 <= total <= 1.0
    cores = pts["system.cpu.core.utilization"]
    assert sorted(a["cpu.logical_number"] for _r, a, _v, _m in cores) == list(
        range(psutil.cpu_count()))
    assert pts["system.memory.limit"][0][2] == psutil.virtual_memory().total
    states = {a["system.memory.state"] for _r, a, _v, _m in pts["system.memory.usage"]}
    assert {"used", "free"} <= states
    assert 0.0 < pts["system.memory.utilization"][0][2] < 1.0
    assert {"system.cpu.load_average.1m", "system.cpu.load_average.15m"} <= set(pts)
    mounts = {a["system.filesystem.mountpoint"] for _r, a, _v, _m in pts["system.filesystem.usage"]}
    assert "/" in mounts
    nics = {a["network.interface.name"] for _r, a, _v, _m in pts["system.network.io"]}
    assert "lo" not in nics  # excluded by default
    assert all(m.sum.is_monotonic for *_x, m in pts["system.network.io"])
    res = pts["system.memory.limit"][0][0]
    assert res["host.name"] and res["os.type"] == "linux"
    # the reading enrich sees is published
    latest = HardwareSnapshot.of(host).latest
    assert latest is not None and latest.cpu_utilization == total


async def test_inference_processes_from_enrich_pids_and_name_patterns(tmp_path):
    marker = f"mlagent-test-inference-{os.getpid()}"
    child = subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(60)", marker])
    try:
        r, _sink, host = make(tmp_path, FakeNvml([]), process_name_patterns=[marker.upper()])
        snap = HardwareSnapshot.of(host)
        snap.note_process(os.getpid(), "ranker")
        snap.note_process(2**22 + 12345, "gone")  # no such process
        await r.start(host)
        try:
            first = points(await r.collect())
            second = points(await r.collect())
        finally:
            await r.shutdown()
    finally:
        child.kill()
        child.wait()
    rss = {res["process.pid"]: (res, v) for res, _a, v, _m in first["process.memory.usage"]}
    assert set(rss) == {os.getpid(), child.pid}
    res, value = rss[os.getpid()]
    assert res["service.name"] == "ranker" and value == pytest.approx(
        psutil.Process().memory_info().rss, rel=0.5)
    assert "service.name" not in rss[child.pid][0]
    # Each point names its process too, so flattening resources cannot merge processes.
    assert all(a["process.pid"] == res["process.pid"]
               for res, a, _v, _m in first["process.memory.usage"])
    threads = {res["process.pid"]: v for res, _a, v, _m in second["process.thread.count"]}
    assert threads[os.getpid()] >= 1
    assert {res["process.pid"] for res, *_ in second["process.cpu.utilization"]} == {
        os.getpid(), child.pid}
    assert all(0.0 <= v <= 1.0 for _r, _a, v, _m in second["process.cpu.utilization"])
    assert "process.open_file_descriptor.count" in second
    assert 2**22 + 12345 not in snap.processes()  # forgotten once found gone


async def test_downstream_errors_are_counted_and_sampling_continues(tmp_path):
    telemetry = Telemetry()
    r, sink, host = make(tmp_path, FakeNvml([]), telemetry=telemetry)
    await r.start(host)
    try:
        sink.fail_with = RetryableError("queue full")
        await r.collect()
        sink.fail_with = PermanentError("nope")
        await r.collect()
        sink.fail_with = RuntimeError("bug downstream")
        await r.collect()
        sink.fail_with = None
        await r.collect()
    finally:
        await r.shutdown()
    snap = telemetry.snapshot("host")
    dropped = {k: v for k, v in snap.items() if k.startswith("mlagent_agent_dropped_items_total")}
    reasons = {k.split("reason=")[1].split(",")[0].rstrip("}") for k in dropped}
    assert reasons == {"downstream_refused", "downstream_rejected", "downstream_error"}
    assert len(sink.batches) == 1


async def test_runs_on_its_interval_and_shuts_down(tmp_path):
    r, sink, host = make(tmp_path, FakeNvml([FakeGpu("GPU-x")]), interval=0.1)
    await r.shutdown()  # safe before start
    await r.start(host)
    await sink.wait_for(lambda s: len(s.batches) >= 2)
    await r.shutdown()
    await r.shutdown()  # idempotent
    n = len(sink.batches)
    assert all("hw.gpu.utilization" in points(b) for b in sink.batches)
    assert HardwareSnapshot.of(host).latest.gpus[0].uuid == "GPU-x"
    assert n == len(sink.batches)


def test_config_defaults_and_validation():
    errors: list[str] = []
    cfg = decode_dataclass(HostConfig, {"interval": "30s"}, "receivers.host", errors)
    assert errors == [] and cfg.interval == 30.0 and cfg.gpu is True
    errors = []
    decode_dataclass(HostConfig, {"interval": "10ms", "process_name_patterns": ["("]},
                     "receivers.host", errors)
    assert [e.split(":")[0] for e in errors] == ["receivers.host.interval",
                                                 "receivers.host.process_name_patterns[0]"]
    errors = []
    decode_dataclass(HostConfig, {"intervall": "1s"}, "receivers.host", errors)
    assert errors == ["receivers.host.intervall: unknown key (did you mean 'interval'?)"]


async def test_gpu_lost_before_start_does_not_hide_the_others(tmp_path):
    nvml = two_gpus()
    nvml.lose(0)
    r, _sink, host = make(tmp_path, nvml)
    await r.start(host)
    try:
        pts = points(await r.collect())
    finally:
        await r.shutdown()
    assert [a["gpu.id"] for _r, a, _v, _m in pts["hw.gpu.utilization"]] == ["1"]
