"""Which tokens of a sequence each context-parallel rank holds.

A *layout* cuts the global sequence into equal chunks and assigns them to ranks:

- ``"contiguous"``: ``P`` chunks; rank ``r`` holds chunk ``r``.
- ``"zigzag"``: ``2P`` chunks; rank ``r`` holds chunks ``r`` and ``2P - 1 - r`` (head and tail), so that
  under a causal mask every rank does the same amount of work.

A rank's local tensor is the concatenation of its chunks in increasing global order. Everything here is
pure index arithmetic plus the two collectives that move whole sequences (:func:`unshard_sequence`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ringcp.ring.group import group_rank_and_size

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` unless ``layout`` is a known layout name."""
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, but got {layout!r}.")


def num_chunks(layout: str, world_size: int) -> int:
    """Number of equal chunks the global sequence is cut into (the sequence-length divisor)."""
    check_layout(layout)
    return 2 * world_size if layout == "zigzag" else world_size


def rank_chunks(layout: str, rank: int, world_size: int) -> tuple[int, ...]:
    """Global chunk indices held by ``rank``, in local (increasing) order."""
    check_layout(layout)
    if layout == "zigzag":
        return (rank, 2 * world_size - 1 - rank)
    return (rank,)


def check_divisible(seq_len: int, layout: str, world_size: int, what: str = "sequence length") -> int:
    """Return the chunk length, or raise ``ValueError`` naming the fix when it is not whole."""
    n = num_chunks(layout, world_size)
    if seq_len % n != 0:
        hint = (
            f"2 * cp_size = {n}" if layout == "zigzag" else f"cp_size = {n}"
        )
        raise ValueError(
            f"The {what} ({seq_len}) must be divisible by {hint} for layout={layout!r}. Pad the sequence to "
            f"a multiple of {n} (with labels set to -100 on the padding) or choose a length that is."
        )
    return seq_len // n


def local_positions(
    seq_len: int, layout: str, rank: int, world_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global token positions held by ``rank`` (shape ``[seq_len / P]``), e.g. for RoPE position ids."""
    chunk = check_divisible(seq_len, layout, world_size)
    return torch.cat(
        [torch.arange(c * chunk, (c + 1) * chunk, device=device) for c in rank_chunks(layout, rank, world_size)]
    )


def rank_major_order(seq_len: int, layout: str, world_size: int, device=None) -> torch.Tensor:
    """Permutation ``perm`` with ``x_rank_major = x_global.index_select(dim, perm)``.

    ``x_rank_major`` is the concatenation of every rank's local part, rank 0 first: what an all-gather of the
    local parts returns.
    """
    return torch.cat([local_positions(seq_len, layout, r, world_size, device) for r in range(world_size)])


def shard_sequence(
    x: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None, layout: str = "zigzag"
) -> torch.Tensor:
    """Return this rank's part of the full tensor ``x`` along ``dim`` (no communication).

    Args:
        x: the full, unsharded tensor; ``x.shape[dim]`` is the global sequence length ``S``.
        dim: the sequence dimension.
        group: the context-parallel process group (``None``: the default group; a world of 1 when no
            process group is initialised).
        layout: ``"zigzag"`` (``S`` divisible by ``2P``) or ``"contiguous"`` (``S`` divisible by ``P``).

    Returns:
        A tensor with ``S / P`` entries along ``dim``. A view when the layout gives one contiguous range,
        otherwise a new tensor; differentiable either way.
    """
    rank, world = group_rank_and_size(group)
    dim = dim % x.dim()
    chunk = check_divisible(x.shape[dim], layout, world)
    parts = [x.narrow(dim, c * chunk, chunk) for c in rank_chunks(layout, rank, world)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class _AllGatherSeq(torch.autograd.Function):
    """All-gather along ``dim``; backward keeps this rank's slice of the gradient.

    The backward does not sum gradients over ranks: :func:`unshard_sequence` is used where every rank computes
    the same function of the full tensor (e.g. logits comparison), so each rank's gradient for its own slice
    is already complete.
    """

    @staticmethod
    def forward(ctx, x_local: torch.Tensor, dim: int, group, layout: str) -> torch.Tensor:
        _, world = group_rank_and_size(group)
        ctx.dim, ctx.group, ctx.layout = dim, group, layout
        moved = x_local.movedim(dim, 0).contiguous()
        gathered = torch.empty((world * moved.shape[0], *moved.shape[1:]), dtype=moved.dtype, device=moved.device)
        dist.all_gather_into_tensor(gathered, moved, group=group)
        seq_len = gathered.shape[0]
        inverse = torch.argsort(rank_major_order(seq_len, layout, world, device=gathered.device))
        return gathered.index_select(0, inverse).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return shard_sequence(grad, ctx.dim, ctx.group, ctx.layout), None, None, None


def unshard_sequence(
    x_local: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None, layout: str = "zigzag"
) -> torch.Tensor:
    """Inverse of :func:`shard_sequence`: all-gather every rank's part and restore global order.

    Every rank returns the full tensor. Differentiable: the gradient of the result flows back to this rank's
    slice (see :class:`_AllGatherSeq`).
    """
    check_layout(layout)
    dim = dim % x_local.dim()
    _, world = group_rank_and_size(group)
    if world == 1:
        return x_local
    return _AllGatherSeq.apply(x_local, dim, group, layout)
