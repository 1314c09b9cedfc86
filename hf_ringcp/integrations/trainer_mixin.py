"""``RingCPTrainerMixin``: context parallelism for ``transformers.Trainer`` and TRL's trainers, at class level.

The Trainer's behaviour under CP lives in methods that override the Trainer's and call ``super()`` — the way TRL's
trainers specialise ``Trainer`` — never in patches of an instance or of transformers' classes:

- ``_prepare_context_parallel_inputs`` (the Trainer's own CP hand-over point, called by ``training_step`` and
  ``Trainer.prediction_step``) shards the batch (:func:`hf_ringcp.shard_batch`) and returns
  :func:`hf_ringcp.context_parallel` as the step's context;
- ``get_batch_samples`` counts the step's loss targets by the loss's own rules, once per CP group;
- ``compute_loss``: where the Trainer's own ``compute_loss`` would run, the chunked causal-LM loss (no
  full-vocabulary logits); a trainer whose loss scores the shard's ``shift_labels`` (TRL's ``SFTTrainer``, or a
  subclass vouched for with ``custom_compute_loss=True``) keeps its own;
- ``prediction_step`` makes the eval loss the CP group's token mean and the logits whole;
- ``gather_function`` keeps one copy of each CP group's eval outputs; ``log`` adds tokens/s, memory, the layout.

Two ways in: ``class MyTrainer(RingCPTrainerMixin, SFTTrainer)`` with ``callbacks=[RingCPCallback(...)]``, or the
plain trainer with the callback alone, whose ``on_init_end`` turns the instance into :func:`ring_cp_class` of its
class (one subclass per class, made once). The per-run state (plugin, shard cache, meter) lives on the callback.
Other trainer families are one module each (:mod:`hf_ringcp.integrations.dpo`, :mod:`~hf_ringcp.integrations.grpo`)
with a subclass of this mixin; :func:`family_mixin` picks it.
"""

from __future__ import annotations

import importlib
import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from hf_ringcp.integrations import compat
from hf_ringcp.integrations.batch import SHARD_KEY, local_targets, unshard_predictions
from hf_ringcp.integrations.loss import group_mean

if TYPE_CHECKING:
    from hf_ringcp.integrations.trainer_callback import RingCPCallback

#: TRL trainer families -> the module and mixin serving them (``None``: this module's mixin).
TRL_FAMILIES: dict[str, tuple[str, str] | None] = {
    "SFTTrainer": None,
    "DPOTrainer": ("hf_ringcp.integrations.dpo", "RingCPDPOMixin"),
    "GRPOTrainer": ("hf_ringcp.integrations.grpo", "RingCPGRPOMixin"),
}
SUPPORTED = ("transformers.Trainer (keeping its compute_loss, or custom_compute_loss=True), "
             + ", ".join(f"trl.{name}" for name in TRL_FAMILIES))


def _own(cls: type) -> bool:
    return cls.__module__.startswith("hf_ringcp.")


def _owner(cls: type, name: str) -> type | None:
    """The class whose ``name`` runs for instances of ``cls``, skipping hf_ringcp's own mixins."""
    return next((k for k in cls.__mro__ if not _own(k) and name in vars(k)), None)


def _class_value(cls: type, name: str, default: Any = None) -> Any:
    """The class attribute ``name`` of the trainer's own classes (e.g. TRL's ``loss_is_scaled_for_ga = True``),
    which the mixin's property of the same name would otherwise hide."""
    owner = _owner(cls, name)
    return default if owner is None else vars(owner)[name]


def label_smoothing_of(trainer: Any) -> float:
    """The epsilon of the Trainer's own ``LabelSmoother`` (``label_smoothing_factor``), 0.0 without one."""
    smoother = getattr(trainer, "label_smoother", None)
    return 0.0 if smoother is None else float(smoother.epsilon)


def wrapped_for_training_by_train(trainer: Any) -> bool:
    """Whether ``train()`` wraps the model for data parallelism with ``accelerator.prepare`` (DDP): a world of
    several processes without FSDP, DeepSpeed or a transformers-sharded model, which are prepared their own way."""
    own_way = ("is_fsdp_enabled", "is_deepspeed_enabled", "is_distributed_loading_by_transformers")
    return dist.is_initialized() and dist.get_world_size() > 1 and not any(getattr(trainer, a, False) for a in own_way)


def _trainer_class() -> type:
    from transformers import Trainer

    return Trainer


class RingCPTrainerMixin:
    """Context parallelism for ``transformers.Trainer`` / TRL's ``SFTTrainer`` by class-level overrides.

    Use ``class MyTrainer(RingCPTrainerMixin, SFTTrainer)`` and pass ``callbacks=[RingCPCallback(cp_size=...)]``
    (the callback carries the settings and the per-run state); or pass only the callback to the plain trainer.
    """

    #: Whether this family shards whole batches at the Trainer's CP hand-over and counts ``N`` over labels.
    _ringcp_shards_batches = True
    #: Whether ``state.num_input_tokens_seen`` grows by every rank's copy of the batch (the Trainer's own count),
    #: so the callback counts a CP group's tokens once; a family whose trainer counts per DP group says False.
    _ringcp_tokens_counted_per_rank = True

    # ------------------------------------------------------------------------------------------- state

    @property
    def ring_cp(self) -> RingCPCallback:
        """The :class:`RingCPCallback` of this trainer (plugin, shard cache, throughput meter)."""
        from hf_ringcp.integrations.trainer_callback import RingCPCallback

        for callback in self.callback_handler.callbacks:
            if isinstance(callback, RingCPCallback):
                return callback
        raise RuntimeError(f"{type(self).__name__} uses RingCPTrainerMixin but has no RingCPCallback: pass "
                           "callbacks=[RingCPCallback(cp_size=...)] to the trainer.")

    @classmethod
    def _ringcp_chunked_loss(cls) -> bool:
        """Whether the loss is ours (the chunked causal-LM loss): the trainer's ``compute_loss`` is Trainer's."""
        return _owner(cls, "compute_loss") is _trainer_class()

    # The Trainer reads these in training_step to decide whether to divide the loss by the accumulation steps; the
    # chunked loss is already normalised over the whole step (num_items_in_batch). Data descriptors, so the values
    # Trainer.__init__ stores stay in the instance's dict and the instance itself is not changed.
    @property
    def loss_is_scaled_for_ga(self) -> bool | None:
        return True if self._ringcp_chunked_loss() else self.__dict__.get(
            "loss_is_scaled_for_ga", _class_value(type(self), "loss_is_scaled_for_ga"))

    @loss_is_scaled_for_ga.setter
    def loss_is_scaled_for_ga(self, value: bool | None) -> None:
        self.__dict__["loss_is_scaled_for_ga"] = value

    @property
    def model_accepts_loss_kwargs(self) -> bool:
        return True if self._ringcp_chunked_loss() else self.__dict__.get(
            "model_accepts_loss_kwargs", _class_value(type(self), "model_accepts_loss_kwargs", False))

    @model_accepts_loss_kwargs.setter
    def model_accepts_loss_kwargs(self, value: bool) -> None:
        self.__dict__["model_accepts_loss_kwargs"] = value

    @property
    def gather_function(self):
        """The evaluation loop's gather: one copy of each CP group's outputs (all its ranks hold the same data)."""
        return self._ringcp_gather

    @gather_function.setter
    def gather_function(self, value: Any) -> None:
        self.__dict__["gather_function"] = value  # the Trainer's default, kept but not used

    def _ringcp_setup(self) -> None:
        """Called once by the callback after the class is set (a family prepares e.g. its reference model)."""

    # ------------------------------------------------------------------------------------------- steps

    def _ringcp_count_tokens(self, sharded: dict[str, Any]) -> None:
        """Add a trained shard's real tokens (its CP padding not counted) to the throughput meter."""
        info = sharded.get(SHARD_KEY)
        self.ring_cp.meter.add(int(sharded["input_ids"].numel()) - (0 if info is None else info.local_padding()))

    def _prepare_context_parallel_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]):
        # compat.TRAINER_CP_SEAM: the Trainer's own hand-over of a batch for context parallelism.
        state = self.ring_cp
        sharded = state.shard(inputs)
        if model.training:
            self._ringcp_count_tokens(sharded)
            if state.neftune:
                # The hook's amplitude is alpha / sqrt(L_shard * d); alpha * sqrt(L_shard / L) makes it
                # alpha / sqrt(L * d), L the batch's length before the CP padding, as in one process.
                scale = math.sqrt(sharded["input_ids"].shape[-1] / inputs["input_ids"].shape[-1])
                for module in state.neftune:
                    module.neftune_noise_alpha = self.neftune_noise_alpha * scale
        return state.plugin.context, dict(sharded)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device):
        samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not samples or not self._ringcp_shards_batches:
            return samples, num_items
        # N by the loss's own rules, counted once per CP group (every CP rank holds the full batch).
        state = self.ring_cp
        return samples, state.plugin.count_items([state.shard(batch, keep=True) for batch in samples])

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        if not self._ringcp_chunked_loss():
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # `inputs` is the shard (the hand-over made it); the step's context is in force. `use_liger_kernel=True`
        # asks the model to skip its logits; the chunked loss never makes full logits anyway.
        state = self.ring_cp
        plugin = state.plugin
        inputs = {k: v for k, v in inputs.items() if k != "skip_logits"}
        if model.training:
            if num_items_in_batch is None:  # a Trainer path that counted nothing: count this micro-batch
                num_items_in_batch = plugin.count_items([inputs]) * compat.accumulation_steps(self)
            loss = plugin.loss(model, inputs, num_items_in_batch=num_items_in_batch,
                               label_smoothing=label_smoothing_of(self))
            outputs: dict[str, Any] = {"loss": loss}
        elif return_outputs and state.want_logits:
            loss, logits = plugin.eval_loss(model, inputs, return_logits=True, label_smoothing=label_smoothing_of(self))
            outputs = {"loss": loss, "logits": logits}
        else:
            loss = plugin.eval_loss(model, inputs, label_smoothing=label_smoothing_of(self))
            outputs = {"loss": loss}
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: torch.nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None):
        state = self.ring_cp
        state.want_logits = not prediction_loss_only
        try:
            if not self._ringcp_shards_batches or _owner(type(self), "prediction_step") is _trainer_class():
                # Trainer.prediction_step shards through the hand-over itself (and other families shard inside).
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
            sharded = state.shard(inputs)
            with state.plugin.context():
                loss, logits, _ = super().prediction_step(model, dict(sharded), prediction_loss_only,
                                                          ignore_keys=ignore_keys)
            # A per-shard token mean (e.g. SFTTrainer's) -> the CP group's token mean; sharded logits -> whole.
            if loss is not None:
                n = local_targets(sharded)
                loss = group_mean(loss.detach().double() * n, n, state.plugin.cp_group).to(loss.device)
            if logits is not None:
                logits = unshard_predictions(logits, sharded.get(SHARD_KEY), state.plugin.cp_group,
                                             state.plugin.layout)
            return loss, logits, inputs.get("labels")
        finally:
            state.want_logits = False

    def evaluation_loop(self, *args: Any, **kwargs: Any):
        self._ringcp_prepare_for_training_before_first_eval()
        return super().evaluation_loop(*args, **kwargs)

    def _ringcp_prepare_for_training_before_first_eval(self) -> None:
        """``evaluate()``/``predict()`` before ``train()``: wrap the model for training (DDP) now, as ``train()`` would.

        Otherwise the Trainer's evaluation prepares the bare model in evaluation mode (no DDP) and Accelerate marks
        it prepared, so the later ``train()`` gets it back unwrapped and each rank steps on its own shard's gradient
        (transformers 5.25 / accelerate 1.16, and plain multi-process DDP too). With ``model_wrapped`` set,
        ``train()`` reuses the wrapped model as on a second ``train()`` call, and evaluation skips its own prepare.
        """
        if self.is_in_train or self.model_wrapped is not self.model or not wrapped_for_training_by_train(self):
            return
        self.model_wrapped = self.accelerator.prepare_model(self.model)

    def _ringcp_gather(self, tensors: Any) -> Any:
        accelerator, cp = self.accelerator, self.ring_cp.plugin.cp_size
        gathered = accelerator.gather(tensors)

        def first_of_each_group(x):
            if not torch.is_tensor(x) or cp == 1 or x.dim() == 0:
                return x
            blocks = x.reshape(dist.get_world_size(), -1, *x.shape[1:])[::cp]
            return blocks.reshape(-1, *x.shape[1:])

        data = _apply(first_of_each_group, gathered)
        state = accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            data = _apply(lambda x: x[: state.remainder] if torch.is_tensor(x) and x.dim() else x, data)
        return data

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training log: all ranks reach it together
            logs = {**logs, **self.ring_cp.throughput_logs()}
        return super().log(logs, *args, **kwargs)


class WholeScalarsAccelerator:
    """``gather_for_metrics`` that gathers per-rank scalars whole (e.g. TRL's token counts and sums).

    At the end of a dataloader Accelerate truncates what it gathers to the number of samples left; a vector of
    per-rank scalars (one per CP shard) is not samples, and truncating it would drop shards' contributions.
    """

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        if torch.is_tensor(input_data) and input_data.dim() == 0:
            return self.gather(input_data)
        return super().gather_for_metrics(input_data, use_gather_object=use_gather_object)


_CLASSES: dict[tuple[type, type], type] = {}


def ring_cp_class(cls: type, mixin: type) -> type:
    """``class RingCP<cls>(mixin, cls)``, made once per ``(cls, mixin)``: nothing of ``cls`` itself changes."""
    key = (cls, mixin)
    if key not in _CLASSES:
        name = f"RingCP{cls.__name__}"
        _CLASSES[key] = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name})
    return _CLASSES[key]


def family_mixin(cls: type, custom_compute_loss: bool = False) -> type:
    """The mixin serving trainer class ``cls``; raises for a family hf_ringcp does not support, naming those it
    does."""
    trl_classes = [k for k in cls.__mro__ if k.__module__.split(".")[0] == "trl" and not k.__name__.startswith("_")]
    if trl_classes:
        name = trl_classes[0].__name__
        if name not in TRL_FAMILIES:
            raise ValueError(f"RingCPCallback does not support trl.{name}. Supported trainers: {SUPPORTED}. For "
                             "another objective, use ContextParallelPlugin and hf_ringcp.sequence_log_probs in a "
                             "custom loop or compute_loss.")
        compat.check_trl(f"trl.{name}")
        target = TRL_FAMILIES[name]
        mixin = RingCPTrainerMixin if target is None else getattr(importlib.import_module(target[0]), target[1])
        if target is not None or _owner(cls, "compute_loss") is trl_classes[0] or custom_compute_loss:
            return mixin
    elif _owner(cls, "compute_loss") is _trainer_class() or custom_compute_loss:
        return RingCPTrainerMixin
    raise RuntimeError(
        f"{cls.__name__} overrides compute_loss. Under context parallelism its model call sees one rank's shard, "
        "with the targets pre-shifted in `shift_labels` and no full `labels`. If its loss is computed from "
        "`shift_labels` (as transformers' causal-LM losses and TRL's fused LM head do) and normalised by "
        "`num_items_in_batch`, pass RingCPCallback(..., custom_compute_loss=True); otherwise use the plain Trainer, "
        f"or ContextParallelPlugin (plugin.shard / plugin.loss) inside your compute_loss. Supported: {SUPPORTED}."
    )


def _apply(fn, data):
    if isinstance(data, (list, tuple)):
        return type(data)(_apply(fn, x) for x in data)
    if isinstance(data, dict):
        return type(data)({k: _apply(fn, v) for k, v in data.items()})
    return fn(data)


__all__ = ["SUPPORTED", "TRL_FAMILIES", "RingCPTrainerMixin", "family_mixin", "ring_cp_class"]
