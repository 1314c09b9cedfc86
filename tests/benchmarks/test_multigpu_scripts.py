"""The multi-GPU benchmark scripts on 2 CPU (gloo) ranks at tiny sizes: they run, check and report.

The pass/fail parity checks live in tests/gpu/test_nccl_parity.py (skipped without 2 GPUs); here
benchmarks/multigpu.sh runs them in its CPU smoke mode, with the scaling stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--heads", "4", "2", "--head-dim", "16"]


def _torchrun(script: str, *args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "benchmarks" / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _table(stdout: str) -> list[dict[str, str]]:
    """The markdown table printed by rank 0, as dicts of cells."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def _written(out: Path, stem: str) -> dict:
    (path,) = out.glob(f"{stem}_*.json")
    assert path.with_suffix(".md").exists()
    return json.loads(path.read_text())


def test_cp_scaling_runs_and_skips_torch_cp_on_cpu(tmp_path: Path) -> None:
    proc = _torchrun("cp_scaling.py", *TINY, "--tokens-per-rank", "32", "--dtype", "float32", "--warmup", "1",
                     "--iters", "2", "--p1-ms", "cpu_flash=0.5", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {(r["impl"], r["comm"]): r for r in _table(proc.stdout)}
    assert set(rows) == {("single", "-"), ("hf_ringcp", "p2p"), ("hf_ringcp", "allgather"),
                         ("torch_cp", "allgather"), ("torch_cp", "alltoall")}
    for key in (("single", "-"), ("hf_ringcp", "p2p"), ("hf_ringcp", "allgather")):
        assert rows[key]["result"] == "ok" and rows[key]["kernel"] == "cpu_flash"
    for key in (("torch_cp", "allgather"), ("torch_cp", "alltoall")):
        assert rows[key]["result"] == "skipped: CPU (torch CP needs CUDA SDPA)"
    written = {(r["impl"], r["comm"]): r for r in _written(tmp_path, "cp_scaling_p2")["rows"]}
    ring = written[("hf_ringcp", "p2p")]
    assert ring["S"] == 64 and len(ring["rank_ms"]) == 2 and ring["t1_ms"] == 0.5
    assert ring["exposed_ms"] == ring["ms"] - ring["compute_ms"]
    assert ring["weak_eff"] == 2 * 0.5 / ring["ms"]


def test_multigpu_sh_smoke_runs_parity_and_scaling(tmp_path: Path) -> None:
    env = {**os.environ, "HF_RINGCP_MULTIGPU_SMOKE": "1", "HF_RINGCP_STAGES": "parity scaling",
           "HF_RINGCP_RESULTS": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "multigpu.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all stages passed" in proc.stdout
    parity = {path.name.split("_")[3]: json.loads(path.read_text()) for path in tmp_path.glob("nccl_parity_p2_*.json")}
    assert set(parity) == {"attention", "lora"}
    rows = parity["attention"]["rows"] + parity["lora"]["rows"]
    assert {r["check"] for r in rows} == {"attention", "documents", "lora_step"}
    assert all(r["result"] == "pass" for r in rows) and parity["attention"]["env"]["dist_backend"] == "gloo"
    summary = _written(tmp_path, "multigpu_summary")
    assert {r["section"] for r in summary["rows"]} == {"parity", "scaling"}
