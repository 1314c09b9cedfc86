"""Synthetic passkey retrieval at any length, built to an exact token budget with any HF tokenizer.

A sample is, in token order::

    [special prefix, e.g. BOS] intro  filler...  needle  filler...  question  answer
                                              ^ key_position          ^ answer_positions (the last tokens)

- *intro*: "There is important info hidden inside a lot of irrelevant text. ..."
- *filler*: the sentences of :data:`FILLER_SENTENCES`, cycled; the filler after the needle ends with a
  sentence cut to the token so that the sample has exactly ``seq_len`` tokens.
- *needle*: "The pass key is 12345. Remember it. 12345 is the pass key."
- *question*: "What is the pass key? The pass key is"
- *answer*: " 12345" (the key with its leading space, tokenised on its own).

Every piece is tokenised on its own (no special tokens) and the ids are concatenated, so the length is exact
and the answer ids are exactly what a model has to generate after the question. ``key_position`` is the index
of the first token of the key inside the needle (the tokens of ``" " + key``); it sits at
``depth * seq_len`` within one filler sentence, where ``depth`` is clamped to the range the intro, needle
and question leave free.

Labels (unshifted, like ``input_ids``): ``-100`` everywhere except the answer tokens, where they equal
``input_ids``. Training on such samples teaches retrieval only; the filler is trivially predictable and would
otherwise dominate the loss. The library shifts labels (``shift_labels``) before sharding, so after the shift
the only positions with a label are the ``len(answer)`` positions just before the answer.

Scoring:

- :func:`score_passkey`: generated text (or ids) -> did the model produce the key?
- :func:`count_answer_hits`: teacher-forced, from per-position predicted ids (argmax of the logits) at *global*
  positions; works on one rank's shard, so a context-parallel forward never gathers the sequence: sum
  ``(hits, held)`` over the ranks.
- :func:`masked_token_hits`: the same from shifted labels, when the shard carries ``shift_labels``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

INTRO = (
    "There is important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE_BEFORE_KEY = "The pass key is"
NEEDLE_AFTER_KEY = ". Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PasskeySample:
    """One passkey sample and where its pieces sit (all positions are global token indices).

    Attributes:
        input_ids: ``seq_len`` token ids (prompt and answer).
        labels: ``seq_len`` unshifted labels: ``-100`` except at ``answer_positions``.
        key: the passkey as a decimal string.
        depth: the requested depth (fraction of ``seq_len``).
        key_position: index of the first token of the key in the needle.
        answer_ids: the tokens of ``" " + key``, the expected continuation of the question.
        answer_positions: indices of the answer tokens (the last ``len(answer_ids)`` positions).
        prompt_len: number of tokens before the answer (what to feed ``generate``).
    """

    input_ids: list[int]
    labels: list[int]
    key: str
    depth: float
    key_position: int
    answer_ids: list[int]
    answer_positions: list[int]
    prompt_len: int
    seq_len: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "seq_len", len(self.input_ids))

    @property
    def actual_depth(self) -> float:
        """``key_position / seq_len``: where the key really sits."""
        return self.key_position / self.seq_len

    @property
    def prompt_ids(self) -> list[int]:
        """The tokens before the answer, for generation."""
        return self.input_ids[: self.prompt_len]

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (e.g. one row of a ``datasets.Dataset``), ``actual_depth`` included."""
        row = asdict(self)
        row["actual_depth"] = self.actual_depth
        return row


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before the text (e.g. BOS), found by encoding a probe."""
    plain = _encode(tokenizer, "a")
    full = list(tokenizer("a")["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return full[:i]
    return []


class PasskeyBuilder:
    """Builds passkey samples for one tokenizer; the fixed pieces are tokenised once.

    Args:
        tokenizer: any Hugging Face tokenizer (called as ``tokenizer(text, add_special_tokens=False)``).
        add_special_prefix: put the tokens the tokenizer adds before text (e.g. BOS) at the start.
    """

    def __init__(self, tokenizer, add_special_prefix: bool = True) -> None:
        self.tokenizer = tokenizer
        self.prefix = (_special_prefix(tokenizer) if add_special_prefix else []) + _encode(tokenizer, INTRO)
        self.sentences = [_encode(tokenizer, " " + s) for s in FILLER_SENTENCES]
        self.needle_head = _encode(tokenizer, " " + NEEDLE_BEFORE_KEY)
        self.question = _encode(tokenizer, " " + QUESTION)

    @property
    def max_sentence_len(self) -> int:
        """Tokens in the longest filler sentence: the tolerance of the key placement."""
        return max(len(s) for s in self.sentences)

    def min_seq_len(self, key: str = "99999") -> int:
        """The shortest ``seq_len`` that fits intro, needle, question and answer (no filler) for ``key``."""
        return self._fixed_len(_encode(self.tokenizer, " " + key), key)

    def _fixed_len(self, key_ids: list[int], key: str) -> int:
        tail = _encode(self.tokenizer, NEEDLE_AFTER_KEY.format(key=key))
        return len(self.prefix) + len(self.needle_head) + len(key_ids) + len(tail) + len(self.question) + len(key_ids)

    def _filler(self, start_sentence: int, num_tokens: int) -> list[int]:
        """``num_tokens`` of filler, cycling the sentences from ``start_sentence`` on (the last one cut)."""
        out: list[int] = []
        i = start_sentence
        while len(out) < num_tokens:
            out.extend(self.sentences[i % len(self.sentences)])
            i += 1
        return out[:num_tokens]

    def build(self, seq_len: int, depth: float, key: str) -> PasskeySample:
        """One sample of exactly ``seq_len`` tokens with ``key`` at ``depth`` (fraction of ``seq_len``).

        Raises:
            ValueError: ``depth`` outside ``[0, 1]``, ``key`` not digits, or ``seq_len`` too short.
        """
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"`depth` must be a fraction in [0, 1], but got {depth!r}.")
        if not key.isdigit():
            raise ValueError(f"`key` must be a string of decimal digits, but got {key!r}.")
        key_ids = _encode(self.tokenizer, " " + key)
        tail = _encode(self.tokenizer, NEEDLE_AFTER_KEY.format(key=key))
        fixed = self._fixed_len(key_ids, key)
        free = seq_len - fixed
        if free < 0:
            raise ValueError(
                f"`seq_len` = {seq_len} is too short for a passkey sample with a {len(key)}-digit key with this "
                f"tokenizer: intro, needle, question and answer alone take {fixed} tokens. Use seq_len >= {fixed}."
            )
        head = len(self.prefix) + len(self.needle_head)  # tokens before the key when there is no filler before
        wanted = min(max(round(depth * seq_len) - head, 0), free)  # filler tokens wanted before the key
        # Whole sentences before the needle: the count whose length is closest to `wanted` (never above `free`).
        before: list[int] = []
        n_before = 0
        while True:
            nxt = self.sentences[n_before % len(self.sentences)]
            if len(before) + len(nxt) > free or abs(len(before) + len(nxt) - wanted) >= abs(len(before) - wanted):
                break
            before.extend(nxt)
            n_before += 1
        after = self._filler(n_before, free - len(before))
        input_ids = self.prefix + before + self.needle_head + key_ids + tail + after + self.question + key_ids
        key_position = len(self.prefix) + len(before) + len(self.needle_head)
        prompt_len = seq_len - len(key_ids)
        labels = [IGNORE_INDEX] * prompt_len + key_ids
        assert len(input_ids) == seq_len, (len(input_ids), seq_len)
        return PasskeySample(
            input_ids=input_ids,
            labels=labels,
            key=key,
            depth=float(depth),
            key_position=key_position,
            answer_ids=list(key_ids),
            answer_positions=list(range(prompt_len, seq_len)),
            prompt_len=prompt_len,
        )


def random_key(rng: random.Random, key_digits: int = 5) -> str:
    """A random key of exactly ``key_digits`` decimal digits (no leading zero)."""
    if key_digits < 1:
        raise ValueError(f"`key_digits` must be >= 1, but got {key_digits!r}.")
    return str(rng.randint(10 ** (key_digits - 1), 10**key_digits - 1))


def make_passkey_sample(
    tokenizer, seq_len: int, depth: float, key: str | None = None, seed: int = 0, key_digits: int = 5
) -> PasskeySample:
    """One passkey sample of exactly ``seq_len`` tokens, the key at ``depth`` (fraction of the sequence).

    Args:
        tokenizer: any Hugging Face tokenizer.
        seq_len: total tokens, answer included.
        depth: where the key's first token goes, as a fraction of ``seq_len`` (clamped to where it fits).
        key: the passkey (decimal digits); ``None`` draws one with ``random.Random(seed)``.
        seed: seed for the random key.
        key_digits: digits of a random key.
    """
    if key is None:
        key = random_key(random.Random(seed), key_digits)
    return PasskeyBuilder(tokenizer).build(seq_len, depth, key)


def generate_passkey_samples(
    tokenizer,
    num_samples: int,
    seq_lens: int | Sequence[int],
    depths: float | Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    seed: int = 0,
    key_digits: int = 5,
) -> Iterator[PasskeySample]:
    """Yield ``num_samples`` deterministic passkey samples over a grid of lengths and depths.

    Sample ``i`` has length ``seq_lens[i % L]`` and depth ``depths[(i // L) % D]`` (``L``, ``D`` the list sizes),
    so the first ``L * D`` samples cover the whole grid; keys come from ``random.Random(seed)``. The same
    arguments always give the same samples.
    """
    if num_samples < 0:
        raise ValueError(f"`num_samples` must be >= 0, but got {num_samples!r}.")
    lens = [seq_lens] if isinstance(seq_lens, int) else list(seq_lens)
    deps = [depths] if isinstance(depths, (int, float)) else list(depths)
    if not lens or not deps:
        raise ValueError(f"`seq_lens` and `depths` must be non-empty, but got seq_lens={lens}, depths={deps}.")
    builder = PasskeyBuilder(tokenizer)
    rng = random.Random(seed)
    for i in range(num_samples):
        yield builder.build(lens[i % len(lens)], deps[(i // len(lens)) % len(deps)], random_key(rng, key_digits))


# ----------------------------------------------------------------------------------------------- scoring


def score_passkey(generated: str | Sequence[int] | torch.Tensor, key: str, tokenizer=None) -> bool:
    """True when the first run of digits in the generated continuation is exactly ``key``.

    Args:
        generated: the generated continuation (text), or its token ids (then ``tokenizer`` decodes them).
        key: the expected passkey.
        tokenizer: needed only when ``generated`` is ids.
    """
    if isinstance(generated, str):
        text = generated
    else:
        if tokenizer is None:
            raise ValueError("`score_passkey` got token ids but `tokenizer` is None: pass the tokenizer to decode.")
        ids = generated.tolist() if isinstance(generated, torch.Tensor) else list(generated)
        text = tokenizer.decode(ids, skip_special_tokens=True)
    match = re.search(r"\d+", text)
    return match is not None and match.group(0) == key


def count_answer_hits(
    answer_positions: Sequence[int],
    answer_ids: Sequence[int],
    predicted_ids: torch.Tensor | Mapping[int, int],
    positions: torch.Tensor | Sequence[int] | None = None,
) -> tuple[int, int]:
    """Teacher-forced answer hits among the predictions this caller holds (e.g. one rank's shard).

    The prediction at global position ``j`` (argmax of the logits there) is for token ``j + 1``, so answer
    token ``answer_positions[k]`` is scored with the prediction at ``answer_positions[k] - 1``.

    Args:
        answer_positions: global indices of the answer tokens (``PasskeySample.answer_positions``).
        answer_ids: the expected answer tokens.
        predicted_ids: either a mapping ``global position -> predicted id``, or a 1-D tensor ``[n]`` of predicted
            ids at ``positions``.
        positions: ``[n]`` global positions of ``predicted_ids`` (e.g. ``hf_ringcp.local_positions(...)`` for a
            shard); ``None`` means ``0..n-1`` (the whole sequence).

    Returns:
        ``(hits, held)``: correct answer tokens and answer tokens whose predicting position is held here. Summed
        over the shards of a sequence, ``held == len(answer_ids)`` and ``hits / held`` is the token accuracy.
    """
    if len(answer_positions) != len(answer_ids):
        raise ValueError(
            f"`answer_positions` ({len(answer_positions)}) and `answer_ids` ({len(answer_ids)}) must have the "
            "same length."
        )
    if isinstance(predicted_ids, Mapping):
        table = {int(p): int(t) for p, t in predicted_ids.items()}
    else:
        if predicted_ids.dim() != 1:
            raise ValueError(
                f"`predicted_ids` must be 1-D [n] (one sequence), but got shape {tuple(predicted_ids.shape)}; "
                "call once per sequence of the batch."
            )
        pos = range(predicted_ids.shape[0]) if positions is None else positions
        pos = pos.tolist() if isinstance(pos, torch.Tensor) else list(pos)
        if len(pos) != predicted_ids.shape[0]:
            raise ValueError(f"`positions` has {len(pos)} entries but `predicted_ids` has {predicted_ids.shape[0]}.")
        table = dict(zip(pos, predicted_ids.tolist(), strict=True))
    hits = held = 0
    for p, t in zip(answer_positions, answer_ids, strict=True):
        pred = table.get(p - 1)
        if pred is not None:
            held += 1
            hits += int(pred == t)
    return hits, held


def answer_accuracy(
    sample: PasskeySample,
    predicted_ids: torch.Tensor | Mapping[int, int],
    positions: torch.Tensor | Sequence[int] | None = None,
) -> float:
    """Teacher-forced accuracy of the answer tokens when every predicting position is given (see
    :func:`count_answer_hits`; for shards, sum its counts over ranks instead)."""
    hits, held = count_answer_hits(sample.answer_positions, sample.answer_ids, predicted_ids, positions)
    if held != len(sample.answer_ids):
        raise ValueError(
            f"Only {held} of the {len(sample.answer_ids)} answer tokens have a prediction here; on a shard use "
            "`count_answer_hits` and sum (hits, held) over the ranks."
        )
    return hits / held


def masked_token_hits(predicted_ids: torch.Tensor, shift_labels: torch.Tensor) -> tuple[int, int]:
    """``(hits, count)`` of ``predicted_ids == shift_labels`` where ``shift_labels != -100``.

    With passkey labels shifted before sharding, the labelled positions are exactly the answer-predicting ones,
    so this works on any shard (any shape, e.g. ``[B, S_local]``) without positions; sum over ranks.
    """
    if predicted_ids.shape != shift_labels.shape:
        raise ValueError(
            f"`predicted_ids` {tuple(predicted_ids.shape)} and `shift_labels` {tuple(shift_labels.shape)} must have "
            "the same shape."
        )
    mask = shift_labels != IGNORE_INDEX
    return int((predicted_ids[mask] == shift_labels[mask]).sum()), int(mask.sum())
