"""Trainer features that used to run silently wrong under RingCPCallback, each against the same run in one process.

2 gloo ranks (``cp_size=2``) against one process without the library, comparing the logged losses, grad norms and
the trained weights: ``evaluate()`` before ``train()``, ``label_smoothing_factor``, ``include_num_input_tokens_seen``
and NEFTune's noise amplitude.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainingArguments

from tests.distributed import run_ranks
from tests.integrations.tiny import lora_state, tiny_lora_llama, token_samples

SEQ = 16


def _samples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in token_samples(n, SEQ, seed)]


def _args(output_dir: str, **overrides: Any) -> TrainingArguments:
    base = dict(
        output_dir=output_dir, per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=3,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, use_cpu=True, report_to=[],
        save_strategy="no", seed=7, disable_tqdm=True, dataloader_num_workers=0,
    )
    return TrainingArguments(**{**base, **overrides})


def _callbacks(attn: str) -> list:
    from hf_ringcp import RingCPCallback

    return [RingCPCallback(cp_size=2)] if attn == "ring" else []


def _trainer_run(attn: str, output_dir: str, evaluate_first: bool = False, **overrides: Any) -> dict[str, Any]:
    """Train 3 steps (optionally after an ``evaluate()``) and return the logs, the eval loss and the LoRA weights."""
    trainer = Trainer(model=tiny_lora_llama(attn), args=_args(output_dir, **overrides),
                      train_dataset=_samples(12, seed=1), eval_dataset=_samples(4, seed=2), callbacks=_callbacks(attn))
    first_eval = trainer.evaluate()["eval_loss"] if evaluate_first else None
    trainer.train()
    return {"logs": [h for h in trainer.state.log_history if "loss" in h], "first_eval": first_eval,
            "eval": trainer.evaluate()["eval_loss"], "weights": lora_state(trainer.model)}


def _assert_same_run(got: dict[str, Any], ref: dict[str, Any], keys: tuple[str, ...] = ("loss", "grad_norm"),
                     rel: float = 1e-5) -> None:
    assert len(ref["logs"]) == 3
    for key in keys:
        assert [h[key] for h in got["logs"]] == pytest.approx([h[key] for h in ref["logs"]], rel=rel), key
    assert got["eval"] == pytest.approx(ref["eval"], rel=rel)
    assert got["weights"].keys() == ref["weights"].keys()
    for name, want in ref["weights"].items():
        torch.testing.assert_close(got["weights"][name], want, rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------- evaluate() before train()


def _sft_run(attn: str, output_dir: str, evaluate_first: bool) -> dict[str, Any]:
    import datasets
    from peft import LoraConfig
    from transformers import LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    from recipes.data import build_tiny_tokenizer
    from tests.integrations.tiny import CONFIG

    def rows(n: int, seed: int) -> datasets.Dataset:
        g = torch.Generator().manual_seed(seed)
        return datasets.Dataset.from_list([
            {"input_ids": torch.randint(2, 96, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()}
            for _ in range(n)])

    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(copy.deepcopy(CONFIG), attn_implementation=attn, dtype=torch.float32)
    args = SFTConfig(
        output_dir=output_dir, per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=3,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, disable_tqdm=True, seed=3, dataloader_num_workers=0, max_length=32, packing=True,
        bf16=False,  # TRL turns bf16 autocast on, on CPU too: pin the precision for an exact comparison
    )
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows(16, 1), eval_dataset=rows(4, 2),
                         processing_class=build_tiny_tokenizer(), peft_config=lora, callbacks=_callbacks(attn))
    first_eval = trainer.evaluate()["eval_loss"] if evaluate_first else None
    trainer.train()
    return {"logs": [h for h in trainer.state.log_history if "loss" in h], "first_eval": first_eval,
            "eval": trainer.evaluate()["eval_loss"], "weights": lora_state(trainer.model)}


def _evaluate_first(rank: int, world: int, output_dir: str) -> dict[str, dict[str, Any]]:
    return {"trainer": _trainer_run("ring", f"{output_dir}/trainer", evaluate_first=True),
            "sft": _sft_run("ring", f"{output_dir}/sft", evaluate_first=True)}


def test_evaluate_before_train_trains_synchronised_gradients(tmp_path) -> None:
    """``trainer.evaluate()`` before ``trainer.train()`` (plain Trainer and SFTTrainer): the CP ranks step on the
    gradients of the whole sequence, as one process does (a model left without its data-parallel wrapper would train
    each rank on its own shard's gradient: grad norms and weights differ per rank)."""
    pytest.importorskip("trl")
    per_rank = run_ranks(_evaluate_first, 2, str(tmp_path / "ring"))
    refs = {"trainer": _trainer_run("sdpa", str(tmp_path / "ref"), evaluate_first=True),
            "sft": _sft_run("sdpa", str(tmp_path / "ref_sft"), evaluate_first=True)}
    for kind, ref in refs.items():
        for rank, results in enumerate(per_rank):
            got = results[kind]
            assert got["first_eval"] == pytest.approx(ref["first_eval"], rel=1e-5), (kind, rank)
            _assert_same_run(got, ref)
