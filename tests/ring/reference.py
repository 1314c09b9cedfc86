"""Single-process reference attention in float64 for the parity tests."""

from __future__ import annotations

import torch


def reference_attention(q, k, v, causal: bool, scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Plain softmax attention on the full sequence; ``q`` ``[B, Hq, S, D]``, ``k``/``v`` ``[B, Hkv, S, D]``.

    ``window``: a query sees keys fewer than ``window`` positions back (with ``causal``).
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale
    n = q.shape[2]
    i, j = torch.arange(n, device=q.device)[:, None], torch.arange(n, device=q.device)[None, :]
    hidden = torch.zeros(n, n, dtype=torch.bool, device=q.device)
    if causal:
        hidden |= j > i
    if window is not None:
        hidden |= i - j >= window
    s = s.masked_fill(hidden, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def documents_reference(q, k, v, documents: list[tuple[int, int]], window: int | None = None) -> torch.Tensor:
    """Each document ``[a, b)`` run alone through :func:`reference_attention` (causal); rows outside are 0."""
    out = torch.zeros_like(q)
    for a, b in documents:
        out[:, :, a:b] = reference_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, window=window)
    return out


def merge_lse_reference(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge several partial results at once in float64: softmax weights over the blocks' LSEs."""
    stacked_lse = torch.stack([x.double() for x in lses])
    total = torch.logsumexp(stacked_lse, dim=0)
    weights = torch.exp(stacked_lse - total).unsqueeze(-1)
    return (weights * torch.stack([o.double() for o in outs])).sum(0), total


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max-norm relative error ``max|x - ref| / max|ref|``."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
