"""Opt-in memory savers for long sequences on few GPUs: host offload of saved activations, tiled MLP.

With gradient checkpointing on every decoder layer, the memory of a training step past the weights is
(docs/performance.md, "Per-rank memory model"):

- the checkpointed input of every layer, ``S_local * hidden * 2`` bytes each (bf16), kept from the forward to
  the backward: ``L * S_local * hidden * 2`` in all (32 GiB for Llama-3.1-8B at 128K tokens on one GPU);
- the recompute peak of one layer during the backward, dominated by the MLP's ``[S_local, intermediate]``
  tensors (and, with peft's default float32 adapters, by float32 copies of every LoRA input).

:func:`offload_to_cpu` moves the first to pinned host memory; :func:`tile_mlp` bounds the second by running the
MLP over tiles of tokens, keeping only its input for the backward. Neither changes the numbers the model computes.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# ------------------------------------------------------------------------------------------- host offload


@dataclass
class OffloadStats:
    """What :func:`offload_to_cpu` did in its block.

    ``tensors`` / ``bytes`` / ``shapes``: what was moved to host memory; ``prefetched``: how many of those the
    backward found already copied back (CUDA only).
    """

    tensors: int = 0
    bytes: int = 0
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    prefetched: int = 0


_PIECE_MIN_BYTES = 1 << 20


def pinned_pieces(numel: int, element_size: int, min_bytes: int = _PIECE_MIN_BYTES) -> list[int]:
    """Element counts of the host pieces one tensor is stored in: powers of two in bytes, largest first.

    torch's pinned host allocator rounds every block up to a power of two, so a 3 GiB layer input (384K tokens
    of Llama-3.1-8B) would take 4 GiB of host memory; stored as 2 + 1 GiB it takes 3. The tail below
    ``min_bytes`` is one piece (rounded up by at most ``min_bytes``).
    """
    pieces, rest = [], numel
    while rest > 0:
        piece_bytes = 1 << ((rest * element_size).bit_length() - 1)  # the largest power of two that fits
        count = rest if piece_bytes < min_bytes else max(1, piece_bytes // element_size)
        pieces.append(count)
        rest -= count
    return pieces


class _Packed:
    """One offloaded tensor: its pinned host pieces and, once prefetched, its device copy on the way back."""

    __slots__ = ("back", "back_done", "device", "done", "dtype", "index", "pieces", "shape", "used")

    def __init__(self, t: torch.Tensor, pieces: list[torch.Tensor], done: torch.cuda.Event, index: int) -> None:
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.pieces, self.done, self.index = pieces, done, index
        self.back: torch.Tensor | None = None
        self.back_done: torch.cuda.Event | None = None
        self.used = False  # unpacked once: never prefetched again

    def to_device(self) -> torch.Tensor:
        """The device copy, made on the current stream (asynchronously: the pieces are pinned)."""
        out = torch.empty(sum(p.numel() for p in self.pieces), dtype=self.dtype, device=self.device)
        start = 0
        for piece in self.pieces:
            out[start:start + piece.numel()].copy_(piece, non_blocking=True)
            start += piece.numel()
        return out.view(self.shape)


class _Offloader:
    """Pack/unpack hooks: device tensors of ``min_bytes`` or more go to pinned host memory, copied on a side stream.

    With ``prefetch``, unpacking one tensor starts the host-to-device copy of the one packed just before it on
    the side stream: the backward unpacks the checkpointed layer inputs in the reverse of the forward's order,
    so the next layer's input arrives while this layer recomputes.
    """

    def __init__(self, min_bytes: int, stats: OffloadStats, prefetch: bool) -> None:
        self.min_bytes = min_bytes
        self.stats = stats
        self.prefetch = prefetch
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._packed: list[_Packed] = []

    def _wanted(self, t: torch.Tensor) -> bool:
        # Parameters and views of them (a linear layer saves ``weight.t()``) stay where they are: they are not
        # activations and outlive the step.
        base = t if t._base is None else t._base
        return (
            t.layout == torch.strided and not isinstance(base, torch.nn.Parameter)
            and t.numel() * t.element_size() >= self.min_bytes
        )

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream

    def pack(self, t: torch.Tensor):
        if not self._wanted(t):
            return t
        self.stats.tensors += 1
        self.stats.bytes += t.numel() * t.element_size()
        self.stats.shapes.append(tuple(t.shape))
        if t.device.type == "cpu":
            return t  # already in host memory
        if t.device.type != "cuda":
            return (t.to("cpu"), t.device)
        stream = self._stream(t.device)
        flat = t.reshape(-1)  # a view for the layer inputs; a copy (on the compute stream) for a strided tensor
        stream.wait_stream(torch.cuda.current_stream(t.device))  # t (and flat) fully written
        pieces = [torch.empty(n, dtype=t.dtype, pin_memory=True) for n in pinned_pieces(t.numel(), t.element_size())]
        with torch.cuda.stream(stream):
            start = 0
            for piece in pieces:
                piece.copy_(flat[start:start + piece.numel()], non_blocking=True)
                start += piece.numel()
            done = torch.cuda.Event()
            done.record(stream)
        flat.record_stream(stream)  # the allocator keeps t's memory until the copy has read it
        packed = _Packed(t, pieces, done, len(self._packed))
        self._packed.append(packed)
        return packed

    def _copy_back(self, packed: _Packed) -> None:
        stream = self._stream(packed.device)
        with torch.cuda.stream(stream):
            stream.wait_event(packed.done)
            packed.back = packed.to_device()
            packed.back_done = torch.cuda.Event()
            packed.back_done.record(stream)

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        if isinstance(packed, tuple):  # a device type without streams: copied in pack, copied back here
            host, device = packed
            return host.to(device)
        compute = torch.cuda.current_stream(packed.device)
        if packed.back is None:
            compute.wait_event(packed.done)
            out = packed.to_device()
        else:
            self.stats.prefetched += 1
            compute.wait_event(packed.back_done)
            out = packed.back
            out.record_stream(compute)  # made on the side stream, used and freed on this one
            packed.back = packed.back_done = None  # a second unpack (retain_graph) copies again
        packed.used = True
        if self.prefetch:
            # The nearest earlier tensor not yet unpacked (one node may unpack its tensors in forward order,
            # e.g. a multiply's `other` before `self`: a used one must not be copied back a second time).
            j = packed.index - 1
            while j >= 0 and self._packed[j].used:
                j -= 1
            if j >= 0 and self._packed[j].back is None:
                self._copy_back(self._packed[j])
        return out


@contextmanager
def offload_to_cpu(min_bytes: int = 1 << 20, *, prefetch: bool = True) -> Iterator[OffloadStats]:
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
    copied back when the backward unpacks it. Parameters and tensors already on the host are left alone. Costs
    host memory equal to the bytes moved (``L * S_local * hidden * 2`` for the layer inputs) and a
    host-to-device copy per layer in the backward, which ``prefetch`` hides behind the layer before it.

    Args:
        min_bytes: smaller saved tensors stay on the device (their copies would cost more than they free).
        prefetch: when the backward unpacks a tensor, start copying the one packed before it back to the device
            on the side stream (the next checkpointed layer's input, while this layer recomputes). Costs one
            more layer input on the device (``S_local * hidden * 2`` bytes) at the backward's peak.

    Yields:
        :class:`OffloadStats`, filled as the block runs (on CPU it counts the tensors that would be moved).
    """
    if not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"`min_bytes` must be a non-negative int, but got {min_bytes!r}.")
    if not isinstance(prefetch, bool):
        raise ValueError(f"`prefetch` must be True or False, but got {prefetch!r}.")
    stats = OffloadStats()
    hooks = _Offloader(min_bytes, stats, prefetch)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        yield stats


# --------------------------------------------------------------------------------------------- tiled MLP


class _TileInputs(torch.autograd.Function):
    """Identity on the MLP's input ``x [B, S, H]``, which it saves; its backward runs the MLP tile by tile.

    The pair ``_TileInputs`` -> ``_TiledOutput`` is the tiled MLP: the forward computes the output over tiles
    without keeping anything but ``x``; ``_TiledOutput``'s backward hands the output's gradient through, and this
    backward recomputes one tile at a time (with the forward's random and autocast state), takes its gradients
    for ``x`` and the MLP's trainable parameters, and frees it. Inside a checkpointed layer the saved ``x`` is
    the layer's last saved tensor (the MLP comes last but for the residual add), so the layer's recompute stops
    there (checkpoint's early stop) and the MLP runs twice in all, not three times as with a checkpoint per tile.
    """

    @staticmethod
    def forward(ctx, x, forward, tile_tokens, *params):
        ctx.forward, ctx.tile_tokens, ctx.params = forward, tile_tokens, params
        ctx.cuda = x.device if x.is_cuda else None
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        kind = x.device.type
        ctx.autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        kind, enabled, dtype = ctx.autocast
        wanted = [p for p in ctx.params if p.requires_grad]
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dparams: list[torch.Tensor | None] = [None] * len(wanted)
        with torch.random.fork_rng(devices=[ctx.cuda] if ctx.cuda is not None else []):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, ctx.cuda)
            for start in range(0, x.shape[-2], ctx.tile_tokens):
                stop = min(start + ctx.tile_tokens, x.shape[-2])
                tile = x[..., start:stop, :].detach().requires_grad_(dx is not None)
                with torch.enable_grad(), torch.autocast(kind, dtype=dtype, enabled=enabled):
                    out = ctx.forward(tile)
                inputs = ([tile] if dx is not None else []) + wanted
                grads = torch.autograd.grad(out, inputs, grad[..., start:stop, :], allow_unused=True)
                if dx is not None:
                    dx[..., start:stop, :] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        dparams[i] = g if dparams[i] is None else dparams[i] + g
        it = iter(dparams)
        return (dx, None, None, *(next(it) if p.requires_grad else None for p in ctx.params))


class _TiledOutput(torch.autograd.Function):
    """The MLP's output over tiles, computed without saving anything (see :class:`_TileInputs`)."""

    @staticmethod
    def forward(ctx, x, forward, tile_tokens):
        with torch.no_grad():
            return torch.cat([forward(t) for t in x.split(tile_tokens, dim=-2)], dim=-2)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


@torch.compiler.disable  # a backward that runs forwards: eager, like the ring attention
def _tiled_forward(module: torch.nn.Module, forward, tile_tokens: int, hidden_states: torch.Tensor, *args,
                   **kwargs) -> torch.Tensor:
    if args or kwargs:
        raise TypeError(
            "tile_mlp wraps position-wise MLPs called as mlp(hidden_states) only; this one got extra arguments. "
            "Remove the tiling (handle.remove()) for this model."
        )
    n = hidden_states.shape[-2]
    if n <= tile_tokens:
        return forward(hidden_states)
    params = [p for p in module.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (hidden_states.requires_grad or params):
        out = _TiledOutput.apply(_TileInputs.apply(hidden_states, forward, tile_tokens, *params), forward,
                                 tile_tokens)
    else:
        out = torch.cat([forward(t) for t in hidden_states.split(tile_tokens, dim=-2)], dim=-2)
    if out.shape != hidden_states.shape:
        raise TypeError(f"tile_mlp expects a position-wise MLP [B, S, H] -> [B, S, H], but it returned shape "
                        f"{tuple(out.shape)} for {tuple(hidden_states.shape)}.")
    return out


class TiledMLP:
    """Handle returned by :func:`tile_mlp`: ``remove()`` (or leaving its ``with`` block) restores the MLPs."""

    def __init__(self, modules: list[tuple[torch.nn.Module, object]]) -> None:
        self.modules = modules  # (mlp, the forward its instance had before, or None for the class's)

    def remove(self) -> None:
        for module, previous in self.modules:
            if previous is None:
                module.__dict__.pop("forward", None)  # the class's forward again
            else:
                module.forward = previous  # e.g. liger-kernel's fused SwiGLU, bound on the instance
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
    """Run every decoder layer's MLP over tiles of ``tile_tokens`` tokens, keeping only its input for the backward.

    An MLP is position-wise, so tiling the sequence changes no result. At long context its ``[S_local,
    intermediate]`` tensors (gate, up, activation, product, plus float32 LoRA input copies) set the recompute
    peak of a layer. Tiled, that part shrinks to ``tile_tokens / S_local`` of it: the forward keeps no tile's
    activations, and the backward recomputes one tile at a time and takes its gradients. Inside a checkpointed
    layer, the layer's recompute stops before the MLP (checkpoint's early stop), so the MLP's forward runs
    twice per step, as without tiles. (The earlier tiling, one checkpoint per tile, ran it three times: ~10 % of
    the 64K step on an H200, docs/performance.md.) Measured for Llama-3.1-8B with float32 adapters (8K tiles):
    the recompute peak drops from 365 to 204 KiB per token.

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
        previous = mlp.__dict__.get("forward")
        if isinstance(previous, functools.partial) and previous.func is _tiled_forward:
            raise RuntimeError(
                f"The MLP of {type(layer).__name__} is tiled already; call remove() on the earlier handle first."
            )
        # A forward another library bound on the instance (liger-kernel's fused SwiGLU) is what gets tiled.
        mlp.forward = functools.partial(_tiled_forward, mlp, mlp.forward, tile_tokens)
        wrapped.append((mlp, previous))
    if not wrapped:
        raise TypeError(f"tile_mlp found no decoder layer with an `mlp` in {type(model).__name__}.")
    return TiledMLP(wrapped)
