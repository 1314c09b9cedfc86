"""The variant protocol: one autograd Function drives every comm through a small per-rank interface.

A variant is one rank's whole share of an attention call given its :class:`RankSetup` (its rank, the placement
of the sequence, the mask, the kernels) and its communicators:

- ``forward(q, k, v) -> (out, saved)``: this rank's output and the tensors its backward needs;
- ``backward(dout, *saved) -> (dq, dk, dv)``.

:class:`Variant` implements both on top of ``attend`` / ``attend_backward`` (``(out, lse)`` and the gradients of
the local ``q``, ``k``, ``v``), which the ring variants (:mod:`.p2p`, :mod:`.allgather`) define; a variant that
changes the tensors' shape first (Ulysses) overrides ``forward``/``backward`` themselves. Adding a comm is one
module with a ``build(setup, group)`` function and one line in :data:`hf_ringcp.ring.registry.COMMS`.

Packed rows: a ring variant lists its steps (:meth:`Variant.steps`) and :meth:`Variant.schedule` turns them into a
:class:`~hf_ringcp.ring.varlen.PackedSchedule` (at most two kernel calls per step whatever the number of
documents), built once per batch: it is cached on the placement, which every layer shares.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_ringcp.ring.blocks import Kernels
from hf_ringcp.ring.layout import Placement
from hf_ringcp.ring.plan import BlockCall, MaskSpec, Segment, plan_calls
from hf_ringcp.ring.varlen import PackedSchedule, Step, build_schedule, cached_on, packed_mode


@dataclass(frozen=True)
class RankSetup:
    """What one rank of a variant knows: its rank, the placement of the sequence, the mask, kernels and scale."""

    rank: int
    world: int
    placement: Placement
    mask: MaskSpec
    kernels: Kernels
    scale: float

    @property
    def own(self) -> tuple[Segment, ...]:
        return self.placement.segments(self.rank)

    def plan(self, kv: tuple[Segment, ...]) -> tuple[BlockCall, ...]:
        """This rank's queries against a buffer holding ``kv`` (cached: every layer asks for the same plans)."""
        return plan_calls(self.own, kv, self.mask)


class Variant:
    """Base of the variants; see the module docstring."""

    def __init__(self, setup: RankSetup) -> None:
        self.setup = setup

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def steps(self, local_len: int) -> list[Step]:
        """This rank's steps in the order it runs them (for :meth:`schedule`)."""
        raise NotImplementedError

    def schedule(self, q: torch.Tensor) -> PackedSchedule | None:
        """The packed launches of this rank for queries like ``q`` ``[1, H, S_local, D]``, or ``None`` where the calls
        run one by one (no step with more than two calls, batch > 1, or kernels with neither varlen nor masks)."""
        s = self.setup
        mode = packed_mode(s.kernels)
        if mode is None or q.shape[0] != 1:
            return None
        key = (type(self).__name__, s.rank, s.world, s.mask, mode, q.shape[2], str(q.device), q.dtype)
        return cached_on(s.placement, key,
                         lambda: build_schedule(self.steps(q.shape[2]), mode, q.shape[2], q.device, q.dtype))

    def attend_backward(
        self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, q, k, v) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        out, lse = self.attend(q, k, v)
        return out, (q, k, v, out, lse)

    def backward(self, dout, q, k, v, out, lse) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.attend_backward(dout, q, k, v, out, lse)


class RingAttentionFunction(torch.autograd.Function):
    """Autograd wrapper of any :class:`Variant`: saves what its forward returns, runs its backward.

    The saved tensors go through ``ctx.save_for_backward``, so saved-tensor hooks (activation offload) and
    checkpointing see them. Autocast is off inside: :func:`hf_ringcp.ring.ring_attention` casts the inputs first.
    """

    @staticmethod
    def forward(ctx, q, k, v, variant: Variant):
        with torch.autocast(q.device.type, enabled=False):
            out, saved = variant.forward(q, k, v)
        ctx.save_for_backward(*saved)
        ctx.variant = variant
        return out

    @staticmethod
    def backward(ctx, dout):
        with torch.autocast(dout.device.type, enabled=False):
            dq, dk, dv = ctx.variant.backward(dout, *ctx.saved_tensors)
        return dq, dk, dv, None
