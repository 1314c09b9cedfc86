"""transformers.Trainer + RingCPCallback on 4 gloo ranks logs the single-process Trainer's losses."""

from __future__ import annotations

import json
import os
import re
import tempfile
from typing import Any

import pytest
import torch
from transformers import Trainer

from hf_ringcp.integrations.trainer_callback import RingCPCallback
from tests.distributed import run_ranks
from tests.integrations.tiny import samples, tiny_lora_llama, train_tiny, trainer_args


def _train(attn: str, output_dir: str, callbacks: list, batch_size: int) -> tuple[list[dict], dict]:
    trainer = train_tiny(tiny_lora_llama(attn), output_dir, callbacks, n_train=12, n_eval=4,
                         per_device_train_batch_size=batch_size)
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
        Trainer(model=tiny_lora_llama("sdpa"), args=trainer_args(d), train_dataset=samples(2, 0),
                callbacks=[RingCPCallback(cp_size=2)])
    return str(info.value)


def test_callback_refuses_a_model_without_ring_attention() -> None:
    run_ranks(_trainer_with_sdpa_model, 2)


# --------------------------------------------------------------------------------- real batches and metrics


def _documents(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Variable-length samples (3 to 21 tokens), token ids 2..95 (0 and 1 are the tokenizer's specials)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 22, (n,), generator=g).tolist()
    return [{"input_ids": torch.randint(2, 96, (m,), generator=g).tolist()} for m in lengths]


def _collators() -> dict[str, Any]:
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithFlattening

    from recipes.data import build_tiny_tokenizer

    return {
        "flattening": DataCollatorWithFlattening(return_tensors="pt"),
        "padding": DataCollatorForLanguageModeling(build_tiny_tokenizer(), mlm=False),
    }


def _metrics(eval_pred) -> dict[str, float]:
    """Token accuracy and a logits checksum from the full predictions (compute_metrics sees numpy arrays)."""
    logits, labels = eval_pred.predictions, eval_pred.label_ids
    targets = labels[:, 1:]
    hits = (logits[:, :-1].argmax(-1) == targets) & (targets != -100)
    real = labels != -100  # padding: the padded model's logits there are meaningless, ours are zeros
    return {"accuracy": float(hits.sum() / (targets != -100).sum()), "checksum": float(abs(logits[real]).sum()),
            "n": float(logits.shape[0])}


def _train_real(attn: str, output_dir: str, callbacks: list, collator: str) -> dict[str, Any]:
    model = tiny_lora_llama(attn)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    padded = collator == "padding"
    args = trainer_args(output_dir, per_device_train_batch_size=3, per_device_eval_batch_size=2,
                        gradient_accumulation_steps=2, max_steps=3, eval_strategy="steps" if padded else "no",
                        eval_steps=2, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=_documents(18, seed=3), eval_dataset=_documents(5, seed=4),
                      data_collator=_collators()[collator], callbacks=callbacks,
                      compute_metrics=_metrics if padded else None)
    trainer.train()
    out = {"history": trainer.state.log_history, "eval": trainer.evaluate()}
    if padded:
        prediction = trainer.predict(_documents(3, seed=5))
        out["predictions"] = torch.as_tensor(prediction.predictions)
        out["real"] = torch.as_tensor(prediction.label_ids) != -100
    return out


def _ring_real(rank: int, world: int, output_dir: str) -> dict[str, dict]:
    return {c: _train_real("ring", f"{output_dir}/{c}", [RingCPCallback(cp_size=world)], c)
            for c in ("flattening", "padding")}


def test_trainer_with_packing_and_padding_collators_matches_single_process(tmp_path) -> None:
    """DataCollatorWithFlattening (packed documents) and DataCollatorForLanguageModeling (padding, eval batch size
    2 != train batch size 3, evaluation between steps, compute_metrics and predict with logits) on 2 gloo ranks with
    LoRA and gradient checkpointing equal the single-process Trainer."""
    per_rank = run_ranks(_ring_real, 2, str(tmp_path / "ring"))
    for collator in ("flattening", "padding"):
        ref = _train_real("sdpa", str(tmp_path / "ref" / collator), [], collator)
        ref_losses = [h["loss"] for h in ref["history"] if "loss" in h]
        ref_evals = [h["eval_loss"] for h in ref["history"] if "eval_loss" in h]
        assert len(ref_losses) == 3
        for rank, results in enumerate(per_rank):
            got = results[collator]
            assert [h["loss"] for h in got["history"] if "loss" in h] == pytest.approx(ref_losses, rel=1e-5), rank
            assert [h["eval_loss"] for h in got["history"] if "eval_loss" in h] == pytest.approx(ref_evals, rel=1e-5)
            assert got["eval"]["eval_loss"] == pytest.approx(ref["eval"]["eval_loss"], rel=1e-5)
            if collator == "padding":
                for key in ("eval_accuracy", "eval_checksum", "eval_n"):
                    assert got["eval"][key] == pytest.approx(ref["eval"][key], rel=1e-5), (rank, key)
                real = ref["real"]
                assert got["predictions"].shape == ref["predictions"].shape and torch.equal(got["real"], real)
                torch.testing.assert_close(got["predictions"][real], ref["predictions"][real], rtol=1e-5, atol=1e-5)
                rest = got["predictions"][~real]  # our zeros at the batch's padding, the Trainer's -100 across batches
                assert ((rest == 0) | (rest == -100)).all()


def _misuse(rank: int, world: int, output_dir: str) -> dict[str, str]:
    from accelerate import Accelerator

    from hf_ringcp import ContextParallelPlugin

    messages = {}
    trainer = Trainer(model=tiny_lora_llama("ring"), args=trainer_args(output_dir), train_dataset=samples(4, 0))
    trainer.add_callback(RingCPCallback(cp_size=2))
    with pytest.raises(RuntimeError, match=r"passed to the Trainer at construction") as info:
        trainer.train()
    messages["add_callback"] = str(info.value)

    unlabelled = [{"input_ids": s["input_ids"]} for s in samples(4, 0)]
    trainer = Trainer(model=tiny_lora_llama("ring"), args=trainer_args(output_dir), train_dataset=unlabelled,
                      callbacks=[RingCPCallback(cp_size=2)])
    with pytest.raises(ValueError, match=r"no `labels`.*DataCollatorForLanguageModeling") as info:
        trainer.train()
    messages["labels"] = str(info.value)

    with pytest.raises(ValueError, match=r"Accelerate sees 1 process.*use_cpu=True") as info:
        Trainer(model=tiny_lora_llama("ring"), args=trainer_args(output_dir, use_cpu=False),
                train_dataset=samples(4, 0), callbacks=[RingCPCallback(cp_size=2)])
    messages["use_cpu"] = str(info.value)
    with pytest.raises(ValueError, match=r"Accelerator\(cpu=True\)"):
        ContextParallelPlugin(cp_size=2).prepare(Accelerator(), tiny_lora_llama("ring"))
    return messages


def test_misuse_fails_before_the_first_step_naming_the_fix(tmp_path) -> None:
    run_ranks(_misuse, 2, str(tmp_path))


def test_transformers_version_check_is_honest(monkeypatch) -> None:
    import warnings

    import transformers
    from packaging.version import Version

    from hf_ringcp.constraints import pins
    from hf_ringcp.integrations.trainer_callback import TESTED_TRANSFORMERS, check_trainer_api

    trainer = Trainer(model=tiny_lora_llama("sdpa"), args=trainer_args(tempfile.mkdtemp()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_trainer_api(trainer)  # the installed release is one the callback claims (and CI tests)
    low, high = (Version(v).release[:2] for v in TESTED_TRANSFORMERS)
    assert low <= Version(transformers.__version__).release[:2] <= high
    # The claim is the constraint files' (one owner), not a second list beside them.
    assert TESTED_TRANSFORMERS == (pins("oldest")["transformers"], pins("locked")["transformers"])
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    expected = re.escape(f"tested with transformers {'-'.join(TESTED_TRANSFORMERS)}; 5.99.0 is installed")
    with pytest.warns(UserWarning, match=expected):
        check_trainer_api(trainer)
