"""Columnar span buffers: the few fields trace analysis needs, as numpy arrays.

Spans waiting for their trace to complete are kept column by column (ids as 64-bit
words, times as int64 nanoseconds, service/operation/stage as series row numbers),
copied out of the batches they came in, so that the per-trace work runs as numpy
operations over many traces at once rather than as Python code per span.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# Multiplier that mixes the second word of an id into the first (the 64-bit golden
# ratio): trace ids become one 64-bit key, (trace, span id) pairs one sort key. Two
# different ids sharing a key have a 2**-64 chance per pair; lookups verify the
# exact words where it matters (parent links).
MIX = np.uint64(0x9E3779B97F4A7C15)
# A parent id that is neither empty nor 8 bytes cannot link to any span: orphan.
INVALID_PARENT = np.uint64(0xFFFFFFFFFFFFFFFF)


def trace_keys(ids: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """``(keys, words)``: each trace id's 64-bit key (0: not a 16-byte id, invalid)
    and its two native uint64 words."""
    tw, tlen = id_words(ids, 16)
    key = (tw[:, 0] ^ (tw[:, 1] * MIX)).view(np.int64)
    key[tlen != 16] = 0
    return key, tw


def sample_mask(key: np.ndarray, rate: float) -> np.ndarray | None:
    """Which spans belong to a trace sampled at ``rate`` (``None``: all of them).

    The decision is a pure function of the trace key, so every span of a trace gets
    the same one whichever batch, service or agent it arrives through: traces are
    kept or skipped whole. The key goes through the splitmix64 finaliser first, so ids
    with structure (a constant half, a counter) still sample uniformly. Invalid
    trace ids (key 0) are kept so the trace buffer counts them as it always has.
    """
    if rate >= 1.0:
        return None
    z = key.view(np.uint64)
    z = z ^ (z >> _S30)
    z = z * _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    threshold = np.uint64(min(int(rate * 2.0**64), 2**64 - 1))
    return (z < threshold) | (key == 0)


# splitmix64's finaliser (Steele, Lea and Flood 2014): a bijection on 64-bit words
# whose every output bit depends on every input bit.
_S27, _S30, _S31 = np.uint64(27), np.uint64(30), np.uint64(31)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def id_words(ids: list[bytes], width: int) -> tuple[np.ndarray, np.ndarray]:
    """``(words, lengths)``: each id as ``width // 8`` native uint64 words (zero when
    its length is not ``width``) and the byte length of each id."""
    n = len(ids)
    words = width // 8
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
    buf = b"".join(ids)
    if len(buf) == n * width and (lengths == width).all():
        return np.frombuffer(buf, dtype=np.uint64).reshape(n, words).copy(), lengths
    out = np.zeros((n, words), dtype=np.uint64)
    ok = lengths == width
    if ok.any():
        offsets = np.cumsum(lengths) - lengths
        raw = np.frombuffer(buf, dtype=np.uint8)
        out[ok] = raw[offsets[ok][:, None] + np.arange(width)].view(np.uint64)
    return out, lengths


@dataclass
class Spans:
    """Spans as parallel arrays, one row per span.

    ``key`` identifies the trace (0: invalid trace id); ``trace_id`` holds the id's
    two words (``trace_id[i].tobytes()`` is the original id). ``sid``/``pid`` are the
    span and parent ids as one word each (``pid`` 0: a root). ``op``, ``svc`` and
    ``stage`` are rows of the connector's self-time, critical-path and stage series
    (``stage`` -1: no stage).
    """

    key: np.ndarray  # int64 (the mixed words' bits; signed sorts faster)
    trace_id: np.ndarray  # (n, 2) uint64
    sid: np.ndarray  # uint64
    pid: np.ndarray  # uint64
    op: np.ndarray  # int32
    svc: np.ndarray  # int32
    stage: np.ndarray  # int32
    kind: np.ndarray  # int8
    status: np.ndarray  # int8
    start: np.ndarray  # int64 ns
    end: np.ndarray  # int64 ns

    def __len__(self) -> int:
        return len(self.key)

    def take(self, index: Any) -> Spans:
        """The rows selected by ``index`` (a boolean mask or indices), copied."""
        return Spans(*[getattr(self, name)[index] for name in FIELDS])

    @classmethod
    def empty(cls) -> Spans:
        return cls(key=np.zeros(0, np.int64), trace_id=np.zeros((0, 2), np.uint64),
                   sid=np.zeros(0, np.uint64), pid=np.zeros(0, np.uint64),
                   op=np.zeros(0, np.int32), svc=np.zeros(0, np.int32),
                   stage=np.zeros(0, np.int32), kind=np.zeros(0, np.int8),
                   status=np.zeros(0, np.int8), start=np.zeros(0, np.int64),
                   end=np.zeros(0, np.int64))


FIELDS = tuple(f.name for f in fields(Spans))


class SpanStore:
    """A growable ``Spans`` with amortised appends and compaction on removal."""

    def __init__(self) -> None:
        self._cols = Spans.empty()
        self.n = 0

    @property
    def key(self) -> np.ndarray:
        return self._cols.key[: self.n]

    def append(self, spans: Spans) -> None:
        need = self.n + len(spans)
        cols = self._cols
        if need > len(cols):
            cap = max(need, 2 * len(cols), 1024)
            grown = []
            for name in FIELDS:
                a = getattr(cols, name)
                b = np.empty((cap, *a.shape[1:]), dtype=a.dtype)
                b[: self.n] = a[: self.n]
                grown.append(b)
            self._cols = cols = Spans(*grown)
        for name in FIELDS:
            getattr(cols, name)[self.n:need] = getattr(spans, name)
        self.n = need

    def pop(self, mask: np.ndarray) -> Spans:
        """Remove the rows where ``mask`` (over the live rows) is true; return them."""
        n = self.n
        kept = ~mask
        k = int(kept.sum())
        out = []
        for name in FIELDS:
            a = getattr(self._cols, name)
            live = a[:n]
            out.append(live[mask])
            a[:k] = live[kept]  # compaction in place: the gather copies before the write
        self.n = k
        return Spans(*out)

    def where_key_in(self, keys: np.ndarray) -> np.ndarray:
        """Mask of the live rows whose trace key is one of ``keys``."""
        if not len(keys):
            return np.zeros(self.n, dtype=bool)
        keys = np.sort(keys)
        at = np.minimum(np.searchsorted(keys, self.key), len(keys) - 1)
        return keys[at] == self.key
