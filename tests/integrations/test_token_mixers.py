"""Layers that mix tokens along the sequence outside attention are refused by module, before any training step.

Under context parallelism a gated-delta / lightning / SSM recurrence or a short convolution sees only its rank's
shard of the sequence and restarts at every shard boundary: the logits and gradients are silently wrong. The
library finds such modules structurally (:func:`hf_ringcp.integrations.models.find_token_mixers`) and every entry
point that prepares a model (``prepare_model``, ``causal_lm_loss``, the plugin and with it the Trainer callback)
refuses, naming each module. Models with attention only (Llama, Qwen2, Mistral) are accepted.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    Lfm2Config,
    LlamaConfig,
    MambaConfig,
    MiniMaxConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3NextConfig,
)

import hf_ringcp
from hf_ringcp.integrations.models import find_token_mixers, prepare_model
from hf_ringcp.integrations.plugin import ContextParallelPlugin
from tests.distributed import run_ranks

VOCAB = 64
_ATTN = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128)
_MOE = dict(num_experts_per_tok=1)

# name -> (config, the modules that must be named: {path: class}).
MIXERS = {
    "qwen3_next": (
        Qwen3NextConfig(**_ATTN, **_MOE, head_dim=8, num_hidden_layers=2,
                        layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                        linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=2,
                        moe_intermediate_size=32, shared_expert_intermediate_size=32),
        {"model.layers.0.linear_attn": "Qwen3NextGatedDeltaNet"},
    ),
    # One full-attention and one lightning layer: the lightning layer alone is named, and enough to refuse.
    "minimax": (
        MiniMaxConfig(**_ATTN, **_MOE, head_dim=8, num_hidden_layers=2,
                      layer_types=["full_attention", "linear_attention"], num_local_experts=2, block_size=16),
        {"model.layers.1.self_attn": "MiniMaxLightningAttention"},
    ),
    "lfm2": (
        Lfm2Config(**_ATTN, num_hidden_layers=2, layer_types=["conv", "full_attention"]),
        {"model.layers.0.conv": "Lfm2ShortConv"},
    ),
    "mamba": (
        MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4, expand=2),
        {"backbone.layers.0.mixer": "MambaMixer", "backbone.layers.1.mixer": "MambaMixer"},
    ),
}
ATTENTION_ONLY = {
    "llama": LlamaConfig(**_ATTN, num_hidden_layers=2),
    "qwen2": Qwen2Config(**_ATTN, num_hidden_layers=2),
    "mistral": MistralConfig(**_ATTN, num_hidden_layers=2, sliding_window=8),
}


def _build(config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="ring", dtype=torch.float32)


def _names_every_mixer(message: str, expected: dict[str, str]) -> None:
    assert message.startswith('attn_implementation="ring" under context parallelism does not support layers '
                              "that mix tokens along the sequence outside attention"), message
    for path, kind in expected.items():
        assert f"{path} ({kind}:" in message, message
    assert f"{len(expected)} found" in message and "without context parallelism" in message


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_prepare_model_refuses_each_token_mixer_by_module(name: str) -> None:
    config, expected = MIXERS[name]
    model = _build(config)
    assert {m.path: m.kind for m in find_token_mixers(model)} == expected
    with pytest.raises(ValueError) as refused:
        prepare_model(model)
    _names_every_mixer(str(refused.value), expected)
    # The plugin (and RingCPCallback, which calls it at on_init_end) refuses for a CP size above one ...
    with pytest.raises(ValueError, match=re.escape(next(iter(expected)))):
        ContextParallelPlugin(cp_size=2).prepare_model(model)
    # ... and through peft's wrapper (paths as in the transformers model inside it).
    torch.manual_seed(1)
    wrapped = get_peft_model(_build(config), LoraConfig(r=2, target_modules=["lm_head"], lora_dropout=0.0))
    with pytest.raises(ValueError) as refused:
        prepare_model(wrapped)
    _names_every_mixer(str(refused.value), expected)
    # One rank sees the whole sequence: nothing to refuse.
    assert prepare_model(model, cp_size=1) is model


def test_minimax_full_attention_layer_is_not_named() -> None:
    config, _ = MIXERS["minimax"]
    paths = [m.path for m in find_token_mixers(_build(config))]
    assert paths == ["model.layers.1.self_attn"]  # layer 0 is softmax attention through the ring: not a mixer


@pytest.mark.parametrize("name", sorted(ATTENTION_ONLY))
def test_attention_only_models_are_accepted(name: str) -> None:
    model = _build(ATTENTION_ONLY[name])
    assert find_token_mixers(model) == []
    assert prepare_model(model) is model
    ContextParallelPlugin(cp_size=2).prepare_model(model)


def test_a_pointwise_conv1d_is_not_a_token_mixer() -> None:
    model = _build(ATTENTION_ONLY["llama"])
    model.model.layers[0].mlp.pointwise = torch.nn.Conv1d(32, 32, kernel_size=1)  # mixes channels, not tokens
    assert find_token_mixers(model) == []
    model.model.layers[1].mlp.smear = torch.nn.Conv1d(32, 32, kernel_size=3, groups=32)  # spans 3 tokens
    found = find_token_mixers(model)
    assert [(m.path, m.kind) for m in found] == [("model.layers.1.mlp.smear", "Conv1d")]
    assert "kernel_size=3" in found[0].why


# ------------------------------------------------------------------------------------------ two ranks


def _loss_on_two_ranks(rank: int, world: int) -> dict[str, str]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, 16), generator=g)
    out = {}
    with hf_ringcp.context_parallel(None, layout="zigzag"):
        batch = hf_ringcp.shard_batch({"input_ids": ids, "labels": ids.clone()}, layout="zigzag")
        for name, (config, _) in MIXERS.items():
            try:
                hf_ringcp.causal_lm_loss(_build(config), batch)
                out[name] = "trained"
            except ValueError as err:
                out[name] = str(err)
        loss = hf_ringcp.causal_lm_loss(_build(ATTENTION_ONLY["llama"]), batch)
        out["llama"] = "trained" if torch.isfinite(loss) else "nan"
        # BLOOM accepts attn_implementation="ring" but computes its attention itself (no AttentionInterface).
        try:
            hf_ringcp.causal_lm_loss(_build(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)), batch)
            out["bloom"] = "trained"
        except ValueError as err:
            out["bloom"] = str(err)
    return out


def test_causal_lm_loss_refuses_token_mixers_before_the_forward() -> None:
    per_rank = run_ranks(_loss_on_two_ranks, 2, timeout=180)
    assert per_rank[0] == per_rank[1]  # both ranks refuse alike: no rank waits in a collective
    for name, (_, expected) in MIXERS.items():
        _names_every_mixer(per_rank[0][name], expected)
    assert per_rank[0]["llama"] == "trained"
    assert per_rank[0]["bloom"].startswith('attn_implementation="ring" was never called in a forward of BloomModel')
