"""The public entry point of the ring core: :func:`ring_attention`."""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ringcp.ring.allgather import RingAllGatherAttention
from hf_ringcp.ring.group import group_rank_and_size
from hf_ringcp.ring.kernels import default_scale, select_backend
from hf_ringcp.ring.layout import check_layout, rank_chunks
from hf_ringcp.ring.p2p import RingP2PAttention

COMMS = {"p2p": RingP2PAttention, "allgather": RingAllGatherAttention}


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(
                f"`{name}` must be 4-D [batch, heads, seq_local, head_dim], but has shape {tuple(x.shape)}."
            )
    if k.shape != v.shape:
        raise ValueError(f"`k` and `v` must have the same shape, but got {tuple(k.shape)} and {tuple(v.shape)}.")
    if (q.shape[0], q.shape[2], q.shape[3]) != (k.shape[0], k.shape[2], k.shape[3]):
        raise ValueError(
            f"`q` {tuple(q.shape)} and `k` {tuple(k.shape)} must agree on batch, local sequence length and head_dim "
            "(layout [batch, heads, seq_local, head_dim]; transpose [B, S, H, D] inputs with .transpose(1, 2))."
        )
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(
            f"The number of query heads ({q.shape[1]}) must be a multiple of the number of key/value heads "
            f"({k.shape[1]}) for grouped-query attention; pass K/V with a head count that divides it."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"`q`, `k`, `v` must share one dtype, but got {q.dtype}, {k.dtype}, {v.dtype}; cast them.")
    if not (q.device == k.device == v.device):
        raise ValueError(f"`q`, `k`, `v` must be on one device, but got {q.device}, {k.device}, {v.device}.")
    if not q.is_floating_point():
        raise ValueError(f"`q`, `k`, `v` must be floating point, but got {q.dtype}.")


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    causal: bool = True,
    scale: float | None = None,
    layout: str = "zigzag",
    comm: str = "p2p",
    backend: str = "auto",
) -> torch.Tensor:
    """Exact attention over a sequence sharded across the ranks of ``group``, differentiable.

    Args:
        q: ``[B, Hq, S_local, D]``, this rank's queries.
        k, v: ``[B, Hkv, S_local, D]`` with ``Hq % Hkv == 0`` (grouped-query attention; not repeated: K/V
            travel with ``Hkv`` heads).
        group: the context-parallel process group; ``None`` is the default group, or a world of 1 when
            torch.distributed is not initialised (then this equals plain SDPA).
        causal: lower-triangular mask over *global* positions (query ``i`` sees keys ``<= i``).
        scale: softmax scale, default ``1 / sqrt(D)``.
        layout: how the global sequence is split over ranks, as produced by
            :func:`~hf_ringcp.ring.layout.shard_sequence`: ``"zigzag"`` (default, causal load balance) or
            ``"contiguous"``.
        comm: ``"p2p"`` (pass K/V around the ring, overlapped with compute) or ``"allgather"`` (gather K/V
            once; backward reduce-scatters dK/dV).
        backend: ``"auto"`` or one of ``"cudnn"``, ``"flash"``, ``"efficient"``, ``"cpu_flash"``, ``"math"``.

    Returns:
        ``[B, Hq, S_local, D]`` in the dtype of ``q``. Partial results merge in float32.
    """
    _check_inputs(q, k, v)
    check_layout(layout)
    if comm not in COMMS:
        raise ValueError(f"`comm` must be one of {tuple(COMMS)}, but got {comm!r}.")
    rank, world = group_rank_and_size(group)
    pieces = len(rank_chunks(layout, rank, world))
    if q.shape[2] % pieces != 0:
        raise ValueError(
            f"The local sequence length ({q.shape[2]}) must be divisible by {pieces} for layout={layout!r} "
            f"(the global length by {pieces * world}); pad the sequence or use layout='contiguous'."
        )
    chosen = select_backend(backend, q, k)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    return COMMS[comm].apply(q, k, v, group, causal, scale, layout, chosen)
