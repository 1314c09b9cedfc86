"""Pass-KV ring attention: K/V blocks travel the ring by point-to-point transfers overlapped with compute.

At step ``s`` rank ``r`` holds the K/V of rank ``(r - s) mod P`` and sends it on while it computes with it.
The backward sends K/V the same way and, one step behind, the float32 dK/dV accumulator of each block, which
collects every rank's share and arrives back at the block's owner after ``P`` hops.

Packed rows run each step as the few launches of the rank's :class:`~hf_ringcp.ring.varlen.PackedSchedule`
(:meth:`P2PRing._attend_packed`); the communication is the same.

The communicators are made by factories (``RingComm(group)`` on a real ring); ``benchmarks/ring_sim.py`` passes
:class:`~hf_ringcp.ring.comm.LoopbackRingComm` factories that hand over other ranks' tensors in one process.
"""

from __future__ import annotations

from collections.abc import Callable

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
from hf_ringcp.ring.plan import BlockCall
from hf_ringcp.ring.variant import RankSetup, Variant
from hf_ringcp.ring.varlen import PackedOutput, PackedSchedule, Step, add_kv_rows, blocks, rows

CommFactory = Callable[[], RingComm]


class P2PRing(Variant):
    """Pass-KV ring over ``setup.world`` ranks; ``kv_comm`` / ``dkv_comm`` make the K/V and dK/dV communicators."""

    def __init__(self, setup: RankSetup, kv_comm: CommFactory | None, dkv_comm: CommFactory | None) -> None:
        super().__init__(setup)
        self.kv_comm, self.dkv_comm = kv_comm, dkv_comm

    def step_calls(self, step: int) -> tuple[BlockCall, ...]:
        """The calls of step ``step``: this rank's queries against the K/V of rank ``(rank - step) mod P``."""
        s = self.setup
        return s.plan(s.placement.segments((s.rank - step) % s.world))

    def steps(self, local_len: int) -> list[Step]:
        return [Step(self.step_calls(step)) for step in range(self.setup.world)]

    def attend(self, q, k, v):
        packed = self.schedule(q)
        if packed is not None:
            return self._attend_packed(packed, q, k, v)
        s = self.setup
        kv = torch.stack([k, v])
        acc = OutputAccumulator(q)
        comm = self.kv_comm() if s.world > 1 else None
        for step in range(s.world):
            last = step == s.world - 1
            if not last:
                next_kv = comm.send_recv(kv)
            forward_calls(self.step_calls(step), q, kv[0], kv[1], acc, s.kernels, s.scale)
            if not last:
                comm.wait()
                kv = next_kv
        return acc.result(q.dtype)

    def attend_backward(self, dout, q, k, v, out, lse):
        """The accumulator of the block held at step ``s > 0`` arrives from the previous rank while this step's
        kernels run; the block's gradients are then added into it in place and it is passed on."""
        packed = self.schedule(q)
        if packed is not None:
            return self._attend_backward_packed(packed, dout, q, k, v, out, lse)
        s = self.setup
        dout, out = like(dout, q), like(out, q)
        kv = torch.stack([k, v])
        dq = RowAccumulator(torch.empty_like(q, dtype=torch.float32))
        kv_comm = self.kv_comm() if s.world > 1 else None
        dkv_comm = self.dkv_comm() if s.world > 1 else None
        incoming = None
        for step in range(s.world):
            last = step == s.world - 1
            if not last:
                next_kv = kv_comm.send_recv(kv)
            grads = backward_kernels(self.step_calls(step), dout, q, kv[0], kv[1], out, lse, dq, s.kernels, s.scale)
            if step == 0:  # this rank's own block: a fresh accumulator
                dkv = torch.empty(kv.shape, dtype=torch.float32, device=kv.device)
                dk_acc, dv_acc = RowAccumulator(dkv[0]), RowAccumulator(dkv[1])
                add_kv_grads(grads, dk_acc, dv_acc)
                dk_acc.result()
                dv_acc.result()
            else:
                dkv_comm.wait()
                dkv = incoming
                add_kv_grads(grads, dkv[0], dkv[1])
            if s.world > 1:
                incoming = dkv_comm.send_recv(dkv)
            if not last:
                kv_comm.wait()
                kv = next_kv
        if s.world > 1:
            dkv_comm.wait()
            dkv = incoming
        return dq.result().to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


    # ----------------------------------------------------------------------------------- packed rows

    def _attend_packed(self, packed: PackedSchedule, q, k, v):
        s = self.setup
        kv = torch.stack([k, v])
        q_rows = rows(q)
        acc = PackedOutput(q_rows)
        comm = self.kv_comm() if s.world > 1 else None
        for step in range(s.world):
            last = step == s.world - 1
            if not last:
                next_kv = comm.send_recv(kv)
            packed.forward_step(step, q_rows, *_kv_rows(kv), acc, s.kernels, s.scale)
            if not last:
                comm.wait()
                kv = next_kv
        return acc.result(q.dtype)

    def _attend_backward_packed(self, packed: PackedSchedule, dout, q, k, v, out, lse):
        s = self.setup
        dout, out = like(dout, q), like(out, q)
        kv = torch.stack([k, v])
        dq = torch.zeros(rows(q).shape, dtype=torch.float32, device=q.device)
        lse = lse[0].contiguous()
        kv_comm = self.kv_comm() if s.world > 1 else None
        dkv_comm = self.dkv_comm() if s.world > 1 else None
        incoming = None
        dout, q_rows, out = rows(dout), rows(q), rows(out)
        for step in range(s.world):
            last = step == s.world - 1
            if not last:
                next_kv = kv_comm.send_recv(kv)
            grads = packed.backward_step(step, dout, q_rows, *_kv_rows(kv), out, lse, dq, s.kernels, s.scale)
            if step == 0:
                dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            else:
                dkv_comm.wait()
                dkv = incoming
            add_kv_rows(grads, *_kv_rows(dkv))
            if s.world > 1:
                incoming = dkv_comm.send_recv(dkv)
            if not last:
                kv_comm.wait()
                kv = next_kv
        if s.world > 1:
            dkv_comm.wait()
            dkv = incoming
        return blocks(dq).to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


def _kv_rows(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2, 1, H, S, D]`` -> the ``[S, H, D]`` rows of K and of V (two views)."""
    h, n, d = kv.shape[2:]
    shape, strides = (n, h, d), (kv.stride(3), kv.stride(2), kv.stride(4))
    offset = kv.storage_offset()
    return kv.as_strided(shape, strides, offset), kv.as_strided(shape, strides, offset + kv.stride(0))


def build(setup: RankSetup, group: dist.ProcessGroup | None) -> P2PRing:
    make = lambda: RingComm(group)
    return P2PRing(setup, make, make)
