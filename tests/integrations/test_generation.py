"""hf_ringcp.generate on gloo ranks equals single-process model.generate token for token.

Greedy parity for P in {2, 3, 4}, both balanced layouts, prompt lengths that do and do not split, a left-padded
batch of 2, grouped-query attention, a sliding window; sampling agrees across ranks; every cached token lives on
one rank (the cache is 1/P per rank, not replicated); what cannot work is refused by name.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.distributed import run_ranks
from tests.integrations.tiny import LLAMA_SHAPE

NEW = 6


def _config(window: int | None = None):
    from transformers import LlamaConfig, MistralConfig

    common = dict(LLAMA_SHAPE, vocab_size=97, max_position_embeddings=512, tie_word_embeddings=False,
                  initializer_range=0.3, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    # A large initializer range: peaked logits, so greedy decoding has no near-ties to flip on rounding.
    return MistralConfig(sliding_window=window, **common) if window else LlamaConfig(**common)


def _model(attn: str, window: int | None = None):
    from transformers import AutoModelForCausalLM

    import hf_ringcp  # noqa: F401

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(_config(window)), attn_implementation=attn,
                                            dtype=torch.float32).eval()


def _prompts():
    """(name, input_ids, attention_mask): lengths that split over 2..4 ranks and lengths that do not; left padding."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 97, (2, 23), generator=g)
    left = torch.ones(2, 23, dtype=torch.long)
    left[1, :9] = 0
    return [
        ("one row, 25 tokens", torch.randint(1, 97, (1, 25), generator=g), None),
        ("two rows, 24 tokens", torch.randint(1, 97, (2, 24), generator=g), None),
        ("left-padded batch", ids * left, left),
        ("one token", torch.randint(1, 97, (1, 1), generator=g), None),
    ]


def _reference(window: int | None = None) -> list[torch.Tensor]:
    model = _model("sdpa", window)
    return [model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)
            for _, ids, mask in _prompts()]


def _greedy(rank: int, world: int, layout: str, window: int | None) -> list[torch.Tensor]:
    import hf_ringcp

    model = _model("ring", window)
    return [hf_ringcp.generate(model, ids, attention_mask=mask, layout=layout, max_new_tokens=NEW, do_sample=False)
            for _, ids, mask in _prompts()]


@pytest.mark.parametrize("world,layout", [(2, "zigzag"), (3, "contiguous"), (4, "zigzag")])
def test_greedy_generation_matches_one_process(world: int, layout: str) -> None:
    expected = _reference()
    for rank, got in enumerate(run_ranks(_greedy, world, layout, None, timeout=600)):
        for (name, ids, _), want, out in zip(_prompts(), expected, got):
            assert out.shape == (ids.shape[0], ids.shape[1] + NEW), (name, rank)
            assert torch.equal(out, want), f"{name}, rank {rank} of {world}: {out.tolist()} != {want.tolist()}"


def test_greedy_generation_with_a_sliding_window() -> None:
    expected = _reference(window=8)
    for rank, got in enumerate(run_ranks(_greedy, 2, "zigzag", 8, timeout=600)):
        for (name, _, _), want, out in zip(_prompts(), expected, got):
            assert torch.equal(out, want), (name, rank)


def _cache_and_sampling(rank: int, world: int) -> dict:
    import hf_ringcp

    model = _model("ring")
    _, ids, mask = _prompts()[2]
    out = hf_ringcp.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             return_dict_in_generate=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    torch.manual_seed(1234 + 0 * rank)  # (only rank 0's random state matters)
    sampled = hf_ringcp.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, do_sample=True,
                                 temperature=3.0)
    errors = {}
    for name, kwargs in {"beam": dict(num_beams=2), "assisted": dict(prompt_lookup_num_tokens=2),
                         "contrastive": dict(penalty_alpha=0.5, top_k=4), "max_time": dict(max_time=5.0),
                         "hidden": dict(output_hidden_states=True, return_dict_in_generate=True),
                         "settings": dict(max_new_tokens=2 + rank)}.items():
        try:
            hf_ringcp.generate(model, ids, attention_mask=mask, **{"max_new_tokens": 2, **kwargs})
        except ValueError as err:
            errors[name] = str(err)
    right = torch.ones_like(mask)
    right[1, -3:] = 0
    try:
        hf_ringcp.generate(model, ids, attention_mask=right, max_new_tokens=2)
    except ValueError as err:
        errors["right"] = str(err)
    try:
        hf_ringcp.generate(model, ids + rank, max_new_tokens=2)
    except ValueError as err:
        errors["different"] = str(err)
    model.config.attention_chunk_size = 4  # (Llama ignores it; the ring must refuse it even with no prefill)
    try:
        hf_ringcp.generate(model, ids[:, -1:], max_new_tokens=2)
    except ValueError as err:
        errors["chunked"] = str(err)
    finally:
        model.config.attention_chunk_size = None
    return {"tokens": out.sequences, "local": cache.local_tokens(), "sampled": sampled, "errors": errors,
            "rows": [layer.keys.shape[2] for layer in cache.layers]}


def test_sharded_cache_sampling_and_refusals() -> None:
    world = 3
    results = run_ranks(_cache_and_sampling, world, timeout=600)
    _, ids, mask = _prompts()[2]
    # Every token the model ran on is cached once: the prompt's real tokens, then the generated ones but the last.
    expected_tokens = int(mask.sum()) + (NEW - 1) * ids.shape[0]
    local = [r["local"] for r in results]
    assert sum(local) == expected_tokens
    assert max(local) <= expected_tokens / world + 2 * ids.shape[0] + 2 * world, local  # ~1/P each
    for r in results:
        assert torch.equal(r["tokens"], results[0]["tokens"])
        assert torch.equal(r["sampled"], results[0]["sampled"]), "sampling differs between ranks"
        errors = r["errors"]
        assert "beam search" in errors["beam"] and "prompt-lookup" in errors["assisted"]
        assert "contrastive" in errors["contrastive"]
        assert "`max_time`" in errors["max_time"] and "`output_hidden_states`" in errors["hidden"]
        assert "generate() settings" in errors["settings"]  # different max_new_tokens: refused, not a hang
        assert "padding_side = 'left'" in errors["right"]
        assert "different prompts" in errors["different"]
        assert "chunked attention" in errors["chunked"]
    assert not torch.equal(results[0]["sampled"], results[0]["tokens"]), "temperature 3 sampling looked greedy"


def test_the_decode_switch_is_per_thread() -> None:
    """Another thread's "ring" forwards (training, a second generate) are not taken for this one's decode steps."""
    import threading

    from hf_ringcp.integrations.decoding import decoding, decoding_cache

    cache, seen = object(), []
    with decoding(cache):
        other = threading.Thread(target=lambda: seen.append(decoding_cache()))
        other.start()
        other.join()
        assert decoding_cache() is cache
    assert seen == [None] and decoding_cache() is None


# ------------------------------------------------------------------------------- FSDP2: dp 2 x cp 2, 4 ranks

def _fsdp_prompts() -> list[list[torch.Tensor]]:
    """Per case, per DP group, a prompt: the groups decode different prompts, one a batch, one a single token
    (no prefill)."""
    g = torch.Generator().manual_seed(5)
    ids = [torch.randint(1, 97, (1, n), generator=g) for n in (13, 20, 1, 17)]
    batch = torch.randint(1, 97, (2, 11), generator=g)
    return [[ids[0], ids[1]], [ids[2], batch], [ids[3], ids[0]]]


def _fsdp_settings_and_reference() -> tuple[list[list[dict]], list[list[torch.Tensor]]]:
    """Settings that stop the groups at different steps (max_new_tokens; an eos that one row of the batch meets
    at its 3rd token while the other runs on), and single-process generate() with them."""
    model = _model("sdpa")
    lengths = [[2, 7], [5, 6], [3, 1]]
    settings, expected = [], []
    for prompts, news in zip(_fsdp_prompts(), lengths):
        case_settings, case_expected = [], []
        for ids, new in zip(prompts, news):
            kwargs = {"max_new_tokens": new, "do_sample": False}
            if ids.shape[0] == 2:
                free = model.generate(ids, **kwargs)
                kwargs["eos_token_id"] = int(free[0, ids.shape[1] + 2])
            case_settings.append(kwargs)
            case_expected.append(model.generate(ids, **kwargs))
        settings.append(case_settings)
        expected.append(case_expected)
    return settings, expected


def _fsdp_generate(rank: int, world: int, settings: list[list[dict]]) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import hf_ringcp

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "cp"))
    model = _model("ring")
    for layer in model.get_decoder().layers:
        fully_shard(layer)  # over the default group: every dp x cp rank holds a shard
    fully_shard(model)
    dp = mesh.get_local_rank("dp")
    out = [hf_ringcp.generate(model, prompts[dp], group=mesh.get_group("cp"), **kwargs[dp])
           for prompts, kwargs in zip(_fsdp_prompts(), settings)]
    try:  # one group asks for what is refused: every group raises, none waits in an all-gather
        hf_ringcp.generate(model, _fsdp_prompts()[0][dp], group=mesh.get_group("cp"), max_new_tokens=2,
                           num_beams=2 if dp == 0 else 1)
    except ValueError as err:
        out.append(str(err))
    return out


def test_generation_on_an_fsdp2_model_with_groups_that_stop_at_different_steps() -> None:
    """Every rank takes part in each parameter all-gather although the DP groups decode different prompts and
    stop at different steps: each group's output equals single-process generate()."""
    settings, expected = _fsdp_settings_and_reference()
    assert expected[1][1][0, -1] == 0 and expected[1][1][1, -1] != 0, "the eos row should stop before the other"
    for rank, got in enumerate(run_ranks(_fsdp_generate, 4, settings, timeout=300)):
        dp = rank // 2
        for i, (want, out) in enumerate(zip(expected, got[:-1])):
            assert torch.equal(out, want[dp]), f"case {i}, rank {rank}: {out.tolist()} != {want[dp].tolist()}"
        assert ("beam search" if dp == 0 else "another context-parallel group refused") in got[-1], got[-1]
