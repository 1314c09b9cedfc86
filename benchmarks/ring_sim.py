"""Simulated ring attention: every rank's exact per-step work, run one rank after another on one GPU.

Each simulated rank runs the real per-rank variant object of the ring (:class:`~hf_ringcp.ring.p2p.P2PRing` or
:class:`~hf_ringcp.ring.allgather.AllGatherRing`, built from the rank's :class:`~hf_ringcp.ring.variant.RankSetup`:
the same placement, plan, block kernels, LSE merge and dK/dV accumulation as on a real ring), with its
communicators replaced by the in-process stand-ins :class:`~hf_ringcp.ring.comm.LoopbackRingComm` /
:class:`~hf_ringcp.ring.comm.LoopbackGatherComm` that hand over the other ranks' K/V by indexing. Communication
therefore costs nothing here: the numbers are what a ring reaches when every transfer hides behind compute (see
docs/performance.md for the bytes each step must move and whether they hide).

Plain rows (``--seqlens``): one causal sequence of ``S`` tokens per batch row. For every configuration the script
reports each rank's forward+backward time (CUDA events, warm-up, median of several runs), the efficiency
``T_full / P / max_r T_r`` against single-GPU causal attention over the whole sequence with the same backend
(``T_full`` = the faster of the backend's own kernels and ``F.scaled_dot_product_attention``), per-GPU TFLOP/s
with causal FLOPs ``7*B*Hq*S^2*D / P / max_r T_r``, and the kernels-only bound (the same block calls per rank,
``P2PRing.step_calls`` / ``AllGatherRing.own_calls`` + ``rest_calls``, with no merge or accumulation).

Packed rows (``--packed``): a row of ``--packed-seqlen`` real tokens (128K on CUDA) holding the documents of a
distribution of :mod:`benchmarks.packing` (``one``, ``lognormal``, ``mixed``), run through the ring with
``cu_seqlens`` for every layout of ``--packed-layouts`` (``zigzag`` pads every document to a multiple of ``2P``,
padding at the document's end; the other layouts only stretch the row to their divisor). The reference is
single-GPU attention over the real row computed per document, forward+backward: the fastest of the varlen flash
kernel (``aten._flash_attention_forward``/``_backward`` with ``cum_seq_q``/``cum_seq_k``, CUDA bf16/fp16), a loop
of per-document ``F.scaled_dot_product_attention`` calls with the row's backend (CUDA) and a loop of the backend's
own block kernels; the ``ref`` column names the one used. ``efficiency = T_ref / P / max_r T_r`` and
``tflops_per_gpu`` counts the real documents' causal FLOPs ``sum_d 7*B*Hq*l_d^2*D / P / max_r T_r``.

In both, the sim's output and dQ (at the real tokens) are checked against the single-GPU run (dK/dV are not: the
stand-in communicators do not carry them between ranks): a Frobenius-relative error above 2e-2 marks the row as an
error (and the exit code 1). Without CUDA the script is a dry run of the same logic
on CPU (host clock, one timed run per point, 4 query / 2 KV heads of dimension 32 unless ``--heads``/``--head-dim``
say otherwise).

Usage (times on one H200)::

    # plain rows, cudnn and flash, zigzag and contiguous: ~100 s
    PYTHONPATH=$PWD python benchmarks/ring_sim.py --seqlens 32768 131072 --world 8 --out benchmarks/results
    # packed rows only (no plain rows), 128K, every layout, cudnn: ~5 min (flash as well: ~10 min)
    PYTHONPATH=$PWD python benchmarks/ring_sim.py --seqlens --world 8 --packed --backends cudnn \
        --name ring_sim_packed --out benchmarks/results
    # CPU dry run of both (seconds)
    PYTHONPATH=$PWD python benchmarks/ring_sim.py --seqlens 256 --world 4 --backends math cpu_flash --packed
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import attention_flops, cuda_time_ms, env_info, markdown_table, write_results
from benchmarks.packing import DISTRIBUTIONS, REFERENCE_LEN, document_lengths, pack
from hf_ringcp.ring import merge
from hf_ringcp.ring.allgather import AllGatherRing
from hf_ringcp.ring.allgather_prefix import AllGatherPrefix
from hf_ringcp.ring.blocks import Kernels
from hf_ringcp.ring.comm import LoopbackGatherComm, LoopbackRingComm
from hf_ringcp.ring.kernels import BACKENDS, Backend, block_backward, block_forward, default_scale
from hf_ringcp.ring.layout import LAYOUTS, Layout
from hf_ringcp.ring.p2p import P2PRing
from hf_ringcp.ring.plan import MaskSpec
from hf_ringcp.ring.variant import RankSetup, Variant
from hf_ringcp.ring.varlen import FLASH_VARLEN

aten = torch.ops.aten
MAX_ERR = 2e-2  # Frobenius-relative error of the sim's bf16 output and dQ against the single-device run
SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return x if x.stride() == ref.stride() else torch.empty_like(ref).copy_(x)


class Ranks:
    """The P ranks' local tensors for one row, layout and world size (``[B, S, H, D]`` memory, as HF).

    ``q, k, v, dout``: ``[B, H, S, D]`` views of ``[B, S, H, D]`` memory over the whole row; ``cu_seqlens``: the
    row's documents (``None``: one causal sequence).
    """

    def __init__(self, q, k, v, dout, layout: str, world: int, cu_seqlens=None) -> None:
        seq = q.shape[2]
        self.layout, self.world = layout, world
        self.placement = Layout.for_name(layout, world).placement(seq, cu_seqlens)
        self.mask = MaskSpec(causal=True, documents=self.placement.documents)
        self.positions = [self.placement.positions(r, device=q.device) for r in range(world)]

        def shard(x, r):  # x is a [B, H, S, D] view of [B, S, H, D] memory; keep that memory order
            return x.transpose(1, 2).index_select(1, self.positions[r]).transpose(1, 2)

        self.q = [shard(q, r) for r in range(world)]
        self.k = [shard(k, r) for r in range(world)]
        self.v = [shard(v, r) for r in range(world)]
        self.dout = [shard(dout, r) for r in range(world)]
        self.kv = [torch.stack([self.k[r], self.v[r]]) for r in range(world)]
        # What each rank sends: every row, or with layout="balanced" only the rows other ranks see.
        travel = self.placement.travelling(self.mask)
        self.sent = [travel.take(self.kv[r], r) for r in range(world)]
        # What the all-gather returns: [P, 2, B, Hkv, rows, D] (each rank's sent rows padded to the largest).
        self.gathered = torch.stack([travel.take(self.kv[r], r, pad=True) for r in range(world)])
        self.dkv_scratch = [torch.zeros_like(x, dtype=torch.float32) for x in self.sent]

    def variant(self, r: int, comm: str, kernels: Kernels, scale: float) -> Variant:
        """Rank ``r``'s variant object with loopback communicators (the real per-rank code of the ring)."""
        setup = RankSetup(r, self.world, self.placement, self.mask, kernels, scale)
        if comm == "p2p":
            # At its i-th transfer rank r receives the K/V of rank r - i - 1; the dK/dV accumulators it receives are
            # a scratch buffer of the right shape (their values are not checked).
            kv_in = lambda i: self.sent[(r - i - 1) % self.world]
            dkv_in = lambda i: self.dkv_scratch[(r - i - 1) % self.world]
            return P2PRing(setup, lambda: LoopbackRingComm(kv_in), lambda: LoopbackRingComm(dkv_in))
        if comm == "allgather":
            return AllGatherRing(setup, lambda: LoopbackGatherComm(r, self.gathered))
        if comm == "allgather_prefix":
            return AllGatherPrefix(setup, lambda: LoopbackGatherComm(r, self.gathered))
        raise ValueError(f"unknown comm {comm!r}")


def packed_ranks(qkvo: tuple[torch.Tensor, ...], placed, index: torch.Tensor) -> Ranks:
    """The ranks of a packed row (``benchmarks.packing.PackedRow``) from ``q, k, v, dout`` ``[B, H, S, D]`` over
    its real tokens: the ring's row holds them at ``index`` and zeros on the padding (which feeds no loss)."""
    padded = []
    for x in qkvo:
        mem = torch.zeros(x.shape[0], placed.seq_len, x.shape[1], x.shape[3], dtype=x.dtype, device=x.device)
        mem[:, index] = x.transpose(1, 2)
        padded.append(mem.transpose(1, 2))
    return Ranks(*padded, placed.layout, placed.world, cu_seqlens=placed.cu_seqlens)


def run_rank(ranks: Ranks, r: int, variant: Variant):
    """Rank ``r``'s forward and backward exactly as the ring runs them; returns ``(out, lse, dq)``."""
    q, k, v, dout = ranks.q[r], ranks.k[r], ranks.v[r], ranks.dout[r]
    out, lse = variant.attend(q, k, v)
    dq, _, _ = variant.attend_backward(dout, q, k, v, out, lse)
    return out, lse, dq


def rank_kernel_calls(ranks: Ranks, r: int, variant: Variant):
    """``(calls, kv)`` pairs: the block kernel calls rank ``r`` makes and the K/V buffer each reads."""
    if isinstance(variant, P2PRing):
        held = lambda s: ranks.kv[r] if s == 0 else ranks.sent[(r - s) % ranks.world]
        return [(variant.step_calls(s), held(s)) for s in range(variant.n_steps)]
    if not variant.gathers:
        return [(variant.own_calls, ranks.kv[r])]
    return [(variant.own_calls, ranks.kv[r]), (variant.rest_calls, variant._buffer(ranks.gathered))]


def time_kernels_only(ranks: Ranks, r: int, variant: Variant, out, lse, warmup, iters, inner) -> float:
    """The same block forward and backward calls with no merge, accumulation or reordering."""
    s = variant.setup
    q, dout = ranks.q[r], _like(ranks.dout[r], ranks.q[r])
    out = _like(out, q)
    if isinstance(variant, AllGatherPrefix):
        full = variant._buffer(ranks.gathered)
        segs = [(slice(g.row, g.stop_row), g.stop, variant._kernel(g, q, full[0])) for g in variant.segments]

        def prefix_calls():
            for rows, stop, (backend, causal, bias) in segs:
                block_forward(backend, q[:, :, rows], full[0][:, :, :stop], full[1][:, :, :stop], causal, s.scale,
                              bias)
            for rows, stop, (backend, causal, bias) in segs:
                block_backward(backend, dout[:, :, rows], q[:, :, rows], full[0][:, :, :stop], full[1][:, :, :stop],
                               out[:, :, rows], lse[:, :, rows], causal, s.scale, bias)

        return cuda_time_ms(prefix_calls, warmup, iters, inner)[0]
    work = [(calls, kv, [s.kernels.for_call(c, q) for c in calls])
            for calls, kv in rank_kernel_calls(ranks, r, variant)]

    def fn():
        for calls, kv, kernels in work:
            for c, (backend, bias) in zip(calls, kernels):
                block_forward(backend, q[:, :, c.q], kv[0][:, :, c.kv], kv[1][:, :, c.kv], c.causal, s.scale, bias)
        for calls, kv, kernels in work:
            for c, (backend, bias) in zip(calls, kernels):
                block_backward(backend, dout[:, :, c.q], q[:, :, c.q], kv[0][:, :, c.kv], kv[1][:, :, c.kv],
                               out[:, :, c.q], lse[:, :, c.q], c.causal, s.scale, bias)

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


def time_packed_reference(q, k, v, dout, docs, backend, name: str, scale: float, warmup: int, iters: int):
    """Single-GPU causal fwd+bwd over a packed row, per document ``[a, b)`` of ``docs``.

    ``q, k, v, dout``: ``[B, H, S, D]`` views of ``[B, S, H, D]`` memory holding the real tokens only. Times the
    backend's block kernels per document (``blocks_loop``), per-document ``F.sdpa`` with the backend (``sdpa_loop``,
    CUDA) and one varlen flash call over all documents (``flash_varlen``, CUDA half precision); returns
    ``(times and errors, out, dq)`` with ``out``/``dq`` from the block-kernel loop.
    """
    results: dict = {}

    def blocks_loop():
        res = []
        for a, b in docs:
            qs, ks, vs, ds = (x[:, :, a:b] for x in (q, k, v, dout))
            o, lse = block_forward(backend, qs, ks, vs, True, scale)
            res.append((o, block_backward(backend, ds, qs, ks, vs, o, lse, True, scale)[0]))
        return res

    out, dq = torch.empty_like(q), torch.empty_like(q)
    for (a, b), (o, g) in zip(docs, blocks_loop()):
        out[:, :, a:b], dq[:, :, a:b] = o, g
    results["blocks_loop_ms"] = cuda_time_ms(blocks_loop, warmup, iters)[0]
    if q.device.type == "cuda" and name in SDPA_BACKENDS:
        try:
            def sdpa_loop():
                for a, b in docs:
                    leaves = [x[:, :, a:b].detach().requires_grad_() for x in (q, k, v)]
                    with sdpa_kernel([SDPA_BACKENDS[name]]):
                        o = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale, enable_gqa=True)
                    o.backward(dout[:, :, a:b])

            results["sdpa_loop_ms"] = cuda_time_ms(sdpa_loop, warmup, iters)[0]
        except RuntimeError as e:
            results["sdpa_loop_error"] = str(e).splitlines()[0][:120]
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        try:
            b, s = q.shape[0], q.shape[2]
            flat = [x.transpose(1, 2).reshape(b * s, x.shape[1], x.shape[3]) for x in (q, k, v, dout)]
            starts = [row * s + a for row in range(b) for a, _ in docs] + [b * s]
            cu = torch.tensor(starts, dtype=torch.int32, device=q.device)
            longest = max(e - a for a, e in docs)

            def varlen():
                fq, fk, fv, fd = flat
                o, lse, rng, unused, _ = aten._flash_attention_forward(
                    fq, fk, fv, cu, cu, longest, longest, 0.0, True, False, scale=scale)
                grads = aten._flash_attention_backward(
                    fd, fq, fk, fv, o, lse, cu, cu, longest, longest, 0.0, True, rng, unused, scale=scale)
                return o, grads

            o, (g, _, _) = varlen()
            err = max(rel(o.view(b, s, *o.shape[1:]).transpose(1, 2), out),
                      rel(g.view(b, s, *g.shape[1:]).transpose(1, 2), dq))
            if not err < 2e-2:
                raise RuntimeError(f"varlen flash disagrees with the per-document kernels (rel err {err:.2e})")
            results["flash_varlen_ms"] = cuda_time_ms(varlen, warmup, iters)[0]
        except RuntimeError as e:
            results["flash_varlen_error"] = str(e).splitlines()[0][:120]
    return results, out, dq


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def sim_config(ranks: Ranks, comm: str, kernels: Kernels, scale: float, ref_out, ref_dq, timing, bound: bool,
               real_index: torch.Tensor | None = None) -> dict:
    """Time every rank of one configuration; check the assembled output and dQ against the single-GPU run.

    ``real_index``: the row positions of the reference's tokens (packed rows with padding); ``None``: all of them.
    """
    p = ranks.world
    seq = ranks.q[0].shape[2] * p
    out_full = torch.empty(ref_out.shape[:2] + (seq, ref_out.shape[3]), dtype=ref_out.dtype, device=ref_out.device)
    dq_full = torch.empty_like(out_full)
    per_rank, bounds = [], []
    for r in range(p):
        variant = ranks.variant(r, comm, kernels, scale)
        out_r, lse_r, dq_r = run_rank(ranks, r, variant)
        out_full[:, :, ranks.positions[r]] = out_r
        dq_full[:, :, ranks.positions[r]] = dq_r

        def one(r=r, variant=variant):
            run_rank(ranks, r, variant)

        per_rank.append(cuda_time_ms(one, *timing)[0])
        if bound:
            bounds.append(time_kernels_only(ranks, r, variant, out_r, lse_r, *timing))
    if real_index is not None:
        out_full, dq_full = out_full[:, :, real_index], dq_full[:, :, real_index]
    result = {"rank_ms": [round(t, 2) for t in per_rank], "max_rank_ms": max(per_rank),
              "mean_rank_ms": statistics.mean(per_rank), "out_err": rel(out_full, ref_out),
              "dq_err": rel(dq_full, ref_dq)}
    if bounds:
        result["kernel_rank_ms"] = [round(t, 2) for t in bounds]
        result["max_kernel_ms"] = max(bounds)
    worst = max(result["out_err"], result["dq_err"])
    if not worst <= MAX_ERR:  # NaN fails too
        result["error"] = f"out/dq relative error {worst:.2e} above {MAX_ERR} (bf16)"
    return result


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _kernels(name: str, native_gqa: str, varlen: bool = True) -> Kernels:
    """The ring's kernel choice for ``name`` (as ``Kernels.choose`` makes it on CUDA bf16), ``varlen`` on or off."""
    backend: Backend = BACKENDS[name]
    if native_gqa != "default":
        backend = dataclasses.replace(backend, native_gqa=native_gqa == "on")
    cuda = torch.cuda.is_available()
    single = BACKENDS["flash"] if name == "cudnn" and cuda else None
    grouped = FLASH_VARLEN if varlen and cuda and name in ("cudnn", "flash") else None
    return Kernels(backend, None, single, grouped)


def _inputs(b: int, seq: int, heads: tuple[int, ...], d: int, device: str, seed: int):
    """Random bf16 ``[B, H, S, D]`` views of ``[B, S, H, D]`` memory, the way Hugging Face models pass them."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(b, seq, h, d, generator=gen, device=device, dtype=torch.bfloat16).transpose(1, 2)
            for h in heads]


def _timing(seq: int, cuda: bool) -> tuple[int, int, int]:
    """``(warmup, iters, inner)``: samples of ``inner`` back-to-back runs (see cuda_time_ms)."""
    if not cuda:
        return 0, 1, 1  # a dry run: the correctness run before it warms up
    return (1, 3, 1) if seq >= 65536 else (2, 5, 4)


def plain_rows(args, device: str, info_print) -> list[dict]:
    hq, hkv = args.heads
    d, b, p = args.head_dim, args.batch, args.world
    scale = default_scale(d)
    rows = []
    for seq in args.seqlens:
        timing = _timing(seq, device == "cuda")
        q, k, v, dout = _inputs(b, seq, (hq, hkv, hkv, hq), d, device, seq)
        flops = attention_flops(b, hq, seq, seq, d, causal=True)
        for name in args.backends:
            kernels = _kernels(name, args.native_gqa)
            full, ref_out, ref_dq = time_full(q, k, v, dout, kernels.plain, name, scale, *timing[:2])
            t_full = min(t for key, t in full.items() if key.endswith("_ms"))
            print(f"S={seq} {name}: full causal fwd+bwd {full} -> {flops / t_full / 1e9:.0f} TFLOP/s", flush=True)
            for layout, u in itertools.product(args.layouts, args.ulysses):
                # Ulysses over u ranks: each holds Hq/u (and Hkv/u) heads of the u ranks' tokens, and the ring runs
                # over P/u groups; with zigzag the groups' tokens form a zigzag over P/u (super-chunks of u chunks).
                # The all-to-alls and the reordering copy are not simulated (free, as every transfer here).
                if (hkv % u and u % hkv) or hq % u or p % u:
                    continue
                hu, ku = hq // u, max(hkv // u, 1)
                ranks = Ranks(q[:, :hu], k[:, :ku], v[:, :ku], dout[:, :hu], layout, p // u)
                for comm in args.comms:
                    label = comm if u == 1 else ("ulysses" if u == p else f"{comm} x ulysses {u}")
                    if u == p and comm != args.comms[0]:
                        continue  # pure Ulysses: one local call, the same for every ring comm
                    row = {"label": args.label, "S": seq, "P": p, "backend": name, "layout": layout, "comm": label,
                           "full_ms": t_full, "full_blocks_ms": full.get("blocks_ms"),
                           "full_sdpa_ms": full.get("sdpa_ms"), "full_tflops": flops / t_full / 1e9}
                    try:
                        row.update(sim_config(ranks, comm, kernels, scale, ref_out[:, :hu], ref_dq[:, :hu], timing,
                                              name in args.bound))
                        row.update(efficiency=t_full / p / row["max_rank_ms"],
                                   tflops_per_gpu=flops / p / row["max_rank_ms"] / 1e9)
                        if "max_kernel_ms" in row:
                            row["kernel_bound"] = t_full / p / row["max_kernel_ms"]
                    except Exception as e:  # report and go on
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    rows.append(row)
                    info_print(row, rows)
                ranks = None
                _empty_cache()
            ref_out = ref_dq = None
            _empty_cache()
        q = k = v = dout = None
        _empty_cache()
    return rows


def rank_step_costs(ranks: Ranks, comm: str, kernels: Kernels, scale: float) -> dict:
    """Packed rows: attention kernel calls per rank and ring step (forward and backward averaged, the most of any
    rank) and the host time a rank takes to issue one step's forward + backward (median over the ranks of a warm
    run; the GPU synchronised before and after, not inside: the CPU's cost per step, a lower bound of the step)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += "attention" in func.__name__  # every block/varlen kernel, forward or backward
            return func(*args, **(kwargs or {}))

    steps = ranks.world if comm == "p2p" else min(ranks.world, 2)
    calls, host = [], []
    for r in range(ranks.world):
        variant = ranks.variant(r, comm, kernels, scale)
        run_rank(ranks, r, variant)  # warm: the batch's plans exist
        with Count() as counter:
            run_rank(ranks, r, variant)
        calls.append(counter.calls / steps / 2)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_rank(ranks, r, variant)
        host.append((time.perf_counter() - start) * 1e3 / steps)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return {"calls_per_step": max(calls), "host_ms_per_step": statistics.median(host)}


def packed_rows(args, device: str, info_print) -> list[dict]:
    hq, hkv = args.heads
    d, b, p = args.head_dim, args.batch, args.world
    scale = default_scale(d)
    total = args.packed_seqlen
    timing = _timing(total, device == "cuda")
    rows = []
    for dist_name in args.packed:
        lengths = document_lengths(dist_name, total, args.seed)
        docs = pack(lengths, "contiguous", 1).real  # the real row: documents back to back
        q, k, v, dout = _inputs(b, total, (hq, hkv, hkv, hq), d, device, total + len(lengths))
        flops = sum(attention_flops(b, hq, n, n, d, causal=True) for n in lengths)
        for name in args.backends:
            kernels = _kernels(name, args.native_gqa)
            ref, ref_out, ref_dq = time_packed_reference(q, k, v, dout, docs, kernels.plain, name, scale, *timing[:2])
            times = {key[:-3]: t for key, t in ref.items() if key.endswith("_ms")}
            ref_name = min(times, key=times.get)
            t_ref = times[ref_name]
            print(f"packed {dist_name} ({len(lengths)} docs, {total} tokens) {name}: per-document reference {ref} "
                  f"-> {ref_name}, {flops / t_ref / 1e9:.0f} TFLOP/s", flush=True)
            for layout in args.packed_layouts:
                row = {"label": args.label, "dist": dist_name, "docs": len(lengths), "S": total, "P": p,
                       "backend": name, "layout": layout, "ref": ref_name, "ref_ms": t_ref,
                       "ref_tflops": flops / t_ref / 1e9, **{f"ref_{key}": val for key, val in ref.items()}}
                try:
                    placed = pack(lengths, layout, p)
                    row.update(S_row=placed.seq_len, pad=placed.padding)
                    index = placed.real_index(device)
                    ranks = packed_ranks((q, k, v, dout), placed, index)
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    rows.append(row)
                    info_print(row, rows)
                    continue
                for comm, varlen in itertools.product(args.comms, args.varlen):
                    row_c = {**row, "comm": comm, "varlen": varlen}
                    try:
                        row_c.update(sim_config(ranks, comm, _kernels(name, args.native_gqa, varlen == "on"), scale,
                                                ref_out, ref_dq, timing,
                                                name in args.bound, real_index=None if not placed.padding else index))
                        row_c.update(efficiency=t_ref / p / row_c["max_rank_ms"],
                                     tflops_per_gpu=flops / p / row_c["max_rank_ms"] / 1e9)
                        if "max_kernel_ms" in row_c:
                            row_c["kernel_bound"] = t_ref / p / row_c["max_kernel_ms"]
                        row_c.update(rank_step_costs(ranks, comm, _kernels(name, args.native_gqa, varlen == "on"),
                                                     scale))
                    except Exception as e:  # report and go on
                        row_c["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                    rows.append(row_c)
                    info_print(row_c, rows)
                ranks = None
                _empty_cache()
            ref_out = ref_dq = None
            _empty_cache()
        q = k = v = dout = None
        _empty_cache()
    return rows


PLAIN_COLUMNS = ["label", "S", "P", "backend", "layout", "comm", "efficiency", "kernel_bound", "tflops_per_gpu",
                 "max_rank_ms", "mean_rank_ms", "full_ms", "full_tflops", "out_err", "dq_err", "error"]
PACKED_COLUMNS = ["label", "dist", "docs", "S", "S_row", "pad", "P", "backend", "layout", "comm", "varlen",
                  "efficiency", "calls_per_step", "host_ms_per_step",
                  "kernel_bound", "tflops_per_gpu", "max_rank_ms", "mean_rank_ms", "ref", "ref_ms", "ref_tflops",
                  "out_err", "dq_err", "error"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="*", default=[32768, 131072],
                        help="plain rows: causal sequence lengths (none: packed rows only)")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--layouts", nargs="+", default=["zigzag", "contiguous"], choices=LAYOUTS)
    parser.add_argument("--backends", nargs="+", default=["cudnn", "flash"], choices=sorted(BACKENDS))
    parser.add_argument("--comms", nargs="+", default=["p2p", "allgather"],
                        choices=["p2p", "allgather", "allgather_prefix"],
                        help="allgather: the planned all-gather (AllGatherRing); allgather_prefix: one bottom-right "
                             "causal call per query segment (AllGatherPrefix)")
    parser.add_argument("--merge", choices=["triton", "torch"], default="triton",
                        help="the LSE merge on CUDA: the Triton kernel or the torch ops")
    parser.add_argument("--ulysses", type=int, nargs="+", default=[1],
                        help="Ulysses sizes u (1: the plain ring; P: pure Ulysses; between: the hybrid)")
    parser.add_argument("--heads", type=int, nargs=2, default=None, metavar=("HQ", "HKV"),
                        help="query and KV heads (default 32 8 on CUDA, 4 2 for a CPU dry run)")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128 on CUDA, 32 for a CPU dry run")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--packed", nargs="*", default=None, choices=DISTRIBUTIONS, metavar="DIST",
                        help=f"also run packed rows of these distributions (bare --packed: all of {DISTRIBUTIONS})")
    parser.add_argument("--packed-seqlen", type=int, default=None,
                        help=f"real tokens per packed row (default {REFERENCE_LEN} on CUDA, the largest of --seqlens "
                             "on CPU); the distributions' lengths scale with it")
    parser.add_argument("--packed-layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--varlen", nargs="+", default=["on"], choices=["on", "off"],
                        help="packed rows: the ring's many small calls as varlen calls (on), or one by one (off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the packed rows' document lengths")
    parser.add_argument("--native-gqa", choices=["default", "on", "off"], default="default",
                        help="override the backends' native_gqa flag (default: as set in kernels.py)")
    parser.add_argument("--bound", nargs="*", default=[], metavar="BACKEND",
                        help="backends for which to also time the kernels-only bound per rank")
    parser.add_argument("--label", default="", help="a version label for the rows (e.g. v0, v1)")
    parser.add_argument("--name", default="ring_sim", help="result file stem")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    merge.FUSED = args.merge != "torch"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: a dry run of the script's logic
    cuda = device == "cuda"
    args.heads = args.heads or ([32, 8] if cuda else [4, 2])
    args.head_dim = args.head_dim or (128 if cuda else 32)
    if args.packed is not None and not args.packed:
        args.packed = list(DISTRIBUTIONS)
    if args.packed and args.packed_seqlen is None:
        args.packed_seqlen = REFERENCE_LEN if cuda or not args.seqlens else max(args.seqlens)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)

    info = env_info()
    info.update(label=args.label, merge=args.merge, native_gqa=args.native_gqa, heads=args.heads,
                head_dim=args.head_dim, batch=args.batch,
                package=os.path.relpath(Path(sys.modules["hf_ringcp"].__file__).parent))
    if args.packed:
        info.update(packed_seqlen=args.packed_seqlen, packed_seed=args.seed)
    print(json.dumps(info), flush=True)

    def report(row: dict, rows: list[dict]) -> None:
        print(json.dumps(row), flush=True)
        if args.out:  # keep partial results if the run is cut short
            (Path(args.out) / f"{args.name}_partial.json").write_text(json.dumps(all_rows + rows, indent=1))

    all_rows: list[dict] = []
    plain = plain_rows(args, device, report)
    all_rows += plain
    packed = packed_rows(args, device, report) if args.packed else []
    all_rows += packed

    table = markdown_table(plain, PLAIN_COLUMNS)
    note = (
        "efficiency = T_full / P / max_r T_r with T_full the faster single-GPU causal fwd+bwd of the same backend "
        "(its block kernels or F.sdpa); tflops_per_gpu = 7*B*Hq*S^2*D / P / max_r T_r; kernel_bound = the same "
        "ratio for the block kernel calls alone; out_err/dq_err = relative error of the assembled sim output and "
        "dQ against the single-GPU run. Communication is not simulated (free)."
    )
    parts = [note, table] if plain else []
    if packed:
        packed_table = markdown_table(packed, PACKED_COLUMNS)
        parts += [
            f"Packed rows ({args.packed_seqlen} real tokens, benchmarks/packing.py, seed {args.seed}): S_row = the "
            "ring's row with the layout's padding (pad tokens); efficiency = T_ref / P / max_r T_r with T_ref the "
            "fastest single-GPU per-document causal fwd+bwd over the real row (ref: flash_varlen = one varlen flash "
            "call, sdpa_loop = F.sdpa per document with the row's backend, blocks_loop = the backend's block kernel "
            "per document); tflops_per_gpu counts the real documents' causal FLOPs; out_err/dq_err at the real "
            "tokens against the blocks_loop run.",
            packed_table,
        ]
    per_rank = "\n".join(
        f"- {r['label']} S={r['S']} {r.get('dist', 'plain')} {r['backend']} {r['layout']} {r.get('comm')}: "
        f"{r.get('rank_ms')}" + (f" (kernels only {r['kernel_rank_ms']})" if "kernel_rank_ms" in r else "")
        for r in all_rows
    )
    path = write_results(args.name, info, all_rows, "\n\n".join(parts) + f"\n\nPer-rank ms:\n\n{per_rank}", args.out)
    if plain:
        print(table)
    if packed:
        print(packed_table)
    print(f"wrote {path}")
    return 0 if all("error" not in r for r in all_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
