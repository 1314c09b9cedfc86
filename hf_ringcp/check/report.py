"""Judging the measured errors: the pass/fail table, the first diverging layer and what usually causes it."""

from __future__ import annotations

import json
import math
from typing import Any

from hf_ringcp.check.rank import ATTENTION
from hf_ringcp.check.spec import Tolerances

EXIT_PASS, EXIT_MISMATCH, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2, 3
EXIT_CODES = {"pass": EXIT_PASS, "fail": EXIT_MISMATCH, "refused": EXIT_REFUSED, "error": EXIT_ERROR}

_CAUSES = {
    "first_attention": (
        "the attention of the first layer already differs, so the ring sees other inputs or another mask than "
        "the reference: the positions (RoPE at each token's global position / position in its document, "
        "position-dependent RoPE that needs hf_ringcp.prepare_model), the causal or document mask, the sliding "
        "window, or the ring exchange itself (a K/V block missed or counted twice)"
    ),
    "first_layer_rest": (
        "the attention matches but the first layer's output does not: something outside the attention mixes "
        "tokens or depends on the token's place in the sequence (a token shift or convolution, a position-dependent "
        "op), which context parallelism splits"
    ),
    "new_layer_type": (
        "the earlier layers match and this is the first layer of type {kind!r}: that layer type's own attention "
        "path (its sliding window, its own RoPE parameters, its scaling)"
    ),
    "accumulation": (
        "only later layers exceed the tolerance: rounding differences accumulating through the layers (numerics), "
        "not a wrong mask; look at how the error grows layer by layer, and loosen --tolerance-scale if it grows "
        "smoothly"
    ),
    "head": (
        "every decoder layer matches but the logits do not: the final norm, the output head or a logit transform "
        "(final_logit_softcapping, logit_scale) is applied differently"
    ),
    "loss_only": (
        "the logits match but the loss does not: label shifting (labels must be shifted before sharding), which "
        "tokens have targets (document boundaries, padding) or the target count of the global token mean"
    ),
    "grads_only": (
        "the forward matches but the gradients do not (worst: {param}): the backward of the ring (dK/dV returned "
        "to their owner), gradient-checkpointing recomputation outside hf_ringcp.context_parallel, or the sum of "
        "the gradients over the CP group"
    ),
}


def _passes(error: float, tolerance: float) -> bool:
    return not math.isnan(error) and error <= tolerance


def rows(measured: dict[str, Any], tolerances: Tolerances) -> list[dict[str, Any]]:
    """One row per compared quantity: ``quantity``, ``max_rel_error``, ``tolerance``, ``passed``."""
    out = []
    for quantity in ("logits", "loss", "grads"):
        error, tolerance = measured["errors"][quantity], getattr(tolerances, quantity)
        out.append({"quantity": quantity, "max_rel_error": error, "tolerance": tolerance,
                    "passed": _passes(error, tolerance)})
    return out


def first_divergence(measured: dict[str, Any], tolerance: float) -> dict[str, Any] | None:
    """The first layer output (in forward order) whose error exceeds ``tolerance``, or ``None``."""
    return next((dict(x) for x in measured["layers"] if not _passes(x["max_rel_error"], tolerance)), None)


def diagnose(measured: dict[str, Any], table: list[dict[str, Any]], tolerances: Tolerances,
             layer_types: list[str] | None = None) -> dict[str, Any]:
    """Where the runs part and why that usually happens: ``{"first": layer entry or None, "cause": text}``."""
    ok = {r["quantity"]: r["passed"] for r in table}
    first = first_divergence(measured, tolerances.hidden)
    if first is not None:
        i = first["layer"]
        if i == 0:
            cause = _CAUSES["first_attention" if first["tensor"] == ATTENTION else "first_layer_rest"]
        elif layer_types and i < len(layer_types) and layer_types[i] not in layer_types[:i]:
            cause = _CAUSES["new_layer_type"].format(kind=layer_types[i])
        else:
            cause = _CAUSES["accumulation"]
    elif not ok["logits"]:
        cause = _CAUSES["head"]
    elif not ok["loss"]:
        cause = _CAUSES["loss_only"]
    else:
        cause = _CAUSES["grads_only"].format(param=measured.get("worst_grad"))
    return {"first": first, "cause": cause}


def judge(measured: dict[str, Any], tolerances: Tolerances, layer_types: list[str] | None = None) -> dict[str, Any]:
    """The verdict on one rank's :func:`~hf_ringcp.check.rank.check_rank` result.

    Returns ``measured`` extended with ``status`` (``"pass"``, ``"fail"``, ``"refused"`` or ``"error"``),
    ``exit_code`` (0, 1, 2, 3), and for runs ``rows`` (the table) and, on failure, ``divergence``
    (:func:`diagnose`; ``layer_types``: the checked config's, to recognise the first layer of a new type).
    """
    result = dict(measured)
    if measured["status"] != "ran":
        result["exit_code"] = EXIT_CODES[measured["status"]]
        return result
    result["rows"] = table = rows(measured, tolerances)
    passed = all(r["passed"] for r in table)
    result["status"] = "pass" if passed else "fail"
    result["exit_code"] = EXIT_PASS if passed else EXIT_MISMATCH
    if not passed:
        result["divergence"] = diagnose(measured, table, tolerances, layer_types)
    return result


def merge_ranks(per_rank: list[dict[str, Any] | None]) -> dict[str, Any]:
    """One result from every rank's: a refusal on any rank wins, then an error, else rank 0's measurement.

    ``None`` stands for a rank stopped before it returned (after another rank's error or refusal).
    """
    # A refusal first: it is the library's deliberate answer, while an error on another rank may only be the
    # broken collective the refusing rank left behind.
    for status in ("refused", "error"):
        for rank, result in enumerate(per_rank):
            if result is not None and result["status"] == status:
                return {**result, "rank": rank}
    if per_rank[0] is None:
        return {"status": "error", "message": "rank 0 returned no result"}
    return per_rank[0]


# ------------------------------------------------------------------------------------------------ output


def _fmt(x: float) -> str:
    return f"{x:.2e}" if math.isfinite(x) else str(x)


def format_table(table: list[dict[str, Any]], result: dict[str, Any]) -> str:
    """The quantity / max relative error / tolerance / pass-fail table."""
    lines = [f"{'quantity':<10} {'max rel error':>14} {'tolerance':>10}  result"]
    for r in table:
        note = ""
        if r["quantity"] == "grads":
            note = f"  ({result['compared']['gradients']} tensors; worst: {result.get('worst_grad')})"
        elif r["quantity"] == "logits":
            note = f"  ({result['compared']['tokens']} real tokens)"
        lines.append(f"{r['quantity']:<10} {_fmt(r['max_rel_error']):>14} {_fmt(r['tolerance']):>10}  "
                     f"{'pass' if r['passed'] else 'FAIL'}{note}")
    return "\n".join(lines)


def format_divergence(divergence: dict[str, Any], tolerance: float, layers: list[dict[str, Any]]) -> str:
    """The first diverging layer and tensor, the per-layer errors and the likely cause."""
    first = divergence["first"]
    lines = []
    if first is None:
        lines.append(f"no decoder layer output exceeds {_fmt(tolerance)}")
    else:
        lines.append(f"first divergence: layer {first['layer']} {first['tensor']} ({first['module']}), max rel error "
                     f"{_fmt(first['max_rel_error'])} > {_fmt(tolerance)}")
    lines.append("per layer: " + ", ".join(
        f"{x['layer']}{'a' if x['tensor'] == ATTENTION else ''}={_fmt(x['max_rel_error'])}" for x in layers
    ) + "  (Na: attention output of layer N)")
    lines.append(f"likely cause: {divergence['cause']}")
    return "\n".join(lines)


def format_text(result: dict[str, Any], header: list[str], tolerances: Tolerances) -> str:
    """The human-readable report: the header lines, then the table and verdict (or the refusal / error)."""
    lines = list(header)
    status = result["status"]
    if status == "refused":
        lines.append(f"refused: {result['message']}")
    elif status == "error":
        if result.get("traceback"):
            lines.append(result["traceback"].rstrip())
        lines.append(f"error: {result['message']}")
    else:
        lines.append(format_table(result["rows"], result))
        if status == "fail":
            lines.append(format_divergence(result["divergence"], tolerances.hidden, result["layers"]))
    took = f" in {result['seconds']} s" if "seconds" in result else ""
    lines.append(f"{status.upper()} (exit code {result['exit_code']}){took}")
    return "\n".join(lines)


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as the strings "inf" / "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def format_json(result: dict[str, Any], extra: dict[str, Any]) -> str:
    """The machine-readable result: ``result`` plus ``extra`` (settings, shrink report), strict JSON."""
    return json.dumps(_finite({**extra, **result}), indent=2, sort_keys=False)
