"""Turning a full batch into one context-parallel rank's share: tokens, global positions and shifted labels."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from hf_ringcp.integrations.context import get_context, make_context
from hf_ringcp.ring import local_positions, shard_sequence

IGNORE_INDEX = -100


def _sequence_tensor(batch: dict[str, Any]) -> torch.Tensor:
    for name in ("input_ids", "inputs_embeds"):
        x = batch.get(name)
        if x is not None:
            if not torch.is_tensor(x) or x.dim() < 2:
                raise ValueError(f"`{name}` must be a tensor of shape [batch, seq, ...], but got {_describe(x)}.")
            return x
    raise ValueError(f"shard_batch needs `input_ids` or `inputs_embeds`; the batch has keys {sorted(batch)}.")


def _describe(x: Any) -> str:
    return f"shape {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__


def _check_attention_mask(mask: Any, b: int, s: int) -> None:
    if not torch.is_tensor(mask) or tuple(mask.shape) != (b, s):
        raise ValueError(
            f"`attention_mask` must be a 2-D [batch, seq] = [{b}, {s}] padding mask under context parallelism, "
            f"but got {_describe(mask)}; drop custom 4-D masks (the ring applies the causal mask itself)."
        )
    if not bool(mask.bool().all()):
        raise ValueError(
            "`attention_mask` has padding (zeros), which context parallelism cannot honour. Pack examples into "
            "full rows without padding; with right padding only, drop `attention_mask` and set the labels of pad "
            "tokens to -100 (causal attention never looks ahead, so real tokens are unaffected); or train this "
            "batch without context parallelism (attn_implementation='sdpa')."
        )


def _check_position_ids(pos: Any, b: int, s: int) -> None:
    expected = torch.arange(s, device=pos.device) if torch.is_tensor(pos) else None
    if expected is None or pos.shape[-1] != s or pos.dim() > 2 or not torch.equal(pos, expected.expand_as(pos)):
        raise ValueError(
            f"`position_ids` in the batch ({_describe(pos)}) are not 0..{s - 1} in every row. shard_batch computes "
            "the global positions itself; packed sequences (positions restarting inside a row) are not supported "
            "by the ring yet: drop `position_ids` and concatenate documents with continuous positions, or train "
            "this batch without context parallelism."
        )


def shift_labels_of(labels: torch.Tensor) -> torch.Tensor:
    """``labels[:, 1:]`` padded with ``-100`` at the end: position ``i`` holds the target of the token at ``i``."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def shard_batch(
    batch: Mapping[str, Any], group: dist.ProcessGroup | None = None, layout: str = "zigzag"
) -> dict[str, Any]:
    """This rank's share of a full causal-LM batch, ready for ``model(**out)`` inside ``context_parallel``.

    Every rank of the context-parallel group must pass the same full batch.

    Args:
        batch: a dict or ``BatchEncoding`` with ``input_ids`` ``[B, S]`` (or ``inputs_embeds`` ``[B, S, H]``),
            optionally ``labels`` ``[B, S]`` (unshifted, as for ``model(labels=...)``) or ``shift_labels``
            ``[B, S]`` (already shifted; then ``labels`` is ignored), an all-ones ``attention_mask``, and
            ``position_ids`` equal to ``0..S-1``.
        group: the context-parallel group; ``None`` is the group of the active
            :func:`~hf_ringcp.context_parallel`, else the default group (a world of 1 without
            torch.distributed).
        layout: ``"zigzag"`` (``S`` divisible by ``2 * cp_size``) or ``"contiguous"`` (divisible by ``cp_size``);
            must match the layout given to :func:`~hf_ringcp.context_parallel`.

    Returns:
        A new dict with ``S_local = S / cp`` tokens per row:

        - ``input_ids`` ``[B, S_local]`` (or ``inputs_embeds``): this rank's tokens in layout order.
        - ``position_ids`` ``[B, S_local]``: their *global* positions (for RoPE).
        - ``shift_labels`` ``[B, S_local]``: the target of each local token, i.e. the label of the next
          *global* token, shifted before sharding so the tokens at shard boundaries are predicted correctly;
          ``-100`` at the last global position. ``labels`` is not returned, so the model computes no loss of
          its own (use :func:`hf_ringcp.causal_lm_loss`).
        - every other tensor whose first two dimensions are ``[B, S]`` is sharded the same way; other
          entries pass through. An all-ones ``attention_mask`` is dropped.

    Raises:
        ValueError: padding in ``attention_mask``, non-standard ``position_ids`` (packed sequences), a
            sequence length not divisible by ``2 * cp_size`` (zigzag) or ``cp_size``, or mis-shaped labels.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(f"`batch` must be a dict or BatchEncoding, but got {type(batch).__name__}.")
    active = get_context()
    if group is None and active is not None:
        group = active.group
    ctx = make_context(group, layout=layout)
    items = dict(batch.items())
    b, s = _sequence_tensor(items).shape[:2]
    if s % ctx.seq_divisor != 0:
        multiple = f"2 * cp_size = {ctx.seq_divisor}" if layout == "zigzag" else f"cp_size = {ctx.seq_divisor}"
        raise ValueError(
            f"The sequence length ({s}) must be divisible by {multiple} for layout={layout!r}. Pad or pack "
            f"sequences to a multiple of {ctx.seq_divisor} (pad tokens at the end with labels -100, no "
            "attention_mask), or change the sequence length."
        )

    mask = items.pop("attention_mask", None)
    if mask is not None:
        _check_attention_mask(mask, b, s)
    pos = items.pop("position_ids", None)
    if pos is not None:
        _check_position_ids(pos, b, s)
    labels, shifted = items.pop("labels", None), items.pop("shift_labels", None)
    if shifted is None and labels is not None:
        if not torch.is_tensor(labels) or tuple(labels.shape) != (b, s):
            raise ValueError(f"`labels` must be [batch, seq] = [{b}, {s}], but got {_describe(labels)}.")
        shifted = shift_labels_of(labels)
    if shifted is not None and (not torch.is_tensor(shifted) or tuple(shifted.shape) != (b, s)):
        raise ValueError(f"`shift_labels` must be [batch, seq] = [{b}, {s}], but got {_describe(shifted)}.")

    out: dict[str, Any] = {}
    for name, value in items.items():
        per_token = torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == (b, s)
        out[name] = shard_sequence(value, 1, ctx.group, layout) if per_token else value
    device = _sequence_tensor(items).device
    positions = local_positions(s, layout, ctx.rank, ctx.world_size, device=device)
    out["position_ids"] = positions.unsqueeze(0).expand(b, -1).contiguous()
    if shifted is not None:
        out["shift_labels"] = shard_sequence(shifted, 1, ctx.group, layout)
    return out
