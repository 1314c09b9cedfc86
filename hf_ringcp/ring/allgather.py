"""All-gather ring attention (Llama-3 style): gather K/V once, then attend locally in a few large calls.

The all-gather runs asynchronously while the rank attends to its own K/V (which needs no communication);
then each query chunk attends to the gathered chunks it may see, with neighbouring query chunks that see the
same run of keys sharing one call. The backward gathers K/V again (keeping the gathered copy alive between
forward and backward would cost ``P`` times the local K/V per layer) and reduce-scatters dK/dV to their owners.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ringcp.ring.blocks import OutputAccumulator, backward_calls, forward_calls
from hf_ringcp.ring.group import group_rank_and_size
from hf_ringcp.ring.kernels import Backend
from hf_ringcp.ring.layout import num_chunks, rank_chunks, rank_major_order
from hf_ringcp.ring.plan import plan_block


def _start_gather(kv: torch.Tensor, group, world: int) -> tuple[torch.Tensor, dist.Work]:
    gathered = torch.empty((world, *kv.shape), dtype=kv.dtype, device=kv.device)
    flat = gathered.view(world * kv.shape[0], *kv.shape[1:])
    work = dist.all_gather_into_tensor(flat, kv, group=group, async_op=True)
    return gathered, work


def _to_global_order(gathered: torch.Tensor, layout: str, world: int) -> torch.Tensor:
    """``[P, 2, B, H, S_local, D]`` rank-major -> ``[2, B, H, S, D]`` in global sequence order."""
    p, two, b, h, s_local, d = gathered.shape
    rank_major = gathered.permute(1, 2, 3, 0, 4, 5).reshape(two, b, h, p * s_local, d)
    inverse = torch.argsort(rank_major_order(p * s_local, layout, world, device=gathered.device))
    return rank_major.index_select(3, inverse)


def _plans(rank: int, world: int, layout: str, chunk_len: int, causal: bool):
    mine = rank_chunks(layout, rank, world)
    own = plan_block(mine, mine, chunk_len, causal)
    everything = tuple(range(num_chunks(layout, world)))
    rest = plan_block(mine, everything, chunk_len, causal, skip_kv=frozenset(mine))
    return own, rest


def ring_allgather_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, causal: bool,
    scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return this rank's ``(out [B, Hq, S_local, D] in q.dtype, lse [B, Hq, S_local] float32)``."""
    rank, world = group_rank_and_size(group)
    chunk_len = q.shape[2] // len(rank_chunks(layout, rank, world))
    own, rest = _plans(rank, world, layout, chunk_len, causal)
    kv = torch.stack([k, v])
    if world > 1:
        gathered, work = _start_gather(kv, group, world)
    acc = OutputAccumulator(q, chunk_len)
    forward_calls(own, q, k, v, acc, backend, scale)
    if world > 1:
        work.wait()
        full = _to_global_order(gathered, layout, world)
        forward_calls(rest, q, full[0], full[1], acc, backend, scale)
    return acc.result(q.dtype)


def ring_allgather_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    group: dist.ProcessGroup | None, causal: bool, scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(dq, dk, dv)`` for this rank's ``q``, ``k``, ``v``, in their dtypes."""
    rank, world = group_rank_and_size(group)
    chunk_len = q.shape[2] // len(rank_chunks(layout, rank, world))
    own, rest = _plans(rank, world, layout, chunk_len, causal)
    kv = torch.stack([k, v])
    if world > 1:
        gathered, work = _start_gather(kv, group, world)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    backward_calls(own, dout, q, k, v, out, lse, dq, dkv[0], dkv[1], backend, scale)
    if world > 1:
        work.wait()
        full = _to_global_order(gathered, layout, world)
        dfull = torch.zeros(full.shape, dtype=torch.float32, device=full.device)
        backward_calls(rest, dout, q, full[0], full[1], out, lse, dq, dfull[0], dfull[1], backend, scale)
        seq_len = full.shape[3]
        order = rank_major_order(seq_len, layout, world, device=dfull.device)
        # [2, B, H, S, D] global -> [P, 2, B, H, S_local, D] rank-major, then sum each rank's part over ranks.
        per_rank = dfull.index_select(3, order).unflatten(3, (world, -1)).permute(3, 0, 1, 2, 4, 5).contiguous()
        mine = torch.empty(kv.shape, dtype=torch.float32, device=kv.device)
        dist.reduce_scatter_tensor(mine, per_rank.view(world * kv.shape[0], *kv.shape[1:]), group=group)
        dkv += mine
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


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
