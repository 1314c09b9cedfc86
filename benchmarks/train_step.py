"""One LoRA training step of a Llama-3.1-8B-shaped model on one GPU: hf_ringcp's path against stock Transformers.

The model is built from the Llama-3.1-8B config (hidden 4096, intermediate 14336, 32 layers, 32 / 8 heads, vocab
128,256, llama3 RoPE scaling) with random bf16 weights made directly on the GPU; nothing is downloaded. peft
LoRA r = 16 on all linear layers (peft's defaults otherwise: float32 adapters), non-reentrant gradient
checkpointing on every layer, AdamW on the LoRA parameters, batch 1, random tokens.

Variants (one model; the attention is switched with ``set_attn_implementation``, the LoRA weights and the
optimizer are reset before every point, so every variant starts from the same state):

- ``stock``: ``attn_implementation="sdpa"``, the model's own loss (``model(input_ids, labels=labels).loss``).
- ``ours``: ``"ring"`` inside ``hf_ringcp.context_parallel()`` at world size 1 (= torch SDPA's own dispatch),
  batch from ``shard_batch``, loss from ``causal_lm_loss`` (chunked, checkpointed cross-entropy).
- ``ours_cudnn``: as ``ours``, inside ``hf_ringcp.context_parallel(None, backend="cudnn", force_ring=True)``: the
  ring's own cuDNN block kernel at world size 1 (GQA-native), the documented way to run the ring on one device.
- ``ours_mem``: the faster of those two at 32K, plus ``hf_ringcp.integrations.memory``: the forward under
  ``offload_to_cpu()`` (checkpointed layer inputs in pinned host memory) and ``tile_mlp`` (the MLP over tiles of
  tokens; the results up to 2026-12-02 were taken with a checkpoint per tile, which ran each tile three times).
- ``ours_cudnn_bf16``: ``ours_cudnn`` with the LoRA weights in bf16 (peft ``autocast_adapter_dtype=False``), to
  show what peft's float32 adapters cost.

Per point: step time (CUDA events, median of the timed steps after one warm-up), tokens/s, MFU, peak memory
(``torch.cuda.max_memory_allocated``), memory after the forward, and the loss of the first step (equal across
variants at one length: a correctness check). An out-of-memory error is caught, memory freed, and the point
recorded as ``OOM``. Then, per variant, the longest length that trains is searched in multiples of 8K, within a
time budget (a probe is one step; probes predicted to overrun the budget are skipped and reported).

Packed rows (``--packed lognormal mixed``; issue 23's "one LoRA step of the 8B shape at 32K on a packed row against
the same step on one document: target within 5 %"). Every point ``VARIANT:S`` is then measured on the one-document
row (``one``, always: the baseline) and on one packed row of ``S`` tokens per distribution named, whose documents
have the lengths ``benchmarks.packing.document_lengths(name, S, seed=0)`` (scaled to ``S`` as that function does:
at 32K ``lognormal`` has a median of 512 tokens, ``mixed`` is one 16K document plus 256-1024-token ones). The tokens
are the same random ones as the one-document row's; :func:`row_batch` cuts them into the documents and feeds them the
way users feed packed rows, through Transformers' ``DataCollatorWithFlattening``: ``position_ids`` restarting at 0
per document and ``labels`` with -100 on every document's first token.

- ``stock`` gets ``model(input_ids, labels, position_ids, use_cache=False)``. Its loss shifts the labels over the
  whole row, and the -100 at each document's start drops the one target that would cross a boundary, so it counts
  the same targets as ``shard_batch``'s per-document shift. Its mask: ``masking_utils`` (the same code in
  transformers 5.17, the GPU image's, and 5.25) detects packing from ``position_ids`` that do not count up by one
  (``find_packed_sequence_indices``) only when ``attention_mask is None`` and there is no cache (hence
  ``use_cache=False``; with a cache the documents silently see each other), and ``sdpa_mask`` then materialises a
  bool ``[1, 1, S, S]`` block-diagonal causal mask (1 GiB at 32K, made once per forward). ``sdpa_attention_forward``
  passes it to ``F.scaled_dot_product_attention`` with ``is_causal=False`` and, because a mask is given, K/V
  repeated to every query head (no ``enable_gqa``): torch's flash kernel takes no mask, so the attention runs on a
  masked kernel over the whole ``S x S`` square, skipping nothing between documents (``sdpa_dispatch_packed`` in
  the attention probe records which kernel). No varlen path is open to stock here: the GPU image has no flash-attn
  (``attn_implementation="flash_attention_2"``).
- ``ours*`` get ``shard_batch`` of the same batch (world size 1, ``--layout``): labels shifted per document, the
  documents in the :class:`ShardInfo` the attention receives. A batch with documents makes the ``"ring"``
  attention run the ring's own kernels even without ``force_ring`` (SDPA cannot skip the other documents), so on a
  packed row ``ours`` runs what ``ours_cudnn`` runs (backend ``"auto"``, cuDNN first): documents longer than the
  plan's dense threshold as cuDNN calls, the short ones grouped into flash varlen calls
  (``hf_ringcp.ring.varlen``).
- ``--layout`` (default: the library's, ``zigzag``) picks the ``ours*`` layout. At world size 1 ``zigzag``,
  ``zigzag_global`` and ``balanced`` run the same attention (``balanced`` puts documents above 2048 tokens first), but
  padding: ``zigzag`` pads every odd-length document by one token (its divisor ``2P`` per document),
  ``zigzag_global``/``balanced`` only the row's end (the ``pad`` column). The ring itself (P > 1) is
  ``benchmarks/ring_sim.py --packed``'s.

The summary ``Packed rows against one document`` gives, per variant and ``S``, ``ratio`` = the packed row's step time
/ the same variant's one-document step time (the issue's target: <= 1.05) with the number of documents, and
``predicted_ratio``, the ratio of the ideal step times: a packed row does the same matmuls but less attention
(``sum(n^2)`` against ``S^2``), so a step that costs what the ideal says is faster packed, not slower; a ratio above
it is the price of the documents. The first-step losses must be equal across variants on the same row (same
tokens, same targets; ``loss_check`` in the JSON; the script exits 1 otherwise), and the self-check also compares
stock, ours and the ring's kernels on a tiny packed row of each distribution, losses and gradients.

MFU (causal-aware, recomputation not counted): ``tokens/s * (4 * N + 6 * L * h * S) / peak`` with ``N`` the
matmul parameters (all but the input embedding; the LM head counts), ``L * h`` = 32 * 4096 and the peak 989
TFLOP/s (H100 SXM dense bf16), also against the 731 TFLOP/s measured for a bf16 matmul
(``hf_ringcp.integrations.metrics.lora_train_flops_per_token``). The ideal step time counts the work actually
done, recomputation included: ``6 * N * S / 731 TFLOP/s`` (forward, recompute, input-gradient matmuls) plus
``L * 9 * Hq * S^2 * D / R(S)`` (causal attention forward 2, backward 5, recompute 2, in units of
``Hq * S^2 * D``) at the cuDNN rate ``R(S)`` measured on this H100 (FACTS.md, docs/performance.md). On a packed
row ``S^2`` becomes ``sum(n^2)`` over its documents' lengths in both (``attn_len = sum(n^2) / S``), still at
``R(S)``: the rate of short documents' varlen calls is not modelled.

Usage::

    PYTHONPATH=$PWD python benchmarks/train_step.py --out benchmarks/results          # GPU, ~8 minutes
    PYTHONPATH=$PWD python benchmarks/train_step.py --points ours:106496 --points-as-probes --search \
        --profile ours:32768                                                          # probes, a profile
    PYTHONPATH=$PWD python benchmarks/train_step.py --points ours:32768 ours_cudnn:32768 stock:32768 \
        --packed lognormal mixed --search --max-iters 2 --time-budget 420 --name train_step_packed  # ~8 min
    PYTHONPATH=$PWD python benchmarks/train_step.py --dry-run                         # CPU, tiny model
    PYTHONPATH=$PWD python benchmarks/train_step.py --dry-run --seqlens 256 --points stock:256 ours:256 \
        ours_cudnn:256 --packed lognormal mixed --search                              # CPU, packed rows

Set ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True``: the results in ``benchmarks/results`` were taken with it
(with it the stock 32K step fits in 71 GiB; an earlier stock run, setting not recorded, ran out of memory there).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import itertools
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

import hf_ringcp
from benchmarks.common import cuda_time_ms, env_info, markdown_table, write_results
from benchmarks.packing import DISTRIBUTIONS, document_lengths
from hf_ringcp.integrations.batch import SHARD_KEY
from hf_ringcp.integrations.kernels import liger_available
from hf_ringcp.integrations.memory import offload_to_cpu, tile_mlp
from hf_ringcp.integrations.metrics import lora_train_flops_per_token, peak_memory_gib
from hf_ringcp.ring import LAYOUTS

K = 1024
PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
MATMUL_TFLOPS = 731.0  # measured: bf16 8192^3 matmul on the lent H100 (FACTS.md)
# cuDNN SDPA causal fwd+bwd TFLOP/s on the H100 (FACTS.md; 128K from docs/performance.md), by sequence length.
CUDNN_TFLOPS = {8 * K: 527.0, 16 * K: 528.0, 32 * K: 561.0, 128 * K: 535.0}

FULL_CONFIG = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, use_cache=False, bos_token_id=128000, eos_token_id=128001,
)
TINY_CONFIG = dict(FULL_CONFIG, vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   rope_scaling=dict(FULL_CONFIG["rope_scaling"], original_max_position_embeddings=256),
                   bos_token_id=None, eos_token_id=None)


@dataclasses.dataclass(frozen=True)
class Variant:
    # "sdpa" (stock), "ring" (context_parallel() at world size 1: SDPA's dispatch), "ring_kernels" (force_ring=True:
    # the ring's own kernel) or "best" (the faster of "ring" and "ring_kernels" at the reference length)
    attn: str
    stock_loss: bool = False
    memory: bool = False  # offload_to_cpu + tile_mlp
    lora_bf16: bool = False
    prefetch: bool = True  # memory: offload_to_cpu(prefetch=...)
    liger: tuple[str, ...] = ()  # liger-kernel's fused kernels (hf_ringcp.integrations.kernels.KERNELS)
    compile: bool = False  # torch.compile of every decoder layer (the ring attention is a graph break)


_ALL_LIGER = ("rms_norm", "swiglu", "rope")
VARIANTS = {
    "stock": Variant("sdpa", stock_loss=True),
    "ours": Variant("ring"),
    "ours_cudnn": Variant("ring_kernels"),
    "ours_mem": Variant("best", memory=True),
    "ours_mem_no_prefetch": Variant("best", memory=True, prefetch=False),
    "ours_mem_bf16": Variant("best", memory=True, lora_bf16=True),
    "ours_cudnn_bf16": Variant("ring_kernels", lora_bf16=True),
    "ours_bf16": Variant("ring", lora_bf16=True),
    **{f"ours_bf16_liger_{k}": Variant("ring", lora_bf16=True, liger=(k,)) for k in _ALL_LIGER},
    "ours_bf16_liger": Variant("ring", lora_bf16=True, liger=_ALL_LIGER),
    "ours_bf16_compile": Variant("ring", lora_bf16=True, compile=True),
    "ours_fast": Variant("ring", lora_bf16=True, liger=_ALL_LIGER, compile=True),
}


def cudnn_rate(s: int) -> float:
    """cuDNN causal attention TFLOP/s at ``s`` tokens, interpolated in log2(s) between the measured lengths."""
    xs = sorted(CUDNN_TFLOPS)
    if s <= xs[0]:
        return CUDNN_TFLOPS[xs[0]]
    for lo, hi in itertools.pairwise(xs):
        if s <= hi:
            w = (math.log2(s) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            return CUDNN_TFLOPS[lo] + w * (CUDNN_TFLOPS[hi] - CUDNN_TFLOPS[lo])
    return CUDNN_TFLOPS[xs[-1]]


@contextlib.contextmanager
def _liger(model: torch.nn.Module, kinds: tuple[str, ...]):
    """liger-kernel's kernels on ``model`` for one variant, then Transformers' layers again."""
    from transformers.models.llama import modeling_llama

    from hf_ringcp.integrations.kernels import KERNELS, apply_liger_kernels

    names = ("forward", "extra_repr", "_get_name")
    rope = modeling_llama.apply_rotary_pos_emb
    before = {m: {k for k in names if k in m.__dict__} for m in model.modules()}
    apply_liger_kernels(model, **{k: k in kinds for k in KERNELS})
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = rope  # liger patches the module function
        for m, keys in before.items():
            for k in names:
                if k in m.__dict__ and k not in keys:
                    del m.__dict__[k]


@contextlib.contextmanager
def _compiled_layers(layers):
    """``torch.compile`` of every decoder layer in place (``nn.Module.compile``), undone afterwards."""
    import torch._dynamo

    # Should a layer's own attributes (layer_idx) be guarded on, each layer compiles once: let all of them.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers))
    for layer in layers:
        layer.compile()
    try:
        yield
    finally:
        for layer in layers:
            layer._compiled_call_impl = None


def row_batch(ids: torch.Tensor, dist: str) -> dict[str, torch.Tensor]:
    """The batch of the tokens ``ids`` ``[1, S]`` laid out as the row ``dist``.

    ``"one"``: one document, ``{"input_ids": ids, "labels": ids}``. Otherwise the documents of
    ``benchmarks.packing.document_lengths(dist, S, seed=0)`` cut from ``ids`` in order and put together by
    Transformers' ``DataCollatorWithFlattening`` (what users feed a packed row): ``input_ids``, ``labels`` (-100 on
    every document's first token, so the stock loss's shift never asks a document's last token for the next
    document's first) and ``position_ids`` restarting at 0 per document, all ``[1, S]`` int64 on the CPU.
    """
    if dist == "one":
        return {"input_ids": ids, "labels": ids}
    from transformers import DataCollatorWithFlattening

    docs = torch.split(ids[0].cpu(), document_lengths(dist, ids.shape[-1], seed=0))
    return dict(DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": d.tolist()} for d in docs]))


class FakeOOM:
    """Dry runs only: raise an out-of-memory error in the forward above a length per variant (tests the handling)."""

    def __init__(self, limits: dict[str, int]) -> None:
        self.limits, self.variant = limits, None

    def __call__(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[-1] > self.limits.get(self.variant, 1 << 62):
            raise torch.OutOfMemoryError(f"fake OOM: {self.variant} at {ids.shape[-1]} tokens (dry run)")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, LlamaConfig

        self.args = args
        self.device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
        self.cuda = self.device.type == "cuda"
        dtype = torch.bfloat16 if self.cuda else torch.float32
        # The ring's kernel for "ring_kernels" (force_ring): cuDNN on the GPU, the CPU kernel in a dry run.
        self.ring_backend = "cudnn" if self.cuda else "auto"
        self.config = LlamaConfig(**(TINY_CONFIG if args.dry_run else FULL_CONFIG))
        t0 = time.perf_counter()
        torch.manual_seed(0)
        with torch.device(self.device), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = AutoModelForCausalLM.from_config(copy.deepcopy(self.config), attn_implementation="ring",
                                                     dtype=dtype)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.n_total = sum(p.numel() for p in model.parameters())
        self.n_matmul = self.n_total - model.get_input_embeddings().weight.numel()
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        torch.manual_seed(1)
        self.model = get_peft_model(model, lora).train()  # autocast_adapter_dtype=True: float32 adapters
        self.inner = self.model.get_base_model()
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.n_lora = sum(p.numel() for _, p in self.trainable)
        self.lora_init = {n: p.detach().to("cpu", copy=True) for n, p in self.trainable}
        self.build_s = time.perf_counter() - t0
        self.capacity_gib = (torch.cuda.get_device_properties(0).total_memory / 2**30) if self.cuda else None
        self.fake_oom = None
        if args.dry_run:
            self.fake_oom = FakeOOM(dict(stock=384, ours=768, ours_cudnn=768, ours_cudnn_bf16=768, ours_bf16=768,
                                         ours_mem=1200))
            self.inner.get_decoder().register_forward_pre_hook(self.fake_oom, with_kwargs=True)
        self.rows: list[dict[str, Any]] = []
        self.best_attn: str | None = None
        self.t_start = time.perf_counter()
        self.log(f"model built in {self.build_s:.1f} s on {self.device}: {self.n_total / 1e9:.3f}B params "
                 f"({self.n_matmul / 1e9:.3f}B in matmuls), LoRA {self.n_lora / 1e6:.1f}M "
                 f"({self.trainable[0][1].dtype}); rope {self.config.rope_parameters}")

    # ------------------------------------------------------------------------------------------------ utils

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - getattr(self, 't_start', time.perf_counter()):7.1f}s] {msg}", flush=True)

    def left_s(self) -> float:
        return self.args.time_budget - (time.perf_counter() - self.t_start)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def mem_gib(self) -> tuple[float | None, float | None]:
        if not self.cuda:
            return None, None
        return torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30

    def free(self) -> None:
        for _, p in self.trainable:
            p.grad = None
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def attn_of(self, v: Variant) -> str:
        """``"sdpa"``, ``"ring"`` or ``"ring_kernels"`` (``"best"`` resolved)."""
        return (self.best_attn or "ring") if v.attn == "best" else v.attn

    def attn_label(self, attn: str, dist: str = "one") -> str:
        if attn == "ring" and dist != "one":  # a batch with documents runs the ring's kernels at world size 1
            return "ring (documents: ring kernels, auto)"
        return f"ring (force_ring, {self.ring_backend})" if attn == "ring_kernels" else attn

    def set_attn(self, attn: str) -> None:
        name = "sdpa" if attn == "sdpa" else "ring"
        if self.inner.config._attn_implementation != name:
            self.inner.set_attn_implementation(name)

    def layout_kw(self) -> dict[str, str]:
        """``layout=`` for ``shard_batch`` and ``context_parallel`` (nothing: the library's default)."""
        return {} if self.args.layout is None else {"layout": self.args.layout}

    def context(self, v: Variant):
        """The ``hf_ringcp.context_parallel`` around a step of ``v`` (world size 1; ``force_ring`` for the kernels)."""
        if self.attn_of(v) == "ring_kernels":
            return hf_ringcp.context_parallel(None, backend=self.ring_backend, force_ring=True, **self.layout_kw())
        return hf_ringcp.context_parallel(**self.layout_kw())

    def make_batch(self, s: int, dist: str, sharded: bool) -> tuple[dict[str, Any], list[int]]:
        """The batch of one point and its document lengths.

        The tokens are random and the same for every distribution at one length (seeded by ``s``), laid out by
        :func:`row_batch`; with ``sharded``, ``"sharded"`` holds ``shard_batch`` of it (world 1, ``--layout``).
        """
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, self.config.vocab_size, (1, s), generator=g)
        batch: dict[str, Any] = {k: x.to(self.device) for k, x in row_batch(ids, dist).items()}
        if sharded:
            batch["sharded"] = hf_ringcp.shard_batch(dict(batch), **self.layout_kw())
        return batch, document_lengths(dist, s, seed=0)

    def reset_lora(self, bf16: bool) -> torch.optim.Optimizer:
        dtype = torch.bfloat16 if bf16 else torch.float32
        with torch.no_grad():
            for n, p in self.trainable:
                p.data = self.lora_init[n].to(device=self.device, dtype=dtype, copy=True)
        return torch.optim.AdamW([p for _, p in self.trainable], lr=1e-5)

    # ---------------------------------------------------------------------------------------------- model

    def ideal_s(self, s: int, attn_len: float | None = None) -> float:
        """Ideal step time of ``s`` tokens; ``attn_len`` (default ``s``): ``sum(n^2) / s`` over the documents'
        lengths ``n``, the length one document would need for the same causal attention work (cuDNN rate at ``s``:
        the rate of short documents' varlen calls is not in the model)."""
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        attn_len = s if attn_len is None else attn_len
        matmul = 6 * self.n_matmul * s / (MATMUL_TFLOPS * 1e12)
        attn = c.num_hidden_layers * 9 * c.num_attention_heads * s * attn_len * head_dim / (cudnn_rate(s) * 1e12)
        return matmul + attn

    def predict_s(self, name: str, s: int, dist: str = "one") -> float:
        """Step time predicted from this variant's measured steps on ``dist`` (else on any row, else any
        variant's), else from the ideal."""
        measured = [r for r in self.rows if r.get("step_s")]
        rows = ([r for r in measured if r["variant"] == name and r.get("dist", "one") == dist]
                or [r for r in measured if r["variant"] == name] or measured)
        if not rows:
            return 2.0 * self.ideal_s(s)
        # time ~ ideal(s) * ratio, with the ratio of the nearest measured length
        r0 = min(rows, key=lambda r: abs(math.log2(r["seq_len"] / s)))
        return r0["step_s"] * self.ideal_s(s) / self.ideal_s(r0["seq_len"])

    # ----------------------------------------------------------------------------------------------- step

    def step(self, v: Variant, batch: dict[str, torch.Tensor], opt, first: bool, info: dict[str, Any]) -> float:
        model = self.model
        if v.stock_loss:
            # use_cache=False: with a cache, stock masking ignores packed position_ids (FACTS.md)
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                         use_cache=False).loss
            if first:
                self.sync()
                info["after_fwd_gib"], info["fwd_peak_gib"] = self.mem_gib()
            loss.backward()
        else:
            with self.context(v) as ring:
                if first:
                    info["layout"] = ring.layout
                ctx = offload_to_cpu(prefetch=v.prefetch) if v.memory else contextlib.nullcontext()
                with ctx as stats:
                    loss = hf_ringcp.causal_lm_loss(model, batch["sharded"], chunk_size=self.args.chunk_size)
                if first:
                    self.sync()
                    info["after_fwd_gib"], info["fwd_peak_gib"] = self.mem_gib()
                    if stats is not None:
                        info["offloaded_gib"] = stats.bytes / 2**30
                loss.backward()
                if first and stats is not None:
                    info["prefetched"] = f"{stats.prefetched}/{stats.tensors}"
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def setup(self, v: Variant) -> contextlib.ExitStack:
        """The variant's changes to the model (liger kernels, then MLP tiles over them, compiled layers)."""
        stack = contextlib.ExitStack()
        try:
            if v.liger:
                stack.enter_context(_liger(self.model, v.liger))
            if v.memory:
                stack.enter_context(tile_mlp(self.model, self.args.tile_tokens))
            if v.compile:
                stack.enter_context(_compiled_layers(self.inner.get_decoder().layers))
        except BaseException:
            stack.close()  # never leave one variant's changes on the model for the next
            raise
        return stack

    def measure(self, name: str, s: int, warmup: int | None = None, iters: int | None = None,
                probe: bool = False, dist: str = "one") -> dict[str, Any]:
        """Time ``name`` at ``s`` tokens on the row ``dist`` (``"one"`` document, or a packed row of
        :data:`benchmarks.packing.DISTRIBUTIONS`, see :meth:`make_batch`); record and return the row."""
        v = VARIANTS[name]
        attn = self.attn_of(v)
        lengths = document_lengths(dist, s, seed=0)
        row: dict[str, Any] = dict(label=f"{name}:{s}:{dist}", variant=name, attn=self.attn_label(attn, dist),
                                   seq_len=s, dist=dist, docs=len(lengths), probe=probe,
                                   lora_dtype="bf16" if v.lora_bf16 else "fp32", memory_savers=v.memory,
                                   liger=",".join(v.liger), compiled=v.compile)
        # sum(n^2) / s: one document of this length would cost the row's causal attention (MFU, ideal)
        attn_len = sum(n * n for n in lengths) / s
        if v.liger and not liger_available():
            row["status"] = "skipped (liger-kernel not installed, or no CUDA)"
            return self.record(row)
        smaller_oom = [r for r in self.rows if r["variant"] == name and r["status"] == "OOM" and r["seq_len"] < s
                       and r.get("dist", "one") == dist]
        if smaller_oom:
            row["status"] = f"OOM (not run: OOM at {smaller_oom[0]['seq_len'] // K}K)"
            return self.record(row)
        est = self.predict_s(name, s, dist)
        if warmup is None:
            warmup = 1
        if iters is None:
            iters = max(1, min(self.args.max_iters, int(self.args.point_seconds / max(est, 1e-3))))
        need = est * (warmup + iters) * 1.15 + 5
        if need > self.left_s():
            row["status"] = f"skipped (time: needs ~{need:.0f} s, {self.left_s():.0f} s left)"
            return self.record(row)
        self.log(f"{name} ({row['attn']}) S={s} {dist} ({len(lengths)} documents): warmup {warmup}, "
                 f"{iters} timed, predicted {est:.1f} s/step")
        self.set_attn(attn)
        if self.fake_oom is not None:
            self.fake_oom.variant = name
        batch, _ = self.make_batch(s, dist, sharded=not v.stock_loss)
        if "sharded" in batch:
            shard = batch["sharded"].get(SHARD_KEY)
            row["pad"] = 0 if shard is None else shard.added
        opt = self.reset_lora(v.lora_bf16)
        variant_setup = self.setup(v)
        self.free()
        times: list[float] = []
        oom = None
        try:
            for i in range(warmup + iters):
                self.sync()
                t0 = time.perf_counter()
                loss = self.step(v, batch, opt, first=i == 0, info=row)
                self.sync()
                times.append(time.perf_counter() - t0)
                if i == 0:
                    row["loss"] = float(loss)
                    row["first_step_s"] = times[0]
        except torch.OutOfMemoryError as e:  # `e` (and its traceback, holding the step's tensors) dies here
            oom = str(e).splitlines()[0][:200]
        finally:
            variant_setup.close()
        del opt, batch
        self.free_after(row)
        if oom is not None:
            row.update(status="OOM", oom_message=oom, steps_done=len(times))
            self.log(f"  OOM after {len(times)} steps: {oom[:120]}")
            return self.record(row)
        timed = times[warmup:] or times
        step_s = statistics.median(timed)
        c = self.config
        # attention FLOPs of the row's documents (attn_len = s for one document); padding is not counted
        flops_tok = lora_train_flops_per_token(self.n_matmul, c.num_hidden_layers, c.hidden_size, attn_len)
        tok_s = s / step_s
        ideal = self.ideal_s(s, attn_len)
        row.update(
            status="ok", step_s=step_s, steps_s=timed, tokens_per_s=tok_s, attn_len=round(attn_len, 1),
            mfu_989=tok_s * flops_tok / (PEAK_TFLOPS * 1e12), mfu_731=tok_s * flops_tok / (MATMUL_TFLOPS * 1e12),
            ideal_s=ideal, pct_of_ideal=ideal / step_s,
        )
        self.log(f"  {step_s:.2f} s/step, {tok_s:,.0f} tok/s, MFU {row['mfu_989']:.1%}, "
                 f"{row['pct_of_ideal']:.1%} of ideal, peak {row.get('peak_gib')} GiB, loss {row['loss']:.4f}")
        return self.record(row)

    def free_after(self, row: dict[str, Any]) -> None:
        if self.cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        else:
            row["peak_gib"] = round(peak_memory_gib(self.device), 3)
        self.free()

    def record(self, row: dict[str, Any]) -> dict[str, Any]:
        for key in ("after_fwd_gib", "fwd_peak_gib", "offloaded_gib"):
            if isinstance(row.get(key), float):
                row[key] = round(row[key], 2)
        self.rows.append(row)
        if self.args.out:
            Path(self.args.out).mkdir(parents=True, exist_ok=True)
            (Path(self.args.out) / "train_step_partial.json").write_text(json.dumps(self.rows, indent=1, default=str))
        return row

    # --------------------------------------------------------------------------------------------- search

    def status_of(self, name: str) -> tuple[int | None, int | None]:
        """Longest length that trained and shortest that ran out of memory, on one document (the search's rows)."""
        rows = [r for r in self.rows if r["variant"] == name and r.get("dist", "one") == "one"]
        ok = [r["seq_len"] for r in rows if r["status"] == "ok"]
        bad = [r["seq_len"] for r in rows if r["status"] == "OOM"]
        return (max(ok) if ok else None), (min(bad) if bad else None)

    def memory_ceiling(self, name: str) -> int | None:
        """Longest length predicted by a straight line through this variant's peak memory (GPU only)."""
        pts = sorted({r["seq_len"]: r["peak_gib"] for r in self.rows if r["variant"] == name and r["status"] == "ok"
                      and r.get("peak_gib") and r.get("dist", "one") == "one"}.items())
        if not self.cuda or len(pts) < 2:
            return None
        (s0, m0), (s1, m1) = pts[-2], pts[-1]
        slope = (m1 - m0) / (s1 - s0)
        if slope <= 0:
            return None
        return int(s1 + (self.capacity_gib * self.args.usable_fraction - m1) / slope)

    def search(self, name: str) -> dict[str, Any]:
        """Longest length that trains, in multiples of ``search_step`` above the last success, within the budget."""
        step = self.args.search_step
        ok, bad = self.status_of(name)
        result: dict[str, Any] = dict(variant=name, predicted_ceiling=self.memory_ceiling(name))
        if ok is None:
            result["note"] = "no length trained"
            return result
        while True:
            ok, bad = self.status_of(name)
            if bad is not None and bad - ok <= step:
                break
            if bad is None:
                ceiling = result["predicted_ceiling"]
                nxt = ok + step if ceiling is None else max(ok + step, ceiling // step * step)
            else:
                nxt = max(ok + step, (ok + bad) // 2 // step * step)
            if self.predict_s(name, nxt) * 1.15 + 5 > self.left_s():
                result["note"] = f"stopped by the time budget before probing {nxt // K}K"
                break
            self.measure(name, nxt, warmup=0, iters=1, probe=True)
        ok, bad = self.status_of(name)
        result.update(longest_ok=ok, first_oom=bad)
        self.log(f"search {name}: longest trained {ok}, first OOM {bad}, memory-fit ceiling "
                 f"{result['predicted_ceiling']} ({result.get('note', '')})")
        return result

    # ------------------------------------------------------------------------------------------ loss curve

    def loss_curve(self, steps: int, s: int, lr: float, fixed: bool) -> dict[str, Any]:
        """``steps`` optimizer steps of float32 and of bf16 adapters from the same start, on the same batches.

        Each batch is a random half-sequence followed by its copy: a fresh one per step (learnable only as
        copying, which a random-weight model does not pick up in 50 steps), or with ``fixed`` the same one every
        step (memorisation: the loss falls, so the adapters' precision can show); compared step by step.
        """
        curves: dict[str, list[float]] = {}
        t0 = time.perf_counter()
        for name in ("ours", "ours_bf16"):
            v = VARIANTS[name]
            self.set_attn(self.attn_of(v))
            opt = self.reset_lora(v.lora_bf16)
            for group in opt.param_groups:
                group["lr"] = lr
            losses = []
            for i in range(steps):
                g = torch.Generator().manual_seed(0 if fixed else i)
                half = torch.randint(0, self.config.vocab_size, (1, s // 2), generator=g)
                ids = torch.cat([half, half], dim=1).to(self.device)
                batch = {"sharded": hf_ringcp.shard_batch({"input_ids": ids, "labels": ids}, **self.layout_kw())}
                losses.append(float(self.step(v, batch, opt, first=False, info={})))
            curves[name] = losses
            del opt
            self.free()
        fp32, bf16 = curves["ours"], curves["ours_bf16"]
        tail = max(1, steps // 5)
        result = dict(
            steps=steps, seq_len=s, lr=lr, fixed_batch=fixed, curves=curves, seconds=round(time.perf_counter() - t0, 1),
            first_loss=fp32[0], final_fp32=statistics.mean(fp32[-tail:]), final_bf16=statistics.mean(bf16[-tail:]),
            max_abs_diff=max(abs(a - b) for a, b in zip(fp32, bf16)),
        )
        result["final_rel_diff"] = (result["final_bf16"] - result["final_fp32"]) / result["final_fp32"]
        self.log(f"loss curve ({steps} steps, S={s}, lr {lr}): fp32 {fp32[0]:.4f} -> {result['final_fp32']:.4f}, "
                 f"bf16 -> {result['final_bf16']:.4f} (mean of the last {tail}; rel diff "
                 f"{result['final_rel_diff']:+.2%}), max |diff| {result['max_abs_diff']:.4f}")
        return result

    # --------------------------------------------------------------------------------------------- profile

    def profile(self, name: str, s: int, dist: str = "one") -> dict[str, Any]:
        """One warm-up step, then one step under torch.profiler: device time by kernel category, top kernels."""
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        v = VARIANTS[name]
        self.set_attn(self.attn_of(v))
        batch, _ = self.make_batch(s, dist, sharded=not v.stock_loss)
        opt = self.reset_lora(v.lora_bf16)
        variant_setup = self.setup(v)
        info: dict[str, Any] = {}
        try:
            self.step(v, batch, opt, first=False, info=info)
            self.sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            t0 = time.perf_counter()
            with torch_profile(activities=activities) as prof:
                self.step(v, batch, opt, first=False, info=info)
                self.sync()
            wall = time.perf_counter() - t0
        finally:
            variant_setup.close()
        del opt, batch
        self.free()
        averages = prof.key_averages()
        kernels = [e for e in averages if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
        categories = {"attention": ("cudnn", "fmha", "flash", "attention"),
                      "matmul": ("gemm", "nvjet", "xmma", "cutlass", "gemv", "splitk"),
                      "elementwise": ("elementwise", "vectorized", "unrolled"), "reduction": ("reduce",),
                      "copy": ("memcpy", "memset", "copy", "cat")}
        by_cat: dict[str, float] = {}
        for e in kernels:
            key = e.key.lower()
            cat = next((c for c, words in categories.items() if any(w in key for w in words)), "other")
            by_cat[cat] = by_cat.get(cat, 0.0) + e.self_device_time_total / 1e6
        total = sum(by_cat.values())
        top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:25]
        result = dict(variant=name, seq_len=s, dist=dist, profiled_step_wall_s=round(wall, 3), kernel_s=round(total, 3),
                      by_category_s={k: round(x, 3) for k, x in sorted(by_cat.items(), key=lambda kv: -kv[1])},
                      top_kernels=[(e.key[:120], e.count, round(e.self_device_time_total / 1e6, 4)) for e in top])
        self.log(f"profile {name} S={s} {dist}: step {wall:.2f} s (profiled), kernels {total:.2f} s: "
                 f"{result['by_category_s']}")
        for k, n, t in result["top_kernels"]:
            print(f"  {t:8.4f} s  x{n:<6d} {k}")
        ops = [e for e in averages if e.device_type == DeviceType.CPU and e.self_device_time_total > 0]
        ops = sorted(ops, key=lambda e: -e.self_device_time_total)[:25]
        result["top_ops"] = [(e.key[:80], e.count, round(e.self_device_time_total / 1e6, 4)) for e in ops]
        for k, n, t in result["top_ops"]:
            print(f"  op {t:8.4f} s  x{n:<6d} {k}")
        return result

    # ------------------------------------------------------------------------------------------ self-check

    def attention_probe(self, s: int, packed: bool = False) -> dict[str, Any]:
        """Which kernel torch's SDPA dispatch picks for the model's attention, and fwd+bwd times against cuDNN;
        with ``packed``, also the kernel it picks for stock's packed rows (``sdpa_dispatch_packed``: a bool
        ``[1, 1, S, S]`` mask and K/V repeated to every query head, as Transformers' sdpa passes them)."""
        from torch.nn.attention import SDPBackend

        c = self.config
        d = c.hidden_size // c.num_attention_heads
        g = torch.Generator(device=self.device).manual_seed(0)
        dtype = torch.bfloat16 if self.cuda else torch.float32

        def rnd(h):
            return torch.randn(1, h, s, d, device=self.device, dtype=dtype, generator=g).requires_grad_()

        q, k, v = rnd(c.num_attention_heads), rnd(c.num_key_value_heads), rnd(c.num_key_value_heads)
        out: dict[str, Any] = {"seq_len": s}
        try:
            choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, enable_gqa=True)
            out["sdpa_dispatch"] = SDPBackend(choice).name
        except Exception as e:  # an internal op: report, do not fail the benchmark
            out["sdpa_dispatch"] = f"unknown ({type(e).__name__})"
        if packed:
            mask = torch.ones(1, 1, s, s, dtype=torch.bool, device=self.device).tril_()
            rep = c.num_attention_heads // c.num_key_value_heads
            try:
                choice = torch._fused_sdp_choice(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), mask,
                                                 0.0, False)
                out["sdpa_dispatch_packed"] = SDPBackend(choice).name
            except Exception as e:
                out["sdpa_dispatch_packed"] = f"unknown ({type(e).__name__})"
            del mask
        flops = 7 * c.num_attention_heads * s * s * d

        def run_sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()

        def run_ring():
            hf_ringcp.ring_attention(q, k, v, None, causal=True, layout="contiguous",
                                     backend="cudnn" if self.cuda else "auto").sum().backward()

        for label, fn in (("sdpa", run_sdpa), ("ring_world1", run_ring)):
            ms, _ = cuda_time_ms(fn, warmup=1, iters=3)
            out[f"{label}_ms"] = round(ms, 2)
            out[f"{label}_tflops"] = round(flops / ms / 1e9, 1)
        self.log(f"attention at S={s}: {out}")
        return out

    def self_check(self, packed: tuple[str, ...] = ()) -> dict[str, Any]:
        """On the benchmark's device, with a tiny float32 model: stock loss == ours == the ring's own kernels
        (``force_ring``, backend ``"auto"``: float32 rules cuDNN out), memory savers change nothing; and, for
        each distribution of ``packed``, stock == ours == the ring's kernels (losses and gradients) on a packed
        row of 256 tokens fed as :meth:`make_batch` feeds it (stock with ``position_ids``, ours sharded with
        ``--layout``)."""
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, LlamaConfig

        def tiny():
            torch.manual_seed(0)
            with torch.device(self.device), warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                m = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_CONFIG), attn_implementation="ring",
                                                     dtype=torch.float32)
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            torch.manual_seed(1)
            lora = LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
            return get_peft_model(m, lora).train()

        ids = torch.randint(0, TINY_CONFIG["vocab_size"], (1, 256), generator=torch.Generator().manual_seed(0))
        ids = ids.to(self.device)

        def run(kind: str, batch: dict[str, torch.Tensor] | None = None):
            batch = batch or {"input_ids": ids, "labels": ids}
            m = tiny()
            if kind == "stock":
                m.get_base_model().set_attn_implementation("sdpa")
                loss = m(**batch, use_cache=False).loss
                loss.backward()
            else:
                tiles = tile_mlp(m, 48) if kind == "mem" else None
                forced = dict(backend="auto", force_ring=True) if kind == "kernels" else {}
                with hf_ringcp.context_parallel(None, **forced, **self.layout_kw()):
                    ctx = offload_to_cpu(min_bytes=0) if kind == "mem" else contextlib.nullcontext()
                    with ctx:
                        loss = hf_ringcp.causal_lm_loss(m, hf_ringcp.shard_batch(batch, **self.layout_kw()),
                                                        chunk_size=100)
                    loss.backward()
                if tiles is not None:
                    tiles.remove()
            return loss.detach(), [p.grad.detach().clone() for p in m.parameters() if p.requires_grad]

        def rel(a, b):
            return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1e-30)).item()

        (l0, g0), (l1, g1), (_, g2), (l3, g3) = run("stock"), run("ours"), run("mem"), run("kernels")
        result = dict(loss_ours_vs_stock=rel(l1, l0), grad_ours_vs_stock=max(map(rel, g1, g0)),
                      grad_mem_vs_ours=max(map(rel, g2, g1)), loss_kernels_vs_stock=rel(l3, l0),
                      grad_kernels_vs_stock=max(map(rel, g3, g0)))
        for dist in packed:
            batch = {k: x.to(self.device) for k, x in row_batch(ids.cpu(), dist).items()}
            (l0, g0), (l1, g1), (l3, g3) = run("stock", batch), run("ours", batch), run("kernels", batch)
            result.update({f"{dist}_loss_ours_vs_stock": rel(l1, l0),
                           f"{dist}_grad_ours_vs_stock": max(map(rel, g1, g0)),
                           f"{dist}_loss_kernels_vs_stock": rel(l3, l0),
                           f"{dist}_grad_kernels_vs_stock": max(map(rel, g3, g0))})
        result["passed"] = all(x <= 1e-4 for x in result.values())
        self.log(f"self-check: {result}")
        if not result["passed"]:
            raise SystemExit(f"self-check failed: {result}")
        return result


def plan(seqlens: list[int]) -> list[tuple[str, int]]:
    """The points in order of importance (the time budget cuts from the end)."""
    ls = sorted(seqlens)
    small, mid, big = ls[:2], ls[2:-1], ls[-1:]
    points = [("stock", s) for s in small]
    points += [("ours", s) for s in small] + [("ours_cudnn", s) for s in small]
    points += [("ours", s) for s in mid]
    points += [("ours_mem", s) for s in mid] + [("ours_mem", s) for s in big]
    points += [("ours", s) for s in big]
    points += [("ours_cudnn_bf16", s) for s in small[-1:]]
    return points


COLUMNS = ["variant", "attn", "layout", "seq_len", "dist", "docs", "status", "step_s", "first_step_s", "tokens_per_s",
           "mfu_989", "mfu_731", "pct_of_ideal", "peak_gib", "after_fwd_gib", "offloaded_gib", "prefetched", "loss"]


PACKED_COLUMNS = ["variant", "seq_len", "dist", "docs", "pad", "layout", "step_s", "one_step_s", "ratio",
                  "predicted_ratio", "loss"]


def packed_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per measured packed row (not a probe): its step time as a ratio of the same variant's step on one document
    of the same length (``ratio``; the issue's target is <= 1.05), and the ratio of the ideal step times
    (``predicted_ratio``: the row's attention work ``sum(n^2)`` against ``S^2``, same matmuls)."""
    timed = [r for r in rows if r.get("status") == "ok" and not r.get("probe")]
    one = {(r["variant"], r["seq_len"]): r for r in timed if r.get("dist", "one") == "one"}
    out = []
    for r in timed:
        base = one.get((r["variant"], r["seq_len"]))
        if r.get("dist", "one") == "one" or base is None:
            continue
        out.append(dict({k: r.get(k) for k in PACKED_COLUMNS if k in r}, one_step_s=base["step_s"],
                        ratio=r["step_s"] / base["step_s"], predicted_ratio=r["ideal_s"] / base["ideal_s"]))
    return out


def loss_check(rows: list[dict[str, Any]], rel_tol: float) -> dict[str, Any]:
    """First-step losses of the variants on the same row (``S`` and distribution: the same tokens and targets):
    equal within ``rel_tol`` of the loss, else the variants do not train on the same thing."""
    groups: dict[str, dict[str, float]] = {}
    for r in rows:
        if r.get("loss") is not None:
            groups.setdefault(f"{r['seq_len']}:{r.get('dist', 'one')}", {})[r["variant"]] = r["loss"]
    spread = {k: (max(v.values()) - min(v.values())) / abs(statistics.mean(v.values())) for k, v in groups.items()}
    return dict(rel_tol=rel_tol, losses=groups, rel_spread=spread,
                passed=all(x <= rel_tol for x in spread.values()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny config, short lengths, on CPU: checks the logic")
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help="default 16K 32K 64K 128K (dry: 256..1024)")
    p.add_argument("--points", nargs="*", default=None, help="explicit VARIANT:S points instead of the plan")
    p.add_argument("--points-as-probes", action="store_true", help="--points run as one step without warm-up")
    p.add_argument("--name", default="train_step", help="results file stem")
    p.add_argument("--search", nargs="*", default=None,
                   help="variants to search the longest length for (default: stock ours_mem ours)")
    p.add_argument("--search-step", type=int, default=None, help="default 8192 (dry: 128)")
    p.add_argument("--time-budget", type=float, default=540.0, help="seconds for the whole run (points + search)")
    p.add_argument("--point-seconds", type=float, default=30.0, help="timed steps per point ~ this / step time")
    p.add_argument("--max-iters", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=4096, help="tokens per loss chunk (causal_lm_loss)")
    p.add_argument("--tile-tokens", type=int, default=8192, help="tokens per MLP tile (ours_mem)")
    p.add_argument("--usable-fraction", type=float, default=0.97, help="of device memory, for the memory-fit ceiling")
    p.add_argument("--best-attn-at", type=int, default=32 * K, help="length at which ours_mem picks its attention")
    p.add_argument("--no-self-check", action="store_true")
    p.add_argument("--no-attention-probe", action="store_true")
    p.add_argument("--profile", nargs="*", default=[],
                   help="VARIANT:S[:DIST] points to profile (one step each, at the end)")
    p.add_argument("--packed", nargs="+", default=None, choices=DISTRIBUTIONS, metavar="DIST",
                   help=f"also measure every point on a packed row of these distributions ({', '.join(DISTRIBUTIONS)};"
                        " 'one' is the one-document row, always measured: the ratio's baseline)")
    p.add_argument("--layout", default=None, choices=LAYOUTS,
                   help="layout of the ours* variants' shard_batch and context_parallel (default: the library's)")
    p.add_argument("--loss-curve", default=None, metavar="STEPS:S",
                   help="float32 against bf16 adapters over STEPS steps at S tokens (before the points)")
    p.add_argument("--loss-curve-lr", type=float, default=2e-4)
    p.add_argument("--loss-curve-fixed", action="store_true", help="the same batch every step (memorisation)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; dry run: none)")
    args = p.parse_args(argv)
    dists = ("one", *dict.fromkeys(d for d in (args.packed or ()) if d != "one"))
    if args.dry_run:
        args.seqlens = args.seqlens or [256, 512, 1024]
        args.search_step = args.search_step or 128
        args.best_attn_at = 512
    args.seqlens = args.seqlens or [16 * K, 32 * K, 64 * K, 128 * K]
    args.search_step = args.search_step or 8 * K
    if args.search is None:
        args.search = ["stock", "ours_mem", "ours"]
    unknown = [n for n in args.search if n not in VARIANTS]
    if unknown:
        p.error(f"--search: unknown variants {unknown}; valid: {sorted(VARIANTS)}")

    bench = Bench(args)
    info = env_info()
    import peft
    import transformers

    info.update(transformers=transformers.__version__, peft=peft.__version__, hf_ringcp=hf_ringcp.__version__)
    if bench.cuda:
        import os

        info["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")
    extra: dict[str, Any] = dict(build_s=round(bench.build_s, 1), n_params=bench.n_total, n_matmul=bench.n_matmul,
                                 n_lora=bench.n_lora, chunk_size=args.chunk_size, tile_tokens=args.tile_tokens)
    try:
        if not args.no_self_check:
            extra["self_check"] = bench.self_check(dists[1:])
        if not args.no_attention_probe:
            extra["attention"] = [bench.attention_probe(min(args.best_attn_at, max(args.seqlens)), len(dists) > 1)]
        if args.loss_curve:
            steps, s = (int(x) for x in args.loss_curve.split(":"))
            extra["loss_curve"] = bench.loss_curve(steps, s, args.loss_curve_lr, args.loss_curve_fixed)
        points = plan(args.seqlens)
        probes = set()
        if args.points:  # VARIANT:S, or VARIANT:S:probe for one step without warm-up
            points = [(x.split(":")[0], int(x.split(":")[1])) for x in args.points]
            probes = {i for i, x in enumerate(args.points) if x.endswith(":probe") or args.points_as_probes}
        for i, (name, s) in enumerate(points):
            for dist in dists:  # one point's rows together: the time budget cuts whole points first
                if i in probes:
                    bench.measure(name, s, warmup=0, iters=1, probe=True, dist=dist)
                    continue
                if name == "ours_mem" and bench.best_attn is None:
                    ref = {r["variant"]: r.get("step_s") for r in bench.rows
                           if r["seq_len"] == args.best_attn_at and r["dist"] == "one"}
                    if ref.get("ours") and ref.get("ours_cudnn"):
                        bench.best_attn = "ring_kernels" if ref["ours_cudnn"] < ref["ours"] else "ring"
                        bench.log(f"ours_mem uses {bench.attn_label(bench.best_attn)} (faster at {args.best_attn_at})")
                bench.measure(name, s, dist=dist)
        extra["search"] = [bench.search(name) for name in args.search]
        extra["profile"] = [bench.profile(x.split(":")[0], int(x.split(":")[1]), *x.split(":")[2:3])
                            for x in args.profile]
    except Exception:  # keep what was measured
        extra["error"] = traceback.format_exc()
        print(extra["error"], file=sys.stderr, flush=True)

    rows = bench.rows
    table = markdown_table(rows, COLUMNS)
    extra["layout"] = args.layout or "library default"
    extra["packed"] = packed_summary(rows)
    # float32 on the CPU: equal to rounding (attending across documents moves the tiny model's loss by 1e-4..3e-3);
    # bf16 on the GPU: kernels round differently (one document, H100/H200: stock = ours to 1e-7, liger 5e-5)
    extra["loss_check"] = loss_check(rows, 1e-4 if not bench.cuda else 2e-4)
    packed_table = markdown_table(extra["packed"], PACKED_COLUMNS)
    if not extra["loss_check"]["passed"]:
        print(f"LOSS CHECK FAILED: first-step losses differ between variants on one row: "
              f"{extra['loss_check']}", file=sys.stderr)
    longest = [{k: r.get(k) for k in ("variant", "longest_ok", "first_oom", "predicted_ceiling", "note")}
               for r in extra.get("search", [])]
    md = "\n\n".join([
        f"Llama-3.1-8B shape, LoRA r=16 all-linear (float32 adapters unless `lora_dtype` says bf16), non-reentrant "
        f"checkpointing, AdamW, batch 1. MFU = tokens/s * (4N + 6*L*h*S) / peak, N = {bench.n_matmul / 1e9:.3f}B "
        f"matmul parameters; `mfu_989` against 989 TFLOP/s, `mfu_731` against the measured 731 TFLOP/s matmul; "
        f"`pct_of_ideal` = (6*N*S/731 TFLOP/s + L*9*Hq*S^2*D/cuDNN rate) / step time. Memory in GiB "
        f"(max_memory_allocated). Probes (search) are single steps without warm-up.",
        table,
        "Packed rows against one document (the same variant, tokens and length; `ratio` = packed step time / "
        "one-document step time, target <= 1.05; `predicted_ratio` = the ratio of the ideal step times, attention "
        "work sum(n^2) against S^2; `pad`: tokens shard_batch added for the layout):\n\n" + packed_table,
        "Longest sequence that trains:\n\n" + markdown_table(longest, ["variant", "longest_ok", "first_oom",
                                                                         "predicted_ceiling", "note"]),
        "```json\n" + json.dumps(extra, indent=1, default=str) + "\n```",
    ])
    print(table)
    if extra["packed"]:
        print(packed_table)
    print(markdown_table(longest, ["variant", "longest_ok", "first_oom", "predicted_ceiling", "note"]))
    out_dir = args.out if args.out else (None if args.dry_run else "benchmarks/results")
    if out_dir:
        path = write_results(args.name, info, rows, md, out_dir=out_dir)
        json_path = path.with_suffix(".json")  # common.write_results writes env and rows; add the rest
        data = json.loads(json_path.read_text())
        data["extra"] = extra
        json_path.write_text(json.dumps(data, indent=1, default=str))
        print(f"wrote {path} and {json_path.name}")
    return 1 if "error" in extra or not extra["loss_check"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
