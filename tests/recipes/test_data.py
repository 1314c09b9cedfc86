"""Data pipeline: local loading, packing into exact seq_len chunks, labels, deterministic order, passkey source."""

from __future__ import annotations

import json

import pytest

from recipes.data import (
    build_dataset,
    build_tiny_tokenizer,
    load_text_source,
    passkey_dataset,
    tokenize_and_chunk,
)
from recipes.passkey import IGNORE_INDEX

DOCS = [
    "The grass is green. The sky is blue.",
    "Here we go. There and back again, and again.",
    "A quick brown fox jumps over the lazy dog.",
    "Ring attention splits a long sequence across ranks. " * 3,
    "",
    "The pass key is 12345. Remember it.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture()
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(DOCS)))
    return path


def _stream(tokenizer) -> list[int]:
    out: list[int] = []
    for d in DOCS:
        out += tokenizer(d, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return out


@pytest.mark.parametrize("seq_len", [8, 16, 33])
def test_chunks_are_exact_and_in_order(tokenizer, jsonl, tmp_path, seq_len):
    raw = load_text_source(jsonl, cache_dir=tmp_path / "cache")
    assert raw.column_names == ["text", "id"] and len(raw) == len(DOCS)
    ds = tokenize_and_chunk(raw, tokenizer, seq_len, shuffle=False, cache_dir=tmp_path / "cache")
    stream = _stream(tokenizer)
    assert len(ds) == len(stream) // seq_len
    assert ds.column_names == ["input_ids", "labels"]
    rows = ds["input_ids"]
    assert all(len(r) == seq_len for r in rows)
    assert [t for r in rows for t in r] == stream[: len(ds) * seq_len]  # EOS between documents, remainder dropped
    assert ds["labels"] == rows  # unshifted, nothing masked


def test_shuffle_is_deterministic_permutation(tokenizer, jsonl, tmp_path):
    raw = load_text_source(jsonl, cache_dir=tmp_path / "cache")
    plain = tokenize_and_chunk(raw, tokenizer, 8, shuffle=False, cache_dir=tmp_path / "cache")["input_ids"]
    a = tokenize_and_chunk(raw, tokenizer, 8, seed=3, cache_dir=tmp_path / "cache")["input_ids"]
    b = tokenize_and_chunk(raw, tokenizer, 8, seed=3, cache_dir=tmp_path / "cache")["input_ids"]
    c = tokenize_and_chunk(raw, tokenizer, 8, seed=4, cache_dir=tmp_path / "cache")["input_ids"]
    assert a == b and a != plain and a != c
    assert sorted(a) == sorted(plain)


def test_text_and_csv_files(tokenizer, tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n".join(DOCS[:4]) + "\n")
    raw = load_text_source([txt], cache_dir=tmp_path / "cache")
    assert raw["text"] == DOCS[:4]
    csv = tmp_path / "b.csv"
    csv.write_text("body\n" + "\n".join(f'"{d}"' for d in DOCS[:3]) + "\n")
    ds = build_dataset(csv, tokenizer, 12, text_column="body", cache_dir=tmp_path / "cache")
    assert len(ds) > 0 and all(len(r) == 12 for r in ds["input_ids"])


def test_errors_name_the_fix(tokenizer, jsonl, tmp_path):
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(ValueError, match=r"suffix '\.xml'"):
        load_text_source(tmp_path / "x.xml")
    raw = load_text_source(jsonl, cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match="'body' is not a column"):
        tokenize_and_chunk(raw, tokenizer, 8, text_column="body")
    with pytest.raises(ValueError, match=r"fewer than `seq_len`=100000"):
        tokenize_and_chunk(raw, tokenizer, 100_000, cache_dir=tmp_path / "cache")


def test_passkey_source(tokenizer):
    ds = build_dataset("passkey", tokenizer, 160, num_samples=4, depths=[0.2, 0.8], seed=1)
    again = passkey_dataset(tokenizer, 4, 160, [0.2, 0.8], seed=1)
    assert ds.to_list() == again.to_list()
    assert len(ds) == 4 and all(len(r) == 160 for r in ds["input_ids"])
    row = ds[0]
    assert row["depth"] == 0.2 and row["seq_len"] == 160
    labelled = [i for i, t in enumerate(row["labels"]) if t != IGNORE_INDEX]
    assert labelled == row["answer_positions"]
    assert [row["input_ids"][p] for p in labelled] == row["answer_ids"]
    assert tokenizer.decode(row["answer_ids"]).strip() == row["key"]
