"""Multi-process test harness: run a function on N gloo ranks on CPU and return every rank's result.

Children are spawned (fresh interpreters), so the function must live in an importable module. A rank that
raises makes the whole call raise with that rank's traceback; a run that outlives ``timeout`` is killed and
fails rather than hanging the suite.
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world_size: int, backend: str, timeout: float) -> None:
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        # float32 comparisons need true float32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dist.init_process_group("nccl", rank=rank, world_size=world_size, device_id=device,
                                timeout=timedelta(seconds=timeout))
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))


def _entry(fn, rank: int, world_size: int, port: int, results, args, env: dict[str, str], backend: str,
           init_timeout: float) -> None:
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        _init(rank, world_size, backend, init_timeout)
        out = fn(rank, world_size, *args)
        # Serialised, not put as-is: tensors would travel as file descriptors (or CUDA handles) that die with this
        # process.
        buffer = io.BytesIO()
        torch.save(out, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, env: dict[str, str] | None = None,
    backend: str = "gloo", init_timeout: float = 120.0, join_timeout: float = 10.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks (gloo on CPU; ``backend="nccl"``: GPU ``rank``
    each, see ``tests/gpu/nccl.py``); return the results by rank, on the CPU."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(target=_entry, args=(fn, r, world_size, port, results, args, env, backend, init_timeout),
                    daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size:
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
            p.join(timeout=join_timeout)
            if p.is_alive():
                p.kill()
    return [torch.load(io.BytesIO(collected[r][1]), weights_only=False, map_location="cpu")
            for r in range(world_size)]
