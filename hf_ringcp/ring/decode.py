"""Decoding over a sharded KV cache: each rank attends to the keys it holds, one all-gather merges the partials.

During generation the new tokens' queries are the same on every rank (every rank runs the same decode step),
while the cached keys are split: rank ``r`` holds its shard of the prompt and its share of the generated tokens.
So the attention is a sum over disjoint key sets: each rank computes its partial output and log-sum-exp in
float32, the group exchanges them (``[B, Hq, L, D + 1]`` per rank and layer: a few KiB per token), and every rank
merges the ``P`` partials in rank order, so all ranks get the same bits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hf_ringcp.ring.group import all_gather_single, group_rank_and_size
from hf_ringcp.ring.kernels import default_scale
from hf_ringcp.ring.merge import merge_into


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


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
    group: dist.ProcessGroup | None = None, scale: float | None = None,
) -> torch.Tensor:
    """Exact attention of the same queries on every rank over the keys all ranks hold together.

    Args:
        q: ``[B, Hq, L, D]``, identical on every rank of ``group``.
        k, v: ``[B, Hkv, N_r, D]``, this rank's keys (``N_r`` may differ between ranks, and may be 0).
        visible: ``[B, L, N_r]`` bool mask of the keys each query may see.
        group: the ranks that hold the keys together (``None``: the default group, or one process).
        scale: softmax scale (default ``1 / sqrt(D)``).

    Returns:
        ``[B, Hq, L, D]`` in ``q``'s dtype, the same on every rank.
    """
    scale = default_scale(q.shape[-1]) if scale is None else scale
    out, lse = local_partial(q, k, v, visible, scale)
    _, world = group_rank_and_size(group)
    if world == 1:
        return out.to(q.dtype)
    mine = torch.cat([out, lse.unsqueeze(-1)], dim=-1).contiguous()
    gathered = mine.new_empty((world * mine.shape[0], *mine.shape[1:]))
    all_gather_single(gathered, mine, group=group)
    gathered = gathered.view(world, *mine.shape)
    out, lse = gathered[0, ..., :-1].clone(), gathered[0, ..., -1].clone()
    for part in gathered[1:]:
        merge_into(out, lse, part[..., :-1], part[..., -1])
    return out.to(q.dtype)
