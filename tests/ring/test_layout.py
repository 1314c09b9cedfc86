"""Layouts: round trips, positions and the divisibility errors."""

from __future__ import annotations

import pytest
import torch

from hf_ringcp.ring import local_positions, shard_sequence, unshard_sequence
from hf_ringcp.ring.layout import Layout, rank_major_order
from tests.distributed import run_ranks


def test_zigzag_positions_are_head_and_tail() -> None:
    assert local_positions(16, "zigzag", 1, 4).tolist() == [2, 3, 12, 13]
    assert local_positions(16, "contiguous", 1, 4).tolist() == [4, 5, 6, 7]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_cover_the_sequence_once(layout: str, world: int) -> None:
    order = rank_major_order(24, layout, world)
    assert sorted(order.tolist()) == list(range(24))


def _round_trip(rank: int, world: int) -> list[str]:
    problems = []
    for layout in ("zigzag", "contiguous"):
        for dim in (0, 1, -1):
            x = torch.randn(2 * 4 * world, 2 * 4 * world, 2 * 4 * world, generator=torch.Generator().manual_seed(7))
            local = shard_sequence(x, dim, layout=layout)
            expected_positions = local_positions(x.shape[dim], layout, rank, world)
            if not torch.equal(local, x.index_select(dim, expected_positions)):
                problems.append(f"shard {layout} dim={dim}")
            if not torch.equal(unshard_sequence(local, dim, layout=layout), x):
                problems.append(f"round trip {layout} dim={dim}")
    return problems


@pytest.mark.parametrize("world", [2, 3])
def test_unshard_inverts_shard(world: int) -> None:
    assert run_ranks(_round_trip, world) == [[]] * world


def test_single_process_round_trip() -> None:
    x = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(unshard_sequence(shard_sequence(x, 1), 1), x)


def _divisibility_error(rank: int, world: int) -> str:
    with pytest.raises(ValueError, match=r"divisible by 2 \* cp_size = 4") as info:
        shard_sequence(torch.zeros(1, 6), 1, layout="zigzag")
    with pytest.raises(ValueError, match=r"divisible by cp_size = 2"):
        shard_sequence(torch.zeros(1, 5), 1, layout="contiguous")
    return str(info.value)


def test_sequence_not_divisible_names_the_fix() -> None:
    messages = run_ranks(_divisibility_error, 2)
    assert "Pad the sequence" in messages[0]


def test_unknown_layout() -> None:
    with pytest.raises(ValueError, match="`layout` must be one of"):
        shard_sequence(torch.zeros(4), 0, layout="diagonal")


def test_document_spans_pad_each_document_or_stretch_the_last() -> None:
    assert Layout.for_name("zigzag", 2).document_spans([1, 5, 4]) == [4, 8, 4]  # each to a multiple of 2P
    assert Layout.for_name("contiguous", 2).document_spans([1, 4]) == [1, 5]  # the total to a multiple of P
    assert Layout.for_name("contiguous", 3).document_spans([3, 3]) == [3, 3]
    assert Layout.for_name("contiguous", 2).document_spans([]) == []
