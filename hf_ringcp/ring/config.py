"""The one validated context-parallel setting: layout, comm, backend (and the Ulysses degree).

:class:`RingConfig` is shared by :func:`hf_ringcp.ring.ring_attention`, :class:`hf_ringcp.RingContext`,
:class:`hf_ringcp.ContextParallelPlugin` and the recipes, so every choice is checked here, once, with an
error that names the setting, the bad value, the valid ones and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hf_ringcp.ring.kernels import BACKEND_NAMES, check_backend_name
from hf_ringcp.ring.layout import LAYOUTS, Layout
from hf_ringcp.ring.registry import COMMS
from hf_ringcp.ring.strategy import choose

COMM_NAMES = tuple(COMMS)


def check_choice(setting: str, value: Any, valid: tuple[str, ...], fix: str) -> None:
    """Raise ``ValueError`` naming ``setting``, the bad value, the valid ones and ``fix``."""
    if value not in valid:
        raise ValueError(f"`{setting}` must be one of {valid}, but got {value!r}; {fix}.")


@dataclass(frozen=True)
class RingConfig:
    """How attention is split over a context-parallel group.

    Attributes:
        layout: how the sequence is split over ranks, a name from :data:`hf_ringcp.ring.LAYOUTS` (see
            :mod:`hf_ringcp.ring.layout`); ``"zigzag"`` (default) balances causal work.
        comm: how K/V reach the ranks: ``"p2p"`` (pass K/V around the ring, overlapped with compute) or
            ``"allgather"`` (gather once; backward reduce-scatters dK/dV).
        backend: the block kernel, ``"auto"`` (the fastest that can run) or a name from
            :data:`hf_ringcp.ring.BACKEND_NAMES`.
        ulysses_size: with ``comm="p2p"``/``"allgather"``, the size of the Ulysses groups of the hybrid Ulysses x
            ring (``ulysses_size`` consecutive ranks exchange heads by all-to-all, the ring runs over the groups);
            1 (default) is the plain ring. ``comm="ulysses"`` is Ulysses over the whole group. ``"auto"`` (for
            either) chooses from the heads and the node (:mod:`hf_ringcp.ring.strategy`).
    """

    layout: str = "zigzag"
    comm: str = "p2p"
    backend: str = "auto"
    ulysses_size: int | str = 1

    def __post_init__(self) -> None:
        check_choice("layout", self.layout, LAYOUTS, "use layout='zigzag' (the default, causal load balance)")
        check_choice("comm", self.comm, (*COMM_NAMES, "auto"),
                     "use comm='p2p' (the default), 'allgather' (fewer, larger kernel calls), 'ulysses' "
                     "(all-to-all over heads) or 'auto'")
        check_backend_name(self.backend)
        if self.ulysses_size == "auto":
            return
        if isinstance(self.ulysses_size, bool) or not isinstance(self.ulysses_size, int) or self.ulysses_size < 1:
            raise ValueError(
                f"`ulysses_size` must be a positive integer (a divisor of the CP size) or 'auto', but got "
                f"{self.ulysses_size!r}; use 1 for the plain ring."
            )
        if self.comm == "ulysses" and self.ulysses_size != 1:
            raise ValueError(
                f"comm='ulysses' runs Ulysses over the whole CP group, so `ulysses_size` = {self.ulysses_size} has no "
                f"meaning there; for Ulysses groups of {self.ulysses_size} with a ring over them use comm='p2p' (or "
                f"'allgather') with ulysses_size={self.ulysses_size}."
            )

    def resolved(self, hq: int, hkv: int, world: int) -> RingConfig:
        """This config with ``"auto"`` resolved for these heads and ``world`` ranks, checked against them."""
        comm, u = choose(hq, hkv, world, self.comm, self.ulysses_size)
        config = RingConfig(layout=self.layout, comm=comm, backend=self.backend, ulysses_size=u)
        config.check_world(world)
        return config

    def check_world(self, world: int) -> None:
        """Raise ``ValueError`` unless the settings fit a CP group of ``world`` ranks."""
        if world % self.ulysses_size:
            valid = [d for d in range(1, world + 1) if world % d == 0]
            raise ValueError(
                f"`ulysses_size` = {self.ulysses_size} must divide the CP size ({world}); valid values: {valid}."
            )

    def layout_for(self, world: int) -> Layout:
        """The :class:`~hf_ringcp.ring.layout.Layout` object over ``world`` ranks (it owns the length divisor)."""
        return Layout.for_name(self.layout, world)


__all__ = ["BACKEND_NAMES", "COMM_NAMES", "LAYOUTS", "RingConfig", "check_choice"]
