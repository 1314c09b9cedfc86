"""The all-gather's prefix variant (one bottom-right causal call per query segment) equals the planned all-gather.

On CPU the kernels get the explicit bottom-right mask; the CUDA kernels' native alignment is checked in
``tests/gpu/test_triton_merge.py``.
"""

from __future__ import annotations

import pytest
import torch

from hf_ringcp.ring import shard_sequence, unshard_sequence
from hf_ringcp.ring.allgather import AllGatherRing, build
from hf_ringcp.ring.allgather_prefix import AllGatherPrefix, applies, preferred
from hf_ringcp.ring.blocks import Kernels
from hf_ringcp.ring.comm import GatherComm, LoopbackGatherComm
from hf_ringcp.ring.kernels import BACKENDS, aligns_bottom_right, bottom_right_mask, default_scale
from hf_ringcp.ring.layout import Layout
from hf_ringcp.ring.plan import MaskSpec
from hf_ringcp.ring.variant import RankSetup, RingAttentionFunction
from tests.distributed import run_ranks
from tests.ring.reference import reference_attention, rel_error


def _setup(rank: int, world: int, layout: str, seq: int, backend: str, mask: MaskSpec | None = None) -> RankSetup:
    placement = Layout.for_name(layout, world).placement(seq)
    mask = mask or MaskSpec(causal=True, documents=placement.documents)
    return RankSetup(rank, world, placement, mask, Kernels(BACKENDS[backend]), default_scale(16))


def test_bottom_right_mask() -> None:
    mask = bottom_right_mask(2, 4, torch.float32, "cpu")
    assert torch.equal(mask == 0, torch.tensor([[True, True, True, False], [True, True, True, True]]))
    # The CPU kernels align top-left: the prefix variant gives them the mask, and the dispatch keeps the planned path.
    assert not aligns_bottom_right(BACKENDS["cpu_flash"], "cpu") and aligns_bottom_right(BACKENDS["flash"], "cuda")
    setup = _setup(0, 2, "zigzag", 16, "cpu_flash")
    assert applies(setup) and not preferred(setup, "cpu") and isinstance(build(setup, None), AllGatherRing)


@pytest.mark.parametrize("mask", [MaskSpec(causal=False), MaskSpec(window=4), MaskSpec(documents=(0, 8, 16))])
def test_applies_only_to_one_causal_prefix(mask: MaskSpec) -> None:
    assert not applies(_setup(0, 2, "zigzag", 16, "cpu_flash", mask))
    assert not applies(_setup(0, 2, "striped", 16, "cpu_flash"))
    with pytest.raises(AssertionError, match="stride-1"):
        AllGatherPrefix(_setup(0, 2, "striped", 16, "cpu_flash"), None)


@pytest.mark.parametrize("layout", ["zigzag", "zigzag_global", "contiguous"])
@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
def test_every_rank_matches_the_planned_allgather(layout: str, backend: str) -> None:
    """All ranks in one process (loopback gather): out, LSE and dQ equal the planned variant's and the reference."""
    world, b, hq, hkv, seq, d = 4, 2, 4, 2, 64, 16
    # The CPU flash kernel takes a float32 LSE only (what the ring passes it), so it runs in float32.
    dtype = torch.float64 if backend == "math" else torch.float32
    tol = 1e-5  # the planned path merges in float32
    g = torch.Generator().manual_seed(5)
    q, dout = (torch.randn(b, hq, seq, d, generator=g, dtype=dtype) for _ in range(2))
    k, v = (torch.randn(b, hkv, seq, d, generator=g, dtype=dtype) for _ in range(2))
    placement = Layout.for_name(layout, world).placement(seq)
    pos = [placement.positions(r) for r in range(world)]
    local = [[x[:, :, p] for p in pos] for x in (q, k, v, dout)]
    gathered = torch.stack([torch.stack([local[1][r], local[2][r]]) for r in range(world)])
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*full, causal=True)
    ref.backward(dout)
    for r in range(world):
        setup = _setup(r, world, layout, seq, backend)
        comm = lambda r=r: LoopbackGatherComm(r, gathered)
        new, old = AllGatherPrefix(setup, comm), AllGatherRing(setup, comm)
        qr, kr, vr, dr = (x[r] for x in local)
        (out, lse), (out0, lse0) = new.attend(qr, kr, vr), old.attend(qr, kr, vr)
        dq = new.attend_backward(dr, qr, kr, vr, out, lse)[0]
        dq0 = old.attend_backward(dr, qr, kr, vr, out0, lse0)[0]
        assert rel_error(out, out0) < tol and rel_error(lse, lse0) < tol and rel_error(dq, dq0) < tol
        assert rel_error(out, ref[:, :, pos[r]]) < tol and rel_error(dq, full[0].grad[:, :, pos[r]]) < tol
        assert len(new.segments) == len(setup.own) <= 2  # one call per segment (zigzag: 2, its middle rank 1)


def _gloo_case(rank: int, world: int, layout: str, dtype) -> dict:
    g = torch.Generator().manual_seed(11)
    b, hq, hkv, seq, d = 2, 4, 2, 8 * world, 16
    q, dout = (torch.randn(b, hq, seq, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(b, hkv, seq, d, generator=g, dtype=torch.float64) for _ in range(2))
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*full, causal=True)
    ref.backward(dout)
    setup = _setup(rank, world, layout, seq, "cpu_flash")
    errors = {}
    for name, cls in (("prefix", AllGatherPrefix), ("planned", AllGatherRing)):
        local = [shard_sequence(x, 2, layout=layout).to(dtype).requires_grad_() for x in (q, k, v)]
        out = RingAttentionFunction.apply(*local, cls(setup, lambda: GatherComm(None)))
        out.backward(shard_sequence(dout, 2, layout=layout).to(dtype))
        errors[name] = {"out": rel_error(unshard_sequence(out.detach(), 2, layout=layout), ref)}
        for grad_name, x, ref_x in zip(("dq", "dk", "dv"), local, full):
            errors[name][grad_name] = rel_error(unshard_sequence(x.grad, 2, layout=layout), ref_x.grad)
        errors[name]["raw"] = [out.detach(), *(x.grad for x in local)]
    errors["same"] = max(rel_error(a, b) for a, b in zip(errors["prefix"].pop("raw"), errors["planned"].pop("raw")))
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gloo_ranks_match_the_planned_allgather_and_the_reference(dtype) -> None:
    """Two gloo ranks, zigzag: out, dQ, dK, dV of the prefix variant against the reference and the planned path."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for errors in run_ranks(_gloo_case, 2, "zigzag", dtype):
        for name in ("prefix", "planned"):
            assert max(errors[name].values()) < tol, errors
        assert errors["same"] < tol, errors
