#!/usr/bin/env bash
# Robustness check of the stability-edge guard: refits the committed results of every sweep in the transfer
# table with `[analysis] cliff = CLIFF` (default 0.5) set on each, and collects them. Nothing is trained and
# the committed results are not touched: each sweep's runs are copied to OUT/<name>, its config is copied
# beside the original with the cliff line set (so `include`s resolve) and removed after the refit.
#   bash validation/sweeps/refit_guarded.sh [OUT]       # OUT defaults to /tmp/refit_guarded
# Compare OUT/transfer/transfer.md with validation/sweeps/results/transfer/transfer.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-/tmp/refit_guarded}"
cliff="${CLIFF:-0.5}"
bin="$(realpath "${BIN:-target/release/moe-dmft}")"
# The sweeps of validation/sweeps/results/transfer, in its order.
names=$(sed -n 's/^Optimum:.*Sweeps: \(.*\)\.$/\1/p' validation/sweeps/results/transfer/transfer.md | tr -d '`,')
mkdir -p "$out"
cfg=""
trap 'rm -f "$cfg"' EXIT
for name in $names; do
  cfg="validation/sweeps/_guarded_$name.toml"
  # Drop any cliff the config sets, then set ours in [analysis] (adding the table when it has none).
  sed '/^cliff = /d' "validation/sweeps/$name.toml" >"$cfg"
  if grep -q '^\[analysis\]$' "$cfg"; then
    sed -i "s/^\[analysis\]$/[analysis]\ncliff = $cliff/" "$cfg"
  else
    printf '\n[analysis]\ncliff = %s\n' "$cliff" >>"$cfg"
  fi
  rm -rf "${out:?}/$name" && mkdir -p "$out/$name"
  cp -r "validation/sweeps/results/$name/runs" "$out/$name/"
  "$bin" sweep --config "$cfg" --out "$out/$name" --summary-only >/dev/null
  rm -f "$cfg"
done
(cd "$out" && "$bin" sweep --collect $names --out transfer)
echo "guarded (cliff = $cliff) transfer table: $out/transfer/transfer.md"
