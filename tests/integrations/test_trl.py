"""TRL's SFTTrainer + RingCPCallback on 2 gloo ranks equals the same SFTTrainer in one process.

Packing (BFD, padding-free rows), padding-free without packing, padded batches, completion-only loss, gradient
accumulation and evaluation; the losses, the eval loss and TRL's metrics (entropy, mean token accuracy, number of
tokens) step by step.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed import run_ranks

trl = pytest.importorskip("trl")

CONFIGS = {
    "packing": dict(packing=True),
    "padding_free": dict(padding_free=True, max_length=None),  # (TRL enforces no max_length without packing)
    "padded": dict(),
    "completion_only": dict(completion_only_loss=True),
}
METRICS = ("loss", "entropy", "mean_token_accuracy", "num_tokens")


def _dataset(n: int, seed: int, prompt_completion: bool):
    import datasets

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt = torch.randint(2, 96, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
        completion = torch.randint(2, 96, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append({"prompt": prompt, "completion": completion} if prompt_completion else
                    {"input_ids": prompt + completion})
    if prompt_completion:  # pre-tokenized prompt/completion pairs: input_ids plus the completion mask
        rows = [{"input_ids": r["prompt"] + r["completion"],
                 "completion_mask": [0] * len(r["prompt"]) + [1] * len(r["completion"])} for r in rows]
    return datasets.Dataset.from_list(rows)


def _sft(attn: str, output_dir: str, config: str, callbacks: list) -> list[dict]:
    from peft import LoraConfig
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    import hf_ringcp  # noqa: F401  (registers "ring")
    from recipes.data import build_tiny_tokenizer
    from tests.integrations.tiny import CONFIG

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(copy.deepcopy(CONFIG), attn_implementation=attn, dtype=torch.float32)
    args = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=3, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
        eval_strategy="steps", eval_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, seed=3,
        dataloader_num_workers=0, bf16=False, **{"max_length": 32, **CONFIGS[config]},  # (TRL turns bf16 on)
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    prompt_completion = config == "completion_only"
    trainer = SFTTrainer(model=model, args=args, train_dataset=_dataset(18, 1, prompt_completion),
                         eval_dataset=_dataset(5, 2, prompt_completion), processing_class=build_tiny_tokenizer(),
                         peft_config=lora, callbacks=callbacks)
    trainer.train()
    return trainer.state.log_history


def _ring(rank: int, world: int, output_dir: str) -> dict[str, list[dict]]:
    from hf_ringcp import RingCPCallback

    return {c: _sft("ring", f"{output_dir}/{c}", c, [RingCPCallback(cp_size=world)]) for c in CONFIGS}


def _values(history: list[dict], prefix: str) -> dict[str, list[float]]:
    keys = [f"{prefix}{m}" for m in METRICS]
    return {k: [h[k] for h in history if k in h] for k in keys}


def test_sft_trainer_under_context_parallelism_matches_one_process(tmp_path) -> None:
    per_rank = run_ranks(_ring, 2, str(tmp_path / "ring"), timeout=600)
    for config in CONFIGS:
        ref = _sft("sdpa", str(tmp_path / "ref" / config), config, [])
        for prefix in ("", "eval_"):
            expected = _values(ref, prefix)
            assert expected[f"{prefix}loss"], f"{config}: no {prefix}loss logged"
            for rank, results in enumerate(per_rank):
                got = _values(results[config], prefix)
                for key, want in expected.items():
                    assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-6), (config, rank, key)
