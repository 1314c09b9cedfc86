"""Merging partial attention results by their log-sum-exp (the online-softmax update).

:func:`merge_into` runs one fused Triton kernel on CUDA tensors when Triton imports (:mod:`.triton_merge`: one
read of the accumulator and of the block, one write: 10 bytes per bf16 element instead of the 18 of the torch
ops), and the torch ops (:func:`merge_into_torch`, the reference) everywhere else.
"""

from __future__ import annotations

import functools

import torch


def merge_into_torch(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """:func:`merge_into` by torch ops (the CPU path and the reference of the fused kernel)."""
    weight = torch.sigmoid(block_lse - lse).nan_to_num_(0.0).unsqueeze(-1)
    # ``lerp_`` is ``out + weight * (block_out - out)`` in one pass (``end`` must share ``out``'s dtype).
    out.lerp_(block_out.to(out.dtype), weight)
    torch.logaddexp(lse, block_lse, out=lse)


#: Run the Triton merge on CUDA where it imports (False: the torch ops everywhere; benchmarks compare the two).
FUSED = True


@functools.cache
def _fused():
    """The Triton merge, or ``None`` where Triton does not import (no GPU build, no compiler)."""
    try:
        from hf_ringcp.ring import triton_merge
    except ImportError:
        return None
    return triton_merge


def fused_merge_available(device: torch.device) -> bool:
    """Whether :func:`merge_into` runs the fused Triton kernel for tensors on ``device``."""
    return FUSED and device.type == "cuda" and _fused() is not None


def merge_into(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one block's partial result into the running ``(out, lse)``, in place.

    ``out`` ``[..., S, D]`` float32 and ``lse`` ``[..., S]`` float32 hold the attention of the queries over the
    keys seen so far; ``block_out`` (any float dtype) and ``block_lse`` over a disjoint set of keys. With
    ``a = lse`` and ``b = block_lse`` the softmax over the union of keys has normaliser ``log(e^a + e^b)`` and
    output ``(e^a out + e^b block_out) / (e^a + e^b)``; rewritten with the sigmoid that is::

        out <- out + sigmoid(b - a) * (block_out - out)        (a lerp)
        lse <- a - logsigmoid(a - b)          (= logaddexp(a, b))

    which needs no exponentials of large numbers (cf. Milakov & Gimelshein 2018, "Online normalizer
    calculation for softmax"; the same form as ring-flash-attention's ``_update_out_and_lse``).
    Rows whose keys were all masked (``lse = -inf`` on both sides) stay unchanged instead of becoming NaN.
    """
    if FUSED and out.is_cuda and out.dim() == 4 and out.dtype == torch.float32 and _fused() is not None:
        _fused().merge_into(out, lse, block_out, block_lse)
    else:
        merge_into_torch(out, lse, block_out, block_lse)
