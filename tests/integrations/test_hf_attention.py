"""attn_implementation="ring" on P gloo ranks equals the single-process "sdpa" model: logits, loss, gradients.

Each distributed test spawns the ranks once and loops over its cases inside the workers (spawning a rank with
transformers imported costs seconds); the workers return errors that the parent asserts.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)
from transformers.masking_utils import AttentionMaskInterface

import hf_ringcp
from hf_ringcp.integrations.batch import SHARD_KEY, unshard_predictions
from hf_ringcp.integrations.hf_attention import ring_attention_forward, ring_attention_mask
from tests.distributed import run_ranks
from tests.integrations.tiny import LLAMA_SHAPE
from tests.ring.reference import rel_error

TOLERANCE = 1e-5
BF16_TOLERANCE = 3e-2
VOCAB = 128
SEQ = 32
TINY = dict(LLAMA_SHAPE, vocab_size=VOCAB)
CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**TINY, **kw),
    # Qwen2 passes `sliding_window` to the attention (None here: use_sliding_window=False).
    "qwen2": lambda **kw: Qwen2Config(**TINY, use_sliding_window=False, **kw),
    # Mistral passes its window (4096 by default) on every layer: longer than the sequence, so harmless.
    "mistral": lambda **kw: MistralConfig(**TINY, **kw),
    # Windows shorter than the sequence: every layer (Mistral), the upper layer only (Qwen2), and Gemma3's
    # alternating local/global layers (with its own query scaling and per-layer-type rotary embeddings).
    "mistral_window": lambda **kw: MistralConfig(**TINY, sliding_window=11, **kw),
    "qwen2_window": lambda **kw: Qwen2Config(**TINY, use_sliding_window=True, sliding_window=9, max_window_layers=1,
                                             **kw),
    "gemma3": lambda **kw: Gemma3TextConfig(**{**TINY, "head_dim": 16}, sliding_window=10,
                                            layer_types=["sliding_attention", "full_attention"],
                                            final_logit_softcapping=None, attn_logit_softcapping=None, **kw),
    # RoPE whose frequencies depend on the sequence length: dynamic NTK, and Phi-3's longrope (long factors only
    # beyond 16 positions, which some ranks' shards never reach).
    "llama_dynamic": lambda **kw: LlamaConfig(**{**TINY, "max_position_embeddings": 20},
                                              rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                               "rope_theta": 10000.0}, **kw),
    "phi3_longrope": lambda **kw: Phi3Config(
        **TINY, original_max_position_embeddings=16, pad_token_id=0, eos_token_id=1, bos_token_id=1,
        rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0 + i for i in range(8)],
                         "rope_theta": 10000.0, "original_max_position_embeddings": 16}, **kw),
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


def real_batch(kind: str, g: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A full batch of ``kind`` and the mask of its real tokens.

    ``plain``: two rows, labels -100 in places; ``packed``: one row of five documents (lengths 1 to 13, some
    spanning ranks) as ``DataCollatorWithFlattening`` writes them (restarting ``position_ids``, -100 at document
    starts); ``left`` / ``right``: two padded rows of different lengths (the first real token's label is -100 with
    left padding: a padded model would score it from a pad token).
    """
    if kind == "packed":
        lengths = [5, 13, 1, 9, 4]
        ids = torch.randint(0, VOCAB, (1, sum(lengths)), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
        labels = ids.clone()
        labels[pos == 0] = -100
        return {"input_ids": ids, "position_ids": pos, "labels": labels}, torch.ones_like(ids, dtype=torch.bool)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    labels = ids.clone()
    if kind == "plain":
        labels[0, :5] = -100
        labels[1, -3:] = -100
        return {"input_ids": ids, "labels": labels}, torch.ones_like(ids, dtype=torch.bool)
    mask = torch.ones_like(ids)
    mask[1, SEQ - 11:] = 0
    if kind == "left":
        mask = mask.flip(1)
    labels[mask == 0] = -100
    if kind == "left":
        labels[1, 11] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}, mask.bool()


def _case_errors(group, world: int, case: tuple, seed: int) -> dict[str, float]:
    kind, layout, comm, checkpointing, variant, *rest = case
    batch_kind = rest[0] if rest else "plain"
    autocast = len(rest) > 1 and rest[1] == "bf16_autocast"
    ref, ring = model_pair(kind, variant, checkpointing)
    ddp = variant.endswith("_ddp") and world > 1
    if ddp:
        # DDP averages the gradients over the group: causal_lm_loss must go through the wrapper's forward.
        ring = torch.nn.parallel.DistributedDataParallel(ring, process_group=group)
    g = torch.Generator().manual_seed(seed)
    full, real = real_batch(batch_kind, g)
    labels = full["labels"]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    with amp:
        # Stock transformers honours packed position_ids only without a KV cache: use_cache=False.
        expected = ref(**full, use_cache=False)
        expected.loss.backward()

    batch = hf_ringcp.shard_batch(full, group, layout=layout)
    if batch_kind == "plain":
        # Labels are shifted before sharding: the target of each shard's last token is the next shard's first.
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        assert torch.equal(hf_ringcp.unshard_sequence(batch["shift_labels"], 1, group, layout=layout), shifted)
    inputs = {k: v for k, v in batch.items() if k != "shift_labels"}
    hf_ringcp.prepare_model(ring)  # before a forward of our own (causal_lm_loss does it too)
    comm, _, u = comm.partition("+u")
    with hf_ringcp.context_parallel(group, layout=layout, comm=comm, ulysses_size=int(u or 1)), amp:
        with torch.no_grad():
            logits = ring(**inputs, use_cache=False).logits
        loss = hf_ringcp.causal_lm_loss(ring, batch, chunk_size=7)
        loss.backward()
        if variant == "full" and not checkpointing:
            # Counting the targets up front (gradient accumulation) must give the same normalisation.
            with torch.no_grad():
                counted = hf_ringcp.causal_lm_loss(ring, batch, num_items_in_batch=int((labels[:, 1:] != -100).sum()))
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

    full_logits = unshard_predictions(logits, batch.get(SHARD_KEY), group, layout)
    errors["logits"] = rel_error(full_logits[real], expected.logits.detach()[real])
    errors["loss"] = rel_error(total, expected.loss)
    errors["grad"] = max(rel_error(grads[n], ref_grads[n]) for n in grads)
    if autocast:  # bf16 against the same bf16 autocast of SDPA: close, not equal
        errors = {k: e / (BF16_TOLERANCE / TOLERANCE) for k, e in errors.items()}
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
    # Real batches (packed documents, left/right padding), sliding windows, position-dependent RoPE, autocast.
    real = [
        ("llama", "zigzag", "p2p", True, "lora", "packed"),
        ("llama", "zigzag_global", "allgather", False, "lora", "packed"),
        ("llama", "striped", "p2p", False, "full", "packed"),
        ("llama", "zigzag", "allgather", False, "lora", "left"),
        ("llama", "contiguous", "p2p", True, "lora", "right"),
        ("mistral_window", "zigzag", "p2p", True, "lora"),
        ("mistral_window", "striped", "allgather", False, "lora", "packed"),
        ("qwen2_window", "contiguous", "allgather", False, "full", "right"),
        ("gemma3", "zigzag", "p2p", True, "lora", "packed"),
        ("llama_dynamic", "zigzag", "p2p", False, "lora"),
        ("phi3_longrope", "zigzag", "allgather", True, "lora", "left"),
        ("llama", "zigzag", "p2p", False, "lora", "plain", "bf16_autocast"),
        # Ulysses (all-to-all over heads; 2 K/V heads repeated on 4 ranks) and the hybrid Ulysses x ring.
        ("llama", "zigzag", "ulysses", True, "lora", "packed"),
        ("llama", "zigzag", "p2p+u2", True, "lora"),
        ("mistral_window", "contiguous", "allgather+u2", False, "lora", "left"),
    ]
    return matrix + others + real


def _all_cases(rank: int, world: int) -> dict:
    group = dist.new_group(list(range(world))) if dist.is_initialized() else None
    fits = lambda case: world % int(case[2].partition("+u")[2] or 1) == 0  # the hybrid needs its Ulysses groups
    return {case: _case_errors(group, world, case, seed=100 + i) for i, case in enumerate(_cases()) if fits(case)}


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


def test_padding_is_accepted_only_as_the_padding_of_its_cp_shard() -> None:
    """The mask -> attention hand-over: zeros in the model's mask must be the padding of the ``cp_shard`` that came
    with it (the mask itself or an equal copy); one process, a shard of one rank."""
    from hf_ringcp.integrations.batch import is_shard_mask

    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: shard_batch packs the two rows into documents
    shard = hf_ringcp.shard_batch({"input_ids": ids, "attention_mask": mask})
    model = tiny_model("llama", "ring").eval()
    with torch.no_grad():
        logits = model(**shard, use_cache=False).logits
        copied = shard["attention_mask"].clone()  # e.g. moved to another device: not the marked tensor
        assert is_shard_mask(shard["attention_mask"]) and not is_shard_mask(copied)
        assert torch.equal(model(**{**shard, "attention_mask": copied}, use_cache=False).logits, logits)
        other = copied.clone()
        other[0, 0] = False
        with pytest.raises(ValueError, match=r"padding is not that of the batch's `cp_shard`.*shard_batch"):
            model(**{**shard, "attention_mask": other}, use_cache=False)
        without = {k: v for k, v in shard.items() if k != SHARD_KEY}
        with pytest.raises(ValueError, match=r"`attention_mask` with padding.*without the `cp_shard`"):
            model(**without, use_cache=False)
