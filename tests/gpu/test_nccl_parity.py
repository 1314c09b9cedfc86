"""Ring attention and a LoRA training step on N NCCL ranks (one GPU each) against one device.

Skipped unless at least 2 CUDA GPUs are visible. ``HF_RINGCP_GPU_WORLD`` sets N (default: every visible GPU;
``benchmarks/multigpu.sh`` runs this file with 2, 4 and 8); a world larger than the GPUs visible is skipped.

- attention: for bf16 and float32, every layout and comm and the kernels ``cudnn``, ``flash``, ``efficient`` (one
  a dtype cannot run is skipped), ``ring_attention`` forward + backward (causal) of a ``[B, S, H, D]`` sequence
  (``[B, H, S_local, D]`` views, as Hugging Face passes them; 1024 tokens per rank, 32 query / 8 KV heads, head
  dim 128, batch 2) is gathered and compared on rank 0 with float64 attention over the full sequence from the same
  rounded inputs (``tests.ring.reference``, one KV head group at a time to bound memory). Packed documents
  (``cu_seqlens``, documents padded as ``shard_batch`` pads them) with and without a sliding window run with the
  ``auto`` kernels (cuDNN, and the efficient kernel for the masked window edges) against ``documents_reference``.
  Max-norm relative error of out, dQ, dK and dV: at most 2e-2 (bf16) or 1e-5 (float32).
- LoRA step: a tiny Llama with ``attn_implementation="ring"``, LoRA on all linear layers and gradient
  checkpointing, through :class:`hf_ringcp.ContextParallelPlugin` (mesh, ``shard``, ``loss``, ``context``) inside
  DDP over the ranks, against the same weights with ``"sdpa"`` on the full batch on rank 0's GPU, in float32: the
  loss, the LoRA gradients and the loss after one SGD step agree within 1e-5, for every layout and comm.

``HF_RINGCP_PARITY_OUT=DIR`` also writes the rows to ``DIR/nccl_parity_p<N>_<check>_<device>_<date>.md/.json``
(benchmarks/common.py). ``HF_RINGCP_PARITY_DEVICE=cpu`` runs the same checks on N gloo CPU processes at tiny sizes
with the CPU kernels (the CPU smoke mode of ``benchmarks/multigpu.sh``).
"""

from __future__ import annotations

import copy
import itertools
import os
from typing import Any

import pytest
import torch
import torch.distributed as dist

from hf_ringcp.ring import LAYOUTS, ring_attention, select_backend, shard_sequence, unshard_sequence
from hf_ringcp.ring.group import collective_device
from tests.gpu.common import TOLERANCE, documents
from tests.gpu.nccl import run_nccl_ranks
from tests.ring.reference import documents_reference, reference_attention, rel_error

ON_CPU = os.environ.get("HF_RINGCP_PARITY_DEVICE", "cuda") == "cpu"
GPUS = torch.cuda.device_count()
WORLD = int(os.environ.get("HF_RINGCP_GPU_WORLD", "0") or 0) or (2 if ON_CPU else GPUS)
COMMS = ("p2p", "allgather")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

if ON_CPU:  # smoke sizes, CPU kernels
    SIZES = dict(tokens_per_rank=16, heads=(4, 2), head_dim=16, batch=2, backends=("auto", "math"), window=5)
else:
    SIZES = dict(tokens_per_rank=1024, heads=(32, 8), head_dim=128, batch=2, backends=("cudnn", "flash", "efficient"),
                 window=512)

pytestmark = [
    pytest.mark.skipif(not ON_CPU and GPUS < 2, reason=f"needs at least 2 CUDA GPUs ({GPUS} visible)"),
    pytest.mark.skipif(not ON_CPU and WORLD > GPUS, reason=f"HF_RINGCP_GPU_WORLD={WORLD} but {GPUS} GPUs visible"),
]


# ------------------------------------------------------------------------------------------------ reference


def per_head_group_reference(fn, q, k, v, dout) -> dict[str, torch.Tensor]:
    """``fn(q, k, v)`` (full-sequence attention, ``[B, H, S, D]``) in float64, forward and backward, computed one
    batch row and KV head (with its query heads) at a time, so that the scores of one head group are the largest
    buffer. Returns ``out, dq, dk, dv`` in float64."""
    q, k, v, dout = (x.double() for x in (q, k, v, dout))
    g = q.shape[1] // k.shape[1]
    result = {name: torch.zeros_like(x) for name, x in (("out", q), ("dq", q), ("dk", k), ("dv", v))}
    for b, h in itertools.product(range(q.shape[0]), range(k.shape[1])):
        heads = slice(h * g, (h + 1) * g)
        leaves = [x[b : b + 1, idx].detach().clone().requires_grad_()
                  for x, idx in ((q, heads), (k, slice(h, h + 1)), (v, slice(h, h + 1)))]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, dout[b : b + 1, heads])
        result["out"][b : b + 1, heads] = out.detach()
        for name, grad, idx in zip(("dq", "dk", "dv"), grads, (heads, slice(h, h + 1), slice(h, h + 1))):
            result[name][b : b + 1, idx] = grad
    return result


def _row(check: str, world: int, dtype_name: str, layout: str, comm: str, backend: str, **extra) -> dict[str, Any]:
    return {"check": check, "P": world, "dtype": dtype_name, "layout": layout, "comm": comm, "backend": backend,
            "tol": TOLERANCE[DTYPES[dtype_name]], **extra}


def _judge(row: dict[str, Any], errs: dict[str, float]) -> dict[str, Any]:
    row.update({f"{k}_err": e for k, e in errs.items()})
    row["worst"] = max(errs.values())
    row["result"] = "pass" if row["worst"] <= row["tol"] else "FAIL"  # NaN fails
    return row


def _ring(local, dout_local, layout: str, comm: str, backend: str, **kw) -> dict[str, torch.Tensor]:
    """Ring forward + backward of this rank's ``[B, S_local, H, D]`` shards; every rank gets the gathered results."""
    leaves = [x.detach().clone().requires_grad_() for x in local]
    out = ring_attention(*(x.transpose(1, 2) for x in leaves), layout=layout, comm=comm, backend=backend, **kw)
    out.backward(dout_local.transpose(1, 2))
    got = {"out": out.detach().transpose(1, 2), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}
    docs = kw.get("cu_seqlens")
    return {name: unshard_sequence(x.contiguous(), 1, layout=layout, cu_seqlens=docs) for name, x in got.items()}


# ------------------------------------------------------------------------------------------------ attention


def _attention_cases(rank: int, world: int, sizes: dict) -> list[dict[str, Any]]:
    """Every (dtype, layout, comm, kernel) on every rank; rank 0 returns the rows."""
    device = collective_device()
    b, (hq, hkv), d, n = sizes["batch"], sizes["heads"], sizes["head_dim"], sizes["tokens_per_rank"]
    s = n * world
    rows: list[dict[str, Any]] = []
    for seed, (dtype_name, dtype) in enumerate(DTYPES.items()):
        gen = torch.Generator(device=device).manual_seed(1000 + seed)
        # [B, S, H, D] memory, the same on every rank, rounded to the dtype under test.
        q, k, v, dout = (torch.randn(b, s, h, d, generator=gen, device=device).to(dtype) for h in (hq, hkv, hkv, hq))
        ref = None
        if rank == 0:
            ref = per_head_group_reference(lambda *x: reference_attention(*x, causal=True),
                                           *(x.transpose(1, 2) for x in (q, k, v, dout)))
            ref = {name: x.transpose(1, 2) for name, x in ref.items()}
        probe = torch.empty(1, hq, 8, d, device=device, dtype=dtype)
        for layout, comm, backend in itertools.product(LAYOUTS, COMMS, sizes["backends"]):
            row = _row("attention", world, dtype_name, layout, comm, backend, S=s)
            try:  # the same answer on every rank: decided before any communication
                row["kernel"] = select_backend(backend, probe, probe[:, :hkv]).name
            except ValueError as e:
                rows.append({**row, "result": f"skipped: {str(e).split(': ', 1)[-1].split('. Use')[0]}"})
                continue
            local = [shard_sequence(x, 1, layout=layout) for x in (q, k, v)]
            full = _ring(local, shard_sequence(dout, 1, layout=layout), layout, comm, backend, causal=True)
            if rank == 0:
                rows.append(_judge(row, {name: rel_error(full[name], ref[name]) for name in ref}))
        del ref
    rows += _document_cases(rank, world, sizes, device)
    return rows if rank == 0 else []


def _document_cases(rank: int, world: int, sizes: dict, device: torch.device) -> list[dict[str, Any]]:
    """Packed documents (with and without a window) on the auto kernels, bf16, every layout and comm."""
    b, (hq, hkv), d, n = sizes["batch"], sizes["heads"], sizes["head_dim"], sizes["tokens_per_rank"]
    lengths = [1, 3, 2 * world + 3, 5 * world, n * world // 2, n * world // 4, 7]
    dtype = torch.bfloat16
    rows = []
    for i, (layout, window) in enumerate(itertools.product(LAYOUTS, (None, sizes["window"]))):
        real, bounds, s = documents(layout, world, lengths)
        gen = torch.Generator(device=device).manual_seed(2000 + i)
        q, k, v, dout = (torch.randn(b, s, h, d, generator=gen, device=device).to(dtype) for h in (hq, hkv, hkv, hq))
        is_real = torch.zeros(s, dtype=torch.bool, device=device)
        for a, e in real:
            is_real[a:e] = True
        dout[:, ~is_real] = 0  # padding feeds no loss
        ref = None
        if rank == 0:
            ref = per_head_group_reference(lambda *x, real=real, window=window: documents_reference(*x, real, window),
                                           *(x.transpose(1, 2) for x in (q, k, v, dout)))
            ref = {name: x.transpose(1, 2) for name, x in ref.items()}
        local = [shard_sequence(x, 1, layout=layout, cu_seqlens=bounds) for x in (q, k, v, dout)]
        for comm in COMMS:
            full = _ring(local[:3], local[3], layout, comm, "auto", cu_seqlens=bounds, window=window)
            if rank == 0:
                row = _row("documents", world, "bfloat16", layout, comm, "auto", S=s, window=window, docs=len(real))
                full["out"], ref_out = full["out"][:, is_real], ref["out"][:, is_real]
                errs = {name: rel_error(full[name], ref_out if name == "out" else ref[name]) for name in full}
                rows.append(_judge(row, errs))
    return rows


# ------------------------------------------------------------------------------------------------ LoRA step


def _tiny_llama(attn: str, seq_len: int, device: torch.device, seed: int):
    """A 2-layer Llama with LoRA (random A and B) and gradient checkpointing; the same weights for any ``attn``."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_ringcp  # noqa: F401  (registers "ring")

    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=max(256, seq_len), tie_word_embeddings=False, use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation=attn, dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed + 1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, lora).to(device).train()


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _lora_case(rank: int, world: int, device: torch.device, layout: str, comm: str, seed: int,
               lr: float = 0.1) -> dict[str, Any] | None:
    """One SGD step of the ring model (plugin + DDP) on every rank; rank 0 compares with the single-device model."""
    from hf_ringcp import ContextParallelPlugin

    s = 32 * world
    probe = torch.empty(1, 4, 8, 16, device=device)  # the tiny model's heads: 4 q / 2 kv, d = 16
    row = _row("lora_step", world, "float32", layout, comm, "auto", S=s,
               kernel=select_backend("auto", probe, probe[:, :2]).name)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, s), generator=gen)
    labels = ids.clone()
    labels[0, : s // 5] = -100  # uneven targets per row: the token mean must still be exact
    labels[1, -3:] = -100
    ids, labels = ids.to(device), labels.to(device)

    plugin = ContextParallelPlugin(cp_size=world, layout=layout, comm=comm, backend="auto")
    model = _tiny_llama("ring", s, device, seed)
    plugin.build_mesh()  # (dp, cp) = (1, world): DDP over the default group averages over the CP ranks
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = plugin.shard({"input_ids": ids, "labels": labels})
    with plugin.context():
        loss = plugin.loss(ddp, batch)
        loss.backward()  # inside the context: checkpointing recomputes the ring attention here
    loss_value = plugin.loss_value(loss)
    grads = _lora_grads(model)
    optimizer.step()
    with plugin.context(), torch.no_grad():
        after = plugin.loss_value(plugin.loss(ddp, batch))
    if rank != 0:
        return None

    ref = _tiny_llama("sdpa", s, device, seed)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=lr)
    ref_loss = ref(input_ids=ids, labels=labels, use_cache=False).loss
    ref_loss.backward()
    ref_grads = _lora_grads(ref)
    ref_opt.step()
    with torch.no_grad():
        ref_after = ref(input_ids=ids, labels=labels, use_cache=False).loss.item()
    assert set(grads) == set(ref_grads), "the ring and the reference models train different parameters"
    errs = {"loss": abs(loss_value - ref_loss.item()) / abs(ref_loss.item()),
            "grad": max(rel_error(grads[n], ref_grads[n]) for n in grads),
            "loss_after": abs(after - ref_after) / abs(ref_after)}
    row["note"] = f"loss {loss_value:.5f} (ref {ref_loss.item():.5f}), after step {after:.5f} (ref {ref_after:.5f})"
    return _judge(row, errs)


def _lora_cases(rank: int, world: int) -> list[dict[str, Any]]:
    device = collective_device()
    rows = []
    for i, (layout, comm) in enumerate(itertools.product(LAYOUTS, COMMS)):
        row = _lora_case(rank, world, device, layout, comm, seed=3000 + i)
        dist.barrier()
        if row is not None:
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------ the tests


def _report(name: str, rows: list[dict[str, Any]]) -> None:
    out = os.environ.get("HF_RINGCP_PARITY_OUT")
    if not out:
        return
    from benchmarks.common import env_info, markdown_table, write_results

    info = env_info()
    info.update(world_size=WORLD, dist_backend="gloo" if ON_CPU else "nccl", sizes=SIZES)
    columns = ["check", "P", "S", "dtype", "layout", "comm", "backend", "kernel", "window", "out_err", "dq_err",
               "dk_err", "dv_err", "loss_err", "grad_err", "loss_after_err", "tol", "result", "note"]
    note = ("Max-norm relative errors (tests.ring.reference.rel_error) of the gathered results against float64 on "
            "rank 0 (attention, documents) or the 'sdpa' model on the full batch (lora_step).")
    write_results(f"nccl_parity_p{WORLD}_{name}", info, rows, f"{note}\n\n{markdown_table(rows, columns)}", out)


def _failures(rows: list[dict[str, Any]]) -> list[str]:
    return [f"{r['check']} {r['dtype']} {r['layout']} {r['comm']} {r['backend']}: "
            f"{ {k: v for k, v in r.items() if k.endswith('_err')} } > {r['tol']}" for r in rows
            if r.get("result") == "FAIL"]


def _run(fn, *args) -> list[dict[str, Any]]:
    return run_nccl_ranks(fn, WORLD, *args, backend="gloo" if ON_CPU else "nccl")[0]


def test_attention_parity_on_nccl_ranks() -> None:
    rows = _run(_attention_cases, SIZES)
    _report("attention", rows)
    checked = [r for r in rows if r.get("result") in ("pass", "FAIL")]
    assert checked and any(r["dtype"] == "float32" for r in checked) and any(r["check"] == "documents" for r in checked)
    failures = _failures(rows)
    assert not failures, "\n".join(failures)


def test_lora_step_parity_on_nccl_ranks() -> None:
    rows = _run(_lora_cases)
    _report("lora", rows)
    assert len(rows) == len(LAYOUTS) * len(COMMS)
    failures = _failures(rows)
    assert not failures, "\n".join(failures)
