#!/usr/bin/env bash
# LR sweeps of issue 6 on the GPU backend, on a machine with only the packed binary (package.sh), the
# NVIDIA driver and CUDA libraries, and the Shakespeare corpus in data-cache/shakespeare (carried). The
# small models of the sweeps are latency-bound on a GPU, so many shard processes share it: each sweep
# is split into shards (`--shard i/n`), all run side by side with `--device cuda`, and `--resume`
# makes a rerun (or a later CPU run) finish what a time limit cut short. Results land in
# validation/sweeps/results/<name> and are packed into $OUT/sweeps.tar.gz.
#
# Usage (repository root): LIMIT=seconds bash validation/gpu/sweeps.sh NAME:SHARDS[:FIRST-LAST] [...]
# (FIRST-LAST: start only those shards, e.g. the new points of a grown grid when SHARDS is the grid size.)
#
# Measured (H200, 2026-11-26, README.md "Sweeps on the GPU"): 18 to 20 shard processes side by side run
# about 8.5 steps/s each (the width-64 Transformer of the expert_hidden sweeps), so a 3000-step point needs
# about 350 s: with LIMIT=250 no point finished; with LIMIT=455 and SHARDS equal to the grid size (one
# point per process; processes whose point is done exit at once) the 20 points of a new seed finished in
# 354 s. Unfinished points restart from scratch on resume, so give every process one point that fits.
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="${BIN:-$HERE/bin/moe-dmft}"
OUT="${OUT:-$HERE/out}"
LIMIT="${LIMIT:-540}"
# DEVICE=cpu runs the same shards on the machine's CPU cores instead (one process per core).
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
cd "$ROOT"
WORK="$(mktemp -d /tmp/moe_sweeps.XXXXXX)"
. "$HERE/env.sh"
names=()
for spec in "$@"; do
  IFS=: read -r name shards range <<<"$spec"
  first=${range%-*}; last=${range#*-}
  names+=("$name")
  for ((i = ${first:-0}; i <= ${last:-$((shards - 1))}; i++)); do
    timeout "$LIMIT" "$BIN" sweep --config "validation/sweeps/$name.toml" --out "validation/sweeps/results/$name" \
      --resume --shard "$i/$shards" --device "$DEVICE" >"$WORK/$name.$i.log" 2>&1 &
  done
done
wait
for name in "${names[@]}"; do
  echo "== $name"; tail -n 2 "$WORK/$name".*.log
  n=$(ls "validation/sweeps/results/$name/runs" 2>/dev/null | wc -l)
  echo "$name: $n run folders"
done
# Finished runs only (as git keeps them): no per-step metrics, no unfinished runs; the device tool returns
# at most 16 MB per file.
tar -czf "$OUT/sweeps.tar.gz" --exclude=metrics.jsonl --exclude=.partial \
  $(for n in "${names[@]}"; do echo "validation/sweeps/results/$n"; done)
nvidia-smi --query-gpu=name --format=csv,noheader >"$OUT/gpu.txt" 2>/dev/null
ls -la "$OUT"
