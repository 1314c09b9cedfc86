"""All-gather ring attention (Llama-3 style): gather K/V once, then attend locally in a few large calls.

The all-gather runs asynchronously while the rank attends to its own K/V (which needs no communication);
then each query chunk attends to the gathered chunks it may see, with neighbouring query chunks that see the
same run of keys sharing one call. The backward gathers K/V again (keeping the gathered copy alive between
forward and backward would cost ``P`` times the local K/V per layer) and reduce-scatters dK/dV to their owners.

:func:`allgather_forward` / :func:`allgather_backward` are one rank's whole work given its rank, the world size
and a :class:`GatherComm`; ``benchmarks/ring_sim.py`` passes a stand-in that hands over every rank's K/V.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ringcp.ring.blocks import OutputAccumulator, RowAccumulator, backward_kernels, forward_calls, like
from hf_ringcp.ring.group import group_rank_and_size
from hf_ringcp.ring.kernels import Backend
from hf_ringcp.ring.layout import num_chunks, rank_chunks
from hf_ringcp.ring.plan import plan_block


class GatherComm:
    """The two collectives of the all-gather variant over ``group``."""

    def __init__(self, group: dist.ProcessGroup | None, world: int) -> None:
        self.group = group
        self.world = world

    def start_gather(self, kv: torch.Tensor) -> tuple[torch.Tensor, dist.Work]:
        """Start gathering every rank's ``kv``; returns ``([P, *kv.shape] buffer, work)``; wait before reading."""
        gathered = torch.empty((self.world, *kv.shape), dtype=kv.dtype, device=kv.device)
        flat = gathered.view(self.world * kv.shape[0], *kv.shape[1:])
        work = dist.all_gather_into_tensor(flat, kv, group=self.group, async_op=True)
        return gathered, work

    def reduce_scatter(self, out: torch.Tensor, per_rank: torch.Tensor) -> None:
        """``out`` (like ``per_rank[0]``) <- the sum over ranks of their ``per_rank[this rank]``."""
        dist.reduce_scatter_tensor(out, per_rank.view(-1, *per_rank.shape[2:]), group=self.group)


def _chunk_moves(layout: str, world: int, chunk_len: int):
    """``(rank, local rows, global rows)`` of every chunk: where each rank's local part sits in the sequence."""
    for r in range(world):
        for slot, c in enumerate(rank_chunks(layout, r, world)):
            yield r, slice(slot * chunk_len, (slot + 1) * chunk_len), slice(c * chunk_len, (c + 1) * chunk_len)


def _to_global_order(gathered: torch.Tensor, layout: str, world: int, chunk_len: int) -> torch.Tensor:
    """``[P, 2, B, H, S_local, D]`` rank-major -> ``[2, B, H, S, D]`` in global order (one copy per chunk)."""
    p, two, b, h, s_local, d = gathered.shape
    full = torch.empty((two, b, h, p * s_local, d), dtype=gathered.dtype, device=gathered.device)
    for r, local, rows in _chunk_moves(layout, world, chunk_len):
        full[:, :, :, rows].copy_(gathered[r, :, :, :, local])
    return full


class _RankMajorKVGrads:
    """Float32 dK/dV of every chunk of the sequence, filed straight into the rank-major ``[P, 2, B, H, S_local, D]``
    layout that the reduce-scatter takes (no full-sequence buffer, no reordering pass, no zero-fill of written
    chunks): the first gradient for a chunk is copied, later ones added; :meth:`result` zero-fills the rest.
    """

    def __init__(self, kv: torch.Tensor, layout: str, world: int, chunk_len: int) -> None:
        self.buf = torch.empty((world, *kv.shape), dtype=torch.float32, device=kv.device)
        # global chunk -> (owning rank, its rows there)
        self.slot = {rows.start // chunk_len: (r, local) for r, local, rows in _chunk_moves(layout, world, chunk_len)}
        self.chunk_len = chunk_len
        self.touched: set[int] = set()

    def add(self, chunks: tuple[int, ...], dk: torch.Tensor, dv: torch.Tensor) -> None:
        """``dk``/``dv`` ``[B, H, len(chunks) * chunk_len, D]`` cover the global ``chunks`` in order."""
        for i, c in enumerate(chunks):
            r, local = self.slot[c]
            part = slice(i * self.chunk_len, (i + 1) * self.chunk_len)
            for j, g in ((0, dk), (1, dv)):
                dst = self.buf[r, j, :, :, local]
                if c in self.touched:
                    dst += g[:, :, part]
                else:
                    dst.copy_(g[:, :, part])
            self.touched.add(c)

    def result(self) -> torch.Tensor:
        for c, (r, local) in self.slot.items():
            if c not in self.touched:
                self.buf[r, :, :, :, local].zero_()
        return self.buf


def _plans(rank: int, world: int, layout: str, chunk_len: int, causal: bool):
    mine = rank_chunks(layout, rank, world)
    own = plan_block(mine, mine, chunk_len, causal)
    everything = tuple(range(num_chunks(layout, world)))
    rest = plan_block(mine, everything, chunk_len, causal, skip_kv=frozenset(mine))
    return own, rest


def allgather_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, world: int, comm: GatherComm | None,
    causal: bool, scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's forward (``comm`` is ``None`` when ``world == 1``)."""
    chunk_len = q.shape[2] // len(rank_chunks(layout, rank, world))
    own, rest = _plans(rank, world, layout, chunk_len, causal)
    kv = torch.stack([k, v])
    if world > 1:
        gathered, work = comm.start_gather(kv)
    acc = OutputAccumulator(q, chunk_len)
    forward_calls(own, q, k, v, acc, backend, scale)
    if world > 1:
        work.wait()
        full = _to_global_order(gathered, layout, world, chunk_len)
        forward_calls(rest, q, full[0], full[1], acc, backend, scale)
    return acc.result(q.dtype)


def allgather_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    rank: int, world: int, comm: GatherComm | None, causal: bool, scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's backward (``comm`` is ``None`` when ``world == 1``)."""
    chunk_len = q.shape[2] // len(rank_chunks(layout, rank, world))
    own, rest = _plans(rank, world, layout, chunk_len, causal)
    dout, out = like(dout, q), like(out, q)
    kv = torch.stack([k, v])
    if world > 1:
        gathered, work = comm.start_gather(kv)
    dq = RowAccumulator(torch.empty_like(q, dtype=torch.float32), chunk_len)
    dkv = _RankMajorKVGrads(kv, layout, world, chunk_len)  # this rank's share of every chunk's dK/dV
    for c, bdk, bdv in backward_kernels(own, dout, q, k, v, out, lse, dq, backend, scale):
        dkv.add(c.kv_chunks, bdk, bdv)
    if world > 1:
        work.wait()
        full = _to_global_order(gathered, layout, world, chunk_len)
        for c, bdk, bdv in backward_kernels(rest, dout, q, full[0], full[1], out, lse, dq, backend, scale):
            dkv.add(c.kv_chunks, bdk, bdv)
        mine = torch.empty(kv.shape, dtype=torch.float32, device=kv.device)
        comm.reduce_scatter(mine, dkv.result())
    else:
        mine = dkv.result()[0]
    return dq.result().to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)


def ring_allgather_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, causal: bool,
    scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return this rank's ``(out [B, Hq, S_local, D] in q.dtype, lse [B, Hq, S_local] float32)``."""
    rank, world = group_rank_and_size(group)
    comm = GatherComm(group, world) if world > 1 else None
    return allgather_forward(q, k, v, rank, world, comm, causal, scale, layout, backend)


def ring_allgather_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    group: dist.ProcessGroup | None, causal: bool, scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(dq, dk, dv)`` for this rank's ``q``, ``k``, ``v``, in their dtypes."""
    rank, world = group_rank_and_size(group)
    comm = GatherComm(group, world) if world > 1 else None
    return allgather_backward(dout, q, k, v, out, lse, rank, world, comm, causal, scale, layout, backend)


class RingAllGatherAttention(torch.autograd.Function):
    """Autograd wrapper: saves the local inputs, the output and the LSE; the backward gathers K/V again."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, backend):
        out, lse = ring_allgather_forward(q, k, v, group, causal, scale, layout, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, scale, layout, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_allgather_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None
