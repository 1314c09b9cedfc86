"""What one check runs: the model config, the context-parallel setting, the batch and the tolerances."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PADDING_SIDES = ("left", "right")


@dataclass(frozen=True)
class Tolerances:
    """Maximum relative errors (``max|ring - ref| / max|ref|``) accepted in float32.

    ``hidden`` applies to the per-layer outputs that locate a divergence; it is a diagnostic, not a pass criterion.
    """

    logits: float = 1e-4
    loss: float = 1e-5
    grads: float = 1e-4
    hidden: float = 1e-4

    def scaled(self, factor: float) -> Tolerances:
        """Every tolerance times ``factor``."""
        return Tolerances(**{k: v * factor for k, v in asdict(self).items()})


@dataclass(frozen=True)
class CheckSpec:
    """One check: build ``config`` with random weights, one training step with the ring and one without.

    Attributes:
        config: the (already shrunk) transformers config of a causal LM.
        cp: the context-parallel size (ranks sharing the sequence).
        layout, comm, backend, ulysses_size: as in :func:`hf_ringcp.context_parallel`.
        seq_len: tokens per row of the full batch.
        packed: one row of several documents, ``position_ids`` restarting at 0 (``DataCollatorWithFlattening``).
        padded: ``"left"`` / ``"right"``: two rows, the second padded on that side; ``None``: no padding.
        lora: peft LoRA on all linear layers (random, non-zero adapters); the base weights frozen.
        gradient_checkpointing: non-reentrant activation checkpointing of the decoder layers.
        seed: seeds the weights and the tokens.
        device: ``"cpu"`` or ``"cuda"`` (each rank then uses ``cuda:LOCAL_RANK``).
        tolerances: see :class:`Tolerances`.
    """

    config: Any
    cp: int = 2
    layout: str = "zigzag"
    comm: str = "p2p"
    backend: str = "auto"
    ulysses_size: int = 1
    seq_len: int = 256
    packed: bool = False
    padded: str | None = None
    lora: bool = False
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "cpu"
    tolerances: Tolerances = field(default_factory=Tolerances)

    def __post_init__(self) -> None:
        if self.packed and self.padded:
            raise ValueError("choose one of `packed` and `padded`: a batch is either packed or padded.")
        if self.padded not in (None, *PADDING_SIDES):
            raise ValueError(f"`padded` must be None, 'left' or 'right', but got {self.padded!r}.")
        if self.cp < 2:
            raise ValueError(f"`cp` must be at least 2 (with one rank the ring is plain SDPA), but got {self.cp}.")
        if self.seq_len < 4:
            raise ValueError(f"`seq_len` must be at least 4, but got {self.seq_len}.")
        # Settings that do not fit the group are the user's to fix (exit 3), not a refusal of their model (2).
        from hf_ringcp.ring.config import RingConfig

        ring = RingConfig(layout=self.layout, comm=self.comm, backend=self.backend, ulysses_size=self.ulysses_size)
        if ring.ulysses_size != "auto":
            ring.check_world(self.cp)

    @property
    def batch_kind(self) -> str:
        """``"plain"``, ``"packed"`` or ``"padded (left)"`` / ``"padded (right)"``."""
        if self.packed:
            return "packed"
        return f"padded ({self.padded})" if self.padded else "plain"

    def describe(self) -> dict[str, Any]:
        """The settings as plain values (for the report and ``--json``)."""
        return {
            "model_type": getattr(self.config, "model_type", type(self.config).__name__),
            "cp": self.cp, "layout": self.layout, "comm": self.comm, "backend": self.backend,
            "ulysses_size": self.ulysses_size, "seq_len": self.seq_len, "batch": self.batch_kind,
            "lora": self.lora, "gradient_checkpointing": self.gradient_checkpointing, "seed": self.seed,
            "device": self.device,
        }
