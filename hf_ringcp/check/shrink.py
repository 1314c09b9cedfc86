"""Shrinking a model config for the check: fewer and narrower layers, the same attention path.

What reaches the attention is kept exactly: the head layout (``num_attention_heads``, ``num_key_value_heads``,
``head_dim``, set explicitly once ``hidden_size`` shrinks), the rotary embedding (``rope_parameters`` with its
type and scaling, ``partial_rotary_factor``), the sliding window, every distinct layer type (``layer_types`` and
any other per-layer list) and every other attention setting (scaling, soft-capping, biases, dropout). What only
costs time is shrunk: the number of layers, ``hidden_size``, the MLP widths, the number of experts and the
vocabulary. Dropout outside the attention is set to 0 (its random masks would differ between the two runs);
attention dropout is kept, since the ring refuses it in training and the check must say so.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch

#: ``hidden_size`` after shrinking (rounded up to a multiple of the query heads), when the model is wider.
HIDDEN = 256
VOCAB = 512
EXPERTS = 4
MIN_LAYERS = 2
_MLP_KEYS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
_ATTENTION_DROPOUT = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob", "attn_dropout")
# Per-layer lists have the length num_hidden_layers; these keys can have that length by coincidence.
_NOT_PER_LAYER = ("architectures",)


@dataclass
class Shrunk:
    """A shrunk config and what happened to it.

    Attributes:
        config: the config to build the model from.
        changes: ``"name: old -> new"`` lines, one per shrunk setting.
        kept: what the attention sees, as it is in both configs (head layout, RoPE, window, layer types).
        layers: the original indices of the kept layers.
        notes: anything else worth knowing (e.g. a window longer than the checked sequence).
    """

    config: Any
    changes: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def head_layout(config: Any) -> tuple[int, int, int]:
    """``(query heads, key/value heads, head_dim)`` of a decoder config."""
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv, int(head_dim)


def attention_signature(config: Any) -> dict[str, Any]:
    """The settings that decide the attention path; :func:`shrink_config` keeps all of them equal."""
    heads, kv, head_dim = head_layout(config)
    return {
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "rope_parameters": getattr(config, "rope_parameters", None),
        "partial_rotary_factor": getattr(config, "partial_rotary_factor", None),
        "sliding_window": getattr(config, "sliding_window", None),
        "layer_types": sorted(set(getattr(config, "layer_types", None) or [])),
        "attn_logit_softcapping": getattr(config, "attn_logit_softcapping", None),
        "query_pre_attn_scalar": getattr(config, "query_pre_attn_scalar", None),
        "attention_bias": getattr(config, "attention_bias", None),
        "attention_dropout": getattr(config, "attention_dropout", None),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
    }


def per_layer_lists(values: dict[str, Any], num_layers: int) -> dict[str, list]:
    """The entries of a config dict that hold one value per layer (``layer_types``, ``no_rope_layers``, ...)."""
    return {
        k: v for k, v in values.items()
        if isinstance(v, list) and len(v) == num_layers and k not in _NOT_PER_LAYER and not k.endswith("_token_id")
    }


def representative_layers(per_layer: dict[str, list], num_layers: int, minimum: int = MIN_LAYERS) -> list[int]:
    """The first layer of every distinct combination of per-layer values, topped up to ``minimum`` layers.

    A layer's kind is the tuple of its entries in every per-layer list, so a model with sliding and full layers
    (or RoPE and no-RoPE layers) keeps one of each, in their original order.
    """
    seen: set[tuple[str, ...]] = set()
    keep: list[int] = []
    for i in range(num_layers):
        kind = tuple(repr(v[i]) for v in per_layer.values())
        if kind not in seen:
            seen.add(kind)
            keep.append(i)
    extra = (i for i in range(num_layers) if i not in keep)
    while len(keep) < min(minimum, num_layers):
        keep.append(next(extra))
    return sorted(keep)


def _narrow_hidden(hidden: int, heads: int) -> int:
    # A multiple of the query heads: some configs check hidden_size % num_attention_heads even with head_dim set.
    step = math.lcm(heads, 16)
    return min(hidden, step * math.ceil(HIDDEN / step))


def _remap_token_ids(values: dict[str, Any], vocab: int) -> list[str]:
    """Move special token ids that fall outside the new vocabulary to its end (distinct ids stay distinct)."""
    moved: dict[int, int] = {}
    changes = []

    def new_id(old: int) -> int:
        if old not in moved:
            moved[old] = vocab - 1 - len(moved)
        return moved[old]

    for key in sorted(values):
        value = values[key]
        if not key.endswith("_token_id"):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value >= vocab:
            values[key] = new_id(value)
        elif isinstance(value, list) and any(isinstance(x, int) and x >= vocab for x in value):
            values[key] = [new_id(x) if isinstance(x, int) and x >= vocab else x for x in value]
        else:
            continue
        changes.append(f"{key}: {value} -> {values[key]}")
    return changes


def _zero_dropout(values: dict[str, Any]) -> list[str]:
    changes = []
    for key, value in sorted(values.items()):
        is_dropout = "dropout" in key or "pdrop" in key
        if is_dropout and key not in _ATTENTION_DROPOUT and isinstance(value, float) and value > 0:
            values[key] = 0.0
            changes.append(f"{key}: {value} -> 0.0 (random masks would differ between the runs)")
    return changes


def _key(config: Any, name: str) -> str:
    """The key of the standard setting ``name`` in ``config.to_dict()`` (GPT-2's ``n_layer``, ``n_embd``, ...)."""
    return getattr(config, "attribute_map", {}).get(name, name)


def _settable_head_dim(config: Any) -> bool:
    # Some configs (Falcon) derive head_dim in a read-only property.
    attr = inspect.getattr_static(type(config), "head_dim", None)
    return not (isinstance(attr, property) and attr.fset is None)


def _shrink_widths(values: dict[str, Any], heads: int, head_dim: int, config: Any) -> list[str]:
    changes = []
    hidden_key = _key(config, "hidden_size")
    hidden = values[hidden_key]
    narrow = _narrow_hidden(hidden, heads)
    if narrow < hidden:
        values[hidden_key] = narrow
        changes.append(f"{hidden_key}: {hidden} -> {narrow}")
    if _settable_head_dim(config):
        values["head_dim"] = head_dim  # explicit: many models derive it from hidden_size otherwise
    for key in _MLP_KEYS:
        if isinstance(values.get(key), int) and values[key] > 2 * narrow:
            changes.append(f"{key}: {values[key]} -> {2 * narrow}")
            values[key] = 2 * narrow
    experts = None
    for key in _EXPERT_KEYS:
        if isinstance(values.get(key), int) and values[key] > EXPERTS:
            changes.append(f"{key}: {values[key]} -> {EXPERTS}")
            values[key] = experts = EXPERTS
    top_k = values.get("num_experts_per_tok")
    if experts is not None and isinstance(top_k, int) and top_k > experts:
        changes.append(f"num_experts_per_tok: {top_k} -> {experts}")
        values["num_experts_per_tok"] = experts
    return changes


def _shrink_layers(values: dict[str, Any], config: Any) -> tuple[list[int], list[str]]:
    layers_key = _key(config, "num_hidden_layers")
    num_layers = int(values[layers_key])
    per_layer = per_layer_lists(values, num_layers)
    keep = representative_layers(per_layer, num_layers)
    if len(keep) == num_layers:
        return keep, []
    values[layers_key] = len(keep)
    for key, lst in per_layer.items():
        values[key] = [lst[i] for i in keep]
    kinds = sorted({str(x) for x in per_layer.get("layer_types", [])})
    why = f"; layer types kept: {', '.join(kinds)}" if kinds else ""
    return keep, [f"{layers_key}: {num_layers} -> {len(keep)} (original layers {keep}{why})"]


def _honours_head_dim(config: Any, heads: int, kv: int, head_dim: int) -> bool:
    """Whether the model built from ``config`` has the requested head layout (some models ignore ``head_dim``)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for module in model.modules():
        if isinstance(getattr(module, "head_dim", None), int) and module.head_dim != head_dim:
            return False
        q, k = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
        if isinstance(q, torch.nn.Linear) and q.out_features not in (heads * head_dim, 2 * heads * head_dim):
            return False  # (2x: models whose q_proj also produces a gate)
        if isinstance(k, torch.nn.Linear) and k.out_features != kv * head_dim:
            return False
    return True


def _describe_kept(config: Any) -> list[str]:
    heads, kv, head_dim = head_layout(config)
    kept = [f"heads: {heads} query / {kv} key-value of head_dim {head_dim}"]
    kept.append(f"rope_parameters: {getattr(config, 'rope_parameters', None)}")
    if getattr(config, "partial_rotary_factor", None) not in (None, 1.0):
        kept.append(f"partial_rotary_factor: {config.partial_rotary_factor}")
    kept.append(f"sliding_window: {getattr(config, 'sliding_window', None)}")
    if getattr(config, "layer_types", None):
        kept.append(f"layer_types: {list(config.layer_types)}")
    for key in ("attn_logit_softcapping", "query_pre_attn_scalar", "attention_dropout", "max_position_embeddings"):
        if getattr(config, key, None) is not None:
            kept.append(f"{key}: {getattr(config, key)}")
    return kept


def shrink_config(config: Any, *, shrink: bool = True, layers: bool = True, widths: bool = True) -> Shrunk:
    """A config of the same attention path as ``config``, small enough to check in seconds on a CPU.

    Args:
        config: a transformers config (a composite config is reduced to its text model).
        shrink: ``False`` keeps every size (only the text model is taken and non-attention dropout zeroed).
        layers, widths: ``False`` keeps the number of layers / the widths (for models whose config validation
            or code do not survive that part of the shrinking); the vocabulary is shrunk either way.

    Returns:
        A :class:`Shrunk` with the new config and the list of changes. Raises ``AssertionError`` if rebuilding the
        config changed any setting of :func:`attention_signature` (a bug here, never silently checked).
    """
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    result = Shrunk(config=text)
    if text is not config:
        result.notes.append(f"checking the text model only ({type(text).__name__} of {type(config).__name__})")
    values = text.to_dict()
    values.pop("quantization_config", None)
    heads, kv, head_dim = head_layout(text)
    result.layers = list(range(int(values[_key(text, "num_hidden_layers")])))
    if shrink and layers:
        result.layers, layer_changes = _shrink_layers(values, text)
        result.changes += layer_changes
    if shrink and widths:
        original = dict(values)
        width_changes = _shrink_widths(values, heads, head_dim, text)
        if width_changes and not _honours_head_dim(type(text).from_dict(dict(values)), heads, kv, head_dim):
            values = original  # this model derives head_dim from hidden_size: keep the widths
            width_changes = []
            result.notes.append("hidden_size kept: this model derives its head layout from hidden_size")
        result.changes += width_changes
    if shrink:
        vocab = values.get("vocab_size")
        if isinstance(vocab, int) and vocab > VOCAB:
            values["vocab_size"] = VOCAB
            result.changes.append(f"vocab_size: {vocab} -> {VOCAB}")
            result.changes += _remap_token_ids(values, VOCAB)
    result.changes += _zero_dropout(values)
    new = type(text).from_dict(values)
    before, after = attention_signature(text), attention_signature(new)
    differ = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if differ:
        raise AssertionError(f"shrinking changed the attention path: {differ}")
    result.config = new
    result.kept = _describe_kept(new)
    return result
