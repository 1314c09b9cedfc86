"""Optional fused kernels for the layers around the attention: liger-kernel's RMSNorm, SwiGLU and RoPE.

The ring makes the attention exact and fast; what else a long-context LoRA step spends its time on is
Transformers' unfused elementwise work (RMSNorm's float32 round trip, SwiGLU's SiLU and product, RoPE's rotate
and add: ~2.6 s of a 7.5 s Llama-3.1-8B step at 32K, docs/performance.md). ``liger-kernel`` has Triton kernels
for exactly those. It is an optional extra (``pip install 'hf_ringcp[liger]'``), never required; on CPU or
without it, nothing changes.

Only those three are applied. Liger's (fused-linear) cross-entropy is left off: :func:`hf_ringcp.causal_lm_loss`
already scores the head in checkpointed chunks over the shard's pre-shifted labels, which is what makes the
loss exact under context parallelism.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from typing import Literal

import torch

from hf_ringcp.integrations.models import unwrap

KERNELS = ("rms_norm", "swiglu", "rope")


def liger_available() -> bool:
    """Whether ``liger_kernel`` is importable and a CUDA device is there to run its Triton kernels."""
    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def apply_liger_kernels(
    model: torch.nn.Module, *, rms_norm: bool = True, swiglu: bool = True, rope: bool = True,
    when: Literal["always", "available"] = "always",
) -> tuple[str, ...]:
    """Swap in liger-kernel's fused RMSNorm, SwiGLU MLP and RoPE for a model that will run on a CUDA device.

    RMSNorm and SwiGLU are bound on the model's module instances (their parameters, names and adapters stay
    as they are: peft's LoRA layers inside the MLP keep working, and :func:`~hf_ringcp.tile_mlp` tiles the
    fused MLP); models built later keep Transformers' classes. RoPE is liger's replacement of the model
    family's ``apply_rotary_pos_emb`` (liger sets that module function, so it holds for every model of the
    family in this process; it receives the per-token ``cos``/``sin`` the ring already made global). The
    numbers match Transformers' own layers to rounding (liger's ``"llama"`` casting: the norm in float32).
    Not combined with ``torch.compile``: Inductor cannot trace liger's RMSNorm kernel (torch 2.11, liger
    0.8.5) and falls back around it; compile alone was the faster of the two (docs/performance.md).

    Args:
        model: a ``*ForCausalLM`` (possibly inside peft, DDP, FSDP or ``torch.compile``) of a family liger
            supports (Llama, Mistral, Qwen2/3, Gemma, Phi-3, ...).
        rms_norm, swiglu, rope: which kernels to use.
        when: ``"always"`` raises when liger-kernel or CUDA is missing; ``"available"`` does nothing then.

    Returns:
        The kernels applied, e.g. ``("rms_norm", "swiglu", "rope")`` (``"geglu"`` for Gemma's MLP, only those
        the family's liger function takes); ``()`` when nothing was.
    """
    if when not in ("always", "available"):
        raise ValueError(f'`when` must be "always" or "available", but got {when!r}.')
    wanted = tuple(name for name, on in zip(KERNELS, (rms_norm, swiglu, rope)) if on)
    if not wanted:
        return ()
    if not liger_available():
        if when == "available":
            return ()
        missing = "liger-kernel is not installed" if importlib.util.find_spec("liger_kernel") is None else (
            "no CUDA device is visible")
        raise RuntimeError(
            f"apply_liger_kernels: {missing}; its kernels are Triton kernels for CUDA GPUs. Install the extra "
            "(pip install 'hf_ringcp[liger]') on a GPU machine, or pass when='available' to skip them elsewhere."
        )
    base = unwrap(model, through_peft=True)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance

    model_type = getattr(base.config, "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        if when == "available":
            return ()
        raise RuntimeError(
            f"apply_liger_kernels: liger-kernel has no kernels for model_type={model_type!r}; leave them off for "
            "this model (or pass when='available')."
        )
    accepted = inspect.signature(MODEL_TYPE_TO_APPLY_LIGER_FN[model_type]).parameters
    flags = {"rms_norm": rms_norm, "swiglu": swiglu, "rope": rope}
    if "swiglu" not in accepted and "geglu" in accepted:  # Gemma's gated MLP: liger's GeGLU is the same kernel
        flags["geglu"] = flags.pop("swiglu")
    activation = getattr(base.config, "hidden_act", getattr(base.config, "hidden_activation", None))
    if flags.get("swiglu") and activation not in ("silu", "swish"):
        if when == "always":
            raise RuntimeError(f"apply_liger_kernels: liger's SwiGLU computes SiLU, but this model's activation "
                               f"is {activation!r}; pass swiglu=False.")
        flags["swiglu"] = False
    # Everything else liger would fuse by default for this family (its losses, LayerNorm, ...) stays off.
    off = {name: False for name, param in accepted.items() if isinstance(param.default, bool) and name not in flags}
    kwargs = {name: on for name, on in flags.items() if name in accepted} | off
    # liger also swaps the family's RMSNorm and MLP classes in the modeling module, which would turn every model
    # of that family built later in the process (on CPU too) into liger's; the instances are patched, so the
    # classes go back. Its RoPE is that module's function by design (the attention calls it by name).
    module = sys.modules[type(base).__module__]
    classes = {name: value for name, value in vars(module).items() if isinstance(value, type)}
    # The entry transformers' Trainer uses for `use_liger_kernel=True`.
    _apply_liger_kernel_to_instance(model=base, **kwargs)
    for name, value in classes.items():
        if vars(module).get(name) is not value:
            setattr(module, name, value)
    return tuple(name for name in ("rms_norm", "swiglu", "geglu", "rope") if kwargs.get(name))
