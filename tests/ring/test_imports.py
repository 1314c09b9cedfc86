"""The core is pure torch, and no module reaches into another module's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hf_ringcp"


def test_importing_the_core_imports_no_hf_library() -> None:
    code = ("import hf_ringcp.ring, sys; bad = [m for m in ('transformers', 'accelerate', 'peft') if m in sys.modules];"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


_BUILD_A_RING_MODEL = """
from transformers import AttentionInterface, AttentionMaskInterface, LlamaConfig, LlamaForCausalLM
config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
model = LlamaForCausalLM._from_config(config, attn_implementation="ring")
assert model.config._attn_implementation == "ring"
assert AttentionInterface._global_mapping["ring"].__module__ == "hf_ringcp.integrations.hf_attention"
assert AttentionMaskInterface._global_mapping["ring"].__module__ == "hf_ringcp.integrations.hf_attention"
"""


@pytest.mark.parametrize("order", [
    "import hf_ringcp; import trl",  # TRL probes transformers with importlib.util.find_spec before importing it
    "import trl; import hf_ringcp",
    "import hf_ringcp; import peft",
    "import hf_ringcp; import importlib.util; importlib.util.find_spec('transformers'); import transformers",
    "import hf_ringcp.ring; import transformers; import hf_ringcp",
])
def test_import_hf_ringcp_registers_ring_in_any_import_order(order: str) -> None:
    subprocess.run([sys.executable, "-c", f"{order}\n{_BUILD_A_RING_MODEL}"], check=True)


def test_lazy_attributes_load_and_a_ring_another_library_owns_is_kept() -> None:
    code = """
import warnings
from transformers import AttentionInterface
def other(*args, **kwargs): pass
AttentionInterface.register("ring", other)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import hf_ringcp
assert AttentionInterface._global_mapping["ring"] is other
assert any("did not register" in str(w.message) for w in caught), [str(w.message) for w in caught]
assert callable(hf_ringcp.generate) and hf_ringcp.ContextParallelPlugin and hf_ringcp.RingCPCallback
try:
    hf_ringcp.register()
except RuntimeError as err:
    assert "does not overwrite" in str(err)
else:
    raise AssertionError("register() overwrote another library's 'ring'")
"""
    subprocess.run([sys.executable, "-c", code], check=True)


def test_no_module_imports_a_private_name_of_another() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_ringcp"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders
