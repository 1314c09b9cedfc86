"""Every causal-LM family of the installed transformers ends the check's preflight in a defined outcome.

Config-only and in one process: each family's default config is built, its model built on the meta device (no
memory, no weights) and judged by :func:`hf_ringcp.check.preflight.library_refusal`, the same judgement
``python -m hf_ringcp.check`` makes before any rank starts. A family ends refused (by name: the message names a
module or says why) or accepted; a crash fails the test. Families whose own default config does not build a
model are skipped (that is transformers' default, not a model anyone trains). The token-mixer and MLA families
of the issue are refused by module; attention-only families are accepted. The command line then runs for a
representative few.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, CohereConfig, Qwen3NextConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_ringcp.check import EXIT_PASS, EXIT_REFUSED
from hf_ringcp.check.preflight import library_refusal

ROOT = Path(__file__).resolve().parents[1]
MIXER = 'attn_implementation="ring" under context parallelism does not support layers that mix tokens'
MLA = 'attn_implementation="ring" under context parallelism does not support multi-head latent attention (MLA)'
REFUSED_BY_MODULE = {
    **dict.fromkeys(["qwen3_next", "minimax", "jamba", "falcon_h1", "bamba", "granitemoehybrid", "zamba", "zamba2",
                     "mamba", "mamba2", "falcon_mamba", "nemotron_h", "recurrent_gemma", "rwkv", "xlstm",
                     "kimi_linear", "qwen3_5_text", "olmo_hybrid"], MIXER),
    **dict.fromkeys(["deepseek_v2", "deepseek_v3", "minicpm3"], MLA),
}
ACCEPTED = ["llama", "qwen2", "mistral", "gemma3_text", "cohere", "cohere2", "olmoe", "helium", "gpt_neox", "falcon"]


def _outcomes() -> dict[str, str | None]:
    """``{model_type: refusal message or None (accepted)}`` for every family whose default config builds a model."""
    out = {}
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            config = CONFIG_MAPPING[model_type]()
            text = config.get_text_config(decoder=True)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                AutoModelForCausalLM.from_config(text)
        except Exception:
            continue  # transformers' own default config does not build this model
        out[model_type] = library_refusal(config)  # raises on a crash: the test fails naming the family below
    return out


@pytest.fixture(scope="module")
def outcomes() -> dict[str, str | None]:
    return _outcomes()


def test_every_family_is_refused_by_name_or_accepted(outcomes: dict[str, str | None]) -> None:
    assert len(outcomes) > 100  # not vacuous: the installed transformers has ~200 causal-LM families
    for model_type, message in outcomes.items():
        if message is not None:
            assert message.startswith('attn_implementation="ring" under context parallelism does not support'), (
                model_type, message)
            # Named: the module path and its class, or (models without a "ring" entry) the reason.
            assert re.search(r"\w+(\.\w+)+ \(\w+", message) or "no \"ring\" entry" in message, (model_type, message)


@pytest.mark.parametrize("model_type", sorted(REFUSED_BY_MODULE))
def test_token_mixer_and_mla_families_are_refused_by_module(outcomes: dict[str, str | None],
                                                           model_type: str) -> None:
    assert model_type in outcomes, f"{model_type}: its default config no longer builds a model"
    assert (outcomes[model_type] or "").startswith(REFUSED_BY_MODULE[model_type]), outcomes[model_type]


@pytest.mark.parametrize("model_type", ACCEPTED)
def test_attention_only_families_are_accepted(outcomes: dict[str, str | None], model_type: str) -> None:
    assert outcomes[model_type] is None


# ------------------------------------------------------------------------------------------ command line


def _cli(model_dir: Path, *extra: str) -> tuple[int, dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "hf_ringcp.check", "--model", str(model_dir), "--json", "--seq-len", "32", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return proc.returncode, json.loads(proc.stdout)


def test_cli_refuses_a_token_mixer_model_before_any_rank_starts(tmp_path: Path) -> None:
    Qwen3NextConfig(num_hidden_layers=4).save_pretrained(tmp_path)
    code, result = _cli(tmp_path)
    assert code == EXIT_REFUSED and result["status"] == "refused", result
    assert result["message"].startswith(MIXER) and "model.layers.0.linear_attn (Qwen3NextGatedDeltaNet" in result[
        "message"]


def test_cli_passes_cohere_with_its_logit_scale(tmp_path: Path) -> None:
    # logit_scale=0.0625 multiplies the logits; the check measures that from the model instead of asking for a
    # logits_transform the command line has no option for.
    CohereConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, logit_scale=0.0625).save_pretrained(tmp_path)
    code, result = _cli(tmp_path)
    assert code == EXIT_PASS and result["status"] == "pass", result
