#!/usr/bin/env bash
# Issue 6 in one call on one 8-GPU machine, everything written to benchmarks/results/multigpu_<date>/:
#   parity    tests/gpu/test_nccl_parity.py (pytest) on 2, 4 and 8 GPUs (NCCL, HF_RINGCP_GPU_WORLD=N): ring
#             attention fwd+bwd (plain and packed documents) and a LoRA step against one device; a failed check
#             fails the stage; the rows land in nccl_parity_p<N>_{attention,lora}_*.json
#   scaling   benchmarks/cp_scaling.py at P = 1, 2, 4, 8 with 16K tokens per GPU: hf_ringcp against torch's
#             experimental context parallel, TFLOP/s per GPU, weak-scaling efficiency, exposed communication
#   lora128k  recipes/train_lora.py, Llama-3.1-8B shape (random weights, a config written here: nothing is
#             downloaded), LoRA, 128K tokens, CP = 8: tokens/s/GPU, MFU, peak memory from its results.json
#   lora1m    the same at 1M tokens (128K per GPU), RoPE extended by config_overrides
#
#   bash benchmarks/multigpu.sh                                   # all stages (GPU machine)
#   HF_RINGCP_STAGES="parity scaling" bash benchmarks/multigpu.sh  # a subset, e.g. one stage per 10-minute call
#   HF_RINGCP_MULTIGPU_SMOKE=1 bash benchmarks/multigpu.sh         # CPU smoke: tiny sizes, gloo, 2 processes
#                                                                  # (parity: HF_RINGCP_PARITY_DEVICE=cpu)
#
# Estimated GPU time (8 x H200): parity + scaling ~4 min (timed with the old nccl_parity.py; the pytest parity
# also checks all four layouts and packed documents and is not timed on 8 GPUs yet), lora128k ~3-5 min (10 steps), lora1m ~7-9 min (1 step
# of ~5 min plus model set-up and a 1M-token evaluation forward). Under a 10-minute limit per command, run
# "parity scaling", "lora128k" and "lora1m" as three calls (the summary is rebuilt from all results each time).
#
# Environment (all optional):
#   PYTHON                    interpreter (default .venv/bin/python if present, else python3)
#   HF_RINGCP_RESULTS         results folder (default benchmarks/results/multigpu_<UTC date>; smoke:
#                             outputs/multigpu_smoke, which git ignores)
#   HF_RINGCP_GPUS            GPUs to use (default: all visible); parity/scaling sizes above it are skipped
#   HF_RINGCP_LORA_STEPS      training steps of lora128k (default 10); HF_RINGCP_LORA_1M_STEPS (default 1)
#   HF_RINGCP_LORA_ARGS       extra `--key value` recipe overrides for both LoRA stages
#   HF_RINGCP_ARCHIVE         also pack the results folder into this .tar.gz (e.g. $OUT/multigpu.tgz)
# HF_RINGCP_STAGES=summary runs no stage and rebuilds the summary from the results folder (e.g. after unpacking
# the archives of several calls into one folder).
# The LoRA stages need the `datasets` package; where it is missing, wheels in .whl/ are installed to /tmp first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
case "${HF_RINGCP_MULTIGPU_SMOKE:-0}" in 0 | false | no | off | "") SMOKE=0 ;; *) SMOKE=1 ;; esac
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
STAGES=${HF_RINGCP_STAGES:-parity scaling lora128k lora1m}
DATE=$(date -u +%Y-%m-%d)
if [ "$SMOKE" = 1 ]; then DEFAULT_RES=outputs/multigpu_smoke; else DEFAULT_RES=benchmarks/results/multigpu_$DATE; fi
RES=${HF_RINGCP_RESULTS:-$DEFAULT_RES}
mkdir -p "$RES" outputs
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# Keep NVLink multicast off (the lending machines require it; unchanged where already set).
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0} TORCH_SYMM_MEM_DISABLE_MULTICAST=${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}
export NVSHMEM_DISABLE_NVLS=${NVSHMEM_DISABLE_NVLS:-1}

log() { echo "[multigpu $(date -u +%H:%M:%S)] $*"; }
FAILED=()
# run_stage NAME LOGFILE CMD...: run, tee the output to LOGFILE, remember a failure and go on.
run_stage() {
  local name=$1 logfile=$2; shift 2
  log "$name: $*"
  "$@" 2>&1 | tee "$logfile"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then FAILED+=("$name (exit $rc)"); log "$name FAILED (exit $rc), log: $logfile"; fi
  return 0
}
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
want() { [[ " $STAGES " == *" $1 "* ]]; }

# ------------------------------------------------------------------------------------------------ preflight
if [ "$SMOKE" = 1 ]; then
  export OMP_NUM_THREADS=1
  GPUS=2
  DEVICE_ARGS=(--device cpu)
  PARITY_SIZES=(2); SCALING_SIZES=(1 2)
  export HF_RINGCP_PARITY_DEVICE=cpu  # the parity test's gloo smoke mode (tiny sizes, CPU kernels)
  SCALING_ARGS=(--tokens-per-rank 64 --heads 4 2 --head-dim 16 --dtype float32 --warmup 1 --iters 3)
  ACCEL_CONFIG=recipes/accelerate/cpu_gloo_2proc.yaml
  MODEL_KIND=tiny; CP=2; SEQ_128K=256; SEQ_1M=1024
  ROPE_1M="{max_position_embeddings: 1024, rope_parameters: {rope_type: yarn, factor: 4.0,
           original_max_position_embeddings: 256, rope_theta: 500000.0}}"
  LORA_STEPS=${HF_RINGCP_LORA_STEPS:-3}; LORA_1M_STEPS=${HF_RINGCP_LORA_1M_STEPS:-1}
else
  GPUS=${HF_RINGCP_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
  DEVICE_ARGS=()
  PARITY_SIZES=(2 4 8); SCALING_SIZES=(1 2 4 8)
  SCALING_ARGS=(--tokens-per-rank 16384 --heads 32 8 --head-dim 128 --dtype bfloat16 --backends auto flash
                --torch-backends cudnn flash)
  ACCEL_CONFIG=recipes/accelerate/1node_8gpu.yaml
  MODEL_KIND=llama3.1-8b; CP=8; SEQ_128K=131072; SEQ_1M=1048576
  # Llama-3.1 is native to 128K: YaRN x8 over it reaches 1M (the recipe's comment shows x2 for 256K).
  ROPE_1M="{max_position_embeddings: 1048576, rope_parameters: {rope_type: yarn, factor: 8.0,
           original_max_position_embeddings: 131072, rope_theta: 500000.0}}"
  LORA_STEPS=${HF_RINGCP_LORA_STEPS:-10}; LORA_1M_STEPS=${HF_RINGCP_LORA_1M_STEPS:-1}
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
fi
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone)
log "smoke=$SMOKE stages='$STAGES' devices=$GPUS results=$RES python=$PYTHON"
"$PYTHON" - <<'EOF' | tee "$RES/preflight.log"
import sys

import accelerate
import peft
import torch
import transformers

print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__, "peft",
      peft.__version__, "accelerate", accelerate.__version__, "cuda devices", torch.cuda.device_count())
EOF
if { want lora128k || want lora1m; } && ! "$PYTHON" -c 'import datasets' 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    log "installing the wheels in .whl/ (datasets is missing) into /tmp/hf_ringcp_site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/hf_ringcp_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/hf_ringcp_site"
  fi
  "$PYTHON" -c 'import datasets' 2>/dev/null \
    || log "WARNING: \`datasets\` is not importable: the LoRA stages will fail (carry its wheels in .whl/)"
fi

# ------------------------------------------------------------------------------------------------ parity
if want parity; then
  for n in "${PARITY_SIZES[@]}"; do
    if [ "$n" -gt "$GPUS" ]; then log "parity P=$n skipped: $GPUS devices"; continue; fi
    # The test spawns its own N ranks (tests/gpu/nccl.py) and is skipped, not failed, where it cannot run: a
    # stage whose tests were all skipped counts as failed here (-rs lists the reason).
    run_stage "parity P=$n" "$RES/parity_p$n.log" env HF_RINGCP_GPU_WORLD="$n" HF_RINGCP_PARITY_OUT="$RES" \
      "$PYTHON" -m pytest tests/gpu/test_nccl_parity.py -q -rs -p no:cacheprovider --junitxml "$RES/parity_p$n.xml"
    if grep -q 'skipped="[1-9]' "$RES/parity_p$n.xml" 2>/dev/null; then
      FAILED+=("parity P=$n (skipped)"); log "parity P=$n was skipped (see $RES/parity_p$n.log)"
    fi
  done
fi

# ------------------------------------------------------------------------------------------------ scaling
if want scaling; then
  P1_ARGS=()
  for n in "${SCALING_SIZES[@]}"; do
    if [ "$n" -gt "$GPUS" ]; then log "scaling P=$n skipped: $GPUS devices"; continue; fi
    run_stage "scaling P=$n" "$RES/scaling_p$n.log" "${TORCHRUN[@]}" --nproc_per_node "$n" benchmarks/cp_scaling.py \
      "${DEVICE_ARGS[@]}" "${SCALING_ARGS[@]}" "${P1_ARGS[@]}" --out "$RES"
    if [ "$n" = 1 ]; then
      p1=$(ls -t "$RES"/cp_scaling_p1_*.json 2>/dev/null | head -n 1)
      [ -n "$p1" ] && P1_ARGS=(--p1-json "$p1")
    fi
  done
fi

# ------------------------------------------------------------------------------------------------ LoRA recipe
# A local model folder: a LlamaConfig of the Llama-3.1-8B shape (or a tiny one for the smoke) and a small
# tokenizer built in memory (recipes.data.build_tiny_tokenizer). The model's vocabulary stays 128,256, so the
# embedding, head and loss cost what they cost in Llama-3.1-8B; the tokens just come from a small range.
write_model_dir() {
  "$PYTHON" - "$1" "$2" <<'EOF'
import sys

from transformers import LlamaConfig

from recipes.data import build_tiny_tokenizer

out, kind = sys.argv[1], sys.argv[2]
tok = build_tiny_tokenizer()
ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
if kind == "llama3.1-8b":
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_theta": 500000.0},
        tie_word_embeddings=False, **ids,
    )
else:  # the same structure, tiny
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False, **ids,
    )
config.architectures = ["LlamaForCausalLM"]
config.save_pretrained(out)
tok.save_pretrained(out)
print(f"wrote {kind} config and tokenizer to {out}")
EOF
}

# run_lora TAG SEQ_LEN STEPS [extra overrides...]
run_lora() {
  local tag=$1 seq=$2 steps=$3; shift 3
  if [ "$SMOKE" = 0 ] && [ "$GPUS" -lt 8 ]; then log "lora $tag skipped: needs 8 GPUs, $GPUS visible"; return 0; fi
  local model_dir=outputs/multigpu_model_$MODEL_KIND out_dir=outputs/multigpu_lora_$tag
  if [ ! -f "$model_dir/config.json" ] && ! write_model_dir "$model_dir" "$MODEL_KIND"; then
    FAILED+=("lora $tag (model dir)"); return 0
  fi
  rm -rf "$out_dir"
  # shellcheck disable=SC2086  # HF_RINGCP_LORA_ARGS is a list of words on purpose
  run_stage "lora $tag" "$RES/lora_$tag.log" "$PYTHON" -m accelerate.commands.launch --config_file "$ACCEL_CONFIG" \
    --main_process_port "$(free_port)" recipes/train_lora.py --config recipes/llama3.1-8b-lora-128k.yaml \
    --random_init true --model_name_or_path "$model_dir" --dataset passkey --cp_size "$CP" --seq_len "$seq" \
    --max_steps "$steps" --num_train_samples "$steps" --gradient_accumulation_steps 1 --logging_steps 1 \
    --num_eval_samples 1 --skip_passkey_eval true --save_steps 1000000 --output_dir "$out_dir" "$@" \
    ${HF_RINGCP_LORA_ARGS:-}
  if [ -f "$out_dir/results.json" ]; then
    "$PYTHON" - "$out_dir/results.json" "$RES/lora_$tag.json" "$tag" "$seq" "$steps" "$CP" "$MODEL_KIND" <<'EOF'
import json
import sys

src, dst, tag, seq, steps, cp, kind = sys.argv[1:]
result = json.loads(open(src).read())
result.update(stage=tag, seq_len=int(seq), steps=int(steps), cp_size=int(cp), model=kind)
open(dst, "w").write(json.dumps(result, indent=1))
mfu = result.get("mfu")
print(f"lora {tag}: {result['tokens_per_second_per_device']:.1f} tokens/s/GPU, "
      f"MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, peak {result['peak_memory_gib']:.1f} GiB per rank")
EOF
  else
    log "lora $tag: no results.json in $out_dir"
    [[ " ${FAILED[*]} " == *"lora $tag"* ]] || FAILED+=("lora $tag (no results.json)")
  fi
}
want lora128k && run_lora 128k "$SEQ_128K" "$LORA_STEPS"
want lora1m && run_lora 1m "$SEQ_1M" "$LORA_1M_STEPS" --config_overrides "$ROPE_1M"

# ------------------------------------------------------------------------------------------------ summary
"$PYTHON" - "$RES" <<'EOF'
import glob
import json
import os
import sys

from benchmarks.common import env_info, markdown_table, write_results

res = sys.argv[1]
load = lambda path: json.loads(open(path).read())
parts, rows = [], []

parity = []
for path in sorted(glob.glob(os.path.join(res, "nccl_parity_p*.json"))):
    data = load(path)
    checked = [r for r in data["rows"] if r.get("result") in ("pass", "FAIL")]
    worst = lambda keep: max((r["worst"] for r in checked if keep(r)), default=None)
    parity.append({
        "P": data["env"].get("world_size"), "backend": data["env"].get("dist_backend"),
        "checks": " ".join(sorted({r["check"] for r in data["rows"]})),
        "pass": sum(r["result"] == "pass" for r in checked), "FAIL": sum(r["result"] == "FAIL" for r in checked),
        "skipped": sum(str(r.get("result", "")).startswith("skipped") for r in data["rows"]),
        "worst_bf16": worst(lambda r: r["dtype"] == "bfloat16"),
        "worst_fp32_attention": worst(lambda r: r["dtype"] == "float32" and r["check"] == "attention"),
        "worst_lora_step": worst(lambda r: r["check"] == "lora_step"),
        "file": os.path.basename(path),
    })
if parity:
    parts.append("## Parity (tolerances: bf16 2e-2, fp32 1e-5)\n\n" + markdown_table(parity, list(parity[0])))
    rows += [{"section": "parity", **r} for r in parity]

scaling = []
for path in sorted(glob.glob(os.path.join(res, "cp_scaling_p*.json"))):
    for r in load(path)["rows"]:
        scaling.append({k: r.get(k) for k in ("P", "S", "impl", "comm", "kernel", "ms", "tflops_per_gpu",
                                              "weak_eff", "compute_ms", "exposed_ms", "exposed_pct", "peak_gib",
                                              "vs_hf_err", "result")})
scaling.sort(key=lambda r: (r["impl"] != "single", r["impl"], r["comm"] or "", r["kernel"] or "", r["P"]))
if scaling:
    parts.append("## Weak scaling (attention fwd+bwd, fixed tokens per GPU)\n\n"
                 + markdown_table(scaling, list(scaling[0])))
    rows += [{"section": "scaling", **r} for r in scaling]

lora = []
for path in sorted(glob.glob(os.path.join(res, "lora_*.json"))):
    r = load(path)
    lora.append({"stage": r["stage"], "model": r["model"], "seq_len": r["seq_len"], "cp_size": r["cp_size"],
                 "steps": r["steps"], "tokens_per_s_per_gpu": r["tokens_per_second_per_device"],
                 "tokens_per_s": r["tokens_per_second"], "mfu": r.get("mfu"), "peak_gib": r["peak_memory_gib"],
                 "losses": " ".join(f"{x:.3f}" for x in r["losses"]), "eval_loss": r["eval_loss"]})
if lora:
    parts.append("## LoRA recipe (random weights; tokens/s from the logged steps after the first)\n\n"
                 + markdown_table(lora, list(lora[0])))
    rows += [{"section": "lora", **r} for r in lora]

# The machine the results came from (the first result file's), not necessarily the one summarising them.
envs = [load(p)["env"] for p in sorted(glob.glob(os.path.join(res, "*_p*.json")))]
per_run = ("args", "seconds", "world_size", "t1_source")
info = {k: v for k, v in (envs[0] if envs else env_info()).items() if k not in per_run}
info["results"] = res
text = "\n\n".join(parts) if parts else "no results found"
path = write_results("multigpu_summary", info, rows, text, res)
print(text)
print(f"wrote {path}")
EOF

if [ -n "${HF_RINGCP_ARCHIVE:-}" ]; then
  tar czf "$HF_RINGCP_ARCHIVE" -C "$(dirname "$RES")" "$(basename "$RES")" && log "packed $RES into $HF_RINGCP_ARCHIVE"
fi
if [ "${#FAILED[@]}" -gt 0 ]; then
  log "FAILED: ${FAILED[*]}"
  exit 1
fi
log "all stages passed; results in $RES"
