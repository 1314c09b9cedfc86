"""Which tokens of a sequence each context-parallel rank holds: the layouts and their placements.

A :class:`Layout` (``Layout.for_name("zigzag", world)``) is the one owner of the rules of a split: the length
divisor, which global tokens each rank holds (:meth:`Layout.placement`), and, through the placement, the block
plan of a rank against any K/V buffer (:meth:`Placement.plan`). The layouts:

- ``"zigzag"`` (default): every document is cut into ``2P`` equal chunks and rank ``r`` holds chunks ``r`` and
  ``2P - 1 - r`` of each (head and tail), so that under a causal mask every rank does the same work. A plain
  sequence is one document; packed documents are balanced one by one (each document's length must then be a
  multiple of ``2P``: :mod:`hf_ringcp.integrations.batch` pads them).
- ``"zigzag_global"``: the zigzag over the whole sequence, ignoring document boundaries (length divisible by
  ``2P``); the same as ``"zigzag"`` for one document.
- ``"contiguous"``: rank ``r`` holds the ``r``-th of ``P`` equal slices.
- ``"striped"``: token ``i`` lives on rank ``i mod P`` (length divisible by ``P``).
- ``"balanced"``: for packed rows: short documents stay whole on one rank, long ones are zigzagged over all
  ranks, and documents are cut into uneven pieces only where needed to give every rank the same tokens and the
  same causal work (see :class:`Balanced`); only the rows other ranks' queries see travel (:class:`Travel`). One
  document is placed exactly as ``"zigzag"`` places it (length divisible by ``2P``).

A rank's local tensor is the concatenation of its segments: in increasing global order, except under
``"balanced"``, whose ranks hold the rows that see other ranks' keys last, heads before tails, so that each ring
step reads its queries and keys as runs of rows (views) instead of gathering them. Use :func:`local_positions`
(or the ``ShardInfo``) for where a local row sits in the sequence. Everything here is pure index arithmetic,
plus the two functions that move whole sequences (:func:`shard_sequence`, :func:`unshard_sequence`).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch
import torch.distributed as dist

from hf_ringcp.ring.group import all_gather_single, group_rank_and_size
from hf_ringcp.ring.plan import DENSE_ROWS, BlockCall, MaskSpec, Segment, plan_calls


def check_documents(cu_seqlens: Sequence[int] | torch.Tensor | None, seq_len: int) -> tuple[int, ...] | None:
    """Validate document boundaries over a sequence of ``seq_len`` tokens (flash-attention ``cu_seqlens``).

    ``cu_seqlens`` is ``[0, l_0, l_0 + l_1, ..., seq_len]``: strictly increasing, from 0 to ``seq_len``. Returns it
    as a tuple (``None`` for ``None`` or a single document), or raises ``ValueError`` saying what is wrong.
    """
    if cu_seqlens is None:
        return None
    values = tuple(int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens))
    if len(values) < 2 or values[0] != 0 or values[-1] != seq_len or any(b <= a for a, b in itertools.pairwise(values)):
        shown = list(values) if len(values) <= 12 else [*values[:6], "...", *values[-2:]]
        raise ValueError(
            f"`cu_seqlens` must rise strictly from 0 to the global sequence length ({seq_len}), one entry per "
            f"document boundary (flash-attention convention), but got {shown}."
        )
    return None if len(values) == 2 else values


@dataclass(frozen=True)
class Placement:
    """Which global tokens each rank holds for one sequence (of ``seq_len`` tokens), as local segments.

    ``ranks[r]`` are rank ``r``'s segments in local order (``Segment.row`` is the local row of a segment's first
    token); every rank holds ``local_len`` tokens. Built by :meth:`Layout.placement`. A placement of only some of
    the tokens (the buffers a ring sends, :attr:`Travel.buffers`) gives ``buffer_len``, the rows of each rank's
    buffer.
    """

    layout: str
    seq_len: int
    world: int
    ranks: tuple[tuple[Segment, ...], ...]
    documents: tuple[int, ...] | None = None
    buffer_len: int | None = None

    @property
    def local_len(self) -> int:
        return self.seq_len // self.world if self.buffer_len is None else self.buffer_len

    def segments(self, rank: int) -> tuple[Segment, ...]:
        return self.ranks[rank]

    def positions(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global token indices held by ``rank``, in local order: ``[local_len]`` int64."""
        return torch.cat([s.indices(device) for s in self.ranks[rank]])

    @cached_property
    def rank_major(self) -> torch.Tensor:
        """Permutation ``perm``: ``x_rank_major = x_global.index_select(dim, perm)`` (what an all-gather returns)."""
        return torch.cat([self.positions(r) for r in range(self.world)])

    @cached_property
    def inverse_rank_major(self) -> torch.Tensor:
        return torch.argsort(self.rank_major)

    @cached_property
    def _global_rows(self) -> dict[tuple[int, int], int]:
        """``(rank, segment index) -> row`` of the segment in a buffer of every held token in global order.

        The global index itself when every token is held (a layout's placement); rows close up over the tokens
        that are not (the buffers of a :class:`Travel`).
        """
        order = sorted(((s.start, r, i, s.length) for r in range(self.world) for i, s in enumerate(self.ranks[r])))
        rows, row = {}, 0
        for _, r, i, n in order:
            rows[r, i] = row
            row += n
        return rows

    @property
    def buffer_rows(self) -> int:
        """Rows of a buffer holding every rank's tokens (:meth:`gathered`)."""
        return sum(s.length for segments in self.ranks for s in segments)

    def gathered(self, exclude: int | None = None, global_order: bool = True) -> tuple[Segment, ...]:
        """Segments of a buffer holding every rank's tokens (for the all-gather variant).

        ``global_order``: the buffer rows are in global order (a reordered copy of the gathered parts; the global
        index itself when every token is held); only possible for stride-1 placements. Otherwise the buffer is
        rank-major, as the all-gather returns it. The segments of rank ``exclude`` are left out (their rows are not
        attended through this buffer).
        """
        out = []
        for r in range(self.world):
            if r == exclude:
                continue
            for i, s in enumerate(self.ranks[r]):
                row = self._global_rows[r, i] if global_order else r * self.local_len + s.row
                out.append(Segment(s.start, s.length, s.stride, row))
        if global_order:
            if any(s.stride != 1 for s in out):
                raise AssertionError("a global-order buffer needs stride-1 segments")
            out.sort(key=lambda s: s.start)
        return tuple(out)

    def moves(self, global_order: bool = True) -> tuple[tuple[int, int, int, int], ...]:
        """``(rank, local row, buffer row, length)`` of every segment in the buffer of :meth:`gathered`."""
        return tuple(
            (r, s.row, self._global_rows[r, i] if global_order else r * self.local_len + s.row, s.length)
            for r in range(self.world)
            for i, s in enumerate(self.ranks[r])
        )

    def plan(self, q: tuple[Segment, ...], kv: tuple[Segment, ...], mask: MaskSpec) -> tuple[BlockCall, ...]:
        """Kernel calls for queries held as ``q`` against a K/V buffer held as ``kv`` (see :mod:`.plan`)."""
        return plan_calls(q, kv, mask)

    def travelling(self, mask: MaskSpec) -> Travel:
        """What a ring sends of every rank's K/V under ``mask`` (cached; see :class:`Travel`).

        For a layout with :attr:`Layout.sends_seen_rows_only` (``"balanced"``): the rows another rank's queries
        can see; for the others every row.
        """
        cache = self.__dict__.setdefault("_travel", {})
        found = cache.get(mask)
        if found is None:
            found = cache[mask] = Travel.of(self, mask)
        return found


@dataclass(frozen=True)
class Travel:
    """The K/V rows of every rank that a ring sends: for ``"balanced"`` only those another rank's queries see.

    ``rows[r]``: rank ``r``'s local row ranges ``[a, b)`` that travel, in order; ``buffers``: a :class:`Placement`
    of the sent buffers (rank ``r``'s travelling segments, ``row`` their row in its buffer; ``local_len`` the
    largest buffer, which an all-gather pads every rank's to); ``everything``: every row travels (the buffers are
    the local tensors as they are). A document that never leaves its rank is seen by no other rank, so with
    ``"balanced"`` and no long document nothing travels at all (:attr:`nothing`).
    """

    rows: tuple[tuple[tuple[int, int], ...], ...]
    buffers: Placement
    everything: bool

    @staticmethod
    def of(placement: Placement, mask: MaskSpec) -> Travel:
        world = placement.world
        if not Layout._registry[placement.layout].sends_seen_rows_only or world == 1:
            rows = tuple(((0, placement.local_len),) for _ in range(world))
            return Travel(rows, placement, True)
        rows = []
        for owner in range(world):
            # Every other rank's queries in one plan against the owner's rows: the calls' key ranges are the rows
            # they may see (the planner owns visibility: causality, documents, windows).
            others, row = [], 0
            for r in range(world):
                if r != owner:
                    for s in placement.segments(r):
                        others.append(Segment(s.start, s.length, s.stride, row))
                        row += s.length
            seen = sorted((c.kv_start, c.kv_end) for c in plan_calls(tuple(others), placement.segments(owner), mask))
            ranges: list[list[int]] = []
            for a, b in seen:
                if ranges and a <= ranges[-1][1]:
                    ranges[-1][1] = max(ranges[-1][1], b)
                else:
                    ranges.append([a, b])
            rows.append(tuple((a, b) for a, b in ranges))
        buffers = []
        for owner, ranges in enumerate(rows):
            out, row = [], 0
            for s in placement.segments(owner):
                for a, b in ranges:
                    lo, hi = max(a, s.row), min(b, s.stop_row)
                    if lo < hi:
                        out.append(Segment(s.start + s.stride * (lo - s.row), hi - lo, s.stride, row))
                        row += hi - lo
            buffers.append(tuple(out))
        size = max(sum(b - a for a, b in r) for r in rows)
        return Travel(tuple(rows), Placement(placement.layout, placement.seq_len, world, tuple(buffers),
                                             placement.documents, buffer_len=size), False)

    def size(self, rank: int) -> int:
        """Rows rank ``rank`` sends."""
        return sum(b - a for a, b in self.rows[rank])

    @property
    def nothing(self) -> bool:
        """No rank's queries see another rank's keys: the ring needs no communication."""
        return all(not r for r in self.rows)

    def index(self, rank: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Local rows of rank ``rank`` that travel: ``[size(rank)]`` int64 on ``device`` (cached per device)."""
        cache = self.__dict__.setdefault("_index", {})
        key = (rank, str(device))
        if key not in cache:
            parts = [torch.arange(a, b) for a, b in self.rows[rank]]
            cache[key] = (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)).to(device)
        return cache[key]

    def take(self, x: torch.Tensor, rank: int, pad: bool = False) -> torch.Tensor:
        """The travelling rows of ``rank``'s ``x`` ``[..., S_local, D]`` -> ``[..., size(rank), D]`` (contiguous;
        ``x`` itself when everything travels); ``pad``: zero rows after them up to ``buffers.local_len``."""
        if self.everything:
            return x
        rows = x.index_select(-2, self.index(rank, x.device))
        if pad and rows.shape[-2] < self.buffers.local_len:
            shape = (*x.shape[:-2], self.buffers.local_len - rows.shape[-2], x.shape[-1])
            rows = torch.cat([rows, rows.new_zeros(shape)], dim=-2)
        return rows

    def put(self, home: torch.Tensor, sent: torch.Tensor, rank: int) -> torch.Tensor:
        """``home`` ``[..., S_local, D]`` with its travelling rows replaced by ``sent`` (``sent`` itself when every
        row travels); ``sent`` may carry padding rows after them."""
        if self.everything:
            return sent
        n = self.size(rank)
        return home.index_copy_(-2, self.index(rank, home.device), sent[..., :n, :])

    def bytes_sent(self, rank: int, row_bytes: int, comm: str = "p2p") -> int:
        """Bytes rank ``rank`` sends for one K/V pass (forward) of ``row_bytes`` per token row (K and V together).

        ``p2p``: the buffers of the ``P - 1`` owners it forwards; ``allgather``: its padded buffer to each of the
        ``P - 1`` others (the volume of a ring all-gather). Nothing when nothing travels.
        """
        world = self.buffers.world
        if world == 1 or self.nothing:
            return 0
        if comm == "allgather":
            return (world - 1) * self.buffers.local_len * row_bytes
        return sum(self.size((rank - step) % world) for step in range(world - 1)) * row_bytes


def _merge_adjacent(segments: list[Segment]) -> tuple[Segment, ...]:
    """Join segments that continue each other both in the sequence and in local rows."""
    out: list[Segment] = []
    for s in segments:
        if out and out[-1].stride == s.stride == 1 and out[-1].stop == s.start and out[-1].stop_row == s.row:
            last = out.pop()
            s = Segment(last.start, last.length + s.length, 1, last.row)
        out.append(s)
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """How a sequence is split over ``world`` ranks. Build with :meth:`for_name`; see the module docstring."""

    world: int
    name: ClassVar[str] = ""
    #: True when the placement follows document boundaries (then every document must split evenly).
    per_document: ClassVar[bool] = False
    #: True when a ring sends only the K/V rows other ranks' queries see (:class:`Travel`).
    sends_seen_rows_only: ClassVar[bool] = False
    _registry: ClassVar[dict[str, type[Layout]]] = {}

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        Layout._registry[cls.name] = cls

    def __post_init__(self) -> None:
        if not isinstance(self.world, int) or self.world < 1:
            raise ValueError(f"The world size must be a positive integer, but got {self.world!r}.")

    @staticmethod
    def names() -> tuple[str, ...]:
        """The registered layout names, the default first."""
        return tuple(sorted(Layout._registry, key=lambda n: (n != "zigzag", n != "zigzag_global", n)))

    @staticmethod
    def for_name(name: str, world: int) -> Layout:
        """The layout called ``name`` over ``world`` ranks; ``ValueError`` naming the valid names otherwise."""
        if name not in Layout._registry:
            raise ValueError(
                f"`layout` must be one of {Layout.names()}, but got {name!r}; use layout='zigzag' (the default, "
                "causal load balance) unless you need another split."
            )
        return Layout._registry[name](world)

    # ------------------------------------------------------------------------------------------- divisor

    @property
    def divisor(self) -> int:
        """Sequence (or, per document, document) lengths must be multiples of this."""
        return self.world

    #: How the divisor follows from the number of ranks, for messages.
    divisor_rule: ClassVar[str] = "cp_size"

    def divisor_hint(self) -> str:
        return f"{self.divisor_rule} = {self.divisor}"

    def padded_length(self, length: int) -> int:
        """The smallest multiple of :attr:`divisor` that holds ``length`` tokens."""
        return -(-length // self.divisor) * self.divisor

    def document_spans(self, lengths: list[int] | tuple[int, ...]) -> list[int]:
        """Row tokens each of the documents of ``lengths`` takes when packed back to back for this layout.

        A per-document layout pads every document to a multiple of :attr:`divisor` (the padding at its end, seen
        by no real token); the others keep the documents as they are and stretch the last one to make the total
        divisible.
        """
        if self.per_document:
            return [self.padded_length(n) for n in lengths]
        spans = list(lengths)
        if spans:
            spans[-1] += self.padded_length(sum(spans)) - sum(spans)
        return spans

    def check_length(self, seq_len: int, what: str = "sequence length") -> None:
        """Raise ``ValueError`` naming the fix unless ``seq_len`` splits evenly."""
        if seq_len % self.divisor != 0:
            raise ValueError(
                f"The {what} ({seq_len}) must be divisible by {self.divisor_hint()} for layout={self.name!r}. Pad the "
                f"sequence to a multiple of {self.divisor} (hf_ringcp.shard_batch pads for you, with labels -100 on "
                "the padding) or choose a length that is."
            )

    def check_local_length(self, local_len: int) -> None:
        """The same rule for one rank's share: ``local_len`` must be a multiple of ``divisor / world``."""
        per_rank = self.divisor // self.world
        if local_len % per_rank != 0:
            raise ValueError(
                f"The local sequence length ({local_len}) must be divisible by {per_rank} for layout={self.name!r} "
                f"(the global length by {self.divisor_hint()}); pad the sequence or use layout='contiguous'."
            )

    # ----------------------------------------------------------------------------------------- placement

    def placement(self, seq_len: int, documents: Sequence[int] | torch.Tensor | None = None) -> Placement:
        """Which tokens every rank holds for a sequence of ``seq_len`` tokens (``documents``: ``cu_seqlens``)."""
        docs = check_documents(documents, seq_len)
        return _placement(type(self), self.world, seq_len, docs)

    def _segments(self, rank: int, seq_len: int, docs: tuple[int, ...] | None) -> list[Segment]:
        raise NotImplementedError


_PLACEMENTS: dict[tuple, Placement] = {}


def _placement(cls: type[Layout], world: int, seq_len: int, docs: tuple[int, ...] | None) -> Placement:
    # Placements (and their plans) are reused by every layer and step of a run: keep a few.
    key = (cls.name, world, seq_len, docs)
    found = _PLACEMENTS.get(key)
    if found is None:
        layout = cls(world)
        if layout.per_document and docs is not None:
            for a, b in itertools.pairwise(docs):
                layout.check_length(b - a, what=f"length of the document at tokens [{a}, {b})")
        layout.check_length(seq_len)
        ranks = tuple(_merge_adjacent(layout._segments(r, seq_len, docs)) for r in range(world))
        found = Placement(cls.name, seq_len, world, ranks, docs)
        if len(_PLACEMENTS) >= 64:
            _PLACEMENTS.pop(next(iter(_PLACEMENTS)))
        _PLACEMENTS[key] = found
    return found


class Contiguous(Layout):
    name = "contiguous"

    def _segments(self, rank, seq_len, docs):
        n = seq_len // self.world
        return [Segment(rank * n, n, 1, 0)]


def _head_tail(rank: int, world: int, start: int, length: int, row: int) -> list[Segment]:
    c = length // (2 * world)
    return [Segment(start + rank * c, c, 1, row), Segment(start + (2 * world - 1 - rank) * c, c, 1, row + c)]


class ZigzagGlobal(Layout):
    name = "zigzag_global"

    divisor_rule = "2 * cp_size"

    @property
    def divisor(self) -> int:
        return 2 * self.world

    def _segments(self, rank, seq_len, docs):
        return _head_tail(rank, self.world, 0, seq_len, 0)


class Zigzag(ZigzagGlobal):
    name = "zigzag"
    per_document = True

    def _segments(self, rank, seq_len, docs):
        bounds = docs or (0, seq_len)
        out, row = [], 0
        for a, b in itertools.pairwise(bounds):
            out += _head_tail(rank, self.world, a, b - a, row)
            row += (b - a) // self.world
        return out


class Striped(Layout):
    name = "striped"

    def _segments(self, rank, seq_len, docs):
        return [Segment(rank, seq_len // self.world, self.world, 0)]


def _pairs(a: int, b: int) -> int:
    """Causal attention pairs of a document's tokens at positions ``[a, b)``: ``sum(position + 1)``."""
    return (b * (b + 1) - a * (a + 1)) // 2


def _first_within(end: int, room: float) -> int:
    """The smallest ``m >= 0`` with ``_pairs(m, end) <= room`` (the longest tail of ``[0, end)`` that fits)."""
    need = end * (end + 1) - 2 * room  # m (m + 1) >= need
    if need <= 0:
        return 0
    m = max(0, (math.isqrt(int(4 * need) + 1) - 1) // 2)
    while m * (m + 1) < need:
        m += 1
    return min(m, end)


#: Every rank's token ranges ``[a, b)``.
Pieces = tuple[tuple[tuple[int, int], ...], ...]


@functools.lru_cache(maxsize=64)
def balanced_pieces(world: int, seq_len: int, docs: tuple[int, ...] | None) -> Pieces:
    """Global token ranges ``[a, b)`` each rank holds under ``"balanced"``, in local order (see :class:`Balanced`)."""
    bounds = docs or (0, seq_len)
    cap = seq_len // world
    lengths = [(b - a, a) for a, b in itertools.pairwise(bounds)]
    target = sum(_pairs(0, n) for n, _ in lengths) / world
    tokens, work = [0] * world, [0] * world
    pieces: list[list[tuple[int, int]]] = [[] for _ in range(world)]

    def put(rank: int, start: int, a: int, b: int) -> None:
        if a < b:
            pieces[rank].append((start + a, start + b))
            tokens[rank] += b - a
            work[rank] += _pairs(a, b)

    order = sorted(lengths, key=lambda d: (-d[0], d[1]))
    # Long documents: longer than a rank's share, or heavier than the work a rank has left once the longer ones
    # are spread (each one taken lowers what is left, so this is a fixed point, longest first).
    long: list[tuple[int, int]] = []
    room = target
    for n, start in order if world > 1 else ():
        if n > cap or _pairs(0, n) > room:
            long.append((n, start))
            room -= _pairs(0, n) / world
    for n, start in long:
        # Zigzag over all ranks: rank r's head chunk among the heads in rank order, its tail among the tails in
        # reverse order; an uneven remainder goes to the ranks with the fewest tokens.
        share = [n // world] * world
        for r in sorted(range(world), key=lambda r: (tokens[r], r))[: n % world]:
            share[r] += 1
        heads = [x // 2 for x in share]
        cursor = 0
        for r in range(world):
            put(r, start, cursor, cursor + heads[r])
            cursor += heads[r]
        for r in reversed(range(world)):
            put(r, start, cursor, cursor + share[r] - heads[r])
            cursor += share[r] - heads[r]
    taken = set(long)
    for n, start in order:
        if (n, start) in taken:
            continue
        end = n
        while end > 0:
            fits = [r for r in range(world) if tokens[r] + end <= cap]
            if fits:  # whole onto the least-loaded rank on both measures (after placing it)
                whole = _pairs(0, end)
                rank = min(fits, key=lambda r: (max((work[r] + whole) / max(target, 1), (tokens[r] + end) / cap),
                                                tokens[r], r))
                put(rank, start, 0, end)
                break
            # Cut to fill: the tail fills the rank with the most room, the head is placed next (and travels).
            rank = max(range(world), key=lambda r: (cap - tokens[r], -r))
            m = end - (cap - tokens[rank])
            put(rank, start, m, end)
            end = m
    if tokens != [cap] * world:
        raise AssertionError(f"balanced placement left ranks with {tokens} tokens, not {cap} each")
    return _rows_order(pieces, bounds)


def _rows_order(pieces: list[list[tuple[int, int]]], bounds: tuple[int, ...]) -> Pieces:
    """Every rank's pieces in the local order its ring steps read as runs of consecutive rows.

    At a step against another rank's keys only the pieces that see keys elsewhere have work: a split document's
    head and tail, a cut document's later piece. Putting them after every piece that sees nothing remote (home
    documents, the first chunk of a document), heads before tails, makes the queries of a step one run of local
    rows, so that a packed launch reads them as views instead of gathering them; the sent buffers keep this order
    (:class:`Travel`), so the keys of a step are runs too. Classes, each in global order: 0 sees no remote key
    (the first zigzag chunk last: rank 0's heads, which others read as a run); 1 sees one and is followed by a
    piece of its document on this rank (a zigzag head); 2 sees one after a piece of its document here (a zigzag
    tail); 3 sees one, alone on this rank (a cut document's tail); 4 is seen elsewhere but sees nothing remote,
    alone here (a cut document's head: after the tails, so that the tails' run against another rank's tails goes
    on into it). A document of more than :data:`~hf_ringcp.ring.plan.DENSE_ROWS` tokens here (home, or a split
    one's pieces side by side) comes before all of them: its calls run alone on the dense kernel anyway (a split
    one's head and tail side by side make one call instead of two), and first it breaks no run of the others.
    """
    doc = lambda a: bisect.bisect_right(bounds, a) - 1
    holders: dict[int, list[tuple[int, int]]] = {}
    for r, mine in enumerate(pieces):
        for a, _ in mine:
            holders.setdefault(doc(a), []).append((a, r))
    out = []
    for r, mine in enumerate(pieces):
        here: dict[int, list[int]] = {}
        held: dict[int, int] = {}
        for a, b in sorted(mine):
            here.setdefault(doc(a), []).append(a)
            held[doc(a)] = held.get(doc(a), 0) + b - a
        keys = {}
        for d, starts in here.items():
            elsewhere = min((a for a, owner in holders[d] if owner != r), default=None)
            for a in starts:
                if held[d] > DENSE_ROWS and (elsewhere is None or len(starts) > 1):
                    keys[a] = (-1, 0, starts[0], a)  # a large document: its pieces side by side, first
                elif elsewhere is not None and elsewhere > a and len(starts) == 1:
                    keys[a] = (4, 0, a, a)  # a cut document's head: last, after the pieces that read such heads
                elif elsewhere is None or elsewhere > a:
                    keys[a] = (0, int(a < starts[-1]), a, a)
                elif len(starts) == 1:
                    keys[a] = (3, 0, a, a)
                else:
                    keys[a] = (1 if a < starts[-1] else 2, 1, a, a)
        out.append(tuple(sorted(mine, key=lambda p: keys[p[0]])))
    return tuple(out)


class Balanced(ZigzagGlobal):
    """Packed rows: documents stay whole on a rank where they can; only long ones are split.

    The sharding contract: every rank holds ``S / P`` tokens (``S`` divisible by ``2P``, like ``"zigzag_global"``;
    :mod:`hf_ringcp.integrations.batch` stretches the last document) and, as nearly as the documents allow, the
    same causal work ``sum(position + 1)`` over its tokens (positions within their documents). Built by
    :func:`balanced_pieces`, the same on every rank (a pure function of the documents):

    1. long documents are zigzagged over all ranks: those longer than a rank's share, and, longest first, those
       heavier than the work a rank has left once the longer ones are spread (so a row of one document is placed
       exactly as ``"zigzag"`` places it);
    2. the others, longest first, go whole onto the least-loaded rank on both measures (tokens and work);
    3. a document that fits no rank's remaining tokens is cut: its tail fills the rank with the most room, its
       head is placed the same way next.

    A rank's segments are in the order of :func:`_rows_order` (what sees nothing remote first, then heads, then
    tails: each ring step's queries are one run of rows), and the buffers a ring sends keep it. Under a causal
    mask a document held by one rank is seen by no other, so a ring sends only the pieces of split documents
    (:class:`Travel`); with no long document and sizes that balance, nothing at all. With ``P = 2`` and documents
    ``A`` (8 tokens), ``B`` (4), ``C`` (4), ``D`` (16), ``A`` and ``D`` are heavier than what a rank can hold whole,
    so they are zigzagged; ``B`` and ``C`` stay home (rank 0's local rows: ``B``, ``A``'s and ``D``'s heads, then
    their tails)::

        row     | A A A A A A A A | B B B B | C C C C | D D D D D D D D D D D D D D D D |
        rank 0  | 0 0 . . . . 0 0 | 0 0 0 0 | . . . . | 0 0 0 0 . . . . . . . . 0 0 0 0 |  16 tokens, work 96
        rank 1  | . . 1 1 1 1 . . | . . . . | 1 1 1 1 | . . . . 1 1 1 1 1 1 1 1 . . . . |  16 tokens, work 96

    (work: ``sum(position + 1)`` over a rank's tokens, positions within their documents.)
    """

    name = "balanced"
    sends_seen_rows_only = True

    def _segments(self, rank, seq_len, docs):
        out, row = [], 0
        for a, b in balanced_pieces(self.world, seq_len, docs)[rank]:
            out.append(Segment(a, b - a, 1, row))
            row += b - a
        return out


LAYOUTS = Layout.names()


# ------------------------------------------------------------------------------------ public functions


def local_positions(
    seq_len: int, layout: str, rank: int, world_size: int, device: torch.device | str | None = None,
    cu_seqlens: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Global token indices held by ``rank`` (shape ``[seq_len / P]``), e.g. for RoPE position ids.

    With packed documents (``cu_seqlens``) these are indices into the packed row; the RoPE position of a token is
    its index within its document.
    """
    return Layout.for_name(layout, world_size).placement(seq_len, cu_seqlens).positions(rank, device)


def rank_major_order(
    seq_len: int, layout: str, world_size: int, device=None, cu_seqlens: Sequence[int] | None = None
) -> torch.Tensor:
    """Permutation ``perm`` with ``x_rank_major = x_global.index_select(dim, perm)`` (an all-gather's order)."""
    return Layout.for_name(layout, world_size).placement(seq_len, cu_seqlens).rank_major.to(device)


def shard_sequence(
    x: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None, layout: str = "zigzag",
    cu_seqlens: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Return this rank's part of the full tensor ``x`` along ``dim`` (no communication).

    Args:
        x: the full, unsharded tensor; ``x.shape[dim]`` is the global sequence length ``S``.
        dim: the sequence dimension.
        group: the context-parallel process group (``None``: the default group; a world of 1 when no
            process group is initialised).
        layout: a name from :data:`LAYOUTS` (``"zigzag"``: ``S`` divisible by ``2P``, or each document when
            ``cu_seqlens`` is given; ``"contiguous"``/``"striped"``: ``S`` divisible by ``P``).
        cu_seqlens: document boundaries ``[0, ..., S]`` of a packed sequence (flash-attention convention).

    Returns:
        A tensor with ``S / P`` entries along ``dim``. A view when the rank holds one contiguous range,
        otherwise a new tensor; differentiable either way.
    """
    rank, world = group_rank_and_size(group)
    dim = dim % x.dim()
    placement = Layout.for_name(layout, world).placement(x.shape[dim], cu_seqlens)
    segments = placement.segments(rank)
    if len(segments) == 1 and segments[0].stride == 1:
        return x.narrow(dim, segments[0].start, segments[0].length)
    return x.index_select(dim, placement.positions(rank, x.device))


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along ``dim``; backward keeps this rank's slice of the gradient.

    The backward does not sum gradients over ranks: :func:`unshard_sequence` is used where every rank computes
    the same function of the full tensor (e.g. logits comparison), so each rank's gradient for its own slice
    is already complete.
    """

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, dim: int, group, layout: str, docs) -> torch.Tensor:
        _, world = group_rank_and_size(group)
        ctx.dim, ctx.group, ctx.layout, ctx.docs = dim, group, layout, docs
        moved = x_local.movedim(dim, 0).contiguous()
        gathered = torch.empty((world * moved.shape[0], *moved.shape[1:]), dtype=moved.dtype, device=moved.device)
        all_gather_single(gathered, moved, group=group)
        placement = Layout.for_name(layout, world).placement(gathered.shape[0], docs)
        return gathered.index_select(0, placement.inverse_rank_major.to(gathered.device)).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return shard_sequence(grad, ctx.dim, ctx.group, ctx.layout, ctx.docs), None, None, None, None


def unshard_sequence(
    x_local: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None, layout: str = "zigzag",
    cu_seqlens: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: all-gather every rank's part and restore global order.

    Every rank returns the full tensor. Differentiable: the gradient of the result flows back to this rank's
    slice (see :class:`_AllGatherSeq`).
    """
    dim = dim % x_local.dim()
    _, world = group_rank_and_size(group)
    Layout.for_name(layout, world)  # validates the name
    if world == 1:
        return x_local
    docs = None if cu_seqlens is None else tuple(int(v) for v in (
        cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens))
    return _AllGatherSeq.apply(x_local, dim, group, layout, docs)
