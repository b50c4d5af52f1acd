"""Drift evaluation cost: mlagent's window comparison versus Evidently's DataDriftPreset.

    python -m venv /tmp/ev && /tmp/ev/bin/pip install -e '.[bench]'
    /tmp/ev/bin/python bench/bench_drift_evidently.py

The same data on both sides: a reference and a current window of 10,000 rows with 10
numeric features (the current one shifted by 0.1 std in every feature). mlagent's
figure is the whole evaluation from raw values: counting the rows into the window on
the reference's frozen edges, then every statistic of DRIFT.md for the label, the
score and each feature. Evidently's is ``Report([DataDriftPreset()]).run(...)`` on
pandas DataFrames (its default per-column tests). Evidently is not a dependency of
the agent: the ``bench`` extra installs it, in a separate environment, as above.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from agent.connectors.drift.compare import Pending, Side, Window, compare
from agent.connectors.drift.reference import SubjectKey, reference_from_values

N, NFEAT, REPEAT = 10_000, 10, 5


def data(rng: np.random.Generator, shift: float) -> dict[str, np.ndarray]:
    cols = {f"f{i}": rng.normal(shift, 1, N) for i in range(NFEAT)}
    cols["label"] = rng.choice(["a", "b", "c"], N)
    cols["score"] = rng.beta(8, 2, N)
    return cols


def mlagent_eval(ref_cols: dict[str, np.ndarray], cur_cols: dict[str, np.ndarray]) -> float:
    names = [f"f{i}" for i in range(NFEAT)]
    ref = reference_from_values(
        SubjectKey("svc", "m", "1"), labels=ref_cols["label"].tolist(),
        scores=ref_cols["score"].tolist(), features={f: ref_cols[f].tolist() for f in names},
        n=N, bins=10, max_categories=50, low_cut=0.5, source="baseline")
    base = Side.of_reference(ref)
    labels, scores = cur_cols["label"].tolist(), cur_cols["score"].tolist()
    feats = {f: cur_cols[f].tolist() for f in names}
    t0 = time.perf_counter()
    p = Pending()
    p.rows = list(range(N))
    p.labels, p.scores, p.features = labels, scores, feats
    win = Window(ref, 5)
    win.add(p)
    compare(ref, base, win.side(), alpha=0.002)
    return time.perf_counter() - t0


def evidently_eval(ref_cols: dict[str, np.ndarray], cur_cols: dict[str, np.ndarray]) -> float:
    import pandas as pd
    from evidently import Report
    from evidently.presets import DataDriftPreset

    ref_df, cur_df = pd.DataFrame(ref_cols), pd.DataFrame(cur_cols)
    t0 = time.perf_counter()
    Report([DataDriftPreset()]).run(current_data=cur_df, reference_data=ref_df)
    return time.perf_counter() - t0


def main() -> None:
    rng = np.random.default_rng(0)
    ref_cols, cur_cols = data(rng, 0.0), data(rng, 0.1)
    ours = [mlagent_eval(ref_cols, cur_cols) for _ in range(REPEAT)]
    try:
        import evidently
    except ImportError:
        print("evidently is not installed here; see the module docstring")
        theirs = []
    else:
        theirs = [evidently_eval(ref_cols, cur_cols) for _ in range(REPEAT)]
    a = statistics.median(ours)
    print(f"mlagent window evaluation, {NFEAT} features + label + score, {N:,} rows: "
          f"median {a * 1e3:.1f} ms")
    if theirs:
        b = statistics.median(theirs)
        print(f"Evidently {evidently.__version__} DataDriftPreset, same data: median {b * 1e3:.1f} ms")
        print(f"ratio: mlagent is {b / a:.0f}x faster")


if __name__ == "__main__":
    main()
