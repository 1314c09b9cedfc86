"""Packed rows on CUDA through the packed schedule (skipped without CUDA): flash's varlen op, at most two kernel
calls per ring step, exact against float64 per-document attention, and no host sync once the batch's plans exist.

World size 1 (one step per comm: the structure a rank runs at every step of a real ring); ``tests/ring`` proves
the multi-rank structure on CPU. Run on a GPU machine: ``python -m pytest tests/gpu/test_packed_varlen.py -q``.
"""

from __future__ import annotations

import collections
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_ringcp.ring import ring_attention
from tests.gpu.common import assert_close, documents
from tests.ring.reference import documents_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HQ, HKV, D = 8, 2, 128
FLASH = {"_flash_attention_forward", "_flash_attention_backward"}
DENSE = {"_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
         "_efficient_attention_forward", "_efficient_attention_backward",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"}


class CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 300) for _ in range(n)]


def _case(layout: str, comm: str, lengths: list[int], window: int | None = None):
    real, bounds, s = documents(layout, 1, lengths)
    gen = torch.Generator(device="cuda").manual_seed(5)
    rand = lambda h: torch.randn(1, s, h, D, device="cuda", generator=gen).to(torch.bfloat16).transpose(1, 2)
    q, k, v, dout = rand(HQ), rand(HKV), rand(HKV), rand(HQ)
    is_real = torch.zeros(s, dtype=torch.bool, device="cuda")
    for a, b in real:
        is_real[a:b] = True
    dout = dout.masked_fill(~is_real[:, None], 0)
    full = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = documents_reference(*full, real, window=window)
    ref.backward(dout.double())
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def run():
        for x in leaves:
            x.grad = None
        out = ring_attention(*leaves, layout=layout, comm=comm, cu_seqlens=bounds, window=window)
        out.backward(dout)
        return out

    out = run()
    got = {"out": out[:, :, is_real], "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    want = {"out": ref.detach()[:, :, is_real], "dq": full[0].grad, "dk": full[1].grad, "dv": full[2].grad}
    assert_close(got, want, torch.bfloat16, f"packed {layout}/{comm} window={window} ({len(lengths)} documents)")
    return run


@pytest.mark.parametrize("comm", ["p2p", "allgather", "ulysses"])
@pytest.mark.parametrize("layout", ["zigzag", "zigzag_global", "contiguous", "striped"])
def test_packed_row_is_one_varlen_call_per_kind(layout: str, comm: str) -> None:
    """96 short documents: one varlen call forward and one backward (the step's causal squares), nothing dense."""
    run = _case(layout, comm, _lengths(96))
    with CountOps() as counter:
        run()
    flash = sum(counter.ops[n] for n in FLASH)
    dense = sum(counter.ops[n] for n in DENSE)
    assert 1 <= flash <= 4 and dense == 0, dict(counter.ops)


def test_long_document_stays_on_the_dense_kernel() -> None:
    """One 6K document and 40 short ones: the long document's block runs on the dense kernel, the rest as varlen."""
    run = _case("zigzag", "p2p", [6000, *_lengths(40, seed=1)])
    with CountOps() as counter:
        run()
    assert sum(counter.ops[n] for n in DENSE) >= 2 and sum(counter.ops[n] for n in FLASH) >= 2, dict(counter.ops)
    assert sum(counter.ops[n] for n in DENSE | FLASH) <= 8, dict(counter.ops)


def test_sliding_window_over_documents() -> None:
    _case("zigzag", "p2p", _lengths(40, seed=2), window=37)


def test_no_host_sync_once_planned() -> None:
    """The second call of the same batch (every later layer) never waits for the GPU."""
    run = _case("zigzag", "p2p", _lengths(64, seed=3))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
