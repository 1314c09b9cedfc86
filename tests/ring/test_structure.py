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
    world = 2
    steps = {"p2p": world, "allgather": 2, "ulysses": 1}  # ring steps per rank
    failures = []
    for rank, counts in enumerate(run_ranks(_all_counts, world)):
        for layout, comm in itertools.product(LAYOUTS, COMMS):
            (few, few_kernels), (many, many_kernels) = counts[(layout, comm, 4)], counts[(layout, comm, 64)]
            print(f"rank {rank} {layout:13s} {comm:9s} ops {few:5d} -> {many:5d} ({many / few:.2f}x), "
                  f"kernel calls {few_kernels} -> {many_kernels}")
            if many > 1.5 * few:
                failures.append(f"rank {rank} {layout} {comm}: {few} ops with 4 documents, {many} with 64")
            if max(few_kernels, many_kernels) > 2 * 2 * steps[comm]:  # forward and backward, two per step
                failures.append(f"rank {rank} {layout} {comm}: {few_kernels}/{many_kernels} kernel calls for "
                                f"{steps[comm]} steps")
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
