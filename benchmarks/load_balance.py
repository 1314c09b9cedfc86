"""Attention work per rank for each layout on packed rows: how evenly the ring spreads causal attention (CPU only).

For every world size ``P``, document-length distribution (``one``, ``lognormal``, ``mixed``; see
:mod:`benchmarks.packing`) and layout (``zigzag``: every document split head-tail on its own, padded to a multiple
of ``2P``; ``zigzag_global``: head-tail over the whole row; ``balanced``: short documents whole on one rank, long
ones zigzagged; ``contiguous``; ``striped``), the row is placed with
:meth:`hf_ringcp.ring.Layout.placement` and every rank's block calls are taken from the ring's own variant objects
(:class:`~hf_ringcp.ring.p2p.P2PRing` ``step_calls`` for every ring step, and
:class:`~hf_ringcp.ring.allgather.AllGatherRing` ``own_calls`` + ``rest_calls``), i.e. exactly the plan
(:func:`hf_ringcp.ring.plan.plan_calls` under a causal :class:`~hf_ringcp.ring.plan.MaskSpec` with the row's
documents) the ring executes. A rank's *work* is the number of visible (query, key) pairs summed over all its
calls (a ``"full"`` call ``nq * nk``, a ``"causal"`` square ``n (n + 1) / 2``, a ``"band"`` call its band); the
p2p and all-gather plans must give every rank the same work, and the ranks together exactly the row's visible
pairs (both are checked). Columns:

- ``imbalance`` = max over ranks / mean over ranks of the work (1.0 is perfect; the slowest rank sets the pace);
- ``tokens``: max / mean over ranks of the real (non-padding) tokens a rank holds;
- ``kv_MiB``: bytes the busiest rank sends per layer for one K/V pass (forward; the backward sends as much K/V
  again plus float32 dK/dV) in p2p, for Llama-3-8B's K/V (8 heads x 128 x bf16, K and V: 4 KiB a token), from
  :meth:`~hf_ringcp.ring.layout.Placement.travelling` (what the ring sends); ``kv_vs_zigzag``: the same over
  ``zigzag``'s on that row; ``kv_ag_MiB``: the all-gather's (each rank's buffer padded to the largest);
- ``step_calls``: the most kernel launches of one rank in one ring step (p2p) on CUDA
  (:func:`hf_ringcp.ring.plan.step_launches` in ``"varlen"`` mode: what the ring launches);
- ``q_gather`` / ``kv_gather``: query and K/V rows the busiest rank's packed launches read by index (copies)
  instead of as views, per layer forward, in p2p (:func:`gathered_rows`; ``*_ag``: the all-gather's);
  ``views``: the smallest share of a rank's p2p launches that read both sides as views;
- ``pad``: padding tokens the layout adds (``zigzag``: each document to a multiple of ``2P``; the others only
  stretch the row to a multiple of the divisor); ``pad_work``: the share of the computed pairs that involve padding;
- ``bound`` = real pairs / (P * max rank work): the attention efficiency the split allows at best (per-call
  overheads and communication not counted), against one device attending to the real documents only;
- ``calls_p2p`` / ``calls_ag``: block calls of the busiest rank (forward; the backward makes as many), a proxy of
  the launch overhead that many short documents cost.

Usage::

    PYTHONPATH=$PWD python benchmarks/load_balance.py [--worlds 4 8 16] [--seqlen 131072] [--out benchmarks/results]

Runs in seconds on a CPU: the plan works on segments, not tokens, so no reduced token unit is needed at 128K.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import env_info, markdown_table, write_results
from benchmarks.packing import DISTRIBUTIONS, REFERENCE_LEN, document_lengths, pack
from hf_ringcp.ring.allgather import AllGatherRing
from hf_ringcp.ring.blocks import Kernels
from hf_ringcp.ring.kernels import BACKENDS
from hf_ringcp.ring.layout import Layout
from hf_ringcp.ring.p2p import P2PRing
from hf_ringcp.ring.plan import INF, BlockCall, MaskSpec, step_launches
from hf_ringcp.ring.variant import RankSetup
from hf_ringcp.ring.varlen import build_schedule

LAYOUTS = ("zigzag", "zigzag_global", "balanced", "contiguous", "striped")
#: Bytes of one token's K and V in Llama-3-8B (8 K/V heads x head_dim 128 x bf16, twice).
KV_ROW_BYTES = 2 * 8 * 128 * 2


def visible_pairs(c: BlockCall) -> int:
    """The (query, key) pairs a block call computes that the mask lets through."""
    nq, nk = c.q_end - c.q_start, c.kv_end - c.kv_start
    if c.kind == "full":
        return nq * nk
    if c.kind == "causal":
        if nq != nk:
            raise AssertionError(f"a causal call must be square: {c}")
        return nq * (nq + 1) // 2
    i = torch.arange(nq, dtype=torch.int64)  # row i sees columns j with lo <= i - j < hi
    first = (i - (c.hi - 1 if c.hi < INF else nq + nk)).clamp(min=0)
    last = (i - (c.lo if c.lo > -INF else -(nq + nk))).clamp(max=nk - 1)
    return int((last - first + 1).clamp(min=0).sum())


def rank_work(layout: str, world: int, lengths: list[int], window: int | None = None) -> dict:
    """Work, calls and padding of every rank for one packed row (see the module docstring)."""
    row = pack(lengths, layout, world)
    placement = Layout.for_name(layout, world).placement(row.seq_len, row.cu_seqlens)
    mask = MaskSpec(causal=True, documents=placement.documents, window=window)
    kernels = Kernels(BACKENDS["math"], BACKENDS["math"])  # not run: the plans only
    work, calls_p2p, calls_ag, step_calls, real_tokens, gathered = [], [], [], [], [], []
    is_real = torch.zeros(row.seq_len, dtype=torch.bool)
    is_real[row.real_index()] = True
    travel = placement.travelling(mask)
    for r in range(world):
        real_tokens.append(int(is_real[placement.positions(r)].sum()))
        setup = RankSetup(r, world, placement, mask, kernels, scale=1.0)
        p2p = P2PRing(setup, None, None)
        steps = [p2p.step_calls(s) for s in range(world)]
        gather = AllGatherRing(setup, None)
        ag = (*gather.own_calls, *gather.rest_calls)
        pairs = sum(visible_pairs(c) for calls in steps for c in calls)
        if pairs != sum(visible_pairs(c) for c in ag):
            raise AssertionError(f"{layout} P={world} rank {r}: p2p and all-gather plans differ in work")
        work.append(pairs)
        calls_p2p.append(sum(len(calls) for calls in steps))
        step_calls += [len(step_launches(calls, "varlen")) for calls in steps]
        gathered.append((*gathered_rows(p2p, placement.local_len), *gathered_rows(gather, placement.local_len)))
        calls_ag.append(len(ag))
    expected = row.row_pairs() if window is None else None
    if expected is not None and sum(work) != expected:
        raise AssertionError(f"{layout} P={world}: the ranks compute {sum(work)} pairs, the row has {expected}")
    real = row.real_pairs()
    return {
        "S_row": row.seq_len, "pad": row.padding, "work": work, "calls_p2p": max(calls_p2p), "calls_ag": max(calls_ag),
        "tokens": max(real_tokens) / statistics.mean(real_tokens), "step_calls": max(step_calls),
        "kv_MiB": max(travel.bytes_sent(r, KV_ROW_BYTES) for r in range(world)) / 2**20,
        "kv_ag_MiB": max(travel.bytes_sent(r, KV_ROW_BYTES, "allgather") for r in range(world)) / 2**20,
        "imbalance": max(work) / statistics.mean(work), "pad_work": 1 - real / sum(work) if window is None else None,
        "bound": real / (world * max(work)) if window is None else None,
        "segments": max(len(placement.segments(r)) for r in range(world)),
        "q_gather": max(g[0] for g in gathered), "kv_gather": max(g[1] for g in gathered),
        "views": min(g[2] for g in gathered),
        "q_gather_ag": max(g[3] for g in gathered), "kv_gather_ag": max(g[4] for g in gathered),
    }


def gathered_rows(variant: P2PRing | AllGatherRing, local_len: int) -> tuple[int, int, float]:
    """Rows a rank's packed launches read by index instead of as views, per layer forward: ``(query rows,
    K/V rows, share of the launches that read both sides as views)``. The backward gathers the same query rows
    three times (queries, outputs, output gradients) and adds dQ / dK / dV by index over the same rows: the memory
    passes of ``benchmarks/profile_rank.py``, counted from the schedule the ring runs on CUDA (varlen launches)."""
    schedule = build_schedule(variant.steps(local_len), "varlen", local_len, "cpu", torch.bfloat16)
    if schedule is None:  # every step is at most two calls, on row slices
        return 0, 0, 1.0
    launches = [la for step in schedule.steps for la in step]
    count = lambda rows: 0 if isinstance(rows, slice) else rows.numel()
    q = sum(count(la.q_rows) for la in launches)
    kv = sum(count(la.kv_rows) for la in launches)
    views = sum(isinstance(la.q_rows, slice) and isinstance(la.kv_rows, slice) for la in launches)
    return q, kv, round(views / len(launches), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--seqlen", type=int, default=REFERENCE_LEN, help="real tokens per packed row")
    parser.add_argument("--distributions", nargs="+", default=list(DISTRIBUTIONS), choices=DISTRIBUTIONS)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the document lengths")
    parser.add_argument("--name", default="load_balance", help="result file stem")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    info = env_info()
    info.update(seqlen=args.seqlen, seed=args.seed)
    rows = []
    for world in args.worlds:
        for dist_name in args.distributions:
            lengths = document_lengths(dist_name, args.seqlen, args.seed)
            for layout in args.layouts:
                t0 = time.perf_counter()
                row = {"P": world, "dist": dist_name, "docs": len(lengths), "layout": layout}
                try:
                    row.update(rank_work(layout, world, lengths))
                except ValueError as e:  # a layout that cannot split this row
                    row["error"] = str(e).splitlines()[0][:160]
                row["plan_s"] = round(time.perf_counter() - t0, 2)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "work"}), flush=True)

    for r in rows:
        zig = next((z for z in rows if z["P"] == r["P"] and z["dist"] == r["dist"] and z["layout"] == "zigzag"), None)
        if zig is not None and "kv_MiB" in r and zig.get("kv_MiB"):
            r["kv_vs_zigzag"] = r["kv_MiB"] / zig["kv_MiB"]
    best = []
    for world in args.worlds:
        for dist_name in args.distributions:
            group = [r for r in rows if r["P"] == world and r["dist"] == dist_name and "bound" in r]
            if group:
                top = max(group, key=lambda r: r["bound"])
                best.append({"P": world, "dist": dist_name, "best_layout": top["layout"],
                             "imbalance": top["imbalance"], "bound": top["bound"], "pad": top["pad"]})
    columns = ["P", "dist", "docs", "layout", "tokens", "imbalance", "kv_MiB", "kv_vs_zigzag", "kv_ag_MiB",
               "step_calls", "q_gather", "kv_gather", "views", "q_gather_ag", "kv_gather_ag", "bound", "pad",
               "pad_work", "S_row", "segments", "calls_p2p", "calls_ag", "error"]
    table = markdown_table(rows, columns)
    best_table = markdown_table(best, ["P", "dist", "best_layout", "imbalance", "bound", "pad"])
    info["seconds"] = round(time.perf_counter() - start, 1)
    note = (
        f"Packed rows of {args.seqlen} real tokens (benchmarks/packing.py; seed {args.seed}). Work of a rank = visible "
        "(query, key) pairs over all the block calls of its plan (P2PRing.step_calls of every step; the all-gather "
        "plan gives the same per rank, checked), computed exactly at token granularity. imbalance = max / mean rank "
        "work; bound = real pairs / (P * max rank work); pad = padding tokens the layout adds; pad_work = share of the "
        "computed pairs that involve padding; calls_* = block calls of the busiest rank (forward); tokens = max / "
        "mean real tokens of a rank; kv_MiB = K/V bytes the busiest rank sends per layer in p2p (forward, Llama-3-8B "
        "K/V: 4 KiB a token), kv_vs_zigzag = over zigzag's, kv_ag_MiB = the all-gather's; step_calls = most kernel "
        "launches of a rank in one p2p ring step (CUDA); q_gather / kv_gather = query / K/V rows its packed launches "
        "gather by index per layer forward (the rest are views); views = share of launches reading views only."
    )
    per_rank = "\n".join(f"- P={r['P']} {r['dist']} {r['layout']}: {r['work']}" for r in rows if "work" in r)
    md = f"{note}\n\n{table}\n\nBest layout per row (highest bound):\n\n{best_table}\n\nWork per rank:\n\n{per_rank}"
    path = write_results(args.name, info, rows, md, args.out)
    print(table)
    print()
    print(best_table)
    print(f"wrote {path} ({info['seconds']} s)")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
