"""All-gather ring attention without merges: one call per query segment over its gathered prefix.

With every rank's K/V gathered into global order, a query segment of a causal, single-document sequence held in
stride-1 segments (zigzag, zigzag_global, contiguous) sees exactly the keys ``[0, stop)`` of the buffer, ``stop``
one past its last token, with the diagonal at the bottom right of that block. So each segment is ONE kernel call
with a bottom-right-aligned causal mask (``Sq <= Sk``): a zigzag rank makes two calls per direction, and their
outputs and LSEs are final: no float32 accumulator, no LSE merge, no dQ accumulation (each query row is written
by one call). The K/V gradients of the two calls overlap on the shorter prefix and are summed in float32 straight
into the rank-major buffer the reduce-scatter takes.

Kernels: those that align ``causal`` bottom-right natively (:func:`~hf_ringcp.ring.kernels.aligns_bottom_right`:
flash, and cuDNN where the probe finds it so: not with torch 2.11 / cuDNN 9.19) get ``causal=True``; on CPU the
kernels get the explicit mask (:func:`~hf_ringcp.ring.kernels.bottom_right_mask`), which is how the path is proven
exact against :class:`~hf_ringcp.ring.allgather.AllGatherRing` (``tests/ring/test_allgather_prefix.py``); on CUDA a
kernel without the native alignment is refused (the masked kernel was 5-8x slower, and its backward wrong).

Against :class:`~hf_ringcp.ring.allgather.AllGatherRing`: the gather is not overlapped with the rank's own block
(each call reads gathered and own keys together), and the gathered K/V is copied into global order once per
direction (``moves``). Dispatch: :func:`applies` (the mask and placement) and :func:`preferred` (the
kernel choice); :func:`hf_ringcp.ring.allgather.build` takes this variant when both hold.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import torch

from hf_ringcp.ring.allgather import RankMajorKVGrads
from hf_ringcp.ring.blocks import like
from hf_ringcp.ring.comm import GatherComm
from hf_ringcp.ring.kernels import (
    Backend,
    aligns_bottom_right,
    block_backward,
    block_forward,
    bottom_right_mask,
    select_backend,
)
from hf_ringcp.ring.plan import Segment
from hf_ringcp.ring.variant import RankSetup, Variant


def applies(setup: RankSetup) -> bool:
    """Whether every query segment of this rank sees exactly a prefix of the global sequence."""
    m = setup.mask
    one_document = m.documents is None or len(m.documents) == 2
    stride_one = all(s.stride == 1 for r in range(setup.world) for s in setup.placement.segments(r))
    return m.causal and m.window is None and one_document and stride_one


def preferred(setup: RankSetup, device: torch.device | str) -> bool:
    """Whether the dispatch takes this variant: it applies, and the plain kernel masks bottom-right natively
    (an explicit ``[Sq, S]`` mask per call would cost more than the merges it saves)."""
    return applies(setup) and aligns_bottom_right(setup.kernels.plain, device)


class AllGatherPrefix(Variant):
    """All-gather variant with one bottom-right causal call per query segment; ``comm`` makes the GatherComm."""

    def __init__(self, setup: RankSetup, comm: Callable[[], GatherComm] | None) -> None:
        if not applies(setup):
            raise AssertionError("AllGatherPrefix needs a causal single-document mask without a window and "
                                 "stride-1 segments")
        super().__init__(setup)
        self.comm = comm

    @cached_property
    def segments(self) -> tuple[Segment, ...]:
        """This rank's query segments, longest prefix first (its K/V gradients are copied, the others added)."""
        return tuple(sorted(self.setup.own, key=lambda s: -s.stop))

    @cached_property
    def prefix(self) -> int:
        """Global rows of the buffer any call reads: ``[0, prefix)``."""
        return max(s.stop for s in self.setup.own)

    @cached_property
    def moves(self) -> tuple[tuple[int, int, int, int], ...]:
        """``(rank, local row, buffer row, length)`` of every part inside ``[0, prefix)`` (this rank's included)."""
        out = []
        for r, local, row, n in self.setup.placement.moves(global_order=True):
            n = min(n, self.prefix - row)
            if n > 0:
                out.append((r, local, row, n))
        return tuple(out)

    def _buffer(self, gathered: torch.Tensor) -> torch.Tensor:
        """``[P, 2, B, H, S_local, D]`` rank-major -> ``[2, B, H, prefix, D]`` in global order."""
        _, two, b, h, _, d = gathered.shape
        full = torch.empty((two, b, h, self.prefix, d), dtype=gathered.dtype, device=gathered.device)
        for r, local, row, n in self.moves:
            full[:, :, :, row : row + n].copy_(gathered[r, :, :, :, local : local + n])
        return full

    def _gather(self, kv: torch.Tensor) -> tuple[torch.Tensor, GatherComm | None]:
        if self.setup.world == 1:
            return kv[None], None
        comm = self.comm()
        gathered, work = comm.start_gather(kv)
        work.wait()
        return gathered, comm

    def _kernel(self, s: Segment, q: torch.Tensor, k: torch.Tensor) -> tuple[Backend, bool, torch.Tensor | None]:
        """``(backend, causal, bias)`` for the call of segment ``s``: the plain kernel's native alignment, or an
        explicit mask through a kernel that takes one."""
        plain = self.setup.kernels.plain
        if aligns_bottom_right(plain, q.device):
            return plain, True, None
        if q.is_cuda:  # an [Sq, S] mask through the efficient kernel: 5-8x slower (and its backward was wrong)
            raise ValueError(f"AllGatherPrefix needs a kernel that aligns causal masks bottom-right on CUDA; "
                             f"{plain.name} does not here. Use backend='flash', or the planned all-gather.")
        backend = plain if plain.masks else select_backend("auto", q, k, masked=True)
        return backend, False, bottom_right_mask(s.length, s.stop, q.dtype, q.device)

    def attend(self, q, k, v):
        s = self.setup
        gathered, _ = self._gather(torch.stack([k, v]))
        full = self._buffer(gathered)
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        for seg in self.segments:
            rows = slice(seg.row, seg.stop_row)
            backend, causal, bias = self._kernel(seg, q, k)
            o, block_lse = block_forward(backend, q[:, :, rows], full[0][:, :, : seg.stop],
                                         full[1][:, :, : seg.stop], causal, s.scale, bias)
            out[:, :, rows] = o
            lse[:, :, rows] = block_lse
        return out, lse

    def attend_backward(self, dout, q, k, v, out, lse):
        s = self.setup
        dout, out = like(dout, q), like(out, q)
        kv = torch.stack([k, v])
        gathered, comm = self._gather(kv)
        full = self._buffer(gathered)
        dq = torch.empty_like(q)
        dkv = RankMajorKVGrads(kv, s.world, self.moves)
        for seg in self.segments:
            rows = slice(seg.row, seg.stop_row)
            backend, causal, bias = self._kernel(seg, q, k)
            bdq, bdk, bdv = block_backward(backend, dout[:, :, rows], q[:, :, rows],
                                           full[0][:, :, : seg.stop], full[1][:, :, : seg.stop], out[:, :, rows],
                                           lse[:, :, rows], causal, s.scale, bias)
            dq[:, :, rows] = bdq
            dkv.add(slice(0, seg.stop), bdk, bdv)
        if comm is not None:
            mine = torch.empty(kv.shape, dtype=torch.float32, device=kv.device)
            comm.reduce_scatter(mine, dkv.result())
        else:
            mine = dkv.result()[0]
        return dq, mine[0].to(k.dtype), mine[1].to(v.dtype)
