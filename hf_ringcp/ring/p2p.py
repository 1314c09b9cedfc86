"""Pass-KV ring attention: K/V blocks travel the ring by point-to-point transfers overlapped with compute.

At step ``s`` rank ``r`` holds the K/V of rank ``(r - s) mod P`` and sends it on while it computes with it.
The backward sends K/V the same way and, one step behind, the float32 dK/dV accumulator of each block, which
collects every rank's share and arrives back at the block's owner after ``P`` hops.

What travels is :meth:`~hf_ringcp.ring.layout.Placement.travelling`'s: with ``layout="balanced"`` only the rows
other ranks' queries see (buffers of different sizes per owner; nothing at all when no document is split), the
rest stay home and their gradients too.

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
        # What each rank sends (the sent buffers' segments); the ring runs only if anything travels.
        self.sent = setup.placement.travelling(setup.mask)
        self.n_steps = 1 if setup.world == 1 or self.sent.nothing else setup.world

    def step_calls(self, step: int) -> tuple[BlockCall, ...]:
        """The calls of step ``step``: this rank's queries against its own K/V (step 0) or the buffer sent by rank
        ``(rank - step) mod P``."""
        s = self.setup
        if step == 0:
            return s.plan(s.own)
        return s.plan(self.sent.buffers.segments((s.rank - step) % s.world))

    def steps(self, local_len: int) -> list[Step]:
        return [Step(self.step_calls(step)) for step in range(self.n_steps)]

    def _incoming(self, sent: torch.Tensor, step: int) -> torch.Tensor | None:
        """The receive buffer of step ``step`` (``None``: the shape of what is sent)."""
        s = self.setup
        if self.sent.everything:
            return None
        n = self.sent.size((s.rank - step - 1) % s.world)
        return sent.new_empty((*sent.shape[:-2], n, sent.shape[-1]))

    def attend(self, q, k, v):
        packed = self.schedule(q)
        if packed is not None:
            return self._attend_packed(packed, q, k, v)
        s = self.setup
        kv = torch.stack([k, v])
        acc = OutputAccumulator(q)
        comm = self.kv_comm() if self.n_steps > 1 else None
        held = kv
        buf = self.sent.take(kv, s.rank)
        for step in range(self.n_steps):
            last = step == self.n_steps - 1
            if not last:
                next_buf = comm.send_recv(buf, self._incoming(buf, step))
            forward_calls(self.step_calls(step), q, held[0], held[1], acc, s.kernels, s.scale)
            if not last:
                comm.wait()
                held = buf = next_buf
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
        ring = self.n_steps > 1
        kv_comm = self.kv_comm() if ring else None
        dkv_comm = self.dkv_comm() if ring else None
        incoming = None
        held = kv
        buf = self.sent.take(kv, s.rank)
        for step in range(self.n_steps):
            last = step == self.n_steps - 1
            if not last:
                next_buf = kv_comm.send_recv(buf, self._incoming(buf, step))
            grads = backward_kernels(self.step_calls(step), dout, q, held[0], held[1], out, lse, dq, s.kernels,
                                     s.scale)
            if step == 0:  # this rank's own block: a fresh accumulator
                home = torch.empty(kv.shape, dtype=torch.float32, device=kv.device)
                dk_acc, dv_acc = RowAccumulator(home[0]), RowAccumulator(home[1])
                add_kv_grads(grads, dk_acc, dv_acc)
                dk_acc.result()
                dv_acc.result()
                dkv = self.sent.take(home, s.rank)  # the rows that travel collect the others' gradients
            else:
                dkv_comm.wait()
                dkv = incoming
                add_kv_grads(grads, dkv[0], dkv[1])
            if ring:
                incoming = dkv_comm.send_recv(dkv, self._incoming(dkv, step))
            if not last:
                kv_comm.wait()
                held = buf = next_buf
        if ring:
            dkv_comm.wait()
            dkv = self.sent.put(home, incoming, s.rank)
        else:
            dkv = home
        return dq.result().to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)

    # ----------------------------------------------------------------------------------- packed rows

    def _attend_packed(self, packed: PackedSchedule, q, k, v):
        s = self.setup
        kv = torch.stack([k, v])
        q_rows = rows(q)
        acc = PackedOutput(q_rows)
        comm = self.kv_comm() if self.n_steps > 1 else None
        held = kv
        buf = self.sent.take(kv, s.rank)
        for step in range(self.n_steps):
            last = step == self.n_steps - 1
            if not last:
                next_buf = comm.send_recv(buf, self._incoming(buf, step))
            packed.forward_step(step, q_rows, *_kv_rows(held), acc, s.kernels, s.scale)
            if not last:
                comm.wait()
                held = buf = next_buf
        return acc.result(q.dtype)

    def _attend_backward_packed(self, packed: PackedSchedule, dout, q, k, v, out, lse):
        s = self.setup
        dout, out = like(dout, q), like(out, q)
        kv = torch.stack([k, v])
        dq = torch.zeros(rows(q).shape, dtype=torch.float32, device=q.device)
        lse = lse[0].contiguous()
        ring = self.n_steps > 1
        kv_comm = self.kv_comm() if ring else None
        dkv_comm = self.dkv_comm() if ring else None
        incoming = None
        dout, q_rows, out = rows(dout), rows(q), rows(out)
        held = kv
        buf = self.sent.take(kv, s.rank)
        for step in range(self.n_steps):
            last = step == self.n_steps - 1
            if not last:
                next_buf = kv_comm.send_recv(buf, self._incoming(buf, step))
            grads = packed.backward_step(step, dout, q_rows, *_kv_rows(held), out, lse, dq, s.kernels, s.scale)
            if step == 0:
                home = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
                add_kv_rows(grads, *_kv_rows(home))
                dkv = self.sent.take(home, s.rank)  # the rows that travel collect the others' gradients
            else:
                dkv_comm.wait()
                dkv = incoming
                add_kv_rows(grads, *_kv_rows(dkv))
            if ring:
                incoming = dkv_comm.send_recv(dkv, self._incoming(dkv, step))
            if not last:
                kv_comm.wait()
                held = buf = next_buf
        if ring:
            dkv_comm.wait()
            dkv = self.sent.put(home, incoming, s.rank)
        else:
            dkv = home
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
