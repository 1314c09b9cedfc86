"""Shared helpers for the benchmarks: environment description, CUDA-event timing, result files.

Every benchmark writes ``<name>_<device>_<date>.md`` (and a ``.json`` with the same rows) into a results
folder, headed by the environment it ran in, so that numbers in ``docs/`` can always be traced to a run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def env_info() -> dict[str, Any]:
    """Device, versions and date of this run (no secrets: names and versions only)."""
    info: dict[str, Any] = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
            )
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        info["device"] = "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def device_slug(info: dict[str, Any]) -> str:
    """A short file-name tag for the device, e.g. ``h100`` for "NVIDIA H100 80GB HBM3"."""
    name = str(info.get("device", "cpu")).lower()
    match = re.search(r"\b([a-z]\d{2,4}[a-z]?)\b", name)
    return match.group(1) if match else re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def cuda_time_ms(
    fn: Callable[[], Any], warmup: int = 2, iters: int = 5, inner: int = 1
) -> tuple[float, list[float]]:
    """Median time of one ``fn()`` on the current CUDA stream, by CUDA events; returns ``(median, all)``.

    Each of the ``iters`` samples times ``inner`` back-to-back calls and divides by ``inner``: with ``inner > 1``
    the host work of one call overlaps the device work of the previous one, as it does inside a model, instead of
    the device idling while the host issues the first kernels of every sample. Without CUDA (a dry run on CPU)
    it times with the host clock.
    """
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - start) * 1e3 / inner)
        return statistics.median(times), times
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times), times


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A GitHub markdown table of ``rows`` restricted to ``columns`` (floats with 3 significant decimals)."""

    def cell(x: Any) -> str:
        if isinstance(x, float):
            if x != 0 and abs(x) < 0.01:
                return f"{x:.1e}"
            return f"{x:.3f}" if abs(x) < 100 else f"{x:.1f}"
        return "" if x is None else str(x)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(
    name: str, info: dict[str, Any], rows: Sequence[dict[str, Any]], markdown: str,
    out_dir: str | os.PathLike | None = None,
) -> Path:
    """Write ``<name>_<device>_<date>.md`` and ``.json`` into ``out_dir``; return the markdown path."""
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{device_slug(info)}_{info['date_utc'][:10]}"
    header = "\n".join(f"- {k}: {v}" for k, v in info.items())
    md_path = out / f"{stem}.md"
    md_path.write_text(f"# {name}\n\n{header}\n\n{markdown}\n")
    (out / f"{stem}.json").write_text(json.dumps({"env": info, "rows": list(rows)}, indent=1, default=str))
    return md_path


def attention_flops(batch: int, q_heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool,
                    backward: bool = True) -> float:
    """Matmul FLOPs of attention: forward ``4*B*Hq*Sq*Sk*D`` (QK^T and PV, 2 FLOPs per multiply-add), halved
    when causal (square); the backward is counted as 2.5 times the forward (five matmuls, the recompute of QK^T
    not counted), so forward+backward is 3.5 times the forward: ``7*B*Hq*S^2*D`` for causal self-attention."""
    fwd = 4.0 * batch * q_heads * seq_q * seq_k * head_dim
    if causal:
        fwd /= 2
    return fwd * (3.5 if backward else 1.0)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> torch.device:
    """Initialise the default process group from torchrun's environment; return this rank's device.

    ``device="auto"``: CUDA with NCCL when a GPU is visible (the GPU is ``LOCAL_RANK``), else CPU with gloo.
    """
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"`device` must be one of ('auto', 'cuda', 'cpu'), but got {device!r}.")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    timeout = timedelta(seconds=timeout_s)
    if use_cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev, timeout=timeout)
        # float32 comparisons need true float32 matmuls.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        return dev
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")
