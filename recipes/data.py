"""Datasets for long-context recipes: packed language-model chunks from text, and synthetic passkey samples.

Every dataset built here has ``input_ids`` and ``labels`` columns of exactly ``seq_len`` tokens per row.
``labels`` are *unshifted* (aligned with ``input_ids``): the library shifts them (``shift_labels``) over the
whole sequence before sharding it across context-parallel ranks, so nothing is lost at shard boundaries.

- :func:`load_text_source`: a hub dataset name or local ``jsonl``/``json``/``parquet``/``txt``/``csv`` files.
- :func:`tokenize_and_chunk`: tokenise a text column, join the documents with EOS, cut into ``seq_len`` chunks.
- :func:`passkey_dataset`: the synthetic retrieval samples of :mod:`recipes.passkey` as a ``datasets.Dataset``.
- :func:`build_dataset`: one entry point (``source="passkey"`` or a text source).
- :func:`build_tiny_tokenizer`: a small byte-level BPE tokenizer built in memory, for tests (no download).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute as pc
from datasets import Dataset

from recipes.passkey import generate_passkey_samples

# File suffix -> `datasets` packaged builder.
BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
    ".csv": "csv",
}
_LM_FEATURES = datasets.Features(
    {"input_ids": datasets.List(datasets.Value("int64")), "labels": datasets.List(datasets.Value("int64"))}
)


def _builder_for(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise ValueError(
            f"Cannot tell the format of data file {str(path)!r} from its suffix {suffix!r}: use one of "
            f"{sorted(BUILDERS)}, or load it yourself with `datasets.load_dataset` and call `tokenize_and_chunk`."
        )
    return BUILDERS[suffix]


def load_text_source(
    source: str | Path | Sequence[str | Path],
    *,
    split: str = "train",
    name: str | None = None,
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """Load a dataset with ``datasets.load_dataset`` from local files, a local folder or a hub name.

    Args:
        source: one local file or a list of them (format from the suffix, all the same: ``.jsonl``/``.json``,
            ``.parquet``, ``.txt``/``.text`` (one row per line, column ``text``), ``.csv``); a local folder
            (``load_dataset(folder)``); otherwise a hub dataset name (needs the network or the local cache).
        split: the split to return.
        name: the hub dataset configuration (e.g. ``"wikitext-2-raw-v1"``); not used for local files.
        cache_dir: the ``datasets`` cache folder (default: ``HF_DATASETS_CACHE``).
        **load_kwargs: passed on to ``load_dataset``.
    """
    cache = None if cache_dir is None else str(cache_dir)
    paths = [Path(p) for p in source] if isinstance(source, (list, tuple)) else None
    if paths is None and Path(source).is_file():
        paths = [Path(source)]
    if paths is not None:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"Data files not found: {missing}.")
        builders = {_builder_for(p) for p in paths}
        if len(builders) != 1:
            raise ValueError(f"All data files must have the same format, but got {sorted(builders)} from {paths}.")
        files = [str(p) for p in paths]
        return datasets.load_dataset(
            builders.pop(), data_files={split: files}, split=split, cache_dir=cache, **load_kwargs
        )
    if Path(source).is_dir():
        return datasets.load_dataset(str(source), split=split, cache_dir=cache, **load_kwargs)
    return datasets.load_dataset(str(source), name, split=split, cache_dir=cache, **load_kwargs)


def _num_tokens(tokenized: Dataset) -> int:
    """Total tokens in the ``input_ids`` list column (read from Arrow, no Python lists)."""
    lengths = pc.list_value_length(tokenized.data.column("input_ids"))
    return int(pc.sum(lengths).as_py() or 0)


def _chunk_rows(tokenized: Dataset, seq_len: int) -> Iterator[dict[str, list[int]]]:
    """Concatenate ``tokenized["input_ids"]`` in order and yield ``seq_len``-token rows (remainder dropped)."""
    buf: list[int] = []
    for batch in tokenized.iter(batch_size=1000):
        for ids in batch["input_ids"]:
            buf.extend(ids)
            full = len(buf) // seq_len
            for k in range(full):
                chunk = buf[k * seq_len : (k + 1) * seq_len]
                yield {"input_ids": chunk, "labels": list(chunk)}
            del buf[: full * seq_len]


def tokenize_and_chunk(
    dataset: Dataset,
    tokenizer,
    seq_len: int,
    *,
    text_column: str = "text",
    add_eos: bool = True,
    add_special_tokens: bool = False,
    shuffle: bool = True,
    seed: int = 0,
    num_proc: int | None = None,
    keep_in_memory: bool = False,
    cache_dir: str | Path | None = None,
) -> Dataset:
    """Tokenise ``dataset[text_column]``, join the documents and cut the stream into ``seq_len``-token samples.

    Documents are tokenised in dataset order, each followed by the EOS token (so consecutive documents are
    separated by EOS), concatenated, and cut into consecutive chunks of exactly ``seq_len`` tokens; the final
    partial chunk is dropped. A chunk may span documents: nothing masks attention between them (plain causal
    packing, as in pre-training).

    ``labels`` equal ``input_ids`` everywhere (no ``-100``): every token, EOS included, is a target, and there is
    no padding to ignore. They are not shifted; the library shifts them before sharding.

    Args:
        dataset: rows with a string column ``text_column``.
        tokenizer: any Hugging Face tokenizer; must have ``eos_token_id`` when ``add_eos``.
        seq_len: tokens per sample (e.g. a multiple of ``2 * cp_size`` for the zigzag layout).
        text_column: the column holding the text.
        add_eos: append EOS after every document.
        add_special_tokens: let the tokenizer add its special tokens (e.g. BOS) to every document.
        shuffle: shuffle the chunks (after cutting) with ``seed``; the order is the same for the same seed.
        seed: the shuffle seed.
        num_proc: processes for tokenisation.
        keep_in_memory: keep the results in memory instead of the ``datasets`` cache.
        cache_dir: where the chunked dataset is cached (default: ``HF_DATASETS_CACHE``; the tokenised one is cached
            next to ``dataset``'s files).

    Returns:
        A ``Dataset`` with int64 list columns ``input_ids`` and ``labels``, ``seq_len`` long each.
    """
    if seq_len < 1:
        raise ValueError(f"`seq_len` must be >= 1, but got {seq_len!r}.")
    if text_column not in dataset.column_names:
        raise ValueError(
            f"`text_column`={text_column!r} is not a column of the dataset; its columns are {dataset.column_names}."
        )
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError(
            f"`add_eos`=True but the tokenizer ({type(tokenizer).__name__}) has no `eos_token_id`: set "
            "`tokenizer.eos_token`, or pass add_eos=False."
        )

    def tokenize(batch: dict[str, list]) -> dict[str, list[list[int]]]:
        texts = [t if t is not None else "" for t in batch[text_column]]
        ids = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
        return {"input_ids": [list(x) + [eos] if add_eos else list(x) for x in ids]}

    tokenized = dataset.map(
        tokenize,
        batched=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc,
        keep_in_memory=keep_in_memory,
        desc="Tokenizing",
    )
    total = _num_tokens(tokenized)
    if total < seq_len:
        raise ValueError(
            f"The dataset gives {total} tokens, fewer than `seq_len`={seq_len}: no full sample. Use more data or a "
            "smaller seq_len."
        )
    fingerprint = datasets.fingerprint.Hasher.hash(("hf_ringcp-chunk-v1", tokenized._fingerprint, seq_len))
    chunks = Dataset.from_generator(
        _chunk_rows,
        features=_LM_FEATURES,
        gen_kwargs={"tokenized": tokenized, "seq_len": seq_len},
        keep_in_memory=keep_in_memory,
        cache_dir=None if cache_dir is None else str(cache_dir),
        fingerprint=fingerprint,
    )
    return chunks.shuffle(seed=seed, keep_in_memory=keep_in_memory) if shuffle else chunks


def passkey_dataset(
    tokenizer,
    num_samples: int,
    seq_lens: int | Sequence[int],
    depths: float | Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    *,
    seed: int = 0,
    key_digits: int = 5,
) -> Dataset:
    """``num_samples`` passkey samples (see :func:`recipes.passkey.generate_passkey_samples`) as a ``Dataset``.

    Columns: ``input_ids``, ``labels`` (``-100`` except the answer tokens, unshifted), ``key``, ``depth``,
    ``actual_depth``, ``key_position``, ``answer_ids``, ``answer_positions``, ``prompt_len``, ``seq_len``.
    Deterministic for a given ``seed``.
    """
    rows = [s.to_dict() for s in generate_passkey_samples(tokenizer, num_samples, seq_lens, depths, seed, key_digits)]
    if not rows:
        raise ValueError(f"`num_samples` must be >= 1 to build a dataset, but got {num_samples!r}.")
    return Dataset.from_list(rows)


def build_dataset(
    source: str | Path | Sequence[str | Path],
    tokenizer,
    seq_len: int,
    *,
    text_column: str = "text",
    split: str = "train",
    seed: int = 0,
    num_samples: int = 100,
    depths: float | Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    cache_dir: str | Path | None = None,
    **load_kwargs: Any,
) -> Dataset:
    """One entry point for recipes: ``source="passkey"`` gives :func:`passkey_dataset` (``num_samples`` rows
    of ``seq_len`` tokens at ``depths``); anything else is loaded with :func:`load_text_source` and packed with
    :func:`tokenize_and_chunk` (shuffled with ``seed``)."""
    if isinstance(source, str) and source == "passkey":
        return passkey_dataset(tokenizer, num_samples, seq_len, depths, seed=seed)
    raw = load_text_source(source, split=split, cache_dir=cache_dir, **load_kwargs)
    return tokenize_and_chunk(raw, tokenizer, seq_len, text_column=text_column, seed=seed, cache_dir=cache_dir)


# ----------------------------------------------------------------------------------------- test tokenizer

TINY_CORPUS = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
    "There is important info hidden inside a lot of irrelevant text. Find it and memorize it.",
    "I will quiz you about the important information there. What is the pass key? The pass key is 12345.",
    "Remember it. 67890 is the pass key.",
    "A quick brown fox jumps over the lazy dog. Ring attention splits a long sequence across ranks.",
)


# A minimal chat template for the in-memory tokenizer (real models bring their own), so chat data works offline.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_tiny_tokenizer(texts: Sequence[str] = TINY_CORPUS, vocab_size: int = 400, split_digits: bool = True):
    """A small byte-level BPE ``PreTrainedTokenizerFast`` trained in memory on ``texts`` (for tests, offline).

    With ``split_digits`` every digit is its own token (like the SmolLM2 tokenizer); without, BPE may merge
    them. Special tokens: ``<eos>`` (id 0, also BOS) and ``<pad>`` (id 1); no special token is added when
    encoding. Any text can be encoded (byte fallback through the 256-byte alphabet). Deterministic for the same
    arguments. Its chat template is ``TINY_CHAT_TEMPLATE``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>", pad_token="<pad>", model_max_length=1 << 30,
        chat_template=TINY_CHAT_TEMPLATE,
    )
