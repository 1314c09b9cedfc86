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
import transformers.integrations.neftune
from transformers import Trainer, TrainingArguments

from tests.distributed import run_ranks
from tests.integrations.tiny import lora_state, tiny_lora_llama, token_samples

SEQ = 16


def _samples(n: int, seed: int, seq: int = SEQ) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": s["input_ids"], "labels": s["labels"]} for s in token_samples(n, seq, seed)]


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


def _trainer_run(attn: str, output_dir: str, evaluate_first: bool = False, seq: int = SEQ,
                 **overrides: Any) -> dict[str, Any]:
    """Train 3 steps (optionally after an ``evaluate()``); return the logs, the eval losses (without and with
    logits: ``evaluate`` and ``predict``) and the LoRA weights."""
    trainer = Trainer(model=tiny_lora_llama(attn), args=_args(output_dir, **overrides),
                      train_dataset=_samples(12, 1, seq), eval_dataset=_samples(4, 2, seq), callbacks=_callbacks(attn))
    first_eval = trainer.evaluate()["eval_loss"] if evaluate_first else None
    trainer.train()
    return {"logs": [h for h in trainer.state.log_history if "loss" in h], "first_eval": first_eval,
            "eval": trainer.evaluate()["eval_loss"], "predict": trainer.predict(_samples(3, 5, seq)).metrics,
            "weights": lora_state(trainer.model)}


def _assert_same_run(got: dict[str, Any], ref: dict[str, Any], keys: tuple[str, ...] = ("loss", "grad_norm"),
                     rel: float = 1e-5) -> None:
    assert len(ref["logs"]) == 3
    for key in keys:
        assert [h[key] for h in got["logs"]] == pytest.approx([h[key] for h in ref["logs"]], rel=rel), key
    assert got["eval"] == pytest.approx(ref["eval"], rel=rel)
    if "predict" in ref:
        assert got["predict"]["test_loss"] == pytest.approx(ref["predict"]["test_loss"], rel=rel)
    assert got["weights"].keys() == ref["weights"].keys()
    for name, want in ref["weights"].items():
        error = (got["weights"][name] - want).abs().max().item()
        assert error <= 1e-6 + 1e-4 * want.abs().max().item(), f"{name}: trained weights differ by {error:.2e}"


class _DeterministicNoise:
    """Stands in for ``torch`` inside transformers' NEFTune hook: the noise it adds is ``sin(1000 * e) * bound``,
    ``e`` the clean embedding and ``bound = alpha / sqrt(L * d)`` the hook's amplitude, instead of a random draw:
    within the bound and varied like the real noise, but a function of the token alone (not of the position or the
    generator), so that two runs compare value for value and any error in ``L`` changes the losses and weights."""

    tensor = staticmethod(torch.tensor)
    sqrt = staticmethod(torch.sqrt)

    class _Filled:
        def __init__(self, like: torch.Tensor) -> None:
            self.like = like

        def uniform_(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
            return torch.sin(1000 * self.like.detach()) * high

    @staticmethod
    def zeros_like(like: torch.Tensor) -> _Filled:
        return _DeterministicNoise._Filled(like)


# Every scenario's 2-rank run in one launch (the start of two ranks with transformers costs more than the runs).
SCENARIOS = {
    "evaluate_first": dict(evaluate_first=True),
    "smoothing_and_tokens": dict(label_smoothing_factor=0.1, include_num_input_tokens_seen=True),
    # 18 tokens: the ring pads the batch to 20 (a multiple of 2 * cp_size), the hook must still see L = 18.
    "neftune": dict(neftune_noise_alpha=5.0, seq=18),
}


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


def _ring(rank: int, world: int, output_dir: str) -> dict[str, dict[str, Any]]:
    transformers.integrations.neftune.torch = _DeterministicNoise  # (this process only; NEFTune runs only when set)
    out = {name: _trainer_run("ring", f"{output_dir}/{name}", **kw) for name, kw in SCENARIOS.items()}
    out["sft_evaluate_first"] = _sft_run("ring", f"{output_dir}/sft", evaluate_first=True)
    return out


@pytest.fixture(scope="module")
def ring_runs(tmp_path_factory) -> list[dict[str, dict[str, Any]]]:
    pytest.importorskip("trl")
    return run_ranks(_ring, 2, str(tmp_path_factory.mktemp("ring")))


# ----------------------------------------------------------------------------------- evaluate() before train()


def test_evaluate_before_train_trains_synchronised_gradients(ring_runs, tmp_path) -> None:
    """``trainer.evaluate()`` before ``trainer.train()`` (plain Trainer and SFTTrainer): the CP ranks step on the
    gradients of the whole sequence, as one process does (a model left without its data-parallel wrapper would train
    each rank on its own shard's gradient: grad norms and weights differ per rank)."""
    refs = {"evaluate_first": _trainer_run("sdpa", str(tmp_path / "ref"), **SCENARIOS["evaluate_first"]),
            "sft_evaluate_first": _sft_run("sdpa", str(tmp_path / "ref_sft"), evaluate_first=True)}
    for kind, ref in refs.items():
        for rank, results in enumerate(ring_runs):
            got = results[kind]
            assert got["first_eval"] == pytest.approx(ref["first_eval"], rel=1e-5), (kind, rank)
            _assert_same_run(got, ref)


# ----------------------------------------------------------------------------------- label_smoothing_factor


def test_label_smoothing_equals_the_trainers_label_smoother(ring_runs, tmp_path) -> None:
    """``label_smoothing_factor=0.1`` with gradient accumulation and unevenly ignored labels: the training losses,
    grad norms, trained weights, the eval loss and ``predict``'s loss (the logits path) equal one process's
    ``LabelSmoother``; and they are not the unsmoothed run's (the smoothing is not silently dropped)."""
    ref = _trainer_run("sdpa", str(tmp_path / "ref"), **SCENARIOS["smoothing_and_tokens"])
    plain = _trainer_run("sdpa", str(tmp_path / "plain"))
    # The reference does smooth (near the uniform start the losses barely move, the gradients do).
    assert abs(ref["logs"][0]["grad_norm"] / plain["logs"][0]["grad_norm"] - 1) > 0.01
    for results in ring_runs:
        _assert_same_run(results["smoothing_and_tokens"], ref)


def test_chunked_loss_with_smoothing_is_the_label_smoother() -> None:
    """One process, no Trainer: ``causal_lm_loss(label_smoothing=eps)`` (small chunks, an accumulation-sized ``N``)
    equals transformers' ``LabelSmoother`` on the full logits, in value and in gradients."""
    from transformers.trainer_pt_utils import LabelSmoother

    from hf_ringcp import causal_lm_loss, shard_batch

    model = tiny_lora_llama("ring")
    samples = _samples(2, seed=3)
    ids, labels = torch.stack([x["input_ids"] for x in samples]), torch.stack([x["labels"] for x in samples])
    n = 3 * int((labels[:, 1:] != -100).sum())  # as if the step had 3 such micro-batches
    ref = LabelSmoother(epsilon=0.1)(model(input_ids=ids), labels, shift_labels=True, num_items_in_batch=n)
    ref_grads = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    got = causal_lm_loss(model, shard_batch({"input_ids": ids, "labels": labels}), num_items_in_batch=n,
                         chunk_size=5, label_smoothing=0.1)
    grads = torch.autograd.grad(got, [p for p in model.parameters() if p.requires_grad])
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
    # ... and the smoothing is not a no-op here: the unsmoothed gradients are another thing.
    plain = causal_lm_loss(model, shard_batch({"input_ids": ids, "labels": labels}), num_items_in_batch=n)
    plain_grads = torch.autograd.grad(plain, [p for p in model.parameters() if p.requires_grad])
    difference = torch.cat([(a - b).flatten() for a, b in zip(plain_grads, ref_grads, strict=True)]).norm()
    assert difference > 1e-2 * torch.cat([g.flatten() for g in ref_grads]).norm()
    with pytest.raises(ValueError, match=r"`label_smoothing` must be in \[0, 1\]"):
        causal_lm_loss(model, shard_batch({"input_ids": ids, "labels": labels}), label_smoothing=1.5)


def test_label_smoothing_with_a_loss_the_callback_does_not_own_is_refused(tmp_path) -> None:
    from hf_ringcp import RingCPCallback

    class OwnLoss(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    with pytest.raises(ValueError, match=r"label_smoothing_factor=0\.1 with OwnLoss.*label_smoothing_factor=0"):
        OwnLoss(model=tiny_lora_llama("ring"), args=_args(str(tmp_path), label_smoothing_factor=0.1),
                train_dataset=_samples(2, 0), callbacks=[RingCPCallback(cp_size=1, custom_compute_loss=True)])


# ----------------------------------------------------------------------------------- include_num_input_tokens_seen


def test_num_input_tokens_seen_counts_each_token_once(ring_runs, tmp_path) -> None:
    ref = _trainer_run("sdpa", str(tmp_path / "ref"), **SCENARIOS["smoothing_and_tokens"])
    want = [h["num_input_tokens_seen"] for h in ref["logs"]]
    assert want == [2 * 2 * SEQ * step for step in (1, 2, 3)]  # batch 2 x accumulation 2 x 16 tokens per step
    for results in ring_runs:
        assert [h["num_input_tokens_seen"] for h in results["smoothing_and_tokens"]["logs"]] == want


# ----------------------------------------------------------------------------------- NEFTune


def test_neftune_noise_amplitude_uses_the_sequence_length(ring_runs, tmp_path, monkeypatch) -> None:
    """NEFTune's noise is ``alpha / sqrt(L * d)`` with ``L`` the batch's sequence length (18), not the shard's (10
    after the ring's padding to 20): with a deterministic noise of that amplitude, the losses, grad norms and trained
    weights equal one process's."""
    monkeypatch.setattr(transformers.integrations.neftune, "torch", _DeterministicNoise)
    ref = _trainer_run("sdpa", str(tmp_path / "ref"), **SCENARIOS["neftune"])
    clean = _trainer_run("sdpa", str(tmp_path / "clean"), seq=18)
    assert abs(ref["logs"][0]["grad_norm"] / clean["logs"][0]["grad_norm"] - 1) > 0.01  # the noise changes the run
    for results in ring_runs:
        _assert_same_run(results["neftune"], ref)
