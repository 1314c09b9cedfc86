"""The LSE merge and the float32 accumulation, torch ops against the Triton merge, as bytes per second.

Shapes: a rank's query rows at 32K / 128K over P = 8 (4K, 16K rows; 32 heads of 128), float32 accumulators with
``[B, S, H, D]`` strides, bf16 blocks. Minimal bytes per element: merge 4 + 2 read, 4 written (10); the torch merge
moves 18 (a float32 copy of the block, then the lerp). ``acc += bf16`` (the dQ / dK / dV accumulation) is one
TensorIterator pass of 10 bytes per element already; its row shows whether a kernel could gain anything there.

Usage: ``PYTHONPATH=$PWD python benchmarks/fused_merge.py --out benchmarks/results`` (CUDA only).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import cuda_time_ms, env_info, markdown_table, write_results
from hf_ringcp.ring.merge import merge_into, merge_into_torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--pick", action="store_true",
                        help="print last the fastest variant whose error is below 1e-5 (torch if none)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    info = env_info()
    print(json.dumps(info), flush=True)
    rows = []
    for s in (4096, 16384):
        g = torch.Generator(device="cuda").manual_seed(s)
        acc = torch.randn(1, s, 32, 128, generator=g, device="cuda").transpose(1, 2)
        lse = torch.randn(1, 32, s, generator=g, device="cuda")
        blk = torch.randn(1, s, 32, 128, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        blse = torch.randn(1, 32, s, generator=g, device="cuda")
        n = acc.numel()
        ref_w = torch.sigmoid(blse.double() - lse.double())
        ref = acc.double() + ref_w[..., None] * (blk.double() - acc.double())
        for name, fn in (("torch", merge_into_torch), ("triton", merge_into)):
            t = (acc.clone(), lse.clone(), blk, blse)
            fn(*t)
            diff = (t[0].double() - ref).abs()
            err = (diff.max() / ref.abs().max()).item()
            where = (diff > 1e-4 * ref.abs().max()).nonzero()
            ms = cuda_time_ms(lambda t=t, fn=fn: fn(*t), 5, 20, 10)[0]
            rows.append({"rows": s, "op": f"merge_{name}", "ms": ms, "GBps_at_10B": n * 10 / ms / 1e6, "err": err,
                         "bad": where.shape[0], "first_bad": where[:4].tolist()})
            print(json.dumps(rows[-1]), flush=True)
        ms = cuda_time_ms(lambda t=(acc, blk): t[0].add_(t[1]), 5, 20, 10)[0]
        rows.append({"rows": s, "op": "add_fp32_bf16", "ms": ms, "GBps_at_10B": n * 10 / ms / 1e6})
        print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(rows, ["rows", "op", "ms", "GBps_at_10B", "err", "bad"])
    path = write_results("fused_merge", info, rows, "GB/s counted at the minimal 10 bytes per element.\n\n" + table,
                         args.out)
    print(table)
    print(f"wrote {path}")
    if args.pick:
        ok = {}
        for r in rows:
            if r["op"].startswith("merge_") and r["rows"] == 16384 and all(
                    x["err"] < 1e-5 for x in rows if x["op"] == r["op"]):
                ok[r["op"][6:]] = r["ms"]
        print(min(ok, key=ok.get) if ok else "torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
