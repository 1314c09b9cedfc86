"""The one-GPU benchmark scripts as CPU dry runs at tiny sizes, and the CPU-only load-balance count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks.load_balance import main as load_balance_main
from benchmarks.load_balance import visible_pairs
from benchmarks.packing import DISTRIBUTIONS, document_lengths, pack
from hf_ringcp.ring.plan import BlockCall

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _written(out: Path, stem: str) -> dict:
    (path,) = [p for p in out.glob(f"{stem}_*.json") if not p.name.endswith("_partial.json")]
    assert path.with_suffix(".md").exists()
    return json.loads(path.read_text())


def test_packed_rows_match_their_distributions() -> None:
    for name in DISTRIBUTIONS:
        lengths = document_lengths(name)
        assert sum(lengths) == 131072 and min(lengths) >= 1
        assert document_lengths(name) == lengths  # seeded
        zigzag, striped = pack(lengths, "zigzag", 8), pack(lengths, "striped", 8)
        assert all((b - a) % 16 == 0 for a, b in zip(zigzag.cu_seqlens, zigzag.cu_seqlens[1:]))
        assert striped.padding == 0 and striped.cu_seqlens[-1] == 131072
        assert zigzag.real_index().numel() == 131072 and zigzag.real_pairs() == striped.real_pairs()
    assert document_lengths("mixed")[0] == 65536
    assert all(1024 <= n <= 4096 for n in document_lengths("mixed")[1:-1])


def test_visible_pairs_of_each_call_kind() -> None:
    assert visible_pairs(BlockCall(0, 3, 0, 5, "full")) == 15
    assert visible_pairs(BlockCall(0, 4, 0, 4, "causal")) == 10
    assert visible_pairs(BlockCall(0, 4, 0, 4, "band", lo=0, hi=2)) == 7  # diagonal and the one below


def test_load_balance_counts_every_pair(tmp_path: Path) -> None:
    assert load_balance_main(["--worlds", "4", "--out", str(tmp_path)]) == 0
    rows = {(r["dist"], r["layout"]): r for r in _written(tmp_path, "load_balance")["rows"]}
    assert len(rows) == 5 * len(DISTRIBUTIONS)  # every layout, balanced included
    assert rows[("one", "zigzag")]["imbalance"] == 1.0 and rows[("one", "contiguous")]["imbalance"] > 1.5
    assert all(rows[(d, "zigzag")]["imbalance"] <= 1.10 for d in DISTRIBUTIONS)
    # the balanced layout keeps the work even while sending fewer key/value rows than zigzag on packed rows
    assert all(rows[(d, "balanced")]["imbalance"] <= 1.10 for d in DISTRIBUTIONS)
    assert all(rows[(d, "balanced")]["kv_MiB"] < rows[(d, "zigzag")]["kv_MiB"] for d in ("lognormal", "mixed"))


def test_ring_sim_cpu_dry_run_checks_plain_and_packed_rows(tmp_path: Path) -> None:
    proc = _run("ring_sim.py", "--seqlens", "64", "--world", "2", "--backends", "cpu_flash", "--packed",
                "--bound", "cpu_flash", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = _written(tmp_path, "ring_sim")["rows"]
    plain = [r for r in rows if "dist" not in r]
    packed = [r for r in rows if "dist" in r]
    assert len(plain) == 4 and len(packed) == len(DISTRIBUTIONS) * 5 * 2  # 5 layouts (balanced too) x 2 comms
    assert {r["layout"] for r in packed} >= {"zigzag", "balanced"}
    assert all("error" not in r and r["out_err"] < 2e-2 and r["dq_err"] < 2e-2 for r in rows)
    assert all(r["ref"] == "blocks_loop" and "kernel_bound" in r for r in packed)
    assert {r["pad"] > 0 for r in packed if r["layout"] == "zigzag" and r["dist"] != "one"} == {True}


def test_profile_rank_cpu_dry_run_writes_a_table_per_configuration(tmp_path: Path) -> None:
    proc = _run("profile_rank.py", "--seqlen", "512", "--world", "2", "--layouts", "balanced", "zigzag",
                "--comms", "p2p", "allgather", "--backend", "cpu_flash", "--iters", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = _written(tmp_path, "profile_rank")
    assert written["env"]["docs"] > 1
    (md,) = tmp_path.glob("profile_rank_*.md")
    assert md.read_text().count("## lognormal 512 P=2 cpu_flash") == 4


def test_train_step_dry_run_runs_the_forced_ring(tmp_path: Path) -> None:
    proc = _run("train_step.py", "--dry-run", "--seqlens", "256", "512", "--search", "--no-attention-probe",
                "--out", str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _written(tmp_path, "train_step")
    assert data["extra"]["self_check"]["passed"]
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    forced = [r for r in rows if r["variant"] == "ours_cudnn"]
    assert forced and all(r["attn"] == "ring (force_ring, auto)" for r in forced)
    losses = {r["loss"] for r in rows if r["seq_len"] == 256}
    assert max(losses) - min(losses) < 1e-4


def test_train_step_dry_run_measures_packed_rows_against_one_document(tmp_path: Path) -> None:
    variants = ("stock", "ours", "ours_cudnn", "ours_mem")
    proc = _run("train_step.py", "--dry-run", "--points", *(f"{v}:256" for v in variants), "--packed", "lognormal",
                "mixed", "--layout", "balanced", "--search", "--no-attention-probe", "--max-iters", "1",
                "--out", str(tmp_path), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = _written(tmp_path, "train_step")
    extra = data["extra"]
    # the self-check compared stock, ours and the ring's kernels on a packed row of each distribution, gradients too
    assert extra["self_check"]["passed"] and "mixed_grad_kernels_vs_stock" in extra["self_check"]
    rows = {r["label"]: r for r in data["rows"]}
    dists = ("one", "lognormal", "mixed")
    assert set(rows) == {f"{v}:256:{d}" for v in variants for d in dists}
    assert all(r["status"] == "ok" for r in rows.values())
    for d in dists:
        want = len(document_lengths(d, 256))
        assert all(rows[f"{v}:256:{d}"]["docs"] == want for v in variants)
    assert rows["ours:256:lognormal"]["docs"] > 10 and rows["ours:256:mixed"]["docs"] > 10
    assert {rows[f"{v}:256:{d}"]["layout"] for v in variants[1:] for d in dists} == {"balanced"}
    # the same tokens and targets on one row: the same first-step loss in every variant; the rows differ
    for d in dists:
        losses = [rows[f"{v}:256:{d}"]["loss"] for v in variants]
        assert max(losses) - min(losses) < 1e-4 * losses[0], (d, losses)
    assert len({round(rows[f"ours:256:{d}"]["loss"], 4) for d in dists}) == 3
    assert extra["loss_check"]["passed"] and set(extra["loss_check"]["rel_spread"]) == {f"256:{d}" for d in dists}
    ratios = {(r["variant"], r["dist"]): r for r in extra["packed"]}
    assert set(ratios) == {(v, d) for v in variants for d in dists[1:]}
    for (v, _), r in ratios.items():
        assert r["ratio"] == r["step_s"] / rows[f"{v}:256:one"]["step_s"] and 0 < r["predicted_ratio"] < 1
    (md,) = tmp_path.glob("train_step_*.md")
    assert "Packed rows against one document" in md.read_text()
