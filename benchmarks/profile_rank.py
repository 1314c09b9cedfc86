"""Where one simulated rank's time goes: a ``torch.profiler`` table of one rank's ring forward+backward.

For a packed row (``benchmarks/packing.py``) or one document, a layout, a comm and a backend, the script builds the
ranks as :mod:`benchmarks.ring_sim` does, warms the rank up (the batch's plans exist), then profiles
``--iters`` runs of the busiest rank and prints the CUDA kernels and the host ops by total time, the rank's wall
time per run and the sum of its kernel times (the gap is the GPU waiting for the host). Results go to
``benchmarks/results/<name>.md`` with the device and versions.

Usage (one GPU; ~20 s per configuration)::

    PYTHONPATH=$PWD python benchmarks/profile_rank.py --dist lognormal --layouts balanced zigzag \
        --comms p2p allgather --backend flash --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import env_info, write_results
from benchmarks.packing import DISTRIBUTIONS, REFERENCE_LEN, document_lengths, pack
from benchmarks.ring_sim import Ranks, _inputs, _kernels, packed_ranks, run_rank
from hf_ringcp.ring.kernels import default_scale
from hf_ringcp.ring.layout import LAYOUTS


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile_config(ranks: Ranks, comm: str, backend: str, scale: float, iters: int, top: int) -> str:
    """The profile of the slowest rank of ``ranks`` as a markdown section."""
    kernels = _kernels(backend, "default")
    walls = []
    for r in range(ranks.world):
        variant = ranks.variant(r, comm, kernels, scale)
        run_rank(ranks, r, variant)
        _sync()
        start = time.perf_counter()
        for _ in range(iters):
            run_rank(ranks, r, variant)
        _sync()
        walls.append((time.perf_counter() - start) * 1e3 / iters)
    r = max(range(ranks.world), key=walls.__getitem__)
    variant = ranks.variant(r, comm, kernels, scale)
    run_rank(ranks, r, variant)
    _sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in range(iters):
            run_rank(ranks, r, variant)
        _sync()
    events = prof.key_averages()
    device_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    kernel_ms = sum(getattr(e, device_key) for e in events if e.device_type.name != "CPU" or
                    not torch.cuda.is_available()) / 1e3 / iters
    table_dev = events.table(sort_by=device_key, row_limit=top) if torch.cuda.is_available() else ""
    table_cpu = events.table(sort_by="self_cpu_time_total", row_limit=top)
    return (f"rank walls ms: {[round(w, 2) for w in walls]}; profiled rank {r}: wall {walls[r]:.2f} ms per run, "
            f"device-time sum {kernel_ms:.2f} ms per run\n\n```\n{table_dev}\n{table_cpu}\n```\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dist", choices=DISTRIBUTIONS, default="lognormal")
    parser.add_argument("--seqlen", type=int, default=None, help="real tokens of the row (default 128K on CUDA)")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--layouts", nargs="+", default=["balanced"], choices=LAYOUTS)
    parser.add_argument("--comms", nargs="+", default=["p2p"], choices=["p2p", "allgather"])
    parser.add_argument("--backend", default="flash")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--name", default="profile_rank")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    total = args.seqlen or (REFERENCE_LEN if cuda else 2048)
    hq, hkv, d = (32, 8, 128) if cuda else (4, 2, 32)
    lengths = document_lengths(args.dist, total, 0)
    q, k, v, dout = _inputs(1, total, (hq, hkv, hkv, hq), d, device, total)
    info = env_info()
    info.update(dist=args.dist, seqlen=total, world=args.world, backend=args.backend, docs=len(lengths))
    sections = []
    for layout in args.layouts:
        placed = pack(lengths, layout, args.world)
        ranks = packed_ranks((q, k, v, dout), placed, placed.real_index(device))
        for comm in args.comms:
            text = profile_config(ranks, comm, args.backend, default_scale(d), args.iters, args.top)
            head = f"## {args.dist} {total} P={args.world} {args.backend} {layout} {comm}"
            print(head + "\n" + text, flush=True)
            sections.append(head + "\n\n" + text)
    write_results(args.name, info, [], "\n".join(sections), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
