"""``attn_implementation="ring"``: ring attention registered in the Transformers attention registry.

Two functions are registered under the key ``"ring"`` (nothing in transformers is patched):

- :func:`ring_attention_forward` in ``AttentionInterface``: the attention of one layer.
- :func:`ring_attention_mask` in ``AttentionMaskInterface``: what the model builds as ``attention_mask``.

Outside :func:`~hf_ringcp.context_parallel` (or with one rank) both delegate to Transformers' own SDPA
functions, so ``"ring"`` is exactly ``"sdpa"`` there (evaluation, ``generate()``). Inside, the mask function
never builds an ``L x L`` mask: it returns ``None`` and raises for anything the ring cannot honour (custom mask
overlays, chunked or bidirectional attention); the attention function checks the rest (padding against the
batch's ``cp_shard``, soft-capping, dropout, non-causal layers, position ids) and runs
:func:`hf_ringcp.ring_attention` with the documents of the batch (from :func:`hf_ringcp.shard_batch`'s
``cp_shard`` entry) and the layer's sliding window.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    AttentionMaskInterface,
    bidirectional_mask_function,
    causal_mask_function,
    sdpa_mask,
)

from hf_ringcp.integrations.batch import SHARD_KEY, ShardInfo, is_shard_mask, position_fingerprint
from hf_ringcp.integrations.context import RING_CALLS, RingContext, get_context, make_context
from hf_ringcp.integrations.decoding import decode_step, decoding_cache
from hf_ringcp.integrations.models import needs_preparation
from hf_ringcp.ring import local_positions, ring_attention
from hf_ringcp.ring.group import group_rank_and_size

KEY = "ring"

# Extra attention kwargs that change which keys a query may see and that the ring cannot honour.
_UNSUPPORTED_KWARGS = {
    "position_bias": "an additive position bias (`position_bias`)",
    "s_aux": "attention sinks (`s_aux`)",
}
# Packed-sequence kwargs: hf_ringcp.shard_batch reads them; reaching the attention means it was bypassed.
_PACKING_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
_INSTEAD = "use attn_implementation='sdpa' (without context parallelism) for this model or batch"
_SHARD = ("pass the batch through hf_ringcp.shard_batch (it reads padding and packed documents) and give the model "
          "all of its output")
_GENERATE = (
    "KV caches do not run inside hf_ringcp.context_parallel: for generation under context parallelism call "
    "hf_ringcp.generate(model, input_ids, group=...) (outside the `with` block), or model.generate() outside it "
    "(there \"ring\" is plain SDPA); pass use_cache=False to forwards inside it"
)


def _fail(what: str, fix: str) -> None:
    raise ValueError(f'attn_implementation="ring" under context parallelism does not support {what}; {fix}.')


# --------------------------------------------------------------------------------------------- mask function


@torch.compiler.disable  # Python-level checks and the active context: opaque to torch.compile
def ring_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Mask interface for ``"ring"``: SDPA's mask outside context parallelism, ``None`` inside it.

    Inside :func:`~hf_ringcp.context_parallel` the model's tensors hold a rank's share of the sequence, so a
    mask over local indices would be wrong; the causal, document and window structure over *global* positions is
    applied by the ring itself. ``attention_mask`` is the 2-D ``[B, kv_length]`` padding mask; it is handed to
    the forward's first attention layer, which accepts zeros only as the padding of the ``cp_shard`` that came
    with it (:func:`hf_ringcp.shard_batch` turns padding into packed documents, whose padding is never attended).
    Mask overlays (``or_mask_function``/``and_mask_function``), chunked attention and bidirectional masks raise.
    Outside context parallelism the mask :func:`hf_ringcp.shard_batch` returned (a shard on one rank) takes the
    ring path too: its documents need the ring's kernels.
    """
    if decoding_cache() is not None:
        return None  # hf_ringcp.generate's decode steps: the sharded cache knows each key's row and position
    ctx = get_context()
    _FORWARD_MASK.give(attention_mask)  # its zeros are checked against the forward's cp_shard by the attention
    if (ctx is None or not ctx.ring_active) and not is_shard_mask(attention_mask):
        built = sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs,
        )
        if built is not None:
            _FORWARD_MASK.built.append(weakref.ref(built))  # weakly: nothing kept alive after the forward
        return built
    config = kwargs.get("config")
    if mask_function is bidirectional_mask_function:
        _fail("bidirectional (non-causal) attention", _INSTEAD)
    check_ring_config(config)
    if kwargs.get("use_vmap"):
        # Transformers turns on vmap exactly when the model adds an or/and mask overlay (e.g. bidirectional
        # image tokens), which a plain causal ring would silently drop.
        _fail("custom mask overlays (`or_mask_function` / `and_mask_function`)", _INSTEAD)
    if config is not None and needs_preparation(config):
        _fail(
            "this model's rotary embeddings unprepared: their frequencies depend on the sequence length "
            f"(rope_parameters={getattr(config, 'rope_parameters', None)}), which differs from rank to rank",
            "call hf_ringcp.prepare_model(model) once before training (the plugin, RingCPCallback and "
            "hf_ringcp.causal_lm_loss do it for you)",
        )
    return None


def check_ring_config(config: Any) -> None:
    """Raise ``ValueError`` for the attention a model's config asks for that the ring does not compute
    (non-causal, chunked); the mask function checks it for every forward, :func:`hf_ringcp.generate` once."""
    if config is None:
        return
    if not getattr(config, "is_causal", True):
        _fail("bidirectional (non-causal) attention", _INSTEAD)
    if getattr(config, "attention_chunk_size", None) is not None:
        _fail(f"chunked attention (config.attention_chunk_size={config.attention_chunk_size})", _INSTEAD)


# ------------------------------------------------------------------------------------ attention function


class _PositionCheckCache:
    """Remembers the last ``position_ids`` tensor found correct, so each forward checks it once, not per layer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[weakref.ref, int, RingContext, Any] | None = None

    def seen(self, pos: torch.Tensor, ctx: RingContext, key: Any) -> bool:
        with self._lock:
            if self._last is None:
                return False
            ref, version, last_ctx, last_key = self._last
            return ref() is pos and version == pos._version and last_ctx is ctx and last_key == key

    def remember(self, pos: torch.Tensor, ctx: RingContext, key: Any) -> None:
        with self._lock:
            self._last = (weakref.ref(pos), pos._version, ctx, key)


_POSITIONS_OK = _PositionCheckCache()


class _ForwardMask(threading.local):
    """The hand-over from the mask function to the attention of the same forward (in this thread).

    Transformers gives the mask function the model's 2-D padding mask and the attention function the model's
    kwargs (``cp_shard`` among them), never both to one function; the ring path returns no mask, so the first
    attention layer of the forward takes the 2-D mask from here and checks its zeros against its ``cp_shard``
    (:func:`_check_padding`). Taken once per forward: the later layers, and a recomputation in the backward,
    find ``None``.
    """

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        #: SDPA's masks the mask function built in this forward (outside context parallelism): for a copy of a
        #: one-rank shard's mask, every layer drops them once the first found its padding to be the shard's.
        self.built: list[weakref.ref[torch.Tensor]] = []
        self._taken = True

    def give(self, mask: torch.Tensor | None) -> None:
        if self._taken:  # the first mask of a new forward
            self.built, self._taken = [], False
        self.mask = mask

    def take(self) -> torch.Tensor | None:
        mask, self.mask, self._taken = self.mask, None, True
        return mask

    def built_here(self, mask: torch.Tensor) -> bool:
        return any(ref() is mask for ref in self.built)


_FORWARD_MASK = _ForwardMask()


def _check_padding(mask: torch.Tensor | None, info: ShardInfo | None) -> None:
    """Zeros in the model's ``attention_mask`` are accepted only as the padding of the ``cp_shard`` that came with
    it (the documents keep it unattended); anything else would be attended as real tokens."""
    if mask is None or (info is not None and mask is info.mask) or bool(mask.all()):
        return
    if info is None:
        _fail("an `attention_mask` with padding (zeros) given to the model without the `cp_shard` entry that "
              "hf_ringcp.shard_batch returns with it", _SHARD)
    if info.mask is None or tuple(mask.shape) != tuple(info.mask.shape) or not torch.equal(
            mask, info.mask.to(mask.device)):
        _fail("an `attention_mask` whose padding is not that of the batch's `cp_shard` (the mask "
              "hf_ringcp.shard_batch returned with it)", _SHARD)


def _brief(values: list[int]) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:6]))}, ..., {values[-1]}]"


def _check_positions(
    position_ids: torch.Tensor | None, ctx: RingContext, s_local: int, info: ShardInfo | None, use_cache: bool
) -> None:
    """RoPE must see the positions :func:`hf_ringcp.shard_batch` gave this rank; anything else is a wrong batch."""
    fix = (f"shard the batch with hf_ringcp.shard_batch(batch, group, layout={ctx.layout!r}) and give the model "
           f"all of its output (input_ids, position_ids and, when present, {SHARD_KEY})")
    if position_ids is None:
        _fail("a call without `position_ids`", fix)
    seq_len = s_local * ctx.world_size
    key = (seq_len, None if info is None else id(info))
    if _POSITIONS_OK.seen(position_ids, ctx, key):
        return
    if info is not None:
        ok = (
            info.layout == ctx.layout and info.placement.world == ctx.world_size and info.rank == ctx.rank
            and tuple(position_ids.shape) == (info.rows, s_local)
            and position_fingerprint(position_ids) == info.position_check
        )
        if not ok:
            _fail(
                f"a batch sharded for rank {info.rank} of {info.placement.world} with layout={info.layout!r} "
                f"(position_ids {tuple(position_ids.shape)}) on rank {ctx.rank} of {ctx.world_size} with "
                f"layout={ctx.layout!r}",
                fix,
            )
    else:
        expected = local_positions(seq_len, ctx.layout, ctx.rank, ctx.world_size, device=position_ids.device)
        if position_ids.dim() != 2 or position_ids.shape[-1] != s_local or not torch.equal(
            position_ids, expected.to(position_ids.dtype).expand_as(position_ids)
        ):
            shown = position_ids.reshape(-1, position_ids.shape[-1])[0].tolist()
            if use_cache and shown == list(range(s_local)):
                _fail("a forward over an unsharded sequence that builds a KV cache (what generate() does)", _GENERATE)
            _fail(
                f"position_ids that are not the global positions of this rank's tokens (rank {ctx.rank} of "
                f"{ctx.world_size}, layout={ctx.layout!r}: expected {_brief(expected.tolist())}, got {_brief(shown)}, "
                f"shape {tuple(position_ids.shape)})",
                fix,
            )
    _POSITIONS_OK.remember(position_ids, ctx, key)


def _window_of(module: torch.nn.Module, kwargs: dict[str, Any]) -> int | None:
    window = kwargs.get("sliding_window")
    if window is None:
        window = getattr(module, "sliding_window", None)
    return None if window is None else int(window)


def _check_scores(kwargs: dict[str, Any]) -> None:
    """What changes the attention scores themselves (prefill and decode alike)."""
    if kwargs.get("softcap") is not None:
        _fail(
            f"logit soft-capping (softcap={kwargs['softcap']})",
            "no ring kernel applies it; train this model without context parallelism with "
            "attn_implementation='eager' (transformers' only implementation that soft-caps)",
        )
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            _fail(what, _INSTEAD)


def _check_supported(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
    dropout: float, kwargs: dict[str, Any], ctx: RingContext,
) -> ShardInfo | None:
    s_local = query.shape[2]
    if key.shape[2] != s_local:
        _fail(f"a KV cache or cross-attention (query length {s_local}, key length {key.shape[2]})", _GENERATE)
    if attention_mask is not None:
        _fail(f"an explicit attention mask of shape {tuple(attention_mask.shape)}", f"drop it, or {_INSTEAD}")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        _fail(f"non-causal attention ({type(module).__name__}.is_causal=False)", _INSTEAD)
    if dropout:
        _fail(
            f"attention dropout (dropout={dropout})",
            "set config.attention_dropout=0 (e.g. from_pretrained(..., attention_dropout=0.0)) or call model.eval()",
        )
    _check_scores(kwargs)
    for name in _PACKING_KWARGS:
        if kwargs.get(name) is not None:
            _fail(f"packed-sequence kwargs given to the model (`{name}`)", _SHARD)
    info = kwargs.get(SHARD_KEY)
    if info is not None and not isinstance(info, ShardInfo):
        raise TypeError(f"`{SHARD_KEY}` must be the ShardInfo that hf_ringcp.shard_batch made, not {type(info)}.")
    _check_positions(kwargs.get("position_ids"), ctx, s_local, info, bool(kwargs.get("use_cache")))
    return info


class _RecomputeGuard:
    """Catches gradient-checkpointing recomputation that runs outside :func:`context_parallel`.

    Such a recomputation would silently run SDPA on the local shard instead of the ring. It is armed by a
    context-parallel forward in training mode and disarmed by a training-mode forward without context
    parallelism (the user moved on to unsharded training).
    """

    def __init__(self) -> None:
        self.armed = False

    @staticmethod
    def in_backward() -> bool:
        return torch._C._current_graph_task_id() != -1

    def check_fallback(self, module: torch.nn.Module) -> None:
        if not module.training:
            return
        if not self.in_backward():
            self.armed = False
        elif self.armed:
            raise RuntimeError(
                'attn_implementation="ring": the backward pass recomputed an attention layer (gradient '
                "checkpointing) outside hf_ringcp.context_parallel, so it would attend to the local shard only. "
                "Call loss.backward() inside the `with hf_ringcp.context_parallel(...)` block."
            )


_RECOMPUTE = _RecomputeGuard()


def _one_rank_context(ctx: RingContext | None, info: ShardInfo) -> RingContext:
    if ctx is not None:
        return dataclasses.replace(ctx, force_ring=True)
    if group_rank_and_size(None)[1] > 1:
        _fail(f"a batch sharded for {info.placement.world} rank(s) outside hf_ringcp.context_parallel",
              "run the model inside `with hf_ringcp.context_parallel(group, layout=...)`")
    return make_context(None, layout=info.layout, force_ring=True)


@torch.compiler.disable  # the ring (collectives, plans, its own autograd Function): one graph break per layer
def ring_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``attn_implementation="ring"`` (the Transformers attention-interface signature).

    Args:
        module: the calling attention layer (read for ``is_causal`` and ``sliding_window``).
        query: ``[B, Hq, S_local, D]``, this rank's queries (after RoPE at their positions).
        key, value: ``[B, Hkv, S_local, D]``, not repeated for grouped-query attention.
        attention_mask: what :func:`ring_attention_mask` built; ``None`` under context parallelism.
        dropout: attention dropout probability; must be 0 under context parallelism.
        scaling: softmax scale (default ``1 / sqrt(D)``).
        **kwargs: the model's extra attention kwargs (``position_ids``, ``sliding_window``, ``softcap``, and
            ``cp_shard`` from :func:`hf_ringcp.shard_batch`).

    Returns:
        ``(out, None)`` with ``out`` ``[B, S_local, Hq, D]`` contiguous: causal attention of each local query
        over the keys of its own document at global positions ``<=`` its own (within the layer's sliding
        window), across the ranks of the active group.
    """
    RING_CALLS.record()
    if decoding_cache() is not None:
        _check_scores(kwargs)
        return decode_step(module, query, scaling, kwargs, _window_of(module, kwargs)), None
    ctx = get_context()
    info = kwargs.get(SHARD_KEY)
    given_mask = _FORWARD_MASK.take()
    if (ctx is None or not ctx.ring_active) and info is None:
        if is_shard_mask(given_mask):
            _check_padding(given_mask, None)  # a padded shard without its cp_shard: SDPA would attend the padding
        _RECOMPUTE.check_fallback(module)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if info is None or isinstance(info, ShardInfo):  # (another type is refused by _check_supported)
        _check_padding(given_mask, info)
    if ctx is None or not ctx.ring_active:
        # A shard on one rank: its documents and padding need the ring's own kernels, not SDPA.
        ctx = _one_rank_context(ctx, info)
        if attention_mask is not None and _FORWARD_MASK.built_here(attention_mask):
            # A copy of the shard's mask (not marked): the mask function built SDPA's mask from it, which the
            # shard's documents make redundant (the first layer checked its padding to be the shard's).
            attention_mask = None
    info = _check_supported(module, query, key, attention_mask, dropout, kwargs, ctx)
    if module.training:
        _RECOMPUTE.armed = True
    out = ring_attention(
        query, key, value, ctx.group, causal=True, scale=scaling, layout=ctx.layout, comm=ctx.comm,
        backend=ctx.backend, cu_seqlens=None if info is None else info.documents, window=_window_of(module, kwargs),
        ulysses_size=ctx.ulysses_size,
    )
    return out.transpose(1, 2).contiguous(), None


# ------------------------------------------------------------------------------------------ registration


def _same_function(registered: Any, ours: Any) -> bool:
    # A re-imported module (importlib.reload, a second copy on sys.path) defines a new but equivalent function.
    return registered is ours or (
        getattr(registered, "__module__", None) == ours.__module__
        and getattr(registered, "__qualname__", None) == ours.__qualname__
    )


def register() -> None:
    """Register ``"ring"`` in Transformers' attention and mask registries (idempotent).

    Raises ``RuntimeError`` when another library has already registered a different function under ``"ring"``;
    the key is never overwritten.
    """
    for interface, fn in ((AttentionInterface, ring_attention_forward), (AttentionMaskInterface, ring_attention_mask)):
        current = interface._global_mapping.get(KEY)
        if current is not None and not _same_function(current, fn):
            raise RuntimeError(
                f"{interface.__name__} already maps {KEY!r} to {getattr(current, '__module__', '?')}."
                f"{getattr(current, '__qualname__', current)!r}; hf_ringcp does not overwrite it. Remove the other "
                "registration (hf_ringcp.register() is then safe to call again)."
            )
        interface.register(KEY, fn)


def _register_on_import() -> None:
    # Whoever imports this module (``import hf_ringcp`` does, once transformers is imported) wants "ring"
    # registered; a "ring" that another library registered first is kept, and an import must not fail over it.
    try:
        register()
    except RuntimeError as err:
        warnings.warn(f"hf_ringcp did not register attn_implementation='ring': {err}", stacklevel=2)


_register_on_import()
