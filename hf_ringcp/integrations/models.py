"""The model side of the integration: finding the model inside its wrappers, and preparing it for the ring.

:func:`unwrap` is the one unwrapper (DDP/FSDP ``.module``, ``torch.compile``'s ``_orig_mod``, peft).
:func:`prepare_model` makes a model exact under context parallelism where its own code would not be: rotary
embeddings whose frequencies depend on the sequence (``rope_type="dynamic"``, Phi-3 ``longrope``, PhiMoE's
long/short scaling) choose them from ``max(position_ids)``, which differs from rank to rank when the sequence
is sharded. Forward hooks on those modules (hooks only: no transformers code is replaced) make every rank see
the maximum position of the *global* batch: the pre-hook appends that position as one extra column of
``position_ids``, and the post-hook drops its column from the outputs, so every real token is rotated exactly
as in the unsharded model.

What it cannot make exact it refuses: layers that mix tokens along the sequence outside the attention interface
(:func:`find_token_mixers`: linear / lightning / gated-delta attention, Mamba and other state-space mixers,
short and causal convolutions, RWKV / xLSTM / RG-LRU recurrences) would each see only their rank's shard of the
sequence, so :func:`prepare_model` raises before the first step, naming every such module.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hf_ringcp.integrations.context import RING_CALLS, get_context


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


# ------------------------------------------------------------------------------- token mixers outside attention

# Endings of class names (after the model's own prefix, e.g. "MiniMax") of modules that mix tokens by a recurrence
# or a scan instead of the attention interface. Endings, not substrings: a family prefix such as "Mamba" or
# "Recurrent" also names that family's norms and MLPs.
_MIXER_CLASS_ENDINGS = (
    "Mixer", "MambaLayer", "GatedDeltaNet", "DeltaNet", "DeltaAttention", "LinearAttention", "LightningAttention",
    "ShortConv", "ShortConvolution", "Rglru", "RecurrentBlock", "LSTMLayer", "Retention",
)
# Parameters of state-space and gated-delta decays (Mamba's A_log/dt_bias, RWKV's time_decay/time_first) and of
# token shifts (RWKV's time_mix_*): each exists only to carry information from earlier tokens.
_RECURRENT_PARAMETERS = ("A_log", "dt_bias", "time_decay", "time_first")
_TOKEN_SHIFT_PREFIX = "time_mix"
_ARCHITECTURE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel", "Model")
# Towers that encode their own inputs (pixels, audio frames), never the sharded token sequence: their convolutions
# are not token mixers. Matched against the parts of a module's path.
_OTHER_MODALITIES = ("audio", "vision", "visual", "image", "video", "speech")


@dataclass(frozen=True)
class TokenMixer:
    """A module that mixes tokens along the sequence outside the attention interface.

    Attributes:
        path: its name in ``model.named_modules()`` (e.g. ``"model.layers.0.linear_attn"``).
        kind: its class name.
        why: what identified it (a class-name ending, a recurrent parameter, a convolution's kernel size).
    """

    path: str
    kind: str
    why: str


def _model_prefix(model: torch.nn.Module) -> str:
    name = type(model).__name__
    for suffix in _ARCHITECTURE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return ""


def _mixer_reason(module: torch.nn.Module, prefix: str) -> str | None:
    """Why ``module`` mixes tokens along the sequence, or ``None``."""
    if isinstance(module, torch.nn.Conv1d) and module.kernel_size[0] > 1:
        # In a decoder the convolved axis is the sequence (short/causal convolutions of Mamba, LFM2, GatedDeltaNet).
        return f"a convolution along the sequence (Conv1d, kernel_size={module.kernel_size[0]})"
    name = type(module).__name__
    own = name[len(prefix):] if prefix and name.startswith(prefix) else name
    # The full name too (xLSTM's "xLSTMLayer"), except for attention endings: "KimiLinear" + "Attention" is softmax.
    ending = next((e for e in _MIXER_CLASS_ENDINGS
                   if own.endswith(e) or (name.endswith(e) and not e.endswith("Attention"))), None)
    if ending is not None:
        return f"a recurrent / linear-attention token mixer (class name ending in {ending!r})"
    local = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
    recurrent = [n for n in local if n in _RECURRENT_PARAMETERS]
    if recurrent:
        return f"a state-space / recurrent decay (parameter {recurrent[0]!r})"
    shift = [n for n in local if n.startswith(_TOKEN_SHIFT_PREFIX)]
    if shift:
        return f"a token shift (parameter {shift[0]!r})"
    return None


def _decoder(base: torch.nn.Module) -> torch.nn.Module:
    """The text decoder of ``base`` (its towers for images or audio never see the sharded sequence)."""
    get = getattr(base, "get_decoder", None)
    if callable(get):
        try:
            decoder = get()
        except (AttributeError, NotImplementedError, ValueError):
            decoder = None
        if isinstance(decoder, torch.nn.Module):
            return decoder
    return base


def find_token_mixers(model: torch.nn.Module) -> list[TokenMixer]:
    """Every module of ``model``'s text decoder that mixes tokens along the sequence outside attention.

    Found from the modules themselves, not from a list of model families: a ``Conv1d`` whose kernel spans more
    than one token, a class whose name (after the model's own prefix) ends like a recurrent or linear-attention
    mixer (``...Mixer``, ``...GatedDeltaNet``, ``...LightningAttention``, ``...ShortConv``, ...), or a module owning
    a state-space / recurrent decay parameter (``A_log``, ``dt_bias``, ``time_decay``) or a token shift
    (``time_mix_*``). Only the outermost such module is listed (a Mamba mixer, not also its ``conv1d``).

    ``model`` may be wrapped (DDP, FSDP, ``torch.compile``, peft).
    """
    base = unwrap(model, through_peft=True)
    names = {id(m): n for n, m in base.named_modules()}
    prefix = _model_prefix(base)
    found: list[TokenMixer] = []
    for module in _decoder(base).modules():
        path = names.get(id(module), type(module).__name__)
        if any(path.startswith(f"{f.path}.") for f in found):
            continue  # inside a module already listed
        if any(m in part.lower() for part in path.split(".") for m in _OTHER_MODALITIES):
            continue
        why = _mixer_reason(module, prefix)
        if why is not None:
            found.append(TokenMixer(path=path, kind=type(module).__name__, why=why))
    return found


def check_token_mixers(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` naming every module of ``model`` that :func:`find_token_mixers` finds.

    Under context parallelism each such module would see only its rank's shard of the sequence: its recurrence
    or convolution would restart at every shard boundary and train silently wrong.
    """
    found = find_token_mixers(model)
    if not found:
        return
    shown = "; ".join(f"{m.path} ({m.kind}: {m.why})" for m in found[:8])
    more = f"; and {len(found) - 8} more" if len(found) > 8 else ""
    raise ValueError(
        'attn_implementation="ring" under context parallelism does not support layers that mix tokens along '
        f"the sequence outside attention: {len(found)} found, {shown}{more}. Each would see only its rank's shard "
        "of the sequence (its state or convolution restarting at every shard boundary), so training would be "
        "silently wrong; train this model without context parallelism (cp_size=1, e.g. with "
        "attn_implementation='sdpa' and a shorter sequence or activation checkpointing)."
    )


def check_value_head_dims(model: torch.nn.Module) -> None:
    """Raise ``ValueError`` for attention whose value heads are narrower or wider than its query/key heads.

    Multi-head latent attention (MLA: DeepSeek-V2/V3, Kimi-K2, MiniCPM3, GLM-4-MoE-Lite) gives its attention
    modules ``qk_head_dim`` != ``v_head_dim``; the ring's kernels take K and V of one shape. Found by module (the
    attributes above), named in the message.
    """
    base = unwrap(model, through_peft=True)
    for path, module in base.named_modules():
        qk, v = getattr(module, "qk_head_dim", None), getattr(module, "v_head_dim", None)
        if isinstance(qk, int) and isinstance(v, int) and qk != v:
            raise ValueError(
                'attn_implementation="ring" under context parallelism does not support multi-head latent '
                f"attention (MLA) with a value head dim different from the query/key head dim: {path} "
                f"({type(module).__name__}: qk_head_dim={qk}, v_head_dim={v}); the ring's kernels need K and V "
                "of one shape. Train this model without context parallelism (cp_size=1)."
            )


class _MustReachRing:
    """Decoder hooks: a forward under context parallelism (more than one rank) must call ``"ring"`` attention.

    A model whose attention does not dispatch through transformers' ``AttentionInterface`` (its class has
    ``_supports_attention_backend=False`` and computes attention itself, e.g. BLOOM) accepts
    ``attn_implementation="ring"`` and then attends within each rank's shard only: every loss would be silently
    wrong. The pre-hook notes the call count, the post-hook raises if it did not move.
    """

    def __init__(self) -> None:
        self.before: int | None = None

    def pre(self, module: torch.nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # a traced hook would bake the count in; the eager runs check it
            self.before = None
            return
        ctx = get_context()
        self.before = RING_CALLS.count if ctx is not None and ctx.cp_enabled else None

    def post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            return
        if self.before is not None and RING_CALLS.count == self.before:
            raise ValueError(
                f'attn_implementation="ring" was never called in a forward of {type(module).__name__} under context '
                "parallelism: its attention does not dispatch through transformers' AttentionInterface, so each rank "
                "would attend within its own shard only. Train this model without context parallelism (cp_size=1)."
            )
        self.before = None


# Configs of models prepared by prepare_model (by id, with a weak reference to tell a reused id apart).
_PREPARED: dict[int, weakref.ref] = {}


def prepare_model(model: torch.nn.Module, *, cp_size: int | None = None) -> torch.nn.Module:
    """Make ``model`` exact under context parallelism where its own code would differ per rank (idempotent).

    Today: rotary embeddings with position-dependent frequencies get the global maximum position (see the
    module docstring); layers that mix tokens outside attention (:func:`check_token_mixers`) and multi-head latent
    attention with a value head dim of its own (:func:`check_value_head_dims`) are refused, and a decoder forward
    under context parallelism that never reaches ``"ring"`` attention (a model computing attention itself) raises. The
    plugin, :class:`hf_ringcp.RingCPCallback`, :func:`hf_ringcp.causal_lm_loss` and :func:`hf_ringcp.generate`
    call it; call it yourself before running ``model(**batch)`` inside :func:`hf_ringcp.context_parallel`.

    Args:
        model: the model, possibly wrapped (DDP, FSDP, ``torch.compile``, peft).
        cp_size: the number of ranks sharing a sequence; ``1`` skips the refusals (one rank sees
            the whole sequence), ``None`` (unknown) refuses them as for several ranks.

    Returns ``model``. Raises ``ValueError`` for a model it refuses (unless ``cp_size == 1``).
    """
    if cp_size != 1:
        check_token_mixers(model)
        check_value_head_dims(model)
    inner = unwrap(model)
    decoder = inner.get_decoder() if callable(getattr(inner, "get_decoder", None)) else None
    if isinstance(decoder, torch.nn.Module) and not getattr(decoder, "_hf_ringcp_must_reach_ring", False):
        guard = _MustReachRing()
        decoder.register_forward_pre_hook(guard.pre)
        decoder.register_forward_hook(guard.post)
        decoder._hf_ringcp_must_reach_ring = True
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
