"""Running a rank's planned kernel calls against one K/V buffer, forward and backward.

Both ring variants (pass-KV and all-gather) differ only in how K/V reach a rank; the per-block work is here.
"""

from __future__ import annotations

import torch

from hf_ringcp.ring.kernels import Backend, block_backward, block_forward
from hf_ringcp.ring.merge import merge_into
from hf_ringcp.ring.plan import BlockCall


class OutputAccumulator:
    """A rank's running attention output and LSE in float32, merged block by block.

    The first block to reach a query chunk is copied, later ones merged, so no zero-initialised pass is paid.
    """

    def __init__(self, q: torch.Tensor, chunk_len: int) -> None:
        self.out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        self.lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
        self.chunk_len = chunk_len
        self.touched = [False] * (q.shape[2] // chunk_len)

    def add(self, rows: slice, out: torch.Tensor, lse: torch.Tensor) -> None:
        first, last = rows.start // self.chunk_len, rows.stop // self.chunk_len
        seen = self.touched[first:last]
        if not any(seen):
            self.out[:, :, rows].copy_(out)
            self.lse[:, :, rows].copy_(lse)
        elif all(seen):
            merge_into(self.out[:, :, rows], self.lse[:, :, rows], out, lse)
        else:
            for a in range(first, last):
                part = slice((a - first) * self.chunk_len, (a - first + 1) * self.chunk_len)
                self.add(slice(a * self.chunk_len, (a + 1) * self.chunk_len), out[:, :, part], lse[:, :, part])
            return
        self.touched[first:last] = [True] * (last - first)

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if not all(self.touched):
            raise AssertionError("some query rows attended to no key; the block plan is incomplete")
        return self.out.to(dtype), self.lse


def forward_calls(
    calls: list[BlockCall], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, acc: OutputAccumulator,
    backend: Backend, scale: float,
) -> None:
    """Attend ``q``'s planned rows to the planned rows of the buffer ``k``/``v`` and merge into ``acc``."""
    for c in calls:
        out, lse = block_forward(backend, q[:, :, c.q], k[:, :, c.kv], v[:, :, c.kv], c.causal, scale)
        acc.add(c.q, out, lse)


def backward_calls(
    calls: list[BlockCall], dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
    backend: Backend, scale: float,
) -> None:
    """Add the planned blocks' gradients into the float32 accumulators ``dq`` (local) and ``dk``/``dv`` (buffer)."""
    for c in calls:
        bdq, bdk, bdv = block_backward(
            backend, dout[:, :, c.q], q[:, :, c.q], k[:, :, c.kv], v[:, :, c.kv], out[:, :, c.q], lse[:, :, c.q],
            c.causal, scale,
        )
        dq[:, :, c.q] += bdq
        dk[:, :, c.kv] += bdk
        dv[:, :, c.kv] += bdv
