"""Packed rows for the benchmarks: three document-length distributions and their padding for each layout.

Shared by ``benchmarks/ring_sim.py`` (``--packed``) and ``benchmarks/load_balance.py``, so that both measure the
same rows. At the reference length ``S = 128K`` (:data:`REFERENCE_LEN`):

- ``one``: a single document of ``S`` tokens.
- ``lognormal``: lognormal lengths with median 2048 tokens and sigma 1.0 (``random.Random(seed)``), drawn until
  the row is full, the last one cut to fit.
- ``mixed``: one ``S / 2`` (64K) document plus documents of uniform lengths in ``[1024, 4096]`` filling the rest,
  the last one cut to fit.

Documents keep the order they were drawn in (``mixed``: the long document first). At another total length every
length parameter scales with ``total / REFERENCE_LEN`` (so that a tiny CPU dry run keeps the row's shape).

:func:`pack` places the documents for a layout the way :func:`hf_ringcp.shard_batch` does: a per-document layout
(``zigzag``) pads every document to a multiple of its divisor ``2P``, with the padding at the document's end (no
real token sees it under the causal mask); the other layouts keep the documents as they are and only stretch the
last one so that the total is a multiple of the divisor.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from hf_ringcp.ring.layout import Layout

REFERENCE_LEN = 131072
DISTRIBUTIONS = ("one", "lognormal", "mixed")


def document_lengths(name: str, total: int = REFERENCE_LEN, seed: int = 0) -> list[int]:
    """Real document lengths of the distribution ``name``, summing to ``total`` (see the module docstring)."""
    scale = total / REFERENCE_LEN
    rng = random.Random(seed)
    if name == "one":
        return [total]
    if name == "lognormal":
        median, sigma = 2048 * scale, 1.0
        draw = lambda: max(1, round(rng.lognormvariate(math.log(median), sigma)))
        lengths: list[int] = []
    elif name == "mixed":
        lo, hi = max(1, round(1024 * scale)), max(1, round(4096 * scale))
        draw = lambda: rng.randint(lo, hi)
        lengths = [total // 2]
    else:
        raise ValueError(f"unknown distribution {name!r}; choose from {DISTRIBUTIONS}")
    while sum(lengths) < total:
        lengths.append(min(draw(), total - sum(lengths)))
    return lengths


@dataclass(frozen=True)
class PackedRow:
    """Documents placed in one row for a layout over ``world`` ranks.

    ``real``: ``[a, b)`` of every document's real tokens in the row; ``cu_seqlens``: the document bounds the ring
    gets (a document's padding belongs to it, at its end); ``seq_len``: the row length, padding included.
    """

    layout: str
    world: int
    lengths: tuple[int, ...]
    real: tuple[tuple[int, int], ...]
    cu_seqlens: tuple[int, ...]

    @property
    def seq_len(self) -> int:
        return self.cu_seqlens[-1]

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths)

    @property
    def padding(self) -> int:
        return self.seq_len - self.real_tokens

    def real_index(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Row positions of the real tokens, in order: ``[real_tokens]`` int64 (real token ``t`` sits there)."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.real])

    def real_pairs(self) -> int:
        """Visible (query, key) pairs among the real tokens: causal attention within each document."""
        return sum(n * (n + 1) // 2 for n in self.lengths)

    def row_pairs(self) -> int:
        """Visible pairs over the whole row, padding included (what the ring computes in total)."""
        return sum((b - a) * (b - a + 1) // 2 for a, b in zip(self.cu_seqlens, self.cu_seqlens[1:]))


def pack(lengths: list[int] | tuple[int, ...], layout: str, world: int) -> PackedRow:
    """Place documents of ``lengths`` for ``layout`` over ``world`` ranks (see the module docstring)."""
    real, bounds, cursor = [], [0], 0
    for n, span in zip(lengths, Layout.for_name(layout, world).document_spans(lengths)):
        real.append((cursor, cursor + n))
        cursor += span
        bounds.append(cursor)
    return PackedRow(layout, world, tuple(lengths), tuple(real), tuple(bounds))
