"""Ring-attention core: exact attention over a sequence sharded across a process group (pure torch)."""

from hf_ringcp.ring.api import ring_attention
from hf_ringcp.ring.kernels import BACKEND_NAMES, select_backend
from hf_ringcp.ring.layout import LAYOUTS, local_positions, shard_sequence, unshard_sequence

__all__ = [
    "BACKEND_NAMES",
    "LAYOUTS",
    "local_positions",
    "ring_attention",
    "select_backend",
    "shard_sequence",
    "unshard_sequence",
]
