"""Merging partial attention results by their log-sum-exp (the online-softmax update)."""

from __future__ import annotations

import torch


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
    weight = torch.sigmoid(block_lse - lse).nan_to_num_(0.0).unsqueeze(-1)
    # ``lerp_`` is ``out + weight * (block_out - out)`` in one pass (``end`` must share ``out``'s dtype).
    out.lerp_(block_out.to(out.dtype), weight)
    torch.logaddexp(lse, block_lse, out=lse)

