"""Simulated ring attention: every rank's exact per-step work, run one rank after another on one GPU.

Each simulated rank runs the real per-rank functions of the ring (``p2p_forward``/``p2p_backward`` or
``allgather_forward``/``allgather_backward``: the same plan, block kernels, LSE merge and dK/dV accumulation as
on a real ring) with its communicator replaced by a stand-in that hands over the other ranks' K/V by indexing.
Communication therefore costs nothing here: the numbers are what a ring reaches when every transfer hides behind
compute (see docs/performance.md for the bytes each step must move and whether they hide).

For every configuration it reports each rank's forward+backward time (CUDA events, warm-up, median of several
runs), the efficiency ``T_full / P / max_r T_r`` against single-GPU causal attention over the whole sequence with
the same backend (``T_full`` = the faster of the backend's own kernels and ``F.scaled_dot_product_attention``),
per-GPU TFLOP/s with causal FLOPs ``7*B*Hq*S^2*D / P / max_r T_r``, and the kernels-only bound (the same block
kernel calls per rank with no merge or accumulation). The sim's output and dQ are checked against the
single-GPU run (dK/dV are not: the stand-in communicators do not carry them between ranks).

Usage::

    PYTHONPATH=$PWD python benchmarks/ring_sim.py --seqlens 32768 131072 --world 8 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import attention_flops, cuda_time_ms, env_info, markdown_table, write_results
from hf_ringcp.ring.allgather import _plans, allgather_backward, allgather_forward
from hf_ringcp.ring.kernels import BACKENDS, block_backward, block_forward, default_scale
from hf_ringcp.ring.layout import local_positions, rank_chunks
from hf_ringcp.ring.p2p import _step_calls, p2p_backward, p2p_forward

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


class SimRingComm:
    """Stands in for :class:`~hf_ringcp.ring.comm.RingComm` with the same one-in-flight rule.

    ``source(i)`` is the tensor this rank receives at its ``i``-th transfer (e.g. the K/V of rank ``r - i - 1``).
    """

    def __init__(self, source) -> None:
        self.source, self.count, self.pending = source, 0, False

    def send_recv(self, tensor: torch.Tensor, recv_buffer: torch.Tensor | None = None) -> torch.Tensor:
        if self.pending:
            raise RuntimeError("send_recv while a transfer is in flight")
        if not tensor.is_contiguous():
            raise ValueError("RingComm sends contiguous tensors only")
        received = self.source(self.count)
        if received.shape != tensor.shape or received.dtype != tensor.dtype:
            raise AssertionError(f"sim received {tuple(received.shape)} for a send of {tuple(tensor.shape)}")
        self.count += 1
        self.pending = True
        return received

    def wait(self) -> None:
        if not self.pending:
            raise RuntimeError("wait with no transfer in flight")
        self.pending = False


class _Done:
    def wait(self) -> None:
        pass


class SimGatherComm:
    """Stands in for :class:`~hf_ringcp.ring.allgather.GatherComm`: every rank's K/V are already stacked.

    ``reduce_scatter`` copies this rank's own part (the local memory traffic of the collective, not its sum).
    """

    def __init__(self, rank: int, gathered: torch.Tensor) -> None:
        self.rank, self.gathered = rank, gathered

    def start_gather(self, kv: torch.Tensor):
        if kv.shape != self.gathered.shape[1:]:
            raise AssertionError("sim gather shape mismatch")
        return self.gathered, _Done()

    def reduce_scatter(self, out: torch.Tensor, per_rank: torch.Tensor) -> None:
        out.copy_(per_rank[self.rank])


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x if x.stride() == ref.stride() else torch.empty_like(ref).copy_(x)


class Ranks:
    """The P ranks' local tensors for one sequence, layout and world size (``[B, S, H, D]`` memory, as HF)."""

    def __init__(self, q, k, v, dout, layout: str, world: int) -> None:
        seq = q.shape[2]
        self.layout, self.world = layout, world
        self.positions = [local_positions(seq, layout, r, world, device=q.device) for r in range(world)]

        def shard(x, r):  # x is a [B, H, S, D] view of [B, S, H, D] memory; keep that memory order
            return x.transpose(1, 2).index_select(1, self.positions[r]).transpose(1, 2)

        self.q = [shard(q, r) for r in range(world)]
        self.k = [shard(k, r) for r in range(world)]
        self.v = [shard(v, r) for r in range(world)]
        self.dout = [shard(dout, r) for r in range(world)]
        self.kv = [torch.stack([self.k[r], self.v[r]]) for r in range(world)]  # what each rank sends
        self.gathered = torch.stack(self.kv)
        self.full_kv = torch.stack([k, v])  # global order, for the kernels-only bound
        self.chunk_len = self.q[0].shape[2] // len(rank_chunks(layout, 0, world))


def run_rank(ranks: Ranks, r: int, comm: str, backend, scale: float, dkv_scratch: torch.Tensor):
    """Rank ``r``'s forward and backward exactly as the ring runs them; returns ``(out, lse, dq)``."""
    p = ranks.world
    q, k, v, dout = ranks.q[r], ranks.k[r], ranks.v[r], ranks.dout[r]
    if comm == "p2p":
        kv_in = lambda i: ranks.kv[(r - i - 1) % p]
        out, lse = p2p_forward(q, k, v, r, p, SimRingComm(kv_in), True, scale, ranks.layout, backend)
        dq, _, _ = p2p_backward(dout, q, k, v, out, lse, r, p, SimRingComm(kv_in), SimRingComm(lambda i: dkv_scratch),
                                True, scale, ranks.layout, backend)
    else:
        gather = SimGatherComm(r, ranks.gathered)
        out, lse = allgather_forward(q, k, v, r, p, gather, True, scale, ranks.layout, backend)
        dq, _, _ = allgather_backward(dout, q, k, v, out, lse, r, p, gather, True, scale, ranks.layout, backend)
    return out, lse, dq


def rank_kernel_calls(ranks: Ranks, r: int, comm: str):
    """``(calls, kv)`` pairs: the block kernel calls rank ``r`` makes and the K/V buffer each reads."""
    p, cl = ranks.world, ranks.chunk_len
    if comm == "p2p":
        return [(_step_calls(r, p, s, ranks.layout, cl, True), ranks.kv[(r - s) % p]) for s in range(p)]
    own, rest = _plans(r, p, ranks.layout, cl, True)
    return [(own, ranks.kv[r]), (rest, ranks.full_kv)]


def time_kernels_only(ranks: Ranks, r: int, comm: str, backend, scale: float, out, lse, warmup, iters,
                      inner) -> float:
    """The same block forward and backward calls with no merge, accumulation or reordering."""
    q, dout = ranks.q[r], _like(ranks.dout[r], ranks.q[r])
    out = _like(out, q)
    work = rank_kernel_calls(ranks, r, comm)

    def fn():
        for calls, kv in work:
            for c in calls:
                block_forward(backend, q[:, :, c.q], kv[0][:, :, c.kv], kv[1][:, :, c.kv], c.causal, scale)
        for calls, kv in work:
            for c in calls:
                block_backward(backend, dout[:, :, c.q], q[:, :, c.q], kv[0][:, :, c.kv], kv[1][:, :, c.kv],
                               out[:, :, c.q], lse[:, :, c.q], c.causal, scale)

    return cuda_time_ms(fn, warmup, iters, inner)[0]


def time_full(q, k, v, dout, backend, name: str, scale: float, warmup: int, iters: int):
    """Single-GPU causal fwd+bwd over the whole sequence: the backend's block kernels, and F.sdpa."""
    results = {}

    def blocks():
        out, lse = block_forward(backend, q, k, v, True, scale)
        return out, block_backward(backend, dout, q, k, v, out, lse, True, scale)

    results["blocks_ms"] = cuda_time_ms(blocks, warmup, iters)[0]
    out, (dq, _, _) = blocks()
    try:
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]

        def sdpa():
            for x in leaves:
                x.grad = None
            with sdpa_kernel([SDPA_BACKENDS[name]]):
                o = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale, enable_gqa=True)
            o.backward(dout)

        results["sdpa_ms"] = cuda_time_ms(sdpa, warmup, iters)[0]
    except (RuntimeError, KeyError) as e:
        results["sdpa_error"] = str(e).splitlines()[0][:120]
    return results, out, dq


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def sim_config(ranks: Ranks, comm: str, backend, scale: float, ref_out, ref_dq, warmup: int, iters: int,
               inner: int, bound: bool) -> dict:
    """Time every rank of one configuration; check the assembled output and dQ against the single-GPU run."""
    p = ranks.world
    dkv_scratch = torch.zeros_like(ranks.kv[0], dtype=torch.float32)
    out_full, dq_full = torch.empty_like(ref_out), torch.empty_like(ref_dq)
    per_rank, bounds = [], []
    for r in range(p):
        out_r, lse_r, dq_r = run_rank(ranks, r, comm, backend, scale, dkv_scratch)
        out_full[:, :, ranks.positions[r]] = out_r
        dq_full[:, :, ranks.positions[r]] = dq_r

        def one(r=r):
            run_rank(ranks, r, comm, backend, scale, dkv_scratch)

        per_rank.append(cuda_time_ms(one, warmup, iters, inner)[0])
        if bound:
            bounds.append(time_kernels_only(ranks, r, comm, backend, scale, out_r, lse_r, warmup, iters, inner))
    result = {"rank_ms": [round(t, 2) for t in per_rank], "max_rank_ms": max(per_rank),
              "mean_rank_ms": statistics.mean(per_rank), "out_err": rel(out_full, ref_out),
              "dq_err": rel(dq_full, ref_dq)}
    if bounds:
        result["kernel_rank_ms"] = [round(t, 2) for t in bounds]
        result["max_kernel_ms"] = max(bounds)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--layouts", nargs="+", default=["zigzag", "contiguous"])
    parser.add_argument("--backends", nargs="+", default=["cudnn", "flash"])
    parser.add_argument("--comms", nargs="+", default=["p2p", "allgather"])
    parser.add_argument("--heads", type=int, nargs=2, default=[32, 8], metavar=("HQ", "HKV"))
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--native-gqa", choices=["default", "on", "off"], default="default",
                        help="override the backends' native_gqa flag (default: as set in kernels.py)")
    parser.add_argument("--bound", nargs="*", default=[], metavar="BACKEND",
                        help="backends for which to also time the kernels-only bound per rank")
    parser.add_argument("--label", default="", help="a version label for the rows (e.g. v0, v1)")
    parser.add_argument("--name", default="ring_sim", help="result file stem")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args()
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)

    info = env_info()
    info.update(label=args.label, native_gqa=args.native_gqa,
                package=os.path.relpath(Path(sys.modules["hf_ringcp"].__file__).parent))
    print(json.dumps(info), flush=True)
    hq, hkv = args.heads
    d, b, p = args.head_dim, args.batch, args.world
    scale = default_scale(d)
    rows = []
    for seq in args.seqlens:
        # Samples of `inner` back-to-back runs (see cuda_time_ms); long runs need no more than one.
        warmup, iters, inner = (1, 3, 1) if seq >= 65536 else (2, 5, 4)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the script's logic
        gen = torch.Generator(device=device).manual_seed(seq)
        # [B, H, S, D] views of [B, S, H, D] memory, the way Hugging Face models pass them.
        q, k, v, dout = (
            torch.randn(b, seq, h, d, generator=gen, device=device, dtype=torch.bfloat16).transpose(1, 2)
            for h in (hq, hkv, hkv, hq)
        )
        flops = attention_flops(b, hq, seq, seq, d, causal=True)
        for name in args.backends:
            backend = BACKENDS[name]
            if args.native_gqa != "default":
                backend = dataclasses.replace(backend, native_gqa=args.native_gqa == "on")
            full, ref_out, ref_dq = time_full(q, k, v, dout, backend, name, scale, warmup, iters)
            t_full = min(t for key, t in full.items() if key.endswith("_ms"))
            print(f"S={seq} {name}: full causal fwd+bwd {full} -> {flops / t_full / 1e9:.0f} TFLOP/s", flush=True)
            for layout in args.layouts:
                ranks = Ranks(q, k, v, dout, layout, p)
                for comm in args.comms:
                    row = {"label": args.label, "S": seq, "P": p, "backend": name, "layout": layout, "comm": comm,
                           "full_ms": t_full, "full_blocks_ms": full.get("blocks_ms"),
                           "full_sdpa_ms": full.get("sdpa_ms"), "full_tflops": flops / t_full / 1e9}
                    try:
                        row.update(sim_config(ranks, comm, backend, scale, ref_out, ref_dq, warmup, iters, inner,
                                              name in args.bound))
                        row.update(efficiency=t_full / p / row["max_rank_ms"],
                                   tflops_per_gpu=flops / p / row["max_rank_ms"] / 1e9)
                        if "max_kernel_ms" in row:
                            row["kernel_bound"] = t_full / p / row["max_kernel_ms"]
                    except Exception as e:  # report and go on
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.out:  # keep partial results if the run is cut short
                        (Path(args.out) / f"{args.name}_partial.json").write_text(json.dumps(rows, indent=1))
                ranks = None
                torch.cuda.empty_cache()
            ref_out = ref_dq = None
            torch.cuda.empty_cache()
        q = k = v = dout = None
        torch.cuda.empty_cache()

    columns = ["label", "S", "P", "backend", "layout", "comm", "efficiency", "kernel_bound", "tflops_per_gpu",
               "max_rank_ms", "mean_rank_ms", "full_ms", "full_tflops", "out_err", "dq_err", "error"]
    table = markdown_table(rows, columns)
    note = (
        "efficiency = T_full / P / max_r T_r with T_full the faster single-GPU causal fwd+bwd of the same backend "
        "(its block kernels or F.sdpa); tflops_per_gpu = 7*B*Hq*S^2*D / P / max_r T_r; kernel_bound = the same "
        "ratio for the block kernel calls alone; out_err/dq_err = relative error of the assembled sim output and "
        "dQ against the single-GPU run. Communication is not simulated (free)."
    )
    per_rank = "\n".join(
        f"- {r['label']} S={r['S']} {r['backend']} {r['layout']} {r['comm']}: {r.get('rank_ms')}"
        + (f" (kernels only {r['kernel_rank_ms']})" if "kernel_rank_ms" in r else "")
        for r in rows
    )
    path = write_results(args.name, info, rows, f"{note}\n\n{table}\n\nPer-rank ms:\n\n{per_rank}", args.out)
    print(table)
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
