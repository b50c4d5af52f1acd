"""The ``drift`` connector: prediction drift, data drift and confidence collapse.

It consumes traces and logs whose items carry prediction attributes
(``ml.prediction.label``, ``ml.prediction.score``, ``ml.feature.<name>``), groups them
by subject ``(service.name, ml.model.name, ml.model.version)``, counts each subject's
values on its reference's frozen bins, and every ``window`` compares the window with
the reference (and, for canaries, with the window of the model's anchor version).
It emits gauges and cumulative histograms to ``next[METRICS]`` and, when a subject's
drift state changes, one log record to ``next[LOGS]`` (either may be absent).

Above ``target_window_predictions`` per service and window, only a sample of the
items is read, at a per-service rate adapted to the volume (``sampling.py``); the
tests run on the sample, the reported volumes are scaled back up.

State is bounded: ``max_subjects`` subjects, ``max_features`` features per learned
baseline, ``max_categories`` categories per histogram; everything left out is counted
as dropped with a reason. The connector never keeps batches, only arrays and sums.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from opentelemetry.proto.metrics.v1.metrics_pb2 import AggregationTemporality

from agent.component import (
    Capabilities,
    Consumer,
    Host,
    Kind,
    PermanentError,
    Settings,
    Signal,
    Status,
    cancel_tasks,
    emit,
)
from agent.connectors.drift import stats
from agent.connectors.drift.compare import Evaluation, Pending, Side, Window, compare
from agent.connectors.drift.config import DriftConfig
from agent.connectors.drift.reference import (
    CategoricalHist,
    Reference,
    ReferenceError,
    SubjectKey,
    reference_from_values,
)
from agent.connectors.drift.sampling import AdaptiveSampler, read_sample
from agent.pdata import GENAI_MODEL, Batch, LogBatch, MetricBatch, python_to_anyvalue

LABEL = "ml.prediction.label"
SCORE = "ml.prediction.score"
FEATURE_PREFIX = "ml.feature."
MODEL = "ml.model.name"
VERSION = "ml.model.version"
BASELINE_VERSION = "baseline.version"
EVENT_NAME = "mlagent.drift"
REFERENCES_SUBDIR = "references"
# When each subject was first (and last) seen live, in the state directory (beside, not
# in, the references directory, so it is never taken for a reference).
FIRST_SEEN_FILE = "drift-first-seen.json"
# A subject with no prediction for this many windows is forgotten (its learned
# reference stays on disk), so rotating model versions do not fill max_subjects.
IDLE_WINDOWS = 12

_SEVERITY_WARN, _SEVERITY_INFO = 13, 9
_INSUFFICIENT_DOC = "1 when the window was not judged (too few predictions, or still learning)."


class _Baseline:
    """Raw values of a subject's first predictions, until there are enough to freeze."""

    def __init__(self, max_features: int) -> None:
        self.n = 0
        self.labels: list[Any] = []
        self.scores: list[float] = []
        self.features: dict[str, list[Any]] = {}
        self.max_features = max_features

    def add(self, p: Pending) -> int:
        """Keep ``p``'s values; returns how many feature values ``max_features`` excluded."""
        self.n += len(p.rows)
        self.labels.extend(p.labels)
        self.scores.extend(p.numeric(None).tolist())
        excluded = 0
        for name, vals in p.features.items():
            kept = self.features.get(name)
            if kept is None:
                if len(self.features) >= self.max_features:
                    excluded += len(vals)
                    continue
                kept = self.features[name] = []
            kept.extend(vals)
        return excluded


@dataclass
class _Subject:
    """Everything tracked for one model version."""

    key: SubjectKey
    ref: Reference | None = None
    baseline: _Baseline | None = None
    window: Window | None = None
    canary: Window | None = None  # counted on the anchor version's reference bins
    anchor: SubjectKey | None = None  # the version the canary window is compared with
    count: float = 0.0  # predictions in the current window (estimated when sampling)
    examined: int = 0  # of which were read (the rest were not sampled)
    idle: int = 0
    first_seen: float = 0.0  # when the version was first seen live (persisted): the anchor's rule
    # Cumulative counts per signal since the reference was frozen, for histograms
    # (scaled up by 1/rate when sampled, so float).
    totals: dict[str, np.ndarray] = field(default_factory=dict)
    totals_start_ns: int = 0
    # Last verdict per (kind, baseline version or None), to log only state changes.
    states: dict[tuple[str, str | None], bool] = field(default_factory=dict)

    @property
    def model_key(self) -> tuple[str | None, str | None]:
        return self.key.service, self.key.model


class DriftConnector:
    """Consumes TRACES and LOGS, emits METRICS and LOGS. See the module docstring.

    ``clock`` (seconds since the epoch) is injectable for tests; ``evaluate_now()``
    closes the current window at once.
    """

    capabilities = Capabilities(mutates_data=False)

    def __init__(self, settings: Settings, config: DriftConfig, next: Mapping[Signal, Consumer],
                 *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.cfg = config
        self.telemetry = settings.telemetry
        self.metrics_out = next.get(Signal.METRICS)
        self.logs_out = next.get(Signal.LOGS)
        self.clock = clock
        self.subjects: dict[SubjectKey, _Subject] = {}
        self._models: dict[tuple[str | None, str | None], set[SubjectKey]] = {}
        self._file_refs: list[Reference] = []
        # Learned references recently used, least recent first; at most max_subjects.
        # Read from disk by slug when a subject appears, not all at start.
        self._saved: OrderedDict[SubjectKey, Reference] = OrderedDict()
        self._ref_dir: Path | None = None
        # Subject -> (first seen, last seen), seconds since the epoch.
        self._seen: dict[SubjectKey, tuple[float, float]] = {}
        self._seen_path: Path | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        # Which items are examined (sampling.py); seeded, so runs are reproducible.
        self._rng = random.Random(0)
        self.sampler = AdaptiveSampler(
            window=config.window, target=config.target_window_predictions,
            max_examined=config.max_window_examined, ceiling=config.sample,
            max_services=config.max_subjects, now=clock())

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: Host) -> None:
        """Read reference files, then start the window timer (learned baselines are read
        when their subject appears)."""
        self._ref_dir = Path(host.state_dir) / REFERENCES_SUBDIR
        self._seen_path = Path(host.state_dir) / FIRST_SEEN_FILE
        problems = self._load_references()
        self._seen = self._load_seen()
        if problems:
            host.report_status(self.settings.id, Status.DEGRADED, "; ".join(problems)[:500])
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"{self.settings.id}:windows")

    def _load_references(self) -> list[str]:
        """Reference files (explicit, then ``reference_dir``).

        An unreadable file is reported and skipped: the subjects it would have covered
        learn a baseline instead, and the agent keeps running.
        """
        problems: list[str] = []
        files = list(self.cfg.reference_files)
        ref_dir = self.cfg.reference_dir
        if ref_dir is not None:
            if Path(ref_dir).is_dir():
                files += sorted(Path(ref_dir).glob("*.json"))
            else:
                problems.append(f"{ref_dir}: reference_dir is not a directory")
                self.telemetry.error("reference_dir missing", path=str(ref_dir))
        for path in files:
            try:
                self._file_refs.append(Reference.load(Path(path)))
            except ReferenceError as e:
                problems.append(str(e))
                self.telemetry.error("reference file skipped", error=str(e))
        # Most specific first, so a per-version file beats a per-model one.
        self._file_refs.sort(key=lambda r: -r.subject.specificity)
        return problems

    def _learned(self, key: SubjectKey) -> Reference | None:
        """The subject's learned reference: from memory, else its file (by slug)."""
        ref = self._saved.get(key)
        if ref is not None:
            self._saved.move_to_end(key)
            return ref
        if self._ref_dir is None:
            return None
        path = self._ref_dir / f"{key.slug()}.json"
        if not path.is_file():
            return None
        try:
            ref = Reference.load(path)
            os.utime(path)  # recently used: the disk retention keeps it longest
        except (ReferenceError, OSError) as e:
            self.telemetry.error("learned baseline skipped", error=str(e))
            return None
        if ref.subject != key:
            self.telemetry.error("learned baseline skipped", path=str(path),
                                 error=f"holds {ref.subject}, not {key}")
            return None
        self._remember(key, ref)
        return ref

    def _remember(self, key: SubjectKey, ref: Reference) -> None:
        self._saved[key] = ref
        self._saved.move_to_end(key)
        while len(self._saved) > self.cfg.max_subjects:
            self._saved.popitem(last=False)

    def _retain_on_disk(self) -> None:
        """Delete the least recently used learned references beyond
        ``max_learned_references`` (never a live subject's)."""
        if self._ref_dir is None:
            return
        try:
            files = [(p.stat().st_mtime, p) for p in self._ref_dir.glob("*.json")]
            excess = len(files) - self.cfg.max_learned_references
            if excess <= 0:
                return
            live = {f"{k.slug()}.json" for k in self.subjects}
            for _, path in sorted(files):
                if excess <= 0:
                    break
                if path.name not in live:
                    path.unlink(missing_ok=True)
                    excess -= 1
        except OSError as e:
            self.telemetry.error("cannot prune learned baselines", error=str(e))

    def _load_seen(self) -> dict[SubjectKey, tuple[float, float]]:
        """The persisted first/last-seen times; an unreadable file is logged and ignored
        (the anchors are then chosen by what is seen from now on)."""
        path = self._seen_path
        if path is None or not path.is_file():
            return {}
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return {SubjectKey(*e["subject"]): (float(e["first"]), float(e["last"]))
                    for e in doc["subjects"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.telemetry.error("first-seen times unreadable, ignored", error=repr(e))
            return {}

    def _save_seen(self) -> None:
        """Persist first/last-seen times of at most ``max_learned_references`` subjects,
        live ones first (written when a subject appears, not per batch)."""
        path = self._seen_path
        if path is None:
            return
        # Live subjects first (a stable version seen long ago must keep its time), then
        # the most recently seen.
        keep = sorted(self._seen.items(), key=lambda kv: (kv[0] not in self.subjects, -kv[1][1])
                      )[:self.cfg.max_learned_references]
        self._seen = dict(keep)
        doc = {"subjects": [{"subject": [k.service, k.model, k.version], "first": f, "last": t}
                            for k, (f, t) in keep]}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(doc, f)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as e:
            self.telemetry.error("cannot persist first-seen times", error=str(e))

    async def shutdown(self) -> None:
        """Stop the timer and flush the current window (idempotent, safe without start)."""
        if self._stopped:
            return
        self._stopped = True
        await cancel_tasks(self._task)
        self._task = None
        await self.evaluate_now()

    async def _run(self) -> None:
        """Close a window at every multiple of ``window`` seconds (tumbling, aligned)."""
        w = self.cfg.window
        while True:
            now = self.clock()
            await asyncio.sleep(max((math.floor(now / w) + 1) * w - now, 0.0))
            try:
                await self.evaluate_now()
            except Exception as e:  # the timer must survive anything one window does
                self.telemetry.error("window evaluation failed", error=repr(e))

    # ----------------------------------------------------------------- intake

    async def consume(self, batch: Batch) -> None:
        """Count the batch's predictions into their subjects' windows (no I/O but, once
        per subject, reading its learned reference, persisting when it was first seen,
        and a baseline's save); items without prediction attributes are ignored.

        Only the items each service's sampling rate picks are read (``sampling.py``);
        at low volume that is every item."""
        if batch.signal not in (Signal.TRACES, Signal.LOGS):
            self.telemetry.refused(batch.signal, batch.item_count, "unsupported_signal")
            raise PermanentError(f"drift consumes traces and logs, not {batch.signal}")
        self.telemetry.accepted(batch.signal, batch.item_count)
        self.sampler.tick(self.clock())
        sample = read_sample(batch, self.sampler, self._rng)
        groups = _group(sample.ml, sample.services, sample.resource_index)
        tele, signal = self.telemetry, batch.signal
        for key, p in groups.items():
            entry = sample.rates[key.service]  # type: ignore[index]
            weight = 1.0 / entry.rate  # each examined prediction stands for this many
            # Before any drop: the service's volume is what its rate adapts to.
            self.sampler.count_predictions(entry, len(p.rows))
            subj = self.subjects.get(key) or self._new_subject(key)
            if subj is None:
                tele.dropped(signal, len(p.rows), "max_subjects")
                continue
            subj.count += len(p.rows) * weight
            subj.examined += len(p.rows)
            unknown = 0
            if subj.window is not None:
                unknown = subj.window.add(p, weight)
                _examples(subj.window, p, sample.items)
            elif subj.baseline is not None:
                excluded = subj.baseline.add(p)
                if excluded:
                    tele.dropped(signal, excluded, "max_features")
                if subj.baseline.n >= self.cfg.baseline_size:
                    self._freeze_baseline(subj, signal)
            if subj.canary is not None:
                subj.canary.add(p, weight)
                _examples(subj.canary, p, sample.items)
            if unknown:
                tele.dropped(signal, unknown, "feature_not_in_reference")
            for reason, n in p.bad.items():
                tele.dropped(signal, n, reason)

    def _new_subject(self, key: SubjectKey) -> _Subject | None:
        if len(self.subjects) >= self.cfg.max_subjects:
            return None
        now = self.clock()
        first = self._seen.get(key, (now, now))[0]
        self._seen[key] = (first, now)
        self._save_seen()
        subj = self.subjects[key] = _Subject(key, first_seen=first)
        self._models.setdefault(subj.model_key, set()).add(key)
        ref = next((r for r in self._file_refs if r.subject.matches(key)), None)
        if ref is None:
            ref = self._learned(key)
        if ref is not None:
            self._set_reference(subj, ref)
            return subj
        if self.cfg.auto_baseline:
            subj.baseline = _Baseline(self.cfg.max_features)
        self._reanchor(subj.model_key)  # a new version is a canary from its first prediction
        return subj

    def _freeze_baseline(self, subj: _Subject, signal: Signal) -> None:
        """Turn the first predictions into the subject's reference and persist it."""
        b, cfg = subj.baseline, self.cfg
        assert b is not None

        def dropped(reason: str, n: int) -> None:
            self.telemetry.dropped(signal, n, reason)

        ref = reference_from_values(subj.key, labels=b.labels, scores=b.scores,
                                    features=b.features, n=b.n, bins=cfg.bins,
                                    max_categories=cfg.max_categories,
                                    low_cut=cfg.low_confidence, source="baseline",
                                    on_drop=dropped)
        subj.baseline = None
        self._remember(subj.key, ref)
        if self._ref_dir is not None:
            try:
                ref.save(self._ref_dir / f"{subj.key.slug()}.json")
                self._retain_on_disk()
            except OSError as e:
                self.telemetry.error("cannot persist learned baseline", error=str(e),
                                     subject=str(subj.key))
        self.telemetry.info("baseline learned", subject=str(subj.key), n=b.n)
        self._set_reference(subj, ref)

    def _set_reference(self, subj: _Subject, ref: Reference) -> None:
        subj.ref = ref
        subj.window = Window(ref, self.cfg.max_examples)
        subj.totals = {}
        subj.totals_start_ns = int(self.clock() * 1e9)
        self._reanchor(subj.model_key)

    def _reanchor(self, model_key: tuple[str | None, str | None]) -> None:
        """Pick the model's anchor and give the others canary windows counted on the
        anchor's bins.

        The anchor is the referenced version first seen live (persisted, so a restart
        keeps it): the stable version a canary is rolled out next to. Not the order of
        version strings ("10" < "9"), nor reference creation times (one per-model file
        serves every version with the same time)."""
        keys = self._models.get(model_key, set())
        with_ref = [self.subjects[k] for k in keys if self.subjects[k].ref is not None]
        if not with_ref:
            return
        anchor = min(with_ref, key=lambda s: (s.first_seen, str(s.key)))
        for k in keys:
            s = self.subjects[k]
            if s is anchor or not self.cfg.canary:
                s.canary, s.anchor = None, None
                continue
            if s.canary is None or s.canary.ref is not anchor.ref:
                s.canary = Window(anchor.ref, self.cfg.max_examples)  # type: ignore[arg-type]
            s.anchor = anchor.key

    # ----------------------------------------------------------------- evaluation

    async def evaluate_now(self) -> None:
        """Close the current window of every subject: compare, emit, start afresh."""
        now_ns = int(self.clock() * 1e9)
        out = _MetricsOut(now_ns)
        events: list[tuple[_Subject, str, str | None, Evaluation, Window]] = []
        for subj in self.subjects.values():
            self._evaluate(subj, out, events)
        for subj in self.subjects.values():
            self._evaluate_canary(subj, out, events)
        logs = self._drift_logs(events, now_ns)
        self.sampler.close_window()
        for subj in list(self.subjects.values()):  # windows reset only after canaries read them
            if subj.window is not None:
                subj.window = Window(subj.window.ref, self.cfg.max_examples)
            if subj.canary is not None:
                subj.canary = Window(subj.canary.ref, self.cfg.max_examples)
            subj.idle = 0 if subj.count else subj.idle + 1
            subj.count, subj.examined = 0.0, 0
            if subj.idle >= IDLE_WINDOWS:
                self._forget(subj)
        await self._send(self.metrics_out, out.batch(), Signal.METRICS)
        await self._send(self.logs_out, logs, Signal.LOGS)

    def _forget(self, subj: _Subject) -> None:
        del self.subjects[subj.key]
        keys = self._models.get(subj.model_key, set())
        keys.discard(subj.key)
        if keys:
            self._reanchor(subj.model_key)
        else:
            self._models.pop(subj.model_key, None)

    def _evaluate(self, subj: _Subject, out: _MetricsOut, events: list[Any]) -> None:
        attrs = subj.key.attributes()
        service = subj.key.service
        out.gauge(service, "mlagent.prediction.count", attrs, subj.count,
                  "Predictions seen in the window (estimated from the sample when sampling).",
                  unit="{prediction}")
        if subj.count:
            out.gauge(service, "mlagent.drift.sample_rate", attrs, subj.examined / subj.count,
                      "Share of the window's predictions examined; the statistics are "
                      "computed on these.", unit="1")
        if subj.baseline is not None:
            out.gauge(service, "mlagent.drift.insufficient_data", attrs, 1, _INSUFFICIENT_DOC)
            out.gauge(service, "mlagent.drift.baseline.progress", attrs,
                      subj.baseline.n / self.cfg.baseline_size,
                      "Share of the automatic baseline collected so far.", unit="1")
            return
        win = subj.window
        if win is None or subj.ref is None:
            return
        side = win.side()
        if self.cfg.histograms:
            self._histograms(subj, win, out, attrs)
        if win.n < self.cfg.min_window_count:
            out.gauge(service, "mlagent.drift.insufficient_data", attrs, 1, _INSUFFICIENT_DOC)
            return
        out.gauge(service, "mlagent.drift.insufficient_data", attrs, 0, _INSUFFICIENT_DOC)
        ev = compare(subj.ref, Side.of_reference(subj.ref), side, alpha=self.cfg.alpha,
                     correction=self.cfg.correction)
        _descriptive(out, service, attrs, side)
        _verdicts(out, service, attrs, ev)
        events.extend((subj, kind, None, ev, win) for kind in ev.detected)

    def _evaluate_canary(self, subj: _Subject, out: _MetricsOut, events: list[Any]) -> None:
        anchor = self.subjects.get(subj.anchor) if subj.anchor is not None else None
        cur = subj.canary
        if anchor is None or cur is None or anchor.window is None:
            return
        if min(cur.n, anchor.window.n) < self.cfg.min_window_count:
            return  # "both live" means both have a judgeable window
        base_version = anchor.key.version or ""
        attrs = {**subj.key.attributes(), BASELINE_VERSION: base_version}
        ev = compare(cur.ref, anchor.window.side(), cur.side(), alpha=self.cfg.alpha,
                     correction=self.cfg.correction)
        _verdicts(out, subj.key.service, attrs, ev)
        events.extend((subj, kind, base_version, ev, cur) for kind in ev.detected)

    def _histograms(self, subj: _Subject, win: Window, out: _MetricsOut,
                    attrs: dict[str, str]) -> None:
        """Add the window into cumulative totals and emit them on the frozen edges."""
        ref = subj.ref
        assert ref is not None
        hists = {"label": ref.label, "score": ref.score,
                 **{f"feature:{n}": h for n, h in ref.features.items()}}
        for signal, counts in win.scaled_counts().items():
            hist = hists.get(signal)
            if hist is None:
                continue
            total = subj.totals.get(signal)
            total = subj.totals[signal] = (counts.astype(np.float64) if total is None
                                           else total + counts)
            # Whole counts for OTLP: rounding the running total (not each window) keeps
            # the emitted series monotonic and its rounding error below one.
            whole = np.rint(total).astype(np.int64)
            a = {**attrs, "signal": signal}
            if isinstance(hist, CategoricalHist):
                out.categories(subj.key.service, a, [*hist.categories, "other"], whole,
                               subj.totals_start_ns)
            else:
                out.histogram(subj.key.service, a, hist.edges, whole, subj.totals_start_ns)

    # ----------------------------------------------------------------- output

    def _drift_logs(self, events: list[tuple[_Subject, str, str | None, Evaluation, Window]],
                    now_ns: int) -> LogBatch | None:
        """One log record per drift state change (detected or resolved)."""
        batch: LogBatch | None = None
        for subj, kind, base_version, ev, win in events:
            detected = ev.detected[kind]
            before = subj.states.get((kind, base_version))
            subj.states[(kind, base_version)] = detected
            if bool(before) == detected:  # no change; a first verdict of "fine" is no news
                continue
            if batch is None:
                batch = LogBatch()
            rl = batch.request.resource_logs.add()
            if subj.key.service is not None:
                python_to_anyvalue(subj.key.service,
                                   rl.resource.attributes.add(key="service.name").value)
            sl = rl.scope_logs.add()
            sl.scope.name = "mlagent.drift"
            rec = sl.log_records.add(time_unix_nano=now_ns, observed_time_unix_nano=now_ns)
            rec.severity_number = _SEVERITY_WARN if detected else _SEVERITY_INFO
            rec.severity_text = "WARN" if detected else "INFO"
            state = "detected" if detected else "resolved"
            against = f"version {base_version}" if base_version is not None else "its reference"
            details = ", ".join(f"{s} p={ev.signals[s]['p_value']:.3g}"
                                if s in ev.signals else s for s in ev.triggers.get(kind, []))
            rec.body.string_value = (
                f"{kind} drift {state} for model {subj.key.model} version {subj.key.version} "
                f"(service {subj.key.service}) against {against}: corrected p="
                f"{ev.kind_p[kind]:.3g}" + (f"; {details}" if details else ""))
            attrs: dict[str, Any] = {
                "event.name": EVENT_NAME, "mlagent.drift.kind": kind, "mlagent.drift.state": state,
                **subj.key.attributes(), "mlagent.drift.p_value": ev.kind_p[kind],
                "mlagent.drift.signals": ev.triggers.get(kind, []),
                "mlagent.drift.example_trace_ids": [t.hex() for t, _ in win.examples],
            }
            if base_version is not None:
                attrs[BASELINE_VERSION] = base_version
            for k, v in attrs.items():
                python_to_anyvalue(v, rec.attributes.add(key=k).value)
            if win.examples:
                rec.trace_id, rec.span_id = win.examples[-1]
        return batch

    async def _send(self, consumer: Consumer | None, batch: Batch | None, signal: Signal) -> None:
        # A window's output is not retried: the next window supersedes the gauges and
        # the cumulative histograms carry the counts forward.
        if batch is not None and consumer is not None:
            await emit(consumer, batch, self.telemetry)


# --------------------------------------------------------------------------- helpers


def _is_prediction(d: dict[str, Any]) -> bool:
    return LABEL in d or SCORE in d or any(k.startswith(FEATURE_PREFIX) for k in d)


def _group(ml: list[dict[str, Any]], services: list[str],
           resource_index: list[int]) -> dict[SubjectKey, Pending]:
    """Split a batch's prediction values by subject.

    Column-wise rather than item by item: the per-item Python work is the cost
    centre (DESIGN.md §2), so each attribute is read in one comprehension per
    subject and feature, and a batch of one subject (the usual case) skips grouping.
    """
    rows = [i for i, d in enumerate(ml) if d and _is_prediction(d)]
    if not rows:
        return {}
    raw_keys = []
    for i in rows:
        d, service = ml[i], services[resource_index[i]]
        model = d.get(MODEL) or d.get(GENAI_MODEL) or service
        version = d.get(VERSION)
        # Strings as they come; anything else (an int version, even a list) as its str.
        raw_keys.append((service, model if type(model) is str else str(model),
                         "" if version is None else
                         version if type(version) is str else str(version)))
    by_key: dict[tuple[str, str, str], list[int]] = {}
    if len(set(raw_keys)) == 1:
        by_key[raw_keys[0]] = rows
    else:
        for i, k in zip(rows, raw_keys, strict=True):
            by_key.setdefault(k, []).append(i)
    groups: dict[SubjectKey, Pending] = {}
    plen = len(FEATURE_PREFIX)
    for (service, model, version), idx in by_key.items():
        p = groups[SubjectKey(service, model, version)] = Pending()
        ds = [ml[i] for i in idx]
        p.rows.extend(idx)
        p.labels.extend(v for v in [d.get(LABEL) for d in ds] if v is not None)
        p.scores.extend(v for v in [d.get(SCORE) for d in ds] if v is not None)
        names: set[str] = set().union(*ds)
        for name in sorted(names):  # sorted: max_features keeps the same ones every run
            if name.startswith(FEATURE_PREFIX):
                p.features.setdefault(name[plen:], []).extend(d[name] for d in ds if name in d)
    return groups


def _examples(win: Window, p: Pending, items: list[Any]) -> None:
    """Remember the window's latest items that carry a trace id."""
    need = win.examples.maxlen or 0
    found: list[tuple[bytes, bytes]] = []
    for i in reversed(p.rows):
        item = items[i]
        if item.trace_id:
            found.append((item.trace_id, item.span_id))
            if len(found) >= need:
                break
    win.examples.extend(reversed(found))


def _descriptive(out: _MetricsOut, service: str | None, attrs: dict[str, str], side: Side) -> None:
    """What the window looked like: score summary, label entropy, feature moments."""
    if side.score_moments is not None and side.low is not None:
        mean, var, n = side.score_moments
        out.gauge(service, "mlagent.prediction.score.mean", attrs, mean,
                  "Mean prediction score in the window.", unit="1")
        out.gauge(service, "mlagent.prediction.score.low_fraction", attrs, side.low[0] / n,
                  "Share of predictions below the low-confidence cut.", unit="1")
        out.gauge(service, "mlagent.prediction.score.entropy", attrs, side.score_entropy,
                  "Mean binary entropy of the scores, bits.", unit="bit")
    if side.label is not None and side.label.sum():
        out.gauge(service, "mlagent.prediction.label.entropy", attrs,
                  float(stats.entropy_bits(side.label)), "Entropy of the label distribution, bits.",
                  unit="bit")
    for name, (mean, var, _) in side.moments.items():
        a = {**attrs, "feature": name}
        out.gauge(service, "mlagent.feature.mean", a, mean, "Mean of a numeric feature.")
        out.gauge(service, "mlagent.feature.variance", a, var, "Variance of a numeric feature.")


_STAT_METRICS = {
    "psi": ("mlagent.drift.psi", "Population stability index against the baseline."),
    "js": ("mlagent.drift.js", "Jensen-Shannon distance (base 2) against the baseline."),
    "p_value": ("mlagent.drift.p_value", "Chi-squared homogeneity p-value (uncorrected)."),
    "ks": ("mlagent.drift.ks", "Kolmogorov-Smirnov statistic on the binned CDFs."),
    "wasserstein": ("mlagent.drift.wasserstein", "Wasserstein-1 distance / reference std."),
    "unseen_share": ("mlagent.drift.unseen_share", "Share of values outside the reference's "
                     "categories."),
}


def _verdicts(out: _MetricsOut, service: str | None, attrs: dict[str, str], ev: Evaluation) -> None:
    """The evaluation's per-signal statistics and per-kind verdicts as gauges."""
    for signal, st in ev.signals.items():
        a = {**attrs, "signal": signal}
        for stat, value in st.items():
            if math.isfinite(value):  # e.g. Wasserstein / std of a constant reference
                name, doc = _STAT_METRICS[stat]
                out.gauge(service, name, a, value, doc, unit="1" if stat == "unseen_share" else "")
    for kind, detected in ev.detected.items():
        a = {**attrs, "kind": kind}
        out.gauge(service, "mlagent.drift.detected", a, int(detected),
                  "1 when drift of this kind is detected in the window.")
        out.gauge(service, "mlagent.drift.adjusted_p_value", a, ev.kind_p[kind],
                  "The kind's p-value after multiple-testing correction.")


class _MetricsOut:
    """Collects one window's points and builds one MetricBatch (a resource per service)."""

    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns
        self._gauges: dict[tuple[str | None, str], tuple[str, str, list[Any]]] = {}
        self._hists: dict[str | None, list[Any]] = {}
        self._sums: dict[str | None, list[Any]] = {}

    def gauge(self, service: str | None, name: str, attrs: Mapping[str, Any], value: float,
              doc: str, unit: str = "") -> None:
        # No unit by default: statistics (PSI, p-values, flags) are not ratios, and a
        # "1" unit would make Prometheus names end in "_ratio".
        self._gauges.setdefault((service, name), (doc, unit, []))[2].append((attrs, value))

    def histogram(self, service: str | None, attrs: Mapping[str, Any], edges: np.ndarray,
                  counts: np.ndarray, start_ns: int) -> None:
        self._hists.setdefault(service, []).append((attrs, edges, counts, start_ns))

    def categories(self, service: str | None, attrs: Mapping[str, Any], names: list[str],
                   counts: np.ndarray, start_ns: int) -> None:
        self._sums.setdefault(service, []).append((attrs, names, counts, start_ns))

    def batch(self) -> MetricBatch | None:
        services = {s for s, _ in self._gauges} | set(self._hists) | set(self._sums)
        if not services:
            return None
        batch = MetricBatch()
        cumulative = AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
        for service in sorted(services, key=lambda s: s or ""):
            rm = batch.request.resource_metrics.add()
            if service is not None:
                rm.resource.attributes.add(key="service.name").value.string_value = service
            sm = rm.scope_metrics.add()
            sm.scope.name = "mlagent.drift"
            for (svc, name), (doc, unit, points) in self._gauges.items():
                if svc != service:
                    continue
                m = sm.metrics.add(name=name, description=doc, unit=unit)
                for attrs, value in points:
                    dp = m.gauge.data_points.add(time_unix_nano=self.now_ns, as_double=float(value))
                    _fill(dp.attributes, attrs)
            if self._hists.get(service):
                m = sm.metrics.add(name="mlagent.drift.histogram", unit="1", description=(
                    "Cumulative counts on the reference's frozen edges, each bound one ulp "
                    "below its edge: bucket i counts [edges[i-1], edges[i]) (underflow "
                    "first, overflow last)."))
                m.histogram.aggregation_temporality = cumulative
                for attrs, edges, counts, start in self._hists[service]:
                    # OTLP buckets are upper-inclusive, (bounds[i-1], bounds[i]], and the
                    # counts are lower-inclusive, [edges[i-1], edges[i]): for floats the two
                    # agree exactly when each bound is the float just below its edge, so a
                    # Prometheus `le` bucket holds exactly the values <= le.
                    dp = m.histogram.data_points.add(
                        start_time_unix_nano=start, time_unix_nano=self.now_ns,
                        count=int(counts.sum()),
                        explicit_bounds=np.nextafter(edges, -np.inf).tolist(),
                        bucket_counts=counts.tolist())
                    _fill(dp.attributes, attrs)
            if self._sums.get(service):
                m = sm.metrics.add(name="mlagent.drift.category.count", unit="1",
                                   description="Cumulative counts per reference category.")
                m.sum.is_monotonic = True
                m.sum.aggregation_temporality = cumulative
                for attrs, names, counts, start in self._sums[service]:
                    for cat, c in zip(names, counts.tolist(), strict=True):
                        dp = m.sum.data_points.add(start_time_unix_nano=start,
                                                   time_unix_nano=self.now_ns, as_int=c)
                        _fill(dp.attributes, {**attrs, "category": cat})
        return batch


def _fill(target: Any, attrs: Mapping[str, Any]) -> None:
    for k, v in attrs.items():
        python_to_anyvalue(v, target.add(key=k).value)


class DriftFactory:
    """Creates the ``drift`` connector (traces and logs in; metrics and logs out)."""

    type = "drift"
    kind = Kind.CONNECTOR
    config_class = DriftConfig
    signals = frozenset({Signal.TRACES, Signal.LOGS})
    output_signals = frozenset({Signal.METRICS, Signal.LOGS})

    def create(self, settings: Settings, config: DriftConfig,
               next: Mapping[Signal, Consumer]) -> DriftConnector:
        return DriftConnector(settings, config, next)
