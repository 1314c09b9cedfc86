"""``RingCPCallback``: context parallelism for ``transformers.Trainer`` by adding one callback.

A ``TrainerCallback`` only sees events, not the Trainer, and what CP needs sits inside it: the data split, the
batch sharding and the loss. So at ``on_init_end`` — called at the end of ``Trainer.__init__`` — the callback
finds that Trainer (the caller's frame) and uses the Trainer's documented extension points on that instance
only, never on the class or on transformers' modules:

- ``accelerator.state.device_mesh`` gets the ``("dp_replicate", "cp")`` mesh before any dataloader exists, so
  Accelerate gives a CP group the same batches and splits data over ``dp`` groups (see ``plugin.py``);
- ``compute_loss`` (documented "subclass and override") is replaced by one that shards the batch, runs the
  ``"ring"`` model inside :func:`hf_ringcp.context_parallel` and computes the chunked, exact global loss;
- ``log`` is wrapped to add tokens/s (global and per device), peak memory and the CP layout.

Versions: written against transformers 5.17-5.23 ``Trainer.compute_loss(model, inputs, return_outputs=False,
num_items_in_batch=None)``; :func:`_check_trainer_api` refuses Trainers whose hooks differ.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from hf_ringcp.integrations.metrics import ThroughputMeter
from hf_ringcp.integrations.plugin import ContextParallelPlugin


def _find_trainer(callback: TrainerCallback) -> Trainer:
    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        handler = getattr(candidate, "callback_handler", None)
        if isinstance(candidate, Trainer) and callback in getattr(handler, "callbacks", ()):
            return candidate
        frame = frame.f_back
    raise RuntimeError(
        "RingCPCallback must be passed to the Trainer at construction: Trainer(..., callbacks=[RingCPCallback(...)]); "
        "adding it later with trainer.add_callback() is too late to set up the data split."
    )


def _check_trainer_api(trainer: Trainer) -> None:
    params = list(inspect.signature(type(trainer).compute_loss).parameters)
    if params[:5] != ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]:
        raise RuntimeError(
            f"RingCPCallback supports Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch) "
            f"(transformers 5.17-5.23), but this Trainer has {params}. Use ContextParallelPlugin in a custom loop."
        )
    if type(trainer).compute_loss is not Trainer.compute_loss:
        raise RuntimeError(
            f"{type(trainer).__name__} overrides compute_loss, which RingCPCallback must own to shard batches and "
            "compute the context-parallel loss. Use the plain Trainer, or ContextParallelPlugin in your subclass."
        )
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    if pc is not None and getattr(pc, "cp_size", 1) > 1:
        raise ValueError(
            f"TrainingArguments/Accelerate parallelism_config sets cp_size={pc.cp_size} as well as RingCPCallback. "
            "Use one: remove cp_size from parallelism_config."
        )


class RingCPCallback(TrainerCallback):
    """Train a ``"ring"`` model under context parallelism with ``transformers.Trainer``.

    ``Trainer(model, args, ..., callbacks=[RingCPCallback(cp_size=4)])``: every rank of a CP group gets the same
    samples (data parallel degree ``world / cp_size``), each batch is sharded in the chosen layout, the loss is
    the exact global token mean (gradient accumulation included) and so is the eval loss. Logs gain
    ``tokens_per_second``, ``tokens_per_second_per_device``, ``peak_memory_gib``, ``cp_size`` and ``cp_layout``.

    Args:
        plugin: a :class:`ContextParallelPlugin`; or pass its fields (``cp_size=``, ``layout=``, ...) directly.
        model_flops_per_token: training FLOPs per token (see :mod:`hf_ringcp.integrations.metrics`); with
            ``peak_flops_per_device`` the logs gain ``mfu``.
        peak_flops_per_device: dense peak FLOP/s of one device (e.g. 989e12 for an H100 SXM in bf16).
    """

    def __init__(
        self, plugin: ContextParallelPlugin | None = None, *, model_flops_per_token: float | None = None,
        peak_flops_per_device: float | None = None, **plugin_fields: Any,
    ) -> None:
        if plugin is not None and plugin_fields:
            raise ValueError("Pass either `plugin` or plugin fields such as cp_size=..., not both.")
        self.plugin = plugin or ContextParallelPlugin(**plugin_fields)
        self.model_flops_per_token = model_flops_per_token
        self.peak_flops_per_device = peak_flops_per_device
        self._stack = contextlib.ExitStack()
        self.trainer: Trainer | None = None

    # ------------------------------------------------------------------------------------------- events

    def on_init_end(self, args, state, control, **kwargs):
        trainer = _find_trainer(self)
        _check_trainer_api(trainer)
        self.plugin.prepare_model(trainer.model)
        self.plugin.attach(trainer.accelerator)
        if self.plugin.pad_to_multiple and self.plugin.pad_token_id == 0:
            pad = getattr(getattr(trainer, "processing_class", None), "pad_token_id", None)
            self.plugin.pad_token_id = pad if pad is not None else 0
        self.trainer = trainer
        self._meter = ThroughputMeter(trainer.args.device)
        # The loss we return is already normalised over the whole accumulated step (num_items_in_batch).
        trainer.loss_is_scaled_for_ga = True
        trainer.model_accepts_loss_kwargs = True
        trainer.compute_loss = self._compute_loss
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
        # Gradient checkpointing recomputes attention during backward, outside compute_loss: keep CP on.
        self._stack.enter_context(self.plugin.context())
        self._meter = ThroughputMeter(args.device)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._stack.close()
        return control

    # ----------------------------------------------------------------------------------------------- loss

    def _compute_loss(
        self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        plugin = self.plugin
        batch = plugin.shard(inputs)
        with plugin.context():
            if model.training:
                n = self._global_items(num_items_in_batch, batch)
                loss = plugin.loss(model, batch, num_items_in_batch=n)
                self._meter.add(int(batch["input_ids"].numel()))
            else:
                # Eval: the loss of this data-parallel group's batch, equal on its CP ranks (no gradient).
                loss = plugin.eval_loss(model, batch)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _global_items(self, counted: torch.Tensor | int | None, batch: dict[str, Any]) -> torch.Tensor:
        """``N`` for the step: targets over all data-parallel groups and accumulated micro-batches."""
        if counted is None:  # the Trainer counted nothing (no `labels`): this micro-batch's mean over GA steps
            return self.plugin.count_items([batch]) * self.trainer.current_gradient_accumulation_steps
        n = torch.as_tensor(counted, dtype=torch.float64).reshape(()).to(self.plugin.comm_device)
        if not self.trainer.args.average_tokens_across_devices or self.trainer.args.world_size == 1:
            torch.distributed.all_reduce(n)  # per-rank counts -> sum over all ranks (each CP copy once)
        # Either way every CP rank counted the same full batch: divide the copies out.
        return n / self.plugin.cp_size
