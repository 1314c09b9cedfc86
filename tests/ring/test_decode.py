"""The fused decode step (one kernel in the cache's dtype) equals the float32 einsum path, alone and over gloo ranks."""

from __future__ import annotations

import pytest
import torch

from hf_ringcp.ring.decode import (
    decode_attention,
    decode_backend,
    local_partial,
    local_partial_fused,
    merge_partials,
)
from tests.distributed import run_ranks
from tests.ring.reference import rel_error


def _qkv(b: int, hq: int, hkv: int, length: int, n: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, length, 16, generator=g).to(dtype)
    k, v = (torch.randn(b, hkv, n, 16, generator=g).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 1)])
@pytest.mark.parametrize("length", [1, 3])
def test_fused_partial_matches_the_einsum_path(dtype, tol: float, heads: tuple[int, int], length: int) -> None:
    q, k, v = _qkv(2, *heads, length, 37, dtype)
    visible = torch.ones(2, length, 37, dtype=torch.bool)
    ref_out, ref_lse = local_partial(q, k, v, visible, 0.25)
    out, lse = local_partial_fused(q, k, v, 0.25)
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel_error(out, ref_out) < tol and rel_error(lse, ref_lse) < 1e-5


def test_fused_partial_without_keys_contributes_nothing() -> None:
    q, k, v = _qkv(1, 4, 2, 1, 0, torch.float32)
    out, lse = local_partial_fused(q, k, v, 0.25)
    assert torch.equal(out, torch.zeros_like(q)) and bool((lse == float("-inf")).all())
    assert decode_backend(q.reshape(1, 2, 2, 16), k).name == "cpu_flash"
    with pytest.raises(ValueError, match="backend"):
        decode_backend(q, k, "nope")


def _ranks(rank: int, world: int) -> dict:
    q, k, v = _qkv(2, 4, 2, 1, 8 * world, torch.float32, seed=3)
    n = [3, 8 * world - 3][rank]  # uneven shards
    mine = slice(0, n) if rank == 0 else slice(3, None)
    k_r, v_r = k[:, :, mine], v[:, :, mine]
    visible = torch.ones(2, 1, k_r.shape[2], dtype=torch.bool)
    fused = decode_attention(q, k_r, v_r, None, scale=0.25)
    einsum = decode_attention(q, k_r, v_r, visible, scale=0.25)
    full = torch.softmax((q.reshape(2, 2, 2, 16) @ k.transpose(-1, -2)) * 0.25, -1) @ v
    return {"fused": rel_error(fused, einsum), "ref": rel_error(fused, full.reshape(q.shape))}


def test_decode_attention_over_gloo_ranks() -> None:
    for errors in run_ranks(_ranks, 2):
        assert errors["fused"] < 1e-5 and errors["ref"] < 1e-5, errors


def test_merge_partials_equals_the_pairwise_merge() -> None:
    from hf_ringcp.ring.merge import merge_into_torch

    g = torch.Generator().manual_seed(2)
    parts = torch.randn(4, 2, 3, 1, 9, generator=g)
    parts[1, 0, 0, 0, -1] = float("-inf")  # a rank with no key for this row
    parts[:, 1, 2, 0, -1] = float("-inf")  # a row no rank has a key for
    out, lse = parts[0, ..., :-1].clone(), parts[0, ..., -1].clone()
    for p in parts[1:]:
        merge_into_torch(out, lse, p[..., :-1], p[..., -1])
    merged = merge_partials(parts)
    seen = lse.isfinite()  # (the pairwise merge keeps rank 0's out where nobody has a key; the reduction gives 0)
    assert torch.allclose(merged[seen], out[seen], atol=1e-6) and not merged.isnan().any()
    assert torch.equal(merged[1, 2], torch.zeros_like(merged[1, 2]))
