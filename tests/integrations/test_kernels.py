"""liger-kernel is optional: refused by name where it cannot run, skipped on request (CPU)."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from hf_ringcp.integrations.kernels import apply_liger_kernels, liger_available


def _model() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    return LlamaForCausalLM(config)


@pytest.mark.skipif(liger_available(), reason="checks the machine without liger-kernel or CUDA")
def test_missing_liger_or_cuda_is_refused_or_skipped() -> None:
    model = _model()
    with pytest.raises(RuntimeError, match=r"pip install 'hf_ringcp\[liger\]'.*when='available'"):
        apply_liger_kernels(model)
    assert apply_liger_kernels(model, when="available") == ()
    assert "forward" not in model.model.layers[0].mlp.__dict__  # nothing was bound


def test_nothing_wanted_and_bad_arguments() -> None:
    assert apply_liger_kernels(_model(), rms_norm=False, swiglu=False, rope=False) == ()
    with pytest.raises(ValueError, match='`when` must be "always" or "available"'):
        apply_liger_kernels(_model(), when="auto")
