"""hf_ringcp: context parallelism (ring attention) for Hugging Face Transformers."""

from hf_ringcp.integrations import (
    RingContext,
    causal_lm_loss,
    chunked_cross_entropy_sum,
    context_parallel,
    get_context,
    register,
    shard_batch,
)
from hf_ringcp.integrations.memory import offload_to_cpu, tile_mlp
from hf_ringcp.ring import local_positions, ring_attention, shard_sequence, unshard_sequence

__version__ = "0.1.0"

# The Accelerate plugin and the Trainer callback import accelerate and the Trainer: loaded on first use.
_LAZY = {
    "ContextParallelPlugin": "hf_ringcp.integrations.plugin",
    "RingCPCallback": "hf_ringcp.integrations.trainer_callback",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_ringcp' has no attribute {name!r}")


__all__ = [
    "ContextParallelPlugin",
    "RingCPCallback",
    "RingContext",
    "causal_lm_loss",
    "chunked_cross_entropy_sum",
    "context_parallel",
    "get_context",
    "local_positions",
    "offload_to_cpu",
    "register",
    "ring_attention",
    "shard_batch",
    "shard_sequence",
    "tile_mlp",
    "unshard_sequence",
]

# Importing the package makes attn_implementation="ring" available (idempotent).
register()
