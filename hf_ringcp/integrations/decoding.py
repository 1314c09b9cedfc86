"""The decode session of :func:`hf_ringcp.generate`, shared by the generation and the ``"ring"`` attention.

:func:`hf_ringcp.generate` opens a session around Transformers' decode loop (:func:`decoding`); while it is open in
a thread, the ``"ring"`` mask and attention functions of that thread's forwards hand each layer's step to the
session's sharded cache (:func:`decode_step`) instead of running the ring. Both sides import this module, neither
imports the other.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from hf_ringcp.integrations.generation import ShardedCache


class _Active(threading.local):
    """Per thread: generate() and the forwards it drives run in the calling thread, and another thread's
    ``"ring"`` forwards (training, a second generate) must not be taken for its decode steps."""

    def __init__(self) -> None:
        self.caches: list[ShardedCache] = []


_ACTIVE = _Active()


def decoding_cache() -> ShardedCache | None:
    """The :class:`~hf_ringcp.integrations.generation.ShardedCache` whose decode steps are running in this thread
    (inside :func:`hf_ringcp.generate`), or ``None``."""
    return _ACTIVE.caches[-1] if _ACTIVE.caches else None


@contextmanager
def decoding(cache: ShardedCache) -> Iterator[None]:
    """Run the block's ``"ring"`` forwards in this thread as decode steps over ``cache``."""
    _ACTIVE.caches.append(cache)
    try:
        yield
    finally:
        _ACTIVE.caches.remove(cache)


def decode_step(module: torch.nn.Module, query: torch.Tensor, scale: float | None, kwargs: dict[str, Any],
                window: int | None) -> torch.Tensor:
    """The ``"ring"`` attention of one layer during :func:`hf_ringcp.generate`'s decode steps.

    ``query`` ``[B, Hq, L, D]`` -> ``[B, L, Hq, D]``: the layer's cached keys of the whole group, attended by the
    session's cache layer (``kwargs``: the layer's attention kwargs, read for ``position_ids``).
    """
    cache = decoding_cache()
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        raise ValueError(f"hf_ringcp.generate needs attention modules with a `layer_idx`; {type(module).__name__} "
                         "has none.")
    positions = kwargs.get("position_ids")
    if positions is None:
        raise ValueError("hf_ringcp.generate: this model does not pass `position_ids` to its attention function, "
                         "so the decode step cannot tell the new tokens' positions.")
    return cache.layers[layer_idx].attend(query, positions, window, scale)
