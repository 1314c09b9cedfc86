"""recipes/train_lora.py end to end under `accelerate launch` (2 gloo ranks, tiny random Llama), and resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recipes.config import load_recipe, parse_overrides
from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "--model_name_or_path", "tiny-random", "--seq_len", "128", "--cp_size", "2", "--num_train_samples", "16",
    "--num_eval_samples", "2", "--passkey_eval_lengths", "[128]", "--passkey_eval_depths", "[0.0, 1.0]",
    "--learning_rate", "0.01", "--lr_scheduler_type", "constant", "--loss_chunk_size", "32", "--lora_r", "4",
]


def _launch(output_dir: Path, *overrides: str) -> dict:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "recipes/accelerate/cpu_gloo_2proc.yaml"), "--main_process_port", str(free_port()),
        str(ROOT / "recipes/train_lora.py"), *TINY, "--output_dir", str(output_dir), *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n" + proc.stdout[-4000:] + proc.stderr[-6000:]
    return json.loads((output_dir / "results.json").read_text())


def _single_process(output_dir: Path, *overrides: str) -> dict:
    """The same recipe in one process without context parallelism (cp_size 1): the reference losses."""
    cmd = [sys.executable, str(ROOT / "recipes/train_lora.py"), *TINY, "--cp_size", "1", "--output_dir",
           str(output_dir), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n" + proc.stdout[-4000:] + proc.stderr[-6000:]
    return json.loads((output_dir / "results.json").read_text())


def test_recipe_trains_evaluates_and_resumes(tmp_path: Path) -> None:
    full = _launch(tmp_path / "full", "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3")
    # CP = 2 on 2 ranks trains exactly as one process without CP (same data, same seed).
    single = _single_process(tmp_path / "single", "--max_steps", "4", "--skip_passkey_eval", "true",
                             "--per_device_train_batch_size", "1")
    assert len(full["losses"]) == 4
    assert full["losses"] == pytest.approx(single["losses"], rel=1e-5)
    # The same adapters at the start (the seed fixes them), so the same gradients from the first step on.
    assert all(isinstance(x, float) and x > 0 for x in single["grad_norms"])
    assert full["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-5)
    assert full["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-5)
    assert set(full["passkey_before"]) == {"len=128 depth=0", "len=128 depth=1"}
    assert full["tokens_per_second"] > 0 and full["peak_memory_gib"] > 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json"):
        assert (tmp_path / "full" / "checkpoint-4" / name).exists(), name
    assert (tmp_path / "full" / "adapter_model.safetensors").exists()

    resumed = _launch(tmp_path / "resumed", "--max_steps", "4", "--skip_passkey_eval", "true",
                      "--resume_from_checkpoint", str(tmp_path / "full" / "checkpoint-2"))
    # The first two entries come back from checkpoint-2's trainer_state.json; the last two are recomputed.
    assert len(resumed["losses"]) == 4
    assert resumed["losses"][2:] == pytest.approx(full["losses"][2:], rel=1e-5)
    assert resumed["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-5)


def test_trl_recipe_trains_on_the_shipped_chat_data(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    out = _launch(tmp_path / "trl", "--trainer", "trl", "--dataset", str(ROOT / "recipes/data/chat_example.jsonl"),
                  "--max_steps", "2", "--skip_passkey_eval", "true", "--save_steps", "2")
    assert len(out["losses"]) == 2 and all(math.isfinite(x) for x in out["losses"])
    assert math.isfinite(out["eval_loss"]) and out["tokens_per_second"] > 0


def test_dpo_recipe_trains_on_the_shipped_preferences_as_one_process(tmp_path: Path) -> None:
    pytest.importorskip("trl")
    dpo = ["--trainer", "dpo", "--dataset", str(ROOT / "recipes/data/preference_example.jsonl"), "--max_steps", "2",
           "--skip_passkey_eval", "true", "--save_steps", "2", "--beta", "0.5", "--dtype", "float32"]
    out = _launch(tmp_path / "dpo", *dpo)
    single = _single_process(tmp_path / "single", *dpo, "--per_device_train_batch_size", "1")
    assert len(out["losses"]) == 2 and all(math.isfinite(x) for x in out["losses"])
    # The DPO losses and gradient norms of CP = 2 are those of one process (the adapter-disabled reference included).
    assert out["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert out["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-4)
    assert out["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4) and out["tokens_per_second"] > 0
    assert (tmp_path / "dpo" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--learning_rat", "1"], r"Unknown recipe key\(s\) \['learning_rat'\]"),
        (["--seq_len", "130", "--cp_size", "2"], r"`seq_len` = 130 is not divisible by 4"),
        (["--layout", "diagonal"], r"`layout` must be one of"),
        (["--cp_size", "0"], r"`cp_size` must be >= 1"),
    ],
)
def test_bad_recipe_values_fail_before_loading(overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        load_recipe(ROOT / "recipes/embedded-passkey-2k.yaml", parse_overrides(overrides))


def test_passkey_eval_lengths_need_not_split() -> None:
    # The evaluation generates under context parallelism, which pads any prompt length.
    cfg = load_recipe(ROOT / "recipes/embedded-passkey-2k.yaml", parse_overrides(["--passkey_eval_lengths", "[102]"]))
    assert cfg.passkey_eval_lengths == [102]


def test_cp_size_must_divide_the_world() -> None:
    cfg = load_recipe(ROOT / "recipes/embedded-passkey-2k.yaml", {"cp_size": 4, "seq_len": 2048})
    with pytest.raises(ValueError, match=r"`cp_size` = 4 does not divide the number of processes \(6\)"):
        cfg.check_world(6)


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "recipes").glob("*.yaml")))
def test_shipped_recipes_are_valid(name: str) -> None:
    cfg = load_recipe(ROOT / "recipes" / name)
    assert cfg.seq_len // cfg.cp_size <= 16384  # each GPU holds at most 16K tokens


@pytest.mark.parametrize(("lora_dtype", "expected"), [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_lora_dtype_sets_the_adapters_dtype_only(lora_dtype, expected) -> None:
    from recipes.train_lora import load_model_and_tokenizer

    cfg = load_recipe(ROOT / "recipes/embedded-passkey-2k.yaml", parse_overrides(
        ["--model_name_or_path", "tiny-random", "--dtype", "bfloat16", "--lora_dtype", lora_dtype]))
    model, _ = load_model_and_tokenizer(cfg)
    dtypes = {("lora_" in n, p.dtype) for n, p in model.named_parameters()}
    assert dtypes == {(True, expected), (False, torch.bfloat16)}
    with pytest.raises(ValueError, match=r"`lora_dtype` must be one of \('float32', 'bfloat16'\)"):
        load_recipe(ROOT / "recipes/embedded-passkey-2k.yaml", parse_overrides(["--lora_dtype", "fp8"]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU machine, where liger-kernel cannot run")
def test_liger_kernels_auto_is_a_no_op_on_cpu_and_true_is_refused() -> None:
    from recipes.train_lora import load_model_and_tokenizer

    def load(value: str):
        return load_model_and_tokenizer(load_recipe(ROOT / "recipes/embedded-passkey-2k.yaml", parse_overrides(
            ["--model_name_or_path", "tiny-random", "--liger_kernels", value])))

    model, _ = load("auto")
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match=r"apply_liger_kernels: .*pip install 'hf_ringcp\[liger\]'"):
        load("true")
    assert load_recipe(None, {"liger_kernels": False}).liger_kernels is False
    with pytest.raises(ValueError, match=r"`liger_kernels` must be one of \('auto',\)"):
        load_recipe(None, {"liger_kernels": "sometimes"})


def test_seed_fixes_the_lora_initialisation(tmp_path: Path) -> None:
    # A saved model (the pretrained path): its weights are read, so only the adapters are random. Each load stands
    # for a launch on some rank: whatever the random state before it, the same seed gives the same adapters.
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes.data import build_tiny_tokenizer
    from recipes.train_lora import load_model_and_tokenizer

    tokenizer = build_tiny_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    def adapters(seed: int, noise: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(noise)  # a different random state on each "launch"
        cfg = load_recipe(None, {"model_name_or_path": str(tmp_path), "seed": seed, "lora_r": 4, "cp_size": 1})
        model, _ = load_model_and_tokenizer(cfg)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, second, other_seed = adapters(0, noise=1), adapters(0, noise=2), adapters(1, noise=1)
    assert first and first.keys() == second.keys()
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert not any(torch.equal(first[n], other_seed[n]) for n in first)
