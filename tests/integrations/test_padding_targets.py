"""Which tokens of a padded batch are loss targets under the ring, against the padded model in one process.

Nothing predicts or is predicted by padding: a left-padded row's first real token is no target (Transformers'
padded model scores it from the last pad, the ring does not), and labels written on the padding
(``labels = input_ids.clone()``) are ignored, so the last real token of a right-padded row never learns to predict
the pad id. The reference is the stock "sdpa" model in one process with exactly those labels set to -100; losses
and LoRA gradients must agree, and the stock run with the labels as given must not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

import hf_ringcp
from tests.distributed import run_ranks
from tests.integrations.tiny import CONFIG, tiny_lora_llama
from tests.ring.reference import rel_error

TOLERANCE = 1e-5
PAD = 0
S, REAL = 12, 7  # row 1 holds REAL real tokens and S - REAL pads


def padded_batch(side: str, labels: str, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two rows, the second padded on ``side``; ``labels``: ``"collator"`` (-100 on the pads, as
    DataCollatorForLanguageModeling writes them) or ``"clone"`` (``input_ids.clone()``: the pad id on the pads).

    Returns the batch and the labels the ring trains on, as a padded single-process model takes them: -100 on the
    pads and, with left padding, on the first real token (which only a pad precedes).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, CONFIG.vocab_size, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, REAL:] = 0
    if side == "left":
        mask = mask.flip(1)
    ids[mask == 0] = PAD
    given = ids.clone() if labels == "clone" else torch.where(mask.bool(), ids, -100)
    expected = torch.where(mask.bool(), given, -100)
    if side == "left":
        expected[1, S - REAL] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": given}, expected


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _cases(rank: int, world: int) -> dict[tuple[str, str], dict[str, float]]:
    group = dist.new_group(list(range(world)))
    out = {}
    for side, labels in (("left", "collator"), ("left", "clone"), ("right", "clone")):
        batch, expected = padded_batch(side, labels)
        ref, ring = tiny_lora_llama("sdpa"), tiny_lora_llama("ring")
        reference = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=expected).loss
        reference.backward()
        with torch.no_grad():  # the padded model with the labels as given: what the ring must not reproduce
            stock = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss
        shard = hf_ringcp.shard_batch(batch, group, pad_token_id=PAD)
        with hf_ringcp.context_parallel(group):
            loss = hf_ringcp.causal_lm_loss(ring, shard)
            loss.backward()
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)  # each rank's part of the global token mean
        grads, ref_grads = _grads(ring), _grads(ref)
        for g in grads.values():
            dist.all_reduce(g, group=group)
        out[(side, labels)] = {
            "loss": rel_error(total, reference.detach()),
            "grad": max(rel_error(grads[n], ref_grads[n]) for n in ref_grads),
            "stock_loss": rel_error(total, stock),
        }
    return out


def test_padding_is_neither_predicted_nor_predicts() -> None:
    for rank, results in enumerate(run_ranks(_cases, 2, timeout=180)):
        for case, errors in results.items():
            assert errors["loss"] <= TOLERANCE and errors["grad"] <= TOLERANCE, f"rank {rank} {case}: {errors}"
            # The stock padded run scores one target more per left-padded row (and the pads of cloned labels).
            assert errors["stock_loss"] > 10 * TOLERANCE, f"rank {rank} {case}: {errors}"
