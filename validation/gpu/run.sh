#!/usr/bin/env bash
# The prepared GPU check of moe-dmft (issue 7). Needs on the machine: the binary built elsewhere with
# `--features cuda` (default validation/gpu/bin/moe-dmft, or $BIN), an NVIDIA driver, the CUDA libraries
# cuBLAS and NVRTC (from a CUDA install or PyTorch's pip wheels), and python3 with PyTorch. No Rust, no
# network. Finishes in under 8 minutes (each step has a timeout; optional steps are skipped late).
#
#   (a) CPU vs GPU on the same weights: loss, predictions, routing load, every gradient and one optimizer
#       step, for four configs covering every routing path (tolerance 1e-3 relative, see README.md); and
#       one config trained 50 steps by both backends.
#   (b) step time of the MoE-ResNet at width 1024, 8 blocks, 64 experts, 8 active, expert hidden 512,
#       8192 tokens (batch 32 x sequence 256), pre-norm: ours vs PyTorch eager (and torch.compile when it
#       works), f32 and TF32.
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

# cuBLAS and NVRTC: a CUDA install and/or the nvidia-* wheels next to PyTorch.
libdirs=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/local/nvidia/lib64 \
         $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null | tr ' ' '\n' | sed 's|$|/nvidia/*/lib|'); do
  for dd in $d; do
    # any one of them is enough: the wheels put cuBLAS and NVRTC in separate folders
    if compgen -G "$dd/libcublas.so*" >/dev/null || compgen -G "$dd/libnvrtc.so*" >/dev/null \
       || compgen -G "$dd/libcuda.so*" >/dev/null; then libdirs="$libdirs:$dd"; fi
  done
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The libraries package.sh packed beside the binary (OpenBLAS, fontconfig, ...), last: the machine's own win.
if [ -f "$(dirname "$BIN")/lib.tar.xz" ]; then
  tar -C "$WORK" -xJf "$(dirname "$BIN")/lib.tar.xz" && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$WORK/lib"
fi
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

# (a) correctness: components first (cuBLAS wrapper, routing kernels), then whole models
step selftest 60 "$BIN" gpu selftest --out "$WORK/selftest.json"
step check 120 "$BIN" gpu check --tolerance 1e-3 --out "$WORK/check.json" \
  --config "$HERE/check_softmax_norm.toml" "$HERE/check_variants.toml" "$HERE/check_zero_router.toml" "$HERE/check_index_ties.toml"
step train_cpu 60 "$BIN" train --config "$HERE/train_small.toml" --out "$WORK/train_cpu"
step train_gpu 60 "$BIN" gpu train --config "$HERE/train_small.toml" --out "$WORK/train_gpu"

# (b) timing at the issue's sizes
SIZES=(--width 1024 --depth 8 --experts 64 --active 8 --expert-hidden 512 --tokens 8192 --input-dim 64 --norm --steps 10 --warmup 3)
step ours_f32 120 "$BIN" gpu bench "${SIZES[@]}" --out "$WORK/ours_f32.json"
step torch_eager_f32 120 python3 "$HERE/torch_ref.py" "${SIZES[@]}" --out "$WORK/torch_eager_f32.json"
if [ $SECONDS -lt 330 ]; then
  step ours_tf32 60 "$BIN" gpu bench "${SIZES[@]}" --tf32 --out "$WORK/ours_tf32.json"
  step torch_eager_tf32 60 python3 "$HERE/torch_ref.py" "${SIZES[@]}" --tf32 --out "$WORK/torch_eager_tf32.json"
fi
if [ -n "${SKIP_COMPILE:-}" ]; then
  log "torch.compile skipped: SKIP_COMPILE is set"
elif [ $SECONDS -lt 330 ]; then
  limit=$((440 - SECONDS)); [ $limit -gt 150 ] && limit=150
  step torch_compile_f32 $limit python3 "$HERE/torch_ref.py" "${SIZES[@]}" --compile --out "$WORK/torch_compile_f32.json"
else
  log "torch.compile skipped: not enough of the 8-minute budget left"
fi

# (c) results
python3 "$HERE/summarize.py" --work "$WORK" --out "$OUT" | tee -a "$LOG"
log "done"
