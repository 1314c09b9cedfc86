"""Under context parallelism, whatever the ring cannot honour raises a ValueError that names the fix.

All cases run inside one 2-rank spawn. Both ranks hit each error at the same point, before any collective,
so a failing case cannot hang the other rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import hf_ringcp
from hf_ringcp.integrations.hf_attention import ring_attention_mask
from tests.distributed import run_ranks
from tests.integrations.test_hf_attention import SEQ, VOCAB, tiny_model

GC = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}


def _model_rejections(local: dict, labelled: dict) -> None:
    ids, pos = local["input_ids"], local["position_ids"]
    llama = tiny_model("llama", "ring").train()

    padded = torch.ones_like(ids)
    padded[:, 0] = 0
    # Padding is honoured through shard_batch (which turns it into packed documents), not behind its back.
    with pytest.raises(ValueError, match=r"`attention_mask` with padding.*hf_ringcp.shard_batch"):
        llama(**local, attention_mask=padded)
    llama(**local, attention_mask=torch.ones_like(ids))  # an all-ones mask is fine

    with pytest.raises(ValueError, match=r"position_ids.*hf_ringcp.shard_batch"):
        llama(input_ids=ids, use_cache=False)  # forgot position_ids: the model counts from 0 on every rank
    restarted = pos.clone()
    restarted[:, 4:] -= pos[:, 4:5]  # a second packed document starts at position 0, but no cp_shard came along
    with pytest.raises(ValueError, match=r"position_ids that are not the global positions.*cp_shard"):
        llama(input_ids=ids, position_ids=restarted, use_cache=False)
    with pytest.raises(ValueError, match=r"packed-sequence kwargs.*`cu_seq_lens_q`.*shard_batch"):
        llama(**local, cu_seq_lens_q=torch.tensor([0, 8, ids.shape[1]]))
    with pytest.raises(ValueError, match=r"explicit attention mask"):
        llama(**local, attention_mask=torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1], dtype=torch.bool))

    with pytest.raises(ValueError, match=r"dropout=0.1.*attention_dropout=0"):
        tiny_model("llama", "ring", attention_dropout=0.1).train()(**local)
    tiny_model("llama", "ring", attention_dropout=0.1).eval()(**local)  # no dropout in eval: fine

    non_causal = tiny_model("llama", "ring")
    for m in non_causal.modules():
        if hasattr(m, "is_causal"):
            m.is_causal = False
    with pytest.raises(ValueError, match=r"non-causal attention.*is_causal=False"):
        non_causal(**local)
    with pytest.raises(ValueError, match=r"bidirectional"):
        tiny_model("llama", "ring", is_causal=False)(**local)

    with pytest.raises(ValueError, match=r"soft-capping \(softcap=50.*attn_implementation='eager'"):
        _gemma2(attn_logit_softcapping=50.0)(**local)
    dynamic = tiny_model("llama", "ring", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"rotary embeddings unprepared.*hf_ringcp.prepare_model\(model\)"):
        dynamic(**local)
    hf_ringcp.prepare_model(dynamic)(**local)

    with torch.no_grad():
        out = llama(input_ids=ids, position_ids=pos, use_cache=True)
        with pytest.raises(ValueError, match=r"KV cache.*use_cache=False"):
            llama(input_ids=ids[:, -1:], position_ids=pos[:, -1:] + 1, past_key_values=out.past_key_values)
        with pytest.raises(ValueError, match=r"builds a KV cache \(what generate\(\) does\).*generate\(\) outside"):
            llama.generate(ids, max_new_tokens=2, do_sample=False)

    # Gradient checkpointing recomputes attention in the backward: outside the context that would be SDPA.
    checkpointed = tiny_model("llama", "ring")
    checkpointed.gradient_checkpointing_enable(**GC)
    checkpointed.train()
    loss = hf_ringcp.causal_lm_loss(checkpointed, labelled)
    return loss


def _gemma2(**overrides):
    from transformers import AutoModelForCausalLM, Gemma2Config

    config = Gemma2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=VOCAB, **overrides,
    )
    return AutoModelForCausalLM.from_config(config, attn_implementation="ring")


def _mask_rejections(seq_local: int) -> None:
    common = dict(batch_size=1, q_length=seq_local, kv_length=seq_local)
    with pytest.raises(ValueError, match=r"mask overlays"):
        ring_attention_mask(**common, use_vmap=True)

    class Chunked:
        attention_chunk_size = 8

    with pytest.raises(ValueError, match=r"chunked attention"):
        ring_attention_mask(**common, config=Chunked())
    assert ring_attention_mask(**common, attention_mask=torch.ones(1, seq_local, dtype=torch.bool)) is None


def _rejections(rank: int, world: int) -> str:
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    labelled = hf_ringcp.shard_batch({"input_ids": ids, "labels": ids})
    local = {"input_ids": labelled["input_ids"], "position_ids": labelled["position_ids"], "use_cache": False}

    with hf_ringcp.context_parallel():
        loss = _model_rejections(local, labelled)
        _mask_rejections(local["input_ids"].shape[1])
    with pytest.raises(RuntimeError, match=r"recomputed an attention layer.*inside the"):
        loss.backward()

    with pytest.raises(ValueError, match=r"no hf_ringcp.context_parallel is active"):
        hf_ringcp.causal_lm_loss(tiny_model("llama", "ring"), labelled, group=dist.group.WORLD)
    # A batch sharded for one layout, run under another: caught by the position check.
    with hf_ringcp.context_parallel(layout="contiguous"), pytest.raises(ValueError, match="layout='contiguous'"):
        tiny_model("llama", "ring")(**local)
    return "ok"


def test_unsupported_inputs_raise_under_context_parallelism() -> None:
    assert run_ranks(_rejections, 2) == ["ok", "ok"]
