"""Shared pieces of the GPU tests: tolerances, the error check, packed documents."""

from __future__ import annotations

import torch

from hf_ringcp.ring import Layout
from tests.ring.reference import rel_error

# Max-norm relative error (tests.ring.reference.rel_error) against float64 from the same rounded inputs: the
# limits of the CPU parity tests for bf16; float32 kernels on the GPU land near 1e-6.
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def errors(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """``rel_error`` of every named tensor of ``got`` against ``ref`` (shapes must agree; an all-zero reference:
    the largest absolute entry of ``got``)."""
    out = {}
    for name, x in got.items():
        if x.shape != ref[name].shape:
            raise AssertionError(f"{name}: shape {tuple(x.shape)}, expected {tuple(ref[name].shape)}")
        # An exactly zero reference (e.g. dQ when every query sees one key) has no scale: the largest entry counts.
        out[name] = rel_error(x, ref[name]) if ref[name].abs().max() > 0 else x.double().abs().max().item()
    return out


def assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], dtype: torch.dtype, what: str) -> None:
    errs = errors(got, ref)
    bad = {k: e for k, e in errs.items() if not e <= TOLERANCE[dtype]}  # NaN fails too
    assert not bad, f"{what}: {bad} above {TOLERANCE[dtype]} (all: {errs})"


def documents(layout: str, world: int, lengths: list[int]) -> tuple[list[tuple[int, int]], list[int], int]:
    """Real documents ``[a, b)``, the ``cu_seqlens`` the ring gets and the row length, as ``shard_batch`` packs.

    A per-document layout (zigzag) pads every document to a multiple of its divisor, padding at the document's
    end (no real token sees it); the other layouts stretch the last document to make the total divisible.
    """
    real, bounds, cursor = [], [0], 0
    for n, span in zip(lengths, Layout.for_name(layout, world).document_spans(lengths)):
        real.append((cursor, cursor + n))
        cursor += span
        bounds.append(cursor)
    return real, bounds, cursor
