"""``mlagent reference``: build reference files offline; list, show and reset learned ones.

``build`` streams a CSV or Parquet file in chunks (the csv module; pyarrow's
``iter_batches``) in **two passes**, so memory does not grow with the file:

1. pass 1 counts labels and categories, accumulates exact mean/std (Chan's merge)
   and the share of low scores, and keeps a uniform random sample of each numeric
   column (bottom-k by random key, ``--sample-size`` values, seeded) from which the
   quantile edges are taken; the edges are exact when the file has no more rows
   than the sample size;
2. pass 2 counts every value on the now frozen edges (exact counts).

Progress goes to stderr. Errors name the column and the data row (1-based, header
not counted): a missing column, or a value in a numeric column that is not a number.
Empty cells (and ``NA``/``NaN``/``null``) are missing values and are skipped.

``list``/``show``/``reset`` read the references the agent learned under
``<state dir>/references``. A running agent keeps the reference it holds in memory;
after ``reset`` it learns a new baseline on its next reload or restart.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from agent.connectors.drift.connector import REFERENCES_SUBDIR
from agent.connectors.drift.reference import (
    CategoricalHist,
    NumericHist,
    Reference,
    ReferenceError,
    ScoreHist,
    SubjectKey,
    build_categorical,
    needs_split,
    numeric_edges,
)
from agent.service import resolve_state_dir

MISSING = frozenset({"", "na", "nan", "null", "none"})
# Distinct values counted per categorical column; rarer ones beyond this land in "other".
MAX_DISTINCT = 100_000


class BuildError(Exception):
    """A problem with the input file, worded for the user."""


# --------------------------------------------------------------------------- parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``reference`` and its subcommands to the ``mlagent`` parser."""
    ref = subparsers.add_parser("reference", help="build, list, show and reset drift references")
    sub = ref.add_subparsers(dest="reference_command", required=True, metavar="SUBCOMMAND")

    b = sub.add_parser("build", help="build a reference file from training data (CSV or Parquet)")
    b.add_argument("--input", required=True, type=Path, help="CSV (with header) or Parquet file")
    b.add_argument("--output", required=True, type=Path, help="reference JSON to write")
    b.add_argument("--label", help="column with the predicted (or true) label")
    b.add_argument("--score", help="column with the prediction score (0..1)")
    b.add_argument("--features", default="", help="comma-separated feature columns")
    b.add_argument("--categorical", default="",
                   help="comma-separated features to treat as categories (others are numeric)")
    b.add_argument("--format", choices=["csv", "parquet"],
                   help="input format (default: from the file extension)")
    b.add_argument("--bins", type=int, default=10, help="quantile bins per numeric column")
    b.add_argument("--max-categories", type=int, default=50, help="categories kept per column")
    b.add_argument("--low-confidence", type=float, default=0.5, help="low-confidence score cut")
    b.add_argument("--service", help="service.name this reference applies to (default: any)")
    b.add_argument("--model", help="ml.model.name this reference applies to (default: any)")
    b.add_argument("--model-version", dest="model_version",
                   help="ml.model.version this reference applies to (default: any)")
    b.add_argument("--sample-size", type=int, default=200_000,
                   help="values sampled per numeric column for the quantile edges")
    b.add_argument("--chunk-rows", type=int, default=65_536, help="rows read per chunk")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")

    for name, text in (("list", "list the references learned in the state directory"),
                       ("show", "show one reference (a file, or a learned one by subject)"),
                       ("reset", "delete learned references so they are learned again")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--state-dir", type=Path, default=None,
                       help="the agent's state directory (default: $STATE_DIRECTORY, "
                            "else $XDG_STATE_HOME/mlagent or ~/.local/state/mlagent)")
        if name != "list":
            p.add_argument("--service", help="select by service.name")
            p.add_argument("--model", help="select by ml.model.name")
            p.add_argument("--model-version", dest="model_version",
                           help="select by ml.model.version")
        if name == "show":
            p.add_argument("file", nargs="?", type=Path, help="a reference file to show")
            p.add_argument("--json", action="store_true", help="print the reference document")
        if name == "reset":
            p.add_argument("--all", action="store_true", help="delete every learned reference")
    return ref


def run(args: argparse.Namespace) -> int:
    """Run a ``reference`` subcommand. Returns the process exit code."""
    try:
        if args.reference_command == "build":
            return cmd_build(args)
        if args.reference_command == "list":
            return cmd_list(args)
        if args.reference_command == "show":
            return cmd_show(args)
        if args.reference_command == "reset":
            return cmd_reset(args)
    except (BuildError, ReferenceError, OSError) as e:
        print(f"mlagent reference {args.reference_command}: error: {e}", file=sys.stderr)
        return 1
    raise AssertionError(args.reference_command)


# --------------------------------------------------------------------------- build


def _split(names: str) -> list[str]:
    return [n.strip() for n in names.split(",") if n.strip()]


class _Progress:
    """A one-line progress indicator on stderr, redrawn at most five times a second."""

    def __init__(self, label: str, total: float, quiet: bool) -> None:
        self.label, self.total, self.quiet = label, total, quiet
        self._last = 0.0

    def update(self, done: float, rows: int, final: bool = False) -> None:
        if self.quiet:
            return
        now = time.monotonic()
        if not final and now - self._last < 0.2:
            return
        self._last = now
        pct = 100.0 * done / self.total if self.total else 100.0
        width = 30
        filled = int(width * min(pct, 100.0) / 100)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] "
                         f"{pct:5.1f}% {rows:,} rows")
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


Chunk = dict[str, Any]  # column -> list[str] (CSV) or pyarrow Array (Parquet)


def _csv_chunks(path: Path, columns: list[str], chunk_rows: int,
                progress: _Progress) -> Iterator[tuple[int, Chunk]]:
    """Yield ``(first data row, {column: values})``; checks the header first."""
    raw = open(path, "rb")  # noqa: SIM115 -- closed below; its tell() drives the progress
    with raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as text:
        reader = csv.reader(text)
        try:
            header = next(reader)
        except StopIteration:
            raise BuildError(f"{path}: the file is empty (a header row is required)") from None
        except (csv.Error, UnicodeDecodeError) as e:
            raise BuildError(f"{path}: cannot read the header: {e}") from None
        _check_columns(path, columns, header)
        pos = {c: header.index(c) for c in columns}
        row = 0
        while True:
            rows: list[list[str]] = []
            try:
                for rec in reader:
                    rows.append(rec)
                    if len(rows) >= chunk_rows:
                        break
            except (csv.Error, UnicodeDecodeError) as e:
                raise BuildError(f"{path}: data row {row + len(rows) + 1}: {e}") from None
            if not rows:
                break
            chunk: Chunk = {}
            for c, i in pos.items():
                try:
                    chunk[c] = [r[i] for r in rows]
                except IndexError:
                    bad = next(j for j, r in enumerate(rows) if len(r) <= i)
                    raise BuildError(f"{path}: data row {row + bad + 1}: has {len(rows[bad])} "
                                     f"fields, column {c!r} is field {i + 1}") from None
            yield row + 1, chunk
            row += len(rows)
            progress.update(raw.tell(), row)
        progress.update(progress.total, row, final=True)


def _parquet_chunks(path: Path, columns: list[str], chunk_rows: int,
                    progress: _Progress) -> Iterator[tuple[int, Chunk]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow ships with the parquet extra
        raise BuildError("reading Parquet needs pyarrow (pip install 'mlagent[parquet]')") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise BuildError(f"{path}: not a readable Parquet file: {e}") from None
    _check_columns(path, columns, pf.schema_arrow.names)
    progress.total = pf.metadata.num_rows
    row = 0
    for rb in pf.iter_batches(batch_size=chunk_rows, columns=columns):
        yield row + 1, {c: rb.column(c) for c in columns}
        row += rb.num_rows
        progress.update(row, row)
    progress.update(progress.total, row, final=True)


def _check_columns(path: Path, wanted: list[str], present: list[str]) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        raise BuildError(f"{path}: column(s) not found: {', '.join(map(repr, missing))} "
                         f"(the file has: {', '.join(present)})")


def _as_floats(values: Any, column: str, first_row: int, path: Path) -> np.ndarray:
    """A chunk's column as float64 with NaN for missing; a non-number is an error."""
    if not isinstance(values, list):  # pyarrow Array
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_integer(values.type) or pa.types.is_floating(values.type) \
                or pa.types.is_boolean(values.type) or pa.types.is_decimal(values.type):
            return pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
        values = [None if v is None else str(v) for v in values.to_pylist()]
    cleaned = ["nan" if v is None or v.strip().lower() in MISSING else v for v in values]
    try:
        return np.asarray(cleaned, dtype=np.float64)
    except ValueError:
        for i, v in enumerate(cleaned):
            try:
                float(v)
            except ValueError:
                raise BuildError(f"{path}: data row {first_row + i}: column {column!r}: "
                                 f"{v!r} is not a number (list it in --categorical if it is "
                                 "a category)") from None
        raise


def _as_strings(values: Any) -> list[str]:
    """A chunk's column as strings, missing values left out."""
    if not isinstance(values, list):
        values = values.to_pylist()
    out: list[str] = []
    for v in values:
        if v is None:
            continue
        s = v if isinstance(v, str) else str(v)
        if s.strip().lower() not in MISSING:
            out.append(s)
    return out


class _NumericPass:
    """Pass-1 state of one numeric column: exact moments, a uniform sample, low count."""

    def __init__(self, sample_size: int, rng: np.random.Generator, low_cut: float) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.low = 0
        self.low_cut = low_cut
        self.k = sample_size
        self.rng = rng
        self.keys = np.empty(0)
        self.sample = np.empty(0)

    def add(self, x: np.ndarray) -> None:
        x = x[np.isfinite(x)]
        if not x.size:
            return
        # Chan et al.'s parallel merge of (n, mean, M2): exact and stable in one pass.
        n_b, mean_b = x.size, float(x.mean())
        m2_b = float(np.dot(x - mean_b, x - mean_b))
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n
        self.low += int(np.count_nonzero(x < self.low_cut))
        keys = np.concatenate([self.keys, self.rng.random(x.size)])
        sample = np.concatenate([self.sample, x])
        if keys.size > self.k:
            keep = np.argpartition(keys, self.k)[:self.k]
            keys, sample = keys[keep], sample[keep]
        self.keys, self.sample = keys, sample


def cmd_build(args: argparse.Namespace) -> int:
    path: Path = args.input
    features = _split(args.features)
    categorical = set(_split(args.categorical))
    unknown = categorical - set(features)
    if unknown:
        raise BuildError(f"--categorical names columns not in --features: {', '.join(sorted(unknown))}")
    if not (args.label or args.score or features):
        raise BuildError("nothing to build: give --label, --score and/or --features")
    if args.bins < 2 or args.max_categories < 1 or args.sample_size < args.bins \
            or args.chunk_rows < 1:
        raise BuildError("--bins >= 2, --max-categories >= 1, --sample-size >= --bins and "
                         "--chunk-rows >= 1 are required")
    fmt = args.format or ("parquet" if path.suffix.lower() in (".parquet", ".pq") else "csv")
    if not path.is_file():
        raise BuildError(f"{path}: no such file")
    numeric = [c for c in features if c not in categorical]
    if args.score:
        numeric = [args.score, *numeric]
    cats = [c for c in features if c in categorical]
    if args.label:
        cats = [args.label, *cats]
    columns = list(dict.fromkeys([*numeric, *cats]))

    def chunks(label: str) -> Iterator[tuple[int, Chunk]]:
        total = float(path.stat().st_size)
        progress = _Progress(label, total, args.quiet)
        if fmt == "parquet":
            return _parquet_chunks(path, columns, args.chunk_rows, progress)
        return _csv_chunks(path, columns, args.chunk_rows, progress)

    rng = np.random.default_rng(0)  # a fixed seed: the same file gives the same edges
    num_state = {c: _NumericPass(args.sample_size, rng, args.low_confidence) for c in numeric}
    # Per categorical column, values at even and at odd positions counted apart: when not
    # every category can be kept, the cells are chosen on one half and counted on the
    # other (reference.needs_split), so unchanged data does not alarm.
    cat_counts: dict[str, tuple[Counter[str], Counter[str]]] = {
        c: (Counter(), Counter()) for c in cats}
    cat_unseen = {c: [0, 0] for c in cats}
    cat_seen = dict.fromkeys(cats, 0)
    rows = 0
    for first, chunk in chunks("pass 1/2"):
        for c in numeric:
            num_state[c].add(_as_floats(chunk[c], c, first, path))
        for c in cats:
            values = _as_strings(chunk[c])
            first_half = cat_seen[c] % 2  # which half this chunk's first value belongs to
            cat_seen[c] += len(values)
            for half, part in ((first_half, values[0::2]), (1 - first_half, values[1::2])):
                counter = cat_counts[c][half]
                if len(counter) < MAX_DISTINCT:
                    counter.update(part)
                else:  # bounded: categories first seen beyond the cap only add to "other"
                    known = [v for v in part if v in counter]
                    counter.update(known)
                    cat_unseen[c][half] += len(part) - len(known)
        rows += len(next(iter(chunk.values())))
    if rows == 0:
        raise BuildError(f"{path}: no data rows")

    hists: dict[str, NumericHist] = {}
    for c, st in num_state.items():
        if st.n == 0:
            raise BuildError(f"{path}: column {c!r} has no numeric values")
        edges = numeric_edges(st.sample, args.bins)
        hists[c] = NumericHist(edges=edges, counts=np.zeros(len(edges) + 1, np.int64),
                               mean=st.mean, std=math.sqrt(st.m2 / st.n), n=st.n)
    excess = {c: [0.0, 0.0] for c in numeric}  # values beyond the (sampled) edges
    if numeric:
        for first, chunk in chunks("pass 2/2"):
            for c in numeric:
                x = _as_floats(chunk[c], c, first, path)
                x = x[np.isfinite(x)]
                hists[c].counts += hists[c].bin(x)
                below, above = hists[c].excess(x)
                excess[c][0] += below
                excess[c][1] += above
    for c, (below, above) in excess.items():
        hists[c].tails = (below / hists[c].n, above / hists[c].n)

    subject = SubjectKey(args.service, args.model, args.model_version)
    ref = Reference(subject=subject, source="file", n=rows)
    for c, (even, odd) in cat_counts.items():
        full = even + odd
        if needs_split(full, args.max_categories):
            cat = build_categorical(even, args.max_categories, count_on=odd, seen=full)
            extra = cat_unseen[c][1]
        else:
            cat = build_categorical(full, args.max_categories)
            extra = sum(cat_unseen[c])
        cat.counts[-1] += extra
        cat.n += extra
        if c == args.label:
            ref.label = cat
        else:
            ref.features[c] = cat
    for c, num in hists.items():
        if c == args.score:
            st = num_state[c]
            ref.score = ScoreHist(num.edges, num.counts, num.mean, num.std, num.n, num.tails,
                                  low_cut=args.low_confidence, low_fraction=st.low / st.n)
        else:
            ref.features[c] = num
    ref.save(args.output)
    print(f"wrote {args.output}: {rows:,} rows, subject {subject}, "
          f"{len(ref.features)} feature(s)" + (", label" if ref.label else "")
          + (", score" if ref.score else ""))
    return 0


# --------------------------------------------------------------------------- list / show / reset


def _learned(args: argparse.Namespace) -> list[tuple[Path, Reference]]:
    """The learned references, filtered by the subject options when given."""
    state = args.state_dir if args.state_dir is not None else resolve_state_dir(None)
    directory = Path(state) / REFERENCES_SUBDIR
    out: list[tuple[Path, Reference]] = []
    if not directory.is_dir():
        return out
    want = SubjectKey(getattr(args, "service", None), getattr(args, "model", None),
                      getattr(args, "model_version", None))
    for path in sorted(directory.glob("*.json")):
        try:
            ref = Reference.load(path)
        except ReferenceError as e:
            print(f"warning: {e}", file=sys.stderr)
            continue
        if want.matches(ref.subject):
            out.append((path, ref))
    return out


def cmd_list(args: argparse.Namespace) -> int:
    refs = _learned(args)
    if not refs:
        print("no learned references")
        return 0
    print(f"{'SERVICE':20} {'MODEL':24} {'VERSION':12} {'N':>8} {'CREATED':20} FILE")
    for path, ref in refs:
        s = ref.subject
        print(f"{s.service or '*':20} {s.model or '*':24} {s.version or '':12} {ref.n:>8} "
              f"{ref.created:20} {path.name}")
    return 0


def describe(ref: Reference) -> str:
    """A human-readable summary of a reference."""
    lines = [f"subject: {ref.subject}", f"source: {ref.source}, created {ref.created}, "
             f"n={ref.n}"]
    if ref.label is not None:
        shares = ", ".join(f"{c}={k / max(ref.label.n, 1):.3f}"
                           for c, k in zip([*ref.label.categories, "other"], ref.label.counts,
                                           strict=True))
        lines.append(f"label: {shares}")
    if ref.score is not None:
        sc = ref.score
        lines.append(f"score: mean={sc.mean:.4g} std={sc.std:.4g} n={sc.n} "
                     f"below {sc.low_cut}: {sc.low_fraction:.3f} ({len(sc.edges) - 1} bins)")
    for name, h in ref.features.items():
        if isinstance(h, CategoricalHist):
            lines.append(f"feature {name}: categorical, {len(h.categories)} categories + other, "
                         f"n={h.n}")
        else:
            lines.append(f"feature {name}: numeric, mean={h.mean:.4g} std={h.std:.4g} n={h.n}, "
                         f"edges {h.edges[0]:.4g} .. {h.edges[-1]:.4g} ({len(h.edges) - 1} bins)")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    if args.file is not None:
        refs = [(args.file, Reference.load(args.file))]
    else:
        refs = _learned(args)
        if not refs:
            print("no learned reference matches", file=sys.stderr)
            return 1
    for path, ref in refs:
        if args.json:
            print(json.dumps(ref.to_json(), indent=1))
        else:
            print(f"# {path}\n{describe(ref)}")
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    if not (args.all or args.service or args.model or args.model_version):
        print("reset: select what to reset (--model/--model-version/--service) or pass --all",
              file=sys.stderr)
        return 2
    refs = _learned(args)
    for path, ref in refs:
        path.unlink(missing_ok=True)
        print(f"deleted {path.name} ({ref.subject})")
    if not refs:
        print("no learned reference matches", file=sys.stderr)
        return 1
    print("a running agent learns the new baseline after its next reload (SIGHUP) or restart")
    return 0
