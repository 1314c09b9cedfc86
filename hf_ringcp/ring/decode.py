"""Decoding over a sharded KV cache: each rank attends to the keys it holds, one all-gather merges the partials.

During generation the new tokens' queries are the same on every rank (every rank runs the same decode step),
while the cached keys are split: rank ``r`` holds its shard of the prompt and its share of the generated tokens.
So the attention is a sum over disjoint key sets: each rank computes its partial output and log-sum-exp in
float32, the group exchanges them (``[B, Hq, L, D + 1]`` per rank and layer: a few KiB per token), and every rank
merges the ``P`` partials by one reduction in rank order (:func:`merge_partials`), so all ranks get the same bits.

Two local kernels: :func:`local_partial` (float32 einsum with any ``visible`` mask; the reference) and
:func:`local_partial_fused` for the common decode step where every held key is visible (one new token, no padding,
no window edge): one attention kernel that reads the cache once in its own dtype (no float32 copy) and returns
out and LSE, the ``G = Hq / Hkv`` query heads of a K/V head folded into query rows so that the kernel reads each
K/V head once (flash-decoding's grouping) with no repeat.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ringcp.ring.group import all_gather_single, group_rank_and_size
from hf_ringcp.ring.kernels import BACKENDS, block_forward, check_backend_name, default_scale


def local_partial(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q`` over this rank's keys only, unnormalised across ranks.

    Args:
        q: ``[B, Hq, L, D]`` queries.
        k, v: ``[B, Hkv, N, D]`` the keys and values this rank holds (``Hq % Hkv == 0``, not repeated).
        visible: ``[B, L, N]`` bool, which keys each query may see (documents, padding, causality, windows).
        scale: softmax scale.

    Returns:
        ``(out, lse)``: ``[B, Hq, L, D]`` and ``[B, Hq, L]`` in float32; a query that sees none of these keys
        gets ``out = 0`` and ``lse = -inf`` (it contributes nothing to the merge).
    """
    b, hq, length, d = q.shape
    hkv = k.shape[1]
    qg = q.float().reshape(b, hkv, hq // hkv, length, d)
    scores = torch.einsum("bhgld,bhnd->bhgln", qg, k.float()) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # exp(-inf - 0) = 0 for queries that see nothing here, instead of exp(-inf + inf) = NaN.
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1))
    out = torch.einsum("bhgln,bhnd->bhgld", probs, v.float())
    return out.reshape(b, hq, length, d), lse.reshape(b, hq, length)


# Decode order: flash first (its kernel takes few query rows over many keys well; cuDNN refuses some one-row
# shapes, see blocks.Kernels), then cuDNN, then the rest. Measured: benchmarks/decode.py.
_DECODE_ORDER = ("flash", "cudnn", "efficient", "cpu_flash", "math")


def decode_backend(q: torch.Tensor, k: torch.Tensor, name: str = "auto"):
    """The kernel of :func:`local_partial_fused` for grouped queries ``q`` ``[B, Hkv, G*L, D]`` and ``k``."""
    check_backend_name(name)
    for candidate in _DECODE_ORDER if name == "auto" else (name,):
        backend = BACKENDS[candidate]
        if backend.supports(q, k) is None:
            return backend
    raise ValueError(f"backend={name!r} cannot run the decode step on these inputs; use backend='auto'.")


def local_partial_fused(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_partial` when every query sees every key held here, by one attention kernel.

    Args:
        q: ``[B, Hq, L, D]``; k, v: ``[B, Hkv, N, D]`` in the cache's dtype (read once, not upcast).

    Returns:
        ``(out, lse)``: ``[B, Hq, L, D]`` in ``q``'s dtype and ``[B, Hq, L]`` float32 (``N = 0``: zeros and ``-inf``).
    """
    b, hq, length, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if n == 0:
        return q.new_zeros(q.shape), torch.full((b, hq, length), float("-inf"), device=q.device)
    # No mask, so query rows are independent: the G heads sharing a K/V head become G * L rows of that head.
    qg = q.reshape(b, hkv, (hq // hkv) * length, d)
    out, lse = block_forward(decode_backend(qg, k, backend), qg, k, v, False, scale)
    return out.reshape(b, hq, length, d), lse.reshape(b, hq, length)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None,
    group: dist.ProcessGroup | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Exact attention of the same queries on every rank over the keys all ranks hold together.

    Args:
        q: ``[B, Hq, L, D]``, identical on every rank of ``group``.
        k, v: ``[B, Hkv, N_r, D]``, this rank's keys (``N_r`` may differ between ranks, and may be 0).
        visible: ``[B, L, N_r]`` bool mask of the keys each query may see; ``None``: all of them (the fused
            kernel, :func:`local_partial_fused`).
        group: the ranks that hold the keys together (``None``: the default group, or one process).
        scale: softmax scale (default ``1 / sqrt(D)``).

    Returns:
        ``[B, Hq, L, D]`` in ``q``'s dtype, the same on every rank.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    if visible is None:
        out, lse = local_partial_fused(q, k, v, scale)
    else:
        out, lse = local_partial(q, k, v, visible, scale)
    _, world = group_rank_and_size(group)
    if world == 1:
        return out.to(q.dtype)
    mine = torch.cat([out.float(), lse.unsqueeze(-1)], dim=-1)
    gathered = mine.new_empty((world * mine.shape[0], *mine.shape[1:]))
    all_gather_single(gathered, mine, group=group)
    return merge_partials(gathered.view(world, *mine.shape)).to(q.dtype)


def merge_partials(parts: torch.Tensor) -> torch.Tensor:
    """``[P, B, H, L, D + 1]`` float32 partials (out, then LSE in the last column) -> ``[B, H, L, D]`` float32.

    One reduction over the ``P`` partials (a handful of kernels whatever ``P``: a decode step's partials are a few
    KiB, so launches, not bytes, set its time), in the same order on every rank, so all ranks get the same bits.
    A row no rank has a key for (all ``-inf``) gives 0.
    """
    lse = parts[..., -1:]
    total = torch.logsumexp(lse, dim=0)
    weight = torch.exp(lse - total.nan_to_num(neginf=0.0)).nan_to_num_(0.0)
    return (weight * parts[..., :-1]).sum(0)
