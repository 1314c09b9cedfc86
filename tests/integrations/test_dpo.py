"""TRL's DPOTrainer + RingCPCallback on gloo ranks equals the same DPOTrainer in one process (loss, rewards,
accuracies, margins, log-probs per step, training and evaluation), with LoRA (the adapter-disabled reference) and with
a separate reference model; gradient accumulation 2."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed import run_ranks

trl = pytest.importorskip("trl")

METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy", "num_tokens")
WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang".split()


def _dataset(n: int, seed: int):
    import datasets

    g = torch.Generator().manual_seed(seed)

    def text(lo: int, hi: int) -> str:
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g))

    return datasets.Dataset.from_list([{"prompt": text(2, 7), "chosen": text(1, 6), "rejected": text(1, 6)}
                                       for _ in range(n)])


def _dpo(attn: str, output_dir: str, setup: str, callbacks: list) -> list[dict]:
    from peft import LoraConfig
    from transformers import LlamaForCausalLM
    from trl import DPOConfig, DPOTrainer

    import hf_ringcp  # noqa: F401  (registers "ring")
    from recipes.data import build_tiny_tokenizer
    from tests.integrations.tiny import CONFIG

    tokenizer = build_tiny_tokenizer()
    config = copy.deepcopy(CONFIG)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)
    ref_model, lora = None, None
    if setup in ("lora", "padding_free"):
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    else:
        ref_model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn, dtype=torch.float32)
        torch.manual_seed(1)
        for p in ref_model.parameters():  # a reference that differs from the policy
            p.data.add_(0.02 * torch.randn_like(p))
    args = DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-2, logging_steps=1, eval_strategy="steps",
        eval_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=3, beta=0.5,
        dataloader_num_workers=0, bf16=False, max_length=64, padding_free=setup == "padding_free",
        precompute_ref_log_probs=setup == "precompute",
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=_dataset(8, 1),
                         eval_dataset=_dataset(3, 2), processing_class=tokenizer, peft_config=lora,
                         callbacks=callbacks)
    trainer.train()
    return trainer.state.log_history


def _ring(rank: int, world: int, output_dir: str, setups: tuple[str, ...]) -> dict[str, list[dict]]:
    from hf_ringcp import RingCPCallback

    return {s: _dpo("ring", f"{output_dir}/{s}", s, [RingCPCallback(cp_size=world)]) for s in setups}


def _precompute_refused(rank: int, world: int, output_dir: str) -> str:
    from hf_ringcp import RingCPCallback

    try:
        _dpo("ring", output_dir, "precompute", [RingCPCallback(cp_size=world)])
    except ValueError as err:
        return str(err)
    return "not refused"


def _values(history: list[dict], prefix: str) -> dict[str, list[float]]:
    return {k: [h[k] for h in history if k in h] for k in (f"{prefix}{m}" for m in METRICS)}


@pytest.mark.parametrize(("world", "setups"), [(2, ("lora", "ref_model", "padding_free")), (3, ("lora",))])
def test_dpo_trainer_under_context_parallelism_matches_one_process(world: int, setups, tmp_path) -> None:
    per_rank = run_ranks(_ring, world, str(tmp_path / "ring"), setups, timeout=600)
    for setup in setups:
        ref = _dpo("sdpa", str(tmp_path / "ref" / setup), setup, [])
        for prefix in ("", "eval_"):
            expected = _values(ref, prefix)
            assert expected[f"{prefix}loss"], f"{setup}: no {prefix}loss logged"
            for rank, results in enumerate(per_rank):
                got = _values(results[setup], prefix)
                for key, want in expected.items():
                    assert got[key] == pytest.approx(want, rel=1e-4, abs=1e-6), (setup, rank, key)


def test_dpo_precomputed_reference_is_refused_with_the_fix(tmp_path) -> None:
    messages = run_ranks(_precompute_refused, 2, str(tmp_path))
    assert all("precompute_ref_log_probs=False" in m for m in messages), messages
