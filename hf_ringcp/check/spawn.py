"""Run a function on N gloo ranks on the CPU: spawned processes, a free port, one thread each, a deadline.

The check's own launcher (the tests have theirs in ``tests/distributed.py``). A rank that raises, dies or outlives
the deadline makes :func:`spawn_ranks` raise :class:`SpawnError` instead of hanging; the other ranks are killed.
"""

from __future__ import annotations

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


class SpawnError(RuntimeError):
    """A rank failed, died without a result, or the run timed out."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, results: Any, args: tuple,
           env: dict[str, str], timeout: float) -> None:
    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    # Ranks share the machine's cores: one thread each, or OpenMP threads spin against each other.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout))
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _collect(procs: list, results: Any, world: int, deadline: float, timeout: float,
             settles: Callable[[Any], bool] | None, grace: float) -> dict[int, Any]:
    collected: dict[int, Any] = {}
    while len(collected) < world:
        try:
            rank, status, payload = results.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() > deadline and any(settles(x) for x in collected.values() if settles):
                return collected  # a rank's result decides the run; the others wait in a collective it left
            dead = [r for r, p in enumerate(procs) if r not in collected and p.exitcode is not None]
            if dead and results.empty():
                raise SpawnError(f"rank {dead[0]} exited (code {procs[dead[0]].exitcode}) without a result; "
                                 "see its output above.") from None
            if time.monotonic() > deadline:
                raise SpawnError(f"the ranks did not finish within {timeout:.0f} s (ranks done: {sorted(collected)}); "
                                 "a collective is probably waiting for a rank that failed.") from None
            continue
        if status == "error":
            raise SpawnError(f"rank {rank} failed:\n{payload}")
        collected[rank] = payload
        if settles is not None and settles(payload):
            deadline = min(deadline, time.monotonic() + grace)
    return collected


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300.0,
                env: dict[str, str] | None = None, settles: Callable[[Any], bool] | None = None,
                grace: float = 10.0) -> list[Any]:
    """``[fn(rank, world, *args) for every rank]`` run on ``world`` spawned gloo ranks (CPU).

    ``fn`` must be importable (a module-level function) and return picklable values. ``env`` is added to each
    rank's environment (``OMP_NUM_THREADS=1`` always). Raises :class:`SpawnError` when a rank raises, dies or the
    run takes longer than ``timeout`` seconds (all ranks are then killed). ``settles(result)``: a rank's result
    that decides the run on its own (e.g. an error); the other ranks then get ``grace`` seconds before they are
    killed and their results are ``None``.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, results, args, env, timeout), daemon=True)
             for r in range(world)]
    # The children read OMP_NUM_THREADS when their OpenMP runtime starts, before _entry runs: set it around start.
    saved = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        for p in procs:
            p.start()
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved
    try:
        collected = _collect(procs, results, world, time.monotonic() + timeout, timeout, settles, grace)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [collected.get(r) for r in range(world)]
