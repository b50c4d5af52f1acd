"""Trace analysis, vectorised over every trace that became due in one tick.

For each assembled trace it finds: each span's self (exclusive) time, the critical
path and the time each service spends on it, the time in each stage, and the
service-graph edges. All of it runs as numpy operations over the spans of many
traces at once (sorts, ``searchsorted``, segmented running maxima); Python loops only
run as many rounds as the deepest trace is deep, or as a parent has sequential
children on the critical path.

Input is ``Spans`` (times in integer Unix nanoseconds). Bad input never raises:

- a span whose parent is missing (or is itself) is an *orphan*, the root of its own
  subtree; orphans are off the critical path unless the trace has no root at all
  (``rootless``), in which case its longest orphan stands in for the root;
- a child reaching outside its parent is *clock skew*: it is clipped to the parent;
- a repeated (trace, span id) is a *duplicate*: the first copy wins;
- a span ending before it starts lasts zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from agent.connectors.latency.spans import MIX, Spans

CLIENT, SERVER = Span.SPAN_KIND_CLIENT, Span.SPAN_KIND_SERVER
PRODUCER, CONSUMER = Span.SPAN_KIND_PRODUCER, Span.SPAN_KIND_CONSUMER
STATUS_ERROR = 2
# Chunk length of the int64 axis on which union_lengths lays groups back to back:
# offsets and widths below 2**61 each keep every sum below 2**62.
_AXIS = 2**61


@dataclass
class Analysis:
    """What a set of traces contributes to the metrics. Durations are nanoseconds.

    Per trace with a root (index ``t`` into the ``trace_*`` arrays): its root span's
    operation row, duration, end and ids. ``self_*``: one entry per span. ``path_*``:
    one entry per span on a critical path, its service and the time attributed to
    it (a trace's entries add up to its root's duration). ``member_*``: one entry per
    (trace, service) taking part, with the trace's duration (the denominator of
    shares). ``stage_*``: one entry per (trace, stage row), the union of that stage's
    span intervals within the root's interval. ``edge_*``: one entry per CLIENT ->
    SERVER (or PRODUCER -> CONSUMER) parent/child pair.
    """

    traces: int
    rootless: int
    orphans: int
    clock_skew: int
    duplicates: int
    trace_op: np.ndarray
    trace_ns: np.ndarray
    trace_end: np.ndarray
    trace_id: np.ndarray  # (t, 2) uint64 words
    trace_root_sid: np.ndarray
    self_op: np.ndarray
    self_ns: np.ndarray
    path_svc: np.ndarray
    path_ns: np.ndarray
    member_svc: np.ndarray
    member_ns: np.ndarray
    stage_row: np.ndarray
    stage_ns: np.ndarray
    stage_trace: np.ndarray  # index into the trace_* arrays
    edge_client: np.ndarray  # service rows
    edge_server: np.ndarray
    edge_messaging: np.ndarray  # bool: PRODUCER -> CONSUMER
    edge_client_ns: np.ndarray
    edge_server_ns: np.ndarray
    edge_failed: np.ndarray
    edge_trace_id: np.ndarray  # (e, 2) uint64 words
    edge_client_sid: np.ndarray
    edge_end: np.ndarray


def union_lengths(group: np.ndarray, start: np.ndarray, end: np.ndarray, base: np.ndarray,
                  n_groups: int) -> np.ndarray:
    """Per group, the length covered by its ``[start, end)`` intervals (overlaps once).

    ``base`` (per interval) is a time at or before every interval of its group, so
    times relative to it are small and non-negative. Intervals must be non-empty.

    Sorted by (group, start), interval i adds ``max(0, end_i - max(start_i, m))``
    where m is the latest end among the group's earlier intervals. To get m for every
    group with one running maximum, groups are laid back to back on one int64 axis
    (each offset by the widths of the groups before it), so a group's maximum never
    leaks into the next. The axis is cut into chunks wherever it would pass 2**61,
    and a group wider than that gets a chunk of its own: no sum can overflow, even
    for absurd span times.
    """
    out = np.zeros(n_groups, dtype=np.int64)
    if len(group) == 0:
        return out
    order = np.lexsort((start, group))
    group = group[order]
    rel_s = start[order] - base[order]
    rel_e = end[order] - base[order]
    first = np.r_[True, group[1:] != group[:-1]]
    heads = np.flatnonzero(first)
    width = np.maximum.reduceat(rel_e, heads) + 1
    # Exclusive prefix sums of the widths: exact (wrapping) int64 for offsets, and
    # float for deciding where chunks start.
    offset = np.cumsum(width) - width
    approx = np.cumsum(width.astype(np.float64)) - width
    limit = float(_AXIS)
    breaks = np.r_[True, np.floor(approx[1:] / limit) != np.floor(approx[:-1] / limit)]
    breaks |= width > _AXIS
    breaks[1:] |= width[:-1] > _AXIS
    chunk_heads = np.flatnonzero(breaks)
    # Each interval's offset, relative to the first group of its chunk.
    group_rank = np.cumsum(first) - 1
    chunk_of_group = np.cumsum(breaks) - 1
    rel_offset = offset - offset[chunk_heads][chunk_of_group]
    off = rel_offset[group_rank]
    s, e = rel_s + off, rel_e + off
    covered = np.empty(len(group), dtype=np.int64)
    bounds = np.r_[heads[chunk_heads], len(group)]
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        seg_s, seg_e = s[lo:hi], e[lo:hi]
        before = np.r_[seg_s[0], np.maximum.accumulate(seg_e)[:-1]]
        covered[lo:hi] = np.maximum(0, seg_e - np.maximum(seg_s, before))
    np.add.at(out, group, covered)
    return out


def _propagate(values: np.ndarray, child: np.ndarray, parent: np.ndarray,
               step: Callable[[np.ndarray], np.ndarray]) -> None:
    """Set ``values[child] = step(values[parent])`` until nothing changes: a value
    travels one level down per round, so rounds = depth of the deepest trace."""
    for _ in range(len(values) + 1):
        new = step(values[parent])
        if np.array_equal(new, values[child]):
            break
        values[child] = new


def analyze(sp: Spans) -> Analysis | None:
    """Analyse every trace in ``sp`` (spans of complete traces, any order)."""
    if not len(sp):
        return None
    # Sort by (trace, span id) through one mixed 64-bit key; find duplicates and each
    # span's parent with searchsorted, verifying the exact ids.
    comb = sp.key.view(np.uint64) ^ (sp.sid * MIX)
    order = np.argsort(comb, kind="stable")
    sp, comb = sp.take(order), comb[order]
    dup = np.r_[False, (comb[1:] == comb[:-1]) & (sp.key[1:] == sp.key[:-1])
                & (sp.sid[1:] == sp.sid[:-1])]
    duplicates = int(dup.sum())
    if duplicates:
        sp, comb = sp.take(~dup), comb[~dup]
    n = len(sp)
    idx = np.arange(n)
    at = np.minimum(np.searchsorted(comb, sp.key.view(np.uint64) ^ (sp.pid * MIX)), max(n - 1, 0))
    found = ((sp.sid[at] == sp.pid) & (sp.key[at] == sp.key) & (sp.pid != 0) & (at != idx))
    parent = np.where(found, at, -1)
    is_root = sp.pid == 0
    orphan = ~is_root & ~found

    start = sp.start
    end = np.maximum(sp.end, start)
    dur = end - start
    keys, g = np.unique(sp.key, return_inverse=True)
    n_traces = len(keys)

    # The span each trace is measured on: its longest root, or, in a trace without
    # one, its longest orphan.
    has_root = np.bincount(g, weights=is_root, minlength=n_traces) > 0
    cand = np.flatnonzero(is_root | (orphan & ~has_root[g]))
    cand = cand[np.lexsort((dur[cand], g[cand]))]
    roots = cand[np.r_[g[cand][1:] != g[cand][:-1], True]] if len(cand) else cand
    root_of = np.full(n_traces, -1)
    root_of[g[roots]] = roots
    rootless = int((~has_root[g[roots]]).sum())

    # Children clipped to their parent (self time), and to their parent's clipped
    # interval, recursively (critical path).
    c = np.flatnonzero(parent >= 0)
    p = parent[c]
    skew = (start[c] < start[p]) | (sp.end[c] > end[p])
    rcs = np.maximum(start[c], start[p])
    rce = np.minimum(sp.end[c], end[p])
    fcs, fce = start.copy(), end.copy()
    raw_s, raw_e = start[c], sp.end[c]
    _propagate(fcs, c, p, lambda pv: np.maximum(raw_s, pv))
    _propagate(fce, c, p, lambda pv: np.minimum(raw_e, pv))
    fce = np.maximum(fce, fcs)

    # Self time: duration minus the union of the children's clipped intervals.
    ne = rce > rcs
    self_ns = dur - union_lengths(p[ne], rcs[ne], rce[ne], start[p[ne]], n)

    # Critical path, the backwards walk of Jaeger's critical-path view: from a span's
    # end, the child that finished last at or before the current point is on the
    # path, the walk continues from that child's start; children overlapping a chosen
    # one are concurrent and off the path. Done for every parent at once, one chosen
    # child per parent per round.
    chosen = np.zeros(n, dtype=bool)
    cur = fce.copy()  # each parent's current point
    live = c[fce[c] > fcs[c]]
    # Per parent, latest end first; on equal ends the later start (the shorter child);
    # identical intervals go to the lower span id, so the choice never depends on
    # arrival order.
    live = live[np.lexsort((sp.sid[live].byteswap(), -fcs[live], -fce[live], parent[live]))]
    while len(live):
        par = parent[live]
        ok = fce[live] <= cur[par]  # once too late, a child stays too late
        live, par = live[ok], par[ok]
        if not len(live):
            break
        first = np.r_[True, par[1:] != par[:-1]]
        pick = live[first]
        chosen[pick] = True
        cur[parent[pick]] = fcs[pick]
        live = live[~first]
    on_path = np.zeros(n, dtype=bool)
    on_path[roots] = True
    chosen_c = chosen[c]
    _propagate(on_path, c, p, lambda pv: chosen_c & pv)
    covered = np.zeros(n, dtype=np.int64)
    pc = np.flatnonzero(chosen)
    np.add.at(covered, parent[pc], fce[pc] - fcs[pc])
    path = np.flatnonzero(on_path)
    path_ns = (fce - fcs - covered)[path]

    # Traces with a root: per-trace values, and who took part.
    t_of = np.full(n_traces, -1)
    t_of[g[roots]] = np.arange(len(roots))
    r_start, r_end = start[roots], end[roots]
    measured = root_of[g] >= 0
    s_max = int(sp.svc.max()) + 1
    pairs = np.unique(g[measured].astype(np.int64) * s_max + sp.svc[measured])
    member_t = t_of[pairs // s_max]

    # Stages: per (trace, stage row), the union of the stage's spans within the root.
    st = np.flatnonzero((sp.stage >= 0) & measured)
    tt = t_of[g[st]]
    s_clip = np.maximum(start[st], r_start[tt])
    e_clip = np.minimum(sp.end[st], r_end[tt])
    keep = e_clip > s_clip
    st, tt, s_clip, e_clip = st[keep], tt[keep], s_clip[keep], e_clip[keep]
    q_max = max(1, int(sp.stage.max()) + 1)
    stage_keys, stage_group = np.unique(tt.astype(np.int64) * q_max + sp.stage[st],
                                        return_inverse=True)
    stage_ns = union_lengths(stage_group, s_clip, e_clip, r_start[tt], len(stage_keys))

    # Service-graph edges: a CLIENT (PRODUCER) parent with a SERVER (CONSUMER) child.
    pk, ck = sp.kind[p], sp.kind[c]
    messaging = (pk == PRODUCER) & (ck == CONSUMER)
    is_edge = ((pk == CLIENT) & (ck == SERVER)) | messaging
    ec, ep = c[is_edge], p[is_edge]

    return Analysis(
        traces=n_traces, rootless=rootless, orphans=int(orphan.sum()),
        clock_skew=int(skew.sum()), duplicates=duplicates,
        trace_op=sp.op[roots], trace_ns=dur[roots], trace_end=end[roots],
        trace_id=sp.trace_id[roots], trace_root_sid=sp.sid[roots],
        self_op=sp.op, self_ns=self_ns,
        path_svc=sp.svc[path], path_ns=path_ns,
        member_svc=(pairs % s_max).astype(np.int32), member_ns=dur[roots][member_t],
        stage_row=(stage_keys % q_max).astype(np.int32), stage_ns=stage_ns,
        stage_trace=stage_keys // q_max,
        edge_client=sp.svc[ep], edge_server=sp.svc[ec], edge_messaging=messaging[is_edge],
        edge_client_ns=dur[ep], edge_server_ns=dur[ec],
        edge_failed=(sp.status[ep] == STATUS_ERROR) | (sp.status[ec] == STATUS_ERROR),
        edge_trace_id=sp.trace_id[ec], edge_client_sid=sp.sid[ep], edge_end=end[ep],
    )
