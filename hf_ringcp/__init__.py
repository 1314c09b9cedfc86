"""hf_ringcp: context parallelism (ring attention) for Hugging Face Transformers.

``import hf_ringcp`` makes ``attn_implementation="ring"`` available. It does so without importing transformers
itself (so that ``import hf_ringcp.ring``, the pure-torch core, stays light): when transformers is already
imported, "ring" is registered now; otherwise right after transformers is imported (see :func:`_when_imported`).
The Accelerate plugin and the Trainer callback load on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from hf_ringcp.integrations import (
    RingContext,
    causal_lm_loss,
    chunked_cross_entropy_sum,
    context_parallel,
    get_context,
    prepare_model,
    register,
    shard_batch,
)
from hf_ringcp.integrations.memory import offload_to_cpu, tile_mlp
from hf_ringcp.ring import (
    Layout,
    RingConfig,
    local_positions,
    ring_attention,
    shard_sequence,
    unshard_sequence,
)

__version__ = "0.2.0"

_LAZY = {
    "ContextParallelPlugin": "hf_ringcp.integrations.plugin",
    "RingCPCallback": "hf_ringcp.integrations.trainer_callback",
    "RingCPTrainerMixin": "hf_ringcp.integrations.trainer_mixin",
    "generate": "hf_ringcp.integrations.generation",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_ringcp' has no attribute {name!r}")


__all__ = [
    "ContextParallelPlugin",
    "Layout",
    "RingCPCallback",
    "RingCPTrainerMixin",
    "RingConfig",
    "RingContext",
    "causal_lm_loss",
    "chunked_cross_entropy_sum",
    "context_parallel",
    "generate",
    "get_context",
    "local_positions",
    "offload_to_cpu",
    "prepare_model",
    "register",
    "ring_attention",
    "shard_batch",
    "shard_sequence",
    "tile_mlp",
    "unshard_sequence",
]


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """A one-shot import hook: when ``transformers`` is imported, run its module, then register "ring"."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader

        class ThenRegister(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                module.__loader__ = module.__spec__.loader = loader
                loader.exec_module(module)
                if "hf_ringcp.integrations.hf_attention" in sys.modules:
                    return  # transformers was imported by hf_attention itself, which registers at its end
                try:
                    register()
                except RuntimeError as err:  # another library owns "ring": say so, do not break the import
                    warnings.warn(f"hf_ringcp did not register attn_implementation='ring': {err}", stacklevel=2)

        spec.loader = ThenRegister()
        return spec


def _when_imported() -> None:
    if "transformers" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_when_imported()
