"""Host work on packed rows does not grow with the number of documents.

A rank's ``ring_attention`` forward + backward is counted op by op (a ``TorchDispatchMode`` sees every aten op
and the c10d ops a rank dispatches) for rows of the same length holding 4 and 64 documents: the count may not grow
with the documents (at most 1.5x at 16x the documents), for every layout and comm. The kernel calls are counted
too: at most two per ring step (one on the CPU, where one call under a mask covers a step), and the launch plans
of every layout, comm and rank hold at most two calls per step.
"""

from __future__ import annotations

import collections
import itertools
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_ringcp.ring import LAYOUTS, Layout, MaskSpec, ring_attention, shard_sequence
from hf_ringcp.ring.plan import plan_calls, step_launches
from tests.distributed import run_ranks

KERNELS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
SEQ = 4096
COMMS = ("p2p", "allgather", "ulysses")


class CountOps(TorchDispatchMode):
    """Counts the ops dispatched while active, by name (``aten._foo.default`` -> ``_foo``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.ops.items() if name in KERNELS)


def packed_row(layout: str, world: int, n_docs: int, seq: int = SEQ, seed: int = 0) -> list[int]:
    """``cu_seqlens`` of ``n_docs`` documents of uneven lengths filling ``seq`` tokens (each a multiple of the
    layout's per-document divisor)."""
    split = Layout.for_name(layout, world)
    unit = split.divisor if split.per_document else 1
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, seq // unit), n_docs - 1))
    return [0, *(c * unit for c in cuts), seq]


def _ring_steps(world: int, layout: str, comm: str, docs: list[int]) -> int:
    """Steps a rank runs: ``layout="balanced"`` runs no ring at all when no document travels (then the row with
    fewer documents does less work, which is not host work growing with the documents)."""
    placement = Layout.for_name(layout, world).placement(SEQ, docs)
    if comm == "ulysses" or placement.travelling(MaskSpec(True, placement.documents)).nothing:
        return 1
    return world if comm == "p2p" else 2


def _count(rank: int, world: int, layout: str, comm: str, docs: list[int]) -> tuple[int, int]:
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(1, h, SEQ, 8, generator=g) for h in (4, 2, 2, 4))
    shard = lambda x: shard_sequence(x, 2, layout=layout, cu_seqlens=docs)
    local = [shard(x).requires_grad_() for x in (q, k, v)]
    grad = shard(dout)

    def step() -> None:
        ring_attention(*local, layout=layout, comm=comm, cu_seqlens=docs).backward(grad)

    step()  # the first call builds the batch's plans
    with CountOps() as counter:
        step()
    return sum(counter.ops.values()), counter.kernels


def _all_counts(rank: int, world: int) -> dict:
    return {(layout, comm, n): _count(rank, world, layout, comm, packed_row(layout, world, n))
            for layout, comm, n in itertools.product(LAYOUTS, COMMS, (4, 64))}


def test_ops_per_rank_do_not_grow_with_documents() -> None:
    """The busiest rank's ops per ring step, 4 vs 64 documents (the busiest: ``balanced`` gives the ranks
    different pieces, so one rank may see no remote row in one row and some in another)."""
    world = 2
    failures = []
    per_rank = run_ranks(_all_counts, world)
    for layout, comm in itertools.product(LAYOUTS, COMMS):
        steps = {n: _ring_steps(world, layout, comm, packed_row(layout, world, n)) for n in (4, 64)}
        busiest = {n: max(counts[(layout, comm, n)][0] for counts in per_rank) / steps[n] for n in (4, 64)}
        print(f"{layout:13s} {comm:9s} ops per step (busiest rank) {busiest[4]:7.1f} -> {busiest[64]:7.1f} "
              f"({busiest[64] / busiest[4]:.2f}x), steps {steps[4]} -> {steps[64]}")
        if busiest[64] > 1.5 * busiest[4]:
            failures.append(f"{layout} {comm}: {busiest[4]:.0f} ops per step with 4 documents, {busiest[64]:.0f} "
                            "with 64")
        for rank, counts in enumerate(per_rank):
            for n in (4, 64):
                if counts[(layout, comm, n)][1] > 2 * 2 * steps[n]:  # forward and backward, two per step
                    failures.append(f"rank {rank} {layout} {comm}: {counts[(layout, comm, n)][1]} kernel calls for "
                                    f"{steps[n]} steps ({n} documents)")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["varlen", "masked"])
def test_every_step_is_at_most_two_launches(layout: str, mode: str) -> None:
    """The launch plans themselves (what the CUDA varlen path runs too): p2p steps, the all-gather's own and
    gathered steps, Ulysses groups; 64 uneven documents, P = 2, 4, 8."""
    for world in (2, 4, 8):
        placement = Layout.for_name(layout, world).placement(SEQ, packed_row(layout, world, 64, seed=world))
        mask = MaskSpec(documents=placement.documents)
        for rank in range(world):
            own = placement.segments(rank)
            buffers = [placement.segments(src) for src in range(world)]
            global_order = all(s.stride == 1 for s in own)
            buffers.append(placement.gathered(exclude=rank, global_order=global_order))
            for kv in buffers:
                calls = plan_calls(own, kv, mask)
                launches = step_launches(calls, mode)
                assert len(launches) <= 2, (world, rank, launches)
                if mode == "masked" and len(calls) > 2:  # one call under a mask covers the step
                    assert len(launches) == 1, (world, rank, launches)


@pytest.mark.parametrize("layout", ["zigzag_global", "contiguous", "striped"])
def test_one_token_documents_join_the_causal_launch(layout: str) -> None:
    """A one-token document's 1x1 block (planned as unmasked) runs inside the step's causal varlen launch, not as a
    dense call of its own (found on an H100: 96 short documents with one of length 1 cost a dense call per step)."""
    lengths = [7, 1, 12, 30, 1, 9]
    bounds = torch.tensor([0, *itertools.accumulate(lengths)])
    placement = Layout.for_name(layout, 1).placement(int(bounds[-1]), bounds)
    own = placement.segments(0)
    calls = plan_calls(own, own, MaskSpec(documents=placement.documents))
    assert any(c.kind == "full" and c.q_end - c.q_start == 1 for c in calls)
    launches = step_launches(calls, "varlen")
    assert [la.kind for la in launches] == ["varlen"] and launches[0].causal, launches
    assert len(launches[0].calls) == len(lengths)


@pytest.mark.parametrize("world", [4, 8, 16])
def test_balanced_steps_read_their_queries_as_views(world: int) -> None:
    """On CUDA a ``balanced`` rank's p2p launches read their query rows as views, never gathered copies (the rows
    are ordered for it: ``layout._rows_order``; the launches split into runs: ``plan.runs``): lognormal rows of
    short documents at 32K, several draws. Query rows are the expensive side (copied three times in the backward,
    dQ summed by index, four times the heads of a Llama K/V row)."""
    from benchmarks.packing import document_lengths, pack
    from hf_ringcp.ring.blocks import Kernels
    from hf_ringcp.ring.kernels import BACKENDS
    from hf_ringcp.ring.p2p import P2PRing
    from hf_ringcp.ring.variant import RankSetup
    from hf_ringcp.ring.varlen import build_schedule

    kernels = Kernels(BACKENDS["math"], BACKENDS["math"])  # not run: the plans only
    for seed in range(3):
        row = pack(document_lengths("lognormal", 32768, seed), "balanced", world)
        placement = Layout.for_name("balanced", world).placement(row.seq_len, row.cu_seqlens)
        mask = MaskSpec(True, placement.documents)
        for rank in range(world):
            p2p = P2PRing(RankSetup(rank, world, placement, mask, kernels, scale=1.0), None, None)
            schedule = build_schedule(p2p.steps(placement.local_len), "varlen", placement.local_len, "cpu",
                                      torch.bfloat16)
            gathered = [la for step in (schedule.steps if schedule else ()) for la in step
                        if not isinstance(la.q_rows, slice)]
            assert not gathered, (seed, rank, [la.calls for la in gathered][:2])
