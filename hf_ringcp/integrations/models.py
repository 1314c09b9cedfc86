"""The model side of the integration: finding the model inside its wrappers, and preparing it for the ring.

:func:`unwrap` is the one unwrapper (DDP/FSDP ``.module``, ``torch.compile``'s ``_orig_mod``, peft).
:func:`prepare_model` makes a model exact under context parallelism where its own code would not be: rotary
embeddings whose frequencies depend on the sequence (``rope_type="dynamic"``, Phi-3 ``longrope``, PhiMoE's
long/short scaling) choose them from ``max(position_ids)``, which differs from rank to rank when the sequence
is sharded. Forward hooks on those modules (hooks only: no transformers code is replaced) make every rank see
the maximum position of the *global* batch: the pre-hook appends that position as one extra column of
``position_ids``, and the post-hook drops its column from the outputs, so every real token is rotated exactly
as in the unsharded model.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
import torch.distributed as dist

from hf_ringcp.integrations.context import get_context


def unwrap(model: torch.nn.Module, *, through_peft: bool = False) -> torch.nn.Module:
    """The model inside DDP/FSDP (``.module``) and ``torch.compile`` (``_orig_mod``) wrappers.

    ``through_peft``: also step into peft's ``PeftModel`` (``get_base_model()``) to reach the transformers
    ``PreTrainedModel`` (for its config); otherwise a ``PeftModel`` is returned as it is (it forwards
    ``get_decoder``/``get_output_embeddings``, and its forward runs the adapters' hooks).
    """
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        elif through_peft and callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
            if inner is model:
                return model
            model = inner
        else:
            return model


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The ``*ForCausalLM`` (or ``PeftModel``) with ``get_decoder``/``get_output_embeddings``, or ``TypeError``."""
    inner = unwrap(model)
    if not (hasattr(inner, "get_decoder") and hasattr(inner, "get_output_embeddings")):
        raise TypeError(
            f"causal_lm_loss needs a *ForCausalLM model (with get_decoder() and get_output_embeddings()), "
            f"possibly wrapped by peft, DDP or torch.compile; got {type(model).__name__}."
        )
    return inner


def text_config(model: torch.nn.Module) -> Any:
    config = getattr(unwrap(model, through_peft=True), "config", None)
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def check_ring_model(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` unless ``model`` (possibly wrapped) uses ``attn_implementation="ring"``."""
    impl = getattr(getattr(unwrap(model, through_peft=True), "config", None), "_attn_implementation", None)
    if impl != "ring":
        raise ValueError(
            f"The model uses attn_implementation={impl!r}, so it would train on each rank's shard alone. Load it "
            "with attn_implementation='ring' (e.g. AutoModelForCausalLM.from_pretrained(path, "
            "attn_implementation='ring')) or call model.set_attn_implementation('ring') after `import hf_ringcp`."
        )


# ------------------------------------------------------------------------------- position-dependent RoPE


def _rope_types(module: torch.nn.Module) -> list[str]:
    rope_type = getattr(module, "rope_type", None)
    if isinstance(rope_type, dict):
        return [str(t) for t in rope_type.values()]
    return [] if rope_type is None else [str(rope_type)]


def is_position_dependent_rope(module: torch.nn.Module) -> bool:
    """Whether a rotary module's frequencies or scale depend on ``max(position_ids)``."""
    if not type(module).__name__.endswith("RotaryEmbedding"):
        return False
    if any("dynamic" in t or t == "longrope" for t in _rope_types(module)):
        return True
    params = getattr(getattr(module, "config", None), "rope_parameters", None) or {}
    # PhiMoE picks its long/short mscale from max(position_ids) in its own forward.
    return isinstance(params, dict) and "long_mscale" in params and params.get("rope_type") != "default"


class _GlobalMaxPosition:
    """The forward hooks of one position-dependent rotary module (see the module docstring)."""

    def __init__(self) -> None:
        self._local = threading.local()

    @staticmethod
    def _global_max(position_ids: torch.Tensor, ctx) -> torch.Tensor:
        local = position_ids.max().reshape(1).to(torch.int64)
        if dist.get_backend(ctx.group) != "nccl":
            local = local.cpu()
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=ctx.group)
        return local.to(position_ids.device)

    @torch.compiler.disable  # a collective: outside any compiled graph
    def pre(self, module, args, kwargs):
        ctx = get_context()
        self._local.active = False
        if ctx is None or not ctx.cp_enabled:
            return None
        in_kwargs = "position_ids" in kwargs
        pos = kwargs["position_ids"] if in_kwargs else args[1]
        top = self._global_max(pos, ctx).to(pos.dtype)
        extended = torch.cat([pos, top.expand(*pos.shape[:-1], 1)], dim=-1)
        self._local.active, self._local.length = True, pos.shape[-1]
        if in_kwargs:
            return args, {**kwargs, "position_ids": extended}
        return (args[0], extended, *args[2:]), kwargs

    @torch.compiler.disable
    def post(self, module, args, kwargs, output):
        if not getattr(self._local, "active", False):
            return None
        self._local.active = False
        n = self._local.length

        def drop(x):
            if not torch.is_tensor(x) or x.dim() < 2 or x.shape[-2] != n + 1:
                raise RuntimeError(
                    f"{type(module).__name__} returned {tuple(x.shape) if torch.is_tensor(x) else type(x)}, not "
                    "per-position tensors [..., seq, dim]: hf_ringcp cannot give its position-dependent RoPE the "
                    "global sequence length. Use a rope_type whose frequencies do not depend on the length "
                    "(e.g. 'default', 'linear', 'yarn', 'llama3'), or train without context parallelism."
                )
            return x[..., :n, :]

        return tuple(drop(x) for x in output) if isinstance(output, tuple) else drop(output)


# Configs of models prepared by prepare_model (by id, with a weak reference to tell a reused id apart).
_PREPARED: dict[int, weakref.ref] = {}


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` exact under context parallelism where its own code would differ per rank (idempotent).

    Today: rotary embeddings with position-dependent frequencies get the global maximum position (see the
    module docstring). The plugin, :class:`hf_ringcp.RingCPCallback` and :func:`hf_ringcp.causal_lm_loss` call
    it; call it yourself before running ``model(**batch)`` inside :func:`hf_ringcp.context_parallel`.

    Returns ``model``.
    """
    for module in unwrap(model).modules():
        if is_position_dependent_rope(module) and not getattr(module, "_hf_ringcp_global_rope", False):
            hooks = _GlobalMaxPosition()
            module.register_forward_pre_hook(hooks.pre, with_kwargs=True)
            module.register_forward_hook(hooks.post, with_kwargs=True)
            module._hf_ringcp_global_rope = True
    config = text_config(model)
    if config is not None:
        _PREPARED[id(config)] = weakref.ref(config)
    return model


def needs_preparation(config: Any) -> bool:
    """Whether a model with ``config`` has position-dependent RoPE and :func:`prepare_model` was not called on it."""
    params = getattr(config, "rope_parameters", None) or {}
    types = [p.get("rope_type") for p in params.values() if isinstance(p, dict)] if all(
        isinstance(p, dict) for p in params.values()) and params else [params.get("rope_type")]
    dependent = any(t and ("dynamic" in t or t == "longrope") for t in types) or (
        "long_mscale" in params and params.get("rope_type") != "default")
    if not dependent:
        return False
    ref = _PREPARED.get(id(config))
    return ref is None or ref() is not config
