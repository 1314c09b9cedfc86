"""The block planner: every visible (query, key) pair exactly once, hidden blocks skipped, few calls."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_ringcp.ring.layout import num_chunks, rank_chunks
from hf_ringcp.ring.plan import plan_block


def _coverage(calls, q_chunks, kv_chunks, chunk_len, n):
    """Count how often each (global query position, global key position) pair is computed."""
    q_pos = torch.cat([torch.arange(c * chunk_len, (c + 1) * chunk_len) for c in q_chunks])
    kv_pos = torch.cat([torch.arange(c * chunk_len, (c + 1) * chunk_len) for c in kv_chunks])
    seen = torch.zeros(n, n, dtype=torch.int64)
    for c in calls:
        rows, cols = q_pos[c.q], kv_pos[c.kv]
        mask = torch.ones(len(rows), len(cols), dtype=torch.bool)
        if c.causal:
            assert len(rows) == len(cols), "causal calls must be square"
            mask = mask.tril()
        seen[rows[:, None].expand_as(mask)[mask], cols[None, :].expand_as(mask)[mask]] += 1
    return seen, q_pos, kv_pos


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_ring_steps_cover_each_visible_pair_once(layout: str, world: int, causal: bool) -> None:
    chunk_len = 2
    n = num_chunks(layout, world) * chunk_len
    for rank in range(world):
        q_chunks = rank_chunks(layout, rank, world)
        total = torch.zeros(n, n, dtype=torch.int64)
        for src in range(world):
            kv_chunks = rank_chunks(layout, src, world)
            total += _coverage(plan_block(q_chunks, kv_chunks, chunk_len, causal), q_chunks, kv_chunks, chunk_len, n)[0]
        q_pos = torch.cat([torch.arange(c * chunk_len, (c + 1) * chunk_len) for c in q_chunks])
        expected = torch.ones(n, n, dtype=torch.int64)
        if causal:
            expected = expected.tril()
        assert torch.equal(total[q_pos], expected[q_pos])


def test_zigzag_steps_make_one_call_each() -> None:
    world = 4
    for rank, src in itertools.product(range(world), range(world)):
        calls = plan_block(rank_chunks("zigzag", rank, world), rank_chunks("zigzag", src, world), 8, True)
        assert len(calls) == 1
        (call,) = calls
        if src == rank:
            assert call.causal and (call.q_start, call.q_end, call.kv_start, call.kv_end) == (0, 16, 0, 16)
        elif src < rank:  # both query chunks see the source's head chunk only
            assert (call.q_start, call.q_end, call.kv_start, call.kv_end) == (0, 16, 0, 8)
        else:  # only the tail query chunk sees anything, and it sees both source chunks
            assert (call.q_start, call.q_end, call.kv_start, call.kv_end) == (8, 16, 0, 16)


def test_contiguous_hidden_blocks_are_skipped() -> None:
    assert plan_block((0,), (1,), 4, causal=True) == []
    assert len(plan_block((0,), (1,), 4, causal=False)) == 1


def test_allgather_plan_with_own_chunks_skipped() -> None:
    world, rank, chunk_len = 4, 1, 2
    mine = rank_chunks("zigzag", rank, world)
    everything = tuple(range(2 * world))
    calls = plan_block(mine, everything, chunk_len, True, skip_kv=frozenset(mine))
    assert len(calls) == 2  # head chunks of both query chunks together, then the tail chunk's remainder
    seen, _, _ = _coverage(calls, mine, everything, chunk_len, 16)
    own = plan_block(mine, mine, chunk_len, True)
    seen += _coverage(own, mine, mine, chunk_len, 16)[0]
    q_pos = torch.cat([torch.arange(c * chunk_len, (c + 1) * chunk_len) for c in mine])
    assert torch.equal(seen[q_pos], torch.ones(16, 16, dtype=torch.int64).tril()[q_pos])
