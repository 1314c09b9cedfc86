"""Every Python snippet of README.md runs, in order, on 2 gloo ranks (so the README cannot rot).

The snippets share one namespace, like a notebook; before each one, ``model`` is a fresh tiny LoRA Llama with
``attn_implementation="ring"``. The other names they use are tiny stand-ins defined here: ``cp_group`` (the 2-rank
group), ``q``/``k``/``v`` (the same full tensors on every rank), ``path`` (a saved tiny model), ``full_batch``,
``loader``, ``train_dataset`` and ``tokenizer``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from tests.distributed import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def python_snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def _namespace(tmp: str) -> dict:
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from recipes.data import build_tiny_tokenizer
    from tests.integrations.tiny import CONFIG, tiny_lora_llama, token_samples

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 32, 16, generator=g) for h in (8, 2, 2))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=g)
    path = f"{tmp}/tiny"
    if dist.get_rank() == 0:
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(CONFIG).save_pretrained(path)
    dist.barrier()
    lengths = torch.randint(3, 20, (16,), generator=g).tolist()
    tokenizer = build_tiny_tokenizer()
    return {
        "cp_group": dist.group.WORLD, "q": q, "k": k, "v": v, "path": path,
        "full_batch": {"input_ids": ids, "labels": ids.clone()},
        "loader": DataLoader([{k: s[k] for k in ("input_ids", "labels")} for s in token_samples(4, 16)], batch_size=1),
        "train_dataset": [{"input_ids": torch.randint(2, CONFIG.vocab_size, (n,), generator=g).tolist()}
                          for n in lengths],
        "tokenizer": tokenizer,
        "fresh_model": lambda: tiny_lora_llama("ring", vocab_size=len(tokenizer)),  # TRL's data is tokenised
    }


def _run_snippets(rank: int, world: int, tmp: str) -> int:
    namespace = _namespace(tmp)
    snippets = python_snippets((ROOT / "README.md").read_text())
    for i, code in enumerate(snippets):
        namespace["model"] = namespace["fresh_model"]()
        try:
            exec(compile(code, f"README.md snippet {i + 1}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"README snippet {i + 1} failed on rank {rank}:\n{code}") from err
    return len(snippets)


def test_readme_snippets_run(tmp_path) -> None:
    counts = run_ranks(_run_snippets, 2, str(tmp_path))
    assert counts[0] == len(python_snippets((ROOT / "README.md").read_text())) >= 6
