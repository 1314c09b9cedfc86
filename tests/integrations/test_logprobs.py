"""Per-token log-probs of a sharded batch and their per-sequence sums equal one process, values and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_ranks


def _model(attn: str):
    from transformers import LlamaForCausalLM

    from tests.integrations.tiny import CONFIG

    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(copy.deepcopy(CONFIG), attn_implementation=attn, dtype=torch.float32)


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 96, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :5] = -100  # a "prompt"
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _reference() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model = _model("sdpa")
    batch = _batch()
    pos = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos,
                   use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    per_token = -torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100,
                                                   reduction="none")
    sums = per_token.sum(1)
    (sums * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    return sums.detach(), per_token.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _ring(rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    import hf_ringcp
    from hf_ringcp.integrations.logprobs import gather_tokens, sequence_log_probs, token_log_probs

    model = _model("ring")
    with hf_ringcp.context_parallel(dist.group.WORLD, layout="zigzag"):
        sharded = hf_ringcp.shard_batch(_batch(), dist.group.WORLD, layout="zigzag")
        per_token = token_log_probs(model, sharded, chunk_size=5)
        sums = sequence_log_probs(per_token, sharded)
        tokens = gather_tokens(per_token.detach(), sharded)
        (sums * torch.tensor([1.0, -2.0, 0.5])).sum().backward()
    grads = {}
    for name, p in model.named_parameters():  # what DDP does: the mean over the ranks
        dist.all_reduce(p.grad)
        grads[name] = p.grad / world
    return sums.detach(), tokens[:, :-1], grads


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_log_probs_equal_one_process(world: int) -> None:
    sums, per_token, grads = _reference()
    for got_sums, got_tokens, got_grads in run_ranks(_ring, world):
        torch.testing.assert_close(got_sums, sums, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_tokens, per_token, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(got_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
