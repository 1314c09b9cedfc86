"""Pass-KV ring attention: K/V blocks travel the ring by point-to-point transfers overlapped with compute.

At step ``s`` rank ``r`` holds the K/V of rank ``(r - s) mod P`` and sends it on while it computes with it.
The backward sends K/V the same way and, one step behind, the float32 dK/dV accumulator of each block, which
collects every rank's share and arrives back at the block's owner after ``P`` hops.

:func:`p2p_forward` / :func:`p2p_backward` are one rank's whole work given its rank, the world size and the
communicator objects; the distributed entry points build :class:`~hf_ringcp.ring.comm.RingComm` objects for
them, and ``benchmarks/ring_sim.py`` passes stand-ins that hand over other ranks' tensors in one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ringcp.ring.blocks import (
    OutputAccumulator,
    RowAccumulator,
    add_kv_grads,
    backward_kernels,
    forward_calls,
    like,
)
from hf_ringcp.ring.comm import RingComm
from hf_ringcp.ring.group import group_rank_and_size
from hf_ringcp.ring.kernels import Backend
from hf_ringcp.ring.layout import rank_chunks
from hf_ringcp.ring.plan import plan_block


def _step_calls(rank: int, world: int, step: int, layout: str, chunk_len: int, causal: bool):
    src = (rank - step) % world
    return plan_block(rank_chunks(layout, rank, world), rank_chunks(layout, src, world), chunk_len, causal)


def p2p_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rank: int, world: int, comm, causal: bool, scale: float,
    layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rank's forward; ``comm`` has ``send_recv``/``wait`` like :class:`RingComm` (``None`` when ``world == 1``)."""
    chunk_len = q.shape[2] // len(rank_chunks(layout, rank, world))
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


def p2p_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    rank: int, world: int, kv_comm, dkv_comm, causal: bool, scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One rank's backward; ``kv_comm`` passes K/V on, ``dkv_comm`` the float32 dK/dV accumulators.

    The accumulator of the block held at step ``s > 0`` arrives from the previous rank while this step's kernels
    run; the block's gradients are then added into it in place and it is passed on.
    """
    chunk_len = q.shape[2] // len(rank_chunks(layout, rank, world))
    dout, out = like(dout, q), like(out, q)
    kv = torch.stack([k, v])
    dq = RowAccumulator(torch.empty_like(q, dtype=torch.float32), chunk_len)
    incoming = None
    for step in range(world):
        last = step == world - 1
        if not last:
            next_kv = kv_comm.send_recv(kv)
        calls = _step_calls(rank, world, step, layout, chunk_len, causal)
        grads = backward_kernels(calls, dout, q, kv[0], kv[1], out, lse, dq, backend, scale)
        if step == 0:  # this rank's own block: a fresh accumulator
            dkv = torch.empty(kv.shape, dtype=torch.float32, device=kv.device)
            dk_acc, dv_acc = RowAccumulator(dkv[0], chunk_len), RowAccumulator(dkv[1], chunk_len)
            add_kv_grads(grads, dk_acc, dv_acc)
            dk_acc.result()
            dv_acc.result()
        else:
            dkv_comm.wait()
            dkv = incoming
            add_kv_grads(grads, dkv[0], dkv[1])
        if world > 1:
            incoming = dkv_comm.send_recv(dkv)
        if not last:
            kv_comm.wait()
            kv = next_kv
    if world > 1:
        dkv_comm.wait()
        dkv = incoming
    return dq.result().to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def ring_p2p_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: dist.ProcessGroup | None, causal: bool,
    scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return this rank's ``(out [B, Hq, S_local, D] in q.dtype, lse [B, Hq, S_local] float32)``."""
    rank, world = group_rank_and_size(group)
    comm = RingComm(group) if world > 1 else None
    return p2p_forward(q, k, v, rank, world, comm, causal, scale, layout, backend)


def ring_p2p_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    group: dist.ProcessGroup | None, causal: bool, scale: float, layout: str, backend: Backend,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(dq, dk, dv)`` for this rank's ``q``, ``k``, ``v``, in their dtypes."""
    rank, world = group_rank_and_size(group)
    kv_comm = RingComm(group) if world > 1 else None
    dkv_comm = RingComm(group) if world > 1 else None
    return p2p_backward(dout, q, k, v, out, lse, rank, world, kv_comm, dkv_comm, causal, scale, layout, backend)


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
