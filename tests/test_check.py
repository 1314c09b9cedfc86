"""python -m hf_ringcp.check: it passes on exact models, fails on a broken ring, reports refusals, shrinks safely.

The distributed cases run in one 2-rank spawn (a module fixture: starting ranks that import transformers costs
seconds each); the broken ring is patched inside the worker, since spawned children do not inherit patches.
One more run goes through the real command line.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    SmolLM3Config,
)

from hf_ringcp.check import EXIT_ERROR, EXIT_MISMATCH, EXIT_PASS, EXIT_REFUSED, CheckSpec, judge, shrink_config
from hf_ringcp.check.cli import main
from hf_ringcp.check.rank import ATTENTION, LAYER, check_rank, measure, rel_error, worst_gradient
from hf_ringcp.check.report import format_text
from hf_ringcp.check.spec import Tolerances
from hf_ringcp.ring.p2p import P2PRing
from tests.distributed import run_ranks
from tests.integrations.tiny import LLAMA_SHAPE

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(LLAMA_SHAPE, vocab_size=128)
# name -> (config, CheckSpec settings). Windows shorter than the sequence, so the windowed path runs.
CASES = {
    "llama": (LlamaConfig(**TINY), dict(seq_len=48)),
    "qwen2_window": (Qwen2Config(**{**TINY, "num_hidden_layers": 3}, use_sliding_window=True, sliding_window=9,
                                 max_window_layers=1), dict(seq_len=40, layout="striped", comm="allgather")),
    "llama_packed_lora_ckpt": (LlamaConfig(**TINY), dict(seq_len=64, packed=True, lora=True,
                                                         gradient_checkpointing=True)),
    "mistral_padded_left": (MistralConfig(**TINY, sliding_window=11), dict(seq_len=40, padded="left",
                                                                          layout="contiguous")),
    "gemma2_softcap": (Gemma2Config(**TINY, head_dim=16, attn_logit_softcapping=50.0), dict(seq_len=32)),
    "llama_broken_ring": (LlamaConfig(**TINY), dict(seq_len=48)),
}


@contextlib.contextmanager
def broken_ring():
    """The ring skips every block received from another rank: each rank attends to its own K/V only."""
    original = P2PRing.step_calls
    P2PRing.step_calls = lambda self, step: original(self, step) if step == 0 else ()
    try:
        yield
    finally:
        P2PRing.step_calls = original


def _specs() -> dict[str, CheckSpec]:
    return {name: CheckSpec(config=shrink_config(config).config, cp=2, **settings)
            for name, (config, settings) in CASES.items()}


def _worker(rank: int, world: int, specs: dict[str, CheckSpec]) -> dict[str, dict]:
    out = {}
    for name, spec in specs.items():
        with broken_ring() if name == "llama_broken_ring" else contextlib.nullcontext():
            out[name] = check_rank(rank, world, spec)
    return out


@pytest.fixture(scope="module")
def judged() -> dict[str, dict]:
    specs = _specs()
    per_rank = run_ranks(_worker, 2, specs, timeout=240)
    for name in specs:  # every rank measures the same (gathered, reduced) results
        assert per_rank[0][name] == per_rank[1][name], name
    return {name: judge(per_rank[0][name], specs[name].tolerances, getattr(specs[name].config, "layer_types", None))
            for name in specs}


@pytest.mark.parametrize("name", ["llama", "qwen2_window", "llama_packed_lora_ckpt", "mistral_padded_left"])
def test_exact_models_pass(judged: dict[str, dict], name: str) -> None:
    result = judged[name]
    assert result["status"] == "pass", result.get("traceback") or result
    assert result["exit_code"] == EXIT_PASS
    assert [r["quantity"] for r in result["rows"]] == ["logits", "loss", "grads"]
    assert all(r["passed"] for r in result["rows"])
    # Not vacuous: real tokens, every trainable tensor and every layer (with its attention) were compared.
    assert result["compared"]["tokens"] > 0 and result["compared"]["gradients"] > 0
    spec = _specs()[name]
    assert len(result["layers"]) == 2 * spec.config.num_hidden_layers
    if spec.lora:
        assert all("lora_" in n for n in result["grads"]) and len(result["grads"]) >= 14
    assert abs(result["losses"]["ring"] - result["losses"]["reference"]) <= 1e-5 * result["losses"]["reference"]


def test_padded_case_compares_only_real_tokens(judged: dict[str, dict]) -> None:
    spec = _specs()["mistral_padded_left"]
    assert judged["mistral_padded_left"]["compared"]["tokens"] == 2 * spec.seq_len - spec.seq_len // 3


def test_broken_ring_fails_and_names_layer_0_attention(judged: dict[str, dict]) -> None:
    result = judged["llama_broken_ring"]
    assert result["status"] == "fail" and result["exit_code"] == EXIT_MISMATCH
    failed = {r["quantity"] for r in result["rows"] if not r["passed"]}
    assert {"logits", "loss", "grads"} <= failed
    first = result["divergence"]["first"]
    assert (first["layer"], first["tensor"], first["module"]) == (0, ATTENTION, "model.layers.0.self_attn")
    assert "RoPE" in result["divergence"]["cause"] and "mask" in result["divergence"]["cause"]
    text = format_text(result, [], Tolerances())
    assert "first divergence: layer 0 attention output (model.layers.0.self_attn)" in text
    assert text.rstrip().endswith("FAIL (exit code 1)")


def test_soft_capping_is_reported_as_a_refusal(judged: dict[str, dict]) -> None:
    result = judged["gemma2_softcap"]
    assert result["status"] == "refused" and result["exit_code"] == EXIT_REFUSED
    assert result["message"].startswith('attn_implementation="ring" under context parallelism does not support '
                                        "logit soft-capping (softcap=50.0)")
    assert "refused: attn_implementation=" in format_text(result, [], Tolerances())


# ------------------------------------------------------------------------------------------ command line


def test_cli_passes_on_a_saved_config_and_prints_json(tmp_path: Path) -> None:
    LlamaConfig(**TINY, tie_word_embeddings=False).save_pretrained(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "hf_ringcp.check", "--model", str(tmp_path), "--cp", "2", "--seq-len", "32", "--json"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert proc.returncode == EXIT_PASS, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads(proc.stdout)
    assert result["status"] == "pass" and result["exit_code"] == 0 and result["reference"] == "sdpa"
    assert [r["passed"] for r in result["rows"]] == [True, True, True]
    assert result["settings"]["cp"] == 2 and result["settings"]["layout"] == "zigzag"
    assert any("heads: 4 query / 2 key-value of head_dim 16" in k for k in result["kept"])


def test_cli_under_torchrun_uses_its_ranks(tmp_path: Path) -> None:
    """The torchrun path: the launched ranks run the check (gloo on CPU) and rank 0 prints the one report."""
    from tests.distributed import free_port

    LlamaConfig(**TINY, tie_word_embeddings=False).save_pretrained(tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "hf_ringcp.check",
         "--model", str(tmp_path), "--seq-len", "32", "--timeout", "120", "--json"],
        capture_output=True, text=True, timeout=240, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == EXIT_PASS, proc.stderr[-3000:] + proc.stdout[-3000:]
    result = json.loads(proc.stdout)  # one JSON object: only rank 0 reports
    assert result["status"] == "pass" and result["settings"]["cp"] == 2 and result["settings"]["device"] == "cpu"


def test_cli_errors_exit_3(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--model", str(tmp_path / "missing"), "--json"]) == EXIT_ERROR  # no config there
    assert json.loads(capsys.readouterr().out)["status"] == "error"
    with pytest.raises(SystemExit) as bad:
        main(["--model", str(tmp_path), "--padded", "middle"])
    assert bad.value.code == EXIT_ERROR  # not argparse's 2, which means "refused" here
    LlamaConfig(**TINY, tie_word_embeddings=False).save_pretrained(tmp_path)
    capsys.readouterr()
    # Settings that do not fit the group are the user's error (3), not a refusal of the model (2).
    assert main(["--model", str(tmp_path), "--cp", "2", "--ulysses-size", "3", "--json"]) == EXIT_ERROR
    assert "must divide the CP size" in json.loads(capsys.readouterr().out)["message"]


def test_a_nan_gradient_is_the_worst() -> None:
    assert worst_gradient({"a": 1e-6, "b": float("nan"), "c": 1e-3}) == "b"
    assert worst_gradient({"a": 1e-6, "c": 1e-3}) == "c" and worst_gradient({}) is None


# ------------------------------------------------------------------------------------------------ report


def _measured(logits: float, loss: float, grads: float, layers: list[float]) -> dict:
    return {
        "status": "ran", "errors": {"logits": logits, "loss": loss, "grads": grads}, "worst_grad": "lm_head.weight",
        "layers": [{"layer": i // 2, "module": f"model.layers.{i // 2}", "tensor": (ATTENTION, LAYER)[i % 2],
                    "max_rel_error": e} for i, e in enumerate(layers)],
        "compared": {"tokens": 8, "gradients": 3},
    }


def test_diagnosis_names_the_usual_cause() -> None:
    tol = Tolerances()
    ok = [1e-7, 1e-7, 2e-7, 2e-7]
    assert judge(_measured(1e-7, 1e-8, 1e-7, ok), tol)["status"] == "pass"
    loss_only = judge(_measured(1e-7, 1e-2, 1e-7, ok), tol)
    assert loss_only["divergence"]["first"] is None and "label shifting" in loss_only["divergence"]["cause"]
    grads_only = judge(_measured(1e-7, 1e-8, 1e-2, ok), tol)
    assert "backward" in grads_only["divergence"]["cause"] and "lm_head.weight" in grads_only["divergence"]["cause"]
    later = judge(_measured(1e-3, 1e-3, 1e-3, [1e-6, 1e-5, 3e-4, 1e-3]), tol)
    assert later["divergence"]["first"]["layer"] == 1 and "numerics" in later["divergence"]["cause"]
    new_type = judge(_measured(1e-3, 1e-3, 1e-3, [1e-7, 1e-7, 0.3, 0.3]), tol, ["full_attention", "sliding_attention"])
    assert "sliding_attention" in new_type["divergence"]["cause"]
    nan = judge(_measured(float("nan"), 1e-8, 1e-7, ok), tol)
    assert nan["status"] == "fail" and "head" in nan["divergence"]["cause"]


# ------------------------------------------------------------------------------------------------ shrink

LLAMA_3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, bos_token_id=128000, eos_token_id=[128001, 128009],
    rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
)


def _q_k_out(config) -> tuple[int, int]:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    attn = model.model.layers[0].self_attn
    return attn.q_proj.out_features, attn.k_proj.out_features


def test_shrink_keeps_llama3_head_layout_and_rope() -> None:
    original = LlamaConfig(**LLAMA_3_8B)
    shrunk = shrink_config(original)
    c = shrunk.config
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (32, 8, 128)
    assert c.rope_parameters == original.rope_parameters and c.rope_parameters["rope_type"] == "llama3"
    assert c.max_position_embeddings == 131072
    assert c.num_hidden_layers == 2 and c.hidden_size == 256 and c.intermediate_size == 512 and c.vocab_size == 512
    assert _q_k_out(c) == (32 * 128, 8 * 128)  # the built model really has 32 / 8 heads of 128
    assert c.bos_token_id < 512 and all(t < 512 for t in c.eos_token_id) and len(set(c.eos_token_id)) == 2
    assert "hidden_size: 4096 -> 256" in shrunk.changes and any("32 -> 2" in x for x in shrunk.changes)
    assert not shrink_config(original, shrink=False).changes  # --no-shrink: the full size


def test_shrink_keeps_every_layer_type_and_window() -> None:
    gemma3 = Gemma3TextConfig()  # 26 layers: five sliding, one full
    shrunk = shrink_config(gemma3)
    c = shrunk.config
    assert c.layer_types == ["sliding_attention", "full_attention"] and shrunk.layers == [0, 5]
    assert c.sliding_window == gemma3.sliding_window and c.rope_parameters == gemma3.rope_parameters
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (8, 4, 256)
    assert c.query_pre_attn_scalar == gemma3.query_pre_attn_scalar

    qwen2 = Qwen2Config(num_hidden_layers=28, use_sliding_window=True, sliding_window=64, max_window_layers=21,
                        hidden_size=3584, num_attention_heads=28, num_key_value_heads=4)
    c = shrink_config(qwen2).config
    assert c.layer_types == ["full_attention", "sliding_attention"] and c.sliding_window == 64
    assert c.head_dim == 128 and c.hidden_size % 28 == 0 and c.hidden_size < 3584

    # Any per-layer list is subset with the layers: SmolLM3's NoPE layers (every fourth layer has no RoPE).
    smol = SmolLM3Config(num_hidden_layers=12)
    c = shrink_config(smol).config
    assert sorted(set(c.no_rope_layers)) == sorted(set(smol.no_rope_layers)) and c.num_hidden_layers == 2


def test_shrink_zeroes_dropout_outside_attention_only() -> None:
    from transformers import Phi3Config

    c = shrink_config(Phi3Config(**TINY, resid_pdrop=0.1, embd_pdrop=0.1, attention_dropout=0.1,
                                 pad_token_id=0)).config
    assert (c.resid_pdrop, c.embd_pdrop, c.attention_dropout) == (0.0, 0.0, 0.1)


def test_an_all_zero_reference_fails_unless_matched_exactly() -> None:
    zero = torch.zeros(3, 4)
    assert rel_error(zero, zero) == 0.0  # a parameter neither run moves: exact
    assert rel_error(torch.full((3, 4), 1e-30), zero) == float("inf")  # any change from zero is infinitely wrong
    assert rel_error(torch.ones(2), torch.tensor([0.0, 2.0])) == 0.5  # max|diff| / max|ref|
    # Through the verdict: a gradient the reference leaves at zero (e.g. an embedding row no token uses) but the
    # ring does not fails the grads row, however small the ring's value.
    ring = {"logits": torch.ones(1, 2, 3), "loss": torch.tensor(1.0), "hidden": {}, "order": [],
            "grads": {"used": torch.ones(2), "unused": torch.tensor([0.0, 1e-12])}}
    ref = {"logits": torch.ones(1, 2, 3), "loss": torch.tensor(1.0), "hidden": {},
           "grads": {"used": torch.ones(2), "unused": torch.zeros(2)}}
    measured = measure(ring, ref, torch.ones(1, 2, dtype=torch.bool))
    assert measured["grads"] == {"used": 0.0, "unused": float("inf")} and measured["worst_grad"] == "unused"
    verdict = judge(measured, Tolerances())
    assert verdict["status"] == "fail" and verdict["exit_code"] == EXIT_MISMATCH
    assert [r["quantity"] for r in verdict["rows"] if not r["passed"]] == ["grads"]
