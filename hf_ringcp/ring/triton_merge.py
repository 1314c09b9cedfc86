"""The LSE merge's output update as one Triton kernel (CUDA): read the float32 accumulator and the block once,
write once (10 bytes per element against the torch ops' 18: measured 2.0-2.1x faster on an H100).

Imported lazily by :mod:`hf_ringcp.ring.merge` (importing it imports Triton). Same function as
:func:`hf_ringcp.ring.merge.merge_into_torch`, which stays the reference (``tests/gpu/test_triton_merge.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lerp_kernel(
    out_ptr, w_ptr, blk_ptr,
    H, S, D,
    so_b, so_h, so_s, so_d,
    sb_b, sb_h, sb_s, sb_d,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out += w * (blk - out)`` per row, ``w`` ``[B, H, S]`` contiguous float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < S
    w = tl.load(w_ptr + pid_bh * S + rows, mask=row_ok, other=0.0)
    ok = row_ok[:, None] & (cols[None, :] < D)
    o_ptrs = out_ptr + b * so_b + h * so_h + rows[:, None] * so_s + cols[None, :] * so_d
    k_ptrs = blk_ptr + b * sb_b + h * sb_h + rows[:, None] * sb_s + cols[None, :] * sb_d
    o = tl.load(o_ptrs, mask=ok, other=0.0)
    x = tl.load(k_ptrs, mask=ok, other=0.0).to(tl.float32)
    tl.store(o_ptrs, o + w[:, None] * (x - o), mask=ok)


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """``out`` ``[B, H, S, D]`` float32 and ``lse`` ``[B, H, S]`` float32 (any strides) <- merged with the block
    ``block_out`` ``[B, H, S, D]`` (any float dtype) and ``block_lse`` ``[B, H, S]``, in place."""
    bsz, heads, seq, dim = out.shape
    if block_out.shape != out.shape or lse.shape != out.shape[:3] or block_lse.shape != lse.shape:
        raise AssertionError(f"merge shapes differ: {tuple(out.shape)}, {tuple(lse.shape)}, "
                             f"{tuple(block_out.shape)}, {tuple(block_lse.shape)}")
    if seq == 0:
        return
    block_d = triton.next_power_of_2(dim)
    block_m = max(1, min(64, 8192 // block_d))
    grid = (triton.cdiv(seq, block_m), bsz * heads)
    # The row weights and the new LSE by torch ops ([B, H, S]: 1/D of the bytes), the [B, H, S, D] update in one
    # kernel. (A version computing the weights inside the kernel too was 8 % faster but wrong on an H100 with
    # Triton 3.6 from row 32 of each 64-row tile on, though right in Triton's interpreter: dropped, see
    # benchmarks/results/fused_merge_h100_2026-12-05.md.)
    weight = torch.sigmoid(block_lse - lse).nan_to_num_(0.0).contiguous()
    torch.logaddexp(lse, block_lse, out=lse)
    _lerp_kernel[grid](out, weight, block_out, heads, seq, dim, *out.stride(), *block_out.stride(),
                       BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
