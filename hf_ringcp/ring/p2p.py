"""Pass-KV ring attention: K/V blocks travel the ring by point-to-point transfers overlapped with compute.

At step ``s`` rank ``r`` holds the K/V of rank ``(r - s) mod P`` and sends it on while it computes with it.
The backward sends K/V the same way and, one step behind, the float32 dK/dV accumulator of each block, which
collects every rank's share and arrives back at the block's owner after ``P`` hops.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ringcp.ring.blocks import OutputAccumulator, backward_calls, forward_calls
from hf_ringcp.ring.comm import RingComm
from hf_ringcp.ring.group import group_rank_and_size
from hf_ringcp.ring.kernels import Backend
from hf_ringcp.ring.layout import rank_chunks
from hf_ringcp.ring.plan import plan_block


def _step_calls(rank: int, world: int, step: int, layout: str, chunk_len: int, causal: bool):
    src = (rank - step) % world
    return plan_block(rank_chunks(layout, rank, world), rank_chunks(layout, src, world), chunk_len, causal)


def ring_p2p_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, causal: bool,
    scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return this rank's ``(out [B, Hq, S_local, D] in q.dtype, lse [B, Hq, S_local] float32)``."""
    rank, world = group_rank_and_size(group)
    chunk_len = q.shape[2] // len(rank_chunks(layout, rank, world))
    comm = RingComm(group) if world > 1 else None
    kv = torch.stack([k, v])
    acc = OutputAccumulator(q, chunk_len)
    for step in range(world):
        last = step == world - 1
        if not last:
            next_kv = comm.send_recv(kv)
        forward_calls(_step_calls(rank, world, step, layout, chunk_len, causal), q, kv[0], kv[1], acc, backend, scale)
        if not last:
            comm.wait()
            kv = next_kv
    return acc.result(q.dtype)


def ring_p2p_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    group: dist.ProcessGroup | None, causal: bool, scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(dq, dk, dv)`` for this rank's ``q``, ``k``, ``v``, in their dtypes."""
    rank, world = group_rank_and_size(group)
    chunk_len = q.shape[2] // len(rank_chunks(layout, rank, world))
    kv_comm = RingComm(group) if world > 1 else None
    dkv_comm = RingComm(group) if world > 1 else None
    kv = torch.stack([k, v])
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    incoming = None
    for step in range(world):
        last = step == world - 1
        if not last:
            next_kv = kv_comm.send_recv(kv)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        calls = _step_calls(rank, world, step, layout, chunk_len, causal)
        backward_calls(calls, dout, q, kv[0], kv[1], out, lse, dq, dkv[0], dkv[1], backend, scale)
        if incoming is not None:
            dkv_comm.wait()
            dkv += incoming
        if world > 1:
            incoming = dkv_comm.send_recv(dkv)
        if not last:
            kv_comm.wait()
            kv = next_kv
    if world > 1:
        dkv_comm.wait()
        dkv = incoming
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class RingP2PAttention(torch.autograd.Function):
    """Autograd wrapper: saves the inputs, the output and the LSE; the backward re-runs the ring."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, layout, backend):
        out, lse = ring_p2p_forward(q, k, v, group, causal, scale, layout, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, causal, scale, layout, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_p2p_backward(dout, q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None
