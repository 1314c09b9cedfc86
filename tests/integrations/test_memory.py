"""The opt-in memory savers change no numbers: host offload of saved activations, tiled MLP (CPU, one process)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import hf_ringcp
from hf_ringcp.integrations.memory import offload_to_cpu, pinned_pieces, tile_mlp
from tests.integrations.tiny import LLAMA_SHAPE
from tests.ring.reference import rel_error

B, S, H, INTER, V, LAYERS = 2, 40, 32, 72, 96, 3
CONFIG = LlamaConfig(**{**LLAMA_SHAPE, "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": LAYERS},
                     vocab_size=V, tie_word_embeddings=False, use_cache=False)


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
    with pytest.raises(ValueError, match="`prefetch` must be True or False"):
        with offload_to_cpu(prefetch="yes"):
            pass
    assert stats.prefetched == 0  # host tensors stay where they are: nothing to copy back


@pytest.mark.parametrize(("numel", "element_size"), [(1, 2), (3 << 29, 2), ((1 << 20) + 7, 4), (12_345_678, 2)])
def test_pinned_pieces_avoid_the_allocators_power_of_two_rounding(numel: int, element_size: int) -> None:
    pieces = pinned_pieces(numel, element_size)
    assert sum(pieces) == numel and pieces == sorted(pieces, reverse=True)
    whole = pieces[:-1]  # the tail below 1 MiB may be any size
    assert all(n * element_size & (n * element_size - 1) == 0 for n in whole)  # powers of two in bytes
    # Host memory the allocator hands out (each piece rounded up to a power of two) is within 1 MiB of the bytes.
    rounded = sum(1 << max(0, (n * element_size - 1).bit_length()) for n in pieces)
    assert rounded - numel * element_size <= 1 << 20
    if numel == 3 << 29:  # 384K tokens x 4096 of bf16: 2 + 1 GiB, not 4
        assert [n * element_size for n in pieces] == [2 << 30, 1 << 30]


def test_pieces_put_back_together_are_the_tensor() -> None:
    from hf_ringcp.integrations.memory import _Packed

    t = torch.randn(3, 700_001).t()  # strided, 8.4 MB: pieces of 8 MiB and a tail
    flat = t.reshape(-1)
    pieces, start = [], 0
    for n in pinned_pieces(t.numel(), t.element_size()):
        pieces.append(flat[start:start + n].clone())
        start += n
    assert len(pieces) == 2
    back = _Packed(t, pieces, done=None, index=0).to_device()
    assert back.shape == t.shape and torch.equal(back, t)


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


def _count_mlp_calls(model) -> list[int]:
    """Bind a counting forward on every MLP instance (as another library would); returns the tile sizes seen."""
    calls: list[int] = []

    def counted(self, x):
        calls.append(x.shape[-2])
        return type(self).forward(self, x)

    for layer in model.base_model.model.model.layers:
        layer.mlp.forward = counted.__get__(layer.mlp)
    return calls


def test_tiled_mlp_runs_each_tile_twice_per_step_in_a_checkpointed_layer() -> None:
    """Forward once, then once more in the backward: the layer's recompute stops before the MLP (early stop)."""
    model = _model(checkpointing=True)
    calls = _count_mlp_calls(model)
    with tile_mlp(model, tile_tokens=16):
        _loss_and_grads(model)
    tiles = [16, 16, S - 32]
    assert sorted(calls) == sorted(tiles * 2 * LAYERS), calls  # 2 runs of every tile, no third
    untiled = _model(checkpointing=True)
    calls = _count_mlp_calls(untiled)
    _loss_and_grads(untiled)
    assert calls == [S] * 2 * LAYERS  # the same count without tiles (forward + the layer's recompute)


def test_tiled_mlp_replays_lora_dropout_exactly() -> None:
    """With dropout in the adapters, the backward's tiles see the forward's masks: the gradients equal those of
    one checkpoint per tile (which replays each tile's random state), a test-only reference."""
    from torch.utils.checkpoint import checkpoint

    def model_with_dropout():
        torch.manual_seed(0)
        base = LlamaForCausalLM._from_config(copy.deepcopy(CONFIG), attn_implementation="ring", dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.3, init_lora_weights=False)
        return get_peft_model(base, lora).train()

    def step(model):
        torch.manual_seed(7)
        return _loss_and_grads(model)

    reference = model_with_dropout()
    for layer in reference.base_model.model.model.layers:
        forward = layer.mlp.forward
        layer.mlp.forward = lambda x, f=forward: torch.cat(
            [checkpoint(f, t, use_reentrant=False) for t in x.split(16, dim=-2)], dim=-2)
    expected = step(reference)
    model = model_with_dropout()
    with tile_mlp(model, tile_tokens=16):
        got = step(model)
    _assert_same(got, expected, 1e-6)
    untiled = step(model_with_dropout())  # the masks differ without tiles (drawn per tile): the test can fail
    assert rel_error(untiled[0], expected[0]) > 1e-6


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
    with pytest.raises(RuntimeError, match="is tiled already"):
        tile_mlp(model)
    handle.remove()
    with torch.no_grad():
        assert rel_error(model(input_ids=batch["input_ids"]).logits, expected) == 0
    layers = model.base_model.model.model.layers
    assert all("forward" not in layer.mlp.__dict__ for layer in layers)
    tile_mlp(model).remove()  # can tile again after remove()


def test_tiled_mlp_tiles_a_forward_bound_on_the_instance() -> None:
    """A fused MLP another library binds on the instance (liger-kernel's SwiGLU) is tiled, then restored."""
    model = _model().eval()
    mlps = [layer.mlp for layer in model.base_model.model.model.layers]
    calls = []

    def bound(self, x):
        calls.append(x.shape[-2])
        return type(self).forward(self, x)

    for mlp in mlps:
        mlp.forward = bound.__get__(mlp)
    before = [mlp.forward for mlp in mlps]
    batch = _batch()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"]).logits
        calls.clear()
        with tile_mlp(model, tile_tokens=16):
            got = model(input_ids=batch["input_ids"]).logits
    assert rel_error(got, expected) <= 1e-5
    assert calls == [16, 16, S - 32] * LAYERS  # the instance's forward ran, on tiles
    assert [mlp.forward for mlp in mlps] == before


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
