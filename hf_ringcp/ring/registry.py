"""The comms: name -> ``build(setup, group)`` of its variant. Adding a comm is one module and one line here."""

from __future__ import annotations

from hf_ringcp.ring import allgather, p2p, ulysses

COMMS = {
    "p2p": p2p.build,
    "allgather": allgather.build,
    "ulysses": ulysses.build,
}
