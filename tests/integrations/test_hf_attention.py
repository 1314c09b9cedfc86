"""attn_implementation="ring" on P gloo ranks equals the single-process "sdpa" model: logits, loss, gradients.

Each distributed test spawns the ranks once and loops over its cases inside the workers (spawning a rank with
transformers imported costs seconds); the workers return errors that the parent asserts.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.masking_utils import AttentionMaskInterface

import hf_ringcp
from hf_ringcp.integrations.hf_attention import ring_attention_forward, ring_attention_mask
from tests.distributed import run_ranks
from tests.ring.reference import rel_error

TOLERANCE = 1e-5
VOCAB = 128
SEQ = 32
TINY = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=VOCAB, max_position_embeddings=256,
)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**TINY, **kw),
    # Qwen2 passes `sliding_window` to the attention (None here: use_sliding_window=False).
    "qwen2": lambda **kw: Qwen2Config(**TINY, use_sliding_window=False, **kw),
    # Mistral passes its window (4096 by default) on every layer: longer than the sequence, so harmless.
    "mistral": lambda **kw: MistralConfig(**TINY, **kw),
}
LORA = {
    "lora": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "lm_head"]),
    "lora_mts": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
}
LORA["lora_ddp"] = LORA["lora"]  # and the ring model inside DistributedDataParallel over the CP group


def tiny_model(kind: str, attn: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A float32 tiny model of ``kind`` with deterministic weights (the same for every ``attn``)."""
    torch.manual_seed(seed)
    # from_config(..., attn_implementation=...) writes into the config: each model gets a fresh one.
    config = CONFIGS[kind](**overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def model_pair(kind: str, variant: str, checkpointing: bool, **overrides):
    """``(reference "sdpa" model, "ring" model)`` with identical weights, in training mode."""
    ref, ring = tiny_model(kind, "sdpa", **overrides), tiny_model(kind, "ring", **overrides)
    for m in (ref, ring):
        if checkpointing:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if variant != "full":
        # Random (not zero) LoRA B, so every adapter weight gets a non-zero gradient to compare.
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **LORA[variant])
        torch.manual_seed(1)
        ref = get_peft_model(ref, lora)
        ring = get_peft_model(ring, copy.deepcopy(lora))
        ring.load_state_dict(ref.state_dict())
    ref.train()
    ring.train()
    return ref, ring


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def _case_errors(group, world: int, case: tuple, seed: int) -> dict[str, float]:
    kind, layout, comm, checkpointing, variant = case
    ref, ring = model_pair(kind, variant, checkpointing)
    ddp = variant.endswith("_ddp") and world > 1
    if ddp:
        # DDP averages the gradients over the group: causal_lm_loss must go through the wrapper's forward.
        ring = torch.nn.parallel.DistributedDataParallel(ring, process_group=group)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, -3:] = -100

    expected = ref(input_ids=ids, labels=labels, use_cache=False)
    expected.loss.backward()

    batch = hf_ringcp.shard_batch({"input_ids": ids, "labels": labels}, group, layout=layout)
    # Labels are shifted before sharding: the target of each shard's last token is the next shard's first.
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    assert torch.equal(hf_ringcp.unshard_sequence(batch["shift_labels"], 1, group, layout=layout), shifted)
    with hf_ringcp.context_parallel(group, layout=layout, comm=comm):
        with torch.no_grad():
            logits = ring(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        loss = hf_ringcp.causal_lm_loss(ring, batch, chunk_size=7)
        loss.backward()
        if variant == "full" and not checkpointing:
            # Counting the targets up front (gradient accumulation) must give the same normalisation.
            with torch.no_grad():
                counted = hf_ringcp.causal_lm_loss(ring, batch, num_items_in_batch=int((shifted != -100).sum()))
    errors = {}
    if variant == "full" and not checkpointing:
        errors["num_items"] = rel_error(counted, loss.detach())
    grads, ref_grads = _grads(ring.module if ddp else ring), _grads(ref)
    assert set(grads) == set(ref_grads), "the two models must train the same parameters"
    missing = [n for n in grads if grads[n] is None or ref_grads[n] is None]
    assert not missing, f"parameters without a gradient: {missing}"
    total = loss.detach().clone()
    if world > 1:
        dist.all_reduce(total, group=group)
        for x in grads.values():
            if ddp:
                x.mul_(world)  # DDP's mean -> the sum over CP ranks
            else:
                dist.all_reduce(x, group=group)

    full_logits = hf_ringcp.unshard_sequence(logits, 1, group, layout=layout)
    errors["logits"] = rel_error(full_logits, expected.logits.detach())
    errors["loss"] = rel_error(total, expected.loss)
    errors["grad"] = max(rel_error(grads[n], ref_grads[n]) for n in grads)
    return errors


def _cases() -> list[tuple]:
    """(model, layout, comm, gradient checkpointing, variant): the full matrix for Llama, and other models.

    A case costs ~0.1-0.5 s; starting the ranks costs far more, so every world size runs all of them.
    """
    matrix = [
        ("llama", layout, ("p2p", "allgather")[(i + (layout == "contiguous")) % 2], ckpt, variant)
        for i, (layout, ckpt, variant) in enumerate(
            itertools.product(("zigzag", "contiguous"), (False, True), ("full", "lora", "lora_mts"))
        )
    ]
    others = [
        ("qwen2", "zigzag", "p2p", True, "full"),
        ("mistral", "contiguous", "allgather", False, "lora"),
        ("llama", "zigzag", "p2p", True, "lora_ddp"),
    ]
    return matrix + others


def _all_cases(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world))) if dist.is_initialized() else None
    return {case: _case_errors(group, world, case, seed=100 + i) for i, case in enumerate(_cases())}


def _assert_within(per_rank: list[dict]) -> None:
    failures = [
        f"rank {rank} {case}: {errors}"
        for rank, results in enumerate(per_rank)
        for case, errors in results.items()
        if not all(e <= TOLERANCE for e in errors.values())
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_model_matches_sdpa_model(world: int) -> None:
    _assert_within(run_ranks(_all_cases, world))


@pytest.fixture
def one_thread():
    # Tiny models run far faster on one thread, above all on a busy 2-core machine (OpenMP threads spin).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ring_model_single_process_matches_sdpa_model(one_thread) -> None:
    # P = 1 without torch.distributed: the ring attention must be plain SDPA, the loss the stock loss.
    _assert_within([_all_cases(0, 1)])


# ------------------------------------------------------------------ outside context_parallel: exactly sdpa


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ring_outside_context_is_sdpa_including_generate(kind: str, one_thread) -> None:
    ref, ring = tiny_model(kind, "sdpa").eval(), tiny_model(kind, "ring").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding: the mask must reach SDPA, not be dropped
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            assert torch.equal(ring(input_ids=ids, **kwargs).logits, ref(input_ids=ids, **kwargs).logits)
        gen = dict(attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert torch.equal(ring.generate(ids, **gen), ref.generate(ids, **gen))


def test_single_rank_context_is_sdpa(one_thread) -> None:
    ref, ring = tiny_model("llama", "sdpa").eval(), tiny_model("llama", "ring").eval()
    ids = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    with hf_ringcp.context_parallel(None) as ctx, torch.no_grad():
        assert ctx.world_size == 1
        assert torch.equal(ring.generate(ids, max_new_tokens=3, do_sample=False),
                           ref.generate(ids, max_new_tokens=3, do_sample=False))


# ---------------------------------------------------------------------------------------- registration


def test_registered_on_import_and_idempotent() -> None:
    hf_ringcp.register()
    hf_ringcp.register()
    assert AttentionInterface._global_mapping["ring"] is ring_attention_forward
    assert AttentionMaskInterface._global_mapping["ring"] is ring_attention_mask
    for other in ("sdpa", "eager"):
        assert AttentionMaskInterface._global_mapping[other] is not ring_attention_mask


def test_register_never_overwrites_another_backend() -> None:
    def foreign(*args, **kwargs):
        raise AssertionError("never called")

    AttentionInterface.register("ring", foreign)
    try:
        with pytest.raises(RuntimeError, match="already maps 'ring'"):
            hf_ringcp.register()
        assert AttentionInterface._global_mapping["ring"] is foreign
    finally:
        AttentionInterface.register("ring", ring_attention_forward)
