"""``python -m hf_ringcp.check``: prove that a model is exact under context parallelism before a long run.

::

    python -m hf_ringcp.check --model meta-llama/Llama-3.1-8B --cp 2 [--layout zigzag] [--comm p2p] [--seq-len 256]
    python -m hf_ringcp.check --model ./my_model_dir --cp 4 --packed --lora --gradient-checkpointing

The model is built from its config alone (``AutoConfig.from_pretrained``: a local directory or a config in the HF
cache; no weights are downloaded) with random float32 weights. One training step runs with
``attn_implementation="ring"`` on ``--cp`` ranks (spawned gloo ranks on the CPU, one thread each; or, under
``torchrun``, the existing ranks, on CUDA when available) and the same step in one process with ``"sdpa"``
(``"eager"`` for models without SDPA). Logits, loss and every trainable gradient are compared; on a mismatch the
outputs of every decoder layer and its attention (forward hooks on both runs) name the first that diverges and
what usually causes that.

What is shrunk (:func:`~hf_ringcp.check.shrink.shrink_config`; the report lists each change): the number of
layers (one layer of every distinct kind in ``layer_types`` and the other per-layer lists, at least 2),
``hidden_size`` (to 256, a multiple of the query heads), the MLP widths (to ``2 * hidden_size``), the number of
experts (to 4) and the vocabulary (to 512, special token ids moved inside it); dropout outside the attention is
set to 0. What is kept: ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` (set explicitly), the
RoPE type and scaling (``rope_parameters``), the sliding window, attention dropout, soft-capping and every other
attention setting. ``--no-shrink`` builds the full size.

Exit codes:

- ``0`` pass: logits, loss and gradients within tolerance;
- ``1`` mismatch: at least one quantity differs (the first diverging layer and a likely cause are printed);
- ``2`` refused: the library refuses a feature of this model or setting under context parallelism (e.g. attention
  logit soft-capping); its message is printed as ``refused: <message>``;
- ``3`` error: bad arguments, a config that does not load, a crash or a timeout.

``--json`` prints one JSON object (``status``, ``exit_code``, ``rows``, per-gradient and per-layer errors, the
settings and the shrink report) for CI.

Programmatic use: :func:`~hf_ringcp.check.rank.check_rank` is the per-rank half (call it on every rank of an
initialised group), :func:`~hf_ringcp.check.report.judge` turns its result into the verdict.
"""

from hf_ringcp.check.rank import check_rank
from hf_ringcp.check.report import EXIT_ERROR, EXIT_MISMATCH, EXIT_PASS, EXIT_REFUSED, judge
from hf_ringcp.check.shrink import Shrunk, shrink_config
from hf_ringcp.check.spec import CheckSpec, Tolerances

__all__ = [
    "EXIT_ERROR",
    "EXIT_MISMATCH",
    "EXIT_PASS",
    "EXIT_REFUSED",
    "CheckSpec",
    "Shrunk",
    "Tolerances",
    "check_rank",
    "judge",
    "shrink_config",
]
