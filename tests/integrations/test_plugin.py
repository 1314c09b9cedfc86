"""ContextParallelPlugin in an accelerate loop on 4 gloo ranks equals single-process training."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from hf_ringcp.integrations.plugin import ContextParallelPlugin, pad_batch_to_multiple
from tests.distributed import run_ranks
from tests.integrations.tiny import lora_state, tiny_lora_llama, token_samples
from tests.ring.reference import rel_error

STEPS, SEQ, LR = 3, 16, 1e-2


def _cp_training(rank: int, world: int, cp: int) -> dict:
    from accelerate import Accelerator

    plugin = ContextParallelPlugin(cp_size=cp)
    accelerator = Accelerator(cpu=True)
    model = tiny_lora_llama("ring")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    loader = DataLoader(token_samples(STEPS * world // cp, SEQ), batch_size=1, shuffle=False)
    model, optimizer, loader = plugin.prepare(accelerator, model, optimizer, loader)
    losses, seen = [], []
    with plugin.context():
        for batch in loader:
            seen.extend(batch["idx"].tolist())
            sharded = plugin.shard(batch)
            loss = plugin.loss(model, sharded)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(plugin.loss_value(loss))
    return {"losses": losses, "lora": lora_state(accelerator.unwrap_model(model)), "seen": seen,
            "dp_rank": plugin.dp_rank}


def _reference(batch_size: int) -> tuple[list[float], dict]:
    model = tiny_lora_llama("sdpa")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    loader = DataLoader(token_samples(STEPS * batch_size, SEQ), batch_size=batch_size, shuffle=False)
    losses = []
    for batch in loader:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, lora_state(model)


@pytest.mark.parametrize("cp", [2, 4])
def test_dp_cp_training_matches_single_process(cp: int) -> None:
    world = 4
    results = run_ranks(_cp_training, world, cp)
    ref_losses, ref_lora = _reference(batch_size=world // cp)
    for rank, r in enumerate(results):
        assert len(r["losses"]) == STEPS
        for step, (got, want) in enumerate(zip(r["losses"], ref_losses)):
            assert abs(got - want) <= 1e-5 * abs(want), f"rank {rank} step {step}: {got} vs {want}"
        worst = max(rel_error(r["lora"][k], ref_lora[k]) for k in ref_lora)
        assert worst <= 1e-5, f"rank {rank}: LoRA weights differ by {worst}"
    # Every CP rank of a DP group saw the same samples; the DP groups together saw each sample exactly once.
    by_group: dict[int, list[int]] = {}
    for r in results:
        assert by_group.setdefault(r["dp_rank"], r["seen"]) == r["seen"]
    assert sorted(i for seen in by_group.values() for i in seen) == list(range(STEPS * world // cp))


def _bad_world(rank: int, world: int) -> str:
    plugin = ContextParallelPlugin(cp_size=3)
    with pytest.raises(ValueError, match=r"world size \(2\) is not divisible by cp_size \(3\)") as info:
        plugin.build_mesh()
    return str(info.value)


def _sdpa_model_refused(rank: int, world: int) -> str:
    from accelerate import Accelerator

    plugin = ContextParallelPlugin(cp_size=2)
    with pytest.raises(ValueError, match=r"attn_implementation='sdpa'.*attn_implementation='ring'") as info:
        plugin.prepare(Accelerator(cpu=True), tiny_lora_llama("sdpa"))
    strict = ContextParallelPlugin(cp_size=2, pad_to_multiple=False)
    with pytest.raises(ValueError, match=r"divisible by 2 \* cp_size = 4"):
        strict.shard({"input_ids": torch.zeros(1, 6, dtype=torch.long), "labels": torch.zeros(1, 6, dtype=torch.long)})
    padded = plugin.shard(
        {"input_ids": torch.ones(1, 6, dtype=torch.long), "labels": torch.ones(1, 6, dtype=torch.long)}
    )
    assert padded["input_ids"].shape == (1, 4)
    return str(info.value)


def test_bad_configs_fail_fast() -> None:
    run_ranks(_bad_world, 2)
    run_ranks(_sdpa_model_refused, 2)


def test_plugin_fields_fall_back_to_environment(monkeypatch) -> None:
    monkeypatch.setenv("HF_RINGCP_CP_SIZE", "4")
    monkeypatch.setenv("HF_RINGCP_LAYOUT", "contiguous")
    monkeypatch.setenv("HF_RINGCP_PAD_TO_MULTIPLE", "true")
    plugin = ContextParallelPlugin(comm="allgather")
    assert (plugin.cp_size, plugin.layout, plugin.comm, plugin.pad_to_multiple) == (4, "contiguous", "allgather", True)
    assert plugin.seq_divisor == 4
    monkeypatch.setenv("HF_RINGCP_LAYOUT", "diagonal")
    with pytest.raises(ValueError, match="`layout` must be one of"):
        ContextParallelPlugin()
    monkeypatch.setenv("HF_RINGCP_CP_SIZE", "four")
    with pytest.raises(ValueError, match="HF_RINGCP_CP_SIZE='four' is not an integer"):
        ContextParallelPlugin()


def test_padding_keeps_the_targets() -> None:
    batch = {"input_ids": torch.arange(6)[None], "labels": torch.arange(6)[None]}
    padded = pad_batch_to_multiple(batch, 4, pad_token_id=99)
    assert padded["input_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 99, 99]]
    assert padded["shift_labels"].tolist() == [[1, 2, 3, 4, 5, -100, -100, -100]]


def _loss_and_grads(rank: int, world: int) -> float:
    from tests.integrations.tiny import CONFIG

    batch = {k: v[None] for k, v in token_samples(1, SEQ)[0].items() if k != "idx"}
    results = []
    for savers in ({}, {"offload_activations": True, "mlp_tile_tokens": 2}):
        plugin = ContextParallelPlugin(cp_size=world, **savers)
        model = tiny_lora_llama("ring")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        plugin.prepare_model(model)
        with plugin.context():
            loss = plugin.loss(model, plugin.shard(batch))
            loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        tiled = ["forward" in layer.mlp.__dict__ for layer in model.base_model.model.model.layers]
        assert tiled == [bool(savers)] * CONFIG.num_hidden_layers  # the savers are really on (and only then)
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert rel_error(loss_b, loss_a) <= 1e-6
    return rel_error(grads_b, grads_a)


def test_memory_savers_change_no_number() -> None:
    assert max(run_ranks(_loss_and_grads, 2)) <= 1e-5


def test_padding_extends_every_per_token_tensor() -> None:
    ones = torch.ones(1, 6, dtype=torch.long)
    padded = pad_batch_to_multiple({"input_ids": ones, "labels": ones, "attention_mask": ones,
                                    "position_ids": torch.arange(6)[None], "meta": "kept"}, 4)
    assert set(padded) == {"input_ids", "shift_labels", "attention_mask", "position_ids", "meta"}
    assert padded["attention_mask"].tolist() == [[1] * 6 + [0, 0]]  # the padding is masked
    assert padded["shift_labels"].tolist() == [[1] * 5 + [-100] * 3] and padded["meta"] == "kept"
