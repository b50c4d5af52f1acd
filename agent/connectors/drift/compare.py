"""Windows on frozen bins, and the comparison of two sides that decides drift.

A *side* is what a comparison needs from one distribution: histogram counts on the
reference's frozen bins, score moments, the low-confidence count, feature moments.
A reference is one side (``Side.of_reference``); a window's counts are the other
(``Window.side``); for a canary comparison both sides are windows counted on the
anchor version's reference bins.

Decisions use calibrated p-values, never fixed bounds on PSI (DRIFT.md): per kind a
family of p-values is corrected (Bonferroni or BH) and compared with ``alpha``.

- prediction drift: chi-squared homogeneity of the label counts and of the score
  histogram;
- data drift: chi-squared homogeneity of each feature's histogram, corrected across
  the subject's features;
- confidence collapse: a one-sided z-test of the mean score falling, and a one-sided
  exact (Fisher) test of the low-confidence share rising (corrected over the two).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.connectors.drift import stats
from agent.connectors.drift.reference import CategoricalHist, NumericHist, Reference

KINDS = ("prediction", "data", "confidence")


# --------------------------------------------------------------------------- incoming values


class Pending:
    """The prediction values of one subject from one batch, converted lazily, once.

    Both the subject's own window and its canary window read the same ``Pending``,
    so conversions (to float arrays, to strings) are cached here. Invalid values are
    counted in ``bad`` by reason and left out.
    """

    __slots__ = ("_numeric", "_strings", "bad", "features", "labels", "rows", "scores")

    def __init__(self) -> None:
        self.rows: list[int] = []  # item indexes in the batch (for example trace ids)
        self.labels: list[Any] = []
        self.scores: list[Any] = []
        self.features: dict[str, list[Any]] = {}
        self.bad: dict[str, int] = {}
        self._numeric: dict[str | None, np.ndarray] = {}
        self._strings: dict[str | None, list[str]] = {}

    def _count_bad(self, reason: str, n: int) -> None:
        if n:
            self.bad[reason] = self.bad.get(reason, 0) + n

    def numeric(self, name: str | None) -> np.ndarray:
        """Finite float values of feature ``name`` (``None``: the scores)."""
        arr = self._numeric.get(name)
        if arr is None:
            vals = self.scores if name is None else self.features.get(name, [])
            try:
                arr = np.asarray(vals, dtype=np.float64)
            except (TypeError, ValueError):
                arr = np.asarray([_to_float(v) for v in vals], dtype=np.float64)
            ok = np.isfinite(arr)
            if not ok.all():
                self._count_bad("invalid_score" if name is None else "non_numeric_feature",
                                int(ok.size - ok.sum()))
                arr = arr[ok]
            self._numeric[name] = arr
        return arr

    def strings(self, name: str | None) -> list[str]:
        """Values of feature ``name`` (``None``: the labels) as strings."""
        out = self._strings.get(name)
        if out is None:
            vals = self.labels if name is None else self.features.get(name, [])
            out = self._strings[name] = [v if isinstance(v, str) else str(v) for v in vals]
        return out


def _to_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# --------------------------------------------------------------------------- sides


@dataclass
class Side:
    """One distribution as the comparison sees it (counts on shared frozen bins)."""

    n: int
    label: np.ndarray | None = None
    score: np.ndarray | None = None
    score_moments: tuple[float, float, float] | None = None  # mean, variance, n
    low: tuple[float, float] | None = None  # (count below the cut, n)
    score_entropy: float = math.nan  # mean binary entropy of the scores, bits
    features: dict[str, np.ndarray] = field(default_factory=dict)
    moments: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    # Per categorical signal (``label``, ``feature:<name>``): values the reference never saw.
    unseen: dict[str, int] = field(default_factory=dict)
    # Per numeric signal (``score``, ``feature:<name>``): mean distance beyond the
    # reference's edges, (below, above) (``NumericHist.excess``, for Wasserstein).
    tails: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def of_reference(cls, ref: Reference) -> Side:
        s = cls(n=ref.n)
        if ref.label is not None:
            s.label = ref.label.counts
        if ref.score is not None:
            sc = ref.score
            s.score = sc.counts
            s.score_moments = (sc.mean, sc.std**2, float(sc.n))
            s.low = (sc.low_fraction * sc.n, float(sc.n))
            s.tails["score"] = sc.tails
        for name, h in ref.features.items():
            s.features[name] = h.counts
            if isinstance(h, NumericHist):
                s.moments[name] = (h.mean, h.std**2, float(h.n))
                s.tails[f"feature:{name}"] = h.tails
        return s


class Window:
    """Counts of one tumbling window on one reference's frozen bins.

    Holds only arrays and a few sums (never batches); memory is fixed by the
    reference's shape. Moments are accumulated around the reference mean so the
    variance does not suffer from cancellation.
    """

    def __init__(self, ref: Reference, max_examples: int) -> None:
        self.ref = ref
        self.n = 0
        self.label = np.zeros(ref.label.nbins, np.int64) if ref.label else None
        self.score = np.zeros(ref.score.nbins, np.int64) if ref.score else None
        self._score_sums = np.zeros(3)  # n, sum(x - shift), sum((x - shift)^2)
        self._low = 0
        self._entropy = 0.0
        self.features = {name: np.zeros(h.nbins, np.int64) for name, h in ref.features.items()}
        self._sums = {name: np.zeros(3) for name, h in ref.features.items()
                      if isinstance(h, NumericHist)}
        self.unseen: dict[str, int] = {}
        self._excess: dict[str, np.ndarray] = {}  # per numeric signal: sums beyond the edges
        self.examples: deque[tuple[bytes, bytes]] = deque(maxlen=max_examples)
        # The counts scaled up by 1/rate, per signal; None while every add had weight 1
        # (then the counts themselves are the volume, and nothing is duplicated).
        self._scaled: dict[str, np.ndarray] | None = None

    def add(self, p: Pending, weight: float = 1.0) -> int:
        """Count ``p``'s values. Returns how many feature values had no reference bins.

        ``weight`` is how many items each of ``p``'s stands for (1/rate when they were
        sampled): it scales only the volumes that ``scaled_counts`` reports, never the
        counts the tests run on.
        """
        ref = self.ref
        self.n += len(p.rows)
        if weight != 1.0 and self._scaled is None:
            self._scaled = {s: c.astype(np.float64) for s, c in self.counts().items()}
        if self.label is not None and p.labels:
            self._categorical("label", ref.label, self.label, p.strings(None), weight)  # type: ignore[arg-type]
        if self.score is not None and p.scores:
            sc = ref.score
            x = p.numeric(None)
            self._count("score", self.score, sc.bin(x), weight)  # type: ignore[union-attr]
            self._beyond("score", sc, x)  # type: ignore[arg-type]
            _accumulate(self._score_sums, x, sc.mean)  # type: ignore[union-attr]
            self._low += int(np.count_nonzero(x < sc.low_cut))  # type: ignore[union-attr]
            self._entropy += float(stats.binary_entropy_bits(x).sum())
        unknown = 0
        for name, vals in p.features.items():
            h = ref.features.get(name)
            if h is None:
                unknown += len(vals)
            elif isinstance(h, CategoricalHist):
                self._categorical(f"feature:{name}", h, self.features[name], p.strings(name), weight)
            else:
                x = p.numeric(name)
                self._count(f"feature:{name}", self.features[name], h.bin(x), weight)
                self._beyond(f"feature:{name}", h, x)
                _accumulate(self._sums[name], x, h.mean)
        return unknown

    def _beyond(self, signal: str, h: NumericHist, x: np.ndarray) -> None:
        # Only the values outside the edges add anything; most windows have none.
        if x.size and (x.min() < h.edges[0] or x.max() >= h.edges[-1]):
            sums = self._excess.setdefault(signal, np.zeros(2))
            sums += h.excess(x)

    def _categorical(self, signal: str, h: CategoricalHist, counts: np.ndarray, values: list[str],
                     weight: float) -> None:
        add = h.bin(values)
        self._count(signal, counts, add, weight)
        unseen = h.unseen(values, int(add[-1]))
        if unseen:
            self.unseen[signal] = self.unseen.get(signal, 0) + unseen

    def _count(self, signal: str, counts: np.ndarray, add: np.ndarray, weight: float) -> None:
        counts += add
        if self._scaled is not None:
            self._scaled[signal] += add * weight

    def counts(self) -> dict[str, np.ndarray]:
        """The window's counts per signal (``label``, ``score``, ``feature:<name>``)."""
        out: dict[str, np.ndarray] = {}
        if self.label is not None:
            out["label"] = self.label
        if self.score is not None:
            out["score"] = self.score
        out.update((f"feature:{name}", c) for name, c in self.features.items())
        return out

    def scaled_counts(self) -> dict[str, np.ndarray]:
        """The counts scaled up to the volume they stand for (float when sampled)."""
        return self.counts() if self._scaled is None else self._scaled

    def _tails(self, signal: str, n: float) -> tuple[float, float]:
        sums = self._excess.get(signal)
        return (0.0, 0.0) if sums is None else (float(sums[0] / n), float(sums[1] / n))

    def side(self) -> Side:
        s = Side(n=self.n, label=self.label, score=self.score, features=self.features,
                 unseen=self.unseen)
        sc = self.ref.score
        if sc is not None and self._score_sums[0] > 0:
            s.score_moments = _moments(self._score_sums, sc.mean)
            s.low = (float(self._low), self._score_sums[0])
            s.score_entropy = self._entropy / self._score_sums[0]
            s.tails["score"] = self._tails("score", self._score_sums[0])
        for name, sums in self._sums.items():
            if sums[0] > 0:
                s.moments[name] = _moments(sums, self.ref.features[name].mean)  # type: ignore[union-attr]
                s.tails[f"feature:{name}"] = self._tails(f"feature:{name}", sums[0])
        return s


def _accumulate(sums: np.ndarray, x: np.ndarray, shift: float) -> None:
    d = x - shift
    sums += (d.size, d.sum(), np.dot(d, d))


def _moments(sums: np.ndarray, shift: float) -> tuple[float, float, float]:
    n, s1, s2 = sums
    m = s1 / n
    return shift + m, max(s2 / n - m * m, 0.0), n


# --------------------------------------------------------------------------- comparison


@dataclass
class Evaluation:
    """The outcome of comparing a window with its reference (or another window).

    ``signals`` maps ``"label"``, ``"score"``, ``"feature:<name>"`` to statistics
    (``psi``, ``js``, ``p_value``; ``ks`` and ``wasserstein`` for numeric ones;
    ``unseen_share`` for categorical ones). ``kind_p`` holds each kind's corrected
    p-value, ``detected`` each kind's verdict, ``triggers`` the signals behind it.
    """

    signals: dict[str, dict[str, float]] = field(default_factory=dict)
    kind_p: dict[str, float] = field(default_factory=dict)
    detected: dict[str, bool] = field(default_factory=dict)
    triggers: dict[str, list[str]] = field(default_factory=dict)


def _numeric_stats(r: np.ndarray, c: np.ndarray, h: NumericHist,
                   tails: tuple[tuple[float, float] | None, tuple[float, float] | None]
                   ) -> dict[str, float]:
    _, _, p = stats.chi2_homogeneity(r, c)
    std = h.std if h.std > 0 else math.nan
    w = stats.wasserstein_binned(r, c, h.edges, excess_ref=_arr(tails[0]), excess_cur=_arr(tails[1]))
    return {"psi": float(stats.psi(r, c)), "js": float(stats.js_distance(r, c)),
            "p_value": float(p), "ks": float(stats.ks_binned(r, c)),
            "wasserstein": float(w) / std}


def _arr(t: tuple[float, float] | None) -> np.ndarray | None:
    return None if t is None else np.asarray(t, dtype=np.float64)


def _categorical_stats(r: np.ndarray, c: np.ndarray, h: CategoricalHist,
                       unseen: int) -> dict[str, float]:
    _, _, p = stats.chi2_homogeneity(r, c)
    out = {"psi": float(stats.psi(r, c)), "js": float(stats.js_distance(r, c)),
           "p_value": float(p)}
    if h.known is not None:  # else the reference does not say which categories it saw
        out["unseen_share"] = unseen / float(c.sum())
    return out


def compare(ref: Reference, base: Side, cur: Side, *, alpha: float,
            correction: str = "bonferroni") -> Evaluation:
    """Compare ``cur`` with ``base``; both counted on ``ref``'s frozen bins."""
    ev = Evaluation()
    families: dict[str, dict[str, float]] = {k: {} for k in KINDS}
    if base.label is not None and cur.label is not None and cur.label.sum() and base.label.sum():
        ev.signals["label"] = _categorical_stats(base.label, cur.label, ref.label,  # type: ignore[arg-type]
                                                 cur.unseen.get("label", 0))
        families["prediction"]["label"] = ev.signals["label"]["p_value"]
    if base.score is not None and cur.score is not None and cur.score.sum() and base.score.sum():
        ev.signals["score"] = _numeric_stats(base.score, cur.score, ref.score,  # type: ignore[arg-type]
                                             (base.tails.get("score"), cur.tails.get("score")))
        families["prediction"]["score"] = ev.signals["score"]["p_value"]
    for name, c in cur.features.items():
        b = base.features.get(name)
        if b is None or not c.sum() or not b.sum():
            continue
        h = ref.features[name]
        st = (_categorical_stats(b, c, h, cur.unseen.get(f"feature:{name}", 0))
              if isinstance(h, CategoricalHist) else
              _numeric_stats(b, c, h, (base.tails.get(f"feature:{name}"),
                                       cur.tails.get(f"feature:{name}"))))
        ev.signals[f"feature:{name}"] = st
        families["data"][f"feature:{name}"] = st["p_value"]
    if base.score_moments and cur.score_moments and base.low and cur.low:
        p_mean = stats.mean_drop_p(*base.score_moments, *cur.score_moments)
        p_low = stats.proportion_rise_p(*base.low, *cur.low)
        families["confidence"] = {"score.mean": p_mean, "score.low_fraction": p_low}
    for kind, fam in families.items():
        if not fam:
            continue
        p = stats.adjusted_min_p(np.fromiter(fam.values(), float), correction)
        if math.isnan(p):
            continue
        ev.kind_p[kind] = p
        ev.detected[kind] = p <= alpha
        # The signals behind the verdict: those significant on their own (Bonferroni),
        # else the closest one, so a "resolved" record still names what was watched.
        ranked = sorted((kv for kv in fam.items() if not math.isnan(kv[1])), key=lambda kv: kv[1])
        ev.triggers[kind] = ([name for name, pv in ranked if pv * len(ranked) <= alpha][:5]
                             or [ranked[0][0]])
    return ev
