"""Multi-GPU test harness: run a function on N NCCL ranks, one GPU each, and return every rank's result.

Modelled on :mod:`tests.distributed` (which runs gloo ranks on CPU): children are spawned (fresh interpreters), so
the function must live in an importable module; rank ``r`` uses GPU ``r``. A rank that raises makes the whole
call raise with that rank's traceback; a run that outlives ``timeout`` is killed and fails rather than hanging.
NVLink multicast stays off in the children (``NCCL_NVLS_ENABLE=0`` unless already set), as the shared GPU hosts
require. ``backend="gloo"`` runs the same harness on CPU processes (a smoke run of the test logic).
"""

from __future__ import annotations

import io
import os
import queue
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed import _free_port

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _entry(fn, rank: int, world: int, port: int, results, args, env: dict[str, str], backend: str) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
    )
    try:
        timeout = timedelta(seconds=300)
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
            # float32 comparisons need true float32 matmuls.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            dist.init_process_group("nccl", rank=rank, world_size=world, device_id=device, timeout=timeout)
        else:
            torch.set_num_threads(1)
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timeout)
        out = fn(rank, world, *args)
        # Serialised, not put as-is: tensors would travel as handles that die with this process.
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_nccl_ranks(
    fn: Callable[..., Any], world: int, *args: Any, timeout: float = 900.0, backend: str = "nccl",
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks (NCCL, GPU ``rank`` each); return the results by rank."""
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise RuntimeError(f"{world} NCCL ranks need {world} GPUs; {torch.cuda.device_count()} visible")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    child_env = {**{k: os.environ.get(k, v) for k, v in MULTICAST_OFF.items()}, "OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world, port, results, args, child_env, backend), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    collected: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world:
            try:
                rank, status, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in collected and p.exitcode is not None]
                if dead and results.empty():
                    raise AssertionError(
                        f"rank(s) {dead} exited (code {procs[dead[0]].exitcode}) without a result: the worker "
                        "failed before running (e.g. an import error in the test module; see stderr)."
                    ) from None
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"distributed run timed out after {timeout}s; ranks done: {sorted(collected)}") from None
                continue
            collected[rank] = (status, payload)
            if status == "error":
                raise AssertionError(f"rank {rank} failed:\n{payload}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return [torch.load(io.BytesIO(collected[r][1]), weights_only=False, map_location="cpu") for r in range(world)]
