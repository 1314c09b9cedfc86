"""The opt-in memory savers change no numbers: host offload of saved activations, tiled MLP (CPU, one process)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_ringcp
from hf_ringcp.integrations.memory import offload_to_cpu, tile_mlp
from tests.ring.reference import rel_error

B, S, H, INTER, V, LAYERS = 2, 40, 32, 72, 96, 3
CONFIG = LlamaConfig(
    vocab_size=V, hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, use_cache=False,
)


def _model(checkpointing: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(copy.deepcopy(CONFIG), attn_implementation="ring", dtype=torch.float32)
    if checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers 5.23 renamed it; both names work
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    torch.manual_seed(1)
    return get_peft_model(model, lora).train()


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    return hf_ringcp.shard_batch({"input_ids": ids, "labels": ids})


def _loss_and_grads(model, forward_context=None):
    with hf_ringcp.context_parallel():
        if forward_context is None:
            loss = hf_ringcp.causal_lm_loss(model, _batch(), chunk_size=16)
        else:
            with forward_context:
                loss = hf_ringcp.causal_lm_loss(model, _batch(), chunk_size=16)
        loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(got, expected, tol: float) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, expected
    assert rel_error(loss, ref_loss) <= tol
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_error(grads[name], ref_grads[name]) <= tol, name


def test_offload_sees_every_layer_input_and_changes_nothing() -> None:
    expected = _loss_and_grads(_model())
    offload = offload_to_cpu(min_bytes=0)
    model = _model()
    with hf_ringcp.context_parallel():
        with offload as stats:
            loss = hf_ringcp.causal_lm_loss(model, _batch(), chunk_size=16)
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    _assert_same((loss.detach(), grads), expected, 0.0)
    # Each checkpointed layer's input goes through the hooks (plus the final norm's input), never a parameter
    # or a view of one (the head's weight.t(), [H, V]).
    assert sum(shape == (B, S, H) for shape in stats.shapes) >= LAYERS
    assert (H, V) not in stats.shapes and (V, H) not in stats.shapes
    assert stats.tensors == len(stats.shapes) and stats.bytes > 0


def test_offload_min_bytes_filters_small_tensors() -> None:
    model = _model()
    with hf_ringcp.context_parallel(), offload_to_cpu(min_bytes=B * S * H * 4) as stats:
        hf_ringcp.causal_lm_loss(model, _batch(), chunk_size=16)
    assert stats.shapes and all(torch.Size(s).numel() * 4 >= B * S * H * 4 for s in stats.shapes)
    with pytest.raises(ValueError, match="`min_bytes` must be a non-negative int"):
        with offload_to_cpu(min_bytes=-1):
            pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host copy path needs a CUDA device")
def test_offload_cuda_round_trip() -> None:
    x = torch.randn(256, 1024, device="cuda", requires_grad=True)
    with offload_to_cpu(min_bytes=0) as stats:
        y = (x * x).sum()
    y.backward()
    assert stats.tensors >= 1
    torch.testing.assert_close(x.grad, 2 * x.detach())


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("tile", [7, 13, 40])  # uneven tiles; one tile (no split)
def test_tiled_mlp_changes_nothing(checkpointing: bool, tile: int) -> None:
    expected = _loss_and_grads(_model(checkpointing))
    model = _model(checkpointing)
    with tile_mlp(model, tile_tokens=tile):
        got = _loss_and_grads(model)
    _assert_same(got, expected, 1e-5)
    # Combined with the offload, too.
    model = _model(checkpointing)
    with tile_mlp(model, tile_tokens=tile):
        got = _loss_and_grads(model, offload_to_cpu(min_bytes=0))
    _assert_same(got, expected, 1e-5)


def test_tiled_mlp_saves_no_intermediate_activations() -> None:
    """Without layer checkpointing, only tile inputs are saved for the MLP, never a [.., intermediate] tensor."""

    def saved_shapes(model) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            with hf_ringcp.context_parallel():
                hf_ringcp.causal_lm_loss(model, _batch(), chunk_size=16)
        return shapes

    plain = saved_shapes(_model(checkpointing=False))
    assert any(s[-1:] == (INTER,) for s in plain), "the hook saw no MLP activation: the test is broken"
    model = _model(checkpointing=False)
    tile_mlp(model, tile_tokens=8)
    tiled = saved_shapes(model)
    assert not [s for s in tiled if s[-1:] == (INTER,) and len(s) > 1], tiled


def test_tiled_mlp_no_grad_and_remove() -> None:
    model = _model().eval()
    batch = _batch()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        handle = tile_mlp(model, tile_tokens=9)
        got = model(input_ids=batch["input_ids"]).logits
    assert rel_error(got, expected) <= 1e-5
    with pytest.raises(RuntimeError, match="already has a forward set on the instance"):
        tile_mlp(model)
    handle.remove()
    layers = model.base_model.model.model.layers
    assert all("forward" not in layer.mlp.__dict__ for layer in layers)
    tile_mlp(model).remove()  # can tile again after remove()


def test_tile_mlp_rejects_bad_use() -> None:
    model = _model()
    with pytest.raises(ValueError, match="`tile_tokens` must be a positive int"):
        tile_mlp(model, tile_tokens=0)
    with tile_mlp(model, tile_tokens=4):
        mlp = model.base_model.model.model.layers[0].mlp
        with pytest.raises(TypeError, match="position-wise MLPs called as mlp\\(hidden_states\\) only"):
            mlp(torch.randn(1, 8, H), torch.randn(1))
    with pytest.raises(TypeError, match="causal_lm_loss needs a \\*ForCausalLM model"):
        tile_mlp(torch.nn.Linear(2, 2))
