"""LoRA fine-tuning of a causal LM on long sequences under context parallelism (ring attention).

    accelerate launch --config_file recipes/accelerate/<name>.yaml recipes/train_lora.py \\
        --config recipes/<recipe>.yaml [--key value ...]

Uses ``transformers.Trainer`` with :class:`hf_ringcp.RingCPCallback`, ``peft`` LoRA and ``datasets``. Prints the
passkey accuracy before and after training (real generation under context parallelism, ``hf_ringcp.generate``:
the prompt sharded, the KV cache split over the ranks), the loss
curve, tokens/s and peak memory; writes the Trainer's outputs (``trainer_state.json``, checkpoints with the
adapter) and ``results.json`` to ``output_dir``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from recipes.config import RecipeConfig, load_recipe, parse_overrides


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _print(*args: Any) -> None:
    if _is_main():
        print(*args, flush=True)


# ------------------------------------------------------------------------------------------------- model

def load_model_and_tokenizer(cfg: RecipeConfig):
    """The ``"ring"`` model (with LoRA) and its tokenizer, as the recipe asks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, set_seed

    import hf_ringcp  # noqa: F401  (registers attn_implementation="ring")

    # Before anything random is built: LoRA's A matrices (and random-init weights) come from the seed alone, so
    # every launch and rank starts from the same adapters and a cp_size=1 run compares with a cp_size=2 one.
    # (The Trainer seeds only once the model exists.)
    set_seed(cfg.seed)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model_name_or_path == "embedded":
        from recipes.embedded import load_embedded_model

        model, tokenizer = load_embedded_model(attn_implementation="ring", dtype=dtype)
        for key, value in cfg.config_overrides.items():
            setattr(model.config, key, value)
    elif cfg.model_name_or_path == "tiny-random":
        from recipes.data import build_tiny_tokenizer

        tokenizer = build_tiny_tokenizer()
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(4096, cfg.seq_len),
            tie_word_embeddings=False, **cfg.config_overrides,
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation="ring", dtype=dtype)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_name_or_path)
        config = AutoConfig.from_pretrained(cfg.model_name_or_path)
        for key, value in cfg.config_overrides.items():
            setattr(config, key, copy.deepcopy(value))
        if cfg.random_init:
            # Built straight on this rank's GPU: 8 processes each materialising an 8B model in host memory
            # first would need ~128 GB of RAM and minutes.
            device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, attn_implementation="ring", dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.model_name_or_path, config=config, attn_implementation="ring", dtype=dtype
            )
    model.config.use_cache = False
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM",
        modules_to_save=["embed_tokens", "norm"] if cfg.train_embeddings_and_norms else None,
    )
    # peft would cast the adapters to float32 ("autocast"); lora_dtype: bfloat16 keeps them in half precision.
    peft_model = get_peft_model(model, lora, autocast_adapter_dtype=cfg.lora_dtype == "float32")
    if cfg.lora_dtype != "float32":
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(getattr(torch, cfg.lora_dtype))
    if cfg.liger_kernels is not False:
        from hf_ringcp.integrations.kernels import apply_liger_kernels

        applied = apply_liger_kernels(peft_model, when="always" if cfg.liger_kernels is True else "available")
        if applied:
            _print(f"liger-kernel: fused {', '.join(applied)}")
    return peft_model, tokenizer


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """LoRA training FLOPs per token (see hf_ringcp.integrations.metrics.lora_train_flops_per_token)."""
    from hf_ringcp.integrations.metrics import lora_train_flops_per_token

    config = model.get_base_model().config
    n_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return lora_train_flops_per_token(n_params, config.num_hidden_layers, config.hidden_size, seq_len)


# -------------------------------------------------------------------------------------------------- data


def build_datasets(cfg: RecipeConfig, tokenizer):
    from recipes.data import build_dataset

    train = build_dataset(cfg.dataset, tokenizer, cfg.seq_len, text_column=cfg.text_column, seed=cfg.seed,
                          num_samples=cfg.num_train_samples)
    held_out = cfg.eval_dataset if cfg.eval_dataset is not None else "passkey"
    evaluation = build_dataset(held_out, tokenizer, cfg.seq_len, text_column=cfg.text_column, seed=cfg.seed + 1,
                               num_samples=cfg.num_eval_samples, split="train")
    if cfg.num_eval_samples and len(evaluation) > cfg.num_eval_samples:
        evaluation = evaluation.select(range(cfg.num_eval_samples))
    keep = ["input_ids", "labels"]
    return train.select_columns(keep), evaluation.select_columns(keep)


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def passkey_accuracy(model, tokenizer, cfg: RecipeConfig, plugin) -> dict[str, float]:
    """Passkey accuracy per (length, depth) by real greedy generation under context parallelism.

    Every rank of a CP group runs :func:`hf_ringcp.generate` on the same prompt: the prompt goes through the ring
    sharded and the decode steps read a KV cache split over the group, so no rank holds the whole sequence's
    activations or cache. A sample counts as retrieved when the first number generated is the key.
    """
    import hf_ringcp
    from recipes.passkey import generate_passkey_samples, score_passkey

    model.eval()
    cells: dict[str, list[float]] = {}
    samples = generate_passkey_samples(
        tokenizer, cfg.passkey_eval_samples * len(cfg.passkey_eval_lengths) * len(cfg.passkey_eval_depths),
        cfg.passkey_eval_lengths, cfg.passkey_eval_depths, seed=cfg.seed + 12345,
    )
    device = next(model.parameters()).device
    for sample in samples:
        prompt = torch.tensor([sample.prompt_ids], device=device)
        out = hf_ringcp.generate(model, prompt, group=plugin.cp_group, layout=cfg.layout, comm=cfg.comm,
                                 max_new_tokens=len(sample.answer_ids) + 1, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        retrieved = score_passkey(out[0, prompt.shape[1]:], sample.key, tokenizer)
        cell = f"len={sample.seq_len} depth={sample.depth:g}"
        cells.setdefault(cell, []).append(float(retrieved))
    model.train()
    return {cell: sum(v) / len(v) for cell, v in cells.items()}


def _print_passkey_table(before: dict[str, float], after: dict[str, float]) -> None:
    _print(f"{'passkey cell':<24} {'before':>7} {'after':>7}")
    for cell in before:
        _print(f"{cell:<24} {before[cell]:>7.2f} {after.get(cell, float('nan')):>7.2f}")
    _print(f"{'mean':<24} {_mean(before.values()):>7.2f} {_mean(after.values()):>7.2f}")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------------- run


def training_arguments(cfg: RecipeConfig):
    """``TrainingArguments`` (TRL's ``SFTConfig`` for ``trainer: trl``, ``DPOConfig`` for ``trainer: dpo``)."""
    from transformers import TrainingArguments

    kind = TrainingArguments
    extra: dict[str, Any] = {}
    if cfg.trainer == "trl":
        from trl import SFTConfig

        kind = SFTConfig
        extra = dict(packing=cfg.packing, max_length=cfg.seq_len, bf16=cfg.dtype == "bfloat16")
    elif cfg.trainer == "dpo":
        from trl import DPOConfig

        # TRL's configs default to bf16=True (on CPU too): the recipe's dtype decides. The reference log-probs are
        # scored at every step (sharded like the policy's), not precomputed.
        kind = DPOConfig
        extra = dict(max_length=cfg.seq_len, beta=cfg.beta, bf16=cfg.dtype == "bfloat16",
                     precompute_ref_log_probs=False)
    if cfg.fsdp:  # FSDP2 over all dp x cp ranks; the ring runs inside each CP group as before
        extra.update(fsdp="full_shard", fsdp_config={"fsdp_version": 2})
    return kind(
        **extra, output_dir=cfg.output_dir, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        max_steps=cfg.max_steps, per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=1, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        logging_steps=cfg.logging_steps, save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        seed=cfg.seed, data_seed=cfg.seed, gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False}, remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(), report_to=[], dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )


def build_trl_datasets(cfg: RecipeConfig):
    """``trainer: trl`` / ``dpo``: the jsonl rows as TRL reads them (``messages``, ``prompt``/``completion`` or
    ``text`` for SFT; ``prompt``/``chosen``/``rejected``, conversational or plain, for DPO)."""
    from recipes.data import load_text_source

    train = load_text_source(cfg.dataset)
    if cfg.eval_dataset is not None:
        evaluation = load_text_source(cfg.eval_dataset)
    else:  # the last rows of the training file, held out
        n = min(max(cfg.num_eval_samples, 1), max(len(train) - 1, 1))
        train, evaluation = train.select(range(len(train) - n)), train.select(range(len(train) - n, len(train)))
    return train, evaluation


def run(cfg: RecipeConfig) -> dict[str, Any]:
    """Train, evaluate and save; returns (and writes to ``output_dir/results.json``) the summary."""
    from transformers import Trainer

    from hf_ringcp.integrations.plugin import ContextParallelPlugin
    from hf_ringcp.integrations.trainer_callback import RingCPCallback

    cfg.check_world(_world_size())
    args = training_arguments(cfg)  # initialises torch.distributed under accelerate launch / torchrun
    model, tokenizer = load_model_and_tokenizer(cfg)
    trainer_class = Trainer
    if cfg.trainer in ("trl", "dpo"):
        import trl  # RingCPCallback specialises SFTTrainer and DPOTrainer at class level

        trainer_class = trl.SFTTrainer if cfg.trainer == "trl" else trl.DPOTrainer
        train_data, eval_data = build_trl_datasets(cfg)
    else:
        train_data, eval_data = build_datasets(cfg, tokenizer)
    plugin = ContextParallelPlugin(
        cp_size=cfg.cp_size, layout=cfg.layout, comm=cfg.comm, ulysses_size=cfg.ulysses_size, backend=cfg.backend,
        loss_chunk_size=cfg.loss_chunk_size, offload_activations=cfg.offload_activations,
        mlp_tile_tokens=cfg.mlp_tile_tokens,
    )
    peak = cfg.device_peak_tflops * 1e12 if cfg.device_peak_tflops else None
    callback = RingCPCallback(plugin, model_flops_per_token=flops_per_token(model, cfg.seq_len),
                              peak_flops_per_device=peak)
    trainer = trainer_class(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                            processing_class=tokenizer, callbacks=[callback])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    _print(f"model {cfg.model_name_or_path}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
           f"{trainable / 1e6:.2f}M trainable (LoRA r={cfg.lora_r}); world {_world_size()} = dp "
           f"{plugin.dp_size} x cp {cfg.cp_size} ({cfg.layout}, {cfg.comm}); {cfg.seq_len} tokens per sample")

    before = {} if cfg.skip_passkey_eval else passkey_accuracy(model, tokenizer, cfg, plugin)
    resume = cfg.resume_from_checkpoint
    trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    metrics = trainer.evaluate()
    after = {} if cfg.skip_passkey_eval else passkey_accuracy(model, tokenizer, cfg, plugin)
    trainer.save_model(cfg.output_dir)

    logs = [h for h in trainer.state.log_history if "loss" in h]
    summary = {
        "losses": [h["loss"] for h in logs],
        "grad_norms": [h.get("grad_norm") for h in logs],
        "eval_loss": metrics["eval_loss"],
        "eval_perplexity": math.exp(min(metrics["eval_loss"], 50.0)),
        "passkey_before": before,
        "passkey_after": after,
        "tokens_per_second": _mean(h["tokens_per_second"] for h in logs[1:] or logs),
        "tokens_per_second_per_device": _mean(h["tokens_per_second_per_device"] for h in logs[1:] or logs),
        "peak_memory_gib": max((h["peak_memory_gib"] for h in logs), default=float("nan")),
        "mfu": _mean(h["mfu"] for h in logs if "mfu" in h) if peak else None,
    }
    if _is_main():
        _print("\nloss curve: " + " ".join(f"{x:.3f}" for x in summary["losses"]))
        _print(f"held-out loss {summary['eval_loss']:.4g} (perplexity {summary['eval_perplexity']:.4g})")
        _print(f"throughput {summary['tokens_per_second']:.1f} tokens/s ({summary['tokens_per_second_per_device']:.1f}"
               f" per device), peak memory {summary['peak_memory_gib']:.2f} GiB per rank")
        if before:
            _print_passkey_table(before, after)
        _print(f"adapter saved to {cfg.output_dir}")
        Path(cfg.output_dir, "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        config_path, argv = argv[i + 1], argv[:i] + argv[i + 2 :]
    cfg = load_recipe(config_path, parse_overrides(argv))  # fails on bad values before any model loads
    run(cfg)


if __name__ == "__main__":
    main()
