"""Throughput and memory numbers for training logs: tokens/s (global and per GPU), peak memory, MFU."""

from __future__ import annotations

import resource
import sys
import time

import torch
import torch.distributed as dist

from hf_ringcp.ring.group import collective_device


def peak_memory_gib(device: torch.device | None = None) -> float:
    """This process's peak memory in GiB: CUDA allocator peak on GPU, peak resident set size on CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def causal_lm_train_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Model FLOPs per trained token, causal-aware (the formula docs/performance.md states).

    ``6 * N`` for the dense matmuls (forward + backward) plus ``6 * n_layers * hidden * seq_len`` for attention:
    ``12 * L * h * S`` for full attention halved by the causal mask. Recomputation (gradient checkpointing) is
    not counted, as MFU conventionally excludes it. For LoRA see :func:`lora_train_flops_per_token`.
    """
    return 6 * n_params + 6 * n_layers * hidden * seq_len


def lora_train_flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: int) -> float:
    """Like :func:`causal_lm_train_flops_per_token` for frozen base weights: ``4 * N`` + attention.

    LoRA still back-propagates activations through every frozen matmul but computes no weight gradient for
    them, which drops ``2 * N`` of the ``6 * N``.
    """
    return 4 * n_params + 6 * n_layers * hidden * seq_len


class ThroughputMeter:
    """Counts tokens between two log points and turns them into global and per-rank rates.

    Every rank calls :meth:`add` with the tokens it processed (its shard) and :meth:`read` at the same points
    (it all-reduces, so all ranks must call it).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def read(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        stats = torch.tensor([float(self.tokens), peak_memory_gib(self.device)], dtype=torch.float64)
        world = 1
        if dist.is_initialized():
            world = dist.get_world_size()
            total, peak = stats[:1].to(collective_device()), stats[1:].to(collective_device())
            dist.all_reduce(total)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            stats = torch.cat([total.cpu(), peak.cpu()])
        self.tokens, self.start = 0, now
        tokens_per_s = stats[0].item() / elapsed
        return {
            "tokens_per_second": tokens_per_s,
            "tokens_per_second_per_device": tokens_per_s / world,
            "peak_memory_gib": stats[1].item(),
        }
