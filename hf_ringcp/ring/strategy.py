"""``comm="auto"`` / ``ulysses_size="auto"``: choosing the variant from the heads, the world and the node.

The rule, from the byte and FLOP model in ``docs/performance.md`` ("Which comm"):

- Ulysses moves ``4 * S/P * H * D`` elements per layer forward (q, k, v, out; twice that backward) through an
  all-to-all it cannot overlap, but then attends with one large kernel call per layer. Inside a node (NVLink) that
  traffic costs about 2 % of an 8B layer's attention at 128K tokens on 8 GPUs, less than the ring loses to small
  blocks and merges (0.68-0.92 of single-GPU efficiency at 32K-128K per ``ring_sim``). Across nodes the
  all-to-all would cross the slower links.
- The ring moves K/V ``P - 1`` times but overlaps every transfer with compute, so it suits the links between
  nodes.

So: Ulysses over the largest group that fits in a node and splits the heads (``Hq % u == 0`` and
``Hkv % u == 0`` or ``u % Hkv == 0``), and the pass-KV ring over the groups when they do not span the whole CP
group. Ranks per node come from the launcher's ``LOCAL_WORLD_SIZE``.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("hf_ringcp")
_LOGGED: set[tuple] = set()


def ranks_per_node(world: int) -> int:
    """Ranks that share a node: ``LOCAL_WORLD_SIZE`` from the launcher, else the whole group."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    return int(value) if value and value.isdigit() and int(value) > 0 else world


def ulysses_fits(hq: int, hkv: int, u: int) -> bool:
    return hq % u == 0 and (hkv % u == 0 or u % hkv == 0)


def choose(hq: int, hkv: int, world: int, comm: str, ulysses_size: int | str, per_node: int | None = None
           ) -> tuple[str, int]:
    """Resolve ``"auto"`` settings to ``(comm, ulysses_size)`` for ``world`` ranks and these heads (logged once)."""
    if comm != "auto" and ulysses_size != "auto":
        return comm, int(ulysses_size)
    per_node = ranks_per_node(world) if per_node is None else per_node
    fits = [u for u in range(1, world + 1) if world % u == 0 and u <= per_node and ulysses_fits(hq, hkv, u)]
    u = max(fits) if ulysses_size == "auto" else int(ulysses_size)
    if comm == "ulysses":
        u = 1  # Ulysses over the whole group already
    elif comm == "auto":
        comm = "ulysses" if u == world and world > 1 else "p2p"
        if comm == "ulysses":
            u = 1
    key = (hq, hkv, world, per_node, comm, u)
    if key not in _LOGGED:
        _LOGGED.add(key)
        logger.warning(
            "hf_ringcp: comm/ulysses_size 'auto' chose comm=%r, ulysses_size=%d for %d query / %d key-value heads "
            "on %d ranks (%d per node).", comm, u, hq, hkv, world, per_node,
        )
    return comm, u
