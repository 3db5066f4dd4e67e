#!/usr/bin/env bash
# The GPU trainer's resident path (parameters, gradients and Adam moments stay on the device; the trainer
# reads only sums of squares): CPU-vs-GPU checks, `train` on both backends from one config compared step
# by step (loss, and every group's parameter, gradient and update RMS), and the wall time of 40 steps at
# width 1024 and 2048. Writes resident.json and resident.log to $OUT. Then, with SWEEP set, runs that many
# seconds of validation/gpu/sweeps.sh width_moe-completep_large:6 (carry data-cache too).
#
# Usage (repository root, on the device, validation/gpu/bin carried): [SWEEP=150] bash validation/gpu/resident.sh
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
BIN="${BIN:-$HERE/bin/moe-dmft}"
OUT="${OUT:-$HERE/out}"
WORK="$(mktemp -d /tmp/moe_resident.XXXXXX)"
mkdir -p "$OUT"
LOG="$OUT/resident.log"
. "$HERE/env.sh"
export PYTHONUNBUFFERED=1
run() { local t0=$SECONDS; timeout "$1" "${@:2}" >>"$LOG" 2>&1; echo "[${SECONDS}s] exit $? in $((SECONDS - t0)) s: ${*:2}" | tee -a "$LOG"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$LOG"
run 60 "$BIN" gpu check --tolerance 1e-3 --out "$WORK/check_transformer.json" \
  --config "$HERE/check_transformer.toml" "$HERE/check_transformer_variants.toml"
run 60 "$BIN" gpu check --tolerance 1e-3 --out "$WORK/check.json" \
  --config "$HERE/check_softmax_norm.toml" "$HERE/check_variants.toml" "$HERE/check_zero_router.toml" "$HERE/check_index_ties.toml"
for c in train_transformer train_small; do
  run 60 "$BIN" train --config "$HERE/$c.toml" --out "$WORK/${c}_cpu"
  run 60 "$BIN" train --config "$HERE/$c.toml" --device cuda --out "$WORK/${c}_gpu"
done
for w in 1024 2048; do run 60 "$BIN" train --config "$HERE/time_width$w.toml" --device cuda --out "$WORK/time_width$w"; done
python3 - "$WORK" "$OUT/resident.json" <<'PY' | tee -a "$LOG"
import json, os, sys
work, out = sys.argv[1], sys.argv[2]
def records(d):
    p = os.path.join(work, d, "metrics.jsonl")
    return [json.loads(l) for l in open(p)] if os.path.exists(p) else []
def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)
res = {"gpu": open("/proc/driver/nvidia/gpus/" + os.listdir("/proc/driver/nvidia/gpus")[0] + "/information").read().split("\n")[0] if os.path.isdir("/proc/driver/nvidia/gpus") else None}
for name in ("check_transformer", "check"):
    p = os.path.join(work, name + ".json")
    if os.path.exists(p):
        reports = json.load(open(p))
        reports = reports if isinstance(reports, list) else reports.get("reports", [reports])
        res[name] = [{k: r.get(k) for k in ("config", "passed", "loss_rel_diff", "max_grad_rel_err", "max_param_rel_err_after_step")} for r in reports]
for c in ("train_transformer", "train_small"):
    cpu, gpu = records(c + "_cpu"), records(c + "_gpu")
    n = min(len(cpu), len(gpu))
    worst = {"loss": 0.0}
    for a, b in zip(gpu[:n], cpu[:n]):
        worst["loss"] = max(worst["loss"], rel(a["loss"], b["loss"]))
        for g, rb in b["groups"].items():
            for q in ("param", "grad", "update"):
                if rb[q] > 0:
                    worst[q] = max(worst.get(q, 0.0), rel(a["groups"][g][q], rb[q]))
    res[c] = {"records_cpu": len(cpu), "records_gpu": len(gpu), "max_rel_diff": worst}
    print(c, json.dumps(res[c]))
for w in (1024, 2048):
    p = os.path.join(work, "time_width%d" % w, "summary.json")
    if os.path.exists(p):
        s = json.load(open(p))
        res["time_width%d" % w] = {k: s.get(k) for k in ("steps", "wall_seconds", "tokens_per_second", "params_total", "final_val_loss")}
        print(w, json.dumps(res["time_width%d" % w]))
json.dump(res, open(out, "w"), indent=1)
PY
if [ -n "${SWEEP:-}" ]; then LIMIT=$SWEEP bash "$HERE/sweeps.sh" width_moe-completep_large:6; fi
