"""Block attention kernels that return the log-sum-exp, and the choice between them.

Every backend computes, for one block of queries against one block of keys/values::

    forward(q, k, v, causal, scale, bias)                  -> (out, lse)
    backward(dout, q, k, v, out, lse, causal, scale, bias) -> (dq, dk, dv)

Shapes: ``q`` ``[B, Hq, Sq, D]``; ``k``, ``v`` ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (not repeated);
``out`` like ``q`` in the input dtype; ``lse`` ``[B, Hq, Sq]`` float32, natural log. ``causal`` on
square blocks (``Sq == Sk``) means the usual lower-triangular mask. The planned ring never asks a kernel for a
rectangular causal block; only the all-gather's prefix calls (:mod:`hf_ringcp.ring.allgather_prefix`) do, with
``Sq < Sk`` and the diagonal aligned at the bottom right, and only of a kernel that :func:`aligns_bottom_right`
(flash does; the others' alignments differ, so they get an explicit mask there). ``bias`` is
``None`` or an additive ``[Sq, Sk]`` mask (0 where visible, ``-inf`` where not) for the masked edge blocks of a
sliding window (:class:`~hf_ringcp.ring.plan.BlockCall` ``kind="band"``); only backends with ``masks=True`` get
one, and the planner never leaves a query row of a masked block without a visible key.

The backward takes ``out`` and ``lse`` of the *whole* attention (all blocks merged), not of this block:
with those, the flash-style backward of each block yields exactly its share of the global gradient.

Kernel choice is a list of small ``supports`` checks, each returning ``None`` when the backend can run or a
reason when it cannot; ``backend="auto"`` takes the first that can, in order of measured speed.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

aten = torch.ops.aten

ForwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
BackwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Backend:
    """One block kernel: its forward, backward and the check of whether it can run on given inputs.

    ``native_gqa``: the op takes K/V with fewer heads than Q and returns dK/dV with those heads. Verified on an
    H100/H200 (torch 2.11, cuDNN 9.19) for cudnn and flash by ``tests/gpu/test_cuda_kernels.py``; the efficient
    kernel refuses such K/V, so :func:`block_forward`/:func:`block_backward` repeat them for it.
    """

    name: str
    forward: ForwardFn
    backward: BackwardFn
    supports: Callable[[torch.Tensor, torch.Tensor], str | None]
    native_gqa: bool
    #: Whether the op takes an additive mask (needed for the masked edge blocks of a sliding window).
    masks: bool = False


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _sum_kv_grad(dx: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return dx
    b, h, s, d = dx.shape
    return dx.view(b, h // groups, groups, s, d).sum(dim=2)


# ----------------------------------------------------------------------------------------------- CPU flash


def _cpu_flash_forward(q, k, v, causal, scale, bias=None):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias, scale=scale)
    return out, lse


def _cpu_flash_backward(dout, q, k, v, out, lse, causal, scale, bias=None):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, causal, attn_mask=bias, scale=scale
    )


def _cpu_flash_supports(q, k):
    if q.device.type != "cpu":
        return f"it runs on CPU tensors only (got {q.device.type})"
    if q.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not supported"
    return None


# ------------------------------------------------------------------------------------------- CUDA kernels


def _cuda_half_supports(max_head_dim: int) -> Callable[[torch.Tensor, torch.Tensor], str | None]:
    def check(q, k):
        if q.device.type != "cuda":
            return f"it runs on CUDA tensors only (got {q.device.type})"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"it needs float16 or bfloat16 inputs (got {q.dtype})"
        if q.shape[-1] % 8 != 0 or q.shape[-1] > max_head_dim:
            return f"head_dim must be a multiple of 8 and at most {max_head_dim} (got {q.shape[-1]})"
        return None

    return check


def _cudnn_supports(q, k):
    reason = _cuda_half_supports(128)(q, k)
    if reason is None and torch.cuda.get_device_capability(q.device)[0] < 8:
        reason = "cuDNN attention needs an Ampere or newer GPU"
    return reason


def _cudnn_forward(q, k, v, causal, scale, bias=None):
    res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    lse = res[1]
    return res[0], lse.squeeze(-1) if lse.dim() == 4 else lse


@functools.cache
def _cudnn_lse_is_4d() -> bool:
    """Whether this torch's cuDNN attention returns (and its backward takes) the LSE as ``[B, H, S, 1]``."""
    x = torch.empty(1, 1, 8, 8, device="meta", dtype=torch.bfloat16)
    return aten._scaled_dot_product_cudnn_attention(x, x, x, None, True)[1].dim() == 4


def _cudnn_backward(dout, q, k, v, out, lse, causal, scale, bias=None):
    # torch caches the cuDNN backward graph by the shapes and strides of q, k, v only, but bakes the strides of
    # out, dout and the LSE into it: they must be a function of q's. Pass them with q's exact strides (the ring
    # keeps them so; otherwise all three are made contiguous) and the LSE contiguous.
    if out.stride() != q.stride() or dout.stride() != q.stride():
        q, out, dout = q.contiguous(), out.contiguous(), dout.contiguous()
    # cum_seq_q/k must be undefined (None): a defined tensor selects the nested-tensor (varlen) path.
    lse = lse.contiguous().unsqueeze(-1) if _cudnn_lse_is_4d() else lse.contiguous()
    empty = torch.empty(0, device=q.device)
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, empty, empty, None, None, None, q.shape[2], k.shape[2], 0.0,
        causal, scale=scale,
    )


def _flash_forward(q, k, v, causal, scale, bias=None):
    res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    return res[0], res[1]


def _flash_backward(dout, q, k, v, out, lse, causal, scale, bias=None):
    # cum_seq_q/k must be undefined (None): a defined tensor selects the varlen kernel.
    empty = torch.empty(0, device=q.device)
    return aten._scaled_dot_product_flash_attention_backward(
        dout, q, k, v, out, lse.contiguous(), None, None, q.shape[2], k.shape[2], 0.0, causal, empty, empty,
        scale=scale,
    )


def _efficient_supports(q, k):
    if q.device.type != "cuda":
        return f"it runs on CUDA tensors only (got {q.device.type})"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported"
    return None


def _efficient_bias(bias, q, k):
    """The additive mask as the kernel takes it: ``[B, H, Sq, Sk]`` in q's dtype, rows 16-element aligned."""
    if bias is None:
        return None
    sk = bias.shape[-1]
    padded = torch.zeros(bias.shape[0], -(-sk // 16) * 16, dtype=q.dtype, device=q.device)
    padded[:, :sk] = bias
    return padded[:, :sk].expand(q.shape[0], q.shape[1], -1, -1)


def _efficient_forward(q, k, v, causal, scale, bias=None):
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
        q, k, v, _efficient_bias(bias, q, k), True, 0.0, causal, scale=scale
    )
    # The kernel pads the LSE's sequence dimension to a multiple of 32.
    return out, lse[..., : q.shape[2]]


def _efficient_backward(dout, q, k, v, out, lse, causal, scale, bias=None):
    pad = (-lse.shape[-1]) % 32
    lse = torch.nn.functional.pad(lse, (0, pad)) if pad else lse.contiguous()
    empty = torch.empty(0, device=q.device, dtype=torch.int64)
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, _efficient_bias(bias, q, k), out, lse, empty, empty, 0.0, [True, True, True, False], causal,
        scale=scale,
    )
    return dq, dk, dv


# ------------------------------------------------------------------------------------------- math (any)


def _math_scores(q, k, causal, scale, bias):
    """Scores grouped by KV head: ``[B, Hkv, G, Sq, Sk]`` in at least float32."""
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).reshape(b, hkv, hq // hkv, sq, d)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.to(acc)) * scale
    if causal:
        mask = torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    if bias is not None:
        s = s + bias.to(acc)
    return s


def _math_forward(q, k, v, causal, scale, bias=None):
    s = _math_scores(q, k, causal, scale, bias)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, v.to(p.dtype))
    b, hq, sq, d = q.shape
    return out.reshape(b, hq, sq, d).to(q.dtype), lse.reshape(b, hq, sq).float()


def _math_backward(dout, q, k, v, out, lse, causal, scale, bias=None):
    b, hq, sq, d = q.shape
    hkv = k.shape[1]
    s = _math_scores(q, k, causal, scale, bias)
    acc = s.dtype
    p = torch.exp(s - lse.to(acc).reshape(b, hkv, hq // hkv, sq, 1))
    do = dout.to(acc).reshape(b, hkv, hq // hkv, sq, d)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, do)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", do, v.to(acc))
    delta = (do * out.to(acc).reshape(do.shape)).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, k.to(acc)).reshape(q.shape)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, q.to(acc).reshape(do.shape))
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _math_supports(q, k):
    return None


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("cudnn", _cudnn_forward, _cudnn_backward, _cudnn_supports, native_gqa=True),
        Backend("flash", _flash_forward, _flash_backward, _cuda_half_supports(256), native_gqa=True),
        Backend("efficient", _efficient_forward, _efficient_backward, _efficient_supports, native_gqa=False,
                masks=True),
        Backend("cpu_flash", _cpu_flash_forward, _cpu_flash_backward, _cpu_flash_supports, native_gqa=True,
                masks=True),
        Backend("math", _math_forward, _math_backward, _math_supports, native_gqa=True, masks=True),
    )
}
BACKEND_NAMES = ("auto", *BACKENDS)
# Measured order on Hopper (docs/performance.md): cuDNN (~535-565 TFLOP/s causal fwd+bwd on H100) > flash (~320)
# > efficient (~145); math is the last resort.
_AUTO_ORDER = ("cudnn", "flash", "efficient", "cpu_flash", "math")


def bottom_right_mask(sq: int, sk: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``[Sq, Sk]`` additive causal mask aligned at the bottom right: query ``i`` sees keys ``j <= i + Sk - Sq``."""
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return additive_mask(j <= i + (sk - sq), dtype)


@functools.cache
def _probe_bottom_right(name: str, device: str) -> bool:
    """Run ``name``'s causal kernel once on a small ``Sq < Sk`` block and compare with the bottom-right mask."""
    backend = BACKENDS[name]
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 2, 64, 64, generator=g, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, 192, 64, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
    try:
        out, _ = backend.forward(q, k, v, True, 0.125)
    except RuntimeError:
        return False
    ref, _ = _math_forward(q, k, v, False, 0.125, bottom_right_mask(64, 192, torch.float32, device))
    return bool(((out.float() - ref.float()).abs().max() < 2e-2).item())


def aligns_bottom_right(backend: Backend, device: torch.device | str) -> bool:
    """Whether ``backend``'s ``causal=True`` with ``Sq < Sk`` masks bottom-right (query ``i`` sees keys
    ``j <= i + Sk - Sq``), forward and backward, on ``device``.

    Flash attention (FA2) aligns causal masks so, which ``torch.nn.attention.bias.causal_lower_right`` relies on;
    cuDNN is probed once per device (torch's op may set either alignment); the CPU kernels align top-left.
    """
    if backend.name == "flash":
        return True
    device = torch.device(device)
    if backend.name == "cudnn" and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return _probe_bottom_right("cudnn", str(device))
    return False


def select_backend(name: str, q: torch.Tensor, k: torch.Tensor, masked: bool = False) -> Backend:
    """Return the backend ``name`` (or the fastest that can run, for ``"auto"``) for these inputs.

    ``masked``: the backend must take an explicit mask (the edge blocks of a sliding window); for ``"auto"`` the
    fastest backend that can.

    Raises ``ValueError`` for an unknown name or an explicit backend that cannot run on the inputs.
    """
    check_backend_name(name)
    if name == "auto":
        for candidate in _AUTO_ORDER:
            backend = BACKENDS[candidate]
            if backend.supports(q, k) is None and (backend.masks or not masked):
                return backend
        raise AssertionError("the math backend supports every input")
    reason = BACKENDS[name].supports(q, k)
    if reason is None and masked and not BACKENDS[name].masks:
        usable = [n for n in _AUTO_ORDER if BACKENDS[n].masks and BACKENDS[n].supports(q, k) is None]
        reason = f"it takes no explicit mask, which the edge blocks of a sliding window need (these can: {usable})"
    if reason is not None:
        raise ValueError(f"backend={name!r} cannot run on these inputs: {reason}. Use backend='auto'.")
    return BACKENDS[name]


def check_backend_name(name: str) -> None:
    """Raise ``ValueError`` naming the valid backends unless ``name`` is one of them."""
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"`backend` must be one of {BACKEND_NAMES}, but got {name!r}; use backend='auto' to pick the fastest "
            "kernel that can run."
        )


def default_scale(head_dim: int) -> float:
    """The softmax scale SDPA uses by default: ``1 / sqrt(head_dim)``."""
    return 1.0 / math.sqrt(head_dim)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[Sq, Sk]`` bool (True: visible) -> the additive mask the kernels take (0 / ``-inf``)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill_(~visible, float("-inf"))


def block_forward(
    backend: Backend, q, k, v, causal: bool, scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one block; handles GQA for kernels that need repeated K/V. ``bias``: see the module doc."""
    groups = q.shape[1] // k.shape[1]
    if not backend.native_gqa:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    out, lse = backend.forward(q, k, v, causal, scale, bias)
    return out, lse.float()


def block_backward(backend: Backend, dout, q, k, v, out, lse, causal: bool, scale: float,
                   bias: torch.Tensor | None = None):
    """Gradient of one block given the merged ``out`` and ``lse``; ``dk``/``dv`` have ``Hkv`` heads."""
    groups = q.shape[1] // k.shape[1]
    if not backend.native_gqa:
        k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
    dq, dk, dv = backend.backward(dout, q, k, v, out, lse, causal, scale, bias)
    if not backend.native_gqa:
        dk, dv = _sum_kv_grad(dk, groups), _sum_kv_grad(dv, groups)
    return dq, dk, dv
