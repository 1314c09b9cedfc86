"""TRL's ``GRPOTrainer`` under context parallelism: the GRPO family, one subclass of :class:`RingCPTrainerMixin`.

Every scoring call of TRL's GRPO (``_get_per_token_logps_and_entropies``: the policy in the loss step, the old
policy and the reference in ``_generate_and_score_completions``) is ``model(input_ids, attention_mask, labels,
fused_lm_head=True)`` on the ``[B, P + C]`` prompt + completion rows. This family overrides that method: a forward
pre-hook shards the call's batch (:func:`hf_ringcp.shard_batch`: padding dropped, labels pre-shifted), each rank
scores its shard with TRL's fused head (never full-vocabulary logits), and a post-hook puts ``log_probs`` and
``entropy`` back in the ``[B, P + C - 1]`` layout, exact over the group by one differentiable all-reduce each
(:func:`~hf_ringcp.integrations.logprobs.gather_tokens`). TRL's clipped objective, every ``loss_type`` and its
normalisations and metrics then run unchanged on whole per-token tensors, identical on the group's ranks.

The rollout is a data-parallel step, seen with one process per CP group: while TRL makes and scores completions
and computes the loss, ``self.accelerator`` is :class:`DataParallelView` (``process_index``/``num_processes`` of
the DP groups, gathers and sums that keep one copy per group), so advantages, ``num_items_in_batch`` and metrics are
those of the same run without CP. Generation runs with CP suspended on whole rows (``"ring"`` is SDPA there), on
every rank; the group's rank 0 then broadcasts its completions and its RNG state, so the group holds the same
completions whatever the backend (``transformers``, vLLM server or colocate) and its RNG streams stay together.
``generation_batch_size`` counts DP groups (``per_device_train_batch_size * dp * steps_per_generation``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from hf_ringcp.integrations import compat
from hf_ringcp.integrations.context import without_context_parallel
from hf_ringcp.integrations.logprobs import gather_tokens
from hf_ringcp.integrations.trainer_mixin import RingCPTrainerMixin

#: The per-token fields of TRL's ``FusedCausalLMOutput`` (trl 1.16) that GRPO reads.
_TOKEN_FIELDS = ("log_probs", "entropy")
_BATCH_KEYS = ("input_ids", "attention_mask", "labels", "position_ids")


class DataParallelView:
    """An ``Accelerator`` seen with one process per CP group (every rank of a group holds the same rollout)."""

    def __init__(self, accelerator: Any, cp_size: int) -> None:
        self._accelerator, self._cp = accelerator, cp_size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)

    @property
    def process_index(self) -> int:
        return self._accelerator.process_index // self._cp  # the mesh's DP rank: rank = dp_rank * cp + cp_rank

    @property
    def num_processes(self) -> int:
        return self._accelerator.num_processes // self._cp

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[world * n, ...]`` -> ``[dp * n, ...]``: the first rank of each CP group."""
        full = self._accelerator.gather(tensor)
        blocks = full.reshape(self._accelerator.num_processes, -1, *full.shape[1:])[:: self._cp]
        return blocks.reshape(-1, *full.shape[1:])

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum", scale: float = 1.0) -> torch.Tensor:
        out = self._accelerator.reduce(tensor, reduction=reduction, scale=scale)
        return out / self._cp if reduction == "sum" else out  # a group's copies count once; a mean is unchanged


class RingCPGRPOMixin(RingCPTrainerMixin):
    """Context parallelism for ``trl.GRPOTrainer``: ``class MyGRPO(RingCPGRPOMixin, GRPOTrainer)``, or the callback."""

    _ringcp_shards_batches = False  # the batch is sharded at TRL's scoring calls
    _ringcp_tokens_counted_per_rank = False  # TRL counts the rollout's tokens with the (DP view's) gather

    @property
    def accelerator(self) -> Any:
        accelerator = self.__dict__["accelerator"]
        views = self.__dict__.get("_ringcp_views", 0)
        return DataParallelView(accelerator, self.ring_cp.plugin.cp_size) if views else accelerator

    @accelerator.setter
    def accelerator(self, value: Any) -> None:
        self.__dict__["accelerator"] = value

    @contextlib.contextmanager
    def _ringcp_data_parallel_view(self) -> Iterator[None]:
        self.__dict__["_ringcp_views"] = self.__dict__.get("_ringcp_views", 0) + 1
        try:
            yield
        finally:
            self.__dict__["_ringcp_views"] -= 1

    def _ringcp_setup(self) -> None:
        # (Runs inside Trainer.__init__, after GRPOConfig computed its batch sizes over the whole world.)
        compat.check_grpo(type(self))
        args, plugin = self.args, self.ring_cp.plugin
        args.generation_batch_size = args.per_device_train_batch_size * plugin.dp_size * args.steps_per_generation
        if args.generation_batch_size % args.num_generations:
            raise ValueError(
                f"Under context parallelism the generation batch counts data-parallel groups: "
                f"per_device_train_batch_size ({args.per_device_train_batch_size}) * dp ({plugin.dp_size}) * "
                f"steps_per_generation ({args.steps_per_generation}) = {args.generation_batch_size} is not divisible "
                f"by num_generations ({args.num_generations}). Raise steps_per_generation or "
                "per_device_train_batch_size, or lower num_generations."
            )

    def _prepare_context_parallel_inputs(self, model: torch.nn.Module, inputs: Any):
        # Whole rollout batch: generation needs whole prompts; the scoring calls are sharded by the hooks.
        return self.ring_cp.plugin.context, inputs

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        with self._ringcp_data_parallel_view():
            return super()._generate_and_score_completions(inputs)

    def _calculate_rewards(self, inputs: list[dict[str, Any]], *args: Any, **kwargs: Any) -> torch.Tensor:
        # TRL gathers the rewards over every process ([world * n, F]): keep one copy per CP group, as the DP view.
        rewards = super()._calculate_rewards(inputs, *args, **kwargs)
        cp, world = self.ring_cp.plugin.cp_size, self.__dict__["accelerator"].num_processes
        return rewards.reshape(world, -1, *rewards.shape[1:])[::cp].reshape(-1, *rewards.shape[1:])

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        with self._ringcp_data_parallel_view():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    def _generate_single_turn(self, *args: Any, **kwargs: Any):
        plugin = self.ring_cp.plugin
        with without_context_parallel():
            completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
        if plugin.cp_size == 1:
            return completion_ids, logprobs
        # The group's rank 0 is the source of the rollout: its completions, and its RNG state after sampling (TRL
        # shuffles the rollout with torch's generator next; ranks that sampled differently must not diverge).
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        shared = [completion_ids, logprobs, torch.get_rng_state(), cuda]
        dist.broadcast_object_list(shared, group=plugin.cp_group, group_src=0)
        torch.set_rng_state(shared[2])
        if shared[3] is not None:
            torch.cuda.set_rng_state(shared[3])
        return shared[0], shared[1]

    def _get_per_token_logps_and_entropies(self, model: torch.nn.Module, *args: Any, **kwargs: Any):
        # compat.GRPO_SCORING: TRL's one scoring path (policy, old policy, reference).
        plugin = self.ring_cp.plugin
        if model is self.ref_model:
            plugin.prepare_model(model)  # sharded the same way: "ring" attention too (idempotent)
        shards: list[dict[str, Any]] = []

        def shard_call(module, call_args, call_kwargs):
            if not call_kwargs.get("fused_lm_head") or call_kwargs.get("labels") is None:
                return None
            sharded = plugin.shard({k: call_kwargs[k] for k in _BATCH_KEYS if call_kwargs.get(k) is not None})
            if module.training and torch.is_grad_enabled():  # the loss step's policy (not the old policy, reference)
                self._ringcp_count_tokens(sharded)
            shards.append(sharded)
            return call_args, {**{k: v for k, v in call_kwargs.items() if k not in _BATCH_KEYS}, **sharded}

        def whole_outputs(module, call_args, call_kwargs, output):
            if not shards:
                return None
            sharded = shards.pop()
            for name in _TOKEN_FIELDS:
                value = getattr(output, name, None)
                if value is not None:  # [R, S_local] -> [B, S - 1]: position i scores token i + 1, as TRL's
                    whole = gather_tokens(value.float(), sharded, plugin.cp_group)[:, :-1]
                    setattr(output, name, whole.to(value.dtype))
            return output

        handles = (model.register_forward_pre_hook(shard_call, with_kwargs=True),
                   model.register_forward_hook(whole_outputs, with_kwargs=True))
        try:
            with plugin.context():
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()


__all__ = ["DataParallelView", "RingCPGRPOMixin"]
