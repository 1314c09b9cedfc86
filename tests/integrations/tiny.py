"""Tiny random causal LMs and fixed token data for the plugin and Trainer tests (nothing downloaded)."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_ringcp  # noqa: F401  (registers "ring")

CONFIG = LlamaConfig(
    vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, use_cache=False,
)


def tiny_lora_llama(attn: str, seed: int = 0, vocab_size: int | None = None) -> torch.nn.Module:
    """A 2-layer Llama with LoRA on all linear layers; identical weights for every ``attn`` and rank."""
    config = copy.deepcopy(CONFIG)
    config.vocab_size = vocab_size or config.vocab_size
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, lora)


def token_samples(n: int, seq_len: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` samples with ``input_ids``/``labels`` (some labels -100, unevenly per sample) and an ``idx``."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        ids = torch.randint(0, CONFIG.vocab_size, (seq_len,), generator=g)
        labels = ids.clone()
        labels[torch.rand(seq_len, generator=g) < 0.1 * (i % 4)] = -100
        samples.append({"input_ids": ids, "labels": labels, "idx": torch.tensor(i)})
    return samples


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
