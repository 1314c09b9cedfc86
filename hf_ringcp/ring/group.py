"""Process-group helpers that also work when no process group is initialised (a world of 1)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_rank_and_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """Return ``(rank in group, group size)``; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError(
                "A process group was passed but torch.distributed is not initialised. Call "
                "`torch.distributed.init_process_group` first (or launch with `torchrun`/`accelerate launch`), "
                "or pass `group=None` for a single process."
            )
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where ``group``'s collectives take tensors: the current GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """Global rank of ``group_rank`` in ``group`` (point-to-point ops address global ranks)."""
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)


# torch 2.13 renamed the tensor collectives (the old names warn); torch 2.11 has only the old ones.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """``output`` (``P`` times ``input`` along dim 0) <- every rank's ``input``, in rank order."""
    return _ALL_GATHER(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, group=None, async_op: bool = False):
    """``output`` <- the sum over ranks of their ``input`` slice ``[rank]`` (``input`` is ``P`` outputs long)."""
    return _REDUCE_SCATTER(output, input, group=group, async_op=async_op)
