"""hf_ringcp: context parallelism (ring attention) for Hugging Face Transformers."""

from hf_ringcp.ring import local_positions, ring_attention, shard_sequence, unshard_sequence

__version__ = "0.1.0"

__all__ = ["local_positions", "ring_attention", "shard_sequence", "unshard_sequence"]
