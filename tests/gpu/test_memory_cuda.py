"""The host offload on CUDA: copies on a side stream, the backward's prefetch, numbers unchanged."""

from __future__ import annotations

import pytest
import torch

import hf_ringcp
from hf_ringcp.integrations.memory import offload_to_cpu, tile_mlp
from tests.integrations.test_memory import LAYERS, _batch, _model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _step(model, forward_context=None):
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _batch().items()}
    with hf_ringcp.context_parallel():
        with forward_context if forward_context is not None else torch.enable_grad():
            loss = hf_ringcp.causal_lm_loss(model, batch, chunk_size=16)
        loss.backward()
    torch.cuda.synchronize()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("tiled", [True, False])
def test_offload_with_and_without_prefetch_changes_nothing(prefetch: bool, tiled: bool) -> None:
    ref_loss, ref_grads = _step(_model().cuda())
    model = _model().cuda()
    handle = tile_mlp(model, tile_tokens=16) if tiled else None
    offload = offload_to_cpu(min_bytes=0, prefetch=prefetch)
    loss, grads = _step(model, offload)
    if handle is not None:
        handle.remove()
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_prefetch_hits_every_layer_input() -> None:
    model = _model().cuda()
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in _batch().items()}
    with hf_ringcp.context_parallel():
        with offload_to_cpu(min_bytes=0) as stats:
            loss = hf_ringcp.causal_lm_loss(model, batch, chunk_size=16)
        loss.backward()
    torch.cuda.synchronize()
    # Every offloaded tensor but the last one packed (the first the backward needs) can arrive early.
    assert stats.tensors >= LAYERS
    assert stats.prefetched >= LAYERS - 1, (stats.prefetched, stats.tensors)


@pytest.mark.parametrize("prefetch", [True, False])
def test_odd_sized_and_strided_tensors_round_trip(prefetch: bool) -> None:
    """Tensors stored in several power-of-two host pieces (and a strided one) come back exactly."""
    a = torch.randn(3, 1000, 1023, device="cuda", requires_grad=True)  # 12.3 MB: pieces of 8, 2, 1 MiB and more
    b = torch.randn(1023, 777, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with offload_to_cpu(min_bytes=0, prefetch=prefetch) as stats:
        y = (a.sin() * a).sum() + (b.t().float().exp() * 2).sum()  # b.t(): a strided tensor is saved
    y.backward()
    torch.cuda.synchronize()
    assert stats.tensors >= 2
    torch.testing.assert_close(a.grad, (a.detach().sin() + a.detach() * a.detach().cos()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, (b.detach().float().exp() * 2).to(torch.bfloat16), rtol=0, atol=0)
