"""The core is pure torch, and no module reaches into another module's private names."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hf_ringcp"


def test_importing_the_core_imports_no_hf_library() -> None:
    code = ("import hf_ringcp.ring, sys; bad = [m for m in ('transformers', 'accelerate', 'peft') if m in sys.modules];"
            " assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_hf_ringcp_registers_ring_whenever_transformers_comes() -> None:
    for order in ("import hf_ringcp; import transformers", "import transformers; import hf_ringcp"):
        code = f"{order}; from transformers import AttentionInterface; assert 'ring' in AttentionInterface()"
        subprocess.run([sys.executable, "-c", code], check=True)


def test_no_module_imports_a_private_name_of_another() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_ringcp"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not offenders, offenders
