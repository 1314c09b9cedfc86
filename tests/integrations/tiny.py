"""Tiny random causal LMs, fixed token data and a short Trainer run for the plugin and Trainer tests (nothing
downloaded)."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import hf_ringcp  # noqa: F401  (registers "ring")

#: The shape of the tests' tiny Llamas: two layers, grouped-query attention (4 query heads, 2 KV heads).
LLAMA_SHAPE: dict[str, Any] = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
#: The Trainer and plugin tests' model (untied head, no KV cache).
CONFIG = LlamaConfig(**{**LLAMA_SHAPE, "hidden_size": 32, "intermediate_size": 64}, vocab_size=96,
                     tie_word_embeddings=False, use_cache=False)


def tiny_lora_llama(attn: str, seed: int = 0, vocab_size: int | None = None) -> torch.nn.Module:
    """A 2-layer Llama with LoRA on all linear layers; identical weights for every ``attn`` and rank."""
    from peft import LoraConfig, get_peft_model  # (here: importing peft costs the spawned ranks seconds)

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


#: The sequence length of :func:`samples`.
SEQ = 16


def samples(n: int, seed: int, seq: int = SEQ) -> list[dict[str, torch.Tensor]]:
    """``n`` Trainer samples (``input_ids``/``labels`` ``[seq]``) of :func:`token_samples`."""
    return [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in token_samples(n, seq, seed)]


def trainer_args(output_dir: str, **overrides: Any) -> TrainingArguments:
    """Arguments of a short, deterministic CPU run: 3 steps of batch 1 with 2 accumulated, every step logged."""
    base = dict(
        output_dir=output_dir, per_device_train_batch_size=1, per_device_eval_batch_size=1, max_steps=3,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, use_cpu=True, report_to=[],
        save_strategy="no", seed=7, disable_tqdm=True, dataloader_num_workers=0,
    )
    return TrainingArguments(**{**base, **overrides})


def train_tiny(model: torch.nn.Module, output_dir: str, callbacks: Sequence[TrainerCallback] = (), *, n_train: int,
               n_eval: int = 0, resume: str | None = None, **overrides: Any) -> Trainer:
    """A ``Trainer`` over ``model`` (``n_train`` samples of seed 1, ``n_eval`` of seed 2), trained; ``overrides``
    go to :func:`trainer_args`."""
    trainer = Trainer(model=model, args=trainer_args(output_dir, **overrides), train_dataset=samples(n_train, seed=1),
                      eval_dataset=samples(n_eval, seed=2) if n_eval else None, callbacks=list(callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logged_losses(trainer: Trainer) -> list[float]:
    """The training losses the Trainer logged, step by step."""
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
