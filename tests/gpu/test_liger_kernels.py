"""liger-kernel's RMSNorm / SwiGLU / RoPE under the ring: the LoRA loss and gradients match Transformers' layers."""

from __future__ import annotations

import pytest
import torch

import hf_ringcp
from hf_ringcp.integrations.kernels import apply_liger_kernels, liger_available
from hf_ringcp.integrations.memory import tile_mlp
from tests.integrations.test_memory import _batch, _model
from tests.ring.reference import rel_error

pytestmark = pytest.mark.skipif(not liger_available(), reason="needs liger-kernel and a CUDA device")


def _step(model):
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _batch().items()}
    with hf_ringcp.context_parallel():
        loss = hf_ringcp.causal_lm_loss(model, batch, chunk_size=16)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("which", ["rms_norm", "swiglu", "rope", "all"])
@pytest.mark.parametrize("tiled", [False, True])
def test_liger_kernels_match_transformers(which: str, tiled: bool) -> None:
    from transformers.models.llama import modeling_llama

    rope_before = modeling_llama.apply_rotary_pos_emb
    try:
        ref_loss, ref_grads = _step(_model().cuda())
        model = _model().cuda()
        flags = {k: which in (k, "all") for k in ("rms_norm", "swiglu", "rope")}
        assert apply_liger_kernels(model, **flags) == tuple(k for k, on in flags.items() if on)
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

        layer = model.base_model.model.model.layers[0]
        bound = {"rms_norm": layer.input_layernorm, "swiglu": layer.mlp}
        for name, module in bound.items():  # the test can fail: liger's kernels really run
            forward = module.__dict__.get("forward")
            expected = {"rms_norm": LigerRMSNorm.forward, "swiglu": LigerSwiGLUMLP.forward}[name]
            assert (getattr(forward, "__func__", None) is expected) == flags[name], name
        assert (modeling_llama.apply_rotary_pos_emb is liger_rotary_pos_emb) == flags["rope"]
        later = _model()  # built after: Transformers' own classes (liger swapped them; they were put back)
        assert type(later.base_model.model.model.norm) is modeling_llama.LlamaRMSNorm
        assert type(later.base_model.model.model.layers[0].mlp) is modeling_llama.LlamaMLP
        handle = tile_mlp(model, tile_tokens=16) if tiled else None
        loss, grads = _step(model)
        if handle is not None:
            handle.remove()
    finally:
        modeling_llama.apply_rotary_pos_emb = rope_before  # liger patches the module function
    assert rel_error(loss, ref_loss) <= 1e-5
    for name, grad in ref_grads.items():
        assert rel_error(grads[name], grad) <= 1e-4, name
