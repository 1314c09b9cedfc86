"""Hugging Face Transformers integration: ``attn_implementation="ring"``, batch sharding and the sharded loss."""

from hf_ringcp.integrations.batch import shard_batch
from hf_ringcp.integrations.context import RingContext, context_parallel, get_context
from hf_ringcp.integrations.hf_attention import register, ring_attention_forward, ring_attention_mask
from hf_ringcp.integrations.loss import causal_lm_loss, chunked_cross_entropy_sum

__all__ = [
    "RingContext",
    "causal_lm_loss",
    "chunked_cross_entropy_sum",
    "context_parallel",
    "get_context",
    "register",
    "ring_attention_forward",
    "ring_attention_mask",
    "shard_batch",
]
