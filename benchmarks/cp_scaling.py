"""Weak scaling of causal ring attention on real ranks: hf_ringcp against torch's experimental context parallel.

    torchrun --standalone --nproc_per_node P benchmarks/cp_scaling.py [--tokens-per-rank 16384] \\
        [--p1-json benchmarks/results/cp_scaling_p1_<device>_<date>.json] [--out benchmarks/results]

Every rank holds ``--tokens-per-rank`` tokens of one causal sequence of ``S = P * tokens_per_rank`` tokens
(zigzag layout; Llama-3-8B attention by default: 32 query / 8 KV heads, head dim 128, bf16, batch 1, inputs as
``[B, H, S_local, D]`` views of ``[B, S_local, H, D]`` memory as Hugging Face passes them). Rows:

- ``single``: one device's causal forward + backward over ``tokens_per_rank`` tokens with each kernel (the faster
  of the kernel's own op and ``F.scaled_dot_product_attention``), run on every rank at once: the P = 1 workload.
- ``hf_ringcp``: ``ring_attention`` forward + backward for each comm (``p2p``, ``allgather``) and backend.
  ``compute_ms`` is the same rank's work with no communication (its variant object with the loopback
  communicators of ``hf_ringcp.ring.comm``, as in ``benchmarks/ring_sim.py``, which hand it local buffers of the
  right shape); ``exposed_ms = ms - compute_ms`` (slowest rank of each) is the communication the ring did not
  hide.
- ``torch_cp``: ``torch.distributed.tensor.experimental.context_parallel`` around
  ``F.scaled_dot_product_attention`` with ``set_rotate_method("allgather" | "alltoall")`` and an SDPA backend,
  on the same local tensors (its head-tail load balancer is the zigzag layout; ``vs_hf_err`` checks that both
  compute the same output). CUDA only: on CPU the rows say ``skipped: CPU``.

``ms``: the slowest rank's median of ``--iters`` timed runs after ``--warmup`` (CUDA events; host clock on CPU).
``tflops_per_gpu = 7*B*Hq*S^2*D / P / ms`` (causal FLOPs, docs/performance.md). ``weak_eff = P * t1 / ms``: per-GPU
TFLOP/s against the P = 1 run of the same kernel (``t1``: ``--p1-json`` or ``--p1-ms`` when given, else the
``single`` rows of this run). Each rank's attention work grows as ``P`` at a fixed number of tokens per rank, so
ideal weak scaling is ``ms = P * t1``. Rank 0 writes ``cp_scaling_p<P>_<device>_<date>.md/.json``; the exit code is
1 when a row failed (skipped rows do not count).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (torchrun): make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks.common import (
    DTYPES,
    attention_flops,
    cuda_time_ms,
    env_info,
    init_distributed,
    markdown_table,
    write_results,
)
from benchmarks.ring_sim import SDPA_BACKENDS, time_full
from hf_ringcp.ring import Layout, MaskSpec, ring_attention, select_backend
from hf_ringcp.ring.allgather import AllGatherRing
from hf_ringcp.ring.blocks import Kernels
from hf_ringcp.ring.comm import LoopbackGatherComm, LoopbackRingComm
from hf_ringcp.ring.group import all_gather_single
from hf_ringcp.ring.kernels import BACKENDS, Backend
from hf_ringcp.ring.p2p import P2PRing
from hf_ringcp.ring.variant import RankSetup

LAYOUT = "zigzag"


def all_ranks(value: float, device: torch.device) -> list[float]:
    """Every rank's ``value``, by rank."""
    mine = torch.tensor([float(value)], dtype=torch.float64, device=device)
    out = torch.empty(dist.get_world_size(), dtype=torch.float64, device=device)
    all_gather_single(out, mine)
    return out.tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


class Inputs:
    """This rank's ``q, k, v, dout``: ``[B, H, S_local, D]`` views of ``[B, S_local, H, D]`` memory."""

    def __init__(self, args, device: torch.device, rank: int) -> None:
        dtype = DTYPES[args.dtype]
        (hq, hkv), b, d, n = args.heads, args.batch, args.head_dim, args.tokens_per_rank
        gen = torch.Generator(device=device).manual_seed(1234 + rank)
        mem = [torch.randn(b, n, h, d, generator=gen, device=device, dtype=dtype) for h in (hq, hkv, hkv, hq)]
        self.leaves = [x.requires_grad_() for x in mem[:3]]
        self.q, self.k, self.v = (x.transpose(1, 2) for x in self.leaves)
        self.dout = mem[3].transpose(1, 2)
        self.scale = 1.0 / math.sqrt(d)

    def detached(self) -> tuple[torch.Tensor, ...]:
        return self.q.detach(), self.k.detach(), self.v.detach(), self.dout

    def clear_grads(self) -> None:
        for x in self.leaves:
            x.grad = None


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative max-norm error ``max|x - ref| / max|ref|`` (in float64)."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def compute_only_fn(x: Inputs, rank: int, world: int, comm: str, backend: Backend):
    """A callable running this rank's ring forward + backward with no communication.

    The rank's real variant object (:class:`~hf_ringcp.ring.p2p.P2PRing` or
    :class:`~hf_ringcp.ring.allgather.AllGatherRing` from its :class:`~hf_ringcp.ring.variant.RankSetup`, as
    ``ring_attention`` builds it) with the in-process loopback communicators of :mod:`hf_ringcp.ring.comm`, which
    hand back local buffers of the right shape.
    """
    q, k, v, dout = x.detached()
    kv = torch.stack([k, v])  # what the ring sends; the stand-ins hand it back as "the other ranks' K/V"
    dkv = torch.zeros_like(kv, dtype=torch.float32)
    gathered = kv.unsqueeze(0).expand(world, *kv.shape).contiguous()
    placement = Layout.for_name(LAYOUT, world).placement(q.shape[2] * world)
    setup = RankSetup(rank, world, placement, MaskSpec(causal=True), Kernels(backend), x.scale)
    if comm == "p2p":
        variant = P2PRing(setup, lambda: LoopbackRingComm(lambda i: kv), lambda: LoopbackRingComm(lambda i: dkv))
    else:
        variant = AllGatherRing(setup, lambda: LoopbackGatherComm(rank, gathered))

    def run():
        out, lse = variant.attend(q, k, v)
        variant.attend_backward(dout, q, k, v, out, lse)

    return run


def torch_cp_run(args, x: Inputs, mesh, rotate: str, sdpa_backend: str, timing: tuple[int, int, int]):
    """Time torch's context parallel SDPA; returns ``(ms, output, note)``. CUDA only."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import sdpa_kernel

    set_rotate_method(rotate)
    world = mesh.size()
    groups = args.heads[0] // args.heads[1]
    # context_parallel shards (and afterwards restores) the buffers it is given, and decides its load balancing
    # from the first one's length: a global-length marker makes it use the head-tail (= zigzag) layout while
    # the attention inputs are already this rank's zigzag shards.
    marker = torch.zeros(1, world * args.tokens_per_rank, device=x.q.device)
    notes = []
    with context_parallel(mesh, buffers=[marker], buffer_seq_dims=[1]), sdpa_kernel([SDPA_BACKENDS[sdpa_backend]]):
        for gqa in ("native", "repeat"):

            def attend(q, k, v, gqa=gqa):
                if gqa == "repeat":
                    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
                # Looked up at call time: context_parallel swaps F.scaled_dot_product_attention.
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=x.scale,
                                                      enable_gqa=gqa == "native" and groups > 1)

            def step(attend=attend):
                x.clear_grads()
                attend(x.q, x.k, x.v).backward(x.dout)

            try:
                step()
                ok = 1.0
            except (RuntimeError, NotImplementedError, AssertionError, ValueError) as e:
                ok, error = 0.0, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            if min(all_ranks(ok, x.q.device)) == 1.0:
                with torch.no_grad():
                    out = attend(*x.detached()[:3])
                ms = cuda_time_ms(step, *timing)[0]
                if gqa == "repeat":
                    notes.append("K/V repeated to Hq heads (native GQA failed)")
                return ms, out, "; ".join(notes)
            notes.append(f"GQA {gqa} failed on some rank" + (f" ({error})" if ok == 0.0 else ""))
            _sync(x.q.device)
    raise RuntimeError("; ".join(notes))


def load_p1(args) -> dict[str, float]:
    """P = 1 reference times by kernel from ``--p1-json`` (a cp_scaling P=1 result) and ``--p1-ms``."""
    ref: dict[str, float] = {}
    if args.p1_json:
        rows = json.loads(Path(args.p1_json).read_text())["rows"]
        for r in rows:
            if r.get("impl") == "single" and r.get("P") == 1 and r.get("ms"):
                ref[r["kernel"]] = float(r["ms"])
    for item in args.p1_ms or []:
        kernel, _, ms = item.partition("=")
        ref[kernel] = float(ms)
    return ref


COLUMNS = ["impl", "P", "S", "tokens_per_rank", "comm", "backend", "kernel", "ms", "compute_ms", "exposed_ms",
           "exposed_pct", "tflops_per_gpu", "weak_eff", "t1_ms", "peak_gib", "vs_hf_err", "result", "note"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens-per-rank", type=int, default=16384)
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--comms", nargs="+", default=["p2p", "allgather"])
    parser.add_argument("--backends", nargs="+", default=["auto"],
                        help="hf_ringcp kernels (auto: cuDNN on Hopper); one that cannot run gives a skipped row")
    parser.add_argument("--torch-rotate", nargs="+", default=["allgather", "alltoall"],
                        choices=["allgather", "alltoall"])
    parser.add_argument("--torch-backends", nargs="+", default=["cudnn"], choices=sorted(SDPA_BACKENDS),
                        help="SDPA backends for torch's context parallel")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch context-parallel rows")
    parser.add_argument("--p1-json", default=None, help="a cp_scaling P=1 result .json: the weak-scaling reference")
    parser.add_argument("--p1-ms", nargs="*", metavar="KERNEL=MS", help="P=1 reference times, e.g. cudnn=14.2")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--inner", type=int, default=1, help="back-to-back runs per timed sample")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--timeout", type=float, default=600.0, help="process-group timeout in seconds")
    parser.add_argument("--name", default="cp_scaling", help="result file stem (the world size is appended)")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notices of torch
    device = init_distributed(args.device, args.timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    start = time.perf_counter()
    timing = (args.warmup, args.iters, args.inner)
    (hq, hkv), b, d, n = args.heads, args.batch, args.head_dim, args.tokens_per_rank
    s = n * world
    flops = attention_flops(b, hq, s, s, d, causal=True)
    x = Inputs(args, device, rank)
    base = {"P": world, "S": s, "tokens_per_rank": n}
    rows: list[dict[str, Any]] = []

    def finish(row: dict[str, Any], ms_per_rank: list[float]) -> None:
        row["rank_ms"] = [round(t, 3) for t in ms_per_rank]
        row["ms"] = max(ms_per_rank)
        row["tflops_per_gpu"] = flops / world / row["ms"] / 1e9
        row.setdefault("result", "ok")

    # Which kernels run here (the same answer on every rank: decided before any communication).
    kernels: dict[str, str | None] = {}
    skipped: dict[str, str] = {}
    for name in args.backends:
        try:
            kernels[name] = select_backend(name, x.q, x.k).name
        except ValueError as e:
            skipped[name] = f"skipped: {str(e).split(': ', 1)[-1].split('. Use')[0]}"
    torch_rows = not args.no_torch
    singles = sorted(set(kernels.values()) | (set(args.torch_backends) if torch_rows and device.type == "cuda"
                                              else set()))

    # ---- single device, the P = 1 workload, on every rank at once
    single_ms: dict[str, float] = {}
    for kernel in singles:
        q, k, v, dout = x.detached()
        full, _, _ = time_full(q, k, v, dout, BACKENDS[kernel], kernel, x.scale, args.warmup, args.iters)
        mine = min(t for key, t in full.items() if key.endswith("_ms"))
        per_rank = all_ranks(mine, device)
        single_ms[kernel] = statistics.median(per_rank)
        row = {"impl": "single", **base, "S": n, "comm": "-", "backend": kernel, "kernel": kernel,
               "rank_ms": [round(t, 3) for t in per_rank], "ms": single_ms[kernel],
               "tflops_per_gpu": attention_flops(b, hq, n, n, d, causal=True) / single_ms[kernel] / 1e9,
               "result": "ok", "note": "one device, S = tokens_per_rank, median over ranks"}
        if "sdpa_error" in full:
            row["note"] += "; F.sdpa not timed: " + full["sdpa_error"][:60]
        rows.append(row)
    _sync(device)

    # ---- hf_ringcp, with and without communication
    for comm in args.comms:
        for name in args.backends:
            row = {"impl": "hf_ringcp", **base, "comm": comm, "backend": name, "kernel": kernels.get(name)}
            if name in skipped:
                rows.append({**row, "result": skipped[name]})
                continue

            def step(comm=comm, name=name):
                x.clear_grads()
                ring_attention(x.q, x.k, x.v, causal=True, scale=x.scale, layout=LAYOUT, comm=comm,
                               backend=name).backward(x.dout)

            _reset_peak(device)
            _sync(device)
            ms = cuda_time_ms(step, *timing)[0]
            peak = _peak_gib(device)
            _sync(device)
            compute_ms = cuda_time_ms(compute_only_fn(x, rank, world, comm, BACKENDS[kernels[name]]), *timing)[0]
            finish(row, all_ranks(ms, device))
            row["rank_compute_ms"] = [round(t, 3) for t in all_ranks(compute_ms, device)]
            row["compute_ms"] = max(row["rank_compute_ms"])
            row["exposed_ms"] = row["ms"] - row["compute_ms"]
            row["exposed_pct"] = 100 * row["exposed_ms"] / row["ms"]
            if peak is not None:
                row["peak_gib"] = max(all_ranks(peak, device))
            rows.append(row)
    _sync(device)

    # ---- torch's experimental context parallel
    if torch_rows:
        if device.type != "cuda" or world == 1:
            why = "skipped: CPU (torch CP needs CUDA SDPA)" if device.type != "cuda" else "skipped: P=1"
            for rotate in args.torch_rotate:
                for name in args.torch_backends:
                    rows.append({"impl": "torch_cp", **base, "comm": rotate, "backend": name, "kernel": name,
                                 "result": why})
        else:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh("cuda", (world,), mesh_dim_names=("cp",))
            with torch.no_grad():
                hf_out = ring_attention(*x.detached()[:3], causal=True, scale=x.scale, layout=LAYOUT)
            for rotate in args.torch_rotate:
                for name in args.torch_backends:
                    row = {"impl": "torch_cp", **base, "comm": rotate, "backend": name, "kernel": name}
                    _reset_peak(device)
                    _sync(device)
                    try:
                        ms, out, note = torch_cp_run(args, x, mesh, rotate, name, timing)
                        finish(row, all_ranks(ms, device))
                        row["vs_hf_err"] = max(all_ranks(rel_error(out, hf_out), device))
                        row["peak_gib"] = max(all_ranks(_peak_gib(device), device))
                        if note:
                            row["note"] = note
                    except (RuntimeError, ImportError) as e:
                        row["result"] = "error"
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    rows.append(row)
                    _sync(device)

    # ---- weak scaling against P = 1
    p1 = load_p1(args)
    source = "given" if p1 else "this run's single rows"
    for kernel, ms in single_ms.items():
        p1.setdefault(kernel, ms)
    for row in rows:
        t1 = p1.get(row.get("kernel") or "")
        if t1 and row.get("ms"):
            row["t1_ms"] = t1
            row["weak_eff"] = (1 if row["impl"] == "single" else world) * t1 / row["ms"]

    failed = sum(row.get("result") == "error" for row in rows)
    if rank == 0:
        info = env_info()
        info.update(world_size=world, dist_backend=dist.get_backend(), args=vars(args), t1_source=source,
                    seconds=round(time.perf_counter() - start, 1))
        note = (
            f"S = P * tokens_per_rank = {s}, {hq} q / {hkv} kv heads, head dim {d}, batch {b}, {args.dtype}, causal, "
            f"zigzag. ms: slowest rank's median fwd+bwd; tflops_per_gpu = 7*B*Hq*S^2*D / P / ms; weak_eff = P * t1 / "
            f"ms (t1: P=1 time of the same kernel, from {source}); compute_ms: the same ring variant with "
            "communication replaced by local buffers (loopback comms), slowest rank; exposed_ms = ms - compute_ms "
            "(at P=1 that is the autograd wrapper's own overhead, the floor for P>1). "
            "torch_cp: torch.distributed.tensor.experimental.context_parallel, comm = its rotate method; vs_hf_err: "
            "its output against hf_ringcp's (max-norm relative, worst rank)."
        )
        ours = [r for r in rows if r["impl"] == "hf_ringcp" and r.get("ms")]
        theirs = [r for r in rows if r["impl"] == "torch_cp" and r.get("ms")]
        summary = ""
        if ours and theirs:
            best, rival = min(ours, key=lambda r: r["ms"]), min(theirs, key=lambda r: r["ms"])
            summary = (f"\n\nBest hf_ringcp ({best['comm']}, {best['kernel']}) {best['ms']:.2f} ms against best torch "
                       f"CP ({rival['comm']}, {rival['kernel']}) {rival['ms']:.2f} ms: "
                       f"{rival['ms'] / best['ms']:.2f}x.")
        table = markdown_table(rows, COLUMNS)
        path = write_results(f"{args.name}_p{world}", info, rows, f"{note}\n\n{table}{summary}", args.out)
        print(table + summary)
        print(f"scaling P={world} ({dist.get_backend()}, {device.type}): {len(rows)} rows, {failed} failed; "
              f"wrote {path}")
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
