"""The public entry point of the ring core: :func:`ring_attention`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from hf_ringcp.ring import ulysses
from hf_ringcp.ring.blocks import Kernels
from hf_ringcp.ring.config import RingConfig
from hf_ringcp.ring.group import group_rank_and_size
from hf_ringcp.ring.kernels import default_scale
from hf_ringcp.ring.plan import MaskSpec
from hf_ringcp.ring.registry import COMMS
from hf_ringcp.ring.variant import RankSetup, RingAttentionFunction


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


def _autocast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Cast to the autocast dtype where autocast is on, as ``F.scaled_dot_product_attention`` does."""
    device = q.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)


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
    cu_seqlens: Sequence[int] | torch.Tensor | None = None,
    window: int | None = None,
    ulysses_size: int | str = 1,
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
            :func:`~hf_ringcp.ring.layout.shard_sequence`: ``"zigzag"`` (default, causal load balance),
            ``"zigzag_global"``, ``"contiguous"`` or ``"striped"`` (see :mod:`hf_ringcp.ring.layout`).
        comm: ``"p2p"`` (pass K/V around the ring, overlapped with compute), ``"allgather"`` (gather K/V
            once; backward reduce-scatters dK/dV) or ``"ulysses"`` (all-to-all sequence <-> heads over the whole
            group; ``Hq`` must divide by ``P``, K/V heads are repeated up to ``P`` when fewer).
        backend: ``"auto"`` or one of ``"cudnn"``, ``"flash"``, ``"efficient"``, ``"cpu_flash"``, ``"math"``.
        cu_seqlens: document boundaries of a packed sequence over the *global* sequence,
            ``[0, l_0, l_0 + l_1, ..., S]`` (the same on every rank, for every row of the batch): a query sees
            keys of its own document only. With ``layout="zigzag"`` every document is balanced on its own, so
            each length must be a multiple of ``2P`` (:func:`hf_ringcp.shard_batch` pads them).
        window: sliding window: a query sees keys fewer than ``window`` tokens back (causal only). Blocks outside
            it are skipped, blocks inside it run unmasked, only its edge blocks are masked.
        ulysses_size: the hybrid Ulysses x ring: groups of ``ulysses_size`` consecutive ranks exchange heads by
            all-to-all and ``comm`` runs over the groups (see :mod:`hf_ringcp.ring.ulysses`); 1: the plain ring.
            ``comm="auto"`` / ``ulysses_size="auto"``: chosen from the heads and the node
            (:mod:`hf_ringcp.ring.strategy`, logged once).

    Returns:
        ``[B, Hq, S_local, D]`` in the dtype of ``q`` (the autocast dtype under autocast, as SDPA). Partial results
        merge in float32.
    """
    q, k, v = _autocast(q, k, v)
    _check_inputs(q, k, v)
    rank, world = group_rank_and_size(group)
    config = RingConfig(layout=layout, comm=comm, backend=backend, ulysses_size=ulysses_size).resolved(
        q.shape[1], k.shape[1], world)
    split = config.layout_for(world)
    split.check_local_length(q.shape[2])
    seq_len = q.shape[2] * world
    placement = split.placement(seq_len, cu_seqlens)
    mask = MaskSpec(causal=causal, documents=placement.documents, window=window)
    kernels = Kernels.choose(backend, q, k, needs_masks=window is not None and window < seq_len)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    setup = RankSetup(rank, world, placement, mask, kernels, scale)
    if config.ulysses_size > 1:
        variant = ulysses.build(setup, group, config.ulysses_size, COMMS[config.comm])
    else:
        variant = COMMS[config.comm](setup, group)
    return RingAttentionFunction.apply(q, k, v, variant)
