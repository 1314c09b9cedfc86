"""hf_ringcp.shard_batch in one process (a CP world of 1); the multi-rank split is checked in test_hf_attention."""

from __future__ import annotations

import pytest
import torch
from transformers import BatchEncoding

import hf_ringcp

B, S = 2, 8


def _ids() -> torch.Tensor:
    return torch.arange(B * S).reshape(B, S)


def test_labels_are_shifted_before_sharding_and_positions_are_global() -> None:
    ids = _ids()
    labels = ids.clone()
    labels[0, 2] = -100
    out = hf_ringcp.shard_batch(BatchEncoding({"input_ids": ids, "labels": labels, "attention_mask": torch.ones(B, S)}))
    assert set(out) == {"input_ids", "position_ids", "shift_labels"}  # all-ones mask dropped, labels replaced
    assert torch.equal(out["input_ids"], ids)
    assert torch.equal(out["position_ids"], torch.arange(S).expand(B, S))
    assert torch.equal(out["shift_labels"][:, :-1], labels[:, 1:])
    assert (out["shift_labels"][:, -1] == -100).all()


def test_given_shift_labels_win_and_per_token_tensors_are_sharded() -> None:
    ids = _ids()
    shifted = torch.full((B, S), 7)
    extra = torch.randn(B, S, 3)
    out = hf_ringcp.shard_batch(
        {"input_ids": ids, "labels": ids, "shift_labels": shifted, "token_type_ids": extra, "num_items_in_batch": 5,
         "position_ids": torch.arange(S)}
    )
    assert torch.equal(out["shift_labels"], shifted)
    assert torch.equal(out["token_type_ids"], extra) and out["num_items_in_batch"] == 5


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"input_ids": torch.zeros(B, 7, dtype=torch.long)}, r"length \(7\) must be divisible by 2 \* cp_size = 2"),
        ({"input_ids": _ids(), "attention_mask": torch.tensor([[0] + [1] * (S - 1)] * B)}, r"padding.*Pack examples"),
        ({"input_ids": _ids(), "attention_mask": torch.ones(B, 1, S, S)}, r"2-D \[batch, seq\].*drop custom 4-D"),
        ({"input_ids": _ids(), "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]] * B)}, r"packed sequences"),
        ({"input_ids": _ids(), "labels": torch.zeros(B, S - 1)}, r"`labels` must be \[batch, seq\]"),
        ({"labels": _ids()}, r"needs `input_ids` or `inputs_embeds`"),
    ],
)
def test_rejected_batches(batch: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hf_ringcp.shard_batch(batch)


def test_contiguous_layout_needs_only_cp_divisibility_and_names_layout() -> None:
    out = hf_ringcp.shard_batch({"input_ids": torch.zeros(1, 7, dtype=torch.long)}, layout="contiguous")
    assert out["input_ids"].shape == (1, 7)
    with pytest.raises(ValueError, match="`layout` must be one of"):
        hf_ringcp.shard_batch({"input_ids": _ids()}, layout="striped")
