"""Every private or version-specific attribute of transformers, TRL, accelerate and torch that hf_ringcp relies on.

One place to look when a release moves something. Each entry says what is used, the releases it was checked
against, and what breaks if it moves (and how that shows). Nothing here patches another library: the Trainer
integration overrides methods in a subclass (:mod:`hf_ringcp.integrations.trainer_mixin`), which is how TRL's own
trainers specialise ``Trainer``.

Entries (what is used; where; checked with; what breaks if it moves):

- ``Trainer._prepare_context_parallel_inputs(model, inputs) -> (context factory, inputs)`` (:data:`TRAINER_CP_SEAM`):
  overridden by the mixin, the one point where ``training_step`` and ``Trainer.prediction_step`` hand a batch over
  for CP. transformers 5.17-5.25. If it moves, the batch reaches the model unsharded: the callback's check refuses
  a Trainer without it.
- ``Trainer.current_gradient_accumulation_steps``: micro-batches of the step when nothing counted ``N``
  (:func:`accumulation_steps`). 5.17-5.25. Falls back to ``args.gradient_accumulation_steps``.
- ``Trainer.loss_is_scaled_for_ga`` / ``Trainer.model_accepts_loss_kwargs``: read by ``training_step``; the mixin
  answers them by property for the loss it owns. 5.17-5.25. If renamed, the loss of a step is divided by the
  accumulation steps once too often: the gradient-accumulation exactness tests fail.
- ``Trainer.gather_function``: the evaluation loop's gather; the mixin answers it by property (one copy per CP
  group). 5.17-5.25. If renamed, predictions come back ``cp_size`` times: the predict tests fail.
- ``on_init_end`` runs at the end of ``Trainer.__init__`` with the Trainer as ``self`` on the stack
  (:func:`find_trainer`). 5.17-5.25, CPython 3.11. If not, the callback says to pass it at construction.
- accelerate's settable ``state.device_mesh`` and ``gradient_state.end_of_dataloader`` / ``remainder``: the
  plugin hands Accelerate its ``(dp, cp)`` mesh for the data split; the eval gather truncation. accelerate
  1.15-1.16. If the mesh is not read, CP ranks get different batches: ``plugin.attach`` checks.
- TRL: ``SFTTrainer.compute_loss`` scores the shard's pre-shifted ``shift_labels`` (its fused head);
  ``DPOTrainer._compute_loss`` and ``GRPOTrainer._get_per_token_logps_and_entropies`` are replaced by the DPO /
  GRPO families' subclasses. trl 1.16. :func:`check_trl` refuses an older TRL.
- TRL ``GRPOTrainer``'s private ``_get_per_token_logps_and_entropies`` (every scoring call, sharded),
  ``_generate_single_turn`` (rollouts, broadcast over the CP group), ``_generate_and_score_completions`` (run with
  ``self.accelerator`` seen per DP group) and its reads of ``self.accelerator`` (``gather``, ``reduce``,
  ``process_index``, ``num_processes``) and ``args.generation_batch_size``/``steps_per_generation``
  and `_calculate_rewards` (gathered over all processes; one copy per CP group kept) (:data:`GRPO_METHODS`,
  :func:`check_grpo`). trl 1.16. If a method moves, the GRPO family refuses the trainer.
- ``AttentionInterface._global_mapping`` (who owns ``"ring"``): :func:`attention_registry_entry`. transformers
  5.17-5.25. If it moves, registration cannot see another owner.
- ``torch._C._current_graph_task_id()``: whether a backward (checkpoint recomputation) is running,
  :func:`in_backward`. torch 2.11-2.13. If it moves, recomputation would be treated as a forward.
- the ``transformers`` import hook on ``sys.meta_path`` (``hf_ringcp/__init__.py``) registers "ring" right after
  transformers is imported. CPython 3.11. If import machinery changes, "ring" is registered at first use instead.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch
from packaging.version import Version

from hf_ringcp.constraints import tested_range

#: The transformers releases the Trainer integration is tested with, ``(oldest, newest)``: the declared floor
#: (``HF_RINGCP_DEPS=oldest``) and the lock CI installs, read from the one constraint files.
TESTED_TRANSFORMERS = tested_range("transformers")
#: The oldest TRL whose trainers the families are written against (SFT's fused head scores ``shift_labels``).
MIN_TRL = tested_range("trl")[0]
#: The Trainer's batch hand-over point for context parallelism (a private method; see the table above).
TRAINER_CP_SEAM = "_prepare_context_parallel_inputs"


def find_trainer(is_owner: Any) -> Any:
    """The object ``self`` of the nearest caller frame for which ``is_owner(obj)`` is true, else ``None``.

    A ``TrainerCallback`` gets events, not its Trainer; ``on_init_end`` is called at the end of
    ``Trainer.__init__``, so that Trainer is ``self`` in a frame above the callback. CPython-specific
    (``inspect.currentframe``); classes that use :class:`RingCPTrainerMixin` directly do not need it.
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if candidate is not None and is_owner(candidate):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame


def accumulation_steps(trainer: Any) -> int:
    """Micro-batches in the current optimizer step (``Trainer.current_gradient_accumulation_steps``)."""
    return int(getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps))


def check_transformers(stacklevel: int = 3) -> None:
    """Warn when the installed transformers is outside :data:`TESTED_TRANSFORMERS`."""
    import transformers

    low, high = (Version(v).release[:2] for v in TESTED_TRANSFORMERS)
    if not low <= Version(transformers.__version__).release[:2] <= high:
        warnings.warn(
            f"RingCPCallback is tested with transformers {TESTED_TRANSFORMERS[0]}-{TESTED_TRANSFORMERS[1]}; "
            f"{transformers.__version__} is installed. Check the first steps against a run without CP.",
            stacklevel=stacklevel,
        )


def check_trl(family: str) -> None:
    """Refuse a TRL older than :data:`MIN_TRL` for a TRL trainer family."""
    import trl

    if Version(trl.__version__) < Version(MIN_TRL):
        raise RuntimeError(
            f"RingCPCallback needs trl >= {MIN_TRL} for {family} (the version its hooks are written against); "
            f"{trl.__version__} is installed: pip install 'trl>={MIN_TRL}'."
        )


#: ``GRPOTrainer``'s private methods the GRPO family overrides (trl 1.16; see the table above).
GRPO_METHODS = ("_get_per_token_logps_and_entropies", "_generate_single_turn", "_generate_and_score_completions",
                "_calculate_rewards")


def check_grpo(cls: type) -> None:
    """Refuse a ``GRPOTrainer`` class without the private methods the GRPO family overrides."""
    missing = [name for name in GRPO_METHODS if not callable(getattr(cls, name, None))]
    if missing:
        import trl

        raise RuntimeError(
            f"RingCPCallback's GRPO support overrides GRPOTrainer.{', '.join(missing)}, which trl {trl.__version__} "
            f"does not have (written against trl {MIN_TRL}-1.16): install a tested trl release."
        )


def attention_registry_entry(interface: Any, key: str) -> Any:
    """The function registered under ``key`` in transformers' global attention (or mask) registry, or ``None``."""
    return interface._global_mapping.get(key)


def in_backward() -> bool:
    """Whether autograd is running a backward on this thread (e.g. a checkpointed layer's recomputation)."""
    return torch._C._current_graph_task_id() != -1


__all__ = [
    "GRPO_METHODS",
    "MIN_TRL",
    "TESTED_TRANSFORMERS",
    "TRAINER_CP_SEAM",
    "accumulation_steps",
    "attention_registry_entry",
    "check_grpo",
    "check_transformers",
    "check_trl",
    "find_trainer",
    "in_backward",
]
