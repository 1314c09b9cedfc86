"""The chunked causal-LM loss in one process: exact against the stock loss, and no full logits kept."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Gemma2Config, GraniteConfig

import hf_ringcp
from hf_ringcp.integrations.loss import chunked_cross_entropy_sum
from tests.integrations.test_hf_attention import tiny_model
from tests.ring.reference import rel_error

H, V = 48, 160  # distinct sizes, so a saved [n, V] logits tensor is recognisable


def _head_and_data(n: int = 37):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the head's initial weights too: every input of a test is seeded
    head = torch.nn.Linear(H, V)
    hidden = torch.randn(n, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = -100
    return head, hidden, labels


@pytest.mark.parametrize("chunk_size", [1, 5, 37, 4096])
def test_chunked_sum_equals_cross_entropy_sum(chunk_size: int) -> None:
    head, hidden, labels = _head_and_data()
    expected = F.cross_entropy(head(hidden), labels, ignore_index=-100, reduction="sum")
    (d_expected,) = torch.autograd.grad(expected, hidden)
    got, count = chunked_cross_entropy_sum(hidden, head, labels, chunk_size)
    (d_got,) = torch.autograd.grad(got, hidden)
    assert count.item() == (labels != -100).sum().item()
    # float32: one-token chunks reorder the gradient's sums (1.02e-6 seen with torch 2.13's CPU kernels).
    assert rel_error(got, expected) <= 1e-6 and rel_error(d_got, d_expected) <= 3e-6


def test_chunks_keep_no_logits_for_backward() -> None:
    head, hidden, labels = _head_and_data(64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        chunked_cross_entropy_sum(hidden, head, labels, chunk_size=16)
    assert saved, "the hook saw nothing: the test is broken"
    assert not [s for s in saved if s and s[-1] == V], f"logits saved for backward: {saved}"


def test_bad_chunk_size_and_shapes() -> None:
    head, hidden, labels = _head_and_data()
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        chunked_cross_entropy_sum(hidden, head, labels, 0)
    with pytest.raises(ValueError, match="must agree on all but the last"):
        chunked_cross_entropy_sum(hidden, head, labels[:-1], 8)


def _batch(s: int = 12):
    ids = torch.randint(0, 128, (2, s), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, :4] = -100
    return ids, labels


def test_loss_equals_stock_loss_and_num_items_normalises() -> None:
    model = tiny_model("llama", "ring")
    ids, labels = _batch()
    expected = model(input_ids=ids, labels=labels).loss
    batch = hf_ringcp.shard_batch({"input_ids": ids, "labels": labels})
    assert rel_error(hf_ringcp.causal_lm_loss(model, batch, chunk_size=5), expected) <= 1e-6
    n = int((labels[:, 1:] != -100).sum())
    halved = hf_ringcp.causal_lm_loss(model, batch, num_items_in_batch=2 * n)  # e.g. 2 accumulation steps
    assert rel_error(2 * halved, expected) <= 1e-6


def test_final_logit_softcapping_is_applied_like_the_model() -> None:
    config = Gemma2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, attn_logit_softcapping=None, final_logit_softcapping=0.5,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="ring")
    ids, labels = _batch()
    expected = model(input_ids=ids, labels=labels).loss
    got = hf_ringcp.causal_lm_loss(model, hf_ringcp.shard_batch({"input_ids": ids, "labels": labels}))
    assert rel_error(got, expected) <= 1e-6


def test_ambiguous_logit_scaling_raises_unless_given() -> None:
    config = GraniteConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, logits_scaling=4.0,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="ring")
    ids, labels = _batch()
    batch = hf_ringcp.shard_batch({"input_ids": ids, "labels": labels})
    with pytest.raises(ValueError, match=r"logits_scaling=4.0.*logits_transform="):
        hf_ringcp.causal_lm_loss(model, batch)
    got = hf_ringcp.causal_lm_loss(model, batch, logits_transform=lambda x: x / 4.0)
    assert rel_error(got, model(input_ids=ids, labels=labels).loss) <= 1e-6


def test_missing_shift_labels_names_shard_batch() -> None:
    with pytest.raises(ValueError, match=r"needs `shift_labels`.*shard_batch"):
        hf_ringcp.causal_lm_loss(tiny_model("llama", "ring"), {"input_ids": torch.zeros(1, 4, dtype=torch.long)})


def _sharded_loss(rank: int, world: int) -> dict[str, float]:
    """The per-rank losses add up to the single-process loss; so do the gradients; the counts are global."""
    from hf_ringcp.integrations.batch import count_targets

    torch.manual_seed(0)
    model = tiny_model("llama", "ring")
    ids, labels = _batch(4 * world)
    expected = model(input_ids=ids, labels=labels)
    (ref_grad,) = torch.autograd.grad(expected.loss, model.lm_head.weight)
    batch = hf_ringcp.shard_batch({"input_ids": ids, "labels": labels})
    with hf_ringcp.context_parallel():
        local = hf_ringcp.causal_lm_loss(model, batch, chunk_size=3)
        (grad,) = torch.autograd.grad(local, model.lm_head.weight)
    total = local.detach().clone()
    torch.distributed.all_reduce(total)
    torch.distributed.all_reduce(grad)
    return {"loss": rel_error(total, expected.loss), "grad": rel_error(grad, ref_grad),
            "count": float(int(count_targets([batch])) != int((labels[:, 1:] != -100).sum()))}


def test_loss_over_ranks_is_the_global_token_mean() -> None:
    from tests.distributed import run_ranks

    for rank, errors in enumerate(run_ranks(_sharded_loss, 2)):
        assert errors["count"] == 0.0, f"rank {rank}: the global target count is wrong"
        assert errors["loss"] <= 1e-6 and errors["grad"] <= 1e-5, f"rank {rank}: {errors}"
