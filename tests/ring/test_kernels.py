"""Every block kernel that runs on CPU, called by name: exact against float64 attention, GQA head order included.

The repeat-K/V path (for kernels without native grouped-query attention, e.g. CUDA's efficient kernel) runs
through a stand-in backend that refuses un-repeated K/V.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_ringcp.ring.blocks import RowWrites
from hf_ringcp.ring.kernels import BACKENDS, additive_mask, block_backward, block_forward, select_backend
from hf_ringcp.ring.plan import BlockCall
from tests.ring.reference import rel_error

CPU_BACKENDS = [name for name, b in BACKENDS.items() if b.supports(torch.zeros(1, 1, 1, 8), None) is None]


def _inputs(hq: int, hkv: int, sq: int, sk: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, hq, sq, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, hkv, sk, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, hkv, sk, 16, generator=g, dtype=torch.float64)
    dout = torch.randn(2, hq, sq, 16, generator=g, dtype=torch.float64)
    return q, k, v, dout


def _reference(q, k, v, dout, visible):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    groups = q.shape[1] // k.shape[1]
    kk, vv = (x.repeat_interleave(groups, dim=1) for x in leaves[1:])  # query head h uses K/V head h // groups
    s = (leaves[0] @ kk.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~visible, float("-inf"))
    out = torch.softmax(s, -1) @ vv
    out.backward(dout)
    return out.detach(), torch.logsumexp(s, -1).detach(), [x.grad for x in leaves]


def _check(backend, q, k, v, dout, causal: bool, visible, bias, dtype, tol: float) -> None:
    ref_out, ref_lse, ref_grads = _reference(q, k, v, dout, visible)
    args = [x.to(dtype) for x in (q, k, v)]
    out, lse = block_forward(backend, *args, causal, q.shape[-1] ** -0.5, bias)
    grads = block_backward(backend, dout.to(dtype), *args, out, lse, causal, q.shape[-1] ** -0.5, bias)
    assert rel_error(out, ref_out) <= tol and rel_error(lse, ref_lse) <= tol
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and rel_error(got, want) <= tol


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize(("hq", "hkv"), [(8, 2), (6, 3), (4, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_cpu_kernels_match_float64_attention(name: str, hq: int, hkv: int, causal: bool) -> None:
    assert {"cpu_flash", "math"} <= set(CPU_BACKENDS)
    q, k, v, dout = _inputs(hq, hkv, 12, 12)
    visible = torch.ones(12, 12, dtype=torch.bool)
    if causal:
        visible = visible.tril()
    _check(BACKENDS[name], q, k, v, dout, causal, visible, None, torch.float32, 1e-5)
    _check(BACKENDS[name], q, k, v, dout, causal, visible, None, torch.bfloat16, 2e-2)


@pytest.mark.parametrize("name", [n for n in CPU_BACKENDS if BACKENDS[n].masks])
def test_masked_kernels_apply_a_band(name: str) -> None:
    q, k, v, dout = _inputs(8, 2, 10, 7)
    call = BlockCall(0, 10, 0, 7, "band", lo=0, hi=4)  # a sliding-window edge: 0 <= i - j < 4
    visible = call.band_mask()
    assert visible.any(-1).all()
    _check(BACKENDS[name], q, k, v, dout, False, visible, additive_mask(visible, torch.float32), torch.float32, 1e-5)


def test_repeat_kv_path_through_a_kernel_without_native_gqa() -> None:
    math = BACKENDS["math"]
    heads_seen = []

    def forward(q, k, v, *rest):
        heads_seen.append(k.shape[1])
        return math.forward(q, k, v, *rest)

    def backward(dout, q, k, v, *rest):
        heads_seen.append(k.shape[1])
        return math.backward(dout, q, k, v, *rest)

    stand_in = dataclasses.replace(math, name="repeat", native_gqa=False, forward=forward, backward=backward)
    q, k, v, dout = _inputs(8, 2, 9, 9)
    visible = torch.ones(9, 9, dtype=torch.bool).tril()
    _check(stand_in, q, k, v, dout, True, visible, None, torch.float32, 1e-5)
    assert heads_seen == [8, 8]  # K/V repeated to the 8 query heads; dK/dV summed back to 2 (checked by _check)


def test_auto_backend_and_masks_on_cpu() -> None:
    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16)
    assert select_backend("auto", q, k).name == "cpu_flash"
    assert select_backend("auto", q, k, masked=True).masks
    with pytest.raises(ValueError, match="`backend` must be one of"):
        select_backend("triton", q, k)


def test_row_writes_track_unaligned_ranges() -> None:
    rows = RowWrites(8)
    assert rows.split(1, 8) == [(1, 8, True)]
    assert rows.unwritten() == [(0, 1)]  # row 0 is still to be written, whatever the chunking
    assert rows.split(0, 3) == [(0, 1, True), (1, 3, False)]
    assert rows.unwritten() == []
    other = RowWrites(10)
    other.split(2, 4)
    other.split(6, 8)
    assert other.split(3, 7) == [(3, 4, False), (4, 6, True), (6, 7, False)]
    assert other.unwritten() == [(0, 2), (8, 10)]


def test_blocks_of_one_token_avoid_cudnn() -> None:
    from hf_ringcp.ring.blocks import Kernels

    kernels = Kernels(BACKENDS["cudnn"], None, BACKENDS["flash"])
    q = torch.zeros(1, 4, 8, 16)
    assert kernels.for_call(BlockCall(0, 1, 0, 1, "causal"), q)[0].name == "flash"  # s_q = s_kv = 1
    assert kernels.for_call(BlockCall(0, 5, 3, 4, "full"), q)[0].name == "flash"
    assert kernels.for_call(BlockCall(0, 5, 0, 5, "causal"), q)[0].name == "cudnn"
