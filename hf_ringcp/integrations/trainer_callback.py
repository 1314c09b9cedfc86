"""``RingCPCallback``: context parallelism for ``transformers.Trainer`` and TRL's trainers by one callback.

``Trainer(..., callbacks=[RingCPCallback(cp_size=4)])`` is the whole entry point. At ``on_init_end`` (the end of
``Trainer.__init__``) the callback finds its Trainer (:func:`hf_ringcp.integrations.compat.find_trainer`), checks
it is a supported family (:func:`~hf_ringcp.integrations.trainer_mixin.family_mixin`), and turns that one
instance into the family's subclass of its own class (``RingCP<Class>``, made once per class): the behaviour lives
in :class:`~hf_ringcp.integrations.trainer_mixin.RingCPTrainerMixin` and the family modules, as class-level
overrides calling ``super()``. No class of transformers or TRL is modified; another Trainer in the same process is
untouched. The Accelerator gets the ``("dp_replicate", "cp")`` mesh before any dataloader exists (``plugin.py``),
so Accelerate gives a CP group the same batches.

The callback carries the settings and the per-run state the mixin reads (``trainer.ring_cp``): the plugin, the
shard of the current batch (sharded once, shared by counting and the step), the throughput meter. Its events fix
what the Trainer counts per rank: ``include_num_input_tokens_seen`` counts each token once, not once per CP rank;
NEFTune's noise amplitude uses the sequence's length, not the shard's (the mixin rescales it at the hand-over); and
a model left unwrapped by an ``evaluate()`` before ``train()`` is refused. ``label_smoothing_factor`` is applied
exactly by the chunked loss and refused for a ``compute_loss`` the integration does not own.

Versions: tested with the transformers and trl releases of :func:`hf_ringcp.constraints.tested_range` (the lock and
the declared floors, read by :mod:`hf_ringcp.integrations.compat`); older TRL is refused, transformers outside the
tested range warned about.
"""

from __future__ import annotations

import contextlib
from typing import Any

from transformers import Trainer, TrainerCallback

from hf_ringcp.integrations import compat
from hf_ringcp.integrations.compat import MIN_TRL, TESTED_TRANSFORMERS
from hf_ringcp.integrations.metrics import ThroughputMeter
from hf_ringcp.integrations.plugin import ContextParallelPlugin
from hf_ringcp.integrations.trainer_mixin import (
    WholeScalarsAccelerator,
    family_mixin,
    label_smoothing_of,
    ring_cp_class,
    wrapped_for_training_by_train,
)

_AT_CONSTRUCTION = (
    "RingCPCallback must be passed to the Trainer at construction: Trainer(..., callbacks=[RingCPCallback(...)]); "
    "adding it later with trainer.add_callback() is too late to set up the data split."
)


def check_trainer_api(trainer: Trainer, custom_compute_loss: bool = False) -> type:
    """Refuse trainers the integration cannot serve (naming the supported ones) and a TRL older than tested; warn
    for a transformers outside the tested range. Returns the family's mixin."""
    mixin = family_mixin(type(trainer), custom_compute_loss)
    smoothing = label_smoothing_of(trainer)
    if smoothing and not ring_cp_class(type(trainer), mixin)._ringcp_chunked_loss():
        raise ValueError(
            f"label_smoothing_factor={smoothing} with {type(trainer).__name__}'s own compute_loss: under context "
            "parallelism its model call sees one rank's shard, with pre-shifted `shift_labels` and no full `labels`, "
            "so the Trainer's LabelSmoother cannot apply and the loss would silently be unsmoothed. Set "
            "label_smoothing_factor=0, or use the plain transformers.Trainer, whose loss RingCPCallback smooths "
            "exactly."
        )
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is not None and getattr(pc, "cp_size", 1) > 1:
        raise ValueError(
            f"TrainingArguments/Accelerate parallelism_config sets cp_size={pc.cp_size} as well as RingCPCallback. "
            "Use one: remove cp_size from parallelism_config."
        )
    if not callable(getattr(trainer, compat.TRAINER_CP_SEAM, None)):
        raise RuntimeError(
            f"This Trainer has no `{compat.TRAINER_CP_SEAM}`, which RingCPCallback uses (transformers "
            f"{'-'.join(TESTED_TRANSFORMERS)} have it). Install a tested transformers release."
        )
    compat.check_transformers(stacklevel=4)
    return mixin


class RingCPCallback(TrainerCallback):
    """Train a ``"ring"`` model under context parallelism with ``transformers.Trainer`` or TRL's ``SFTTrainer``.

    ``Trainer(model, args, ..., callbacks=[RingCPCallback(cp_size=4)])``: every rank of a CP group gets the same
    samples (data parallel degree ``world / cp_size``), each batch is sharded in the chosen layout (packed and
    padded batches too), the loss is the exact global token mean (gradient accumulation included) and so is the
    eval loss; ``compute_metrics`` and ``predict`` get the logits unsharded. Logs gain ``tokens_per_second``,
    ``tokens_per_second_per_device``, ``peak_memory_gib``, ``cp_size`` and ``cp_layout``.

    Args:
        plugin: a :class:`ContextParallelPlugin`; or pass its fields (``cp_size=``, ``layout=``, ...) directly.
        model_flops_per_token: training FLOPs per token (see :mod:`hf_ringcp.integrations.metrics`); with
            ``peak_flops_per_device`` the logs gain ``mfu``.
        peak_flops_per_device: dense peak FLOP/s of one device (e.g. 989e12 for an H100 SXM in bf16).
        custom_compute_loss: keep the ``compute_loss`` of a Trainer subclass that overrides it (it must score the
            shard's ``shift_labels`` and normalise by ``num_items_in_batch``); TRL's ``SFTTrainer`` needs no flag.
    """

    def __init__(
        self, plugin: ContextParallelPlugin | None = None, *, model_flops_per_token: float | None = None,
        peak_flops_per_device: float | None = None, custom_compute_loss: bool = False, **plugin_fields: Any,
    ) -> None:
        if plugin is not None and plugin_fields:
            raise ValueError("Pass either `plugin` or plugin fields such as cp_size=..., not both.")
        self.plugin = plugin or ContextParallelPlugin(**plugin_fields)
        self.model_flops_per_token = model_flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self.custom_compute_loss = custom_compute_loss
        self._stack = contextlib.ExitStack()
        self.want_logits = False
        self._shards: dict[int, tuple[Any, dict[str, Any]]] = {}
        self.meter = ThroughputMeter()
        self._tokens_counted = 0
        self.neftune: list[Any] = []
        self.trainer: Trainer | None = None

    # ------------------------------------------------------------------------------------------- events

    def on_init_end(self, args, state, control, **kwargs):
        trainer = compat.find_trainer(
            lambda obj: isinstance(obj, Trainer) and self in getattr(getattr(obj, "callback_handler", None),
                                                                    "callbacks", ()))
        if trainer is None:
            raise RuntimeError(_AT_CONSTRUCTION)
        mixin = check_trainer_api(trainer, self.custom_compute_loss)
        self.plugin.prepare_model(trainer.model)
        self.plugin.attach(trainer.accelerator)
        pad = getattr(getattr(trainer, "processing_class", None), "pad_token_id", None)
        if pad is not None and self.plugin.pad_token_id == 0:
            self.plugin.pad_token_id = pad
        self.trainer = trainer
        self.meter = ThroughputMeter(trainer.args.device)
        # The one change to the instance: its class becomes the family's subclass of its own class.
        if not isinstance(trainer, mixin):
            trainer.__class__ = ring_cp_class(type(trainer), mixin)
        accelerator = trainer.accelerator
        if not isinstance(accelerator, WholeScalarsAccelerator):
            accelerator.__class__ = ring_cp_class(type(accelerator), WholeScalarsAccelerator)
        trainer._ringcp_setup()
        return control

    def throughput_logs(self) -> dict[str, Any]:
        logs: dict[str, Any] = {**self.meter.read(), "cp_size": self.plugin.cp_size, "cp_layout": self.plugin.layout}
        if self.model_flops_per_token and self.peak_flops_per_device:
            achieved = logs["tokens_per_second_per_device"] * self.model_flops_per_token
            logs["mfu"] = achieved / self.peak_flops_per_device
        return logs

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(_AT_CONSTRUCTION)
        trainer = self.trainer
        if wrapped_for_training_by_train(trainer) and trainer.model_wrapped is trainer.model:
            raise RuntimeError(
                "The Trainer is training a model that Accelerate did not wrap for data parallelism (DDP), so each rank "
                "would step on the gradient of its own shard. Was the model prepared before train() (e.g. "
                "accelerator.prepare_model(model, evaluation_mode=True))? Pass the Trainer an unprepared model."
            )
        # Gradient checkpointing recomputes attention during backward, outside the step's context: keep CP on.
        self._stack.enter_context(self.plugin.context())
        self.meter = ThroughputMeter(args.device)
        self._tokens_counted = state.num_input_tokens_seen
        # NEFTune's hook (installed by train() before this event) scales its noise by 1/sqrt(L*d) of the tensor it
        # sees, the shard: the mixin's hand-over rescales the alpha it reads so that L is the sequence's length.
        alpha = getattr(trainer, "neftune_noise_alpha", None)
        self.neftune = [] if alpha is None else [
            m for m in trainer.model.modules() if getattr(m, "neftune_noise_alpha", None) is not None]
        if alpha is not None and not self.neftune:
            raise RuntimeError(
                "neftune_noise_alpha is set but no module carries the NEFTune hook's `neftune_noise_alpha`, so "
                "RingCPCallback cannot make its noise amplitude use the sequence length (not the shard's). Unset "
                "neftune_noise_alpha, or install a tested transformers release."
            )
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        self._count_tokens_once(state)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        self._count_tokens_once(state)
        return control

    def _count_tokens_once(self, state) -> None:
        """``include_num_input_tokens_seen``: the Trainer sums the batch's tokens over all ranks, and every rank of a
        CP group holds the same full batch, so what it added since the last event is ``cp_size`` times the tokens."""
        added = state.num_input_tokens_seen - self._tokens_counted
        if getattr(self.trainer, "_ringcp_tokens_counted_per_rank", True):
            state.num_input_tokens_seen = self._tokens_counted + added // self.plugin.cp_size
        self._tokens_counted = state.num_input_tokens_seen

    def on_train_end(self, args, state, control, **kwargs):
        self._stack.close()
        return control

    # ------------------------------------------------------------------------------------------ state

    def shard(self, inputs: dict[str, Any], keep: bool = False) -> dict[str, Any]:
        """:meth:`ContextParallelPlugin.shard`, once per batch object (counting and the step share it).

        ``keep``: add to the cache (the micro-batches of a step, sharded together for counting) instead of
        replacing it.
        """
        found = self._shards.get(id(inputs))
        if found is not None and found[0] is inputs:
            return found[1]
        sharded = self.plugin.shard(inputs)
        if keep:
            self._shards[id(inputs)] = (inputs, sharded)
        else:
            self._shards = {id(inputs): (inputs, sharded)}
        return sharded


__all__ = ["MIN_TRL", "TESTED_TRANSFORMERS", "RingCPCallback", "check_trainer_api"]
