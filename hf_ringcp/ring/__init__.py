"""Ring-attention core: exact attention over a sequence sharded across a process group (pure torch)."""

from hf_ringcp.ring.api import ring_attention
from hf_ringcp.ring.config import COMM_NAMES, RingConfig
from hf_ringcp.ring.kernels import BACKEND_NAMES, select_backend
from hf_ringcp.ring.layout import LAYOUTS, Layout, Placement, local_positions, shard_sequence, unshard_sequence
from hf_ringcp.ring.plan import BlockCall, MaskSpec, Segment

__all__ = [
    "BACKEND_NAMES",
    "COMM_NAMES",
    "LAYOUTS",
    "BlockCall",
    "Layout",
    "MaskSpec",
    "Placement",
    "RingConfig",
    "Segment",
    "local_positions",
    "ring_attention",
    "select_backend",
    "shard_sequence",
    "unshard_sequence",
]
