"""The process-wide context-parallel setting that ``attn_implementation="ring"`` reads.

Transformers calls an attention function with the model's tensors only, so the process group and layout
reach it through :func:`context_parallel`, a context manager around the model call (and the backward).

The active setting is stored process-wide, not in a thread-local or ``ContextVar``: on CUDA the autograd
engine runs the backward on its own thread, and gradient checkpointing recomputes the attention there; that
recomputation must see the same setting as the forward did.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch.distributed as dist

from hf_ringcp.ring import BACKEND_NAMES, LAYOUTS
from hf_ringcp.ring.api import COMMS
from hf_ringcp.ring.group import group_rank_and_size

COMM_NAMES = tuple(COMMS)


def _check_choice(setting: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"`{setting}` must be one of {valid}, but got {value!r}.")


@dataclass(frozen=True)
class RingContext:
    """The context-parallel setting in force: which group shares a sequence and how it is split.

    Attributes:
        group: the context-parallel process group (``None``: the default group).
        layout: ``"zigzag"`` or ``"contiguous"``, as used by :func:`hf_ringcp.shard_batch`.
        comm: ``"p2p"`` (pass K/V around the ring) or ``"allgather"``.
        backend: block-kernel choice, ``"auto"`` or a name from :data:`hf_ringcp.ring.BACKEND_NAMES`.
        rank: this process's rank in ``group``.
        world_size: the size of ``group``; with 1 the ``"ring"`` attention is plain SDPA.
    """

    group: dist.ProcessGroup | None = field(repr=False)
    layout: str
    comm: str
    backend: str
    rank: int
    world_size: int

    def __post_init__(self) -> None:
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("comm", self.comm, COMM_NAMES)
        _check_choice("backend", self.backend, BACKEND_NAMES)

    @property
    def cp_enabled(self) -> bool:
        """Whether the sequence is actually split (more than one rank)."""
        return self.world_size > 1

    @property
    def seq_divisor(self) -> int:
        """The global sequence length must be a multiple of this (``2 * cp`` for zigzag, ``cp`` otherwise)."""
        return 2 * self.world_size if self.layout == "zigzag" else self.world_size


class _ActiveStack:
    """A lock-protected stack of the entered contexts; the top one is in force in every thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[tuple[object, RingContext]] = []

    def push(self, ctx: RingContext) -> object:
        token = object()
        with self._lock:
            self._entries.append((token, ctx))
        return token

    def pop(self, token: object) -> None:
        # Remove by token, not by position: contexts left out of order (e.g. in generators) must not
        # remove someone else's entry.
        with self._lock:
            self._entries = [(t, c) for t, c in self._entries if t is not token]

    def top(self) -> RingContext | None:
        with self._lock:
            return self._entries[-1][1] if self._entries else None


_ACTIVE = _ActiveStack()


def _resolve_group(group) -> dist.ProcessGroup | None:
    """Accept a process group, ``None`` or a one-dimensional ``DeviceMesh``."""
    if hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            raise ValueError(
                f"`group` is a {group.ndim}-D DeviceMesh; pass the context-parallel dimension, e.g. mesh['cp']."
            )
        return group.get_group()
    return group


def make_context(
    group: dist.ProcessGroup | None = None, *, layout: str = "zigzag", comm: str = "p2p", backend: str = "auto"
) -> RingContext:
    """Validate the arguments of :func:`context_parallel` and build the :class:`RingContext` (no side effects)."""
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("comm", comm, COMM_NAMES)
    _check_choice("backend", backend, BACKEND_NAMES)
    group = _resolve_group(group)
    rank, world = group_rank_and_size(group)
    return RingContext(group=group, layout=layout, comm=comm, backend=backend, rank=rank, world_size=world)


@contextmanager
def context_parallel(
    group: dist.ProcessGroup | None = None, *, layout: str = "zigzag", comm: str = "p2p", backend: str = "auto"
) -> Iterator[RingContext]:
    """Make models loaded with ``attn_implementation="ring"`` split attention over ``group``.

    Inside the block every ``"ring"`` attention layer treats its ``[B, H, S_local, D]`` inputs as this rank's
    part of a causal sequence of length ``S_local * cp`` split by ``layout`` (see
    :func:`hf_ringcp.shard_batch`). Outside it, or when ``group`` has one rank, ``"ring"`` is plain SDPA.
    Contexts nest; leaving one restores the previous setting. The setting is process-wide, so the backward
    (and gradient-checkpointing recomputation, which may run on the autograd thread) sees it too: call
    ``loss.backward()`` inside the block when gradient checkpointing is on.

    Args:
        group: the context-parallel process group, or a 1-D ``DeviceMesh``; ``None`` is the default group
            (a world of 1 when torch.distributed is not initialised).
        layout: ``"zigzag"`` (causal load balance; sequence length divisible by ``2 * cp``) or
            ``"contiguous"`` (divisible by ``cp``). Must match the layout the batch was sharded with.
        comm: ``"p2p"`` (K/V passed around the ring, overlapped with compute) or ``"allgather"``.
        backend: ``"auto"`` or one of :data:`hf_ringcp.ring.BACKEND_NAMES`.

    Yields:
        The :class:`RingContext` in force.
    """
    ctx = make_context(group, layout=layout, comm=comm, backend=backend)
    token = _ACTIVE.push(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.pop(token)


def get_context() -> RingContext | None:
    """The innermost active :class:`RingContext` (in any thread of this process), or ``None``."""
    return _ACTIVE.top()
