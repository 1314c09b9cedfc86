"""Running a rank's planned kernel calls against one K/V buffer, forward and backward.

Both ring variants (pass-KV and all-gather) differ only in how K/V reach a rank; the per-block work is here.

Layout: the float32 accumulators are allocated with the strides of ``q`` (``empty_like``), and the backward
brings ``dout`` to them once (:func:`like`), so that a row slice of ``q``, ``out`` and ``dout`` always has the
same strides: the kernels then need no per-call copies (flash attention copies ``out``/``dout`` unless they are
laid out like ``q``; cuDNN's cached backward graph requires it).
"""

from __future__ import annotations

import torch

from hf_ringcp.ring.kernels import Backend, block_backward, block_forward
from hf_ringcp.ring.merge import merge_into
from hf_ringcp.ring.plan import BlockCall


def like(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` (cast to ``dtype``) with the strides of ``ref``; ``x`` itself when it already has them."""
    dtype = x.dtype if dtype is None else dtype
    if x.dtype == dtype and x.stride() == ref.stride():
        return x
    return torch.empty_like(ref, dtype=dtype).copy_(x)


class _ChunkWrites:
    """Which chunks of a row-chunked buffer have been written, so a first write can copy instead of combine.

    Copying the first block into a chunk saves zero-filling the buffer and one read per first write.
    """

    def __init__(self, num_rows: int, chunk_len: int) -> None:
        self.chunk_len = chunk_len
        self.touched = [False] * (num_rows // chunk_len)

    def segments(self, rows: slice) -> list[tuple[slice, slice, bool]]:
        """Mark ``rows`` written; return ``(buffer rows, rows of the written block, first write?)`` pieces.

        One piece when every chunk of ``rows`` is in the same state, else one per chunk.
        """
        c = self.chunk_len
        first, last = rows.start // c, rows.stop // c
        seen = self.touched[first:last]
        self.touched[first:last] = [True] * (last - first)
        if all(seen) or not any(seen):
            return [(rows, slice(0, rows.stop - rows.start), not any(seen))]
        return [
            (slice(a * c, (a + 1) * c), slice((a - first) * c, (a - first + 1) * c), not seen[a - first])
            for a in range(first, last)
        ]

    def untouched(self) -> list[slice]:
        c = self.chunk_len
        return [slice(a * c, (a + 1) * c) for a, seen in enumerate(self.touched) if not seen]


class OutputAccumulator:
    """A rank's running attention output and LSE in float32, merged block by block.

    The first block to reach a query chunk is copied, later ones merged, so no zero-initialised pass is paid.
    """

    def __init__(self, q: torch.Tensor, chunk_len: int) -> None:
        self.out = torch.empty_like(q, dtype=torch.float32)
        self.lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        self.writes = _ChunkWrites(q.shape[2], chunk_len)

    def add(self, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        for dst, src, first in self.writes.segments(rows):
            if first:
                self.out[:, :, dst].copy_(out[:, :, src])
                self.lse[:, :, dst].copy_(lse[:, :, src])
            else:
                merge_into(self.out[:, :, dst], self.lse[:, :, dst], out[:, :, src], lse[:, :, src])

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.writes.untouched():
            raise AssertionError("some query rows attended to no key; the block plan is incomplete")
        return self.out.to(dtype), self.lse


def forward_calls(
    calls: list[BlockCall], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: OutputAccumulator,
    backend: Backend, scale: float,
) -> None:
    """Attend ``q``'s planned rows to the planned rows of the buffer ``k``/``v`` and merge into ``acc``."""
    for c in calls:
        out, lse = block_forward(backend, q[:, :, c.q], k[:, :, c.kv], v[:, :, c.kv], c.causal, scale)
        acc.add(c.q, out, lse)


class RowAccumulator:
    """A float32 buffer filled by row ranges (dim -2) in chunks: the first write to a chunk copies, later ones add.

    Replaces a zero-filled buffer plus ``+=`` (one pass over the buffer less, and one read less per first write);
    :meth:`result` zero-fills the chunks nothing wrote.
    """

    def __init__(self, buf: torch.Tensor, chunk_len: int) -> None:
        self.buf = buf
        self.writes = _ChunkWrites(buf.shape[-2], chunk_len)

    def add(self, rows: slice, x: torch.Tensor) -> None:
        for dst, src, first in self.writes.segments(rows):
            if first:
                self.buf[..., dst, :].copy_(x[..., src, :])
            else:
                self.buf[..., dst, :] += x[..., src, :]

    def result(self) -> torch.Tensor:
        for rows in self.writes.untouched():
            self.buf[..., rows, :].zero_()
        return self.buf


def backward_kernels(
    calls: list[BlockCall], dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor | RowAccumulator, backend: Backend, scale: float,
) -> list[tuple[BlockCall, torch.Tensor, torch.Tensor]]:
    """Run the planned blocks' backward kernels, add into ``dq``; return each call's ``dk``, ``dv`` (``Hkv`` heads).

    The K/V gradients are returned rather than added so that a ring can wait for the incoming dK/dV accumulator
    between the kernels and the additions (:func:`add_kv_grads`), or file them by chunk.
    """
    grads = []
    for c in calls:
        bdq, bdk, bdv = block_backward(
            backend, dout[:, :, c.q], q[:, :, c.q], k[:, :, c.kv], v[:, :, c.kv], out[:, :, c.q], lse[:, :, c.q],
            c.causal, scale,
        )
        _add_rows(dq, c.q, bdq)
        grads.append((c, bdk, bdv))
    return grads


def add_kv_grads(
    grads: list[tuple[BlockCall, torch.Tensor, torch.Tensor]], dk: torch.Tensor | RowAccumulator,
    dv: torch.Tensor | RowAccumulator,
) -> None:
    """Add the blocks' ``dk``/``dv`` into float32 buffer accumulators (tensors or :class:`RowAccumulator`)."""
    for c, bdk, bdv in grads:
        _add_rows(dk, c.kv, bdk)
        _add_rows(dv, c.kv, bdv)


def _add_rows(acc: torch.Tensor | RowAccumulator, rows: slice, x: torch.Tensor) -> None:
    if isinstance(acc, RowAccumulator):
        acc.add(rows, x)
    else:
        acc[:, :, rows] += x


def backward_calls(
    calls: list[BlockCall], dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    backend: Backend, scale: float,
) -> None:
    """Add the planned blocks' gradients into the float32 accumulators ``dq`` (local) and ``dk``/``dv`` (buffer)."""
    add_kv_grads(backward_kernels(calls, dout, q, k, v, out, lse, dq, backend, scale), dk, dv)
