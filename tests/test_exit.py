"""Two-rank runs exit cleanly: exit code 0 every time, gloo's threads joined before the interpreter finalises.

A gloo process group still alive at interpreter finalisation (the plugin's mesh keeps it, a script need not call
``destroy_process_group``) used to abort about one run in ten after the work had finished ("terminate called
without an active exception"); ``import hf_ringcp`` now frees it at exit. Each launch is a short script without
transformers (a few seconds): gloo, a ring attention forward/backward both ways, the plugin's mesh, and no
``destroy_process_group``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCHES = 10

SCRIPT = textwrap.dedent("""
    import atexit, os, sys

    def threads_left():  # registered before hf_ringcp's handler, so it runs after it: gloo's threads are gone
        left = len(os.listdir("/proc/self/task"))
        if left != 1:
            print(f"{left} threads still running at interpreter exit", file=sys.stderr, flush=True)
            os._exit(3)

    atexit.register(threads_left)

    import torch
    import torch.distributed as dist

    from hf_ringcp import ContextParallelPlugin, ring_attention, shard_sequence

    dist.init_process_group("gloo")
    plugin = ContextParallelPlugin(cp_size=2)  # kept to the end, as a Trainer keeps its callback's plugin
    plugin.build_mesh()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 8) for _ in range(3))
    for comm in ("p2p", "allgather"):
        local = [shard_sequence(x, 2).requires_grad_() for x in (q, k, v)]
        ring_attention(*local, causal=True, comm=comm, group=plugin.cp_group).sum().backward()
    # (no destroy_process_group: scripts often end without it)
""")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux)")
def test_two_rank_runs_exit_cleanly_every_time(tmp_path) -> None:
    script = tmp_path / "short_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    failures = []
    for launch in range(LAUNCHES):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(script)]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            failures.append(f"launch {launch}: exit code {run.returncode}\n{run.stderr[-2000:]}")
    assert not failures, "\n".join(failures)
