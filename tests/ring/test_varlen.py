"""Packed documents through the varlen path (many small calls as one variable-length call) are exact.

On CUDA the kernel is flash attention's varlen op (``tests/gpu``); here the same grouping, packing and by-index
merging run with :func:`hf_ringcp.ring.varlen.loop_varlen`, and every call is counted.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from hf_ringcp.ring.blocks import Kernels
from hf_ringcp.ring.kernels import BACKENDS
from hf_ringcp.ring.plan import BlockCall
from hf_ringcp.ring.varlen import group_calls, loop_varlen
from tests.distributed import run_ranks
from tests.ring.test_ring_parity import TOLERANCE, _document_errors


def _with_loop_varlen(calls: list):
    original = Kernels.choose

    def choose(name, q, k, needs_masks):
        kernels = original(name, q, k, needs_masks)
        varlen = loop_varlen(kernels.plain)
        counted = dataclasses.replace(varlen, forward=lambda *a: calls.append("fwd") or varlen.forward(*a),
                                      backward=lambda *a: calls.append("bwd") or varlen.backward(*a))
        return dataclasses.replace(kernels, varlen=counted)

    Kernels.choose = staticmethod(choose)


def _cases(rank: int, world: int) -> dict:
    calls: list[str] = []
    _with_loop_varlen(calls)
    results = {}
    for i, (layout, comm, window, dtype) in enumerate(
        (layout, comm, window, dtype) for layout in ("zigzag", "contiguous", "striped", "balanced")
        for comm in ("p2p", "allgather")
        for window in (None, 2 * world + 1) for dtype in TOLERANCE
    ):
        results[(layout, comm, window, dtype)] = _document_errors(rank, world, layout, comm, window, dtype, False,
                                                                   700 + i, "cpu_flash")
    results["calls"] = {"fwd": calls.count("fwd"), "bwd": calls.count("bwd")}
    return results


@pytest.mark.parametrize("world", [1, 2, 3])
def test_packed_documents_through_varlen_groups_are_exact(world: int) -> None:
    for rank, results in enumerate(run_ranks(_cases, world)):
        used = results.pop("calls")
        assert used["fwd"] > 0 and used["bwd"] > 0, f"rank {rank}: the varlen path never ran"
        for case, errors in results.items():
            limit = TOLERANCE[case[-1]]
            assert all(e <= limit for e in errors.values()), f"rank {rank} {case}: {errors} > {limit}"


def test_groups_have_one_kind_and_disjoint_query_rows() -> None:
    calls = [BlockCall(0, 4, 0, 4, "causal"), BlockCall(4, 8, 4, 8, "causal"), BlockCall(4, 8, 0, 4, "full"),
             BlockCall(2, 6, 0, 2, "full"), BlockCall(0, 3, 0, 3, "band", 0, 2)]
    groups, rest = group_calls(calls)
    assert rest == [calls[4]]  # masked blocks never go into a group
    for members in groups:
        assert len({c.kind for c in members}) == 1
        rows = sorted((c.q_start, c.q_end) for c in members)
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(rows))
    key = lambda c: (c.q_start, c.kv_start, c.kind)
    assert sorted((c for g in groups for c in g), key=key) == sorted(calls[:4], key=key)


def test_loop_varlen_matches_the_block_kernel() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, lse = loop_varlen(BACKENDS["math"]).forward(q, k, v, cu, cu, 5, 5, True, 0.3)
    assert out.shape == q.shape and lse.shape == (4, 9)


def test_packed_adds_copy_first_then_combine() -> None:
    from hf_ringcp.ring.blocks import OutputAccumulator, RowAccumulator
    from hf_ringcp.ring.merge import merge_into

    g = torch.Generator().manual_seed(1)
    acc = RowAccumulator(torch.full((1, 2, 10, 3), float("nan")))
    first = torch.randn(1, 2, 4, 3, generator=g)
    acc.add(slice(2, 6), first)  # rows 2..5 written once already
    packed = torch.randn(1, 2, 7, 3, generator=g)  # rows 4..6 then 0..3: overlapping the earlier write and itself
    acc.add_packed([(4, 7), (0, 4)], packed, overlapping=True)
    expected = torch.zeros(1, 2, 10, 3)
    expected[:, :, 2:6] += first
    expected[:, :, 4:7] += packed[:, :, :3]
    expected[:, :, 0:4] += packed[:, :, 3:]
    assert torch.allclose(acc.result(), expected)

    out = OutputAccumulator(torch.zeros(1, 2, 6, 3))
    o1, l1 = torch.randn(1, 2, 3, 3, generator=g), torch.randn(1, 2, 3, generator=g)
    out.add(slice(0, 3), o1, l1)
    o2, l2 = torch.randn(1, 2, 6, 3, generator=g), torch.randn(1, 2, 6, generator=g)
    out.add_packed([(3, 6), (0, 3)], o2, l2)  # rows 3..5 first written, rows 0..2 merged
    ref_o, ref_l = o1.clone(), l1.clone()
    merge_into(ref_o, ref_l, o2[:, :, 3:], l2[:, :, 3:])
    got_o, got_l = out.result(torch.float32)
    assert torch.allclose(got_o[:, :, :3], ref_o) and torch.allclose(got_l[:, :, :3], ref_l)
    assert torch.equal(got_o[:, :, 3:], o2[:, :, :3]) and torch.equal(got_l[:, :, 3:], l2[:, :, :3])
