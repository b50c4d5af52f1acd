"""Reference files: the format, and ``mlagent reference build|list|show|reset``."""

from __future__ import annotations

import argparse
import csv
import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agent.component import Kind, Signal
from agent.connectors.drift import DriftConfig, cli, factory, stats
from agent.connectors.drift.reference import (
    CategoricalHist,
    NumericHist,
    Reference,
    ReferenceError,
    SubjectKey,
    build_numeric,
    categorical_from_values,
    reference_from_values,
)
from agent.pdata import attributes_to_dict
from agent.testing import Sink, make_host, settings_for, span, trace_batch


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="mlagent")
    cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reference", *argv])
    return cli.run(args)


# --------------------------------------------------------------------------- the format


def test_bins_have_underflow_and_overflow_and_keep_the_reference_inside() -> None:
    h = build_numeric(np.arange(100, dtype=float), 4)
    assert h.counts[0] == 0 and h.counts[-1] == 0  # min and max of the reference inside
    assert h.counts.sum() == 100
    np.testing.assert_array_equal(h.bin(np.array([-1.0, 0.0, 99.0, 99.5, 1e9])),
                                  [1, 1, 0, 0, 1, 2])
    constant = build_numeric(np.full(10, 3.0), 10)  # duplicate quantiles collapse
    assert len(constant.edges) == 2 and constant.counts.tolist() == [0, 10, 0]


def test_discrete_features_keep_every_value_in_its_own_bin(tmp_path: Path) -> None:
    """The top value used to share the bin below it: a 0/1 feature going from 30 % to
    90 % ones gave p = 1 and PSI = 0."""
    rng = np.random.default_rng(1)
    ref, cur = (rng.random(1000) < 0.3).astype(float), (rng.random(1000) < 0.9).astype(float)
    h = build_numeric(ref, 10)
    assert h.counts[1:-1].tolist() == [np.sum(ref == 0), np.sum(ref == 1)]
    c = h.bin(cur)
    _, df, p = stats.chi2_homogeneity(h.counts, c)
    assert df == 1 and p < 1e-50 and stats.psi(h.counts, c) > 1.0
    ints = build_numeric(rng.choice(5, 1000).astype(float), 10)  # 5 values: 5 bins
    assert ints.edges[:-1].tolist() == [0, 1, 2, 3, 4] and ints.counts[0] == ints.counts[-1] == 0
    # Many distinct values but a heavy tie at the maximum (a cap): the cap keeps its bin.
    capped = np.minimum(rng.normal(0, 1, 1000), 0.5)
    hc = build_numeric(capped, 10)
    assert hc.counts[-2] == np.sum(capped == 0.5) and hc.edges[-2] == 0.5
    # `reference build` uses the same edges.
    path = tmp_path / "bin.csv"
    path.write_text("y\n" + "\n".join(str(int(v)) for v in ref) + "\n")
    out = tmp_path / "bin.json"
    assert run_cli("build", "--input", str(path), "--features", "y", "--output", str(out),
                   "--quiet") == 0
    built = Reference.load(out).features["y"]
    assert isinstance(built, NumericHist) and built.counts.tolist() == h.counts.tolist()


def test_reference_round_trips_through_json(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    ref = reference_from_values(
        SubjectKey("svc", "m", None), labels=["a", "b", "a", 1], scores=rng.random(50).tolist(),
        features={"x": rng.normal(size=50).tolist(), "c": ["u", "v", True]}, n=50, bins=5,
        max_categories=1, low_cut=0.3, source="file")
    assert ref.label is not None and ref.label.categories == ["a"]  # max_categories=1
    # Not every label can be kept: the cell is chosen on the even-numbered values ("a",
    # "a") and counted on the odd-numbered ones ("b", 1: both "other").
    assert ref.label.counts.tolist() == [0, 2]
    assert ref.label.rare == ["1", "b"]  # seen, not kept (not "unseen")
    assert ref.features["c"].counts.sum() == 1  # booleans make the feature categorical
    ref.save(tmp_path / "r.json")
    back = Reference.load(tmp_path / "r.json")
    assert back.to_json() == ref.to_json()
    assert back.subject.version is None and back.subject.matches(SubjectKey("svc", "m", "9"))
    assert not back.subject.matches(SubjectKey("other", "m", "9"))


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda d: d.update(format="something"), "not an mlagent drift reference"),
    (lambda d: d.update(version=2), "unsupported reference version 2"),
    (lambda d: d["features"]["x"].update(counts=[1, 2]), "features.x: needs len(edges) + 1"),
    (lambda d: d["features"]["x"].update(edges=[3.0, 1.0]), "strictly increasing"),
    (lambda d: d["label"].update(counts=[-1, 0, 0]), "non-negative"),
    (lambda d: d.pop("n"), "malformed reference"),
])
def test_malformed_references_are_refused_with_the_reason(tmp_path: Path, mutate, message) -> None:
    ref = reference_from_values(SubjectKey(None, "m", None), labels=["a", "b"], scores=[0.5, 0.9],
                                features={"x": [1.0, 2.0, 3.0]}, n=3, bins=2,
                                max_categories=5, low_cut=0.5, source="file")
    doc = ref.to_json()
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ReferenceError, match=re.escape(message)) as e:
        Reference.load(path)
    assert str(path) in str(e.value)


# --------------------------------------------------------------------------- build


def write_training(tmp_path: Path, n: int = 3000) -> tuple[Path, dict[str, list]]:
    rng = np.random.default_rng(1)
    data: dict[str, list] = {
        "label": rng.choice(["spam", "ham"], size=n, p=[0.3, 0.7]).tolist(),
        "score": rng.beta(5, 2, n).round(6).tolist(),
        "age": rng.normal(40, 12, n).round(3).tolist(),
        "country": rng.choice(["de", "fr", "us"], size=n).tolist(),
        "unused": ["x"] * n,
    }
    data["age"][5] = None  # missing values are skipped
    data["country"][7] = None
    path = tmp_path / "train.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(list(data))
        for i in range(n):
            w.writerow(["" if data[c][i] is None else data[c][i] for c in data])
    return path, data


def build(tmp_path: Path, source: Path, *extra: str) -> Reference:
    out = tmp_path / "ref.json"
    rc = run_cli("build", "--input", str(source), "--label", "label", "--score", "score",
                 "--features", "age,country", "--categorical", "country", "--output", str(out),
                 "--model", "spam", *extra)
    assert rc == 0
    return Reference.load(out)


def test_build_from_csv_counts_exactly(tmp_path: Path, capsys) -> None:
    path, data = write_training(tmp_path)
    ref = build(tmp_path, path, "--chunk-rows", "500")
    assert ref.subject == SubjectKey(None, "spam", None) and ref.source == "file"
    assert ref.n == 3000
    assert dict(zip(ref.label.categories, ref.label.counts.tolist(), strict=False)) == \
        dict(Counter(data["label"]))
    ages = np.array([a for a in data["age"] if a is not None])
    age = ref.features["age"]
    assert isinstance(age, NumericHist) and age.n == 2999
    assert age.mean == pytest.approx(ages.mean()) and age.std == pytest.approx(ages.std())
    # Fewer rows than --sample-size: the edges are the exact quantiles.
    np.testing.assert_allclose(age.edges[:-1], np.quantile(ages, np.linspace(0, 1, 11))[:-1])
    assert age.counts.tolist() == age.bin(ages).tolist()
    assert ref.features["country"].counts.sum() == 2999
    scores = np.array(data["score"])
    assert ref.score.low_cut == 0.5
    assert ref.score.low_fraction == pytest.approx(np.mean(scores < 0.5))
    err = capsys.readouterr().err
    assert "pass 1/2" in err and "pass 2/2" in err and "100.0%" in err


def test_build_chooses_categories_on_one_half_and_counts_on_the_other(tmp_path: Path) -> None:
    """More categories than --max-categories: `reference build` splits like a learned
    baseline (alternate values, across chunks), so unchanged data does not alarm."""
    rng = np.random.default_rng(3)
    zipf = (lambda q: q / q.sum())(1 / np.arange(1, 301) ** 1.1)
    values = [f"c{i}" for i in rng.choice(300, 2000, p=zipf)]
    path = tmp_path / "cats.csv"
    path.write_text("c\n" + "\n".join(values) + "\n")
    out = tmp_path / "cats.json"
    assert run_cli("build", "--input", str(path), "--features", "c", "--categorical", "c",
                   "--output", str(out), "--chunk-rows", "7", "--quiet") == 0
    built = Reference.load(out).features["c"]
    want = categorical_from_values(values, 50)
    assert isinstance(built, CategoricalHist)
    assert built.categories == want.categories and built.counts.tolist() == want.counts.tolist()
    assert built.n == 1000 and built.known == set(values)


def test_build_with_sampled_edges_still_counts_every_value(tmp_path: Path) -> None:
    path, data = write_training(tmp_path)
    ref = build(tmp_path, path, "--sample-size", "200", "--chunk-rows", "97", "--quiet")
    ages = np.array([a for a in data["age"] if a is not None])
    age = ref.features["age"]
    assert age.counts.sum() == 2999
    assert age.counts.tolist() == age.bin(ages).tolist()
    assert np.all(np.abs(age.counts[1:-1] / 2999 - 0.1) < 0.05)  # edges near the deciles


def test_build_from_parquet_equals_csv(tmp_path: Path, capsys) -> None:
    path, data = write_training(tmp_path)
    table = pa.table({
        "label": pa.array(data["label"]),
        "score": pa.array(data["score"], pa.float64()),
        "age": pa.array(data["age"], pa.float64()),
        "country": pa.array(data["country"]),
    })
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=700)
    from_csv = build(tmp_path, path, "--quiet").to_json()
    from_parquet = build(tmp_path, tmp_path / "train.parquet", "--chunk-rows", "300").to_json()
    moments = []
    for doc in (from_csv, from_parquet):
        doc.pop("created")
        # Chunking changes the summation order: moments agree to rounding, the rest exactly.
        moments.append([doc["score"].pop(k) for k in ("mean", "std")]
                       + [doc["features"]["age"].pop(k) for k in ("mean", "std")])
    assert from_parquet == from_csv
    assert moments[1] == pytest.approx(moments[0], rel=1e-12)
    assert "100.0%" in capsys.readouterr().err


def test_build_errors_name_the_column_and_row(tmp_path: Path, capsys) -> None:
    path, _ = write_training(tmp_path, n=50)
    out = str(tmp_path / "o.json")
    assert run_cli("build", "--input", str(path), "--features", "age,height",
                   "--output", out) == 1
    err = capsys.readouterr().err
    assert "'height'" in err and "not found" in err and "the file has: label, score" in err

    lines = path.read_text().splitlines()
    fields = lines[31].split(",")
    fields[2] = "forty"  # data row 31
    lines[31] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    assert run_cli("build", "--input", str(path), "--features", "age", "--output", out,
                   "--chunk-rows", "8", "--quiet") == 1
    err = capsys.readouterr().err
    assert "data row 31" in err and "'age'" in err and "'forty' is not a number" in err

    table = pa.table({"age": pa.array(["1", "2", "x"])})
    pq.write_table(table, tmp_path / "s.parquet")
    assert run_cli("build", "--input", str(tmp_path / "s.parquet"), "--features", "age",
                   "--output", out, "--quiet") == 1
    assert "data row 3" in capsys.readouterr().err

    (tmp_path / "empty.csv").write_text("")
    assert run_cli("build", "--input", str(tmp_path / "empty.csv"), "--label", "y",
                   "--output", out) == 1
    assert "empty" in capsys.readouterr().err
    assert run_cli("build", "--input", str(tmp_path / "nope.csv"), "--label", "y",
                   "--output", out) == 1
    assert "no such file" in capsys.readouterr().err
    assert run_cli("build", "--input", str(path), "--features", "age", "--categorical", "zip",
                   "--output", out) == 1
    assert "--categorical names columns not in --features: zip" in capsys.readouterr().err
    assert not Path(out).exists()


async def test_built_reference_is_used_by_the_connector(tmp_path: Path) -> None:
    path, _ = write_training(tmp_path)
    ref = build(tmp_path, path, "--quiet")
    sink = Sink()
    cfg = replace(DriftConfig(), reference_files=[tmp_path / "ref.json"])
    conn = factory.create(settings_for("drift", Kind.CONNECTOR), cfg, {Signal.METRICS: sink})
    await conn.start(make_host(tmp_path / "state"))
    rng = np.random.default_rng(2)
    spans = [span(trace_id=rng.bytes(16), attributes={
        "ml.model.name": "spam", "ml.model.version": "3", "ml.prediction.label": "spam",
        "ml.prediction.score": 0.9, "ml.feature.age": float(a), "ml.feature.country": "de"})
        for a in rng.normal(40, 12, 200)]
    await conn.consume(trace_batch({"mail": spans}))
    await conn.shutdown()
    detected = {}
    for rm in sink.batches[0].request.resource_metrics:
        for m in rm.scope_metrics[0].metrics:
            if m.name == "mlagent.drift.detected":
                detected = {attributes_to_dict(dp.attributes)["kind"]: dp.as_double
                            for dp in m.gauge.data_points}
    # Judged against the file at once; every prediction says "spam" (30 % in training).
    assert detected["prediction"] == 1.0 and detected["data"] == 1.0  # country is all "de"
    assert ref.n == 3000


# --------------------------------------------------------------------------- list / show / reset


def learned(state: Path) -> None:
    for version in ("1", "2"):
        ref = reference_from_values(SubjectKey("svc", "m", version), labels=["a"] * 10,
                                    scores=[0.9] * 10, features={}, n=10, bins=2,
                                    max_categories=5, low_cut=0.5, source="baseline")
        ref.save(state / "references" / f"{ref.subject.slug()}.json")


def test_list_show_reset(tmp_path: Path, capsys) -> None:
    state = tmp_path / "state"
    assert run_cli("list", "--state-dir", str(state)) == 0
    assert "no learned references" in capsys.readouterr().out
    learned(state)
    assert run_cli("list", "--state-dir", str(state)) == 0
    out = capsys.readouterr().out
    assert out.count("svc") == 2 and "VERSION" in out

    assert run_cli("show", "--state-dir", str(state), "--model-version", "2") == 0
    out = capsys.readouterr().out
    assert "subject: svc/m@2" in out and "label: a=1.000" in out and "svc/m@1" not in out
    assert run_cli("show", "--state-dir", str(state), "--model-version", "2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["subject"]["ml.model.version"] == "2"

    assert run_cli("reset", "--state-dir", str(state)) == 2  # refuses to guess
    assert run_cli("reset", "--state-dir", str(state), "--model", "m",
                   "--model-version", "1") == 0
    assert "svc/m@1" in capsys.readouterr().out
    assert [Reference.load(p).subject.version
            for p in (state / "references").glob("*.json")] == ["2"]
    assert run_cli("reset", "--state-dir", str(state), "--model-version", "1") == 1
    assert run_cli("reset", "--state-dir", str(state), "--all") == 0
    assert list((state / "references").glob("*.json")) == []


async def test_reset_makes_the_agent_learn_again(tmp_path: Path) -> None:
    """After ``reset``, a new connector instance (reload/restart) learns a new baseline."""
    state = tmp_path / "state"
    learned(state)
    cfg = replace(DriftConfig(), baseline_size=100, min_window_count=10)
    sink = Sink()
    conn = factory.create(settings_for("drift", Kind.CONNECTOR), cfg, {Signal.METRICS: sink})
    await conn.start(make_host(state))
    await conn.consume(trace_batch({"svc": [span(attributes={
        "ml.model.name": "m", "ml.model.version": "1", "ml.prediction.label": "a",
        "ml.prediction.score": 0.9})] * 10}))
    await conn.shutdown()
    names = {m.name for rm in sink.batches[0].request.resource_metrics
             for m in rm.scope_metrics[0].metrics}
    assert "mlagent.drift.baseline.progress" not in names  # it had a learned reference
    assert run_cli("reset", "--state-dir", str(state), "--model-version", "1") == 0
    sink = Sink()
    conn = factory.create(settings_for("drift", Kind.CONNECTOR), cfg, {Signal.METRICS: sink})
    await conn.start(make_host(state))
    await conn.consume(trace_batch({"svc": [span(attributes={
        "ml.model.name": "m", "ml.model.version": "1", "ml.prediction.label": "a"})] * 10}))
    await conn.shutdown()
    names = {m.name for rm in sink.batches[0].request.resource_metrics
             for m in rm.scope_metrics[0].metrics}
    assert "mlagent.drift.baseline.progress" in names
