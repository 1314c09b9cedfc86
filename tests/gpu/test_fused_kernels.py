"""Issue 25's CUDA paths against float64 references (skipped without CUDA).

1. The Triton LSE merge (:mod:`hf_ringcp.ring.triton_merge`) against the torch merge and float64, on strided
   accumulators (``[B, S, H, D]`` memory), bf16 and float32 blocks, and rows with ``-inf`` LSEs.
2. Bottom-right causal calls (``Sq < Sk``): flash must align bottom-right (forward and backward); cuDNN's
   alignment is probed, and where the probe says bottom-right its forward and backward must be right too.
3. :class:`~hf_ringcp.ring.allgather_prefix.AllGatherPrefix` on every simulated rank (loopback gather) against
   float64 attention and the planned :class:`~hf_ringcp.ring.allgather.AllGatherRing`.
4. The fused decode step (:func:`~hf_ringcp.ring.decode.local_partial_fused`, bf16 cache) against the float32
   einsum path.

Run on a GPU machine: ``python -m pytest tests/gpu/test_fused_kernels.py -q``.
"""

from __future__ import annotations

import pytest
import torch

from hf_ringcp.ring.allgather import AllGatherRing
from hf_ringcp.ring.allgather_prefix import AllGatherPrefix
from hf_ringcp.ring.blocks import Kernels
from hf_ringcp.ring.comm import LoopbackGatherComm
from hf_ringcp.ring.decode import local_partial, local_partial_fused
from hf_ringcp.ring.kernels import BACKENDS, aligns_bottom_right, bottom_right_mask, default_scale
from hf_ringcp.ring.layout import Layout
from hf_ringcp.ring.merge import fused_merge_available, merge_into, merge_into_torch
from hf_ringcp.ring.plan import MaskSpec
from hf_ringcp.ring.variant import RankSetup
from tests.gpu.common import TOLERANCE, assert_close
from tests.ring.reference import reference_attention, rel_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _strided(b: int, h: int, s: int, d: int, dtype, g) -> torch.Tensor:
    """``[B, H, S, D]`` view of ``[B, S, H, D]`` memory, as the ring's accumulators are laid out."""
    return torch.randn(b, s, h, d, generator=g, device="cuda", dtype=dtype).transpose(1, 2)


@pytest.mark.parametrize("block_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 32, 4096, 128), (2, 3, 77, 64), (1, 4, 5, 80)])
def test_triton_merge_matches_torch_and_float64(block_dtype, shape) -> None:
    assert fused_merge_available(torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    b, h, s, d = shape
    out = _strided(b, h, s, d, torch.float32, g)
    lse = torch.randn(b, h, s, generator=g, device="cuda") * 4
    blk = _strided(b, h, s, d, block_dtype, g)
    blse = (torch.randn(b, h, s + 3, generator=g, device="cuda") * 4)[..., 3:]  # a non-contiguous LSE view
    lse[..., :2] = float("-inf")  # rows that had no key yet
    blse[..., 1:3] = float("-inf")  # rows this block hides entirely (row 1: both sides)
    ref_w = torch.exp(blse.double() - torch.logaddexp(lse.double(), blse.double())).nan_to_num(0.0)
    ref_out = out.double() + ref_w[..., None] * (blk.double() - out.double())
    ref_lse = torch.logaddexp(lse.double(), blse.double())
    t_out, t_lse = out.clone(), lse.clone()
    merge_into_torch(t_out, t_lse, blk, blse)
    merge_into(out, lse, blk, blse)
    assert not out.isnan().any() and torch.equal(lse.isinf(), ref_lse.isinf())
    bad = ((out.double() - ref_out).abs() > 1e-5 * ref_out.abs().max()).nonzero()
    assert rel_error(out, ref_out) < 1e-6 and rel_error(out, t_out) < 1e-6, f"{bad.shape[0]} wrong: {bad[:6].tolist()}"
    finite = ref_lse.isfinite()
    assert rel_error(lse[finite], ref_lse[finite]) < 1e-6 and torch.equal(lse[~finite], t_lse[~finite])


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("sq,sk", [(128, 384), (256, 256), (64, 1000)])
def test_bottom_right_causal_calls(backend: str, sq: int, sk: int) -> None:
    b_ = BACKENDS[backend]
    probe = aligns_bottom_right(b_, "cuda")
    print(f"{backend} aligns causal bottom-right: {probe}")
    if not probe:
        assert backend != "flash", "flash must align causal masks bottom-right"
        pytest.skip(f"{backend} does not align bottom-right here (the prefix variant keeps the planned path)")
    g = torch.Generator(device="cuda").manual_seed(sq + sk)
    q, dout = (torch.randn(1, 8, sq, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(1, 2, sk, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out, lse = b_.forward(q, k, v, True, default_scale(128))
    dq, dk, dv = b_.backward(dout, q, k, v, out, lse.float(), True, default_scale(128))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    kr, vr = (x.repeat_interleave(4, dim=1) for x in leaves[1:])
    s = (leaves[0] @ kr.transpose(-1, -2)) * default_scale(128) + bottom_right_mask(sq, sk, torch.float64, "cuda")
    ref = torch.softmax(s, -1) @ vr
    ref.backward(dout.double())
    assert_close({"out": out, "dq": dq, "dk": dk, "dv": dv},
                 {"out": ref, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad},
                 torch.bfloat16, f"{backend} bottom-right {sq}x{sk}")


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_allgather_prefix_on_every_rank(backend: str, layout: str) -> None:
    world, seq, hq, hkv, d = 4, 2048, 8, 2, 128
    g = torch.Generator(device="cuda").manual_seed(7)
    q, dout = (_strided(1, hq, seq, d, torch.bfloat16, g) for _ in range(2))
    k, v = (_strided(1, hkv, seq, d, torch.bfloat16, g) for _ in range(2))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*leaves, causal=True)
    ref.backward(dout.double())
    placement = Layout.for_name(layout, world).placement(seq)
    pos = [placement.positions(r, "cuda") for r in range(world)]
    local = [[x[:, :, p] for p in pos] for x in (q, k, v, dout)]
    gathered = torch.stack([torch.stack([local[1][r], local[2][r]]) for r in range(world)])
    kernels = Kernels.choose(backend, q, k, needs_masks=False)
    for r in range(world):
        setup = RankSetup(r, world, placement, MaskSpec(), kernels, default_scale(d))
        comm = lambda r=r: LoopbackGatherComm(r, gathered)
        qr, kr, vr, dr = (x[r] for x in local)
        variants = {"planned": AllGatherRing(setup, comm)}
        if backend == "flash":
            variants["prefix"] = AllGatherPrefix(setup, comm)
        else:  # cuDNN (torch 2.11) aligns causal masks top-left: the prefix variant refuses it on CUDA
            with pytest.raises(ValueError, match="bottom-right"):
                AllGatherPrefix(setup, comm).attend(local[0][r], local[1][r], local[2][r])
        for name, variant in variants.items():
            out, lse = variant.attend(qr, kr, vr)
            dq = variant.attend_backward(dr, qr, kr, vr, out, lse)[0]
            assert_close({"out": out, "dq": dq}, {"out": ref[:, :, pos[r]], "dq": leaves[0].grad[:, :, pos[r]]},
                         torch.bfloat16, f"{name} {backend} {layout} rank {r}")


@pytest.mark.parametrize("heads", [(32, 8), (4, 4)])
def test_fused_decode_step(heads: tuple[int, int]) -> None:
    g = torch.Generator(device="cuda").manual_seed(3)
    hq, hkv = heads
    q = torch.randn(2, hq, 1, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, hkv, 3000, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    visible = torch.ones(2, 1, 3000, dtype=torch.bool, device="cuda")
    ref_out, ref_lse = local_partial(q.double(), k.double(), v.double(), visible, 0.1)
    out, lse = local_partial_fused(q, k, v, 0.1)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, ref_out) < TOLERANCE[torch.bfloat16] and rel_error(lse, ref_lse) < 1e-3
