"""Ulysses all-to-all (sequence <-> heads), alone or as the inner half of the hybrid Ulysses x ring.

A Ulysses group is ``u`` consecutive ranks of the CP group (so it stays inside a node). Its all-to-all turns every
member's ``[B, H, S_local, D]`` into ``[B, H / u, u * S_local, D]``: all of the group's tokens for ``1 / u`` of the
heads. The group's tokens are then put in sequence order (for stride-1 layouts; one copy), attended with the
group's placement, and sent back. With ``u = P`` (``comm="ulysses"``) the attention is local; with ``u < P`` it
is a ring (``p2p`` or ``allgather``) over the ``P / u`` groups, between the members that hold the same heads.

The layout does not change with the comm: with zigzag over all ``P`` ranks, a Ulysses group holds two super-chunks
of the sequence (its members' heads and tails), and the ring over groups stays balanced.

Grouped-query attention: the query heads split evenly over the group (``Hq % u == 0``); K/V heads too when
``Hkv % u == 0``, otherwise (``u % Hkv == 0``) each K/V head is repeated ``u / Hkv`` times so that every member
gets the one its query heads use, and the repeats' gradients are summed back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist

from hf_ringcp.ring.comm import AllToAllComm
from hf_ringcp.ring.group import global_rank, group_rank_and_size
from hf_ringcp.ring.layout import Placement
from hf_ringcp.ring.plan import Segment
from hf_ringcp.ring.variant import RankSetup, Variant
from hf_ringcp.ring.varlen import cached_on


def check_heads(hq: int, hkv: int, u: int) -> None:
    """Raise ``ValueError`` naming the valid Ulysses sizes unless ``u`` splits the heads."""
    if hq % u == 0 and (hkv % u == 0 or u % hkv == 0):
        return
    valid = [d for d in range(1, hq + 1) if hq % d == 0 and (hkv % d == 0 or d % hkv == 0)]
    raise ValueError(
        f"`ulysses_size` = {u} does not split the heads ({hq} query, {hkv} key/value): the query heads must divide "
        f"evenly and the key/value heads must divide by it or into it. Valid sizes for these heads: {valid} (and "
        "they must divide the CP size); use one of them, or comm='p2p' with ulysses_size=1."
    )


def _merged(segments: list[Segment]) -> tuple[Segment, ...]:
    out: list[Segment] = []
    for s in segments:
        if out and out[-1].stride == s.stride == 1 and out[-1].stop == s.start:
            last = out.pop()
            s = Segment(last.start, last.length + s.length, 1, last.row)
        out.append(s)
    return tuple(out)


def group_placement(placement: Placement, u: int) -> tuple[Placement, list[torch.Tensor | None]]:
    """The placement of the ``P / u`` Ulysses groups, and per group the row order that sorts its tokens.

    Group ``g`` holds the tokens of ranks ``g*u ... g*u + u - 1`` in rank-major order after the all-to-all; for
    stride-1 segments they are reordered into sequence order (``perm``: ``sorted = rank_major[perm]``), so that
    neighbouring chunks make one call; strided (striped) segments stay rank-major (``perm`` is ``None``).
    """
    groups, perms = [], []
    n = placement.local_len
    for g in range(placement.world // u):
        members = range(g * u, (g + 1) * u)
        rank_major = [Segment(s.start, s.length, s.stride, (r - g * u) * n + s.row)
                      for r in members for s in placement.segments(r)]
        if all(s.stride == 1 for s in rank_major):
            ordered = sorted(rank_major, key=lambda s: s.start)
            perm = torch.cat([torch.arange(s.row, s.stop_row) for s in ordered])
            rows, segments = 0, []
            for s in ordered:
                segments.append(Segment(s.start, s.length, 1, rows))
                rows += s.length
            groups.append(_merged(segments))
            perms.append(perm)
        else:
            groups.append(tuple(rank_major))
            perms.append(None)
    grouped = Placement(placement.layout, placement.seq_len, placement.world // u, tuple(groups),
                        placement.documents)
    return grouped, perms


@functools.lru_cache(maxsize=32)
def _subgroups(ranks: tuple[int, ...], me: int, u: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    # Local synchronisation: only a group's members create it, so CP groups of different data-parallel replicas
    # (which run the same layer at the same time) build their subgroups independently.
    g, j = me // u, me % u
    ulysses = dist.new_group([ranks[i] for i in range(g * u, (g + 1) * u)], use_local_synchronization=True)
    ring = dist.new_group([ranks[i] for i in range(j, len(ranks), u)], use_local_synchronization=True)
    return ulysses, ring


def subgroups(group: dist.ProcessGroup | None, u: int) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """This rank's Ulysses group (``u`` consecutive ranks of ``group``) and ring group (same index in each)."""
    rank, world = group_rank_and_size(group)
    return _subgroups(tuple(global_rank(group, r) for r in range(world)), rank, u)


class Ulysses(Variant):
    """Ulysses over groups of ``u`` ranks; ``inner(setup)`` builds the ring over the groups (``None``: ``u = P``).

    ``setup`` describes the whole CP group (``setup.world = P``); ``a2a`` makes the group's all-to-all comm.
    """

    def __init__(self, setup: RankSetup, u: int, a2a: Callable[[], AllToAllComm] | None,
                 inner: Callable[[RankSetup], Variant]) -> None:
        super().__init__(setup)
        if setup.world % u:
            raise ValueError(f"`ulysses_size` = {u} must divide the CP size ({setup.world}).")
        self.u, self.a2a = u, a2a
        # Built once per batch (cached on the placement every layer shares): the inner ring's placement object is
        # then the same for every layer, and so are its cached schedules.
        grouped, perms = cached_on(setup.placement, ("ulysses", u), lambda: group_placement(setup.placement, u))
        g = setup.rank // u
        self.perm = perms[g]
        inner_setup = RankSetup(g, setup.world // u, grouped, setup.mask, setup.kernels, setup.scale)
        self.inner = inner(inner_setup)

    # --------------------------------------------------------------------------- sequence <-> heads

    def _order(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's sorting permutation and its inverse on ``device`` (copied there once per batch)."""
        key = ("ulysses order", self.u, self.setup.rank // self.u, str(device))
        return cached_on(self.setup.placement, key,
                         lambda: (self.perm.to(device), torch.argsort(self.perm).to(device)))

    def _to_heads(self, x: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """``[B, H, S_l, D]`` -> ``[B, H * repeat / u, u * S_l, D]``: all the group's tokens, this member's heads."""
        if repeat > 1:
            x = x.repeat_interleave(repeat, dim=1)
        b, h, s, d = x.shape
        u = self.u
        parts = x.reshape(b, u, h // u, s, d).transpose(0, 1)  # [u, B, H/u, S_l, D]: part j for member j
        got = parts if self.a2a is None else self.a2a().exchange(parts)
        full = got.permute(1, 2, 0, 3, 4).reshape(b, h // u, u * s, d)  # members' tokens, rank-major
        return full if self.perm is None else full.index_select(2, self._order(full.device)[0])

    def _to_sequence(self, x: torch.Tensor, repeat: int = 1) -> torch.Tensor:
        """The inverse of :meth:`_to_heads` (the gradient of repeated heads summed back)."""
        if self.perm is not None:
            x = x.index_select(2, self._order(x.device)[1])
        b, hu, us, d = x.shape
        u = self.u
        parts = x.reshape(b, hu, u, us // u, d).permute(2, 0, 1, 3, 4)  # [u, B, H/u, S_l, D]: member i's tokens
        got = parts if self.a2a is None else self.a2a().exchange(parts)
        out = got.transpose(0, 1).reshape(b, hu * u, us // u, d)
        if repeat > 1:
            out = out.reshape(b, hu * u // repeat, repeat, us // u, d).sum(2)
        return out

    def _repeat(self, k: torch.Tensor) -> int:
        return 1 if k.shape[1] % self.u == 0 else self.u // k.shape[1]

    # -------------------------------------------------------------------------------- the protocol

    def forward(self, q, k, v):
        check_heads(q.shape[1], k.shape[1], self.u)
        repeat = self._repeat(k)
        qh, kh, vh = self._to_heads(q), self._to_heads(k, repeat), self._to_heads(v, repeat)
        out_h, lse_h = self.inner.attend(qh, kh, vh)
        self.repeat = repeat
        return self._to_sequence(out_h).to(q.dtype), (qh, kh, vh, out_h, lse_h)

    def backward(self, dout, qh, kh, vh, out_h, lse_h):
        dout_h = self._to_heads(dout.contiguous())
        dq, dk, dv = self.inner.attend_backward(dout_h, qh, kh, vh, out_h, lse_h)
        return self._to_sequence(dq), self._to_sequence(dk, self.repeat), self._to_sequence(dv, self.repeat)


def build(setup: RankSetup, group: dist.ProcessGroup | None, u: int | None = None,
          inner_build: Callable[[RankSetup, dist.ProcessGroup | None], Variant] | None = None) -> Ulysses:
    """Ulysses over ``u`` ranks (default: the whole group) with ``inner_build`` as the ring over the groups."""
    from hf_ringcp.ring.p2p import P2PRing  # the local attention of pure Ulysses: a ring of one

    u = setup.world if u is None else u
    if setup.world == 1:
        return Ulysses(setup, 1, None, lambda s: P2PRing(s, None, None))
    ulysses_group, ring_group = subgroups(group, u)
    if u == setup.world or inner_build is None:
        inner = lambda s: P2PRing(s, None, None)
    else:
        inner = lambda s: inner_build(s, ring_group)
    return Ulysses(setup, u, lambda: AllToAllComm(ulysses_group), inner)
