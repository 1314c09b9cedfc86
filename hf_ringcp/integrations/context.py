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

from hf_ringcp.ring import Layout, RingConfig
from hf_ringcp.ring.group import group_rank_and_size


@dataclass(frozen=True)
class RingContext:
    """The context-parallel setting in force: which group shares a sequence and how it is split.

    Attributes:
        group: the context-parallel process group (``None``: the default group).
        layout, comm, backend: see :class:`hf_ringcp.ring.RingConfig` (validated there).
        rank: this process's rank in ``group``.
        world_size: the size of ``group``; with 1 the ``"ring"`` attention is plain SDPA unless ``force_ring``.
        force_ring: run the ring's own kernels even with one rank (benchmarks and debugging of the kernels, the
            document masks and the sliding windows on one device).
        ulysses_size: the Ulysses degree of the hybrid (see :class:`hf_ringcp.ring.RingConfig`).
    """

    group: dist.ProcessGroup | None = field(repr=False)
    layout: str
    comm: str
    backend: str
    rank: int
    world_size: int
    force_ring: bool = False
    ulysses_size: int | str = 1
    config: RingConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        config = RingConfig(layout=self.layout, comm=self.comm, backend=self.backend, ulysses_size=self.ulysses_size)
        if config.ulysses_size != "auto":
            config.check_world(self.world_size)
        object.__setattr__(self, "config", config)

    @property
    def cp_enabled(self) -> bool:
        """Whether the sequence is actually split (more than one rank)."""
        return self.world_size > 1

    @property
    def ring_active(self) -> bool:
        """Whether ``"ring"`` attention runs the ring (more than one rank, or ``force_ring``)."""
        return self.cp_enabled or self.force_ring

    @property
    def split(self) -> Layout:
        """The :class:`~hf_ringcp.ring.Layout` of this context (the owner of the length divisor)."""
        return self.config.layout_for(self.world_size)

    @property
    def seq_divisor(self) -> int:
        """Plain sequence lengths must be a multiple of this (``2 * cp`` for zigzag, ``cp`` otherwise)."""
        return self.split.divisor


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


def as_process_group(group) -> dist.ProcessGroup | None:
    """Accept a process group, ``None`` or a one-dimensional ``DeviceMesh``."""
    if hasattr(group, "get_group") and hasattr(group, "ndim"):
        if group.ndim != 1:
            raise ValueError(
                f"`group` is a {group.ndim}-D DeviceMesh; pass the context-parallel dimension, e.g. mesh['cp']."
            )
        return group.get_group()
    return group


def resolve_group(group=None) -> dist.ProcessGroup | None:
    """The context-parallel group to use: ``group``, or the active context's when ``group`` is ``None``.

    An explicit ``group`` that differs from the active context's raises: the attention would span one group and
    the batch or the loss another.
    """
    group = as_process_group(group)
    active = get_context()
    if active is None or (group is None and active.group is None):
        return group
    if group is None:
        return active.group
    if group is not active.group and not (active.group is None and group is dist.group.WORLD):
        raise ValueError(
            "The `group` passed is not the group of the active hf_ringcp.context_parallel, so the batch or loss and "
            "the attention would span different ranks. Pass group=None (the active context's group) or the same "
            "group to both."
        )
    return group


def make_context(
    group: dist.ProcessGroup | None = None, *, layout: str = "zigzag", comm: str = "p2p", backend: str = "auto",
    force_ring: bool = False, ulysses_size: int | str = 1,
) -> RingContext:
    """Validate the arguments of :func:`context_parallel` and build the :class:`RingContext` (no side effects)."""
    config = RingConfig(layout=layout, comm=comm, backend=backend, ulysses_size=ulysses_size)
    group = as_process_group(group)
    rank, world = group_rank_and_size(group)
    return RingContext(group=group, layout=config.layout, comm=config.comm, backend=config.backend, rank=rank,
                       world_size=world, force_ring=bool(force_ring), ulysses_size=config.ulysses_size)


@contextmanager
def context_parallel(
    group: dist.ProcessGroup | None = None, *, layout: str = "zigzag", comm: str = "p2p", backend: str = "auto",
    force_ring: bool = False, ulysses_size: int | str = 1,
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
        layout: a name from :data:`hf_ringcp.ring.LAYOUTS` (``"zigzag"``: causal load balance); must match the
            layout the batch was sharded with.
        comm: ``"p2p"`` (K/V passed around the ring, overlapped with compute), ``"allgather"``, ``"ulysses"``
            (all-to-all over heads) or ``"auto"``.
        backend: ``"auto"`` or one of :data:`hf_ringcp.ring.BACKEND_NAMES`.
        force_ring: with a group of one rank, still run the ring's kernels (documents and windows included)
            instead of SDPA: for benchmarks and debugging on one device.
        ulysses_size: groups of this many consecutive ranks exchange heads (Ulysses) and ``comm`` runs over the
            groups; 1 (default): the plain ring; ``"auto"``: see :mod:`hf_ringcp.ring.strategy`.

    Yields:
        The :class:`RingContext` in force.
    """
    ctx = make_context(group, layout=layout, comm=comm, backend=backend, force_ring=force_ring,
                       ulysses_size=ulysses_size)
    token = _ACTIVE.push(ctx)
    try:
        yield ctx
    finally:
        _ACTIVE.pop(token)


@contextmanager
def without_context_parallel() -> Iterator[None]:
    """Inside :func:`context_parallel`: one rank again, ``"ring"`` plain SDPA, until the block ends (e.g. for a
    ``generate()`` on whole rows between two sharded loss steps, as TRL's GRPO rollouts)."""
    active = get_context()
    if active is None:
        yield
        return
    token = _ACTIVE.push(RingContext(group=None, layout=active.layout, comm=active.comm, backend=active.backend,
                                     rank=0, world_size=1))
    try:
        yield
    finally:
        _ACTIVE.pop(token)


class _CallCounter:
    """How many times ``attn_implementation="ring"`` was called in this process (a lock-free counter read by
    :func:`hf_ringcp.prepare_model`'s decoder hooks to tell a model that never dispatched to it)."""

    def __init__(self) -> None:
        self.count = 0

    def record(self) -> None:
        self.count += 1


#: Calls of the ``"ring"`` attention function; see :class:`_CallCounter`.
RING_CALLS = _CallCounter()


def get_context() -> RingContext | None:
    """The innermost active :class:`RingContext` (in any thread of this process), or ``None``."""
    return _ACTIVE.top()
