"""The block planner: every visible (query, key) pair exactly once, hidden blocks skipped, few calls.

Checked against a brute-force mask over global indices for every layout, rank-major buffers, packed documents,
sliding windows and striped segments.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from hf_ringcp.ring.layout import Layout
from hf_ringcp.ring.plan import BlockCall, MaskSpec, Segment, plan_calls


def _indices(segments: tuple[Segment, ...]) -> torch.Tensor:
    """Global index of every local row (``-1`` for rows no segment covers)."""
    n = max(s.stop_row for s in segments)
    out = torch.full((n,), -1, dtype=torch.int64)
    for s in segments:
        out[s.row : s.stop_row] = s.indices()
    return out


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, mask: MaskSpec) -> torch.Tensor:
    """Brute force: ``[len(q_pos), len(k_pos)]`` bool of the pairs the mask lets through."""
    qp, kp = q_pos[:, None], k_pos[None, :]
    ok = (qp >= 0) & (kp >= 0)
    if mask.causal:
        ok &= kp <= qp
    if mask.window is not None:
        ok &= qp - kp < mask.window
    if mask.documents is not None:
        bounds = torch.tensor(mask.documents)
        doc = lambda x: torch.bucketize(x, bounds, right=True)
        ok &= doc(qp) == doc(kp)
    return ok


def _coverage(calls: tuple[BlockCall, ...], nq: int, nk: int) -> torch.Tensor:
    """How often each (local query row, buffer row) pair is computed by the calls."""
    seen = torch.zeros(nq, nk, dtype=torch.int64)
    for c in calls:
        m = torch.ones(c.q_end - c.q_start, c.kv_end - c.kv_start, dtype=torch.bool)
        if c.kind == "causal":
            assert m.shape[0] == m.shape[1], "causal calls must be square"
            m = m.tril()
        elif c.kind == "band":
            m = c.band_mask()
        seen[c.q, c.kv] += m.long()
    return seen


def _assert_exact(q: tuple[Segment, ...], kv: tuple[Segment, ...], mask: MaskSpec) -> tuple[BlockCall, ...]:
    calls = plan_calls(q, kv, mask)
    q_pos, k_pos = _indices(q), _indices(kv)
    expected = _visible(q_pos, k_pos, mask).long()
    got = _coverage(calls, len(q_pos), len(k_pos))
    assert torch.equal(got, expected), f"plan {calls} for q={q} kv={kv} {mask}"
    for c in calls:  # no call computes rows or keys it does not need
        assert c.q_end > c.q_start and c.kv_end > c.kv_start
    return calls


@pytest.mark.parametrize("layout", ["zigzag", "zigzag_global", "contiguous", "striped"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_steps_cover_each_visible_pair_once(layout: str, world: int, causal: bool) -> None:
    seq = 4 * world * 3
    placement = Layout.for_name(layout, world).placement(seq)
    mask = MaskSpec(causal=causal)
    for rank in range(world):
        q = placement.segments(rank)
        total = torch.zeros(len(_indices(q)), seq, dtype=torch.int64)
        for src in range(world):
            kv = placement.segments(src)
            calls = _assert_exact(q, kv, mask)
            cover = _coverage(calls, len(_indices(q)), len(_indices(kv)))
            total[:, _indices(kv)] += cover
        expected = _visible(_indices(q), torch.arange(seq), mask).long()
        assert torch.equal(total, expected)


def test_zigzag_steps_make_one_call_each() -> None:
    world, chunk = 4, 8
    placement = Layout.for_name("zigzag", world).placement(2 * world * chunk)
    for rank, src in itertools.product(range(world), range(world)):
        calls = plan_calls(placement.segments(rank), placement.segments(src), MaskSpec())
        assert len(calls) == 1
        (call,) = calls
        if src == rank:
            assert call.causal and (call.q_start, call.q_end, call.kv_start, call.kv_end) == (0, 16, 0, 16)
        elif src < rank:  # both query chunks see the source's head chunk only
            assert (call.q_start, call.q_end, call.kv_start, call.kv_end) == (0, 16, 0, 8)
        else:  # only the tail query chunk sees anything, and it sees both source chunks
            assert (call.q_start, call.q_end, call.kv_start, call.kv_end) == (8, 16, 0, 16)


def test_contiguous_hidden_blocks_are_skipped() -> None:
    placement = Layout.for_name("contiguous", 2).placement(8)
    assert plan_calls(placement.segments(0), placement.segments(1), MaskSpec()) == ()
    assert len(plan_calls(placement.segments(0), placement.segments(1), MaskSpec(causal=False))) == 1


def test_allgather_plan_with_own_chunks_skipped() -> None:
    world, rank = 4, 1
    placement = Layout.for_name("zigzag", world).placement(16)
    mine = placement.segments(rank)
    rest = placement.gathered(exclude=rank)
    calls = _assert_exact(mine, rest, MaskSpec())
    assert len(calls) == 2  # head chunks of both query chunks together, then the tail chunk's remainder
    own = plan_calls(mine, mine, MaskSpec())
    seen = torch.zeros(len(_indices(mine)), 16, dtype=torch.int64)
    seen[:, _indices(rest)] += _coverage(calls, 4, 16)[:, _indices(rest)]
    seen[:, _indices(mine)] += _coverage(own, 4, 4)
    assert torch.equal(seen, _visible(_indices(mine), torch.arange(16), MaskSpec()).long())


def test_rank_major_buffer_is_exact() -> None:
    # A rank-major gathered zigzag buffer holds chunks (0, 7, 1, 6, 2, 5, 3, 4): no causal square may span
    # chunks whose order differs from the sequence's.
    placement = Layout.for_name("zigzag", 4).placement(16)
    buffer = placement.gathered(global_order=False)
    calls = _assert_exact(buffer, buffer, MaskSpec())
    assert not any(c.causal and c.q_end - c.q_start > 4 for c in calls)


def test_striped_blocks_are_shifted_causal_squares() -> None:
    world, n = 4, 6
    placement = Layout.for_name("striped", world).placement(world * n)
    for rank, src in itertools.product(range(world), range(world)):
        (call,) = _assert_exact(placement.segments(rank), placement.segments(src), MaskSpec())
        assert call.causal
        if src <= rank:  # key i of the source precedes query i: the diagonal is visible
            assert (call.q_start, call.q_end, call.kv_start, call.kv_end) == (0, n, 0, n)
        else:  # strictly lower: query row i sees keys before row i only
            assert (call.q_start, call.q_end, call.kv_start, call.kv_end) == (1, n, 0, n - 1)


def _random_documents(rng: random.Random, seq: int, unit: int) -> tuple[int, ...]:
    cuts = sorted(rng.sample(range(1, seq // unit), rng.randint(0, min(5, seq // unit - 1))))
    return (0, *(c * unit for c in cuts), seq)


@pytest.mark.parametrize("layout", ["zigzag", "zigzag_global", "contiguous", "striped"])
def test_documents_and_windows_are_exact(layout: str) -> None:
    rng = random.Random(layout)
    for world in (1, 2, 3, 4):
        split = Layout.for_name(layout, world)
        for _ in range(6):
            seq = split.divisor * rng.randint(2, 5)
            unit = split.divisor if split.per_document else 1
            docs = _random_documents(rng, seq, unit)
            placement = split.placement(seq, docs)
            for window in (None, 1, 3, rng.randint(1, seq)):
                mask = MaskSpec(documents=placement.documents, window=window)
                for rank, src in itertools.product(range(world), range(world)):
                    _assert_exact(placement.segments(rank), placement.segments(src), mask)
                if world > 1 and placement.segments(0)[0].stride == 1:
                    _assert_exact(placement.segments(0), placement.gathered(exclude=0), mask)
                _assert_exact(placement.gathered(global_order=False), placement.gathered(global_order=False), mask)


def test_documents_skip_cross_document_blocks() -> None:
    # Two documents of 8 tokens, each split head-tail over 2 ranks: no call spans the two documents.
    placement = Layout.for_name("zigzag", 2).placement(16, [0, 8, 16])
    for rank, src in itertools.product(range(2), range(2)):
        calls = _assert_exact(placement.segments(rank), placement.segments(src), MaskSpec(documents=(0, 8, 16)))
        for c in calls:
            assert (c.q_end <= 4 and c.kv_end <= 4) or (c.q_start >= 4 and c.kv_start >= 4)
        if rank == src:  # one causal square per document
            assert [c.kind for c in calls] == ["causal", "causal"]


def test_window_edges_are_masked_and_the_rest_is_not() -> None:
    # 32 tokens, window 8, contiguous over 4 ranks of 8: rank 2 sees rank 1's block through a band only.
    placement = Layout.for_name("contiguous", 4).placement(32)
    mask = MaskSpec(window=8)
    assert plan_calls(placement.segments(2), placement.segments(0), mask) == ()  # too far back: skipped
    (band,) = _assert_exact(placement.segments(2), placement.segments(1), mask)
    assert band.kind == "band"
    own = _assert_exact(placement.segments(2), placement.segments(2), mask)
    assert [c.kind for c in own] == ["causal"]  # within the window: no mask
    wide = plan_calls(placement.segments(2), placement.segments(1), MaskSpec(window=32))
    assert [c.kind for c in wide] == ["full"]


def test_bad_masks_are_refused() -> None:
    with pytest.raises(ValueError, match="`window` must be a positive int"):
        MaskSpec(window=0)
    with pytest.raises(ValueError, match="needs causal attention"):
        MaskSpec(causal=False, window=4)
