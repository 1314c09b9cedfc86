"""Decode step of one attention layer under CP, simulated on one GPU, against single-GPU decode of the same layer.

Llama-3-8B attention (32 query / 8 KV heads, head dim 128, bf16), batch 1, one new token over a cached prompt of
``S`` tokens (32K, 128K). Per layer and token:

- ``single``: single-GPU decode, ``F.scaled_dot_product_attention(enable_gqa=True)`` over the whole cache
  (``single_sdpa``), and the same fused kernel the ring uses over the whole cache (``single_fused``).
- ``rank_fused``: one rank's step of :func:`hf_ringcp.ring.decode.decode_attention` with ``visible=None`` (the
  fused kernel over the rank's ``S / P`` keys in bf16, returning out and LSE) plus the merge of ``P`` partials
  (:func:`~hf_ringcp.ring.decode.merge_partials`; the all-gather of the ``P * 33 KiB`` partials is not simulated).
- ``rank_einsum``: the same step by the float32 einsum path with its mask (the path before issue 25).
- ``append``: storing the new token on its rank: in place into pre-allocated storage (``append_inplace``) against
  re-concatenating the rank's cache (``append_cat``, the path before).

``bytes/token`` = K/V bytes a step must read (``2 * Hkv * N * D * 2``); ``GB/s`` = those over the step time.
``tokens/s`` = 1000 / step ms for one layer (a 32-layer model's attention takes 32 of them).
Target (issue 25): ``rank step <= 1.2 * single / P + merge``.

Usage: ``PYTHONPATH=$PWD python benchmarks/decode.py --out benchmarks/results`` (CPU: a dry run at small sizes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks.common import cuda_time_ms, env_info, markdown_table, write_results
from hf_ringcp.ring.decode import decode_backend, local_partial, local_partial_fused, merge_partials


def step_rows(seq: int, world: int, hq: int, hkv: int, d: int, device: str, dtype, timing) -> dict:
    g = torch.Generator(device=device).manual_seed(seq)
    q = torch.randn(1, hq, 1, d, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(1, hkv, seq, d, generator=g, device=device, dtype=dtype) for _ in range(2))
    n = seq // world
    kr, vr = k[:, :, :n].contiguous(), v[:, :, :n].contiguous()
    scale = d ** -0.5
    parts = torch.randn(world, 1, hq, 1, d + 1, generator=g, device=device)
    positions = torch.arange(n, device=device)[None]
    valid = torch.ones(1, n, dtype=torch.bool, device=device)
    pos = torch.tensor([[seq]], device=device)

    def single_sdpa():
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)

    def single_fused():
        return local_partial_fused(q, k, v, scale)

    def rank_fused():
        out, lse = local_partial_fused(q, kr, vr, scale)
        parts[0, ..., :-1] = out
        parts[0, ..., -1] = lse
        return merge_partials(parts)

    def rank_einsum():
        visible = valid[:, None, :] & (positions[:, None, :] <= pos[:, :, None])
        out, lse = local_partial(q, kr, vr, visible, scale)
        parts[0] = torch.cat([out, lse.unsqueeze(-1)], dim=-1)
        return merge_partials(parts)

    def merge_only():
        return merge_partials(parts)

    store = torch.empty(2, 1, hkv, n + 1024, d, device=device, dtype=dtype)
    new = torch.randn(2, 1, hkv, 1, d, generator=g, device=device, dtype=dtype)

    def append_inplace():
        store[:, :, :, n : n + 1] = new

    def append_cat():
        return torch.cat([kr, new[0]], dim=2), torch.cat([vr, new[1]], dim=2)

    ref = single_sdpa().float()
    fused_full = single_fused()[0].float()
    err = ((fused_full - ref).norm() / ref.norm()).item()
    times = {name: cuda_time_ms(fn, *timing)[0] for name, fn in [
        ("single_sdpa", single_sdpa), ("single_fused", single_fused), ("rank_fused", rank_fused),
        ("rank_einsum", rank_einsum), ("merge", merge_only), ("append_inplace", append_inplace),
        ("append_cat", append_cat)]}
    single = min(times["single_sdpa"], times["single_fused"])
    bytes_single, bytes_rank = 2 * hkv * seq * d * k.element_size(), 2 * hkv * n * d * k.element_size()
    row = {"S": seq, "P": world, "kernel": decode_backend(q.reshape(1, hkv, hq // hkv, d), k).name,
           **{f"{key}_ms": t for key, t in times.items()},
           "single_ms": single, "target_ms": 1.2 * single / world + times["merge"],
           "bytes_single_MiB": bytes_single / 2**20, "bytes_rank_MiB": bytes_rank / 2**20,
           "single_GBps": bytes_single / single / 1e6, "rank_fused_GBps": bytes_rank / times["rank_fused"] / 1e6,
           "tokens_per_s_single": 1e3 / single, "tokens_per_s_rank": 1e3 / times["rank_fused"],
           "speedup": single / times["rank_fused"], "fused_vs_sdpa_err": err}
    row["target_met"] = times["rank_fused"] <= row["target_ms"]
    return row


COLUMNS = ["S", "P", "kernel", "single_sdpa_ms", "single_fused_ms", "rank_fused_ms", "rank_einsum_ms", "merge_ms",
           "target_ms", "target_met", "speedup", "bytes_single_MiB", "bytes_rank_MiB", "single_GBps",
           "rank_fused_GBps", "tokens_per_s_single", "tokens_per_s_rank", "append_inplace_ms", "append_cat_ms",
           "fused_vs_sdpa_err"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=None, help="default 32768 131072 (CPU: 4096)")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--name", default="decode")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    seqlens = args.seqlens or ([32768, 131072] if cuda else [4096])
    timing = (200, 20, 20) if cuda else (1, 3, 1)  # a long warm-up: the clocks ramp up from idle
    info = env_info()
    print(json.dumps(info), flush=True)
    rows = []
    for seq in seqlens:
        rows.append(step_rows(seq, args.world, 32, 8, 128, device, torch.bfloat16, timing))
        print(json.dumps(rows[-1]), flush=True)
    table = markdown_table(rows, COLUMNS)
    note = ("One layer's decode step, batch 1, Llama-3-8B heads, bf16; times in ms (CUDA events, median of 20 "
            "samples of 20 back-to-back steps); see benchmarks/decode.py for the columns.")
    path = write_results(args.name, info, rows, note + "\n\n" + table, args.out)
    print(table)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
