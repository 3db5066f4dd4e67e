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
# DEVICE=cpu WORKERS=16 runs the listed points on 16 CPU cores as a queue (see below).
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
# DEVICE=cpu runs the same shards on the machine's CPU cores instead (with WORKERS, one process per core).
DEVICE="${DEVICE:-cuda}"
mkdir -p "$OUT"
cd "$ROOT"
WORK="$(mktemp -d /tmp/moe_sweeps.XXXXXX)"
. "$HERE/env.sh"
# The points to run, one "name shards index" line each, in the order given.
names=()
for spec in "$@"; do
  IFS=: read -r name shards range <<<"$spec"
  first=${range%-*}; last=${range#*-}
  names+=("$name")
  for ((i = ${first:-0}; i <= ${last:-$((shards - 1))}; i++)); do echo "$name $shards $i"; done
done >"$WORK/queue"
run_point() { # name shards index seconds
  timeout "$4" "$BIN" sweep --config "validation/sweeps/$1.toml" --out "validation/sweeps/results/$1" \
    --resume --shard "$3/$2" --device "$DEVICE" >>"$WORK/$1.$3.log" 2>&1
}
if [ -z "${WORKERS:-}" ]; then
  # Every shard at once (GPU: the processes time-share it).
  while read -r name shards i; do run_point "$name" "$shards" "$i" "$LIMIT" </dev/null & done <"$WORK/queue"
else
  # WORKERS=N: a work queue, N processes at a time, each taking the next point when its last one ends, in
  # the order given (put the longest first). Meant for DEVICE=cpu with N = the core count, when the points
  # outnumber the cores; a point still running at the deadline is cut and reruns from scratch on resume.
  deadline=$(($(date +%s) + LIMIT))
  next_point() { flock "$WORK/queue.lock" sh -c 'head -n 1 "$0"; sed -i 1d "$0"' "$WORK/queue"; }
  for ((w = 0; w < WORKERS; w++)); do
    while point=$(next_point) && [ -n "$point" ]; do
      left=$((deadline - $(date +%s)))
      [ "$left" -gt 0 ] || break
      run_point $point "$left"
    done &
  done
fi
wait
# A name may come twice (several ranges of one sweep).
names=($(printf "%s\n" "${names[@]}" | sort -u))
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
