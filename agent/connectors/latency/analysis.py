"""Trace analysis, vectorised over every trace that became due in one tick.

For each assembled trace it finds: each span's self (exclusive) time, the critical
path and the time each service spends on it, the time in each stage, and the
service-graph edges. All of it runs as numpy operations over the spans of many
traces at once (sorts, ``searchsorted``, segmented running maxima), in O(n log n):
values pass down parent chains by pointer jumping (log2 of the deepest chain rounds),
and the critical-path walk binary-searches each parent's children (a round per step
while many parents walk, then a Python loop for the few with long paths).

Input is ``Spans`` (times in integer Unix nanoseconds). Bad input never raises:

- a span whose parent is missing (or is itself) is an *orphan*, the root of its own
  subtree; orphans are off the critical path unless the trace has no root at all
  (``rootless``), in which case its longest orphan stands in for the root;
- a child reaching outside its parent is *clock skew*: it is clipped to the parent;
- a repeated (trace, span id) is a *duplicate*: the first copy wins;
- a span ending before it starts lasts zero.
"""

from __future__ import annotations

from bisect import bisect_left
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
    span intervals within the root's interval, and the id and end of the stage's
    longest span there (its exemplar). ``edge_*``: one entry per CLIENT -> SERVER (or
    PRODUCER -> CONSUMER) parent/child pair, with the id and end of each side.
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
    stage_sid: np.ndarray
    stage_end: np.ndarray
    edge_client: np.ndarray  # service rows
    edge_server: np.ndarray
    edge_messaging: np.ndarray  # bool: PRODUCER -> CONSUMER
    edge_client_ns: np.ndarray
    edge_server_ns: np.ndarray
    edge_failed: np.ndarray
    edge_trace_id: np.ndarray  # (e, 2) uint64 words
    edge_client_sid: np.ndarray
    edge_end: np.ndarray  # of the client span
    edge_server_sid: np.ndarray
    edge_server_end: np.ndarray


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


def _along_ancestors(values: np.ndarray, parent: np.ndarray,
                     op: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per span, ``op`` (associative: max, min, and) folded over its value and those
    of all its ancestors (``parent``: -1 at the top of a chain), and which spans'
    chains never end.

    Pointer jumping: each round folds in the value of the span's current ancestor
    link and doubles the link, so rounds = log2 of the deepest chain, not its depth
    (a chain of 60k nested spans takes 16 rounds). Spans whose chain never ends (a
    parent cycle in bad input) have folded in every span of the cycle when the
    rounds run out; the caller decides what that means.
    """
    out = values.copy()
    link = parent.copy()
    for _ in range(max(1, len(values)).bit_length() + 1):
        at = np.flatnonzero(link >= 0)
        if not len(at):
            break
        up = link[at]
        out[at] = op(out[at], out[up])
        link[at] = link[up]
    return out, link >= 0


# Below this many parents with children left to walk, the critical-path walk goes on
# parent by parent in Python (bisect per step): a parent with tens of thousands of
# sequential children would otherwise take as many vectorised rounds.
_WALK_TAIL = 16


def _critical_children(live: np.ndarray, parent: np.ndarray, fcs: np.ndarray,
                       fce: np.ndarray, chosen: np.ndarray) -> None:
    """Mark in ``chosen`` the children on each parent's critical path.

    ``live`` is sorted by (parent, end descending, start descending, span id). From
    the parent's end, the next child on the path is the first in its parent's
    segment ending at or before the current point; the walk goes on from that
    child's start. Ends are descending within a segment, so that child is found by
    binary search (every child before it ends later than the current point, the
    chosen ones included): O(log n) per step, one step per parent per round.
    """
    if not len(live):
        return
    par = parent[live]
    heads = np.flatnonzero(np.r_[True, par[1:] != par[:-1]])
    tails = np.r_[heads[1:], len(live)]
    # Ends as descending ranks, offset by segment, so one sorted key serves every
    # segment's search: key = segment * (m + 1) + rank.
    ends = np.unique(fce[live])
    m = len(ends)
    rank = m - 1 - np.searchsorted(ends, fce[live])
    key = np.repeat(np.arange(len(heads)), tails - heads) * (m + 1) + rank
    cur = fce[par[heads]]
    active = np.arange(len(heads))
    while len(active) > _WALK_TAIL:
        # First child ending at or before cur: rank >= m - #(ends <= cur).
        at = np.searchsorted(key, active * (m + 1) + m - np.searchsorted(ends, cur[active],
                                                                         side="right"))
        ok = at < tails[active]
        active, at = active[ok], at[ok]
        pick = live[at]
        chosen[pick] = True
        cur[active] = fcs[pick]
    for seg in active.tolist():
        lo, hi = int(heads[seg]), int(tails[seg])
        neg_end = (-fce[live[lo:hi]]).tolist()  # ascending
        starts = fcs[live[lo:hi]].tolist()
        point, i, picks = int(cur[seg]), 0, []
        while True:
            i = bisect_left(neg_end, -point, i)
            if i >= hi - lo:
                break
            picks.append(i)
            point = starts[i]
            i += 1
        chosen[live[lo:hi][picks]] = True


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
    fcs, _ = _along_ancestors(start, parent, np.maximum)
    fce, _ = _along_ancestors(np.where(parent >= 0, sp.end, end), parent, np.minimum)
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
    live = c[fce[c] > fcs[c]]
    # Per parent, latest end first; on equal ends the later start (the shorter child);
    # identical intervals go to the lower span id, so the choice never depends on
    # arrival order.
    live = live[np.lexsort((sp.sid[live].byteswap(), -fcs[live], -fce[live], parent[live]))]
    _critical_children(live, parent, fcs, fce, chosen)
    # On the path: a measured root, or a chosen child all of whose ancestors are.
    top = np.zeros(n, dtype=bool)
    top[roots] = True
    on_path, in_cycle = _along_ancestors(np.where(parent >= 0, chosen, top), parent,
                                         np.logical_and)
    on_path &= ~in_cycle
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
    # Each (trace, stage)'s longest span (on equal lengths the later end): its exemplar.
    by_length = np.lexsort((e_clip, e_clip - s_clip, stage_group))
    last_of_group = np.r_[stage_group[by_length][1:] != stage_group[by_length][:-1], True]
    stage_span = st[by_length[last_of_group]] if len(st) else st

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
        stage_trace=stage_keys // q_max, stage_sid=sp.sid[stage_span],
        stage_end=end[stage_span],
        edge_client=sp.svc[ep], edge_server=sp.svc[ec], edge_messaging=messaging[is_edge],
        edge_client_ns=dur[ep], edge_server_ns=dur[ec],
        edge_failed=(sp.status[ep] == STATUS_ERROR) | (sp.status[ec] == STATUS_ERROR),
        edge_trace_id=sp.trace_id[ec], edge_client_sid=sp.sid[ep], edge_end=end[ep],
        edge_server_sid=sp.sid[ec], edge_server_end=end[ec],
    )
