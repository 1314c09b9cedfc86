"""``attn_implementation="ring"``: ring attention registered in the Transformers attention registry.

Two functions are registered under the key ``"ring"`` (nothing in transformers is patched):

- :func:`ring_attention_forward` in ``AttentionInterface``: the attention of one layer.
- :func:`ring_attention_mask` in ``AttentionMaskInterface``: what the model builds as ``attention_mask``.

Outside :func:`~hf_ringcp.context_parallel` (or with one rank) both delegate to Transformers' own SDPA
functions, so ``"ring"`` is exactly ``"sdpa"`` there (evaluation, ``generate()``). Inside, the mask function
never builds an ``L x L`` mask: it returns ``None`` for the plain causal case and raises for anything the ring
cannot honour (padding, custom overlays), and the attention function checks the rest (sliding window,
soft-capping, dropout, non-causal layers, position ids) before running :func:`hf_ringcp.ring_attention`.
"""

from __future__ import annotations

import threading
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

from hf_ringcp.integrations.context import RingContext, get_context
from hf_ringcp.ring import local_positions, ring_attention

KEY = "ring"

# Extra attention kwargs that change which keys a query may see; the ring cannot honour them yet.
_UNSUPPORTED_KWARGS = {
    "cu_seq_lens_q": "packed sequences (flash-attention style `cu_seq_lens_*` kwargs)",
    "cu_seq_lens_k": "packed sequences (flash-attention style `cu_seq_lens_*` kwargs)",
    "max_length_q": "packed sequences (flash-attention style `max_length_*` kwargs)",
    "max_length_k": "packed sequences (flash-attention style `max_length_*` kwargs)",
    "position_bias": "an additive position bias (`position_bias`)",
    "s_aux": "attention sinks (`s_aux`)",
}
_INSTEAD = "use attn_implementation='sdpa' (without context parallelism) for this model or batch"


def _fail(what: str, fix: str) -> None:
    raise ValueError(f'attn_implementation="ring" under context parallelism does not support {what}; {fix}.')


# --------------------------------------------------------------------------------------------- mask function


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
    mask over local indices would be wrong; the causal structure over *global* positions is applied by the
    ring itself. ``attention_mask`` is the 2-D ``[B, kv_length]`` padding mask: all ones is accepted, any
    zero raises, as do mask overlays (``or_mask_function``/``and_mask_function``), chunked attention and
    bidirectional masks.
    """
    ctx = get_context()
    if ctx is None or not ctx.cp_enabled:
        return sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask, **kwargs,
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        _fail(
            "padding (an `attention_mask` with zeros)",
            "pack examples into full-length rows without padding; with right padding only, drop the "
            "`attention_mask` and set the labels of pad tokens to -100 (causal attention never looks ahead, so "
            f"real tokens are unaffected); or {_INSTEAD}",
        )
    config = kwargs.get("config")
    if mask_function is bidirectional_mask_function or not getattr(config, "is_causal", True):
        _fail("bidirectional (non-causal) attention", _INSTEAD)
    if getattr(config, "attention_chunk_size", None) is not None:
        _fail(f"chunked attention (config.attention_chunk_size={config.attention_chunk_size})", _INSTEAD)
    if kwargs.get("use_vmap"):
        # Transformers turns on vmap exactly when the model adds an or/and mask overlay (e.g. bidirectional
        # image tokens), which a plain causal ring would silently drop.
        _fail("custom mask overlays (`or_mask_function` / `and_mask_function`)", _INSTEAD)
    return None


# ------------------------------------------------------------------------------------ attention function


class _PositionCheckCache:
    """Remembers the last ``position_ids`` tensor found correct, so each forward checks it once, not per layer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: tuple[weakref.ref, int, RingContext, int] | None = None

    def seen(self, pos: torch.Tensor, ctx: RingContext, seq_len: int) -> bool:
        with self._lock:
            if self._last is None:
                return False
            ref, version, last_ctx, last_len = self._last
            return ref() is pos and version == pos._version and last_ctx is ctx and last_len == seq_len

    def remember(self, pos: torch.Tensor, ctx: RingContext, seq_len: int) -> None:
        with self._lock:
            self._last = (weakref.ref(pos), pos._version, ctx, seq_len)


_POSITIONS_OK = _PositionCheckCache()


def _check_positions(position_ids: torch.Tensor | None, ctx: RingContext, s_local: int) -> None:
    """RoPE must see the *global* positions of the local tokens; anything else means a wrongly sharded batch."""
    fix = (
        f"shard the batch with hf_ringcp.shard_batch(batch, group, layout={ctx.layout!r}) and pass its "
        "`position_ids`. Packed sequences (positions restarting inside a row) are not supported by the ring yet: "
        f"concatenate documents with continuous positions, or {_INSTEAD}. (generate() and KV caches do not work "
        "under context parallelism: call generate() outside hf_ringcp.context_parallel.)"
    )
    if position_ids is None:
        _fail("a call without `position_ids`", fix)
    seq_len = s_local * ctx.world_size
    if _POSITIONS_OK.seen(position_ids, ctx, seq_len):
        return
    expected = local_positions(seq_len, ctx.layout, ctx.rank, ctx.world_size, device=position_ids.device)
    if position_ids.dim() != 2 or position_ids.shape[-1] != s_local or not torch.equal(
        position_ids, expected.to(position_ids.dtype).expand_as(position_ids)
    ):
        shown = position_ids.reshape(-1, position_ids.shape[-1])[0].tolist()
        _fail(
            f"position_ids that are not the global positions of this rank's tokens (rank {ctx.rank} of "
            f"{ctx.world_size}, layout={ctx.layout!r}: expected {_brief(expected.tolist())}, got {_brief(shown)}, "
            f"shape {tuple(position_ids.shape)})",
            fix,
        )
    _POSITIONS_OK.remember(position_ids, ctx, seq_len)


def _brief(values: list[int]) -> str:
    return str(values) if len(values) <= 12 else f"[{', '.join(map(str, values[:6]))}, ..., {values[-1]}]"


def _check_supported(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
    dropout: float, kwargs: dict[str, Any], ctx: RingContext,
) -> None:
    s_local = query.shape[2]
    seq_len = s_local * ctx.world_size
    if key.shape[2] != s_local:
        _fail(
            f"a KV cache or cross-attention (query length {s_local}, key length {key.shape[2]})",
            "pass use_cache=False when training, and call generate() outside hf_ringcp.context_parallel",
        )
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
    if kwargs.get("softcap") is not None:
        _fail(f"logit soft-capping (softcap={kwargs['softcap']})", _INSTEAD)
    window = kwargs.get("sliding_window")
    if window is None:
        window = getattr(module, "sliding_window", None)
    if window is not None and window < seq_len:
        _fail(
            f"a sliding window ({window}) shorter than the global sequence ({seq_len} tokens)",
            f"use sequences of at most {window} tokens, disable the window (e.g. config.sliding_window=None / "
            f"use_sliding_window=False if the model was trained without it), or {_INSTEAD}",
        )
    for name, what in _UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            _fail(what, _INSTEAD)
    _check_positions(kwargs.get("position_ids"), ctx, s_local)


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
        query: ``[B, Hq, S_local, D]``, this rank's queries (after RoPE at global positions).
        key, value: ``[B, Hkv, S_local, D]``, not repeated for grouped-query attention.
        attention_mask: what :func:`ring_attention_mask` built; ``None`` under context parallelism.
        dropout: attention dropout probability; must be 0 under context parallelism.
        scaling: softmax scale (default ``1 / sqrt(D)``).
        **kwargs: the model's extra attention kwargs (``position_ids``, ``sliding_window``, ``softcap``, ...).

    Returns:
        ``(out, None)`` with ``out`` ``[B, S_local, Hq, D]`` contiguous: causal attention of each local query
        over all keys at global positions ``<=`` its own, across the ranks of the active group.
    """
    ctx = get_context()
    if ctx is None or not ctx.cp_enabled:
        _RECOMPUTE.check_fallback(module)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    _check_supported(module, query, key, attention_mask, dropout, kwargs, ctx)
    if module.training:
        _RECOMPUTE.armed = True
    out = ring_attention(
        query, key, value, ctx.group, causal=True, scale=scaling, layout=ctx.layout, comm=ctx.comm,
        backend=ctx.backend,
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
