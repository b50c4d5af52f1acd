"""References: frozen bins and counts that windows are compared with, and their file format.

A reference describes one subject's "normal": the label distribution, the score
histogram and one histogram per feature. Bin edges are frozen when the reference is
built, so every later window is counted on the same bins and windows from several
hosts can be summed.

File format (JSON, ``"format": "mlagent.drift.reference"``, ``"version": 1``)::

    {
      "format": "mlagent.drift.reference", "version": 1,
      "subject": {"service.name": "svc" | null, "ml.model.name": "m" | null,
                  "ml.model.version": "3" | null},      # null matches any value
      "source": "file" | "baseline", "created": "2026-01-01T00:00:00Z", "n": 1000,
      "label": {"type": "categorical", "categories": ["cat", "dog"],
                "counts": [600, 390, 10], "n": 1000},   # last count: "other"
      "score": {"type": "numeric", "edges": [...], "counts": [...], "mean": 0.8,
                "std": 0.1, "n": 1000, "low_cut": 0.5, "low_fraction": 0.04},
      "features": {
        "age":     {"type": "numeric", "edges": [...], "counts": [...],
                    "mean": 41.2, "std": 12.5, "n": 1000,
                    "tails": [0.0, 0.0]},                # optional, see NumericHist
        "country": {"type": "categorical", "categories": [...], "counts": [...], "n": 1000}
      }
    }

Numeric histograms: ``edges`` are the reference's quantiles at 0, 1/B, ..., 1
(duplicates removed; the last nudged up by one ulp so the reference maximum falls
inside, or kept with ``max + ulp`` appended when the maximum is a heavy tie), or, for
at most B + 1 distinct values, those values plus ``max + ulp`` (one bin per value; a
constant gets the single bin ``[v, v + ulp)``); see ``numeric_edges``. ``counts`` has ``len(edges) + 1`` entries: ``counts[0]`` is the underflow
(values below ``edges[0]``), ``counts[i]`` counts ``[edges[i-1], edges[i])`` and
``counts[-1]`` is the overflow (values at or above ``edges[-1]``), so no value ever
falls outside. Categorical histograms keep the ``max_categories`` most frequent
categories; ``counts`` has one more entry, the "other" bucket. The ``score`` also
records the fraction of reference scores below ``low_cut`` (the low-confidence cut).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "mlagent.drift.reference"
VERSION = 1

SERVICE, MODEL, MODEL_VERSION = "service.name", "ml.model.name", "ml.model.version"


class ReferenceError(ValueError):
    """A reference file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class SubjectKey:
    """``(service.name, ml.model.name, ml.model.version)``; ``None`` in a reference = any."""

    service: str | None
    model: str | None
    version: str | None

    def attributes(self) -> dict[str, str]:
        """The subject as metric / log attributes (wildcards left out)."""
        out = {SERVICE: self.service, MODEL: self.model, MODEL_VERSION: self.version}
        return {k: v for k, v in out.items() if v is not None}

    def matches(self, other: SubjectKey) -> bool:
        """Whether this (possibly wildcarded) key covers the concrete key ``other``."""
        return all(mine is None or mine == theirs for mine, theirs in
                   ((self.service, other.service), (self.model, other.model),
                    (self.version, other.version)))

    @property
    def specificity(self) -> int:
        """How many fields are fixed; the most specific matching reference wins."""
        return sum(v is not None for v in (self.service, self.model, self.version))

    def slug(self) -> str:
        """A file name for this subject: readable prefix plus a hash of the exact key."""
        raw = json.dumps([self.service, self.model, self.version])
        digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
        readable = "".join(ch if ch.isalnum() or ch in "-_." else "_"
                           for ch in f"{self.model}-{self.version}")[:60]
        return f"{readable}-{digest}"

    def __str__(self) -> str:
        return (f"{self.service or '*'}/{self.model or '*'}@"
                f"{self.version if self.version is not None else '*'}")


# --------------------------------------------------------------------------- histograms


@dataclass
class NumericHist:
    """A numeric reference histogram over frozen ``edges`` plus summary statistics."""

    edges: np.ndarray
    counts: np.ndarray
    mean: float
    std: float
    n: int
    # Mean distance beyond the edges, (below e_0, above e_B) per value (``excess``);
    # zero when the edges span every reference value (learned baselines).
    tails: tuple[float, float] = (0.0, 0.0)

    @property
    def nbins(self) -> int:
        return len(self.edges) + 1

    def bin(self, values: np.ndarray) -> np.ndarray:
        """Counts of ``values`` (finite float64) on these edges."""
        idx = np.searchsorted(self.edges, values, side="right")
        return np.bincount(idx, minlength=self.nbins)

    def excess(self, values: np.ndarray) -> tuple[float, float]:
        """Sums of ``e_0 - x`` over values below the edges and of ``x - e_B`` over values
        at or above them (Wasserstein beyond the edges)."""
        lo, hi = float(self.edges[0]), float(self.edges[-1])
        return (float(np.sum(np.maximum(lo - values, 0.0))),
                float(np.sum(np.maximum(values - hi, 0.0))))

    def to_json(self) -> dict[str, Any]:
        out = {"type": "numeric", "edges": self.edges.tolist(), "counts": self.counts.tolist(),
               "mean": self.mean, "std": self.std, "n": self.n}
        if any(self.tails):
            out["tails"] = list(self.tails)
        return out


@dataclass
class CategoricalHist:
    """Counts of the reference's top categories plus an "other" bucket (the last count).

    ``rare`` lists the categories the reference saw but did not keep (they land in
    "other" like never-seen ones); it only serves ``unseen_share``. ``None`` means not
    known (a file written before it was recorded).
    """

    categories: list[str]
    counts: np.ndarray
    n: int
    rare: list[str] | None = None
    index: dict[str, int] = field(init=False, repr=False)
    known: frozenset[str] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {c: i for i, c in enumerate(self.categories)}
        self.known = None if self.rare is None else frozenset([*self.categories, *self.rare])

    def unseen(self, values: list[str], other: int) -> int:
        """How many of ``values`` the reference never saw (``other``: how many fell in
        "other", so the usual case costs nothing); 0 when ``rare`` is not known."""
        known = self.known
        if not other or known is None:
            return 0
        return sum(1 for v in values if v not in known)

    @property
    def nbins(self) -> int:
        return len(self.categories) + 1

    def bin(self, values: Iterable[str]) -> np.ndarray:
        """Counts of ``values``; anything not a reference category lands in "other"."""
        get, other = self.index.get, len(self.categories)
        idx = np.fromiter((get(v, other) for v in values), dtype=np.int64)
        return np.bincount(idx, minlength=self.nbins)

    def to_json(self) -> dict[str, Any]:
        out = {"type": "categorical", "categories": self.categories,
               "counts": self.counts.tolist(), "n": self.n}
        if self.rare is not None:
            out["rare"] = self.rare
        return out


Hist = NumericHist | CategoricalHist


@dataclass
class ScoreHist(NumericHist):
    """The score histogram, plus the share of reference scores below ``low_cut``."""

    low_cut: float = 0.5
    low_fraction: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "low_cut": self.low_cut, "low_fraction": self.low_fraction}


def numeric_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Frozen edges for finite ``values``; each bin counts ``[edges[i-1], edges[i])``.

    - At most ``bins + 1`` distinct values (binary, small counts, a constant): the
      distinct values themselves plus ``nextafter(max)``, one bin per value, so a shift
      between any two of them shows.
    - Otherwise the quantiles at 0, 1/bins, ..., 1, deduplicated. The top edge (the
      maximum) is nudged up one ulp so the maximum falls inside; when the maximum holds
      at least half a bin's share of the values (a cap, a saturated score), it keeps a
      bin of its own ``[max, nextafter(max))`` instead of sharing the bin below it.
    """
    v = np.asarray(values, dtype=np.float64)
    distinct = np.unique(v)
    top = np.nextafter(distinct[-1], np.inf)
    if distinct.size <= bins + 1:
        return np.append(distinct, top)
    edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, bins + 1)))
    if 2 * bins * np.count_nonzero(v == distinct[-1]) >= v.size:
        return np.append(edges, top)
    edges[-1] = top
    return edges


def build_numeric(values: np.ndarray, bins: int, *, edges: np.ndarray | None = None) -> NumericHist:
    """A numeric histogram of finite ``values`` (edges from them unless given)."""
    v = np.asarray(values, dtype=np.float64)
    e = numeric_edges(v, bins) if edges is None else edges
    h = NumericHist(edges=e, counts=np.zeros(len(e) + 1, dtype=np.int64),
                    mean=float(v.mean()), std=float(v.std()), n=int(v.size))
    h.counts = h.bin(v)
    if v.size:
        below, above = h.excess(v)
        h.tails = (below / v.size, above / v.size)
    return h


def build_score(values: np.ndarray, bins: int, low_cut: float) -> ScoreHist:
    """The score histogram, recording the share below ``low_cut``."""
    h = build_numeric(values, bins)
    return ScoreHist(edges=h.edges, counts=h.counts, mean=h.mean, std=h.std, n=h.n,
                     tails=h.tails, low_cut=low_cut, low_fraction=float(np.mean(values < low_cut)))


MAX_RARE = 10_000
"""Seen-but-not-kept categories recorded per histogram (for ``unseen_share``); beyond
this many, the rarest count as unseen."""


def needs_split(counts: Mapping[str, int], max_categories: int) -> bool:
    """Whether the cells must be chosen on a different sample than they are counted on.

    Choosing the top categories on the very sample they are counted on inflates their
    counts (selection bias) and starves "other" of categories the sample never saw,
    which every later window does see: unchanged data then alarms. That happens when
    not every category can be kept, or when singletons show the sample missed part of
    the distribution (Good–Turing: the unseen mass is about singletons / n).
    """
    return len(counts) > max_categories or any(c == 1 for c in counts.values())


def build_categorical(counts: Mapping[str, int], max_categories: int, *,
                      count_on: Mapping[str, int] | None = None,
                      seen: Mapping[str, int] | None = None) -> CategoricalHist:
    """Keep the ``max_categories`` most frequent categories of ``counts``; the rest is "other".

    ``count_on``: count the cells on this sample instead (disjoint from ``counts``, see
    ``needs_split``). ``seen``: every category the reference saw (default: both), so
    the histogram can tell "seen but not kept" from "never seen".
    """
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_categories]
    cats = [str(k) for k, _ in top]
    on = counts if count_on is None else count_on
    n = int(sum(on.values()))
    kept = [int(on.get(k, 0)) for k, _ in top]
    if seen is None:
        seen = counts if count_on is None else {**count_on, **counts}
    keep = set(cats)
    rare = [str(k) for k, _ in sorted(seen.items(), key=lambda kv: (-kv[1], kv[0]))
            if str(k) not in keep][:MAX_RARE]
    return CategoricalHist(categories=cats, counts=np.asarray([*kept, n - sum(kept)], np.int64),
                           n=n, rare=rare)


def categorical_from_values(values: list[str], max_categories: int) -> CategoricalHist:
    """A categorical histogram of raw values, without selection bias (``needs_split``):
    when needed, the cells are chosen on the even-numbered values and counted on the
    odd-numbered ones (interleaved, so a trend over time favours neither half)."""
    full = Counter(values)
    if not needs_split(full, max_categories):
        return build_categorical(full, max_categories)
    return build_categorical(Counter(values[0::2]), max_categories,
                             count_on=Counter(values[1::2]), seen=full)


# --------------------------------------------------------------------------- references


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Reference:
    """One subject's reference (see the module docstring for the file format)."""

    subject: SubjectKey
    source: str
    n: int
    label: CategoricalHist | None = None
    score: ScoreHist | None = None
    features: dict[str, Hist] = field(default_factory=dict)
    created: str = field(default_factory=_now)

    def to_json(self) -> dict[str, Any]:
        s = self.subject
        return {
            "format": FORMAT, "version": VERSION,
            "subject": {SERVICE: s.service, MODEL: s.model, MODEL_VERSION: s.version},
            "source": self.source, "created": self.created, "n": self.n,
            "label": self.label.to_json() if self.label else None,
            "score": self.score.to_json() if self.score else None,
            "features": {k: h.to_json() for k, h in self.features.items()},
        }

    @classmethod
    def from_json(cls, doc: Any, where: str = "reference") -> Reference:
        """Parse and check a reference document; raises ``ReferenceError`` naming the problem."""
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ReferenceError(f"{where}: not an mlagent drift reference (format != {FORMAT!r})")
        if doc.get("version") != VERSION:
            raise ReferenceError(f"{where}: unsupported reference version {doc.get('version')!r} "
                                 f"(this agent reads version {VERSION})")
        try:
            subj = doc.get("subject") or {}
            key = SubjectKey(*(None if subj.get(k) is None else str(subj[k])
                               for k in (SERVICE, MODEL, MODEL_VERSION)))
            label = _hist_from_json(doc["label"], f"{where}: label") if doc.get("label") else None
            score = _hist_from_json(doc["score"], f"{where}: score") if doc.get("score") else None
            if score is not None and not isinstance(score, ScoreHist):
                raise ReferenceError(f"{where}: score must be numeric")
            if label is not None and not isinstance(label, CategoricalHist):
                raise ReferenceError(f"{where}: label must be categorical")
            features = {str(k): _hist_from_json(v, f"{where}: features.{k}")
                        for k, v in (doc.get("features") or {}).items()}
            return cls(subject=key, source=str(doc.get("source", "file")), n=int(doc["n"]),
                       label=label, score=score, features=features,
                       created=str(doc.get("created", "")))
        except ReferenceError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ReferenceError(f"{where}: malformed reference: {type(e).__name__}: {e}") from None

    def save(self, path: Path) -> None:
        """Write atomically (temporary file + rename), so a crash never leaves half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_json(), f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> Reference:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ReferenceError(f"{path}: cannot read reference: {e}") from None
        return cls.from_json(doc, str(path))


def _hist_from_json(d: Any, where: str) -> Hist:
    if not isinstance(d, dict):
        raise ReferenceError(f"{where}: expected an object")
    counts = np.asarray(d["counts"], dtype=np.int64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ReferenceError(f"{where}: counts must be a list of non-negative integers")
    if d.get("type") == "categorical":
        cats = [str(c) for c in d["categories"]]
        if len(counts) != len(cats) + 1:
            raise ReferenceError(f"{where}: needs len(categories) + 1 counts (the last is other)")
        rare = d.get("rare")
        if rare is None and counts[-1] == 0:
            rare = []  # an empty "other": every category the reference saw was kept
        return CategoricalHist(categories=cats, counts=counts, n=int(d.get("n", counts.sum())),
                               rare=None if rare is None else [str(c) for c in rare])
    if d.get("type") != "numeric":
        raise ReferenceError(f"{where}: type must be 'numeric' or 'categorical'")
    edges = np.asarray(d["edges"], dtype=np.float64)
    if edges.ndim != 1 or edges.size == 0 or not np.all(np.isfinite(edges)) \
            or np.any(np.diff(edges) <= 0):
        raise ReferenceError(f"{where}: edges must be finite and strictly increasing")
    if len(counts) != len(edges) + 1:
        raise ReferenceError(f"{where}: needs len(edges) + 1 counts (underflow .. overflow)")
    mean, std = float(d["mean"]), float(d["std"])
    if not (math.isfinite(mean) and math.isfinite(std) and std >= 0):
        raise ReferenceError(f"{where}: mean and std must be finite, std >= 0")
    n = int(d.get("n", counts.sum()))
    tails = d.get("tails", [0.0, 0.0])
    if not (isinstance(tails, list) and len(tails) == 2
            and all(math.isfinite(float(t)) and float(t) >= 0 for t in tails)):
        raise ReferenceError(f"{where}: tails must be two finite non-negative numbers")
    tail = (float(tails[0]), float(tails[1]))
    if "low_cut" in d:
        return ScoreHist(edges, counts, mean, std, n, tail, low_cut=float(d["low_cut"]),
                         low_fraction=float(d.get("low_fraction", 0.0)))
    return NumericHist(edges, counts, mean, std, n, tail)


# --------------------------------------------------------------------------- building from values


NUMERIC_SHARE = 0.95
"""A learned feature is numeric when at least this share of its values are finite numbers."""


def as_numeric(values: list[Any]) -> tuple[np.ndarray, int] | None:
    """The finite numbers among ``values`` as float64 and how many values were not, when
    at least ``NUMERIC_SHARE`` of them are finite numbers; else ``None`` (categorical).

    Booleans and strings are not numbers. A few missing or malformed values (None, NaN,
    "n/a") must not turn a numeric feature categorical: the window path drops them too
    (``Pending.numeric``, counted as ``non_numeric_feature``).
    """
    nums: list[float] = []
    for v in values:
        if isinstance(v, int | float) and not isinstance(v, bool):
            try:
                f = float(v)
            except OverflowError:  # an int beyond float range
                continue
            if math.isfinite(f):
                nums.append(f)
    if not values or len(nums) < NUMERIC_SHARE * len(values):
        return None
    return np.asarray(nums, dtype=np.float64), len(values) - len(nums)


def reference_from_values(subject: SubjectKey, *, labels: list[Any], scores: list[float],
                          features: Mapping[str, list[Any]], n: int, bins: int,
                          max_categories: int, low_cut: float, source: str,
                          on_drop: Callable[[str, int], None] | None = None) -> Reference:
    """Build a reference from raw values held in memory (automatic baselines).

    A feature whose values are mostly finite numbers (``as_numeric``) becomes numeric,
    its other values left out and reported to ``on_drop("non_numeric_feature", n)``;
    any other feature is categorical (values as strings). ``reference build`` streams
    files instead (cli.py).
    """
    ref = Reference(subject=subject, source=source, n=n)
    if labels:
        ref.label = categorical_from_values([str(v) for v in labels], max_categories)
    score_arr = np.asarray(scores, dtype=np.float64)
    if score_arr.size:
        ref.score = build_score(score_arr, bins, low_cut)
    for name, vals in features.items():
        if not vals:
            continue
        num = as_numeric(vals)
        if num is None:
            ref.features[name] = categorical_from_values([str(v) for v in vals], max_categories)
            continue
        arr, bad = num
        if bad and on_drop is not None:
            on_drop("non_numeric_feature", bad)
        ref.features[name] = build_numeric(arr, bins)
    return ref
