"""layout="balanced" at the model level: Trainer with packed and padded batches (LoRA, checkpointing) and greedy
generation on 2 gloo ranks equal one process without the library."""

from __future__ import annotations

import pytest
import torch

from hf_ringcp.integrations.trainer_callback import RingCPCallback
from tests.distributed import run_ranks
from tests.integrations.test_generation import NEW, _prompts, _reference
from tests.integrations.test_trainer_callback import _train_real


def _ring(rank: int, world: int, output_dir: str) -> dict:
    import hf_ringcp
    from tests.integrations.test_generation import _model

    out = {c: _train_real("ring", f"{output_dir}/{c}", [RingCPCallback(cp_size=world, layout="balanced")], c)
           for c in ("flattening", "padding")}
    model = _model("ring")
    out["generated"] = [hf_ringcp.generate(model, ids, attention_mask=mask, layout="balanced", max_new_tokens=NEW,
                                           do_sample=False) for _, ids, mask in _prompts()]
    return out


def test_balanced_trainer_and_generation_match_single_process(tmp_path) -> None:
    per_rank = run_ranks(_ring, 2, str(tmp_path / "ring"), timeout=600)
    for collator in ("flattening", "padding"):
        ref = _train_real("sdpa", str(tmp_path / "ref" / collator), [], collator)
        ref_losses = [h["loss"] for h in ref["history"] if "loss" in h]
        assert len(ref_losses) == 3
        for rank, results in enumerate(per_rank):
            got = results[collator]
            assert [h["loss"] for h in got["history"] if "loss" in h] == pytest.approx(ref_losses, rel=1e-5), rank
            assert got["eval"]["eval_loss"] == pytest.approx(ref["eval"]["eval_loss"], rel=1e-5)
            if collator == "padding":
                real = ref["real"]
                torch.testing.assert_close(got["predictions"][real], ref["predictions"][real], rtol=1e-5, atol=1e-5)
    for rank, results in enumerate(per_rank):
        for (name, _, _), got, want in zip(_prompts(), results["generated"], _reference()):
            assert torch.equal(got, want), f"{name}, rank {rank}: {got.tolist()} != {want.tolist()}"


def test_plugin_takes_balanced_from_the_environment(monkeypatch) -> None:
    from hf_ringcp import ContextParallelPlugin

    monkeypatch.setenv("HF_RINGCP_LAYOUT", "balanced")
    plugin = ContextParallelPlugin(cp_size=4)
    assert plugin.layout == "balanced" and plugin.seq_divisor == 8
