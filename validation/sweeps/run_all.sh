#!/usr/bin/env bash
# Runs the twelve HP-transfer sweeps (four axes x three presets, about an hour each on 2 cores) one after
# the other on this machine, then writes the transfer report across them to validation/sweeps/results/.
# Resumable: run it again after an interruption and only unfinished points run. On a cluster, use the
# job arrays of docs/slurm.md instead.
#   bash validation/sweeps/run_all.sh            # all twelve
#   bash validation/sweeps/run_all.sh width      # one axis (three sweeps)
set -euo pipefail
cd "$(dirname "$0")/../.."
export OPENBLAS_NUM_THREADS=1
bash scripts/get_corpus.sh
cargo build --release
bin=target/release/moe-dmft
if [ $# -gt 0 ]; then axes=("$@"); else axes=(width depth experts expert_hidden); fi
dirs=()
for axis in "${axes[@]}"; do
  for preset in moe-completep sp mup; do
    name="${axis}_${preset}"
    start=$(date +%s)
    cfg="validation/sweeps/$name.toml"
    out="validation/sweeps/results/$name"
    if grep -q '^threads = 1$' "$cfg"; then
      # One-thread configs run as two shards side by side, then one pass writes the joint summary.
      "$bin" sweep --config "$cfg" --out "$out" --resume --shard 0/2 &
      "$bin" sweep --config "$cfg" --out "$out" --resume --shard 1/2 &
      wait
      "$bin" sweep --config "$cfg" --out "$out" --resume --summary-only
    else
      "$bin" sweep --config "$cfg" --out "$out" --resume
    fi
    echo "$name: $(( $(date +%s) - start )) s wall"
    dirs+=("validation/sweeps/results/$name")
  done
done
# Follow-ups (see the configs' headers): the depth shift L = 2 -> 4 with three seeds on half-step LRs, and
# the expert-hidden and experts basins on half-step LRs (reusing the main sweeps' integer-LR runs, which a
# rerun reproduces bit for bit).
fine_followup() {  # fine_followup SWEEP LR...: copy SWEEP's integer-LR runs in, then run SWEEP_fine
  local main=validation/sweeps/results/$1 fine=validation/sweeps/results/$1_fine lr run
  mkdir -p "$fine/runs"
  for lr in "${@:2}"; do
    for run in "$main"/runs/*-lr-$lr.000-s0; do
      [ -e "$fine/runs/$(basename "$run")" ] || cp -r "$run" "$fine/runs/"
    done
  done
  "$bin" sweep --config "validation/sweeps/$1_fine.toml" --out "$fine" --resume
  dirs+=("$fine")
}
if [ $# -eq 0 ]; then
  "$bin" sweep --config validation/sweeps/depth_moe-completep_seeds.toml \
    --out validation/sweeps/results/depth_moe-completep_seeds --resume
  dirs+=(validation/sweeps/results/depth_moe-completep_seeds)
  fine_followup expert_hidden_moe-completep 007 006 005
  fine_followup expert_hidden_mup 007 006 005
  fine_followup experts_moe-completep 008 007 006 005
fi
"$bin" sweep --collect "${dirs[@]}" --out validation/sweeps/results/transfer
cat validation/sweeps/results/transfer/transfer.md
# Per-group LR sweeps along expert_hidden (which group's optimum moves?), collected on their own: their
# drift is of one group's LR multiplier, not of the base LR the transfer table is about.
if [ $# -eq 0 ]; then
  groups=()
  for g in expert_down expert_up attention rest; do
    "$bin" sweep --config "validation/sweeps/expert_hidden_$g.toml" --out "validation/sweeps/results/expert_hidden_$g" --resume
    groups+=("validation/sweeps/results/expert_hidden_$g")
  done
  "$bin" sweep --collect "${groups[@]}" --out validation/sweeps/results/groups
  cat validation/sweeps/results/groups/transfer.md
  # The base LR again with expert_down's rate tuned at the base (lr_scale 2^2.5, from the sweep above).
  "$bin" sweep --config validation/sweeps/expert_hidden_moe-completep_tuned.toml \
    --out validation/sweeps/results/expert_hidden_moe-completep_tuned --resume
  dirs+=(validation/sweeps/results/expert_hidden_moe-completep_tuned)
  # ... and with every group's rate tuned at the base (attention 2^-0.9, expert_down 2^2.5, the rest 2^1).
  "$bin" sweep --config validation/sweeps/expert_hidden_moe-completep_pergroup.toml \
    --out validation/sweeps/results/expert_hidden_moe-completep_pergroup --resume
  dirs+=(validation/sweeps/results/expert_hidden_moe-completep_pergroup)
  # Its n = 64 and 128, two seeds, reusing the n = 32 and 256 runs of seeds 0 and 1.
  axis=validation/sweeps/results/expert_hidden_moe-completep_pergroup_axis
  mkdir -p "$axis/runs"
  for run in validation/sweeps/results/expert_hidden_moe-completep_pergroup/runs/*-lr-00{7.5,7.0,6.5,6.0,5.5}00-s[01]; do
    [ -e "$axis/runs/$(basename "$run")" ] || cp -r "$run" "$axis/runs/"
  done
  "$bin" sweep --config validation/sweeps/expert_hidden_moe-completep_pergroup_axis.toml --out "$axis" --resume
  dirs+=("$axis")
  "$bin" sweep --collect "${dirs[@]}" --out validation/sweeps/results/transfer
fi
