"""transformers.Trainer + RingCPCallback on 4 gloo ranks logs the single-process Trainer's losses."""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_ringcp.integrations.trainer_callback import RingCPCallback
from tests.distributed import run_ranks
from tests.integrations.tiny import tiny_lora_llama, token_samples

SEQ = 16


def _samples(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in token_samples(n, SEQ, seed)]


def _args(output_dir: str, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=output_dir, per_device_train_batch_size=1, per_device_eval_batch_size=1, max_steps=3,
        gradient_accumulation_steps=2, learning_rate=1e-2, logging_steps=1, use_cpu=True, report_to=[],
        save_strategy="no", seed=7, disable_tqdm=True, dataloader_num_workers=0,
    )
    return TrainingArguments(**{**base, **overrides})


def _train(attn: str, output_dir: str, callbacks: list, batch_size: int) -> tuple[list[dict], dict]:
    model = tiny_lora_llama(attn)
    trainer = Trainer(
        model=model, args=_args(output_dir, per_device_train_batch_size=batch_size),
        train_dataset=_samples(12, seed=1), eval_dataset=_samples(4, seed=2), callbacks=callbacks,
    )
    trainer.train()
    metrics = trainer.evaluate()
    return trainer.state.log_history, metrics


def _ring_trainer(rank: int, world: int, cp: int, output_dir: str) -> tuple[list[dict], dict]:
    history, metrics = _train("ring", output_dir, [RingCPCallback(cp_size=cp)], batch_size=1)
    if rank == 0:
        with open(os.path.join(output_dir, "trainer_state_check.json"), "w") as f:
            json.dump(history, f)
    return history, metrics


@pytest.mark.parametrize("cp", [4, 2])
def test_trainer_losses_match_single_process(cp: int, tmp_path) -> None:
    world = 4
    per_rank = run_ranks(_ring_trainer, world, cp, str(tmp_path / "ring"))
    ref_history, ref_metrics = _train("sdpa", str(tmp_path / "ref"), [], batch_size=world // cp)
    ref_losses = [h["loss"] for h in ref_history if "loss" in h]
    assert len(ref_losses) == 3
    for rank, (history, metrics) in enumerate(per_rank):
        logs = [h for h in history if "loss" in h]
        assert [h["loss"] for h in logs] == pytest.approx(ref_losses, rel=1e-5), f"rank {rank}"
        assert metrics["eval_loss"] == pytest.approx(ref_metrics["eval_loss"], rel=1e-5), f"rank {rank}"
        assert all(h["cp_size"] == cp and h["tokens_per_second"] > 0 and h["peak_memory_gib"] > 0 for h in logs)


def _trainer_with_sdpa_model(rank: int, world: int) -> str:
    with tempfile.TemporaryDirectory() as d, pytest.raises(ValueError, match="attn_implementation='ring'") as info:
        Trainer(model=tiny_lora_llama("sdpa"), args=_args(d), train_dataset=_samples(2, 0),
                callbacks=[RingCPCallback(cp_size=2)])
    return str(info.value)


def test_callback_refuses_a_model_without_ring_attention() -> None:
    run_ranks(_trainer_with_sdpa_model, 2)
