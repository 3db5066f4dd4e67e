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
# OpenBLAS picks its kernel set per CPU (summary.json's `blas_core`), and two sets give losses that differ from
# the tenth digit on (about 0.003 after a run): pinning one makes runs on different x86 machines comparable
# bit for bit. Haswell's kernels need AVX2 and FMA; on this project's machines they give the same results
# to every digit as the default choice (Zen).
if [ -z "${OPENBLAS_CORETYPE:-}" ] && grep -qw avx2 /proc/cpuinfo && grep -qw fma /proc/cpuinfo; then
  export OPENBLAS_CORETYPE=Haswell
fi
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
# Follow-ups (see the configs' headers): the depth shift L = 2 -> 4 with three seeds on half-step LRs, the
# expert-hidden and experts basins on half-step LRs, and along expert_hidden the per-group LR sweeps and the
# base LR with tuned group multipliers. Some reuse runs of an earlier sweep (same point ids and configs, so
# a rerun would reproduce them bit for bit).
reuse_runs() {  # reuse_runs FROM TO GLOB...: copy FROM's runs matching each GLOB into TO (missing ones only)
  local from=validation/sweeps/results/$1/runs to=validation/sweeps/results/$2/runs pattern run
  mkdir -p "$to"
  for pattern in "${@:3}"; do
    for run in "$from"/$pattern; do
      [ -e "$to/$(basename "$run")" ] || cp -r "$run" "$to/"
    done
  done
}
followup() {  # followup SWEEP: run validation/sweeps/SWEEP.toml and add it to the transfer table
  "$bin" sweep --config "validation/sweeps/$1.toml" --out "validation/sweeps/results/$1" --resume
  dirs+=("validation/sweeps/results/$1")
}
if [ $# -eq 0 ]; then
  followup depth_moe-completep_seeds
  reuse_runs expert_hidden_moe-completep expert_hidden_moe-completep_fine '*-lr-00'{7,6,5}'.000-s0'
  followup expert_hidden_moe-completep_fine
  reuse_runs expert_hidden_mup expert_hidden_mup_fine '*-lr-00'{7,6,5}'.000-s0'
  followup expert_hidden_mup_fine
  reuse_runs experts_moe-completep experts_moe-completep_fine '*-lr-00'{8,7,6,5}'.000-s0'
  followup experts_moe-completep_fine
  # Per-group LR sweeps along expert_hidden and experts (which group's optimum moves?), collected on their own: their
  # drift is of one group's LR multiplier, not of the base LR the transfer table is about.
  groups=()
  for g in expert_down expert_up attention rest; do
    "$bin" sweep --config "validation/sweeps/expert_hidden_$g.toml" --out "validation/sweeps/results/expert_hidden_$g" --resume
    groups+=("validation/sweeps/results/expert_hidden_$g")
  done
  # Along experts, the router's rate alone: of all groups only its shape depends on M.
  "$bin" sweep --config validation/sweeps/experts_router.toml --out validation/sweeps/results/experts_router --resume
  groups+=(validation/sweeps/results/experts_router)
  # Along depth, the router's rate alone (L = 2 and 16).
  "$bin" sweep --config validation/sweeps/depth_router.toml --out validation/sweeps/results/depth_router --resume
  groups+=(validation/sweeps/results/depth_router)
  "$bin" sweep --collect "${groups[@]}" --out validation/sweeps/results/groups
  cat validation/sweeps/results/groups/transfer.md
  # The base LR again with expert_down's rate tuned at the base (lr_scale 2^2.5, from the sweep above) ...
  followup expert_hidden_moe-completep_tuned
  # ... and with every group's rate tuned at the base (attention 2^-0.9, expert_down 2^2.5, the rest 2^1),
  followup expert_hidden_moe-completep_pergroup
  # then its n = 64 and 128 with two seeds, reusing the n = 32 and 256 runs of seeds 0 and 1.
  reuse_runs expert_hidden_moe-completep_pergroup expert_hidden_moe-completep_pergroup_axis \
    '*-lr-00'{7.5,7.0,6.5,6.0,5.5}'00-s[01]'
  followup expert_hidden_moe-completep_pergroup_axis
  # The same multipliers, unchanged, along depth (L = 2 and 4, four seeds; then the whole axis, two seeds)
  # and along experts (8 .. 64 experts, two seeds).
  followup depth_moe-completep_pergroup
  reuse_runs depth_moe-completep_pergroup depth_moe-completep_pergroup_axis \
    '*-lr-00'{8.0,7.5,7.0,6.5,6.0,5.5}'00-s[01]'
  followup depth_moe-completep_pergroup_axis
  followup experts_moe-completep_pergroup
  # The shared LR over the whole depth axis with three seeds (L = 2 -> 4's six-seed shift is at the threshold,
  # L = 8 and 16 had one seed): L = 2 and 4 from depth_moe-completep_seeds, L = 8 and 16's seed 0 at the
  # integer LRs from the main sweep.
  reuse_runs depth_moe-completep_seeds depth_moe-completep_seeds_axis \
    '*-depth0000[24]-lr-00'{8.0,7.5,7.0,6.5,6.0,5.5,5.0}'00-s[012]'
  reuse_runs depth_moe-completep depth_moe-completep_seeds_axis '*-depth000'{08,16}'-lr-00'{8,7,6,5}'.000-s0'
  followup depth_moe-completep_seeds_axis
  # The shared LR along experts with the router at experts_router's best multiplier (2^-3).
  followup experts_moe-completep_router
  # The same router multiplier along depth (L routers, one per block): depth_moe-completep_seeds_axis's grid and -4.5.
  followup depth_moe-completep_router
  # Past the issue's ranges (thirteenth session; the new points ran on an H200 with `--device cuda`, see
  # validation/gpu/README.md: width 2048 takes about an hour per point on this CPU). Widths 64 .. 512 with
  # three seeds, then the same to width 2048, on the five LRs around the optimum; expert hidden to
  # n = 1024 with the per-group multipliers.
  reuse_runs width_moe-completep width_moe-completep_seeds '*-lr-00'{8,7,6,5,4}'.000-s0'
  followup width_moe-completep_seeds
  reuse_runs width_moe-completep_seeds width_moe-completep_large '*'
  followup width_moe-completep_large
  reuse_runs expert_hidden_moe-completep_pergroup_axis expert_hidden_moe-completep_pergroup_large '*'
  followup expert_hidden_moe-completep_pergroup_large
  # Depth at four times the budget (fourteenth to sixteenth sessions): seed 0 over L = 2 .. 16, then seeds 1
  # to 3 at every depth; the second sweep reuses all of seed 0's runs.
  followup depth_moe-completep_long
  reuse_runs depth_moe-completep_long depth_moe-completep_long_seeds '*-s0'
  followup depth_moe-completep_long_seeds
  # Which of those multipliers fails along depth: each alone at L = 2 and 8 (depth_expert_down's grid point 0,
  # every group at multiplier 1, is the reference of all three). Not collected: one or two grid points each,
  # read as a loss table (sweeps/REPORT.md, Findings, Depth).
  for g in expert_down attention rest; do
    "$bin" sweep --config "validation/sweeps/depth_$g.toml" --out "validation/sweeps/results/depth_$g" --resume
  done
fi
"$bin" sweep --collect "${dirs[@]}" --out validation/sweeps/results/transfer
cat validation/sweeps/results/transfer/transfer.md
