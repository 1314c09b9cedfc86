"""Multi-GPU test harness: run a function on N NCCL ranks, one GPU each, and return every rank's result.

The launcher of :mod:`tests.distributed` (gloo ranks on CPU) with ``backend="nccl"``: children are spawned
(fresh interpreters), so the function must live in an importable module; rank ``r`` uses GPU ``r``. A rank that
raises makes the whole call raise with that rank's traceback; a run that outlives ``timeout`` is killed and fails
rather than hanging. NVLink multicast stays off in the children (``NCCL_NVLS_ENABLE=0`` unless already set), as
the shared GPU hosts require. ``backend="gloo"`` runs the same harness on CPU processes (a smoke run of the test
logic).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from tests.distributed import run_ranks

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run_nccl_ranks(
    fn: Callable[..., Any], world: int, *args: Any, timeout: float = 900.0, backend: str = "nccl",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks (NCCL, GPU ``rank`` each); return the results by rank."""
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise RuntimeError(f"{world} NCCL ranks need {world} GPUs; {torch.cuda.device_count()} visible")
    child_env = {**{k: os.environ.get(k, v) for k, v in MULTICAST_OFF.items()}, **(env or {})}
    return run_ranks(fn, world, *args, timeout=timeout, env=child_env, backend=backend, init_timeout=300.0,
                     join_timeout=30.0)
