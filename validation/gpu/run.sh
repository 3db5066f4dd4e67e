#!/usr/bin/env bash
# The prepared GPU check of moe-dmft (issue 7). Needs on the machine: the binary built elsewhere with
# `--features cuda` (default validation/gpu/bin/moe-dmft, or $BIN), an NVIDIA driver, the CUDA libraries
# cuBLAS and NVRTC (from a CUDA install or PyTorch's pip wheels), and python3 with PyTorch. No Rust, no
# network. Finishes in under 8 minutes (each step has a timeout; optional steps are skipped late; BUDGET=s
# shortens it).
#
#   (a) CPU vs GPU on the same weights: loss, predictions, routing load, every gradient and one optimizer
#       step, for two MoE-Transformer and four MoE-ResNet configs covering every routing path (tolerance
#       1e-3 relative, see README.md); and one config of each trained 50 steps by both backends.
#   (b) step time of the MoE-Transformer at width 1024, 8 blocks, 64 experts, 8 active, expert hidden 512,
#       batch 32 x sequence 256 (and of the MoE-ResNet of the same MoE sizes): ours vs PyTorch eager (and
#       torch.compile when it works), f32 and TF32.
#   (c) results-<gpu>.json with GPU name, times, ratios and MFU, written to $OUT (or validation/gpu/out).
#
# Usage (repository root): bash validation/gpu/run.sh
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-$HERE/bin/moe-dmft}"
OUT="${OUT:-$HERE/out}"
WORK="$(mktemp -d /tmp/moe_gpu.XXXXXX)"
mkdir -p "$OUT"
LOG="$OUT/run.log"
: >"$LOG"
log() { echo "[$(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

. "$HERE/env.sh"
export OPENBLAS_NUM_THREADS=1 PYTHONUNBUFFERED=1
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

if [ ! -x "$BIN" ]; then log "no binary at $BIN (build with: cargo build --release --features cuda)"; exit 2; fi
: >"$WORK/smi.txt"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader >"$WORK/smi.txt" 2>>"$LOG"
fi
log "nvidia-smi: $(cat "$WORK/smi.txt")"

step() { # name timeout_s command...: runs, logs exit code and time, never aborts the script
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "$rc" >"$WORK/$name.rc"
  log "$name: exit $rc in $((SECONDS - t0)) s"
  return 0
}

step probe 60 sh -c "\"$BIN\" gpu probe >\"$WORK/probe.json\""
if [ "$(cat "$WORK/probe.rc")" != 0 ]; then
  log "no usable GPU: see the log above"
  python3 "$HERE/summarize.py" --work "$WORK" --out "$OUT" | tee -a "$LOG"
  exit 2
fi

# Optional steps start only while the run is inside its budget (seconds since start; default 8 minutes).
BUDGET=${BUDGET:-440}
left() { echo $((BUDGET - SECONDS)); }

# (a) correctness: components first (cuBLAS wrapper, routing kernels), then whole models, then training
step selftest 60 "$BIN" gpu selftest --out "$WORK/selftest.json"
step check_transformer 120 "$BIN" gpu check --tolerance 1e-3 --out "$WORK/check_transformer.json" \
  --config "$HERE/check_transformer.toml" "$HERE/check_transformer_variants.toml"
step check 120 "$BIN" gpu check --tolerance 1e-3 --out "$WORK/check.json" \
  --config "$HERE/check_softmax_norm.toml" "$HERE/check_variants.toml" "$HERE/check_zero_router.toml" "$HERE/check_index_ties.toml"
# The same config on both backends: `device` is the only difference.
step train_transformer_cpu 60 "$BIN" train --config "$HERE/train_transformer.toml" --out "$WORK/train_transformer_cpu"
step train_transformer_gpu 60 "$BIN" train --config "$HERE/train_transformer.toml" --device cuda --out "$WORK/train_transformer_gpu"
step train_cpu 60 "$BIN" train --config "$HERE/train_small.toml" --out "$WORK/train_cpu"
step train_gpu 60 "$BIN" train --config "$HERE/train_small.toml" --device cuda --out "$WORK/train_gpu"

# (b) timing at the issue's sizes: the MoE-Transformer first, then the MoE-ResNet (its MoE part alone)
MOE=(--width 1024 --depth 8 --experts 64 --active 8 --expert-hidden 512 --steps 10 --warmup 3)
TF=(--arch transformer "${MOE[@]}" --batch 32 --seq 256 --n-head 16 --vocab 65)
RES=("${MOE[@]}" --tokens 8192 --input-dim 64 --norm)
step ours_transformer_f32 120 "$BIN" gpu bench "${TF[@]}" --out "$WORK/ours_transformer_f32.json"
step torch_eager_transformer_f32 120 python3 "$HERE/torch_ref.py" "${TF[@]}" --out "$WORK/torch_eager_transformer_f32.json"
if [ "$(left)" -gt 200 ]; then
  step ours_transformer_tf32 60 "$BIN" gpu bench "${TF[@]}" --tf32 --out "$WORK/ours_transformer_tf32.json"
  step torch_eager_transformer_tf32 60 python3 "$HERE/torch_ref.py" "${TF[@]}" --tf32 --out "$WORK/torch_eager_transformer_tf32.json"
fi
if [ -z "${SKIP_RESNET_TIMING:-}" ] && [ "$(left)" -gt 160 ]; then
  step ours_f32 120 "$BIN" gpu bench "${RES[@]}" --out "$WORK/ours_f32.json"
  step torch_eager_f32 120 python3 "$HERE/torch_ref.py" "${RES[@]}" --out "$WORK/torch_eager_f32.json"
fi
if [ -z "${SKIP_RESNET_TIMING:-}" ] && [ "$(left)" -gt 200 ]; then
  step ours_tf32 60 "$BIN" gpu bench "${RES[@]}" --tf32 --out "$WORK/ours_tf32.json"
  step torch_eager_tf32 60 python3 "$HERE/torch_ref.py" "${RES[@]}" --tf32 --out "$WORK/torch_eager_tf32.json"
fi
if [ -n "${SKIP_COMPILE:-}" ]; then
  log "torch.compile skipped: SKIP_COMPILE is set"
elif [ "$(left)" -gt 60 ]; then
  limit=$(( $(left) - 20 )); [ $limit -gt 150 ] && limit=150
  step torch_compile_transformer_f32 $limit python3 "$HERE/torch_ref.py" "${TF[@]}" --compile --out "$WORK/torch_compile_transformer_f32.json"
else
  log "torch.compile skipped: not enough of the budget left"
fi

# (c) results
python3 "$HERE/summarize.py" --work "$WORK" --out "$OUT" | tee -a "$LOG"
log "done"
