"""The Accelerate plugin: a (dp, cp) device mesh, per-group data, sharded batches and the exact loss.

Accelerate's own ``ParallelismConfig(cp_size)`` only wraps torch's SDPA-swapping context parallel (FSDP2, no
CPU, "sdpa" only), so hf_ringcp composes with a plain :class:`accelerate.Accelerator` instead:

- the mesh is ``init_device_mesh(device, (dp, cp), mesh_dim_names=("dp_replicate", "cp"))``; the ``cp`` rows
  are consecutive ranks (``rank = dp_rank * cp + cp_rank``), so a CP group stays on one node when it can;
- the mesh is handed to Accelerate's state before dataloaders are prepared: Accelerate's
  ``prepare_data_loader`` then gives every rank of a CP group the same batches (``process_index // cp``) and
  splits the data over the ``dp`` groups only — no sample is skipped or seen twice;
- DDP (or FSDP) averages gradients over all ``dp * cp`` ranks, so each rank's loss is
  ``world * local_sum / N_global`` (:func:`hf_ringcp.integrations.loss.normalise`): the average over ranks is
  then exactly the gradient of the global token mean.
"""

from __future__ import annotations

import contextlib
import os
import sys
import weakref
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from hf_ringcp.integrations.batch import (
    SHARD_KEY,
    count_targets,
    pad_batch_to_multiple,
    shard_batch,
    unshard_predictions,
)
from hf_ringcp.integrations.context import context_parallel
from hf_ringcp.integrations.loss import causal_lm_loss, causal_lm_loss_sum, group_mean, normalise
from hf_ringcp.integrations.memory import offload_to_cpu, tile_mlp
from hf_ringcp.integrations.models import check_ring_model, prepare_model
from hf_ringcp.ring import RingConfig
from hf_ringcp.ring.group import collective_device, group_rank_and_size

__all__ = ["ContextParallelPlugin", "pad_batch_to_multiple"]

ENV_PREFIX = "HF_RINGCP_"
_MESHES: dict[tuple, DeviceMesh] = {}
_HOLDERS: weakref.WeakValueDictionary[int, ContextParallelPlugin] = weakref.WeakValueDictionary()  # for exit
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def release_meshes() -> None:
    """Forget the meshes built by :meth:`ContextParallelPlugin.build_mesh`: here, in the plugins that hold one and
    in Accelerate's shared state.

    A mesh keeps its process groups, and their gloo worker threads, alive; hf_ringcp's exit handler calls this so
    that they are freed while the interpreter is still whole, not during its finalisation.
    """
    meshes = list(_MESHES.values())
    _MESHES.clear()
    for plugin in list(_HOLDERS.values()):
        plugin._mesh = None
    state = _accelerate_shared_state()
    if any(state.get("device_mesh") is mesh for mesh in meshes):
        state["device_mesh"] = None


def _accelerate_shared_state() -> dict:
    """Accelerate's ``AcceleratorState`` attributes (a dict shared by its instances), ``{}`` when not imported."""
    module = sys.modules.get("accelerate.state")
    state = getattr(getattr(module, "AcceleratorState", None), "_shared_state", None)
    return state if isinstance(state, dict) else {}


def _env_value(name: str, kind: type) -> Any:
    raw = os.environ.get(ENV_PREFIX + name.upper())
    if raw is None:
        return None
    if kind is bool:
        if raw.lower() not in _TRUE + _FALSE:
            raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean; use one of {_TRUE + _FALSE}.")
        return raw.lower() in _TRUE
    if kind == "int_or_auto" and raw == "auto":
        return raw
    if kind in (int, "int_or_auto"):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not an integer.") from None
    return raw


def check_accelerate_world(accelerator: Any) -> None:
    """Raise unless Accelerate sees every torch.distributed rank (else it wraps nothing in DDP, silently)."""
    if not dist.is_initialized():
        return
    seen, world = accelerator.num_processes, dist.get_world_size()
    if seen != world:
        raise ValueError(
            f"Accelerate sees {seen} process(es) (distributed_type={accelerator.distributed_type}) but "
            f"torch.distributed has {world} ranks, so the model would not be wrapped for data parallelism and every "
            "rank would step on the gradient of its own tokens. On CPU, create the Accelerator with "
            "Accelerator(cpu=True) (for the Trainer: TrainingArguments(use_cpu=True))."
        )


@dataclass
class ContextParallelPlugin:
    """Context parallelism for an ``accelerate`` training loop (or the Trainer, via :class:`RingCPCallback`).

    Every field left ``None`` falls back to the environment variable ``HF_RINGCP_<FIELD>`` (so an
    ``accelerate launch`` config can carry it), then to its default.

    Typical loop::

        plugin = ContextParallelPlugin(cp_size=4)
        accelerator = Accelerator()
        model, optimizer, loader = plugin.prepare(accelerator, model, optimizer, loader)
        with plugin.context():
            for batch in loader:
                batch = plugin.shard(batch)
                loss = plugin.loss(model, batch)
                accelerator.backward(loss)
                optimizer.step(); optimizer.zero_grad()
                print(plugin.loss_value(loss))   # the exact global token mean
    """

    cp_size: int | None = field(default=None, metadata={"help": "Ranks sharing one sequence (HF_RINGCP_CP_SIZE)."})
    layout: str | None = field(default=None, metadata={"help": "'zigzag' (default), 'contiguous', 'striped', ..."})
    comm: str | None = field(default=None, metadata={"help": "'p2p' (default), 'allgather', 'ulysses' or 'auto'."})
    ulysses_size: int | str | None = field(
        default=None, metadata={"help": "Ulysses groups of the hybrid Ulysses x ring (1: plain ring; 'auto')."}
    )
    backend: str | None = field(default=None, metadata={"help": "Attention kernel; 'auto' (default) picks."})
    loss_chunk_size: int | None = field(default=None, metadata={"help": "Tokens per chunked-loss chunk (4096)."})
    pad_to_multiple: bool | None = field(
        default=None, metadata={"help": "Pad sequences to the CP divisor with ignored labels (default on)."}
    )
    pad_token_id: int | None = field(default=None, metadata={"help": "Token used for that padding (0)."})
    verify_batch: bool | None = field(
        default=None, metadata={"help": "Check once per batch that every CP rank holds the same batch (default on)."}
    )
    offload_activations: bool | None = field(
        default=None, metadata={"help": "Keep checkpointed layer inputs in pinned host memory (memory.offload_to_cpu)."}
    )
    mlp_tile_tokens: int | None = field(
        default=None, metadata={"help": "Run each MLP over tiles of this many tokens (memory.tile_mlp); 0: off."}
    )

    _DEFAULTS: ClassVar[dict[str, Any]] = {
        "cp_size": 1, "layout": "zigzag", "comm": "p2p", "ulysses_size": 1, "backend": "auto", "loss_chunk_size": 4096,
        "pad_to_multiple": True, "pad_token_id": 0, "offload_activations": False, "mlp_tile_tokens": 0,
        "verify_batch": True,
    }

    def __post_init__(self) -> None:
        kinds = {
            "cp_size": int, "loss_chunk_size": int, "pad_to_multiple": bool, "pad_token_id": int,
            "offload_activations": bool, "mlp_tile_tokens": int, "ulysses_size": "int_or_auto", "verify_batch": bool,
        }
        for f in fields(self):
            if getattr(self, f.name) is None:
                env = _env_value(f.name, kinds.get(f.name, str))
                setattr(self, f.name, self._DEFAULTS[f.name] if env is None else env)
        if not isinstance(self.cp_size, int) or self.cp_size < 1:
            raise ValueError(f"`cp_size` must be a positive integer, but got {self.cp_size!r}.")
        config = self.config  # validates layout, comm, backend and ulysses_size
        if self.ulysses_size != "auto":
            config.check_world(self.cp_size)
        if self.loss_chunk_size < 1:
            raise ValueError(f"`loss_chunk_size` must be positive, but got {self.loss_chunk_size}.")
        if self.mlp_tile_tokens < 0:
            raise ValueError(f"`mlp_tile_tokens` must be >= 0 (0 turns tiling off), but got {self.mlp_tile_tokens}.")
        self._mesh: DeviceMesh | None = None

    @property
    def config(self) -> RingConfig:
        """The validated :class:`~hf_ringcp.ring.RingConfig` of ``layout``, ``comm`` and ``backend``."""
        return RingConfig(layout=self.layout, comm=self.comm, backend=self.backend, ulysses_size=self.ulysses_size)

    # ------------------------------------------------------------------------------------------------ mesh

    @property
    def seq_divisor(self) -> int:
        """Sequence lengths must be multiples of this: ``2 * cp_size`` for zigzag, ``cp_size`` otherwise."""
        return self.config.layout_for(self.cp_size).divisor

    @property
    def world_size(self) -> int:
        return group_rank_and_size(None)[1]

    @property
    def dp_size(self) -> int:
        return self.world_size // self.cp_size

    def build_mesh(self, device_type: str | None = None) -> DeviceMesh | None:
        """Build (once) the ``("dp_replicate", "cp")`` mesh over the whole world; ``None`` without torch.distributed.

        Never initialises torch.distributed itself: a plain ``python script.py`` is a world of one, which needs no
        mesh (``cp_size`` must then be 1).
        """
        if self._mesh is not None:
            return self._mesh
        if not dist.is_initialized():
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise RuntimeError(
                    "torch.distributed is not initialised although WORLD_SIZE > 1: create the Accelerator (or call "
                    "torch.distributed.init_process_group) before building the CP mesh."
                )
            if self.cp_size != 1:
                raise ValueError(
                    f"cp_size={self.cp_size} needs {self.cp_size} processes, but this is a single process without "
                    f"torch.distributed: launch with `accelerate launch --num_processes {self.cp_size}` or torchrun."
                )
            return None
        world = dist.get_world_size()
        if world % self.cp_size != 0:
            raise ValueError(
                f"The world size ({world}) is not divisible by cp_size ({self.cp_size}): launch a multiple of "
                f"{self.cp_size} processes (e.g. `accelerate launch --num_processes {self.cp_size}`) or change cp_size."
            )
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        shape = (world // self.cp_size, self.cp_size)
        # One mesh per shape and process group: plugins (and Trainers) created one after another share it, so
        # its process groups are made once and Accelerate's state keeps seeing the same mesh.
        key = (device_type, shape, id(dist.group.WORLD))
        if key not in _MESHES:
            _MESHES[key] = init_device_mesh(device_type, shape, mesh_dim_names=("dp_replicate", "cp"))
        self._mesh = _MESHES[key]
        _HOLDERS[id(self)] = self
        return self._mesh

    @property
    def mesh(self) -> DeviceMesh | None:
        """The mesh built by :meth:`build_mesh` (``None`` in a single process without torch.distributed)."""
        if self._mesh is None and dist.is_initialized():
            raise RuntimeError("The CP mesh is not built yet: call plugin.build_mesh() or plugin.prepare(...) first.")
        return self._mesh

    @property
    def cp_group(self) -> dist.ProcessGroup | None:
        mesh = self.mesh
        return None if mesh is None else mesh.get_group("cp")

    @property
    def dp_rank(self) -> int:
        mesh = self.mesh
        return 0 if mesh is None else mesh.get_local_rank("dp_replicate")

    @property
    def cp_rank(self) -> int:
        mesh = self.mesh
        return 0 if mesh is None else mesh.get_local_rank("cp")

    # ------------------------------------------------------------------------------------------ accelerate

    def attach(self, accelerator: Any) -> None:
        """Give ``accelerator`` the mesh so its dataloaders split data over the ``dp`` groups only."""
        pc = getattr(accelerator, "parallelism_config", None)
        if pc is not None and getattr(pc, "cp_size", 1) > 1:
            raise ValueError(
                f"Accelerate's own context parallelism is also set (parallelism_config.cp_size={pc.cp_size}). Use "
                "one: remove `cp_size` from the Accelerate/Trainer parallelism config when using hf_ringcp."
            )
        check_accelerate_world(accelerator)
        mesh = self.build_mesh()
        if mesh is None:
            return
        current = accelerator.state.device_mesh
        if current is not None and current is not mesh:
            raise ValueError(
                f"The Accelerator already has a device mesh ({current.mesh_dim_names}); hf_ringcp needs to own it. "
                "Remove the Accelerate parallelism_config (tp/fsdp meshes are not combined with hf_ringcp yet)."
            )
        accelerator.state.device_mesh = mesh

    def prepare(self, accelerator: Any, *objects: Any) -> Any:
        """``accelerator.prepare(*objects)`` after :meth:`attach`; checks every model uses ``"ring"``."""
        self.attach(accelerator)
        for obj in objects:
            if isinstance(obj, torch.nn.Module):
                self.prepare_model(obj)
        return accelerator.prepare(*objects)

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Check ``model`` uses ``"ring"``, make it exact under CP and apply the opt-in MLP tiling (idempotent)."""
        check_ring_model(model)
        prepare_model(model, cp_size=self.cp_size)
        if self.mlp_tile_tokens and not getattr(model, "_hf_ringcp_tiled", False):
            tile_mlp(model, self.mlp_tile_tokens)
            model._hf_ringcp_tiled = True

    # ---------------------------------------------------------------------------------------------- steps

    def context(self) -> AbstractContextManager:
        """:func:`hf_ringcp.context_parallel` over this plugin's CP group; keep forward *and* backward inside."""
        self.build_mesh()
        return context_parallel(self.cp_group, layout=self.layout, comm=self.comm, backend=self.backend,
                                ulysses_size=self.ulysses_size)

    def shard(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """This rank's part of a full batch (see :func:`hf_ringcp.shard_batch`): packing, padding, labels, split."""
        self.build_mesh()
        return shard_batch(batch, self.cp_group, layout=self.layout, pad_to_multiple=self.pad_to_multiple,
                           pad_token_id=self.pad_token_id, verify_batch=self.verify_batch)

    def count_items(self, sharded_batches: Iterable[Mapping[str, Any]]) -> torch.Tensor:
        """Global number of loss targets over all ranks in the given (sharded) micro-batches — the ``N`` of a step."""
        return count_targets(sharded_batches)

    def loss(
        self, model: torch.nn.Module, sharded_batch: Mapping[str, Any], num_items_in_batch: torch.Tensor | None = None,
        *, label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """The loss to call ``backward()`` on: ``world_size * local_sum / N``.

        DDP/FSDP average gradients over all ranks, which turns this into the exact gradient of the global token
        mean. ``num_items_in_batch`` is ``N`` for gradient accumulation (:meth:`count_items` over the step's
        micro-batches); ``None`` counts this batch. :meth:`loss_value` gives the mean loss for logging.
        ``label_smoothing``: transformers' ``LabelSmoother`` epsilon (see :func:`hf_ringcp.causal_lm_loss`).
        """
        if num_items_in_batch is None:
            num_items_in_batch = self.count_items([sharded_batch])
        with offload_to_cpu() if self.offload_activations else contextlib.nullcontext():
            return causal_lm_loss(
                model, sharded_batch, group=self.cp_group, num_items_in_batch=num_items_in_batch,
                chunk_size=self.loss_chunk_size, averaged_over=self.world_size, label_smoothing=label_smoothing,
            )

    def eval_loss(
        self, model: torch.nn.Module, sharded_batch: Mapping[str, Any], *, label_smoothing: float = 0.0,
        return_logits: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The token-mean loss of the batch this CP group shares, identical on its ranks (for evaluation).

        With ``return_logits`` also the logits ``[B, S, V]`` (float32) in the batch's own order, identical on the
        group's ranks: the same chunks the loss was computed from, unsharded (:func:`unshard_predictions`).
        ``label_smoothing``: transformers' ``LabelSmoother`` epsilon (see :func:`hf_ringcp.causal_lm_loss`).
        """
        kept: list[torch.Tensor] | None = [] if return_logits else None
        with torch.no_grad():
            local_sum, count = causal_lm_loss_sum(model, sharded_batch, chunk_size=self.loss_chunk_size,
                                                  logits_out=kept, label_smoothing=label_smoothing)
        loss = group_mean(local_sum, count, self.cp_group)
        if not return_logits:
            return loss
        logits = unshard_predictions(kept[0], sharded_batch.get(SHARD_KEY), self.cp_group, self.layout)
        return loss, logits

    def loss_value(self, loss: torch.Tensor) -> float:
        """The global token-mean loss from the per-rank values returned by :meth:`loss` (one all-reduce).

        Each rank returned ``local_sum * world / N``; their sum is ``world * mean``, so :func:`normalise` over
        ``world`` gives the mean back.
        """
        total = loss.detach().double().clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        return normalise(total, self.world_size).item()

    @property
    def comm_device(self) -> torch.device:
        """Where this rank's collectives take tensors: its current GPU under NCCL, else the CPU."""
        return collective_device(self.cp_group)
