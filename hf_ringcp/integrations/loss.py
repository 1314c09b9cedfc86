"""Causal-LM loss on a context-parallel shard: chunked over tokens, normalised by the global token count.

At long context the logits dominate memory (128K tokens x 128K vocab is 67 GB in float32), so the head and
the cross-entropy run on chunks of tokens under activation checkpointing: one chunk's float32 logits exist at
a time, in the forward and again in the backward. Each rank returns ``local_sum / N`` with ``N`` the token
count over the whole group, so the losses of the ranks add up to the global mean and a SUM all-reduce of the
gradients over the group gives the unsharded model's gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf_ringcp.integrations.batch import IGNORE_INDEX
from hf_ringcp.integrations.context import get_context, resolve_group
from hf_ringcp.integrations.models import causal_lm, prepare_model, text_config
from hf_ringcp.ring.group import collective_device, group_rank_and_size

LogitsTransform = Callable[[torch.Tensor], torch.Tensor]

# Batch entries that are loss inputs, not model inputs (`labels` would make the model compute full logits).
_NOT_MODEL_INPUTS = ("shift_labels", "labels", "num_items_in_batch", "use_cache", "logits_to_keep")


def _chunk_loss_sum(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, transform: LogitsTransform | None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    logits = head(hidden).float()
    if transform is not None:
        logits = transform(logits)
    # torch's smoothing is transformers' LabelSmoother per token: (1 - eps) * nll + eps * mean over the vocabulary of
    # -log p, both zero at ignored targets; summed here and divided by the step's target count by the caller.
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=label_smoothing)


def check_label_smoothing(label_smoothing: float) -> float:
    """Return ``label_smoothing`` as a float, or raise unless ``0 <= label_smoothing <= 1``."""
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"`label_smoothing` must be in [0, 1] (0: off), but got {label_smoothing!r}.")
    return float(label_smoothing)


def chunked_cross_entropy_sum(
    hidden: torch.Tensor,
    head_module: torch.nn.Module,
    labels: torch.Tensor,
    chunk_size: int = 4096,
    *,
    logits_transform: LogitsTransform | None = None,
    logits_out: list[torch.Tensor] | None = None,
    label_smoothing: float = 0.0, cp_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``head_module(hidden)`` against ``labels``, ``chunk_size`` tokens at a time.

    Args:
        hidden: ``[..., S, H]`` final hidden states (after the final norm).
        head_module: the output head, called as a module on ``[n, H]`` chunks (so LoRA or ``modules_to_save``
            wrappers around it take part); returns ``[n, V]`` logits.
        labels: ``[..., S]`` target of each position, already aligned (``labels[..., i]`` is the token that
            should follow ``hidden[..., i, :]``), ``-100`` where ignored.
        chunk_size: tokens per chunk; the float32 logits of one chunk, ``[chunk_size, V]``, is the peak.
        logits_transform: applied to the float32 logits of each chunk before the loss (e.g. soft-capping).
        label_smoothing: ``eps`` of transformers' ``LabelSmoother`` (``TrainingArguments.label_smoothing_factor``):
            each target's loss is ``(1 - eps) * nll + eps * mean_v(-log p_v)``; ignored targets add nothing.
        logits_out: without autograd only (evaluation with ``compute_metrics``): a list that receives the
            ``[..., S, V]`` float32 logits the loss was computed from (the same chunks, concatenated).

    Returns:
        ``(loss_sum, count)``: float32 scalar sum of the token losses, int64 scalar number of non-ignored
        tokens. Under autograd each chunk is checkpointed: its logits are recomputed in the backward, never
        stored.
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be a positive int, but got {chunk_size!r}.")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"`hidden` {tuple(hidden.shape)} and `labels` {tuple(labels.shape)} must agree on all but the last "
            "dimension ([..., S, H] and [..., S])."
        )
    keep = logits_out is not None
    if keep and torch.is_grad_enabled():
        raise ValueError("`logits_out` is for evaluation: call chunked_cross_entropy_sum under torch.no_grad().")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).to(device=hidden.device, dtype=torch.long)
    label_smoothing = check_label_smoothing(label_smoothing)
    fn = functools.partial(_chunk_loss_sum, head=head_module, transform=logits_transform,
                           label_smoothing=label_smoothing)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    kept: list[torch.Tensor] = []
    for start in range(0, flat_labels.numel(), chunk_size):
        h, y = flat_hidden[start : start + chunk_size], flat_labels[start : start + chunk_size]
        if keep:
            logits = head_module(h).float()
            logits = logits if logits_transform is None else logits_transform(logits)
            kept.append(logits)
            total = total + F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum",
                                            label_smoothing=label_smoothing)
        elif torch.is_grad_enabled():
            total = total + checkpoint(fn, h, y, use_reentrant=False)
        else:
            total = total + fn(h, y)
    if keep:
        logits_out.append(torch.cat(kept).reshape(*labels.shape, -1))
    return total, (flat_labels != IGNORE_INDEX).sum()


def logits_transform_for(model: torch.nn.Module) -> LogitsTransform | None:
    """The transform the model's own forward applies between its head and the loss, or ``None``.

    Handles ``final_logit_softcapping`` (Gemma family: ``cap * tanh(logits / cap)``). Raises for
    ``logit_scale`` / ``logits_scaling``, whose direction (multiply or divide) differs between model families.
    """
    config = text_config(model)
    for name in ("logit_scale", "logits_scaling"):
        value = getattr(config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(
                f"The model config has {name}={value}, which some models multiply and others divide the logits "
                f"by; causal_lm_loss cannot tell which. Pass it explicitly, e.g. "
                f"logits_transform=lambda x: x * {value} (check the model's forward)."
            )
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is None:
        return None
    cap = float(cap)
    return lambda logits: torch.tanh(logits / cap) * cap


def _cp_group(group: dist.ProcessGroup | None) -> tuple[dist.ProcessGroup | None, int]:
    if get_context() is None:
        if group is not None and group_rank_and_size(group)[1] > 1:
            raise ValueError(
                "causal_lm_loss was given a context-parallel `group` of size > 1 but no hf_ringcp.context_parallel "
                "is active, so the attention would not span the group. Call it inside "
                "`with hf_ringcp.context_parallel(group, layout=...)`."
            )
        return None, 1
    group = resolve_group(group)
    return group, group_rank_and_size(group)[1]


def normalise(loss_sum: torch.Tensor, num_items: torch.Tensor | int, averaged_over: int = 1) -> torch.Tensor:
    """The loss rule, in one place: ``loss_sum * averaged_over / N``.

    Training: ``loss_sum`` is this rank's sum of token losses and ``N`` counts the loss targets of the whole step
    over every rank whose losses add up to the global mean; ``averaged_over`` is the number of ranks a
    data-parallel wrapper (DDP, FSDP) averages gradients over, which the factor turns back into a sum.
    Evaluation (:func:`group_mean`): both the sum and ``N`` are the CP group's (``averaged_over=1``).
    Every consumer uses it: the plugin's ``loss`` / ``eval_loss`` / ``loss_value``, the Trainer families
    (causal LM, SFT's eval, DPO's and GRPO's token sums). An all-ignored step gives 0, not NaN.
    """
    total = torch.as_tensor(num_items, device=loss_sum.device).to(loss_sum.dtype)
    return loss_sum * averaged_over / total.clamp(min=1)


def group_mean(
    local_sum: torch.Tensor | float, local_count: torch.Tensor | float, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """The eval form of :func:`normalise`: ``sum over group / count over group`` (one float64 all-reduce, no
    gradient); identical on every rank of ``group``. Returns a float32 scalar on ``local_sum``'s device."""
    device = local_sum.device if torch.is_tensor(local_sum) else None
    stats = torch.stack([torch.as_tensor(local_sum, dtype=torch.float64).detach().reshape(()).cpu(),
                         torch.as_tensor(local_count, dtype=torch.float64).detach().reshape(()).cpu()])
    if dist.is_initialized() and group_rank_and_size(group)[1] > 1:
        stats = stats.to(collective_device(group))
        dist.all_reduce(stats, group=group)
    return normalise(stats[0], stats[1]).float().to(device or stats.device)


def run_with_hidden(model: torch.nn.Module, batch: Mapping[str, Any], on_hidden: Callable[[torch.Tensor], Any]) -> Any:
    """Run the model's own forward and return ``on_hidden(decoder output [B, S, H])``; no full logits are made.

    Going through ``model(...)`` (not the decoder alone) keeps the wrappers' forward logic: DDP prepares its
    gradient reduction there, peft applies its forward hooks. ``on_hidden`` runs in a forward hook of the decoder
    (e.g. the head and the loss on chunks); the model's own head then sees an empty slice (``logits_to_keep``
    with no positions). Entries of ``batch`` that are loss inputs (``shift_labels``, ``labels``, ...) are dropped.
    """
    inner = causal_lm(model)
    if getattr(getattr(inner, "active_peft_config", None), "is_prompt_learning", False):
        raise ValueError(
            "hf_ringcp's chunked head does not support peft prompt-learning methods (their virtual tokens change the "
            "sequence length); use LoRA-style adapters."
        )
    result: list[Any] = []

    def on_decoder_output(module, args, output) -> None:
        result.append(on_hidden(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]))

    inputs = {k: v for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}
    device = next(v for v in batch.values() if torch.is_tensor(v)).device
    handle = inner.get_decoder().register_forward_hook(on_decoder_output)
    try:
        model(**inputs, use_cache=False, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    finally:
        handle.remove()
    if len(result) != 1:
        raise RuntimeError(f"expected the decoder to run once in the model's forward, but it ran {len(result)} times.")
    return result[0]


def causal_lm_loss_sum(
    model: torch.nn.Module, sharded_batch: Mapping[str, Any], *, chunk_size: int = 4096,
    logits_transform: LogitsTransform | None = None, logits_out: list[torch.Tensor] | None = None,
    label_smoothing: float = 0.0, cp_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's ``(loss_sum, count)`` of a shard (see :func:`chunked_cross_entropy_sum`), through the model's
    own forward; :func:`normalise` (training) or :func:`group_mean` (evaluation) turns them into the loss.
    ``logits_out`` (evaluation only) receives the ``[R, S_local, V]`` logits of the same chunks; ``cp_size`` (the
    CP group's size, when known) lets :func:`prepare_model` refuse models that mix tokens outside attention."""
    labels = sharded_batch.get("shift_labels")
    if labels is None:
        raise ValueError(
            "causal_lm_loss needs `shift_labels` (labels shifted before sharding); build the batch with "
            "hf_ringcp.shard_batch(batch, group, layout=...) from a batch that has `labels`."
        )
    prepare_model(model, cp_size=cp_size)
    if logits_transform is None:
        logits_transform = logits_transform_for(model)
    head = causal_lm(model).get_output_embeddings()
    return run_with_hidden(model, sharded_batch, lambda hidden: chunked_cross_entropy_sum(
        hidden, head, labels, chunk_size, logits_transform=logits_transform, logits_out=logits_out,
        label_smoothing=label_smoothing))


def causal_lm_loss(
    model: torch.nn.Module,
    sharded_batch: Mapping[str, Any],
    *,
    group: dist.ProcessGroup | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = 4096,
    logits_transform: LogitsTransform | None = None,
    averaged_over: int = 1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """This rank's share of the causal-LM loss: ``sum of local token losses * averaged_over / N``.

    Runs the model's forward on the local tokens, taking the decoder output (``model.get_decoder()``) to the
    output head (``model.get_output_embeddings()``, called as a module) and the cross-entropy in checkpointed
    chunks, so full ``[S_local, V]`` logits are never held; the model's own head gets no positions
    (``logits_to_keep``). Works for ``*ForCausalLM`` models, peft ``PeftModel`` wrappers of them (LoRA,
    including on ``lm_head`` or as ``modules_to_save``) and DDP around either. Call it inside
    :func:`~hf_ringcp.context_parallel`, and call ``backward()`` there too when gradient checkpointing is on.

    Args:
        model: a ``*ForCausalLM`` (or ``PeftModel``, possibly inside DDP) loaded with
            ``attn_implementation="ring"``.
        sharded_batch: the output of :func:`~hf_ringcp.shard_batch`: ``input_ids`` and ``position_ids``
            ``[B, S_local]`` and ``shift_labels`` ``[B, S_local]`` (the target of each local token, ``-100``
            where ignored); other entries go to the decoder.
        group: the context-parallel group; ``None`` is the group of the active context (a world of 1 with
            no active context).
        num_items_in_batch: ``N``, the number of non-ignored targets across the whole CP group and all
            gradient-accumulation micro-batches of the step; ``None`` counts this micro-batch's targets over
            the group (one all-reduce).
        chunk_size: tokens per head/loss chunk.
        logits_transform: applied to float32 logits before the loss; by default derived from the model
            config (``final_logit_softcapping``).
        averaged_over: the number of ranks whose gradients a wrapper averages (DDP/FSDP over the whole world);
            see :func:`normalise`.
        label_smoothing: transformers' ``LabelSmoother`` epsilon (``TrainingArguments.label_smoothing_factor``); its
            smoothed term is normalised by the same ``N`` (times the vocabulary size), so the sum over the group
            equals the single-process smoothed loss, gradient accumulation included.

    Returns:
        float32 scalar ``local_sum * averaged_over / N``. With ``averaged_over=1`` the sum over the CP ranks is the
        global token-mean loss; after ``backward()`` on every rank, a SUM all-reduce of the gradients over the CP
        group gives the gradients of the unsharded model.
    """
    group, world = _cp_group(group)
    loss_sum, count = causal_lm_loss_sum(model, sharded_batch, chunk_size=chunk_size, cp_size=world,
                                         logits_transform=logits_transform, label_smoothing=label_smoothing)
    if num_items_in_batch is None:
        if world > 1:
            dist.all_reduce(count, group=group)
        num_items_in_batch = count
    return normalise(loss_sum, num_items_in_batch, averaged_over)
