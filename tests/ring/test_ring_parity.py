"""Ring attention on P gloo ranks equals single-process attention on the full sequence, forward and backward."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_ringcp.ring import ring_attention, shard_sequence, unshard_sequence
from tests.distributed import run_ranks
from tests.ring.reference import reference_attention, rel_error

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
HEADS = {"gqa": (8, 2), "mha": (4, 4)}


def _case_errors(rank: int, world: int, layout: str, comm: str, causal: bool, heads: str, dtype, seed: int):
    hq, hkv = HEADS[heads]
    g = torch.Generator().manual_seed(seed)
    b, s, d = 2, 8 * world, 16
    q = torch.randn(b, hq, s, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    dout = torch.randn(b, hq, s, d, generator=g, dtype=torch.float64)

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*full, causal=causal)
    ref.backward(dout)

    local = [shard_sequence(x, 2, layout=layout).to(dtype).requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, causal=causal, layout=layout, comm=comm)
    out.backward(shard_sequence(dout, 2, layout=layout).to(dtype))

    errors = {"out": rel_error(unshard_sequence(out.detach(), 2, layout=layout), ref)}
    for name, x, ref_x in zip(("dq", "dk", "dv"), local, full):
        errors[name] = rel_error(unshard_sequence(x.grad, 2, layout=layout), ref_x.grad)
    assert out.dtype == dtype and all(x.grad.dtype == dtype for x in local)
    return errors


def _all_cases(rank: int, world: int) -> dict:
    results = {}
    for i, case in enumerate(
        itertools.product(("zigzag", "contiguous"), ("p2p", "allgather"), (True, False), HEADS, TOLERANCE)
    ):
        results[case] = _case_errors(rank, world, *case, seed=1234 + i)
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_matches_full_attention(world: int) -> None:
    per_rank = run_ranks(_all_cases, world)
    failures = []
    for rank, results in enumerate(per_rank):
        for case, errors in results.items():
            limit = TOLERANCE[case[-1]]
            bad = {k: e for k, e in errors.items() if not e <= limit}
            if bad:
                failures.append(f"rank {rank} {case}: {bad} > {limit}")
    assert not failures, "\n".join(failures)


def test_single_process_without_process_group_equals_sdpa() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 12, 8, generator=g) for h in (6, 2, 2))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_error(ring_attention(q, k, v), expected) <= 1e-6
