"""Hugging Face integration: ``attn_implementation="ring"``, batch sharding, the sharded loss, Accelerate and Trainer.

Importing this package does not import transformers; :func:`register` (called by ``import hf_ringcp`` once
transformers is imported) does.
"""

from hf_ringcp.integrations.batch import shard_batch
from hf_ringcp.integrations.context import RingContext, context_parallel, get_context
from hf_ringcp.integrations.loss import causal_lm_loss, chunked_cross_entropy_sum
from hf_ringcp.integrations.models import prepare_model


def register() -> None:
    """Register ``"ring"`` in Transformers' attention and mask registries (idempotent); see ``hf_attention``."""
    from hf_ringcp.integrations import hf_attention

    hf_attention.register()


__all__ = [
    "RingContext",
    "causal_lm_loss",
    "chunked_cross_entropy_sum",
    "context_parallel",
    "get_context",
    "prepare_model",
    "register",
    "shard_batch",
]
