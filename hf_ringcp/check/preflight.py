"""Before any rank starts: what the library refuses in this model, and a shrunk config whose model runs.

:func:`preflight` runs in the launching process. It builds the model of the *original* config on the meta device
(no memory, no weights) and lets :func:`hf_ringcp.prepare_model` judge it, so a model the library refuses (layers
that mix tokens outside attention, multi-head latent attention with its own value head dim) is refused by name in
a second, whatever its size, instead of failing later in a shrunk copy or on the ranks. It then shrinks the config
(:func:`~hf_ringcp.check.shrink.shrink_config`) and runs the shrunk model once in this process (a few tokens, the
reference attention): where the model's own code or config validation does not survive a part of the shrinking,
it keeps that part (first the widths, then also the layers) and says so in the notes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from hf_ringcp.check.shrink import Shrunk, shrink_config

# A shrunk model with more parameters than this is not run (it would not fit a quick CPU check).
MAX_PARAMETERS = 50_000_000
_ATTEMPTS: tuple[tuple[str, dict[str, bool]], ...] = (
    ("", {}),
    ("widths kept: the shrunk widths do not run in this model", {"widths": False}),
    ("layers and widths kept: the shrunk model does not run otherwise", {"widths": False, "layers": False}),
)


class Refused(ValueError):
    """The library refuses this model under context parallelism; ``str(err)`` is its message."""


@dataclass
class Preflight:
    """What :func:`preflight` decided: ``refusal`` (the library's message) or ``shrunk`` (ready for the ranks)."""

    shrunk: Shrunk | None = None
    refusal: str | None = None


def _text_config(config: Any) -> Any:
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _build(config: Any, attn: str, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn, dtype=torch.float32)


def library_refusal(config: Any) -> str | None:
    """The message with which :func:`hf_ringcp.prepare_model` refuses the model of ``config``, or ``None``.

    Built on the meta device at full size (the refusals look at modules, not at weights).
    """
    import hf_ringcp
    from hf_ringcp.check.rank import is_refusal

    try:
        model = _build(_text_config(config), "ring", "meta")
    except KeyError as err:
        if err.args != ("ring",):
            raise
        # Models that look their attention class up by name (GPT-Neo, GIT) have no entry for "ring".
        return ('attn_implementation="ring" under context parallelism does not support this model: its attention '
                'classes are chosen by name and have no "ring" entry (it does not dispatch through transformers\' '
                "AttentionInterface). Train this model without context parallelism (cp_size=1).")
    try:
        hf_ringcp.prepare_model(model)
    except ValueError as err:
        if is_refusal(err):
            return str(err)
        raise
    return None


def _parameters(config: Any) -> int:
    return sum(p.numel() for p in _build(config, "sdpa", "meta").parameters())


def smoke_test(config: Any, tokens: int = 8) -> None:
    """One forward and backward of the model of ``config`` on ``tokens`` random tokens, in this process (CPU).

    Raises whatever the model raises (a shape error of a shrunk config, a config validation error).
    """
    torch.manual_seed(0)
    try:
        model = _build(config, "sdpa", "cpu")
    except ValueError:
        model = _build(config, "eager", "cpu")  # models without SDPA support
    ids = torch.randint(0, int(config.vocab_size), (1, tokens))
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()


def shrink_that_runs(config: Any, *, shrink: bool = True) -> Shrunk:
    """:func:`~hf_ringcp.check.shrink.shrink_config`, keeping what the model does not survive shrinking.

    Raises ``RuntimeError`` naming each attempt's error if no attempt gives a model that runs.
    """
    if not shrink:
        return shrink_config(config, shrink=False)
    errors = []
    for note, options in _ATTEMPTS:
        try:
            shrunk = shrink_config(config, **options)
            size = _parameters(shrunk.config)
            if size > MAX_PARAMETERS:
                errors.append(f"{note or 'shrunk'}: {size:,} parameters (over {MAX_PARAMETERS:,}), not run")
                continue
            smoke_test(shrunk.config)
        except Exception as err:  # the next, gentler attempt may run
            errors.append(f"{note or 'shrunk'}: {type(err).__name__}: {err}")
            continue
        if note:
            shrunk.notes.append(note)
        return shrunk
    raise RuntimeError("no shrunk copy of this model runs in one process: " + "; ".join(errors))


def preflight(config: Any, *, shrink: bool = True) -> Preflight:
    """The library's refusal of ``config``'s model, or its shrunk config that runs (see the module docstring)."""
    refusal = library_refusal(config)
    if refusal is not None:
        return Preflight(refusal=refusal)
    return Preflight(shrunk=shrink_that_runs(config, shrink=shrink))
