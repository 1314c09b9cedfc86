"""layout="balanced": placement contract, exact attention against each document alone, and what travels."""

from __future__ import annotations

import itertools
import statistics

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_ringcp.ring import LAYOUTS, Layout, ring_attention, shard_sequence, unshard_sequence
from hf_ringcp.ring.layout import _pairs, balanced_pieces
from hf_ringcp.ring.plan import MaskSpec
from tests.distributed import run_ranks
from tests.ring.reference import documents_reference, rel_error

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _work(placement, rank: int) -> int:
    docs = placement.documents or (0, placement.seq_len)
    total = 0
    for s in placement.segments(rank):
        a = s.start
        while a < s.stop:
            d = max(i for i in range(len(docs) - 1) if docs[i] <= a)
            b = min(s.stop, docs[d + 1])
            total += _pairs(a - docs[d], b - docs[d])
            a = b
    return total


def _bounds(lengths: list[int]) -> list[int]:
    return [0, *itertools.accumulate(lengths)]


def test_balanced_is_a_layout() -> None:
    assert "balanced" in LAYOUTS and "balanced" in Layout.names()
    assert Layout.for_name("balanced", 3).divisor == 6
    assert Layout.for_name("balanced", 2).document_spans([1, 5, 4]) == [1, 5, 6]  # only the total is padded


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_one_document_is_zigzag(world: int) -> None:
    s = 2 * world * 5
    assert Layout.for_name("balanced", world).placement(s).ranks == Layout.for_name("zigzag", world).placement(s).ranks
    one = Layout.for_name("balanced", world).placement(s, [0, s]).ranks
    assert one == Layout.for_name("zigzag", world).placement(s).ranks


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("lengths", [[1, 3, 11, 20, 2, 7, 4], [40, 1, 1, 2], [6] * 8, [1] * 24, [13, 5, 9, 3, 2, 16]])
def test_placement_covers_the_row_with_equal_tokens(world: int, lengths: list[int]) -> None:
    split = Layout.for_name("balanced", world)
    bounds = _bounds(split.document_spans(lengths))
    placement = split.placement(bounds[-1], bounds)
    covered = sorted(torch.cat([placement.positions(r) for r in range(world)]).tolist())
    assert covered == list(range(bounds[-1]))
    assert {len(placement.positions(r)) for r in range(world)} == {bounds[-1] // world}
    owner = torch.empty(bounds[-1], dtype=torch.long)
    for r in range(world):
        owner[placement.positions(r)] = r
    doc_of = torch.bucketize(torch.arange(bounds[-1]), torch.tensor(bounds[1:]), right=True)
    for r in range(world):  # the rows that see another rank's keys are one run: a step's queries read as a view
        pos = placement.positions(r)
        sees = [i for i, p in enumerate(pos) if bool(((doc_of[: int(p)] == doc_of[p]) & (owner[: int(p)] != r)).any())]
        assert sees == list(range(sees[0], sees[0] + len(sees))) if sees else True, (r, pos.tolist(), sees)


def test_documents_that_fit_stay_home_and_nothing_travels() -> None:
    world, lengths = 4, [64] * 16  # 4 documents per rank, no long one
    bounds = _bounds(lengths)
    placement = Layout.for_name("balanced", world).placement(bounds[-1], bounds)
    travel = placement.travelling(MaskSpec(True, placement.documents))
    assert travel.nothing and travel.bytes_sent(0, 1) == 0
    works = [_work(placement, r) for r in range(world)]
    assert max(works) == min(works)


@pytest.mark.parametrize("world", [8, 16])
def test_lognormal_rows_balance_tokens_and_work(world: int) -> None:
    from benchmarks.packing import document_lengths

    lengths = document_lengths("lognormal", 32768, seed=0)
    split = Layout.for_name("balanced", world)
    bounds = _bounds(split.document_spans(lengths))
    placement = split.placement(bounds[-1], bounds)
    works = [_work(placement, r) for r in range(world)]
    assert max(works) / statistics.mean(works) <= 1.05
    assert balanced_pieces.cache_info().currsize >= 1


# ------------------------------------------------------------------------------------------------- parity

HEADS = (4, 2)


def _row(world: int, kind: str) -> tuple[list[tuple[int, int]], list[int], int]:
    """Real documents, the cu_seqlens the ring gets, S: documents of length 1, longer than a rank's share, ..."""
    split = Layout.for_name("balanced", world)
    lengths = {"mixed": [1, 3, 2 * world + 3, 9 * world, 2, 7, 1, 5],
               "short": [3, 5, 2, 6, 4, 4, 1, 7] * world, "one": [6 * world]}[kind]
    spans = split.document_spans(lengths)
    real, bounds, cursor = [], [0], 0
    for span in spans:
        real.append((cursor, cursor + span))  # the stretched last document is attended as a whole
        cursor += span
        bounds.append(cursor)
    return real, bounds, cursor


def _errors(rank: int, world: int, kind: str, comm: str, window, dtype, ulysses_size: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    hq, hkv = HEADS
    real, bounds, s = _row(world, kind)
    q, k, v, dout = (torch.randn(1, h, s, 8, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    full = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = documents_reference(*full, real, window=window)
    ref.backward(dout)
    shard = lambda x: shard_sequence(x, 2, layout="balanced", cu_seqlens=bounds)
    unshard = lambda x: unshard_sequence(x, 2, layout="balanced", cu_seqlens=bounds)
    local = [shard(x).to(dtype).requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, layout="balanced", comm=comm, cu_seqlens=bounds, window=window,
                         ulysses_size=ulysses_size)
    out.backward(shard(dout).to(dtype))
    errors = {"out": rel_error(unshard(out.detach()), ref)}
    for name, x, ref_x in zip(("dq", "dk", "dv"), local, full):
        errors[name] = rel_error(unshard(x.grad), ref_x.grad)
    return errors


def _cases(rank: int, world: int) -> list[str]:
    comms = [("p2p", 1), ("allgather", 1)] + ([("ulysses", 1)] if world in (2, 4) else [])
    comms += [("p2p", 2), ("allgather", 2)] if world == 4 else []
    failures = []
    cases = itertools.product(("mixed", "short", "one"), comms, (None, 5), TOLERANCE)
    for i, (kind, (comm, u), window, dtype) in enumerate(cases):
        errors = _errors(rank, world, kind, comm, window, dtype, u, seed=i)
        bad = {n: e for n, e in errors.items() if not e <= TOLERANCE[dtype]}
        if bad:
            failures.append(f"rank {rank} {kind} {comm} u={u} window={window} {dtype}: {bad}")
    return failures


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_balanced_matches_each_document_alone(world: int) -> None:
    failures = [f for per_rank in run_ranks(_cases, world) for f in per_rank]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------ what travels


class _SentBytes(TorchDispatchMode):
    """Bytes this rank hands to c10d send / all-gather / reduce-scatter ops (the tensors the dispatcher sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("c10d::") and any(w in name for w in ("send", "allgather", "all_gather", "reduce_scatter")):
            tensors = [t for a in args for t in (a if isinstance(a, (list, tuple)) else [a]) if torch.is_tensor(t)]
            # all-gather: the input is the last tensor argument; send: the only one.
            sent = tensors[-1] if tensors else None
            if sent is not None:
                self.sent[name] = self.sent.get(name, 0) + sent.numel() * sent.element_size()
        return func(*args, **(kwargs or {}))


def _bytes(rank: int, world: int, layout: str, comm: str, lengths: list[int]) -> dict[str, int]:
    split = Layout.for_name(layout, world)
    bounds = _bounds(split.document_spans(lengths))
    q, k, v = (torch.randn(1, 2, bounds[-1], 8, generator=torch.Generator().manual_seed(0)) for _ in range(3))
    local = [shard_sequence(x, 2, layout=layout, cu_seqlens=bounds).requires_grad_() for x in (q, k, v)]
    with _SentBytes() as counter:
        ring_attention(*local, layout=layout, comm=comm, cu_seqlens=bounds).sum().backward()
    return counter.sent


SHORT = [6, 10, 4, 12, 8, 8, 2, 14] * 2  # 32 tokens a rank on 2 ranks, none long: nothing travels
WITH_LONG = [40, *SHORT]  # one document longer than a rank's share travels


def _all_bytes(rank: int, world: int) -> dict:
    return {(comm, layout, name): sum(_bytes(rank, world, layout, comm, lengths).values())
            for comm in ("p2p", "allgather") for layout in ("zigzag", "balanced")
            for name, lengths in (("short", SHORT), ("long", WITH_LONG))}


def test_balanced_sends_only_split_documents() -> None:
    per_rank = run_ranks(_all_bytes, 2)
    total = {key: sum(r[key] for r in per_rank) for key in per_rank[0]}
    for comm in ("p2p", "allgather"):
        assert total[comm, "zigzag", "short"] > 0 and total[comm, "zigzag", "long"] > 0
        assert total[comm, "balanced", "short"] == 0, comm
        assert 0 < total[comm, "balanced", "long"] <= 0.75 * total[comm, "zigzag", "long"], comm
