"""Configuration of the ``drift`` connector (defaults here, validation pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.config import Duration


@dataclass
class DriftConfig:
    """``[connectors.drift]``: windows, references, decision rules and bounds."""

    # Tumbling evaluation window.
    window: Duration = 300.0
    # A window with fewer predictions than this reports "insufficient data" and no verdict.
    min_window_count: int = 100
    # Per kind (prediction, data, confidence) and window evaluation: the false-alarm
    # rate when nothing changed. Three kinds at 0.002 keep the union under 1 %.
    alpha: float = 0.002
    # Multiple-testing correction across the features of one subject (data drift)
    # and across label/score (prediction drift): "bonferroni" or "bh" (FDR).
    correction: Literal["bonferroni", "bh"] = "bonferroni"
    # Regular bins per numeric histogram (quantiles of the reference), plus under/overflow.
    bins: int = 10
    # Scores below this count as low-confidence.
    low_confidence: float = 0.5
    # References built offline (`mlagent reference build`); re-read on start and reload.
    reference_files: list[Path] = field(default_factory=list)
    # Every *.json in this directory is a reference file too.
    reference_dir: Path | None = None
    # Learn a reference from the first `baseline_size` predictions of a model version
    # that has no reference file; persisted under <state_dir>/references.
    auto_baseline: bool = True
    baseline_size: int = 1000
    # Compare each other live version of a model with its first-referenced version.
    canary: bool = True
    # Predictions per service and window that the statistics are computed on: above
    # this volume each service's items are sampled at a rate adapted every second to
    # examine about this many (sampling.py); at or below it every prediction is read.
    # 0 switches adaptive sampling off (every item is read, up to `sample`).
    target_window_predictions: int = 10_000
    # Items (predictions or not) read per service and window at most while sampling,
    # so a busy service whose spans seldom carry a prediction is not read in full.
    max_window_examined: int = 100_000
    # Share of items examined at most (chosen at random), whatever the volume.
    # Tests run on what was examined; counts are scaled up by 1/rate.
    sample: float = 1.0
    # Bounds: subjects tracked, features per subject, categories per categorical
    # histogram (the rest is "other"), example trace ids kept per window.
    max_subjects: int = 100
    max_features: int = 50
    max_categories: int = 50
    max_examples: int = 5
    # Learned references kept on disk (<state_dir>/references); beyond this many the least
    # recently used are deleted (a version seen again then learns a new baseline).
    # Learned references held in memory are bounded by max_subjects.
    max_learned_references: int = 1000
    # Emit the window's counts as cumulative histograms on the reference's frozen edges.
    histograms: bool = True

    def validate(self) -> list[str]:
        errors: list[str] = []
        if self.window <= 0:
            errors.append("window: must be positive")
        if self.min_window_count < 10:
            errors.append("min_window_count: must be at least 10")
        if not 0.0 < self.alpha < 0.5:
            errors.append("alpha: must be between 0 and 0.5")
        if not 2 <= self.bins <= 100:
            errors.append("bins: must be between 2 and 100")
        if not 0.0 < self.sample <= 1.0:
            errors.append("sample: must be in (0, 1]")
        if self.target_window_predictions and (
                self.target_window_predictions < self.min_window_count):
            errors.append("target_window_predictions: must be 0 (off) or at least "
                          "min_window_count")
        if self.max_window_examined < max(self.target_window_predictions, 1):
            errors.append("max_window_examined: must be at least target_window_predictions")
        if not 0.0 < self.low_confidence < 1.0:
            errors.append("low_confidence: must be between 0 and 1")
        if self.baseline_size < max(self.min_window_count, 5 * self.bins):
            errors.append("baseline_size: must be at least min_window_count and 5 x bins")
        for key in ("max_subjects", "max_features", "max_categories", "max_examples",
                    "max_learned_references"):
            if getattr(self, key) < 1:
                errors.append(f"{key}: must be at least 1")
        return errors
