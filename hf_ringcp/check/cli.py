"""``python -m hf_ringcp.check``: the command line (see :mod:`hf_ringcp.check` for what it does)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from hf_ringcp.check.preflight import preflight
from hf_ringcp.check.rank import check_rank
from hf_ringcp.check.report import EXIT_ERROR, EXIT_REFUSED, format_json, format_text, judge, merge_ranks
from hf_ringcp.check.shrink import Shrunk
from hf_ringcp.check.spawn import SpawnError, spawn_ranks
from hf_ringcp.check.spec import PADDING_SIDES, CheckSpec, Tolerances
from hf_ringcp.ring import BACKEND_NAMES, COMM_NAMES, LAYOUTS

_EPILOG = """\
exit codes: 0 pass, 1 mismatch (the ring's logits, loss or gradients differ), 2 refused (the library refuses a
feature of this model or setting under context parallelism; its message is printed), 3 error (bad arguments, a
config that does not load, a crash or a timeout).

examples:
  python -m hf_ringcp.check --model meta-llama/Llama-3.1-8B --cp 2
  python -m hf_ringcp.check --model ./my_model_dir --cp 4 --packed --lora --gradient-checkpointing
  torchrun --nproc-per-node 2 -m hf_ringcp.check --model ./my_model_dir   # existing ranks (CUDA if available)
"""


class _Parser(argparse.ArgumentParser):
    """argparse exits with 2 on bad arguments; here 2 means "refused", so bad arguments exit with 3."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m hf_ringcp.check`` (every flag explained in ``--help``)."""
    p = _Parser(
        prog="python -m hf_ringcp.check",
        description="Prove that a model is exact under context parallelism before a long run: build it from its "
                    "config alone (random float32 weights, shrunk where that cannot change the attention path), run "
                    "one training step with attn_implementation='ring' on --cp ranks and the same step in one "
                    "process with 'sdpa' (or 'eager'), and compare logits, loss and every trainable gradient.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="a local model directory or a hub id whose config.json is (or can be fetched into) the HF "
                        "cache; only the config is read, no weights are downloaded")
    p.add_argument("--cp", type=int, default=None,
                   help="context-parallel size: the number of ranks sharing the sequence (default 2; under "
                        "torchrun the world size)")
    p.add_argument("--layout", choices=LAYOUTS, default="zigzag", help="how the sequence is split (default zigzag)")
    p.add_argument("--comm", choices=(*COMM_NAMES, "auto"), default="p2p",
                   help="how K/V reach the ranks (default p2p)")
    p.add_argument("--ulysses-size", type=int, default=1,
                   help="Ulysses groups of this many ranks inside the ring (the hybrid; default 1: the plain ring)")
    p.add_argument("--backend", choices=tuple(dict.fromkeys(("auto", *BACKEND_NAMES))), default="auto",
                   help="the ring's block kernel (default auto)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row of the checked batch (default 256)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--packed", action="store_true",
                       help="one packed row of several documents, position_ids restarting at 0 (as "
                            "transformers.DataCollatorWithFlattening writes them)")
    batch.add_argument("--padded", nargs="?", const="right", choices=PADDING_SIDES, default=None,
                       help="a padded batch of 2 rows (attention_mask with zeros) on the given side (default right)")
    p.add_argument("--lora", action="store_true", help="peft LoRA on all linear layers, base weights frozen")
    p.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    p.add_argument("--no-shrink", action="store_true",
                   help="build the model at its full size (slow; by default layers, widths, experts and vocabulary "
                        "are shrunk, the attention path kept)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens (default 0)")
    p.add_argument("--tolerance-scale", type=float, default=1.0,
                   help="multiply every tolerance by this factor (defaults: logits 1e-4, loss 1e-5, grads 1e-4, "
                        "per-layer outputs 1e-4; relative to the reference's max)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds before spawned ranks are killed (under torchrun: before a collective gives up) and "
                        "the check reports an error (default 300)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow configs with custom code")
    p.add_argument("--json", action="store_true", help="print one JSON object (for CI) instead of the report")
    return p


# ------------------------------------------------------------------------------------------------ running


def launched_by_torchrun() -> bool:
    """Whether this process is one of several ranks started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def load_config(model: str, trust_remote_code: bool = False) -> Any:
    """``AutoConfig`` of ``model``: the local directory or HF cache first, the hub (config.json only) otherwise."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, local_files_only=True)
    except OSError:
        if Path(model).exists() or model.startswith((".", "/", "~")):
            raise  # a local path: nothing to fetch
        return AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)


def _run_in_this_process(spec: CheckSpec, timeout: float) -> dict[str, Any]:
    """Under torchrun: the existing ranks (NCCL on CUDA, else gloo) run the check; results merged on every rank.

    ``timeout`` bounds each collective: a rank that fails while the others wait in the ring ends the run with an
    error instead of a hang.
    """
    owned = not dist.is_initialized()
    if owned:
        if spec.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if spec.device == "cuda" else "gloo", timeout=timedelta(seconds=timeout))
    try:
        result = check_rank(dist.get_rank(), dist.get_world_size(), spec)
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        return merge_ranks(gathered)
    finally:
        if owned:
            dist.destroy_process_group()


def run_check(spec: CheckSpec, *, timeout: float = 300.0) -> dict[str, Any]:
    """Run :func:`~hf_ringcp.check.rank.check_rank` on ``spec.cp`` ranks and return the merged measurement.

    Spawns ``spec.cp`` gloo ranks on the CPU, or, when launched by torchrun, uses the existing ranks.
    """
    if launched_by_torchrun():
        return _run_in_this_process(spec, timeout)
    # Library warnings (e.g. the padding it adds) stay visible; transformers' config chatter does not.
    env = {"TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error")}
    try:
        per_rank = spawn_ranks(check_rank, spec.cp, spec, timeout=timeout, env=env,
                               settles=lambda r: r["status"] != "ran")
        return merge_ranks(per_rank)
    except SpawnError as err:
        return {"status": "error", "message": str(err)}


def _window_notes(config: Any, seq_len: int) -> list[str]:
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    used = window is not None and (not types or "sliding_attention" in types)
    if used and window >= seq_len:
        return [f"sliding_window={window} >= --seq-len {seq_len}: the window masks nothing at this length; pass "
                f"--seq-len {window + 64} (or more) to check the windowed path too"]
    return []


def _header(args: argparse.Namespace, spec: CheckSpec, shrunk: Shrunk, reference: str | None) -> list[str]:
    training = ", ".join(x for x, on in (("LoRA (all-linear)", spec.lora),
                                         ("gradient checkpointing", spec.gradient_checkpointing)) if on)
    lines = [
        f"hf_ringcp.check: {args.model} ({type(shrunk.config).__name__})",
        f"  cp={spec.cp} layout={spec.layout} comm={spec.comm} ulysses_size={spec.ulysses_size} "
        f"backend={spec.backend} on {spec.device}; batch: {spec.batch_kind}, seq_len={spec.seq_len}; "
        f"{training or 'full fine-tuning'}",
        f"  reference: one process, attn_implementation={reference!r}" if reference else "",
        "  model: built from its config, random float32 weights" + (", shrunk:" if shrunk.changes else ""),
        *(f"    {c}" for c in shrunk.changes),
        "  kept:",
        *(f"    {k}" for k in shrunk.kept),
        *(f"  note: {n}" for n in shrunk.notes),
    ]
    return [x for x in lines if x]


def _report(args: argparse.Namespace, result: dict[str, Any], extra: dict[str, Any], header: list[str],
            tolerances: Tolerances) -> None:
    if launched_by_torchrun() and int(os.environ.get("RANK", "0")) != 0:
        return
    print(format_json(result, extra) if args.json else format_text(result, header, tolerances), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check from command-line arguments; returns the exit code (0 pass, 1 mismatch, 2 refused, 3 error)."""
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    extra: dict[str, Any] = {"model": args.model}
    tolerances = Tolerances().scaled(args.tolerance_scale)
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        cp = args.cp if args.cp is not None else (world if launched_by_torchrun() else 2)
        if launched_by_torchrun() and cp != world:
            raise ValueError(f"--cp {cp} differs from torchrun's world size {world}; omit --cp or make them equal.")
        checked = preflight(load_config(args.model, args.trust_remote_code), shrink=not args.no_shrink)
        if checked.refusal is not None:  # decided from the model's modules: no rank needs to start
            result = {"status": "refused", "message": checked.refusal, "exit_code": EXIT_REFUSED,
                      "seconds": round(time.monotonic() - started, 1)}
            _report(args, result, extra, [f"hf_ringcp.check: {args.model}"], tolerances)
            return EXIT_REFUSED
        shrunk = checked.shrunk
        device = "cuda" if launched_by_torchrun() and torch.cuda.is_available() else "cpu"
        spec = CheckSpec(config=shrunk.config, cp=cp, layout=args.layout, comm=args.comm, backend=args.backend,
                         ulysses_size=args.ulysses_size, seq_len=args.seq_len, packed=args.packed, padded=args.padded,
                         lora=args.lora, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                         device=device, tolerances=tolerances)
    except Exception as err:  # a config that does not load or settings that do not fit: exit 3, said plainly
        result = {"status": "error", "message": f"{type(err).__name__}: {err}", "exit_code": EXIT_ERROR}
        _report(args, result, extra, [f"hf_ringcp.check: {args.model}"], tolerances)
        return EXIT_ERROR
    shrunk.notes += _window_notes(shrunk.config, spec.seq_len)
    extra.update(settings=spec.describe(), tolerances=asdict(tolerances), shrunk=shrunk.changes, kept=shrunk.kept,
                 notes=shrunk.notes, layers_kept=shrunk.layers)
    try:
        result = judge(run_check(spec, timeout=args.timeout), tolerances, getattr(spec.config, "layer_types", None))
    except Exception as err:  # e.g. a process group that did not form under torchrun: an error, never "mismatch"
        result = {"status": "error", "message": f"{type(err).__name__}: {err}", "exit_code": EXIT_ERROR}
        _report(args, result, extra, [f"hf_ringcp.check: {args.model}"], tolerances)
        return EXIT_ERROR
    result["seconds"] = round(time.monotonic() - started, 1)
    _report(args, result, extra, _header(args, spec, shrunk, result.get("reference")), tolerances)
    return result["exit_code"]
