"""Ring attention on P gloo ranks equals single-process attention on the full sequence, forward and backward.

Plain sequences for every layout and comm; packed documents (each checked against the document run alone) with
and without a sliding window.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_ringcp.ring import LAYOUTS, Layout, ring_attention, shard_sequence, unshard_sequence
from tests.distributed import run_ranks
from tests.ring.reference import documents_reference, reference_attention, rel_error

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
HEADS = {"gqa": (8, 2), "mha": (4, 4)}
COMMS = ("p2p", "allgather")


def _random(shape, g):
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _case_errors(rank: int, world: int, layout: str, comm: str, causal: bool, heads: str, dtype, seed: int,
                 backend: str = "auto", ulysses_size: int = 1):
    hq, hkv = HEADS[heads]
    g = torch.Generator().manual_seed(seed)
    b, s, d = 2, 8 * world, 16
    q, k, v, dout = _random((b, hq, s, d), g), _random((b, hkv, s, d), g), _random((b, hkv, s, d), g), _random(
        (b, hq, s, d), g)

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*full, causal=causal)
    ref.backward(dout)

    local = [shard_sequence(x, 2, layout=layout).to(dtype).requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, causal=causal, layout=layout, comm=comm, backend=backend, ulysses_size=ulysses_size)
    out.backward(shard_sequence(dout, 2, layout=layout).to(dtype))

    errors = {"out": rel_error(unshard_sequence(out.detach(), 2, layout=layout), ref)}
    for name, x, ref_x in zip(("dq", "dk", "dv"), local, full):
        errors[name] = rel_error(unshard_sequence(x.grad, 2, layout=layout), ref_x.grad)
    assert out.dtype == dtype and all(x.grad.dtype == dtype for x in local)
    return errors


def _all_cases(rank: int, world: int) -> dict:
    results = {}
    for i, case in enumerate(itertools.product(LAYOUTS, COMMS, (True, False), HEADS, TOLERANCE)):
        results[case] = _case_errors(rank, world, *case, seed=1234 + i)
    # Each CPU kernel by name, not only the one "auto" picks (cpu_flash), GQA and MHA.
    for i, (backend, heads) in enumerate(itertools.product(("cpu_flash", "math"), HEADS)):
        case = ("zigzag", COMMS[i % 2], True, heads, backend, torch.float32)
        results[case] = _case_errors(rank, world, "zigzag", COMMS[i % 2], True, heads, torch.float32, seed=7 + i,
                                     backend=backend)
    results.update(_ulysses_cases(rank, world))
    results.update(_document_cases(rank, world))
    return results


def _ulysses_cases(rank: int, world: int) -> dict:
    """Pure Ulysses (GQA with fewer K/V heads than ranks: repeated up to the group) and the hybrid Ulysses x ring."""
    results = {}
    if world not in (2, 4):
        return results
    pure = itertools.product(("zigzag", "contiguous", "striped"), (True, False), HEADS, TOLERANCE)
    for i, (layout, causal, heads, dtype) in enumerate(pure):
        results[(layout, "ulysses", causal, heads, dtype)] = _case_errors(
            rank, world, layout, "ulysses", causal, heads, dtype, seed=500 + i)
    if world == 4:
        hybrid = itertools.product(("zigzag", "contiguous"), COMMS, (True, False), TOLERANCE)
        for i, (layout, comm, causal, dtype) in enumerate(hybrid):
            case = (layout, f"{comm} x ulysses 2", causal, "gqa", dtype)
            results[case] = _case_errors(rank, world, layout, comm, causal, "gqa", dtype, seed=600 + i,
                                         ulysses_size=2)
    return results


def _failures(per_rank: list[dict]) -> list[str]:
    failures = []
    for rank, results in enumerate(per_rank):
        for case, errors in results.items():
            limit = TOLERANCE[case[-1]]
            bad = {k: e for k, e in errors.items() if not e <= limit}
            if bad:
                failures.append(f"rank {rank} {case}: {bad} > {limit}")
    return failures


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ring_matches_full_attention(world: int) -> None:
    """Plain sequences, every layout, comm and CPU kernel; packed documents against each document alone."""
    failures = _failures(run_ranks(_all_cases, world))
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------ packed documents


def _documents(layout: str, world: int) -> tuple[list[tuple[int, int]], list[int], int]:
    """Real documents ``[a, b)`` (lengths 1, 3, spanning several ranks, ...), the cu_seqlens the ring gets and S.

    Per-document layouts need every document padded to a multiple of ``2P``: the padding sits at the end of its
    document, so no real token sees it; global layouts get the documents as they are (the last one stretched to
    the divisor).
    """
    split = Layout.for_name(layout, world)
    lengths = [1, 3, 2 * world + 3, 5 * world, 2, 7]
    real, bounds, cursor = [], [0], 0
    for n, span in zip(lengths, split.document_spans(lengths)):
        # A global layout's stretched last document is all real here (its tokens are attended).
        real.append((cursor, cursor + (n if split.per_document else span)))
        cursor += span
        bounds.append(cursor)
    return real, bounds, cursor


def _document_errors(rank: int, world: int, layout: str, comm: str, window, dtype, single: bool, seed: int,
                     backend: str, ulysses_size: int = 1):
    g = torch.Generator().manual_seed(seed)
    hq, hkv = HEADS["gqa"]
    d = 16
    if single:
        s = Layout.for_name(layout, world).divisor * 3
        real, bounds = [(0, s)], [0, s]
    else:
        real, bounds, s = _documents(layout, world)
    q, k, v, dout = _random((1, hq, s, d), g), _random((1, hkv, s, d), g), _random((1, hkv, s, d), g), _random(
        (1, hq, s, d), g)
    is_real = torch.zeros(s, dtype=torch.bool)
    for a, b in real:
        is_real[a:b] = True
    dout[:, :, ~is_real] = 0  # padding feeds no loss

    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = documents_reference(*full, real, window=window)
    ref.backward(dout)

    shard = lambda x: shard_sequence(x, 2, layout=layout, cu_seqlens=bounds)
    unshard = lambda x: unshard_sequence(x, 2, layout=layout, cu_seqlens=bounds)
    local = [shard(x).to(dtype).requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, layout=layout, comm=comm, cu_seqlens=bounds, window=window, backend=backend,
                         ulysses_size=ulysses_size)
    out.backward(shard(dout).to(dtype))

    errors = {"out": rel_error(unshard(out.detach())[:, :, is_real], ref[:, :, is_real])}
    for name, x, ref_x in zip(("dq", "dk", "dv"), local, full):
        errors[name] = rel_error(unshard(x.grad), ref_x.grad)
    return errors


def _document_cases(rank: int, world: int) -> dict:
    """Packed documents (and one document) with and without a window; masked blocks by each CPU kernel."""
    results = {}
    comms = [(c, 1) for c in COMMS]
    if world in (2, 4):
        comms += [("ulysses", 1)] + ([("p2p", 2)] if world == 4 else [])
    cases = itertools.product(LAYOUTS, comms, (None, 2 * world + 1), TOLERANCE, (False, True))
    for i, (layout, (comm, u), window, dtype, single) in enumerate(cases):
        backend = ("cpu_flash", "math")[i % 2]
        case = ("documents", layout, comm, u, window, single, backend, dtype)
        results[case] = _document_errors(rank, world, layout, comm, window, dtype, single, 99 + i, backend, u)
    return results


def test_single_process_without_process_group_equals_sdpa() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 12, 8, generator=g) for h in (6, 2, 2))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_error(ring_attention(q, k, v), expected) <= 1e-6
