"""All-gather ring attention (Llama-3 style): gather K/V once, then attend locally in a few large calls.

The all-gather runs asynchronously while the rank attends to its own K/V (which needs no communication);
then the queries attend to the gathered tokens they may see. For stride-1 layouts (zigzag, contiguous) the
gathered parts are copied into global order first, so that neighbouring key chunks make one call, and only the
parts some call reads are copied; striped parts are attended in the rank-major order the gather returns. The
backward gathers K/V again (keeping the gathered copy alive between forward and backward would cost ``P`` times
the local K/V per layer) and reduce-scatters dK/dV to their owners.

What is gathered is :meth:`~hf_ringcp.ring.layout.Placement.travelling`'s: with ``layout="balanced"`` only the rows
other ranks' queries see (each rank's padded to the largest), and nothing at all when no document is split; the
gradients of the rows that stay home never enter the reduce-scatter.

Packed rows run the own step and the gathered step as the few launches of the rank's
:class:`~hf_ringcp.ring.varlen.PackedSchedule`, reading the gathered K/V by row index (one reordering copy into
rank-major rows, no per-chunk copies) and filing dK/dV by row index into rank-major rows (when every row travels;
a partial gather, ``layout="balanced"`` with split documents, runs its calls one by one).

The communicator is a :class:`~hf_ringcp.ring.comm.GatherComm` on a real group; ``benchmarks/ring_sim.py``
passes a :class:`~hf_ringcp.ring.comm.LoopbackGatherComm` that hands over every rank's K/V.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from functools import cached_property

import torch
import torch.distributed as dist

from hf_ringcp.ring.blocks import (
    OutputAccumulator,
    RowAccumulator,
    RowWrites,
    backward_kernels,
    forward_calls,
    kv_pieces,
    like,
)
from hf_ringcp.ring.comm import GatherComm
from hf_ringcp.ring.plan import BlockCall
from hf_ringcp.ring.variant import RankSetup, Variant
from hf_ringcp.ring.varlen import PackedOutput, PackedSchedule, Step, add_kv_rows, blocks, rows

#: Take :class:`hf_ringcp.ring.allgather_prefix.AllGatherPrefix` (one bottom-right causal call per query segment, no
#: merges) where it applies and the kernel aligns bottom-right natively.
PREFIX = True


class RankMajorKVGrads:
    """Float32 dK/dV of every token, filed straight into the rank-major ``[P, 2, B, H, S_local, D]`` layout that the
    reduce-scatter takes (no full-sequence buffer, no reordering pass, no zero-fill of written rows): the first
    gradient for a row is copied, later ones added; :meth:`result` zero-fills the rest.

    ``moves`` are ``(rank, local row, buffer row, length)``: where each buffer row of the gathered K/V came from.
    """

    def __init__(self, kv: torch.Tensor, world: int, moves: tuple[tuple[int, int, int, int], ...]) -> None:
        self.buf = torch.empty((world, *kv.shape), dtype=torch.float32, device=kv.device)
        self.moves = sorted(moves, key=lambda m: m[2])
        self.starts = [m[2] for m in self.moves]
        self.writes = [RowWrites(kv.shape[-2]) for _ in range(world)]

    def add_local(self, rank: int, rows: slice, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """``dk``/``dv`` ``[B, H, n, D]`` for rank ``rank``'s local rows ``rows``."""
        for a, b, first in self.writes[rank].split(rows.start, rows.stop):
            src = slice(a - rows.start, b - rows.start)
            for j, g in ((0, dk), (1, dv)):
                dst = self.buf[rank, j, :, :, a:b]
                if first:
                    dst.copy_(g[:, :, src])
                else:
                    dst += g[:, :, src]

    def add(self, rows: slice, dk: torch.Tensor, dv: torch.Tensor) -> None:
        """``dk``/``dv`` for buffer rows ``rows`` of the gathered K/V."""
        i = max(bisect.bisect_right(self.starts, rows.start) - 1, 0)
        while i < len(self.moves) and self.moves[i][2] < rows.stop:
            rank, local, buffer_row, n = self.moves[i]
            a, b = max(rows.start, buffer_row), min(rows.stop, buffer_row + n)
            if a < b:
                part = slice(a - rows.start, b - rows.start)
                shift = local - buffer_row
                self.add_local(rank, slice(a + shift, b + shift), dk[:, :, part], dv[:, :, part])
            i += 1

    def result(self) -> torch.Tensor:
        for rank, writes in enumerate(self.writes):
            for a, b in writes.unwritten():
                self.buf[rank, :, :, :, a:b].zero_()
        return self.buf


class AllGatherRing(Variant):
    """All-gather variant over ``setup.world`` ranks; ``comm`` makes the :class:`GatherComm`."""

    def __init__(self, setup: RankSetup, comm: Callable[[], GatherComm] | None) -> None:
        super().__init__(setup)
        self.comm = comm
        # Global order needs stride-1 segments; striped parts stay rank-major.
        self.global_order = all(seg.stride == 1 for seg in setup.own)
        # What each rank contributes to the gather (the sent buffers' segments); no gather if nothing travels.
        self.sent = setup.placement.travelling(setup.mask)
        self.gathers = setup.world > 1 and not self.sent.nothing

    @cached_property
    def own_calls(self) -> tuple[BlockCall, ...]:
        return self.setup.plan(self.setup.own)

    @cached_property
    def rest_calls(self) -> tuple[BlockCall, ...]:
        s = self.setup
        if not self.gathers:
            return ()
        return s.plan(self.sent.buffers.gathered(exclude=s.rank, global_order=self.global_order))

    @cached_property
    def moves(self) -> tuple[tuple[int, int, int, int], ...]:
        """The gathered parts the other ranks' calls read: ``(rank, local row, buffer row, length)``."""
        read = sorted((c.kv_start, c.kv_end) for c in self.rest_calls)
        starts = [a for a, _ in read]

        def is_read(buffer_row: int, n: int) -> bool:
            i = bisect.bisect_left(starts, buffer_row + n)
            return any(b > buffer_row for _, b in read[:i])

        return tuple(m for m in self.sent.buffers.moves(self.global_order)
                     if m[0] != self.setup.rank and is_read(m[2], m[3]))

    def _buffer(self, gathered: torch.Tensor) -> torch.Tensor:
        """``[P, 2, B, H, S_local, D]`` rank-major -> ``[2, B, H, rows, D]`` as the plan reads it."""
        p, two, b, h, s_local, d = gathered.shape
        if not self.global_order:
            return gathered.permute(1, 2, 3, 0, 4, 5).reshape(two, b, h, p * s_local, d)
        full = torch.empty((two, b, h, self.sent.buffers.buffer_rows, d), dtype=gathered.dtype, device=gathered.device)
        for r, local, row, n in self.moves:
            full[:, :, :, row : row + n].copy_(gathered[r, :, :, :, local : local + n])
        return full

    def steps(self, local_len: int) -> list[Step]:
        """The own step (local K/V) and the gathered step (buffer rows in global order, or rank-major for strided
        layouts, read from and filed into the rank-major rows of the gathered buffers). The own step's gradients go
        to this rank's rank-major rows when every row travels, else to a separate local accumulator."""
        s = self.setup
        own = Step(self.own_calls, grad_map=torch.arange(local_len) + s.rank * local_len if self.sent.everything
                   else None)
        if not self.gathers:
            return [own]
        return [own, Step(self.rest_calls, self._to_rank_major, self._to_rank_major)]

    @cached_property
    def _to_rank_major(self) -> torch.Tensor | None:
        """Gathered-buffer row -> row of the rank-major ``[P * buffer rows]`` gather (``None``: the same)."""
        if not self.global_order:
            return None
        buffers = self.sent.buffers
        index = torch.zeros(buffers.buffer_rows, dtype=torch.long)
        for r, local, row, n in buffers.moves(True):
            index[row : row + n] = torch.arange(n) + r * buffers.local_len + local
        return index

    def attend(self, q, k, v):
        packed = self.schedule(q)
        if packed is not None:
            return self._attend_packed(packed, q, k, v)
        s = self.setup
        kv = torch.stack([k, v])
        if self.gathers:
            gathered, work = self.comm().start_gather(self.sent.take(kv, s.rank, pad=True))
        acc = OutputAccumulator(q)
        forward_calls(self.own_calls, q, k, v, acc, s.kernels, s.scale)
        if self.gathers:
            work.wait()
            full = self._buffer(gathered)
            forward_calls(self.rest_calls, q, full[0], full[1], acc, s.kernels, s.scale)
        return acc.result(q.dtype)

    def attend_backward(self, dout, q, k, v, out, lse):
        packed = self.schedule(q)
        if packed is not None:
            return self._attend_backward_packed(packed, dout, q, k, v, out, lse)
        s = self.setup
        dout, out = like(dout, q), like(out, q)
        kv = torch.stack([k, v])
        sent = self.sent.take(kv, s.rank, pad=True)
        if self.gathers:
            comm = self.comm()
            gathered, work = comm.start_gather(sent)
        dq = RowAccumulator(torch.empty_like(q, dtype=torch.float32))
        # This rank's share of every sent token's dK/dV; its own rows when all of them are sent, else apart.
        dkv = RankMajorKVGrads(sent, s.world, self.moves)
        home = dkv if self.sent.everything else RankMajorKVGrads(kv, 1, ())
        for own_rows, bdk, bdv in kv_pieces(backward_kernels(self.own_calls, dout, q, k, v, out, lse, dq, s.kernels,
                                                             s.scale)):
            home.add_local(s.rank if self.sent.everything else 0, own_rows, bdk, bdv)
        if self.gathers:
            work.wait()
            full = self._buffer(gathered)
            grads = backward_kernels(self.rest_calls, dout, q, full[0], full[1], out, lse, dq, s.kernels, s.scale)
            for buffer_rows, bdk, bdv in kv_pieces(grads):
                dkv.add(buffer_rows, bdk, bdv)
            mine = torch.empty(sent.shape, dtype=torch.float32, device=kv.device)
            comm.reduce_scatter(mine, dkv.result())
            if not self.sent.everything:  # the others' gradients of the sent rows, added to this rank's own
                own = home.result()[0]
                index = self.sent.index(s.rank, kv.device)
                mine = own.index_add_(-2, index, mine[..., : index.numel(), :])
        else:
            mine = home.result()[s.rank if self.sent.everything else 0]
        return dq.result().to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)


    # ----------------------------------------------------------------------------------- packed rows

    @staticmethod
    def _rank_major_rows(gathered: torch.Tensor) -> torch.Tensor:
        """``[P, 2, 1, H, S_local, D]`` as gathered -> ``[P * S_local, 2, H, D]`` rank-major rows (one copy)."""
        p, two, _, h, s_local, d = gathered.shape
        return gathered[:, :, 0].permute(0, 3, 1, 2, 4).reshape(p * s_local, two, h, d)

    def _attend_packed(self, packed: PackedSchedule, q, k, v):
        s = self.setup
        if self.gathers:
            gathered, work = self.comm().start_gather(self.sent.take(torch.stack([k, v]), s.rank, pad=True))
        q_rows = rows(q)
        acc = PackedOutput(q_rows)
        packed.forward_step(0, q_rows, rows(k), rows(v), acc, s.kernels, s.scale)
        if self.gathers:
            work.wait()
            kv = self._rank_major_rows(gathered)
            packed.forward_step(1, q_rows, kv[:, 0], kv[:, 1], acc, s.kernels, s.scale)
        return acc.result(q.dtype)

    def _attend_backward_packed(self, packed: PackedSchedule, dout, q, k, v, out, lse):
        s = self.setup
        dout, out = like(dout, q), like(out, q)
        kv = torch.stack([k, v])
        sent = self.sent.take(kv, s.rank, pad=True)
        if self.gathers:
            comm = self.comm()
            gathered, work = comm.start_gather(sent)
        dq = torch.zeros(rows(q).shape, dtype=torch.float32, device=q.device)
        lse = lse[0].contiguous()
        n = sent.shape[-2]
        shape = rows(k).shape[1:]
        # Rank-major rows of every sent token's dK/dV; this rank's own rows too when all of them are sent.
        dkv = torch.zeros((s.world * n, 2, *shape), dtype=torch.float32, device=k.device)
        home = dkv if self.sent.everything else torch.zeros((k.shape[2], 2, *shape), dtype=torch.float32,
                                                            device=k.device)
        dout, q_rows, out = rows(dout), rows(q), rows(out)
        add_kv_rows(packed.backward_step(0, dout, q_rows, rows(k), rows(v), out, lse, dq, s.kernels, s.scale),
                    home[:, 0], home[:, 1])
        if self.gathers:
            work.wait()
            full = self._rank_major_rows(gathered)
            add_kv_rows(packed.backward_step(1, dout, q_rows, full[:, 0], full[:, 1], out, lse, dq, s.kernels,
                                             s.scale), dkv[:, 0], dkv[:, 1])
            per_rank = dkv.view(s.world, n, *dkv.shape[1:]).permute(0, 2, 3, 1, 4).unsqueeze(2).contiguous()
            mine = torch.empty(sent.shape, dtype=torch.float32, device=kv.device)
            comm.reduce_scatter(mine, per_rank)
            if not self.sent.everything:  # the others' gradients of the sent rows, added to this rank's own
                own = home.permute(1, 2, 0, 3).unsqueeze(1)
                index = self.sent.index(s.rank, kv.device)
                mine = own.index_add_(-2, index, mine[..., : index.numel(), :])
        else:
            mine = home.permute(1, 2, 0, 3).unsqueeze(1)
        return blocks(dq).to(q.dtype), mine[0].to(k.dtype), mine[1].to(v.dtype)


def build(setup: RankSetup, group: dist.ProcessGroup | None) -> Variant:
    from hf_ringcp.ring import allgather_prefix  # it builds on this module

    comm = lambda: GatherComm(group)
    device = "cuda" if setup.kernels.plain.name in ("cudnn", "flash") else "cpu"
    if PREFIX and allgather_prefix.preferred(setup, device):
        return allgather_prefix.AllGatherPrefix(setup, comm)
    return AllGatherRing(setup, comm)
