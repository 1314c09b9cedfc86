"""hf_ringcp: context parallelism (ring attention) for Hugging Face Transformers.

``import hf_ringcp`` makes ``attn_implementation="ring"`` available. It does so without importing transformers
itself (so that ``import hf_ringcp.ring``, the pure-torch core, stays light): when transformers is already
imported, "ring" is registered now; otherwise right after transformers is imported, in whatever order and by
whichever library (see :class:`_RegisterAfterImport`). A ``"ring"`` that another library registered first is kept
(with a warning). The Accelerate plugin, the Trainer callback and ``generate`` load on first use.
"""

from __future__ import annotations

import atexit
import gc
import importlib
import importlib.abc
import importlib.util
import sys
import threading

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
from hf_ringcp.integrations.logprobs import gather_tokens, sequence_log_probs, token_log_probs
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
    "gather_tokens",
    "generate",
    "get_context",
    "local_positions",
    "offload_to_cpu",
    "prepare_model",
    "register",
    "ring_attention",
    "sequence_log_probs",
    "shard_batch",
    "shard_sequence",
    "tile_mlp",
    "token_log_probs",
    "unshard_sequence",
]


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers "ring" right after ``transformers`` is imported, whoever imports it and whatever came before.

    It stays first in ``sys.meta_path`` until transformers' module has run: ``importlib.util.find_spec`` calls
    (TRL and others probe for installed packages that way, before or without importing them) get the real spec
    with a wrapped loader and leave the hook in place, so the import that follows is still seen. Importing
    transformers here instead would also import it for ``import hf_ringcp.ring`` (the parent package runs first),
    which must stay pure torch.
    """

    def __init__(self) -> None:
        self._finding = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" or getattr(self._finding, "active", False):
            return None
        self._finding.active = True
        try:  # the spec the other finders give (this one declines while it asks)
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding.active = False
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenRegister(spec.loader, self)
        return spec


class _ThenRegister(importlib.abc.Loader):
    """transformers' own loader, then the registration (other attributes are the wrapped loader's)."""

    def __init__(self, loader: importlib.abc.Loader, hook: _RegisterAfterImport) -> None:
        self._loader = loader
        self._hook = hook

    def __getattr__(self, name: str):
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # transformers sees its own loader
        self._loader.exec_module(module)
        if self._hook in sys.meta_path:
            sys.meta_path.remove(self._hook)
        _register()


def _register() -> None:
    # Importing hf_attention registers "ring" (keeping, with a warning, a "ring" another library owns); when it is
    # the importer of transformers, it is in sys.modules already and registers at its end.
    importlib.import_module("hf_ringcp.integrations.hf_attention")


def _when_imported() -> None:
    if "transformers" in sys.modules:
        _register()
    elif not any(type(f).__name__ == _RegisterAfterImport.__name__ for f in sys.meta_path):  # also after a reload
        sys.meta_path.insert(0, _RegisterAfterImport())


def _release_process_groups() -> None:
    """At exit, while the interpreter is whole: free gloo's process groups (and join their worker threads).

    A process group still alive at interpreter finalisation (kept by the plugin's mesh, Accelerate's state or
    torch's own registry when the script never calls ``destroy_process_group``) is destroyed during it; a gloo
    worker thread that then releases the tensors of its last work must take the GIL, which the finalising
    interpreter refuses by ending the thread, and that aborts the process ("terminate called without an active
    exception", SIGABRT after the work is done). gloo's teardown is local, so doing it here is safe; NCCL's is
    left to the script (it can be collective).
    """
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    plugin = sys.modules.get("hf_ringcp.integrations.plugin")
    if plugin is not None:
        plugin.release_meshes()
    dist.destroy_process_group()
    gc.collect()  # meshes and groups in reference cycles


_when_imported()
atexit.register(_release_process_groups)
