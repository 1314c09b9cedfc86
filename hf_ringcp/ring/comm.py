"""The communicators the variants use, behind small objects that refuse misuse.

- :class:`RingComm`: point-to-point to the next rank of the ring, from the previous one (pass-KV).
- :class:`GatherComm`: the all-gather of K/V and the reduce-scatter of dK/dV (all-gather variant).
- :class:`AllToAllComm`: the sequence <-> heads all-to-all of Ulysses.
- :class:`LoopbackRingComm`, :class:`LoopbackGatherComm`: stand-ins that hand over other ranks' tensors in one
  process, so that ``benchmarks/ring_sim.py`` runs every rank's exact work on one GPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from hf_ringcp.ring.group import all_gather_single, global_rank, group_rank_and_size, reduce_scatter_single


class RingComm:
    """Sends to the next rank of the ring and receives from the previous one, asynchronously.

    One transfer may be in flight at a time: :meth:`send_recv` starts it and returns the receive buffer,
    :meth:`wait` finishes it. Starting a second transfer before waiting, or waiting with nothing in flight,
    raises ``RuntimeError`` (both are bugs that would otherwise hang or read a half-written buffer).
    """

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        rank, world = group_rank_and_size(group)
        self.group = group
        self.world_size = world
        self.send_peer = global_rank(group, (rank + 1) % world)
        self.recv_peer = global_rank(group, (rank - 1) % world)
        self._pending: list[dist.Work] | None = None

    def send_recv(self, tensor: torch.Tensor, recv_buffer: torch.Tensor | None = None) -> torch.Tensor:
        """Start sending ``tensor`` to the next rank and receiving a tensor of its shape from the previous."""
        if self._pending is not None:
            raise RuntimeError("RingComm.send_recv called while the previous transfer is in flight; call wait().")
        if self.world_size == 1:
            raise RuntimeError("RingComm has no peer in a world of 1.")
        if not tensor.is_contiguous():
            raise ValueError("RingComm sends contiguous tensors only; call .contiguous() first.")
        if recv_buffer is None:
            recv_buffer = torch.empty_like(tensor, memory_format=torch.contiguous_format)
        # An empty buffer (a rank that sends no rows, layout="balanced") is not transferred: both ends know it.
        ops = [dist.P2POp(op, x, peer, self.group)
               for op, x, peer in ((dist.isend, tensor, self.send_peer), (dist.irecv, recv_buffer, self.recv_peer))
               if x.numel()]
        self._pending = dist.batch_isend_irecv(ops) if ops else []
        return recv_buffer

    def wait(self) -> None:
        """Block (the current stream, on GPU) until the transfer in flight is complete."""
        if self._pending is None:
            raise RuntimeError("RingComm.wait called with no transfer in flight.")
        for work in self._pending:
            work.wait()
        self._pending = None


class GatherComm:
    """The two collectives of the all-gather variant over ``group``."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.world = group_rank_and_size(group)[1]

    def start_gather(self, kv: torch.Tensor) -> tuple[torch.Tensor, dist.Work]:
        """Start gathering every rank's ``kv``; returns ``([P, *kv.shape] buffer, work)``; wait before reading."""
        gathered = torch.empty((self.world, *kv.shape), dtype=kv.dtype, device=kv.device)
        flat = gathered.view(self.world * kv.shape[0], *kv.shape[1:])
        work = all_gather_single(flat, kv.contiguous(), group=self.group, async_op=True)
        return gathered, work

    def reduce_scatter(self, out: torch.Tensor, per_rank: torch.Tensor) -> None:
        """``out`` (like ``per_rank[0]``) <- the sum over ranks of their ``per_rank[this rank]``."""
        reduce_scatter_single(out, per_rank.view(-1, *per_rank.shape[2:]), group=self.group)


class AllToAllComm:
    """``all_to_all_single`` over ``group`` on the leading dimension: part ``i`` goes to rank ``i``."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.world = group_rank_and_size(group)[1]

    def exchange(self, parts: torch.Tensor) -> torch.Tensor:
        """``parts [P, ...]`` -> ``[P, ...]`` where entry ``i`` is what rank ``i`` sent to this rank."""
        if parts.shape[0] != self.world:
            raise AssertionError(f"all-to-all needs {self.world} parts, got {parts.shape[0]}")
        out = torch.empty_like(parts, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, parts.contiguous(), group=self.group)
        return out


class _Done:
    def wait(self) -> None:
        pass


class LoopbackRingComm:
    """Stands in for :class:`RingComm` in one process, with the same one-in-flight rule.

    ``source(i)`` is the tensor this rank receives at its ``i``-th transfer (e.g. the K/V of rank ``r - i - 1``).
    """

    def __init__(self, source: Callable[[int], torch.Tensor]) -> None:
        self.source, self.count, self.pending = source, 0, False

    def send_recv(self, tensor: torch.Tensor, recv_buffer: torch.Tensor | None = None) -> torch.Tensor:
        if self.pending:
            raise RuntimeError("send_recv while a transfer is in flight")
        if not tensor.is_contiguous():
            raise ValueError("RingComm sends contiguous tensors only")
        received = self.source(self.count)
        expected = tensor if recv_buffer is None else recv_buffer
        if received.shape != expected.shape or received.dtype != expected.dtype:
            raise AssertionError(f"loopback received {tuple(received.shape)} for {tuple(expected.shape)}")
        self.count += 1
        self.pending = True
        return received

    def wait(self) -> None:
        if not self.pending:
            raise RuntimeError("wait with no transfer in flight")
        self.pending = False


class LoopbackGatherComm:
    """Stands in for :class:`GatherComm` in one process: every rank's K/V are already stacked in ``gathered``.

    ``reduce_scatter`` copies this rank's own part (the local memory traffic of the collective, not its sum).
    """

    def __init__(self, rank: int, gathered: torch.Tensor) -> None:
        self.rank, self.gathered = rank, gathered

    def start_gather(self, kv: torch.Tensor):
        if kv.shape != self.gathered.shape[1:]:
            raise AssertionError("loopback gather shape mismatch")
        return self.gathered, _Done()

    def reduce_scatter(self, out: torch.Tensor, per_rank: torch.Tensor) -> None:
        out.copy_(per_rank[self.rank])
