"""Passkey samples: exact length, key placement, labels, scoring (also from sharded predictions)."""

from __future__ import annotations

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from hf_ringcp import local_positions
from recipes.data import build_tiny_tokenizer
from recipes.passkey import (
    IGNORE_INDEX,
    PasskeyBuilder,
    answer_accuracy,
    count_answer_hits,
    generate_passkey_samples,
    make_passkey_sample,
    masked_token_hits,
    score_passkey,
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A tokenizer that adds BOS (id 0) when encoding with special tokens, and merges digits (no digit split)."""
    tok = build_tiny_tokenizer(split_digits=False)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<eos> $A", pair="<eos> $A <eos> $B", special_tokens=[("<eos>", 0)]
    )
    return tok


def _check_sample(tok, sample, seq_len: int, depth: float) -> None:
    builder = PasskeyBuilder(tok)
    n_ans = len(sample.answer_ids)
    assert sample.seq_len == len(sample.input_ids) == len(sample.labels) == seq_len
    # The answer is the last tokens, decodes to the key, and is the only labelled part.
    assert sample.answer_positions == list(range(seq_len - n_ans, seq_len)) and sample.prompt_len == seq_len - n_ans
    assert tok.decode(sample.answer_ids).strip() == sample.key
    assert [sample.input_ids[p] for p in sample.answer_positions] == sample.answer_ids
    assert sample.labels[: sample.prompt_len] == [IGNORE_INDEX] * sample.prompt_len
    assert sample.labels[sample.prompt_len :] == sample.answer_ids
    # The key sits at key_position, within one filler sentence of the (clamped) requested depth.
    kp = sample.key_position
    assert sample.input_ids[kp : kp + n_ans] == sample.answer_ids
    lo = len(builder.prefix) + len(builder.needle_head)
    hi = lo + seq_len - builder.min_seq_len(sample.key)
    target = min(max(round(depth * seq_len), lo), hi)
    assert abs(kp - target) <= builder.max_sentence_len, (seq_len, depth, kp, target)
    # The key appears in the prompt only inside the needle (twice) and not in the filler.
    assert tok.decode(sample.prompt_ids).count(sample.key) == 2


@pytest.mark.parametrize("seq_len", [120, 201, 256, 1000, 4096])
@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_sample_length_and_depth(tokenizer, seq_len, depth):
    sample = make_passkey_sample(tokenizer, seq_len, depth, seed=seq_len)
    _check_sample(tokenizer, sample, seq_len, depth)


def test_depth_is_honoured_when_room(tokenizer):
    builder = PasskeyBuilder(tokenizer)
    for depth in (0.2, 0.5, 0.8):
        s = builder.build(2048, depth, "123456")
        assert abs(s.key_position - depth * 2048) <= builder.max_sentence_len
        assert abs(s.actual_depth - depth) <= builder.max_sentence_len / 2048


@pytest.mark.parametrize("seq_len", [150, 333])
def test_tokenizer_with_bos_and_merged_digits(bos_tokenizer, seq_len):
    assert bos_tokenizer("a")["input_ids"][0] == 0
    assert len(bos_tokenizer(" 12345", add_special_tokens=False)["input_ids"]) < 6  # digits merged
    sample = make_passkey_sample(bos_tokenizer, seq_len, 0.5, key="987654")
    assert sample.input_ids[0] == 0
    _check_sample(bos_tokenizer, sample, seq_len, 0.5)


def test_too_short_and_bad_arguments(tokenizer):
    builder = PasskeyBuilder(tokenizer)
    minimum = builder.min_seq_len("12345")
    assert builder.build(minimum, 0.5, "12345").seq_len == minimum
    with pytest.raises(ValueError, match=f"seq_len >= {minimum}"):
        builder.build(minimum - 1, 0.5, "12345")
    with pytest.raises(ValueError, match="depth"):
        builder.build(256, 1.5, "12345")
    with pytest.raises(ValueError, match="digits"):
        builder.build(256, 0.5, "12a45")


def test_generator_is_deterministic_and_covers_grid(tokenizer):
    lens, depths = [128, 192], [0.25, 0.75]
    a = list(generate_passkey_samples(tokenizer, 6, lens, depths, seed=7))
    b = list(generate_passkey_samples(tokenizer, 6, lens, depths, seed=7))
    c = list(generate_passkey_samples(tokenizer, 6, lens, depths, seed=8))
    assert a == b
    assert [s.key for s in a] != [s.key for s in c]
    assert [(s.seq_len, s.depth) for s in a[:4]] == [(128, 0.25), (192, 0.25), (128, 0.75), (192, 0.75)]
    assert all(len(s.key) == 5 for s in a)
    assert all(len(s.key) == 7 for s in generate_passkey_samples(tokenizer, 3, 128, 0.5, key_digits=7))


def test_score_passkey(tokenizer):
    assert score_passkey(" 48213. Remember it.", "48213")
    assert score_passkey("The pass key is 48213", "48213")
    assert not score_passkey(" 48214.", "48213")
    assert not score_passkey(" 482130", "48213")
    assert not score_passkey(" 4821 3", "48213")
    assert not score_passkey(" the pass key.", "48213")
    ids = tokenizer(" 48213. The", add_special_tokens=False)["input_ids"]
    assert score_passkey(ids, "48213", tokenizer)
    assert score_passkey(torch.tensor(ids), "48213", tokenizer)
    assert not score_passkey(ids, "48211", tokenizer)
    with pytest.raises(ValueError, match="tokenizer"):
        score_passkey(ids, "48213")


def _predictions(sample, wrong: int | None) -> torch.Tensor:
    """Teacher-forced 'argmax' ids: the next token everywhere, answer token `wrong` mispredicted."""
    ids = torch.tensor(sample.input_ids)
    pred = torch.cat([ids[1:], ids[:1]])
    if wrong is not None:
        p = sample.answer_positions[wrong] - 1
        pred[p] = (pred[p] + 1) % 400
    return pred


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_sharded_accuracy_equals_unsharded(tokenizer, layout, world):
    sample = make_passkey_sample(tokenizer, 256, 0.5, key="123456")
    n = len(sample.answer_ids)
    for wrong, expected in [(None, 1.0), (2, (n - 1) / n)]:
        pred = _predictions(sample, wrong)
        assert answer_accuracy(sample, pred) == pytest.approx(expected)
        # Per-rank counts from each rank's local predictions at its global positions, then summed.
        hits = held = 0
        for rank in range(world):
            pos = local_positions(256, layout, rank, world)
            h, k = count_answer_hits(sample.answer_positions, sample.answer_ids, pred[pos], pos)
            hits, held = hits + h, held + k
        assert held == n and hits / held == pytest.approx(expected)
        # The same from shifted labels held by each shard (what a CP forward carries), no positions needed.
        shift_labels = torch.tensor([*sample.labels[1:], IGNORE_INDEX])
        hits = held = 0
        for rank in range(world):
            pos = local_positions(256, layout, rank, world)
            h, k = masked_token_hits(pred[pos], shift_labels[pos])
            hits, held = hits + h, held + k
        assert held == n and hits / held == pytest.approx(expected)


def test_mapping_predictions_and_partial_errors(tokenizer):
    sample = make_passkey_sample(tokenizer, 128, 0.3, key="55555")
    pred = _predictions(sample, wrong=0)
    table = {p - 1: int(pred[p - 1]) for p in sample.answer_positions}
    assert answer_accuracy(sample, table) == pytest.approx(1 - 1 / len(sample.answer_ids))
    partial = dict(list(table.items())[:2])
    assert count_answer_hits(sample.answer_positions, sample.answer_ids, partial) == (1, 2)
    with pytest.raises(ValueError, match="count_answer_hits"):
        answer_accuracy(sample, partial)
    with pytest.raises(ValueError, match="1-D"):
        count_answer_hits(sample.answer_positions, sample.answer_ids, pred[None])
