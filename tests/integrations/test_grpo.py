"""TRL's GRPOTrainer + RingCPCallback on gloo ranks equals the same GRPOTrainer in one process for the same
completions: every loss_type of trl 1.16, old and reference (adapter-disabled) log-probs, gradient accumulation 2;
real rollouts are identical across a CP group's ranks; a generation batch that does not split fails fast."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed import run_ranks

trl = pytest.importorskip("trl")

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
METRICS = ("loss", "grad_norm", "entropy", "kl", "reward", "reward_std", "num_tokens", "completions/mean_length",
           "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio",
           "vespo/phi_seq_mean")
WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang".split()


class FixedRollouts(trl.GRPOTrainer):
    """The generation stand-in (as a vLLM server's completions would be): completions of 3..9 tokens, a
    deterministic function of the prompt and its place in the batch, so both runs see the same ones."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        vocab = self.model.config.vocab_size
        out = []
        for j, ids in enumerate(prompt_ids):
            n = 3 + (sum(ids) + 5 * j) % 7
            out.append([2 + (7 * ids[-1] + 13 * i + j) % (vocab - 2) for i in range(n)] + ([0] if j % 3 == 0 else []))
        return out, None


def _reward(completion_ids, **kwargs) -> list[float]:
    return [float(len(c) % 4) + 0.1 * (c[0] % 5) for c in completion_ids]


def _dataset(n: int, seed: int):
    import datasets

    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        k = int(torch.randint(2, 9, (1,), generator=g))
        texts.append(" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (k,), generator=g)))
    return datasets.Dataset.from_list([{"prompt": t} for t in texts])


def _model(attn: str, vocab: int):
    from transformers import LlamaForCausalLM

    import hf_ringcp  # noqa: F401  (registers "ring")
    from tests.integrations.tiny import CONFIG

    config = copy.deepcopy(CONFIG)
    config.vocab_size = vocab
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=torch.float32)


def _grpo(attn: str, output_dir: str, loss_type: str, callbacks: list, trainer_cls: type = FixedRollouts, **kw):
    from peft import LoraConfig
    from trl import GRPOConfig

    from recipes.data import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    settings = dict(
        output_dir=output_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2, steps_per_generation=4,
        num_generations=4, max_completion_length=10, max_steps=2, learning_rate=0.5, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=3, bf16=False, beta=0.05,
        loss_type=loss_type, importance_sampling_level="sequence" if loss_type == "luspo" else "token",
        dataloader_num_workers=0, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4,
        optim="sgd",  # SGD: the weights' change is the gradients' (Adam's is not linear)
    )
    args = GRPOConfig(**{**settings, **kw})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    trainer = trainer_cls(model=_model(attn, len(tokenizer)), reward_funcs=_reward, args=args,
                          train_dataset=_dataset(8, 1), eval_dataset=_dataset(2, 2), processing_class=tokenizer,
                          peft_config=lora, callbacks=callbacks)
    return trainer


def _train(attn: str, output_dir: str, loss_type: str, callbacks: list) -> dict:
    trainer = _grpo(attn, output_dir, loss_type, callbacks)
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters() if v.requires_grad}
    trainer.train()
    after = dict(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
    return {"history": trainer.state.log_history, "updates": {k: after[k].detach() - v for k, v in before.items()}}


def _ring(rank: int, world: int, output_dir: str, loss_types: tuple[str, ...]) -> dict[str, dict]:
    from hf_ringcp import RingCPCallback

    return {t: _train("ring", f"{output_dir}/{t}", t, [RingCPCallback(cp_size=world)]) for t in loss_types}


def _values(history: list[dict]) -> dict[str, list[float]]:
    return {k: [h[k] for h in history if k in h] for k in (*METRICS, *(f"eval_{m}" for m in METRICS))}


@pytest.mark.parametrize("loss_types", [LOSS_TYPES[:4], LOSS_TYPES[4:]], ids=["grpo-bnpo-dr_grpo-dapo",
                                                                            "luspo-cispo-sapo-vespo"])
def test_grpo_trainer_under_context_parallelism_matches_one_process(loss_types: tuple[str, ...], tmp_path) -> None:
    per_rank = run_ranks(_ring, 2, str(tmp_path / "ring"), loss_types, timeout=600)
    for loss_type in loss_types:
        ref = _train("sdpa", str(tmp_path / "ref" / loss_type), loss_type, [])
        expected = _values(ref["history"])
        assert len(expected["loss"]) == 2 and len(expected["eval_loss"]) == 1, (loss_type, expected)
        assert expected["grad_norm"][0] > 0, (loss_type, expected)
        assert len(ref["updates"]) > 0 and all(u.abs().max() > 0 for u in ref["updates"].values()), loss_type
        for rank, results in enumerate(per_rank):
            got = _values(results[loss_type]["history"])
            # The throughput meter counts the loss step's policy scoring (the mixin's one token-counting rule).
            train_logs = [h for h in results[loss_type]["history"] if "loss" in h]
            assert train_logs and all(h["tokens_per_second"] > 0 for h in train_logs), (loss_type, rank, train_logs)
            for key, want in expected.items():
                assert got[key] == pytest.approx(want, rel=1e-4, abs=1e-6), (loss_type, rank, key)
            for name, update in ref["updates"].items():  # -lr * (sum of the two steps' gradients)
                torch.testing.assert_close(results[loss_type]["updates"][name], update, rtol=1e-4,
                                           atol=1e-4 * float(update.abs().max()),
                                           msg=lambda m, where=(loss_type, rank, name): f"{where}: {m}")


_SEEN: list[list[list[int]]] = []


def _recording_reward(completion_ids, **kwargs) -> list[float]:
    _SEEN.append([list(c) for c in completion_ids])
    return [float(len(c)) + 0.1 * (c[0] % 5 if c else 0) for c in completion_ids]


def _real_rollouts(rank: int, world: int, output_dir: str) -> list[list[list[int]]]:
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from hf_ringcp import RingCPCallback

    class DivergentRng(TrainerCallback):  # without the group's broadcast, the ranks would sample differently
        def on_train_begin(self, args, state, control, **kwargs):
            torch.manual_seed(100 + rank)

    trainer = _grpo("ring", output_dir, "dapo", [RingCPCallback(cp_size=world), DivergentRng()],
                    trainer_cls=GRPOTrainer, max_completion_length=4, per_device_train_batch_size=2,
                    num_generations=2, steps_per_generation=2, max_steps=2, beta=0.0)
    trainer.reward_funcs = [_recording_reward]
    trainer.train()
    return _SEEN


def test_real_rollouts_are_identical_across_the_cp_group(tmp_path) -> None:
    seen = run_ranks(_real_rollouts, 2, str(tmp_path), timeout=300)
    assert seen[0] and any(len(c) for batch in seen[0] for c in batch)
    assert seen[0] == seen[1]


def _bad_generation_batch(rank: int, world: int, output_dir: str) -> str:
    from hf_ringcp import RingCPCallback

    try:
        _grpo("ring", output_dir, "dapo", [RingCPCallback(cp_size=world)], per_device_train_batch_size=1,
              steps_per_generation=2, num_generations=4)
    except ValueError as error:
        return str(error)
    return ""


def test_generation_batch_that_does_not_split_over_dp_groups_fails_fast(tmp_path) -> None:
    messages = run_ranks(_bad_generation_batch, 2, str(tmp_path), timeout=300)
    for message in messages:
        assert "steps_per_generation" in message and "num_generations (4)" in message, message
