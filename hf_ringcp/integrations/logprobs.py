"""Per-token log-probabilities of a sharded batch, and their exact per-sequence sums over the CP group.

The primitive under preference and RL objectives (DPO, GRPO, ORPO, KTO, SimPO...): each rank scores its shard with
the chunked head (no full-vocabulary logits), then one differentiable all-reduce over the group puts every value
where it belongs in the unsharded batch — per sequence (:func:`sequence_log_probs`) or per token
(:func:`gather_tokens`). The all-reduce's backward sums the gradient over the group too: every rank of the group
computes the same objective from the same reduced values, so each rank's shard receives ``cp_size`` times its own
gradient, which DDP/FSDP's average over all ``dp * cp`` ranks turns into the exact gradient of the data-parallel
mean (the same factor :func:`hf_ringcp.integrations.loss.normalise` applies with ``averaged_over``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf_ringcp.integrations.batch import IGNORE_INDEX, SHARD_KEY
from hf_ringcp.integrations.context import resolve_group
from hf_ringcp.integrations.loss import LogitsTransform, logits_transform_for, run_with_hidden
from hf_ringcp.integrations.models import causal_lm, prepare_model
from hf_ringcp.ring import Layout
from hf_ringcp.ring.group import group_rank_and_size


def _chunk_log_probs(hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module,
                     transform: LogitsTransform | None, temperature: float) -> torch.Tensor:
    logits = head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    return -F.cross_entropy(logits / temperature, labels, ignore_index=IGNORE_INDEX, reduction="none")


def token_log_probs(
    model: torch.nn.Module, sharded_batch: Mapping[str, Any], *, chunk_size: int = 4096,
    logits_transform: LogitsTransform | None = None, temperature: float = 1.0,
) -> torch.Tensor:
    """``log p(shift_labels)`` of every local token of a shard: float32 ``[R, S_local]``, 0 where ignored.

    Runs the model's own forward (inside :func:`~hf_ringcp.context_parallel`) and the head on checkpointed chunks of
    ``chunk_size`` tokens. ``temperature`` divides the logits (as TRL's GRPO does). Differentiable.
    """
    labels = sharded_batch["shift_labels"]
    prepare_model(model)
    transform = logits_transform_for(model) if logits_transform is None else logits_transform
    head = causal_lm(model).get_output_embeddings()
    fn = functools.partial(_chunk_log_probs, head=head, transform=transform, temperature=temperature)

    def on_hidden(hidden: torch.Tensor) -> torch.Tensor:
        flat_h, flat_y = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).to(hidden.device, torch.long)
        parts = [checkpoint(fn, flat_h[a : a + chunk_size], flat_y[a : a + chunk_size], use_reentrant=False)
                 if torch.is_grad_enabled() else fn(flat_h[a : a + chunk_size], flat_y[a : a + chunk_size])
                 for a in range(0, flat_y.numel(), chunk_size)]
        return torch.cat(parts).reshape(labels.shape)

    return run_with_hidden(model, sharded_batch, on_hidden)


def source_index(sharded_batch: Mapping[str, Any], group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """For every local token of a shard, its flat index into the unsharded ``[B, S]`` batch (``-1``: padding the
    sharding added). int64 ``[R, S_local]``."""
    info = sharded_batch.get(SHARD_KEY)
    ids = sharded_batch["input_ids"]
    if info is None:  # plain rows, nothing added: the layout's positions of this rank in every row
        rank, world = group_rank_and_size(resolve_group(group))
        local = Layout.for_name(getattr(_context_layout(), "layout", "zigzag"), world).placement(
            ids.shape[1] * world).positions(rank, ids.device)
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None] * (ids.shape[1] * world)
        return rows + local[None]
    local = info.placement.positions(info.rank, ids.device)
    _, s = info.source_shape
    if info.source_index is not None:
        return info.source_index.to(ids.device).index_select(1, local)
    rows = torch.arange(info.rows, device=ids.device)[:, None]
    return torch.where(local[None] < s, rows * s + local[None], torch.full_like(local[None], -1))


def _context_layout():
    from hf_ringcp.integrations.context import get_context

    return get_context()


def group_sum_into(values: torch.Tensor, index: torch.Tensor, size: int,
                   group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """``out[index[i]] += values[i]`` over every rank of ``group`` (``index < 0`` dropped): float32 ``[size, ...]``,
    identical on the group's ranks; one differentiable all-reduce (its backward sums the gradient over the group)."""
    flat = values.reshape(index.numel(), *values.shape[index.dim():]).float()
    keep = index.reshape(-1) >= 0
    out = flat.new_zeros((size, *flat.shape[1:])).index_add(0, index.reshape(-1)[keep], flat[keep])
    group = resolve_group(group)
    if dist.is_initialized() and group_rank_and_size(group)[1] > 1:
        out = dist_fn.all_reduce(out, group=group or dist.group.WORLD)
    return out


def gather_tokens(per_token: torch.Tensor, sharded_batch: Mapping[str, Any],
                  group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Per-token values of a shard ``[R, S_local, ...]`` -> ``[B, S, ...]`` in the unsharded batch's order (0 at
    padding), identical on the group's ranks; differentiable (see the module docstring for the gradient)."""
    index = source_index(sharded_batch, group)
    b, s = _source_shape(sharded_batch, group)
    return group_sum_into(per_token, index, b * s, group).reshape(b, s, *per_token.shape[index.dim():])


def sequence_log_probs(per_token: torch.Tensor, sharded_batch: Mapping[str, Any],
                       group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Exact per-sequence sums ``[B]`` of a shard's per-token values (e.g. :func:`token_log_probs`), over the group:
    one differentiable all-reduce of ``B`` floats. A sequence is a row of the unsharded batch (a padded row's
    padding adds nothing)."""
    index = source_index(sharded_batch, group)
    b, s = _source_shape(sharded_batch, group)
    rows = torch.where(index >= 0, index // s, index)
    return group_sum_into(per_token, rows, b, group)


def _source_shape(sharded_batch: Mapping[str, Any], group: dist.ProcessGroup | None) -> tuple[int, int]:
    info = sharded_batch.get(SHARD_KEY)
    if info is not None:
        return info.source_shape
    ids = sharded_batch["input_ids"]
    return ids.shape[0], ids.shape[1] * group_rank_and_size(resolve_group(group))[1]


__all__ = ["gather_tokens", "group_sum_into", "sequence_log_probs", "source_index", "token_log_probs"]
