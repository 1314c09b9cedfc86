"""The CUDA block kernels (cudnn, flash, efficient) and ``ring_attention`` at world size 1 on one GPU, against
float64 attention from the same rounded inputs (skipped without CUDA).

1. native GQA: the raw op of each backend with 32 query / 8 KV heads must give the right out, LSE and grads where
   ``kernels.py`` says ``native_gqa=True`` (each probe in a subprocess, so that an op that faults cannot take the
   others down); one that works although flagged ``False`` only warns. The cuDNN LSE shape probe on the meta
   device must agree with the real op.
2. ``block_forward`` / ``block_backward`` on MHA and GQA, causal and not, square and rectangular (non-causal)
   blocks, contiguous ``[B, H, S, D]`` and strided inputs (row slices of ``[B, S, H, D]`` memory, as the ring
   passes them).
3. masked ``"band"`` blocks (the edge blocks of a sliding window) through the CUDA kernel that takes a mask
   (``masks=True``: efficient), via ``Kernels.for_call`` and ``additive_mask``.
4. the backward with the *global* out/LSE: two key blocks merged by ``OutputAccumulator``, then differentiated
   block by block (``backward_kernels``, ``RowAccumulator``, ``add_kv_grads``).
5. ``ring_attention`` at world size 1 for every layout and comm against float64 and ``F.scaled_dot_product_attention``;
   with packed documents (``cu_seqlens``) and a sliding window against ``documents_reference`` (1-token documents,
   which make 1 x 1 blocks, separately and in a subprocess: cuDNN rejects them); under bf16 CUDA autocast (float32
   inputs, and float32 q/k with bf16 v) against SDPA under the same autocast.

Run on a GPU machine: ``python -m pytest tests/gpu/test_cuda_kernels.py -q``.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hf_ringcp.ring import LAYOUTS, ring_attention
from hf_ringcp.ring.blocks import (
    Kernels,
    OutputAccumulator,
    RowAccumulator,
    add_kv_grads,
    backward_kernels,
    forward_calls,
    like,
)
from hf_ringcp.ring.kernels import BACKENDS, _cudnn_lse_is_4d, block_backward, block_forward, default_scale
from hf_ringcp.ring.plan import BlockCall
from tests.gpu.common import TOLERANCE, assert_close, documents, errors
from tests.ring.reference import documents_reference, reference_attention, rel_error
from tests.ring.test_kernels import _reference as block_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = Path(__file__).resolve().parents[2]
HQ, HKV, D = 32, 8, 128
CASES = [("cudnn", torch.bfloat16), ("flash", torch.bfloat16), ("efficient", torch.bfloat16),
         ("efficient", torch.float32)]
CASE_IDS = [f"{name}-{str(dtype).split('.')[-1]}" for name, dtype in CASES]
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def rand(shape, dtype, gen, layout: str = "bhsd") -> torch.Tensor:
    """Random ``[B, H, S, D]``; ``"bshd"`` gives a transposed view of ``[B, S, H, D]`` memory (as HF passes)."""
    b, h, s, d = shape
    if layout == "bshd":
        return torch.randn(b, s, h, d, generator=gen, device="cuda").to(dtype).transpose(1, 2)
    return torch.randn(b, h, s, d, generator=gen, device="cuda").to(dtype)


def visible_mask(sq: int, sk: int, causal: bool) -> torch.Tensor:
    visible = torch.ones(sq, sk, dtype=torch.bool, device="cuda")
    return visible.tril() if causal else visible


def reference(q, k, v, dout, visible) -> dict[str, torch.Tensor]:
    """float64 ``out, lse, dq, dk, dv`` of the blocks (tests.ring.test_kernels' reference, GQA-aware)."""
    out, lse, (dq, dk, dv) = block_reference(*(x.double() for x in (q, k, v, dout)), visible)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


# ------------------------------------------------------------------------------------------ 1. native GQA


def probe_native_gqa(backend: str, dtype_name: str) -> dict:
    """The raw op of ``backend`` with 8 KV heads for 32 query heads against float64; run in a subprocess."""
    dtype, be = DTYPES[dtype_name], BACKENDS[backend]
    gen = torch.Generator(device="cuda").manual_seed(7)
    result = {}
    for causal, sq, sk in ((True, 512, 512), (False, 384, 768)):
        key = f"causal={causal} {sq}x{sk}"
        try:
            q, dout = (rand((2, HQ, sq, D), dtype, gen, "bshd") for _ in range(2))
            k, v = (rand((2, HKV, sk, D), dtype, gen) for _ in range(2))
            ref = reference(q, k, v, dout, visible_mask(sq, sk, causal))
            scale = default_scale(D)
            out, lse = be.forward(q, k, v, causal, scale)
            dq, dk, dv = be.backward(dout, q, k, v, out, lse.float(), causal, scale)
            errs = errors({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}, ref)
            result[key] = {"errs": errs, "ok": all(e <= TOLERANCE[dtype] for e in errs.values())}
        except (RuntimeError, AssertionError) as e:
            result[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "ok": False}
    return result


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=CASE_IDS)
def test_native_gqa_flag_matches_the_op(backend: str, dtype) -> None:
    dtype_name = str(dtype).split(".")[-1]
    code = ("import json, sys; from tests.gpu.test_cuda_kernels import probe_native_gqa; "
            "print('PROBE ' + json.dumps(probe_native_gqa(sys.argv[1], sys.argv[2])))")
    proc = subprocess.run([sys.executable, "-c", code, backend, dtype_name], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, f"the probe died (rc={proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}"
    result = json.loads(lines[-1][6:])
    works = all(r["ok"] for r in result.values())
    if BACKENDS[backend].native_gqa:
        assert works, f"{backend} is flagged native_gqa=True but its op fails with un-repeated K/V: {result}"
    elif works:
        warnings.warn(f"{backend} {dtype_name} takes un-repeated K/V correctly: native_gqa=True would save the "
                      f"repeat ({result})", stacklevel=1)


def test_cudnn_lse_shape_probe_matches_the_real_op() -> None:
    x = torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
    real_4d = torch.ops.aten._scaled_dot_product_cudnn_attention(x, x, x, None, True)[1].dim() == 4
    assert real_4d == _cudnn_lse_is_4d()


# ------------------------------------------------------------------------------------ 2. block kernels


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize(("sq", "sk", "causal"), [(1024, 1024, True), (1024, 1024, False), (512, 1536, False),
                                                   (1536, 512, False)])
@pytest.mark.parametrize("layout", ["bhsd", "bshd-slice"])
def test_block_kernels(backend: str, dtype, heads: str, sq: int, sk: int, causal: bool, layout: str) -> None:
    be = BACKENDS[backend]
    hkv = HQ if heads == "mha" else HKV
    gen = torch.Generator(device="cuda").manual_seed(11)
    if layout == "bshd-slice":  # rows [64, 64 + S) of a longer [B, S, H, D] buffer, as in the ring
        q, dout = (rand((2, HQ, sq + 128, D), dtype, gen, "bshd")[:, :, 64 : 64 + sq] for _ in range(2))
        k, v = (rand((2, hkv, sk + 128, D), dtype, gen, "bshd")[:, :, 64 : 64 + sk] for _ in range(2))
    else:
        q, dout = (rand((2, HQ, sq, D), dtype, gen) for _ in range(2))
        k, v = (rand((2, hkv, sk, D), dtype, gen) for _ in range(2))
    ref = reference(q, k, v, dout, visible_mask(sq, sk, causal))
    scale = default_scale(D)
    out, lse = block_forward(be, q, k, v, causal, scale)
    dq, dk, dv = block_backward(be, dout, q, k, v, out, lse, causal, scale)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert_close({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}, ref, dtype, f"{backend} {heads}")


# -------------------------------------------------------------------------------------- 3. masked blocks


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("heads", ["mha", "gqa"])
@pytest.mark.parametrize(("sq", "sk", "lo", "hi"), [(200, 300, 0, 64), (512, 768, -256, 128), (256, 256, 0, 1),
                                                     (129, 77, -60, 90)])
def test_band_blocks_through_the_masking_kernel(dtype, heads: str, sq: int, sk: int, lo: int, hi: int) -> None:
    hkv = HQ if heads == "mha" else HKV
    gen = torch.Generator(device="cuda").manual_seed(19)
    q, dout = (rand((2, HQ, sq, D), dtype, gen, "bshd") for _ in range(2))
    k, v = (rand((2, hkv, sk, D), dtype, gen, "bshd") for _ in range(2))
    kernels = Kernels.choose("auto", q, k, needs_masks=True)
    assert kernels.masked is not None and kernels.masked.masks and kernels.masked.name == "efficient"
    call = BlockCall(0, sq, 0, sk, "band", lo=lo, hi=hi)  # query row i sees key row j iff lo <= i - j < hi
    backend, bias = kernels.for_call(call, q)
    visible = call.band_mask("cuda")
    assert backend is kernels.masked and bias.shape == (sq, sk) and visible.any(-1).all()
    ref = reference(q, k, v, dout, visible)
    scale = default_scale(D)
    out, lse = block_forward(backend, q, k, v, False, scale, bias)
    dq, dk, dv = block_backward(backend, dout, q, k, v, out, lse, False, scale, bias)
    assert_close({"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}, ref, dtype, f"band {lo}..{hi}")


def test_auto_kernels_on_cuda() -> None:
    q, k = torch.zeros(1, 8, 64, D, device="cuda", dtype=torch.bfloat16), torch.zeros(1, 2, 64, D, device="cuda",
                                                                                        dtype=torch.bfloat16)
    kernels = Kernels.choose("auto", q, k, needs_masks=True)
    assert kernels.plain.name == "cudnn" and kernels.masked.name == "efficient"
    assert Kernels.choose("auto", q.float(), k.float(), needs_masks=False).plain.name == "efficient"
    with pytest.raises(ValueError, match="takes no explicit mask"):
        Kernels.choose("flash", q, k, needs_masks=True)


# ------------------------------------------------------------------------- 4. global out/LSE, two key blocks


@pytest.mark.parametrize(("backend", "dtype"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("causal", [True, False])
def test_backward_with_the_global_out_and_lse(backend: str, dtype, causal: bool) -> None:
    kernels = Kernels(BACKENDS[backend])
    gen = torch.Generator(device="cuda").manual_seed(13)
    c = 1024
    q, dout = (rand((1, HQ, 2 * c, D), dtype, gen, "bshd") for _ in range(2))
    k, v = (rand((1, HKV, 2 * c, D), dtype, gen, "bshd") for _ in range(2))
    ref = reference(q, k, v, dout, visible_mask(2 * c, 2 * c, causal))
    if causal:  # the diagonal squares and the rectangle below them
        calls = [BlockCall(0, c, 0, c, "causal"), BlockCall(c, 2 * c, 0, c, "full"),
                 BlockCall(c, 2 * c, c, 2 * c, "causal")]
    else:
        calls = [BlockCall(0, 2 * c, 0, c, "full"), BlockCall(0, 2 * c, c, 2 * c, "full")]
    scale = default_scale(D)
    acc = OutputAccumulator(q)
    forward_calls(calls, q, k, v, acc, kernels, scale)
    out, lse = acc.result(dtype)
    dq = RowAccumulator(torch.empty_like(q, dtype=torch.float32))
    grads = backward_kernels(calls, like(dout, q), q, k, v, like(out, q), lse, dq, kernels, scale)
    dk, dv = (torch.zeros_like(x, dtype=torch.float32) for x in (k, v))
    add_kv_grads(grads, dk, dv)
    assert_close({"out": out, "lse": lse, "dq": dq.result(), "dk": dk, "dv": dv}, ref, dtype, backend)


# ------------------------------------------------------------------------------ 5. ring_attention, world 1


def _leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient"])
@pytest.mark.parametrize(("layout", "comm", "causal"), list(itertools.product(LAYOUTS, ("p2p", "allgather"),
                                                                               (True, False))))
def test_ring_attention_world1_matches_sdpa(backend: str, layout: str, comm: str, causal: bool) -> None:
    dtype, n = torch.bfloat16, 2048
    gen = torch.Generator(device="cuda").manual_seed(17)
    q, dout = (rand((1, HQ, n, D), dtype, gen, "bshd") for _ in range(2))
    k, v = (rand((1, HKV, n, D), dtype, gen, "bshd") for _ in range(2))
    full = _leaves(*(x.double() for x in (q, k, v)))
    ref_out = reference_attention(*full, causal=causal)
    ref_out.backward(dout.double())
    ref = {"out": ref_out.detach(), "dq": full[0].grad, "dk": full[1].grad, "dv": full[2].grad}

    leaves = _leaves(q, k, v)
    out = ring_attention(*leaves, causal=causal, layout=layout, comm=comm, backend=backend)
    out.backward(dout)
    got = {"out": out, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    assert out.dtype == dtype
    assert_close(got, ref, dtype, f"ring {layout}/{comm} vs float64")

    sdpa_leaves = _leaves(q, k, v)
    sdpa = F.scaled_dot_product_attention(*sdpa_leaves, is_causal=causal, enable_gqa=True)
    sdpa.backward(dout)
    sdpa_got = {"out": sdpa, "dq": sdpa_leaves[0].grad, "dk": sdpa_leaves[1].grad, "dv": sdpa_leaves[2].grad}
    assert_close(got, sdpa_got, dtype, f"ring {layout}/{comm} vs SDPA")


def documents_case(backend: str, window: int | None, layout: str, comm: str, lengths: list[int]) -> None:
    """``ring_attention`` (world size 1) over packed documents of ``lengths`` against ``documents_reference``."""
    dtype, hq, hkv = torch.bfloat16, 8, 2
    real, bounds, s = documents(layout, 1, lengths)
    gen = torch.Generator(device="cuda").manual_seed(23)
    q, dout = (rand((2, hq, s, D), dtype, gen, "bshd") for _ in range(2))
    k, v = (rand((2, hkv, s, D), dtype, gen, "bshd") for _ in range(2))
    is_real = torch.zeros(s, dtype=torch.bool, device="cuda")
    for a, b in real:
        is_real[a:b] = True
    dout = dout.masked_fill(~is_real[:, None], 0)  # padding feeds no loss

    full = _leaves(*(x.double() for x in (q, k, v)))
    ref_out = documents_reference(*full, real, window=window)
    ref_out.backward(dout.double())
    leaves = _leaves(q, k, v)
    out = ring_attention(*leaves, layout=layout, comm=comm, backend=backend, cu_seqlens=bounds, window=window)
    out.backward(dout)
    got = {"out": out[:, :, is_real], "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    ref = {"out": ref_out.detach()[:, :, is_real], "dq": full[0].grad, "dk": full[1].grad, "dv": full[2].grad}
    assert_close(got, ref, dtype, f"documents {layout}/{comm} {backend} window={window} lengths={lengths}")


# Odd lengths (unpadded under the global layouts), a short document and long ones; no 1-token document (below).
DOC_LENGTHS = [2, 37, 700, 3, 1500, 333, 2049, 2]


@pytest.mark.parametrize(("backend", "window"), [("auto", None), ("cudnn", None), ("flash", None),
                                                 ("efficient", None), ("auto", 256), ("efficient", 256),
                                                 ("auto", 1)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("comm", ["p2p", "allgather"])
def test_ring_attention_world1_documents_and_window(backend: str, window, layout: str, comm: str) -> None:
    documents_case(backend, window, layout, comm, DOC_LENGTHS)


def single_token_documents_case(backend: str) -> None:
    """1-token documents under the global layouts (zigzag pads them to 2): the plan makes 1 x 1 causal blocks."""
    for layout, comm in itertools.product(("contiguous", "striped"), ("p2p", "allgather")):
        documents_case(backend, None, layout, comm, [1, 64, 1, 5, 1, 130])


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "auto"])
def test_single_token_documents(backend: str) -> None:
    """1 x 1 blocks: cuDNN rejects ``s_q = s_kv = 1`` (torch 2.11 / cuDNN 9.19, and later cuDNN calls of the process
    may then fault), so :class:`~hf_ringcp.ring.blocks.Kernels` sends blocks of one query or key elsewhere. Run in a
    subprocess: a kernel that faults must not take the rest of the session down."""
    code = "import sys; from tests.gpu.test_cuda_kernels import single_token_documents_case as f; f(sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, backend], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"rc={proc.returncode}: {(proc.stderr or proc.stdout)[-1500:]}"


@pytest.mark.parametrize("comm", ["p2p", "allgather"])
@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16], ids=["v_float32", "v_bfloat16"])
def test_ring_attention_under_bf16_autocast_matches_sdpa(comm: str, v_dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(29)
    q, dout = (rand((2, HQ, 1024, D), torch.float32, gen, "bshd") for _ in range(2))
    k = rand((2, HKV, 1024, D), torch.float32, gen, "bshd")
    v = rand((2, HKV, 1024, D), torch.float32, gen, "bshd").to(v_dtype)
    leaves, sdpa_leaves = _leaves(q, k, v), _leaves(q, k, v)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ring_attention(*leaves, causal=True, comm=comm)
        ref = F.scaled_dot_product_attention(*sdpa_leaves, is_causal=True, enable_gqa=True)
    assert out.dtype == ref.dtype == torch.bfloat16
    out.backward(dout.to(out.dtype))
    ref.backward(dout.to(ref.dtype))
    for x, y in zip(leaves, sdpa_leaves):
        assert x.grad.dtype == y.grad.dtype == x.dtype
    got = {"out": out, "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    want = {"out": ref, "dq": sdpa_leaves[0].grad, "dk": sdpa_leaves[1].grad, "dv": sdpa_leaves[2].grad}
    assert_close(got, want, torch.bfloat16, f"autocast {comm} v={v_dtype}")
    assert rel_error(out, ref) <= TOLERANCE[torch.bfloat16]
