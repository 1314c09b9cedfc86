"""FSDP2 with context parallelism on 4 gloo ranks (dp 2 x cp 2) equals one process.

Parameters are sharded over all ``dp * cp`` ranks (as torchtitan does); the Trainer (``fsdp="full_shard"``,
``fsdp_version=2``) with LoRA and gradient checkpointing, saved and resumed, and a plugin loop with
``fully_shard`` and full fine-tuning.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed import run_ranks
from tests.integrations.tiny import CONFIG, logged_losses, tiny_lora_llama, token_samples, train_tiny

WORLD, CP = 4, 2


_FSDP = dict(fsdp="full_shard", fsdp_config={"fsdp_version": 2}, save_strategy="steps", save_steps=2)


def _trainer(attn: str, output_dir: str, callbacks: list, batch_size: int, fsdp: bool, resume: str | None = None):
    trainer = train_tiny(tiny_lora_llama(attn), output_dir, callbacks, n_train=16, n_eval=4, resume=resume,
                         per_device_train_batch_size=batch_size, max_steps=4, gradient_checkpointing=True,
                         gradient_checkpointing_kwargs={"use_reentrant": False}, **(_FSDP if fsdp else {}))
    return logged_losses(trainer), trainer.evaluate()["eval_loss"]


def _ring_trainer(rank: int, world: int, output_dir: str) -> dict:
    from hf_ringcp import RingCPCallback

    losses, eval_loss = _trainer("ring", output_dir, [RingCPCallback(cp_size=CP)], 1, fsdp=True)
    resumed, resumed_eval = _trainer("ring", output_dir + "_resumed", [RingCPCallback(cp_size=CP)], 1, fsdp=True,
                                     resume=f"{output_dir}/checkpoint-2")
    return {"losses": losses, "eval": eval_loss, "resumed": resumed, "resumed_eval": resumed_eval}


def test_trainer_with_fsdp2_and_context_parallelism_matches_one_process(tmp_path) -> None:
    per_rank = run_ranks(_ring_trainer, WORLD, str(tmp_path / "ring"), timeout=600)
    ref_losses, ref_eval = _trainer("sdpa", str(tmp_path / "ref"), [], WORLD // CP, fsdp=False)
    assert len(ref_losses) == 4
    for rank, got in enumerate(per_rank):
        assert got["losses"] == pytest.approx(ref_losses, rel=1e-5), rank
        assert got["eval"] == pytest.approx(ref_eval, rel=1e-5), rank
        # Resumed from the sharded checkpoint at step 2: the steps after it are the same steps.
        assert got["resumed"][2:] == pytest.approx(ref_losses[2:], rel=1e-5), rank
        assert got["resumed_eval"] == pytest.approx(ref_eval, rel=1e-5), rank


def _full_model(attn: str) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(copy.deepcopy(CONFIG), attn_implementation=attn, dtype=torch.float32)


def _plugin_fsdp(rank: int, world: int) -> dict:
    from accelerate import Accelerator
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader

    from hf_ringcp import ContextParallelPlugin, tile_mlp

    plugin = ContextParallelPlugin(cp_size=CP)
    accelerator = Accelerator(cpu=True)
    plugin.attach(accelerator)
    out = {}
    for kind in ("full", "lora", "full_tiled"):
        model = tiny_lora_llama("ring") if kind == "lora" else _full_model("ring")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        plugin.prepare_model(model)
        if kind == "full_tiled":  # the tiled MLP's gradients for sharded, trainable MLP weights
            tile_mlp(model, tile_tokens=3)
        for layer in model.base_model.model.model.layers if kind == "lora" else model.get_decoder().layers:
            fully_shard(layer)  # over the default group: every dp x cp rank holds a shard
        fully_shard(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        loader = accelerator.prepare(DataLoader(
            [{k: s[k] for k in ("input_ids", "labels")} for s in token_samples(6, 16)], batch_size=1))
        losses = []
        with plugin.context():
            for batch in loader:
                loss = plugin.loss(model, plugin.shard(batch))
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                losses.append(plugin.loss_value(loss))
        out[kind] = losses
    return out


def _reference_loop(kind: str) -> list[float]:
    from torch.utils.data import DataLoader

    model = _full_model("sdpa") if kind == "full" else tiny_lora_llama("sdpa")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = DataLoader([{k: s[k] for k in ("input_ids", "labels")} for s in token_samples(6, 16)],
                        batch_size=WORLD // CP)
    losses = []
    for batch in loader:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_plugin_loop_with_fully_shard_matches_one_process() -> None:
    per_rank = run_ranks(_plugin_fsdp, WORLD, timeout=600)
    for kind in ("full", "lora", "full_tiled"):
        ref = _reference_loop(kind.removesuffix("_tiled"))
        for rank, got in enumerate(per_rank):
            assert got[kind] == pytest.approx(ref, rel=1e-5), (kind, rank)
