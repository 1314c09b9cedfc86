"""``RingCPCallback``: context parallelism for ``transformers.Trainer`` (and TRL's ``SFTTrainer``) by one callback.

A ``TrainerCallback`` only sees events, not the Trainer, and what CP needs sits inside it: the data split, the
batch sharding and the loss. So at ``on_init_end`` — called at the end of ``Trainer.__init__`` — the callback
finds that Trainer (the caller's frame) and uses the Trainer's own seams on that instance only, never on the class
or on transformers' modules:

- ``accelerator.state.device_mesh`` gets the ``("dp_replicate", "cp")`` mesh before any dataloader exists, so
  Accelerate gives a CP group the same batches and splits data over ``dp`` groups (see ``plugin.py``);
- ``_prepare_context_parallel_inputs(model, inputs)``, which ``training_step`` (and ``Trainer.prediction_step``)
  call for context parallelism, shards the batch (:func:`hf_ringcp.shard_batch`) and returns
  :func:`hf_ringcp.context_parallel` as the step's context;
- ``get_batch_samples`` counts the step's loss targets by the loss's own rules (no targets across documents or
  from padding), so ``num_items_in_batch`` makes the loss the exact global token mean;
- the loss: the plain Trainer's ``compute_loss`` ("subclass and override") becomes the chunked
  :func:`hf_ringcp.causal_lm_loss` (no full-vocabulary logits); a Trainer whose ``compute_loss`` scores the
  pre-shifted ``shift_labels`` of the shard keeps its own — TRL's ``SFTTrainer``, whose fused LM head does, or any
  subclass you vouch for with ``custom_compute_loss=True``;
- ``prediction_step`` tells the loss whether logits are wanted (``compute_metrics``, ``predict``), which come back
  unsharded in the batch's token order; for trainers whose ``prediction_step`` skips the seam (``SFTTrainer``) it
  shards the batch itself and makes the per-shard eval loss the group's token mean; ``evaluation_loop`` sets the
  loop's ``gather_function`` (reset by the Trainer after every loop) to keep one copy of each CP group's outputs,
  and ``accelerator.gather_for_metrics`` gathers per-rank scalars (TRL's metric sums over the shards) whole;
- ``log`` is wrapped to add tokens/s (global and per device), peak memory and the CP layout;
- ``label_smoothing_factor`` (the Trainer's ``LabelSmoother``) is applied exactly by the chunked loss, and refused
  for a ``compute_loss`` the callback does not own; ``include_num_input_tokens_seen`` counts each token once, not
  once per CP rank; NEFTune's noise amplitude uses the sequence's length, not the shard's;
- ``evaluate()``/``predict()`` before ``train()`` first wraps the model for training (DDP), which the Trainer's
  evaluation-only preparation would otherwise leave unwrapped for the whole training.

Versions: tested with transformers 5.17-5.24 and trl 1.16; :func:`check_trainer_api` refuses Trainers whose hooks
differ and warns outside the tested range.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import transformers
from packaging.version import Version
from transformers import Trainer, TrainerCallback

from hf_ringcp.integrations.batch import IGNORE_INDEX, SHARD_KEY, local_targets, unshard_predictions
from hf_ringcp.integrations.metrics import ThroughputMeter
from hf_ringcp.integrations.plugin import ContextParallelPlugin

#: The transformers releases the callback is tested with (CI: the newest; the GPU image: the oldest).
TESTED_TRANSFORMERS = ("5.17", "5.24")
#: The oldest TRL whose SFTTrainer scores pre-shifted ``shift_labels`` (its fused LM head).
MIN_TRL = "1.16"

_AT_CONSTRUCTION = (
    "RingCPCallback must be passed to the Trainer at construction: Trainer(..., callbacks=[RingCPCallback(...)]); "
    "adding it later with trainer.add_callback() is too late to set up the data split."
)


def _find_trainer(callback: TrainerCallback) -> Trainer:
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        handler = getattr(candidate, "callback_handler", None)
        if isinstance(candidate, Trainer) and callback in getattr(handler, "callbacks", ()):
            return candidate
        frame = frame.f_back
    raise RuntimeError(_AT_CONSTRUCTION)


def _is_sft_trainer(trainer: Trainer) -> bool:
    return any(c.__name__ == "SFTTrainer" and c.__module__.startswith("trl") for c in type(trainer).__mro__)


def _label_smoothing(trainer: Trainer) -> float:
    """The epsilon of the Trainer's own ``LabelSmoother`` (``label_smoothing_factor``), 0.0 without one."""
    smoother = getattr(trainer, "label_smoother", None)
    return 0.0 if smoother is None else float(smoother.epsilon)


def _wrapped_for_training_by_train(trainer: Trainer) -> bool:
    """Whether ``train()`` wraps the model for data parallelism with ``accelerator.prepare`` (DDP): a world of
    several processes without FSDP, DeepSpeed or a transformers-sharded model, which are prepared their own way."""
    own_way = ("is_fsdp_enabled", "is_deepspeed_enabled", "is_distributed_loading_by_transformers")
    return dist.is_initialized() and dist.get_world_size() > 1 and not any(getattr(trainer, a, False) for a in own_way)


def check_trainer_api(trainer: Trainer, custom_compute_loss: bool = False) -> None:
    """Refuse Trainers whose hooks the callback cannot use; warn for versions outside the tested range."""
    params = list(inspect.signature(type(trainer).compute_loss).parameters)
    if params[:5] != ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]:
        raise RuntimeError(
            f"RingCPCallback supports Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch) "
            f"(transformers {'-'.join(TESTED_TRANSFORMERS)}), but this Trainer has {params}. Use "
            "ContextParallelPlugin in a custom loop."
        )
    for seam in ("_prepare_context_parallel_inputs", "get_batch_samples", "evaluation_loop", "prediction_step"):
        if not callable(getattr(trainer, seam, None)):
            raise RuntimeError(
                f"This Trainer has no `{seam}`, which RingCPCallback uses (transformers "
                f"{'-'.join(TESTED_TRANSFORMERS)} have it). Install a tested transformers release."
            )
    sft = _is_sft_trainer(trainer)
    smoothing = _label_smoothing(trainer)
    if smoothing and type(trainer).compute_loss is not Trainer.compute_loss:
        raise ValueError(
            f"label_smoothing_factor={smoothing} with {type(trainer).__name__}'s own compute_loss: under context "
            "parallelism its model call sees one rank's shard, with pre-shifted `shift_labels` and no full `labels`, "
            "so the Trainer's LabelSmoother cannot apply and the loss would silently be unsmoothed. Set "
            "label_smoothing_factor=0, or use the plain transformers.Trainer, whose loss RingCPCallback smooths "
            "exactly."
        )
    if type(trainer).compute_loss is not Trainer.compute_loss and not (sft or custom_compute_loss):
        raise RuntimeError(
            f"{type(trainer).__name__} overrides compute_loss. Under context parallelism its model call sees one "
            "rank's shard, with the targets pre-shifted in `shift_labels` and no full `labels`. If its loss is "
            "computed from `shift_labels` (as transformers' causal-LM losses and TRL's fused LM head do) and "
            "normalised by `num_items_in_batch`, pass RingCPCallback(..., custom_compute_loss=True); otherwise use "
            "the plain Trainer, or ContextParallelPlugin (plugin.shard / plugin.loss) inside your compute_loss."
        )
    if sft:
        import trl

        if Version(trl.__version__) < Version(MIN_TRL):
            raise RuntimeError(
                f"RingCPCallback needs trl >= {MIN_TRL} for SFTTrainer (its fused LM head scores the pre-shifted "
                f"labels of a shard); {trl.__version__} is installed: pip install 'trl>={MIN_TRL}'."
            )
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is not None and getattr(pc, "cp_size", 1) > 1:
        raise ValueError(
            f"TrainingArguments/Accelerate parallelism_config sets cp_size={pc.cp_size} as well as RingCPCallback. "
            "Use one: remove cp_size from parallelism_config."
        )
    low, high = (Version(v) for v in TESTED_TRANSFORMERS)
    installed = Version(transformers.__version__)
    if not low.release <= installed.release[:2] <= high.release:
        warnings.warn(
            f"RingCPCallback is tested with transformers {TESTED_TRANSFORMERS[0]}-{TESTED_TRANSFORMERS[1]}; "
            f"{transformers.__version__} is installed. Check the first steps against a run without CP.",
            stacklevel=3,
        )


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
        self._want_logits = False
        self._shards: dict[int, tuple[Any, dict[str, Any]]] = {}
        self._tokens_counted = 0
        self._neftune: list[torch.nn.Module] = []
        self.trainer: Trainer | None = None

    # ------------------------------------------------------------------------------------------- events

    def on_init_end(self, args, state, control, **kwargs):
        trainer = _find_trainer(self)
        check_trainer_api(trainer, self.custom_compute_loss)
        self.plugin.prepare_model(trainer.model)
        self.plugin.attach(trainer.accelerator)
        pad = getattr(getattr(trainer, "processing_class", None), "pad_token_id", None)
        if pad is not None and self.plugin.pad_token_id == 0:
            self.plugin.pad_token_id = pad
        self.trainer = trainer
        self._meter = ThroughputMeter(trainer.args.device)
        if type(trainer).compute_loss is Trainer.compute_loss:
            # Our loss is already normalised over the whole accumulated step (num_items_in_batch).
            trainer.loss_is_scaled_for_ga = True
            trainer.model_accepts_loss_kwargs = True
            trainer.compute_loss = self._compute_loss
        trainer._prepare_context_parallel_inputs = self._prepare_context_parallel_inputs
        trainer.get_batch_samples = self._batch_samples(trainer.get_batch_samples)
        trainer.prediction_step = self._prediction_step(
            trainer.prediction_step, shards_itself=type(trainer).prediction_step is Trainer.prediction_step)
        trainer.evaluation_loop = self._evaluation_loop(trainer.evaluation_loop)
        trainer.accelerator.gather_for_metrics = self._scalars_whole(trainer.accelerator)
        original_log = trainer.log

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:  # a training log: all ranks reach it together
                logs = {**logs, **self._throughput_logs()}
            return original_log(logs, *args, **kwargs)

        trainer.log = log
        return control

    def _throughput_logs(self) -> dict[str, Any]:
        logs: dict[str, Any] = {**self._meter.read(), "cp_size": self.plugin.cp_size, "cp_layout": self.plugin.layout}
        if self.model_flops_per_token and self.peak_flops_per_device:
            achieved = logs["tokens_per_second_per_device"] * self.model_flops_per_token
            logs["mfu"] = achieved / self.peak_flops_per_device
        return logs

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError(_AT_CONSTRUCTION)
        trainer = self.trainer
        if _wrapped_for_training_by_train(trainer) and trainer.model_wrapped is trainer.model:
            raise RuntimeError(
                "The Trainer is training a model that Accelerate did not wrap for data parallelism (DDP), so each rank "
                "would step on the gradient of its own shard. Was the model prepared before train() (e.g. "
                "accelerator.prepare_model(model, evaluation_mode=True))? Pass the Trainer an unprepared model."
            )
        # Gradient checkpointing recomputes attention during backward, outside the step's context: keep CP on.
        self._stack.enter_context(self.plugin.context())
        self._meter = ThroughputMeter(args.device)
        self._tokens_counted = state.num_input_tokens_seen
        # NEFTune's hook (installed by train() before this event) scales its noise by 1/sqrt(L*d) of the tensor it
        # sees, the shard: the seam rescales the alpha it reads so that L is the sequence's length.
        alpha = getattr(trainer, "neftune_noise_alpha", None)
        self._neftune = [] if alpha is None else [
            m for m in trainer.model.modules() if getattr(m, "neftune_noise_alpha", None) is not None]
        if alpha is not None and not self._neftune:
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
        state.num_input_tokens_seen = self._tokens_counted + added // self.plugin.cp_size
        self._tokens_counted = state.num_input_tokens_seen

    def on_train_end(self, args, state, control, **kwargs):
        self._stack.close()
        return control

    # --------------------------------------------------------------------------------------- the seams

    def _shard(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """:meth:`ContextParallelPlugin.shard`, once per batch object (counting and the step share it)."""
        found = self._shards.get(id(inputs))
        if found is not None and found[0] is inputs:
            return found[1]
        sharded = self.plugin.shard(inputs)
        self._shards = {id(inputs): (inputs, sharded)}
        return sharded

    def _prepare_context_parallel_inputs(self, model: torch.nn.Module, inputs: dict[str, Any]):
        sharded = self._shard(inputs)
        if model.training:
            info = sharded.get(SHARD_KEY)
            self._meter.add(int(sharded["input_ids"].numel()) - (0 if info is None else info.local_padding()))
            if self._neftune:
                # The hook's amplitude is alpha / sqrt(L_shard * d); alpha * sqrt(L_shard / L) makes it
                # alpha / sqrt(L * d), L the batch's length before the CP padding, as in one process.
                scale = math.sqrt(sharded["input_ids"].shape[-1] / inputs["input_ids"].shape[-1])
                for module in self._neftune:
                    module.neftune_noise_alpha = self.trainer.neftune_noise_alpha * scale
        return self.plugin.context, dict(sharded)

    def _batch_samples(self, original: Callable):
        def get_batch_samples(*args: Any, **kwargs: Any):
            samples, _ = original(*args, **kwargs)
            if not samples:
                return samples, None
            # N by the loss's own rules, counted once per CP group (every CP rank holds the full batch).
            return samples, self.plugin.count_items([self._shard_for_count(batch) for batch in samples])

        return get_batch_samples

    def _shard_for_count(self, batch: dict[str, Any]) -> dict[str, Any]:
        sharded = self.plugin.shard(batch)
        self._shards[id(batch)] = (batch, sharded)
        return sharded

    def _prediction_step(self, original: Callable, shards_itself: bool):
        """``shards_itself``: the Trainer's own ``prediction_step`` shards through the seam (the plain Trainer)."""

        def prediction_step(model, inputs, prediction_loss_only, ignore_keys=None):
            self._want_logits = not prediction_loss_only
            try:
                if shards_itself:
                    return original(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
                sharded = self._shard(inputs)
                with self.plugin.context():
                    loss, logits, _ = original(model, dict(sharded), prediction_loss_only, ignore_keys=ignore_keys)
                return self._exact_eval(loss, logits, sharded, inputs)
            finally:
                self._want_logits = False

        return prediction_step

    def _exact_eval(self, loss, logits, sharded: dict[str, Any], inputs: dict[str, Any]):
        """A per-shard mean loss -> the CP group's token mean; sharded logits -> unsharded; the full labels."""
        plugin = self.plugin
        if loss is not None and plugin.cp_size > 1:
            n = float(local_targets(sharded))
            stats = torch.tensor([loss.item() * n, n], dtype=torch.float64, device=plugin.comm_device)
            dist.all_reduce(stats, group=plugin.cp_group)
            loss = torch.tensor(stats[0].item() / max(stats[1].item(), 1.0), device=loss.device)
        if logits is not None:
            logits = unshard_predictions(logits, sharded.get(SHARD_KEY), plugin.cp_group, plugin.layout)
        return loss, logits, inputs.get("labels")

    @staticmethod
    def _scalars_whole(accelerator: Any) -> Callable:
        """``gather_for_metrics`` that gathers per-rank scalars whole (e.g. TRL's token counts and sums).

        At the end of a dataloader Accelerate truncates what it gathers to the number of samples left; a vector of
        per-rank scalars (one per CP shard) is not samples, and truncating it would drop shards' contributions.
        """
        original = accelerator.gather_for_metrics

        def gather_for_metrics(input_data, use_gather_object=False):
            if torch.is_tensor(input_data) and input_data.dim() == 0:
                return accelerator.gather(input_data)
            return original(input_data, use_gather_object=use_gather_object)

        return gather_for_metrics

    def _evaluation_loop(self, original: Callable):
        def evaluation_loop(*args: Any, **kwargs: Any):
            self.trainer.gather_function = self._gather
            self._prepare_for_training_before_first_eval()
            return original(*args, **kwargs)

        return evaluation_loop

    def _prepare_for_training_before_first_eval(self) -> None:
        """``evaluate()``/``predict()`` before ``train()``: wrap the model for training (DDP) now, as ``train()`` would.

        Otherwise the Trainer's evaluation prepares the bare model in evaluation mode (no DDP) and Accelerate marks
        it prepared, so the later ``train()`` gets it back unwrapped and each rank steps on its own shard's gradient
        (transformers 5.25 / accelerate 1.16, and plain multi-process DDP too). With ``model_wrapped`` set,
        ``train()`` reuses the wrapped model as on a second ``train()`` call, and evaluation skips its own prepare.
        """
        trainer = self.trainer
        if trainer.is_in_train or trainer.model_wrapped is not trainer.model or not _wrapped_for_training_by_train(
                trainer):
            return
        trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)

    def _gather(self, tensors: Any) -> Any:
        """``accelerator.gather_for_metrics`` keeping one copy per CP group (all its ranks hold the same data)."""
        trainer, cp = self.trainer, self.plugin.cp_size
        gathered = trainer.accelerator.gather(tensors)

        def first_of_each_group(x):
            if not torch.is_tensor(x) or cp == 1 or x.dim() == 0:
                return x
            blocks = x.reshape(dist.get_world_size(), -1, *x.shape[1:])[::cp]
            return blocks.reshape(-1, *x.shape[1:])

        data = _apply(first_of_each_group, gathered)
        state = trainer.accelerator.gradient_state
        if state.end_of_dataloader and state.remainder > 0:
            data = _apply(lambda x: x[: state.remainder] if torch.is_tensor(x) and x.dim() else x, data)
        return data

    # ---------------------------------------------------------------------------- the plain Trainer's loss

    def _compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """``inputs`` is the shard (the seam made it); the step's context is in force."""
        plugin = self.plugin
        # `use_liger_kernel=True` asks the model to skip its logits for the fused linear cross-entropy; the chunked
        # loss never makes full logits anyway.
        inputs = {k: v for k, v in inputs.items() if k != "skip_logits"}
        if model.training:
            if num_items_in_batch is None:  # a Trainer path that counted nothing: count this micro-batch
                num_items_in_batch = plugin.count_items([inputs]) * self.trainer.current_gradient_accumulation_steps
            loss = plugin.loss(model, inputs, num_items_in_batch=num_items_in_batch,
                               label_smoothing=_label_smoothing(self.trainer))
            outputs = {"loss": loss}
        elif return_outputs and self._want_logits:
            loss, outputs = self._eval_with_logits(model, inputs)
        else:
            # Eval: the loss of this data-parallel group's batch, equal on its CP ranks (no gradient).
            loss = plugin.eval_loss(model, inputs, label_smoothing=_label_smoothing(self.trainer))
            outputs = {"loss": loss}
        return (loss, outputs) if return_outputs else loss

    def _eval_with_logits(self, model, batch: dict[str, Any]):
        """One forward: the group's token-mean loss and the logits ``[B, S, V]`` in the batch's order."""
        plugin = self.plugin
        labels = batch["shift_labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "shift_labels"}, use_cache=False).logits
        flat = logits.float().reshape(-1, logits.shape[-1])
        stats = torch.stack([
            F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum",
                            label_smoothing=_label_smoothing(self.trainer)),
            (labels != IGNORE_INDEX).sum().to(flat.dtype),
        ]).double()
        if plugin.cp_size > 1:
            dist.all_reduce(stats, group=plugin.cp_group)
        loss = (stats[0] / stats[1].clamp(min=1)).float()
        full = unshard_predictions(logits, batch.get(SHARD_KEY), plugin.cp_group, plugin.layout)
        return loss, {"loss": loss, "logits": full}


def _apply(fn, data):
    if isinstance(data, (list, tuple)):
        return type(data)(_apply(fn, x) for x in data)
    if isinstance(data, dict):
        return type(data)({k: _apply(fn, v) for k, v in data.items()})
    return fn(data)


__all__ = ["MIN_TRL", "TESTED_TRANSFORMERS", "RingCPCallback", "check_trainer_api"]
