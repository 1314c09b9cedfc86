"""Which kernel calls one rank makes for its queries against one K/V buffer.

Both sides are described by *segments* (:class:`Segment`): runs of tokens whose global indices are
``start, start + stride, ...`` and which sit in consecutive local rows. What a query may see is a
:class:`MaskSpec` over global indices: causal or not, the documents of a packed sequence (a query sees keys of
its own document only) and a sliding window (keys less than ``window`` tokens back).

For every query segment, key segment and document they share, the visible pairs form a *band*: with ``i`` the
query row and ``j`` the key row inside the block, ``lo <= i - j < hi``. The planner trims the block to the
rows and columns that see anything and classifies it:

- hidden: no call;
- ``"full"``: every pair visible, an unmasked call;
- causal only (no window edge inside the block): an unmasked rectangle plus a ``"causal"`` square (the usual
  lower triangle, aligned at the top left), plus an unmasked rectangle below it when the block is taller;
- otherwise ``"band"``: a call with an explicit mask (the edge blocks of a sliding window).

Neighbouring pieces are then merged into as few calls as possible: a causal square, the rectangle below it and
the next causal square become one causal square when nothing above the diagonal is visible, and unmasked
rectangles that share their rows or columns join. The result is exact for any order of the segments (a
rank-major gathered buffer included) and is cached: every layer of a model asks for the same plans.
"""

from __future__ import annotations

import bisect
import functools
import itertools
from dataclasses import dataclass

import torch

INF = 1 << 62


def _ceil_div(a: int, b: int) -> int:
    return -((-a) // b)


@dataclass(frozen=True)
class Segment:
    """``length`` tokens at global indices ``start + stride * t`` held in local rows ``row + t``."""

    start: int
    length: int
    stride: int = 1
    row: int = 0

    @property
    def stop(self) -> int:
        """One past the last global index for ``stride == 1`` (``start + stride * length`` in general)."""
        return self.start + self.stride * self.length

    @property
    def stop_row(self) -> int:
        return self.row + self.length

    def indices(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.arange(self.start, self.stop, self.stride, device=device)

    def offsets_in(self, a: int, b: int) -> tuple[int, int]:
        """The offsets ``t`` whose global index lies in ``[a, b)``, as ``[t0, t1)``."""
        t0 = max(0, _ceil_div(a - self.start, self.stride))
        t1 = min(self.length, _ceil_div(b - self.start, self.stride))
        return t0, max(t0, t1)


@dataclass(frozen=True)
class MaskSpec:
    """Which keys a query may see, over global token indices.

    Attributes:
        causal: keys at indices ``<=`` the query's.
        documents: ``cu_seqlens`` of a packed sequence (``[0, l_0, l_0 + l_1, ..., S]``); a query sees keys of its
            own document only. ``None``: one document.
        window: sliding window: keys fewer than ``window`` tokens back (``q - k < window``); ``None``: no window.
    """

    causal: bool = True
    documents: tuple[int, ...] | None = None
    window: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"`window` must be a positive int (tokens) or None, but got {self.window!r}.")
        if self.window is not None and not self.causal:
            raise ValueError("A sliding `window` needs causal attention (causal=True).")


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: local query rows ``[q_start, q_end)`` against buffer rows ``[kv_start, kv_end)``.

    ``kind``: ``"full"`` (no mask), ``"causal"`` (square, lower triangle aligned at the top left) or ``"band"``
    (a mask: query row ``i`` sees key row ``j`` of the block iff ``lo <= i - j < hi``).
    """

    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    kind: str = "full"
    lo: int = -INF
    hi: int = INF

    @property
    def q(self) -> slice:
        return slice(self.q_start, self.q_end)

    @property
    def kv(self) -> slice:
        return slice(self.kv_start, self.kv_end)

    @property
    def causal(self) -> bool:
        return self.kind == "causal"

    def band_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """``[Sq, Sk]`` bool, True where the query may see the key (for ``kind == "band"``)."""
        i = torch.arange(self.q_end - self.q_start, device=device)[:, None]
        j = torch.arange(self.kv_end - self.kv_start, device=device)[None, :]
        return (i - j >= self.lo) & (i - j < self.hi)


def _band_pieces(nq: int, nk: int, lo: int, hi: int) -> list[tuple[str, int, int, int, int, int, int]]:
    """Classify the block ``lo <= i - j < hi`` (rows ``[0, nq)``, cols ``[0, nk)``) into kernel pieces."""
    r0, r1 = max(0, lo), min(nq, nk - 1 + hi)
    c0, c1 = max(0, 1 - hi), min(nk, nq - lo)
    if hi <= lo or r0 >= r1 or c0 >= c1:
        return []
    nq, nk = r1 - r0, c1 - c0
    lo, hi = lo - (r0 - c0), hi - (r0 - c0)
    if -(nk - 1) >= lo and nq - 1 < hi:
        return [("full", r0, r1, c0, c1, -INF, INF)]
    if hi < nq:  # a window edge runs through the block: mask it
        return [("band", r0, r1, c0, c1, lo, hi)]
    d = -lo  # row i sees cols j <= i + d (d >= 0 after trimming); cols [0, d) are seen by every row
    m = nk - d
    pieces = [("causal", r0, r0 + m, c0 + d, c1, -INF, INF)]
    if d:
        pieces.append(("full", r0, r1, c0, c0 + d, -INF, INF))
    if m < nq:
        pieces.append(("full", r0 + m, r1, c0 + d, c1, -INF, INF))
    return pieces


def _overlapping_documents(bounds: tuple[int, ...], first: int, last: int) -> range:
    """Indices of the documents ``[bounds[d], bounds[d + 1])`` that meet global indices ``[first, last]``."""
    lo = bisect.bisect_right(bounds, first) - 1
    hi = bisect.bisect_right(bounds, last)
    return range(max(lo, 0), min(hi, len(bounds) - 1))


def _raw_pieces(q: tuple[Segment, ...], kv: tuple[Segment, ...], mask: MaskSpec) -> list[list]:
    """Pieces ``[kind, q0, q1, k0, k1, lo, hi, last query, first key]``, per segment pair and shared document.

    The last two entries are the global indices of the piece's last query and first key (for the causal merge).
    """
    bounds = mask.documents or (0, INF)
    kv_by_doc: dict[int, list[Segment]] = {}
    for ks in kv:
        for d in _overlapping_documents(bounds, ks.start, ks.stop - ks.stride):
            kv_by_doc.setdefault(d, []).append(ks)
    pieces = []
    for qs in q:
        for d in _overlapping_documents(bounds, qs.start, qs.stop - qs.stride):
            qa, qb = qs.offsets_in(bounds[d], bounds[d + 1])
            if qa == qb:
                continue
            for ks in kv_by_doc.get(d, ()):
                if qs.stride != ks.stride:
                    raise AssertionError(f"query and key segments must share a stride ({qs.stride} vs {ks.stride})")
                sigma = qs.stride
                ka, kb = ks.offsets_in(bounds[d], bounds[d + 1])
                if ka == kb:
                    continue
                q0, k0 = qs.start + sigma * qa, ks.start + sigma * ka  # global indices at i = j = 0
                lo = _ceil_div(k0 - q0, sigma) if mask.causal else -INF
                hi = _ceil_div(mask.window - (q0 - k0), sigma) if mask.window is not None else INF
                for kind, r0, r1, c0, c1, blo, bhi in _band_pieces(qb - qa, kb - ka, lo, hi):
                    pieces.append([kind, qs.row + qa + r0, qs.row + qa + r1, ks.row + ka + c0, ks.row + ka + c1,
                                   blo, bhi, q0 + sigma * (r1 - 1), k0 + sigma * c0])
    return pieces


def _merge_causal(pieces: list[list]) -> list[list]:
    """``causal(A) + full(B x A) + causal(B)`` -> ``causal(A + B)`` when every key of B comes after every query of A.

    Then no query of A sees a key of B (the mask is causal), so the merged lower triangle is exact.
    """
    causal = {(p[1], p[3]): p for p in pieces if p[0] == "causal"}
    full = {(p[1], p[2], p[3], p[4]): p for p in pieces if p[0] == "full"}
    gone: set[int] = set()
    for a in sorted(causal.values(), key=lambda p: p[1]):
        if id(a) in gone:
            continue
        while True:
            b = causal.get((a[2], a[4]))
            below = full.get((a[2], b[2], a[3], a[4])) if b is not None and id(b) not in gone else None
            if below is None or id(below) in gone or a[7] >= b[8]:
                break
            gone.update((id(b), id(below)))
            a[2], a[4], a[7] = b[2], b[4], b[7]
    return [p for p in pieces if id(p) not in gone]


def _merge_full(pieces: list[list]) -> list[list]:
    """Join unmasked rectangles that share their columns (adjacent rows) or their rows (adjacent columns)."""
    changed = True
    while changed:
        changed = False
        for rows_first in (True, False):
            full = sorted((p for p in pieces if p[0] == "full"),
                          key=(lambda p: (p[3], p[4], p[1])) if rows_first else (lambda p: (p[1], p[2], p[3])))
            out: list[list] = []
            for p in full:
                last = out[-1] if out else None
                if last is not None and rows_first and (last[3], last[4]) == (p[3], p[4]) and last[2] == p[1]:
                    last[2] = p[2]
                    changed = True
                elif last is not None and not rows_first and (last[1], last[2]) == (p[1], p[2]) and last[4] == p[3]:
                    last[4] = p[4]
                    changed = True
                else:
                    out.append(list(p))
            pieces = [p for p in pieces if p[0] != "full"] + out
    return pieces


@functools.lru_cache(maxsize=4096)
def plan_calls(q: tuple[Segment, ...], kv: tuple[Segment, ...], mask: MaskSpec) -> tuple[BlockCall, ...]:
    """Kernel calls covering every visible (query, key) pair exactly once (hidden pairs get no call).

    ``q``: the queries' segments (their ``row`` is the local row); ``kv``: the buffer's segments (``row`` is the
    buffer row). Causal squares come first, then unmasked and masked rectangles, each in row order.
    """
    pieces = _merge_full(_merge_causal(_raw_pieces(q, kv, mask)))
    order = {"causal": 0, "full": 1, "band": 2}
    pieces.sort(key=lambda p: (order[p[0]], p[1], p[3]))
    return tuple(BlockCall(p[1], p[2], p[3], p[4], p[0], p[5], p[6]) for p in pieces)


# ------------------------------------------------------------------------------- launches of one ring step

#: Calls with more query or key rows than this run alone on the dense kernel (cuDNN on CUDA): large blocks run
#: faster there than in flash's varlen kernel (H200: 1.6x), and one launch more costs them nothing. A single
#: document's blocks at 32K and more tokens per rank are all of this kind.
DENSE_ROWS = 2048


@dataclass(frozen=True)
class Launch:
    """One kernel call of a ring step.

    ``kind``:

    - ``"call"``: ``calls[0]`` alone, with the dense kernel on row slices (large blocks, steps of at most two
      calls, and on CUDA the masked edge blocks of a sliding window);
    - ``"varlen"``: every call is one sequence of one variable-length call (all causal squares or all unmasked
      rectangles), over rows gathered by index;
    - ``"masked"``: the union of the calls' query rows against the union of their key rows in one call with an
      explicit ``[Tq, Tk]`` mask (kernels without a varlen op: the CPU).
    """

    kind: str
    calls: tuple[BlockCall, ...]

    @property
    def causal(self) -> bool:
        # A one-token document's 1x1 block may lead a causal launch: any causal square makes the launch causal.
        return self.kind != "masked" and any(c.causal for c in self.calls)


def step_launches(calls: tuple[BlockCall, ...], mode: str, dense_rows: int = DENSE_ROWS) -> tuple[Launch, ...]:
    """The launches of one step's ``calls`` in ``mode`` (``"varlen"``, ``"masked"`` or ``"calls"``).

    However many documents the calls come from, the small calls make at most two launches in ``"varlen"`` mode
    (the causal squares, the unmasked rectangles) and one in ``"masked"`` mode; calls above ``dense_rows`` rows and,
    in ``"varlen"`` mode, masked edge blocks of a window run alone.
    """
    if mode == "calls" or len(calls) <= 2:
        return tuple(Launch("call", (c,)) for c in calls)

    def alone(c: BlockCall) -> bool:
        big = c.q_end - c.q_start > dense_rows or c.kv_end - c.kv_start > dense_rows
        return big or (mode == "varlen" and c.kind == "band")

    out = [Launch("call", (c,)) for c in calls if alone(c)]
    small = [c for c in calls if not alone(c)]
    if mode == "varlen":
        # A 1x1 block (a one-token document) is a causal square too: it joins the causal launch after its squares
        # (a launch is causal if any of its calls is) instead of costing a dense call of its own.
        point = lambda c: c.kind == "full" and c.q_end - c.q_start == 1 and c.kv_end - c.kv_start == 1
        causal = [c for c in small if c.kind == "causal"]
        groups = [causal + [c for c in small if point(c)] if causal else [],
                  [c for c in small if c.kind == "full" and not (causal and point(c))]]
    else:
        groups = [small]
    groups = [g for g in groups if g]
    if mode == "varlen":
        groups = _view_parts(groups)
    for part in groups:
        out.append(Launch("call", (part[0],)) if len(part) == 1 else Launch(mode, tuple(part)))
    return tuple(out)


#: Most launches of a step's small calls (each kind's calls are one launch, or split into runs read as views).
STEP_LAUNCHES = 2


def runs(calls: list[BlockCall]) -> list[list[BlockCall]]:
    """``calls`` as runs: calls whose query rows and key rows each continue the previous call's, in order.

    A run of a varlen launch reads its query and K/V rows as two slices (views): no gathered copies, output
    writes and gradient sums in place. Runs grow in key order, so that queries which see several runs of keys
    (the tails of every document against another rank's heads, then against its tails) make one run per run of
    keys instead of repeating their rows in one launch.
    """
    open_runs: dict[tuple[int, int], list[BlockCall]] = {}
    out: list[list[BlockCall]] = []
    for c in sorted(calls, key=lambda c: (c.kv_start, c.q_start)):
        run = open_runs.pop((c.q_start, c.kv_start), None)
        if run is None:
            run = []
            out.append(run)
        run.append(c)
        open_runs[c.q_end, c.kv_end] = run
    return out


def _view_parts(groups: list[list[BlockCall]]) -> list[list[BlockCall]]:
    """The launches of a step's small calls (``groups``: one list per kind): each kind as one launch, as its
    :func:`runs`, or as its largest run plus one launch for the rest, whichever combination gathers the fewest
    rows (:func:`gathered_cost`) within :data:`STEP_LAUNCHES` launches, so that the launches of a step never
    grow with the documents."""
    options = []
    for calls in groups:
        mine = [[sorted(calls, key=lambda c: (c.q_start, c.kv_start))]]
        parts = runs(calls)
        if len(parts) > 1:
            parts.sort(key=lambda run: sum((c.q_end - c.q_start) * (c.kv_end - c.kv_start) for c in run),
                       reverse=True)
            rest = sorted((c for run in parts[1:] for c in run), key=lambda c: (c.q_start, c.kv_start))
            mine.append([parts[0], rest])
            if len(parts) <= STEP_LAUNCHES:
                mine.append(parts)
        options.append(mine)
    best = min((choice for choice in itertools.product(*options) if sum(map(len, choice)) <= STEP_LAUNCHES),
               key=lambda choice: (sum(gathered_cost(la) for part in choice for la in part),
                                   sum(map(len, choice))))
    return [la for part in best for la in part]


def gathered_cost(calls: list[BlockCall], q_weight: int = 4) -> int:
    """Rows a varlen launch of ``calls`` (in order) reads by index: its query rows (``q_weight`` each: a query row
    is copied three times and its gradient summed by index, and a Llama query has four times the heads of its K/V)
    unless they are one run of consecutive rows, and its key rows unless they are."""
    def rows(ranges: list[tuple[int, int]]) -> int:
        consecutive = all(b == c for (_, b), (c, _) in itertools.pairwise(ranges))
        return 0 if consecutive else sum(b - a for a, b in ranges)
    return (q_weight * rows([(c.q_start, c.q_end) for c in calls])
            + rows([(c.kv_start, c.kv_end) for c in calls]))
