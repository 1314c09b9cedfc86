"""The per-rank half of the check: one training step under context parallelism, the same step without it.

:func:`check_rank` runs on every rank of an initialised process group (the check's own spawner, ``torchrun``, or a
test harness) and returns plain numbers: the relative errors of the logits, the loss, every trainable gradient
and the output of every decoder layer and its attention, measured on every rank alike (the ring's results are
gathered and reduced first). Judging them is :func:`hf_ringcp.check.report.judge`'s job.
"""

from __future__ import annotations

import copy
import math
import os
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import hf_ringcp
from hf_ringcp.check.data import make_batch
from hf_ringcp.check.spec import CheckSpec
from hf_ringcp.integrations.batch import SHARD_KEY, unshard_predictions
from hf_ringcp.integrations.models import unwrap

#: How the library words what the ring cannot honour.
REFUSAL_PREFIX = 'attn_implementation="ring" under context parallelism does not support'
_LIBRARY = Path(hf_ringcp.__file__).resolve().parent
_CHECK = Path(__file__).resolve().parent

ATTENTION = "attention output"
LAYER = "layer output"


# ------------------------------------------------------------------------------------------------ models


def is_refusal(err: BaseException) -> bool:
    """Whether ``err`` is the library refusing a feature (a ``ValueError`` raised by hf_ringcp, not by the check)."""
    if not isinstance(err, ValueError):
        return False
    if str(err).startswith(REFUSAL_PREFIX):
        return True
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    origin = Path(frames[-1].filename).resolve()
    return origin.is_relative_to(_LIBRARY) and not origin.is_relative_to(_CHECK)


def _device(spec: CheckSpec) -> torch.device:
    if spec.device == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(spec.device)


def build_model(spec: CheckSpec, attn: str, device: torch.device) -> torch.nn.Module:
    """The model of ``spec.config`` with ``attn``, seeded random float32 weights, LoRA / checkpointing as asked."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    # from_config writes the attention implementation into the config: every model gets its own copy.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(spec.config), attn_implementation=attn,
                                             dtype=torch.float32)
    model.to(device)
    if spec.gradient_checkpointing:
        # Renamed in transformers 5.24 (the old name warns); older releases have only the old one.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.lora:
        torch.manual_seed(spec.seed + 2)
        # Random (not zero) B matrices, so that every adapter weight gets a gradient worth comparing.
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
        model = get_peft_model(model, lora)
    return model.train()


def build_reference(spec: CheckSpec, ring: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, str]:
    """``(model, attn)``: the ring model's weights under "sdpa", or "eager" for models without SDPA support."""
    for attn in ("sdpa", "eager"):
        try:
            ref = build_model(spec, attn, device)
        except ValueError:
            if attn == "eager":
                raise
            continue
        ref.load_state_dict(ring.state_dict())
        return ref, attn
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ hooks


Tap = tuple[int, str, torch.nn.Module, tuple[str, torch.nn.Module] | None]


def decoder_layers(model: torch.nn.Module) -> list[Tap]:
    """``(index, name, layer, (attention name, attention module) or None)`` for every decoder layer, in order."""
    base = unwrap(model, through_peft=True)
    names = {id(m): n for n, m in base.named_modules()}
    decoder = base.get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        layers = next((m for m in decoder.children() if isinstance(m, torch.nn.ModuleList)), torch.nn.ModuleList())
    found = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if not isinstance(attn, torch.nn.Module):
            attn = next((m for m in layer.children() if type(m).__name__.endswith("Attention")), None)
        found.append((i, names[id(layer)], layer, None if attn is None else (names[id(attn)], attn)))
    return found


class LayerTaps:
    """Forward hooks that keep the first output of every decoder layer and of its attention (while entered)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = decoder_layers(model)
        self.outputs: dict[tuple[int, str], torch.Tensor] = {}
        self._handles: list[Any] = []

    def order(self) -> list[tuple[int, str, str]]:
        """``(layer index, module name, tensor)`` in the order the forward computes them."""
        out = []
        for i, name, _, attn in self.layers:
            if attn is not None:
                out.append((i, attn[0], ATTENTION))
            out.append((i, name, LAYER))
        return out

    def _hook(self, key: tuple[int, str]):
        def keep(module, args, output) -> None:
            x = output[0] if isinstance(output, (tuple, list)) else output
            if key not in self.outputs and torch.is_tensor(x):
                self.outputs[key] = x.detach().clone()
        return keep

    def __enter__(self) -> LayerTaps:
        for i, _, layer, attn in self.layers:
            self._handles.append(layer.register_forward_hook(self._hook((i, LAYER))))
            if attn is not None:
                self._handles.append(attn[1].register_forward_hook(self._hook((i, ATTENTION))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


# ------------------------------------------------------------------------------------------------ steps


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters that train, in a fixed order (the same on every rank)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _summed_grads(model: torch.nn.Module, group) -> dict[str, torch.Tensor | None]:
    """Each rank's gradients summed over the group (one all-reduce); ``None`` where no rank has one."""
    params = trainable(model)
    # A parameter may get no gradient on some ranks (e.g. an expert no local token is routed to): send zeros.
    flat = torch.cat([
        (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for _, p in params
    ] + [torch.tensor([float(p.grad is not None) for _, p in params], device=params[0][1].device)])
    dist.all_reduce(flat, group=group)
    values, flags = flat[: -len(params)], flat[-len(params):]
    grads, offset = {}, 0
    for (name, p), flag in zip(params, flags.tolist()):
        grads[name] = values[offset : offset + p.numel()].view_as(p) if flag else None
        offset += p.numel()
    return grads


_SCALE_KEYS = ("logit_scale", "logits_scaling")


def measured_logits_transform(model: torch.nn.Module, ids: torch.Tensor):
    """The logit scaling the model's own forward applies after its head, measured; ``None`` if it has none.

    :func:`hf_ringcp.causal_lm_loss` asks for ``logits_transform`` when the config has ``logit_scale`` /
    ``logits_scaling`` (Cohere multiplies by it, Granite divides): the check compares the model's logits with
    its head's output on a few tokens in this process (no ring involved) and passes the transform that matches.
    """
    config = unwrap(model, through_peft=True).config.get_text_config(decoder=True)
    key = next((k for k in _SCALE_KEYS if getattr(config, k, None) not in (None, 1.0)), None)
    if key is None:
        return None
    scale = float(getattr(config, key))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits.float()
        head = model.get_output_embeddings()
        raw = head(model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state).float()
    for transform in (lambda x: x * scale, lambda x: x / scale):
        if torch.allclose(transform(raw), logits, rtol=1e-4, atol=1e-5):
            return transform
    raise RuntimeError(f"the model's logits are neither its head's output times nor divided by {key}={scale}.")


def ring_step(model: torch.nn.Module, spec: CheckSpec, full: dict[str, torch.Tensor], group) -> dict[str, Any]:
    """Forward (logits and layer outputs) and training step of ``model`` under context parallelism.

    Returns the full-batch results on every rank: ``logits`` ``[B, S, V]``, the summed ``loss``, ``grads`` and
    the layer outputs ``hidden`` (``[B, S, H]`` each), all unsharded.
    """
    taps = LayerTaps(model)
    transform = measured_logits_transform(model, full["input_ids"][:1, :8])  # outside the CP context: one process
    with hf_ringcp.context_parallel(group, layout=spec.layout, comm=spec.comm, backend=spec.backend,
                                    ulysses_size=spec.ulysses_size):
        batch = hf_ringcp.shard_batch(full, group, layout=spec.layout)
        hf_ringcp.prepare_model(model)  # before a forward of our own (causal_lm_loss does it too)
        inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
        with taps, torch.no_grad():
            logits = model(**inputs, use_cache=False).logits
        loss = hf_ringcp.causal_lm_loss(model, batch, group=group, logits_transform=transform)
        loss.backward()  # inside the block: checkpointed layers recompute the ring attention here
    info = batch.get(SHARD_KEY)
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    unshard = lambda x: unshard_predictions(x, info, group, spec.layout)
    return {
        "logits": unshard(logits), "loss": total, "grads": _summed_grads(model, group),
        "hidden": {key: unshard(x) for key, x in taps.outputs.items()}, "order": taps.order(),
    }


def reference_step(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The same step in one process: the model's own forward and loss on the full batch."""
    taps = LayerTaps(model)
    with taps:
        # Stock transformers honours packed position_ids only without a KV cache: use_cache=False.
        out = model(**full, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad for n, p in trainable(model)}
    return {"logits": out.logits.detach(), "loss": out.loss.detach(), "grads": grads, "hidden": taps.outputs}


# ------------------------------------------------------------------------------------------------ errors


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|x - ref| / max|ref|`` in float64; 0 for two zero tensors, ``inf`` for a zero reference only."""
    diff = (x.double() - ref.double()).abs().max()
    scale = ref.double().abs().max()
    if scale == 0:
        return 0.0 if diff == 0 else float("inf")
    return float(diff / scale)


def _grad_errors(ring: dict[str, torch.Tensor | None], ref: dict[str, torch.Tensor | None]) -> dict[str, float]:
    errors = {}
    for name, expected in ref.items():
        got = ring.get(name)
        if expected is None and got is None:
            continue  # a parameter neither run used
        if expected is None or got is None:
            errors[name] = float("inf")  # one run has a gradient, the other none
            continue
        errors[name] = rel_error(got, expected)
    return errors


def worst_gradient(errors: dict[str, float]) -> str | None:
    """The gradient with the largest error, a NaN above any number (``max`` alone would skip a NaN)."""
    if not errors:
        return None
    return max(errors, key=lambda name: (math.isnan(errors[name]), errors[name]))


def measure(ring: dict[str, Any], ref: dict[str, Any], real: torch.Tensor) -> dict[str, Any]:
    """The relative errors of the ring's step against the reference's (plain floats), see :func:`check_rank`."""
    grads = _grad_errors(ring["grads"], ref["grads"])
    layers = [
        {"layer": i, "module": name, "tensor": tensor,
         "max_rel_error": rel_error(ring["hidden"][(i, tensor)][real], ref["hidden"][(i, tensor)][real])}
        for i, name, tensor in ring["order"]
        if (i, tensor) in ring["hidden"] and (i, tensor) in ref["hidden"]
    ]
    worst = worst_gradient(grads)
    return {
        "status": "ran",
        "errors": {
            "logits": rel_error(ring["logits"][real], ref["logits"][real]),
            "loss": rel_error(ring["loss"], ref["loss"]),
            "grads": grads[worst] if grads else float("nan"),
        },
        "worst_grad": worst,
        "grads": grads,
        "layers": layers,
        "losses": {"ring": float(ring["loss"]), "reference": float(ref["loss"])},
        "compared": {"tokens": int(real.sum()), "gradients": len(grads),
                     "gradient_elements": sum(int(g.numel()) for g in ref["grads"].values() if g is not None)},
    }


def check_rank(rank: int, world: int, spec: CheckSpec, group: dist.ProcessGroup | None = None) -> dict[str, Any]:
    """Run the check's step on this rank of ``group`` (``None``: the default group) and measure it.

    Every rank of the group must call it with the same ``spec``. The ring model and the reference share their
    weights; both see the same full batch (:func:`hf_ringcp.check.data.make_batch`).

    Returns (the same on every rank), one of:
        ``{"status": "ran", "errors": {"logits", "loss", "grads"}, "worst_grad", "grads": {name: error},
        "layers": [{"layer", "module", "tensor", "max_rel_error"}], "losses", "compared", "reference"}``;
        ``{"status": "refused", "message": <the library's message>}``;
        ``{"status": "error", "message", "traceback"}`` for anything else that went wrong.
    """
    try:
        if world != spec.cp:
            raise ValueError(f"the check was asked for cp={spec.cp} but runs on {world} ranks.")
        device = _device(spec)
        ring = build_model(spec, "ring", device)
        full, real = make_batch(spec, spec.config.vocab_size)
        full, real = {k: v.to(device) for k, v in full.items()}, real.to(device)
        try:
            ring_out = ring_step(ring, spec, full, group)
        except ValueError as err:
            if is_refusal(err):
                return {"status": "refused", "message": str(err)}
            raise
        ref, attn = build_reference(spec, ring, device)
        result = measure(ring_out, reference_step(ref, full), real)
        result["reference"] = attn
        return result
    except Exception as err:  # reported, not raised: the caller turns it into exit code 3
        return {"status": "error", "message": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
