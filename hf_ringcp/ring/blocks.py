"""Running a rank's planned kernel calls against one K/V buffer, forward and backward.

Every variant (pass-KV, all-gather, Ulysses) differs only in how K/V reach a rank; the per-block work is here.

Layout: the float32 accumulators are allocated with the strides of ``q`` (``empty_like``), and the backward
brings ``dout`` to them once (:func:`like`), so that a row slice of ``q``, ``out`` and ``dout`` always has the
same strides: the kernels then need no per-call copies (flash attention copies ``out``/``dout`` unless they are
laid out like ``q``; cuDNN's cached backward graph requires it).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from hf_ringcp.ring.kernels import BACKENDS, Backend, additive_mask, block_backward, block_forward, select_backend
from hf_ringcp.ring.merge import merge_into
from hf_ringcp.ring.plan import BlockCall
from hf_ringcp.ring.varlen import FLASH_VARLEN, MIN_CALLS, PackedGroup, Varlen, pack_rows, plan_groups, unpack_rows


def like(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (cast to ``dtype``) with the strides of ``ref``; ``x`` itself when it already has them."""
    dtype = x.dtype if dtype is None else dtype
    if x.dtype == dtype and x.stride() == ref.stride():
        return x
    return torch.empty_like(ref, dtype=dtype).copy_(x)


@dataclass(frozen=True)
class Kernels:
    """The block kernels of one attention call: ``plain`` for unmasked and causal blocks, ``masked`` for the
    masked edge blocks of a sliding window (``None`` when the plan has none), ``single`` for blocks of one query
    or one key where ``plain`` cannot take them (cuDNN refuses ``s_q = s_kv = 1``, and later calls can then fault:
    measured with torch 2.11 / cuDNN 9.19)."""

    plain: Backend
    masked: Backend | None = None
    single: Backend | None = None
    #: Runs many small calls of one kind as one variable-length call (:mod:`hf_ringcp.ring.varlen`); ``None``: off.
    varlen: Varlen | None = None

    @staticmethod
    def choose(name: str, q: torch.Tensor, k: torch.Tensor, needs_masks: bool) -> Kernels:
        plain = select_backend(name, q, k)
        single = None
        if plain.name == "cudnn":
            single = next(BACKENDS[n] for n in ("flash", "efficient", "math") if BACKENDS[n].supports(q, k) is None)
        masked = None
        if needs_masks:
            masked = plain if plain.masks else select_backend(name, q, k, masked=True)
        varlen = FLASH_VARLEN if plain.name in ("cudnn", "flash") and FLASH_VARLEN.supports(q, k) is None else None
        return Kernels(plain, masked, single, varlen)

    def groups(self, calls, q: torch.Tensor) -> tuple[tuple[PackedGroup, ...], tuple[BlockCall, ...]]:
        """The varlen groups of ``calls`` (with their packed indices) and the calls that run one by one."""
        calls = tuple(calls)
        if self.varlen is None or q.shape[0] != 1 or len(calls) < MIN_CALLS:
            return (), calls
        return plan_groups(calls, str(q.device))

    def for_call(self, c: BlockCall, q: torch.Tensor) -> tuple[Backend, torch.Tensor | None]:
        if c.kind != "band":
            one = c.q_end - c.q_start == 1 or c.kv_end - c.kv_start == 1
            return (self.single if one and self.single is not None else self.plain), None
        if self.masked is None:
            raise AssertionError("a masked block was planned but no masking kernel was chosen")
        visible = c.band_mask(q.device)
        if not bool(visible.any(-1).all()):
            raise AssertionError(f"the plan left query rows of {c} without a visible key")
        return self.masked, additive_mask(visible, q.dtype)


class RowWrites:
    """Which rows ``[0, n)`` of a buffer have been written: sorted disjoint intervals.

    Lets an accumulator copy the first block written to a row instead of combining it (no zero-filled buffer,
    one read less per first write), for any row ranges, aligned or not.
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._starts: list[int] = []
        self._stops: list[int] = []

    def split(self, start: int, stop: int) -> list[tuple[int, int, bool]]:
        """Mark ``[start, stop)`` written; return its pieces ``(a, b, first write?)`` in order."""
        if not 0 <= start < stop <= self.n:
            raise AssertionError(f"rows [{start}, {stop}) outside [0, {self.n})")
        i = bisect.bisect_right(self._stops, start)
        pieces, cursor = [], start
        j = i
        while j < len(self._starts) and self._starts[j] < stop:
            a, b = self._starts[j], self._stops[j]
            if a > cursor:
                pieces.append((cursor, a, True))
            pieces.append((max(a, cursor), min(b, stop), False))
            cursor = min(b, stop)
            j += 1
        if cursor < stop:
            pieces.append((cursor, stop, True))
        # Merge [start, stop) with the intervals it touches (including ones that just end or begin at it).
        lo = bisect.bisect_left(self._stops, start)
        hi = bisect.bisect_right(self._starts, stop)
        new_start = min([start, *self._starts[lo:hi]])
        new_stop = max([stop, *self._stops[lo:hi]])
        self._starts[lo:hi] = [new_start]
        self._stops[lo:hi] = [new_stop]
        return pieces

    def unwritten(self) -> list[tuple[int, int]]:
        gaps, cursor = [], 0
        for a, b in zip(self._starts, self._stops):
            if a > cursor:
                gaps.append((cursor, a))
            cursor = b
        if cursor < self.n:
            gaps.append((cursor, self.n))
        return gaps


class OutputAccumulator:
    """A rank's running attention output and LSE in float32, merged block by block.

    The first block to reach a query row is copied, later ones merged, so no zero-initialised pass is paid.
    """

    def __init__(self, q: torch.Tensor) -> None:
        self.out = torch.empty_like(q, dtype=torch.float32)
        self.lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        self.writes = RowWrites(q.shape[2])

    def add(self, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        for a, b, first in self.writes.split(rows.start, rows.stop):
            src = slice(a - rows.start, b - rows.start)
            if first:
                self.out[:, :, a:b].copy_(out[:, :, src])
                self.lse[:, :, a:b].copy_(lse[:, :, src])
            else:
                merge_into(self.out[:, :, a:b], self.lse[:, :, a:b], out[:, :, src], lse[:, :, src])

    def add_packed(self, ranges: list[tuple[int, int]], out: torch.Tensor, lse: torch.Tensor) -> None:
        """``out`` ``[B, H, T, D]`` / ``lse`` ``[B, H, T]`` hold the rows ``ranges`` (non-overlapping) back to back."""
        first, again = _split_ranges(self.writes, ranges, self.out.device)
        if first is not None:
            dst, src = first
            self.out.index_copy_(2, dst, out.index_select(2, src).to(self.out.dtype))
            self.lse.index_copy_(2, dst, lse.index_select(2, src))
        if again is not None:
            dst, src = again
            cur_out, cur_lse = self.out.index_select(2, dst), self.lse.index_select(2, dst)
            merge_into(cur_out, cur_lse, out.index_select(2, src), lse.index_select(2, src))
            self.out.index_copy_(2, dst, cur_out)
            self.lse.index_copy_(2, dst, cur_lse)

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        missing = self.writes.unwritten()
        if missing:
            raise AssertionError(f"query rows {missing} attended to no key; the block plan is incomplete")
        return self.out.to(dtype), self.lse


class RowAccumulator:
    """A float32 buffer filled by row ranges (dim -2): the first write to a row copies, later ones add.

    Replaces a zero-filled buffer plus ``+=`` (one pass over the buffer less, and one read less per first write);
    :meth:`result` zero-fills the rows nothing wrote.
    """

    def __init__(self, buf: torch.Tensor) -> None:
        self.buf = buf
        self.writes = RowWrites(buf.shape[-2])

    def add(self, rows: slice, x: torch.Tensor) -> None:
        for a, b, first in self.writes.split(rows.start, rows.stop):
            src = x[..., a - rows.start : b - rows.start, :]
            if first:
                self.buf[..., a:b, :].copy_(src)
            else:
                self.buf[..., a:b, :] += src

    def add_packed(self, ranges: list[tuple[int, int]], x: torch.Tensor, overlapping: bool = False) -> None:
        """``x`` ``[..., T, D]`` holds the rows ``ranges`` back to back; ``overlapping``: ranges may repeat rows."""
        dim = self.buf.dim() - 2
        first, again = _split_ranges(self.writes, ranges, self.buf.device)
        if overlapping:
            if first is not None:
                self.buf.index_fill_(dim, first[0], 0.0)
            self.buf.index_add_(dim, _arange_of(ranges, self.buf.device), x.to(self.buf.dtype))
            return
        if first is not None:
            self.buf.index_copy_(dim, first[0], x.index_select(dim, first[1]).to(self.buf.dtype))
        if again is not None:
            self.buf.index_add_(dim, again[0], x.index_select(dim, again[1]).to(self.buf.dtype))

    def result(self) -> torch.Tensor:
        for a, b in self.writes.unwritten():
            self.buf[..., a:b, :].zero_()
        return self.buf


def _arange_of(ranges: list[tuple[int, int]], device) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges]).to(device)


def _split_ranges(writes: RowWrites, ranges: list[tuple[int, int]], device):
    """Mark ``ranges`` written; return ``(dst rows, packed rows)`` index pairs of first and later writes (or None)."""
    first_dst, first_src, again_dst, again_src = [], [], [], []
    pos = 0
    for a, b in ranges:
        for x, y, is_first in writes.split(a, b):
            dst, src = (first_dst, first_src) if is_first else (again_dst, again_src)
            dst.append((x, y))
            src.append((pos + x - a, pos + y - a))
        pos += b - a
    first = (_arange_of(first_dst, device), _arange_of(first_src, device)) if first_dst else None
    again = (_arange_of(again_dst, device), _arange_of(again_src, device)) if again_dst else None
    return first, again


def forward_calls(
    calls: Iterable[BlockCall], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: OutputAccumulator,
    kernels: Kernels, scale: float,
) -> None:
    """Attend ``q``'s planned rows to the planned rows of the buffer ``k``/``v`` and merge into ``acc``."""
    groups, calls = kernels.groups(calls, q)
    for g in groups:
        out, lse = kernels.varlen.forward(pack_rows(q, g.q_index), pack_rows(k, g.kv_index), pack_rows(v, g.kv_index),
                                          g.cu_q, g.cu_k, g.max_q, g.max_k, g.causal, scale)
        acc.add_packed(g.q_ranges, unpack_rows(out), lse[None])
    for c in calls:
        backend, bias = kernels.for_call(c, q)
        out, lse = block_forward(backend, q[:, :, c.q], k[:, :, c.kv], v[:, :, c.kv], c.causal, scale, bias)
        acc.add(c.q, out, lse)


def backward_kernels(
    calls: Iterable[BlockCall], dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dq: RowAccumulator, kernels: Kernels, scale: float,
) -> list[tuple[BlockCall, torch.Tensor, torch.Tensor]]:
    """Run the planned blocks' backward kernels, add into ``dq``; return each call's ``dk``, ``dv`` (``Hkv`` heads).

    The K/V gradients are returned rather than added so that a ring can wait for the incoming dK/dV accumulator
    between the kernels and the additions (:func:`add_kv_grads`), or file them by segment (:func:`kv_pieces`).
    Varlen groups return ``(group, dk [1, Hkv, T, D], dv)`` with the group's K/V rows back to back.
    """
    grads: list = []
    groups, calls = kernels.groups(calls, q)
    for g in groups:
        packed = [pack_rows(x, g.q_index) for x in (dout, q)]
        kv = [pack_rows(x, g.kv_index) for x in (k, v)]
        bdq, bdk, bdv = kernels.varlen.backward(packed[0], packed[1], kv[0], kv[1], pack_rows(out, g.q_index),
                                                lse[0].index_select(1, g.q_index), g.cu_q, g.cu_k, g.max_q, g.max_k,
                                                g.causal, scale)
        dq.add_packed(g.q_ranges, unpack_rows(bdq))
        grads.append((g, unpack_rows(bdk), unpack_rows(bdv)))
    for c in calls:
        backend, bias = kernels.for_call(c, q)
        bdq, bdk, bdv = block_backward(
            backend, dout[:, :, c.q], q[:, :, c.q], k[:, :, c.kv], v[:, :, c.kv], out[:, :, c.q], lse[:, :, c.q],
            c.causal, scale, bias,
        )
        dq.add(c.q, bdq)
        grads.append((c, bdk, bdv))
    return grads


def add_kv_grads(
    grads: list[tuple[BlockCall, torch.Tensor, torch.Tensor]], dk: torch.Tensor | RowAccumulator,
    dv: torch.Tensor | RowAccumulator,
) -> None:
    """Add the blocks' ``dk``/``dv`` into float32 buffer accumulators (tensors or :class:`RowAccumulator`)."""
    for c, bdk, bdv in grads:
        for acc, x in ((dk, bdk), (dv, bdv)):
            if isinstance(c, PackedGroup):
                if isinstance(acc, RowAccumulator):
                    acc.add_packed(c.kv_ranges, x, overlapping=True)
                else:
                    acc.index_add_(2, c.kv_index, x.to(acc.dtype))
            elif isinstance(acc, RowAccumulator):
                acc.add(c.kv, x)
            else:
                acc[:, :, c.kv] += x


def kv_pieces(grads: list):
    """``(buffer rows, dk, dv)`` per call of :func:`backward_kernels`' result, varlen groups split by call."""
    for c, bdk, bdv in grads:
        if isinstance(c, PackedGroup):
            pos = 0
            for a, b in c.kv_ranges:
                yield slice(a, b), bdk[:, :, pos : pos + b - a], bdv[:, :, pos : pos + b - a]
                pos += b - a
        else:
            yield c.kv, bdk, bdv
