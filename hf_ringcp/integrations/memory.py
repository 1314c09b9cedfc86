"""Opt-in memory savers for long sequences on few GPUs: host offload of saved activations, tiled MLP.

With gradient checkpointing on every decoder layer, the memory of a training step past the weights is
(docs/performance.md, "Per-rank memory model"):

- the checkpointed input of every layer, ``S_local * hidden * 2`` bytes each (bf16), kept from the forward to
  the backward: ``L * S_local * hidden * 2`` in all (32 GiB for Llama-3.1-8B at 128K tokens on one GPU);
- the recompute peak of one layer during the backward, dominated by the MLP's ``[S_local, intermediate]``
  tensors (and, with peft's default float32 adapters, by float32 copies of every LoRA input).

:func:`offload_to_cpu` moves the first to pinned host memory; :func:`tile_mlp` bounds the second by running the
MLP over tiles of tokens, each under its own checkpoint. Neither changes the numbers the model computes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

# ------------------------------------------------------------------------------------------- host offload


@dataclass
class OffloadStats:
    """What :func:`offload_to_cpu` did in its block: tensors and bytes moved to host memory, shapes seen."""

    tensors: int = 0
    bytes: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)


class _Offloader:
    """Pack/unpack hooks: device tensors of ``min_bytes`` or more go to pinned host memory, copied on a side stream."""

    def __init__(self, min_bytes: int, stats: OffloadStats) -> None:
        self.min_bytes = min_bytes
        self.stats = stats
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def _wanted(self, t: torch.Tensor) -> bool:
        # Parameters and views of them (a linear layer saves ``weight.t()``) stay where they are: they are not
        # activations and outlive the step.
        base = t if t._base is None else t._base
        return (
            t.layout == torch.strided and not isinstance(base, torch.nn.Parameter)
            and t.numel() * t.element_size() >= self.min_bytes
        )

    def pack(self, t: torch.Tensor):
        if not self._wanted(t):
            return t
        self.stats.tensors += 1
        self.stats.bytes += t.numel() * t.element_size()
        self.stats.shapes.append(tuple(t.shape))
        if t.device.type == "cpu":
            return t  # already in host memory
        if t.device.type != "cuda":
            return (t.to("cpu"), t.device, None)
        stream = self._streams.get(t.device)
        if stream is None:
            stream = self._streams[t.device] = torch.cuda.Stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully written
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        t.record_stream(stream)  # the allocator keeps t's memory until the copy has read it
        return (host, t.device, done)

    @staticmethod
    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        host, device, done = packed
        if done is not None:
            torch.cuda.current_stream(device).wait_event(done)
        return host.to(device, non_blocking=done is not None)


@contextmanager
def offload_to_cpu(min_bytes: int = 1 << 20) -> Iterator[OffloadStats]:
    """Keep the tensors that autograd saves in this block in pinned host memory until the backward needs them.

    Wrap the *forward* (the loss computation) of a model trained with non-reentrant gradient checkpointing:

    .. code-block:: python

        with hf_ringcp.context_parallel(group):
            with offload_to_cpu():
                loss = hf_ringcp.causal_lm_loss(model, batch, group=group)
            loss.backward()

    Inside checkpointed regions, checkpointing's own hooks take precedence, so what is moved is what lives from
    the forward to the backward: each checkpointed layer's input (``S_local * hidden`` elements; torch's
    non-reentrant checkpoint saves its inputs through the saved-tensor hooks active around it), the input of
    the final norm and of the chunked loss. Each device tensor of at least ``min_bytes`` is copied to pinned
    host memory on a side stream (overlapping the forward; its device memory is released once copied) and
    copied back on the compute stream when the backward unpacks it. Parameters and tensors already on the host
    are left alone. Costs host memory equal to the bytes moved (``L * S_local * hidden * 2`` for the layer
    inputs) and a host-to-device copy per layer in the backward.

    Args:
        min_bytes: smaller saved tensors stay on the device (their copies would cost more than they free).

    Yields:
        :class:`OffloadStats`, filled as the block runs (on CPU it counts the tensors that would be moved).
    """
    if not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"`min_bytes` must be a non-negative int, but got {min_bytes!r}.")
    stats = OffloadStats()
    hooks = _Offloader(min_bytes, stats)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield stats


# --------------------------------------------------------------------------------------------- tiled MLP


def _tiled_forward(forward, tile_tokens: int, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if args or kwargs:
        raise TypeError(
            "tile_mlp wraps position-wise MLPs called as mlp(hidden_states) only; this one got extra arguments. "
            "Remove the tiling (handle.remove()) for this model."
        )
    n = hidden_states.shape[-2]
    if n <= tile_tokens:
        return forward(hidden_states)
    tiles = hidden_states.split(tile_tokens, dim=-2)
    if torch.is_grad_enabled():
        # Each tile under its own checkpoint: only one tile's [tile, intermediate] activations exist at a time,
        # in the forward and in the backward (nested inside the layer's checkpoint, it is recomputed there).
        outs = [checkpoint(forward, t, use_reentrant=False) for t in tiles]
    else:
        outs = [forward(t) for t in tiles]
    out = torch.cat(outs, dim=-2)
    if out.shape != hidden_states.shape[:-1] + out.shape[-1:]:
        raise TypeError(f"tile_mlp expects a position-wise MLP, but it returned shape {tuple(out.shape)}.")
    return out


class TiledMLP:
    """Handle returned by :func:`tile_mlp`: ``remove()`` (or leaving its ``with`` block) restores the MLPs."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.modules = modules

    def remove(self) -> None:
        for module in self.modules:
            if "forward" in module.__dict__:
                del module.forward  # the class's forward again
        self.modules = []

    def __enter__(self) -> TiledMLP:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _decoder_layers(model: torch.nn.Module):
    from hf_ringcp.integrations.models import causal_lm

    decoder = causal_lm(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(f"tile_mlp found no `layers` on the decoder {type(decoder).__name__}.")
    return layers


def tile_mlp(model: torch.nn.Module, tile_tokens: int = 8192) -> TiledMLP:
    """Run every decoder layer's MLP over tiles of ``tile_tokens`` tokens, each tile under its own checkpoint.

    An MLP is position-wise, so tiling the sequence changes no result. At long context its ``[S_local,
    intermediate]`` tensors (gate, up, activation, product, plus float32 LoRA input copies) set the recompute
    peak of a layer. Tiled, that part shrinks to ``tile_tokens / S_local`` of it, for one more forward of each
    MLP tile in the backward. Measured for Llama-3.1-8B with peft's default float32 adapters on an H100
    (8K tiles): the recompute peak drops from 365 to 204 KiB per token, and the MLP's extra forward (~25 % more
    matmul work) costs ~10 % of the step at 64K tokens.

    The layer's ``mlp`` module keeps its parameters and names (only its ``forward`` is wrapped, on the
    instance), so saving adapters and optimizer state is unaffected. Use with a model loaded for training with
    gradient checkpointing; without gradients the tiles simply run one after another.

    Args:
        model: a ``*ForCausalLM`` (possibly inside peft or DDP) whose decoder has ``layers[i].mlp``, each called
            as ``mlp(hidden_states [B, S, H]) -> [B, S, H]``.
        tile_tokens: tokens per tile.

    Returns:
        A :class:`TiledMLP` handle; ``handle.remove()`` restores the original forwards.
    """
    if not isinstance(tile_tokens, int) or tile_tokens <= 0:
        raise ValueError(f"`tile_tokens` must be a positive int, but got {tile_tokens!r}.")
    wrapped = []
    for layer in _decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None:
            continue
        if "forward" in mlp.__dict__:
            raise RuntimeError(
                f"The MLP of {type(layer).__name__} already has a forward set on the instance (tiled twice, or "
                "wrapped by another library); call remove() on the earlier handle first."
            )
        mlp.forward = functools.partial(_tiled_forward, mlp.forward, tile_tokens)
        wrapped.append(mlp)
    if not wrapped:
        raise TypeError(f"tile_mlp found no decoder layer with an `mlp` in {type(model).__name__}.")
    return TiledMLP(wrapped)
