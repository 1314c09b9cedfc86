"""TRL's ``DPOTrainer`` under context parallelism: the DPO family, one subclass of :class:`RingCPTrainerMixin`.

TRL's ``_compute_loss`` scores the ``[chosen; rejected]`` rows with its fused LM head,
``model(input_ids, attention_mask, labels, fused_lm_head=True)``, for the policy and (``self.model`` with the adapter
disabled, or ``self.ref_model``) the reference, and computes every loss type and metric from the per-token outputs.
For the duration of ``compute_loss`` this family hooks those model calls (forward pre/post hooks, removed after):

- the pre-hook shards the call's batch (:func:`hf_ringcp.shard_batch`: padding dropped, rows packed, labels shifted
  per sequence) so each rank scores only its shard with the fused head, pre-shifted ``shift_labels``, never
  full-vocabulary logits;
- the post-hook puts the per-token outputs (``log_probs``, ``entropy``, ``mean_logits``, ``is_top1``, ...) back
  into the ``[2B, S - 1]`` layout TRL expects, exact over the group by one differentiable all-reduce each
  (:func:`hf_ringcp.integrations.logprobs.gather_tokens`).

TRL's own code then computes the loss and its metrics unchanged, identical on the group's ranks; the gradient
reaches each rank's shard through the all-reduce's backward (see :mod:`~hf_ringcp.integrations.logprobs`).
``precompute_ref_log_probs`` is refused under CP for now (TRL's pass would store each group's batch ``cp_size`` times).
"""

from __future__ import annotations

from typing import Any

import torch

from hf_ringcp.integrations.logprobs import gather_tokens
from hf_ringcp.integrations.trainer_mixin import RingCPTrainerMixin

#: The per-token fields of TRL's ``FusedCausalLMOutput`` (trl 1.16) that come back whole.
_TOKEN_FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


class RingCPDPOMixin(RingCPTrainerMixin):
    """Context parallelism for ``trl.DPOTrainer``: ``class MyDPO(RingCPDPOMixin, DPOTrainer)``, or the callback."""

    _ringcp_shards_batches = False  # the batch is sharded at the model calls of TRL's loss

    def _ringcp_setup(self) -> None:
        # (Runs inside Trainer.__init__, before DPOTrainer sets its own attributes: read its arguments.)
        plugin = self.ring_cp.plugin
        if self.args.precompute_ref_log_probs and plugin.cp_size > 1:
            # TRL's pass gathers the [B] reference log-probs of every rank into its dataset, so the CP group's
            # copies of one batch would be stored twice and misaligned.
            raise ValueError(
                "precompute_ref_log_probs=True is not supported with RingCPCallback(cp_size>1) yet. Set "
                "precompute_ref_log_probs=False (the reference is then scored sharded at every step), or precompute "
                "the reference log-probs in a run without context parallelism and pass a dataset that has "
                "`ref_chosen_logps` / `ref_rejected_logps`."
            )

    def _prepare_context_parallel_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]):
        return self.ring_cp.plugin.context, inputs  # whole batch: the model calls are sharded by the hooks

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        plugin = self.ring_cp.plugin
        if self.ref_model is not None:
            plugin.prepare_model(self.ref_model)  # sharded the same way: "ring" attention too (idempotent)
        active: list[tuple[torch.nn.Module, dict[str, Any]]] = []

        def shard_call(module, args, kwargs):
            if active or not kwargs.get("fused_lm_head") or kwargs.get("labels") is None:
                return None  # an inner module of a call already sharded, or not a scoring call
            sharded = plugin.shard({k: kwargs[k] for k in _BATCH_KEYS if kwargs.get(k) is not None})
            if module.training and torch.is_grad_enabled():  # the policy's scoring (not the reference's)
                self._ringcp_count_tokens(sharded)
            active.append((module, sharded))
            return args, {**{k: v for k, v in kwargs.items() if k not in _BATCH_KEYS}, **sharded}

        def whole_outputs(module, args, kwargs, output):
            if not active or active[-1][0] is not module:
                return None
            _, sharded = active.pop()
            for name in _TOKEN_FIELDS:
                value = getattr(output, name, None)
                if value is not None:
                    # [R, S_local] -> [2B, S]; position i scores token i + 1, as TRL's [:, :-1] of the full rows.
                    full = gather_tokens(value.float(), sharded, plugin.cp_group)[:, :-1]
                    setattr(output, name, full.to(value.dtype) if value.dtype != torch.bool else full > 0.5)
            return output

        modules = {id(m): m for m in (model, self.model, self.ref_model) if m is not None}
        handles = [h for m in modules.values() for h in (
            m.register_forward_pre_hook(shard_call, with_kwargs=True),
            m.register_forward_hook(whole_outputs, with_kwargs=True))]
        mode = "train" if self.model.training else "eval"
        tokens_before = self._total_train_tokens
        try:
            with plugin.context():
                result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                              num_items_in_batch=num_items_in_batch)
        finally:
            for handle in handles:
                handle.remove()
        if mode == "train" and plugin.cp_size > 1:
            # TRL sums the batch's tokens over all ranks; a CP group's ranks hold the same batch: count it once.
            self._total_train_tokens = tokens_before + (self._total_train_tokens - tokens_before) // plugin.cp_size
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return result


__all__ = ["RingCPDPOMixin"]
