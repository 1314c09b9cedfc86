"""Point-to-point ring traffic behind one object that refuses misuse."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ringcp.ring.group import global_rank, group_rank_and_size


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
        ops = [
            dist.P2POp(dist.isend, tensor, self.send_peer, self.group),
            dist.P2POp(dist.irecv, recv_buffer, self.recv_peer, self.group),
        ]
        self._pending = dist.batch_isend_irecv(ops)
        return recv_buffer

    def wait(self) -> None:
        """Block (the current stream, on GPU) until the transfer in flight is complete."""
        if self._pending is None:
            raise RuntimeError("RingComm.wait called with no transfer in flight.")
        for work in self._pending:
            work.wait()
        self._pending = None
