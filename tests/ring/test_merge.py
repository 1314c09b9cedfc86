"""The LSE merge equals attention over the union of key blocks."""

from __future__ import annotations

import torch

from hf_ringcp.ring.merge import merge_into
from tests.ring.reference import merge_lse_reference, rel_error


def _block(q, k, v):
    s = q @ k.transpose(-1, -2)
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def test_merging_blocks_equals_full_softmax() -> None:
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for n in (5, 12, 12))
    full_out, full_lse = _block(q, k, v)
    outs, lses = zip(*(_block(q, k[:, :, i : i + 4], v[:, :, i : i + 4]) for i in (0, 4, 8)))
    out, lse = outs[0].float().clone(), lses[0].float().clone()
    for o, block_lse in zip(outs[1:], lses[1:]):
        merge_into(out, lse, o.float(), block_lse.float())
    assert rel_error(out, full_out) < 1e-6
    assert rel_error(lse, full_lse) < 1e-6
    ref_out, ref_lse = merge_lse_reference(list(outs), list(lses))
    assert rel_error(ref_out, full_out) < 1e-12 and rel_error(ref_lse, full_lse) < 1e-12


def test_merge_is_stable_for_large_and_masked_scores() -> None:
    out = torch.tensor([[1.0, 2.0]])
    lse = torch.tensor([1000.0])
    merge_into(out, lse, torch.tensor([[3.0, 4.0]]), torch.tensor([1000.0]))
    assert torch.allclose(out, torch.tensor([[2.0, 3.0]])) and torch.isfinite(lse).all()
    empty_out, empty_lse = torch.zeros(1, 2), torch.tensor([float("-inf")])
    merge_into(empty_out, empty_lse, torch.zeros(1, 2), torch.tensor([float("-inf")]))
    assert not empty_out.isnan().any() and empty_lse.item() == float("-inf")
    merge_into(empty_out, empty_lse, torch.tensor([[5.0, 6.0]]), torch.tensor([0.5]))
    assert torch.equal(empty_out, torch.tensor([[5.0, 6.0]])) and empty_lse.item() == 0.5
