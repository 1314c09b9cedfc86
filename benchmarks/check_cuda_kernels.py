"""Correctness of the CUDA block kernels (cudnn, flash, efficient) against a float64 reference, on one GPU.

Checks, for each backend (bf16; also fp32 for efficient):

1. native GQA: does the raw op take K/V with fewer heads (32 q / 8 kv) and give the right out, LSE and grads?
   Each probe runs in a subprocess, so that an op that faults cannot take the others down.
2. ``block_forward`` / ``block_backward`` (with the backend's ``native_gqa`` flag as set in kernels.py) on MHA and
   GQA, causal and not, square and rectangular (Sq != Sk, non-causal) blocks, contiguous ``[B, H, S, D]`` and
   strided inputs (row slices of ``[B, S, H, D]`` memory, as the ring passes them).
3. the backward with the *global* out/LSE: two key blocks merged by ``OutputAccumulator`` then differentiated
   block by block through ``backward_calls`` reproduce full-attention gradients.
4. ``ring_attention`` with a world of 1 on CUDA against ``F.scaled_dot_product_attention`` (and float64).

Usage: ``PYTHONPATH=$PWD python benchmarks/check_cuda_kernels.py [--out DIR]``. Exits non-zero on a failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F

from hf_ringcp.ring import ring_attention
from hf_ringcp.ring.blocks import OutputAccumulator, backward_calls, forward_calls
from hf_ringcp.ring.kernels import (
    BACKENDS,
    _cudnn_lse_is_4d,
    _math_backward,
    _math_forward,
    block_backward,
    block_forward,
    default_scale,
)
from hf_ringcp.ring.plan import BlockCall

HQ, HKV, D = 32, 8, 128
# Frobenius-relative error limits against float64 (bf16 operands land between 1e-3 and 1e-2).
LIMIT = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}
CASES = [("bf16", "cudnn"), ("bf16", "flash"), ("bf16", "efficient"), ("fp32", "efficient")]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEVICE = "cuda"
SHRINK = 1  # sequence lengths are divided by this (a CPU dry run uses 8)


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 (NaN stays NaN and fails every comparison)."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm()).item()


def rand(shape, dtype, gen, layout="bhsd"):
    """Random ``[B, H, S, D]``; ``"bshd"`` gives a transposed view of ``[B, S, H, D]`` memory (as HF passes)."""
    b, h, s, d = shape
    if layout == "bshd":
        return torch.randn(b, s, h, d, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype).transpose(1, 2)
    return torch.randn(b, h, s, d, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def reference(q, k, v, dout, causal, scale):
    """Float64 attention of the given blocks: ``out, lse, dq, dk, dv`` (GQA-aware)."""
    q64, k64, v64, do64 = (x.double() for x in (q, k, v, dout))
    out, lse = _math_forward(q64, k64, v64, causal, scale)
    dq, dk, dv = _math_backward(do64, q64, k64, v64, out, lse, causal, scale)
    return out, lse, dq, dk, dv


def errors(got: dict, ref: dict) -> dict:
    return {name: rel(got[name], ref[name]) for name in got}


def passed(errs: dict, dtype) -> bool:
    return all(e <= LIMIT[dtype] for e in errs.values())  # False for NaN


# ------------------------------------------------------------------------------------------ 1. native GQA


def probe_native_gqa(backend: str, dtype_name: str) -> dict:
    """Call the backend's raw forward/backward with 8 kv heads for 32 q heads; compare with float64."""
    dtype = DTYPES[dtype_name]
    be = BACKENDS[backend]
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    result = {}
    for causal, sq, sk in ((True, 512 // SHRINK, 512 // SHRINK), (False, 384 // SHRINK, 768 // SHRINK)):
        q = rand((2, HQ, sq, D), dtype, gen, "bshd")
        k, v = (rand((2, HKV, sk, D), dtype, gen) for _ in range(2))
        dout = rand((2, HQ, sq, D), dtype, gen, "bshd")
        scale = default_scale(D)
        ref = dict(zip(("out", "lse", "dq", "dk", "dv"), reference(q, k, v, dout, causal, scale)))
        out, lse = be.forward(q, k, v, causal, scale)
        dq, dk, dv = be.backward(dout, q, k, v, out, lse.float(), causal, scale)
        got = {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}
        shapes_ok = dk.shape == k.shape and dv.shape == v.shape
        errs = errors(got, ref)
        result[f"causal={causal} {sq}x{sk}"] = {"errs": errs, "ok": shapes_ok and passed(errs, dtype)}
    return result


def run_probe_subprocess(backend: str, dtype_name: str) -> dict:
    cmd = [sys.executable, __file__, "--probe", backend, dtype_name] + (["--dry-run"] if DEVICE == "cpu" else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": f"rc={proc.returncode}: " + " | ".join(tail)}


# ------------------------------------------------------------------------------------ 2. block kernels


def check_blocks(backend: str, dtype) -> list[dict]:
    be = BACKENDS[backend]
    gen = torch.Generator(device=DEVICE).manual_seed(11)
    rows = []
    for heads in ("mha", "gqa"):
        hkv = HQ if heads == "mha" else HKV
        for sq, sk, causal in ((1024, 1024, True), (1024, 1024, False), (512, 1536, False), (1536, 512, False)):
            sq, sk = sq // SHRINK, sk // SHRINK
            for layout in ("bhsd", "bshd-slice"):
                row = {"check": "block", "backend": backend, "dtype": str(dtype).split(".")[-1], "heads": heads,
                       "shape": f"{sq}x{sk}", "causal": causal, "layout": layout}
                try:
                    if layout == "bshd-slice":  # rows [64, 64 + S) of a longer [B, S, H, D] buffer, as in the ring
                        q = rand((2, HQ, sq + 128, D), dtype, gen, "bshd")[:, :, 64 : 64 + sq]
                        dout = rand((2, HQ, sq + 128, D), dtype, gen, "bshd")[:, :, 64 : 64 + sq]
                        k, v = (rand((2, hkv, sk + 128, D), dtype, gen)[:, :, 64 : 64 + sk] for _ in range(2))
                    else:
                        q, dout = (rand((2, HQ, sq, D), dtype, gen) for _ in range(2))
                        k, v = (rand((2, hkv, sk, D), dtype, gen) for _ in range(2))
                    scale = default_scale(D)
                    ref = dict(zip(("out", "lse", "dq", "dk", "dv"), reference(q, k, v, dout, causal, scale)))
                    out, lse = block_forward(be, q, k, v, causal, scale)
                    dq, dk, dv = block_backward(be, dout, q, k, v, out, lse, causal, scale)
                    errs = errors({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}, ref)
                    row.update(errs, ok=passed(errs, dtype) and dk.shape == k.shape)
                except Exception as e:  # report and go on with the other cases
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                rows.append(row)
    return rows


# ------------------------------------------------------------------------- 3. global out/LSE, two key blocks


def check_global_lse(backend: str, dtype) -> list[dict]:
    be = BACKENDS[backend]
    gen = torch.Generator(device=DEVICE).manual_seed(13)
    c = 1024 // SHRINK
    rows = []
    for causal in (True, False):
        row = {"check": "global-lse", "backend": backend, "dtype": str(dtype).split(".")[-1], "heads": "gqa",
               "shape": f"{2 * c}x{2 * c} as 2 key blocks", "causal": causal, "layout": "bshd"}
        try:
            q, dout = (rand((1, HQ, 2 * c, D), dtype, gen, "bshd") for _ in range(2))
            k, v = (rand((1, HKV, 2 * c, D), dtype, gen) for _ in range(2))
            scale = default_scale(D)
            ref = dict(zip(("out", "lse", "dq", "dk", "dv"), reference(q, k, v, dout, causal, scale)))
            if causal:  # diagonal squares plus the one full rectangle below them
                calls = [BlockCall(0, c, 0, c, True, (0,), (0,)), BlockCall(c, 2 * c, 0, c, False, (1,), (0,)),
                         BlockCall(c, 2 * c, c, 2 * c, True, (1,), (1,))]
            else:
                calls = [BlockCall(0, 2 * c, 0, c, False, (0, 1), (0,)),
                         BlockCall(0, 2 * c, c, 2 * c, False, (0, 1), (1,))]
            acc = OutputAccumulator(q, c)
            forward_calls(calls, q, k, v, acc, be, scale)
            out, lse = acc.result(dtype)
            dq = torch.zeros_like(q, dtype=torch.float32)
            dk, dv = (torch.zeros_like(x, dtype=torch.float32) for x in (k, v))
            backward_calls(calls, dout, q, k, v, out, lse, dq, dk, dv, be, scale)
            errs = errors({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}, ref)
            row.update(errs, ok=passed(errs, dtype))
        except Exception as e:
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ 4. ring_attention, world 1


def check_ring_world1(backend: str, dtype) -> list[dict]:
    gen = torch.Generator(device=DEVICE).manual_seed(17)
    n = 2048 // SHRINK
    rows = []
    for comm in ("p2p", "allgather"):
        for layout in ("zigzag", "contiguous"):
            for causal in (True, False):
                row = {"check": "ring-world1", "backend": backend, "dtype": str(dtype).split(".")[-1],
                       "heads": "gqa", "shape": str(n), "causal": causal, "layout": f"{layout}/{comm}"}
                try:
                    q, dout = (rand((1, HQ, n, D), dtype, gen, "bshd") for _ in range(2))
                    k, v = (rand((1, HKV, n, D), dtype, gen, "bshd") for _ in range(2))
                    ref = dict(zip(("out", "lse", "dq", "dk", "dv"),
                                   reference(q, k, v, dout, causal, default_scale(D))))
                    del ref["lse"]
                    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
                    out = ring_attention(*leaves, causal=causal, layout=layout, comm=comm, backend=backend)
                    out.backward(dout)
                    got = {"out": out, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
                    errs = errors(got, ref)
                    sdpa_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
                    sdpa = F.scaled_dot_product_attention(*sdpa_leaves, is_causal=causal, enable_gqa=True)
                    sdpa.backward(dout)
                    sdpa_got = {"out": sdpa, "dq": sdpa_leaves[0].grad, "dk": sdpa_leaves[1].grad,
                                "dv": sdpa_leaves[2].grad}
                    row.update(errs, ok=passed(errs, dtype),
                               vs_sdpa=max(rel(got[n], sdpa_got[n]) for n in got),
                               sdpa_err=max(errors(sdpa_got, ref).values()))
                except Exception as e:
                    row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
                rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--probe", nargs=2, metavar=("BACKEND", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="exercise the script on CPU with the CPU kernels")
    args = parser.parse_args()
    global DEVICE, CASES, SHRINK, HQ, HKV
    if args.dry_run:
        DEVICE, CASES, SHRINK, HQ, HKV = "cpu", [("bf16", "cpu_flash"), ("fp32", "math")], 8, 4, 2
    if args.probe:
        try:
            print("PROBE " + json.dumps(probe_native_gqa(*args.probe)))
        except Exception as e:
            print("PROBE " + json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}))
        return 0

    from benchmarks.common import env_info, markdown_table, write_results

    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; nothing to check (--dry-run exercises the script on CPU)")
        return 1
    info = env_info()
    print(json.dumps(info))
    lines, rows = [], []

    # cuDNN LSE convention: the meta kernel's answer must match the real op's.
    if DEVICE == "cuda":
        x = torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
        real_4d = torch.ops.aten._scaled_dot_product_cudnn_attention(x, x, x, None, True)[1].dim() == 4
        lines.append(f"- cuDNN LSE is [B,H,S,1]: real op {real_4d}, meta probe {_cudnn_lse_is_4d()}")

    gqa = {}
    for dtype_name, backend in CASES:
        gqa[(backend, dtype_name)] = res = run_probe_subprocess(backend, dtype_name)
        ok = "error" not in res and all(r["ok"] for r in res.values())
        worst = "" if "error" in res else max(max(r["errs"].values()) for r in res.values())
        flag = BACKENDS[backend].native_gqa
        verdict = "native GQA works" if ok else f"native GQA fails ({res.get('error', 'wrong result')})"
        lines.append(f"- {backend} {dtype_name}: {verdict}; worst rel err {worst}; kernels.py native_gqa={flag}"
                     + ("  <-- MISMATCH" if ok != flag else ""))
        print(lines[-1], flush=True)

    for dtype_name, backend in CASES:
        dtype = DTYPES[dtype_name]
        for check in (check_blocks, check_global_lse):
            rows += check(backend, dtype)
        if dtype != torch.float32:
            rows += check_ring_world1(backend, dtype)
        bad = [r for r in rows if r["backend"] == backend and r["dtype"] == str(dtype).split(".")[-1] and not r["ok"]]
        print(f"{backend} {dtype_name}: {len(bad)} failures", flush=True)

    columns = ["check", "backend", "dtype", "heads", "shape", "causal", "layout", "out", "lse", "dq", "dk", "dv",
               "vs_sdpa", "sdpa_err", "ok", "error"]
    table = markdown_table(rows, columns)
    failures = [r for r in rows if not r["ok"]]
    summary = "\n".join(lines) + f"\n\n{len(rows) - len(failures)} of {len(rows)} checks pass " \
        f"(limits: Frobenius-relative error vs float64 <= {LIMIT[torch.bfloat16]} bf16, {LIMIT[torch.float32]} fp32)."
    path = write_results("check_cuda_kernels", info, rows, summary + "\n\n" + table, args.out)
    print(summary)
    print(markdown_table(failures, columns) if failures else "all checks pass")
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
