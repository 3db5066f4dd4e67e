"""Collects the outputs of validation/gpu/run.sh into one results-<gpu>.json and prints a short table.
Standard library only. Every input may be missing or failed: its entry is then absent or None.

Reads from --work: probe.json, smi.txt, selftest.json, check.json, check_transformer.json,
train_cpu/ and train_gpu/, train_transformer_cpu/ and train_transformer_gpu/ (metrics.jsonl, summary.json),
the timings <name>.json for every name in BENCH, and <name>.rc (exit codes) for every step."""

import argparse
import glob
import json
import os
import re

# Timings, in run.sh's order: MoE-ResNet, then MoE-Transformer.
BENCH = ["ours_f32", "torch_eager_f32", "ours_tf32", "torch_eager_tf32", "torch_compile_f32",
         "ours_transformer_f32", "torch_eager_transformer_f32", "ours_transformer_tf32",
         "torch_eager_transformer_tf32", "torch_compile_transformer_f32"]
STEPS = ["probe", "selftest", "check", "train_cpu", "train_gpu", "check_transformer", "train_transformer_cpu",
         "train_transformer_gpu"] + BENCH
CHECK_KEYS = ("config", "passed", "loss_cpu", "loss_gpu", "loss_rel_diff", "prediction_rel_err", "load_max_abs_diff",
              "max_grad_rel_err", "max_param_rel_err_after_step", "loss_after_step_cpu", "loss_after_step_gpu")


def load(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def read_rc(work, name):
    try:
        with open(os.path.join(work, name + ".rc")) as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return None


def losses(path):
    out = []
    try:
        with open(path) as fh:
            for line in fh:
                rec = json.loads(line)
                if "loss" in rec:
                    out.append(rec["loss"])
    except (OSError, ValueError):
        return None
    return out


def peak_tflops(device_name, tf32):
    """Data-sheet dense peak (TFLOP/s) of f32 on CUDA cores or TF32 on tensor cores; the table of
    `peak_tflops` in src/cuda/run.rs. None for a card not in it."""
    n = (device_name or "").upper()
    if "H100" in n and "PCIE" in n:
        f32_peak, tf32_peak = 51.2, 378.0
    elif "H100" in n or "H200" in n:
        f32_peak, tf32_peak = 66.9, 494.7
    elif "A100" in n:
        f32_peak, tf32_peak = 19.5, 156.0
    else:
        return None
    return tf32_peak if tf32 else f32_peak


def bench_peak(b):
    """Peak for a timing of ours (device {name}, spec.tf32) or of torch_ref.py (device str, tf32)."""
    dev = b.get("device")
    name = dev.get("name") if isinstance(dev, dict) else dev
    tf32 = b["tf32"] if "tf32" in b else (b.get("spec") or {}).get("tf32", False)
    return peak_tflops(name, bool(tf32)) or b.get("peak_tflops")


def bench_mfu(b):
    if not b or b.get("ok") is False or not b.get("achieved_tflops"):
        return None
    pk = bench_peak(b)
    return b["achieved_tflops"] / pk if pk else None


def summarize_check(check):
    """The pass/fail summary of a `moe-dmft gpu check` report list (a single report is taken as a list of one)."""
    if check is None:
        return None
    if isinstance(check, dict):
        check = [check]
    return {
        "tolerance": check[0].get("tolerance") if check else None,
        "passed": bool(check) and all(c.get("passed") is True for c in check),
        "configs": [{k: c.get(k) for k in CHECK_KEYS} for c in check],
        "details": check,
    }


def train_compare(w, cpu_dir, gpu_dir, config):
    cpu = losses(os.path.join(w, cpu_dir, "metrics.jsonl"))
    gpu_l = losses(os.path.join(w, gpu_dir, "metrics.jsonl"))
    if not cpu or not gpu_l:
        return None
    n = min(len(cpu), len(gpu_l))
    rel = [abs(g - c) / max(abs(c), 1e-30) for c, g in zip(cpu[:n], gpu_l[:n])]
    return {
        "config": config,
        "records": n,
        "final_loss_cpu": cpu[n - 1],
        "final_loss_gpu": gpu_l[n - 1],
        "max_rel_diff_per_step_loss": max(rel),
        "summary_cpu": load(os.path.join(w, cpu_dir, "summary.json")),
        "summary_gpu": load(os.path.join(w, gpu_dir, "summary.json")),
    }


def num(v, f="%.2e"):
    return f % v if isinstance(v, (int, float)) and not isinstance(v, bool) else "n/a"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    w = a.work

    probe = load(os.path.join(w, "probe.json"))
    smi = ""
    try:
        with open(os.path.join(w, "smi.txt")) as fh:
            smi = fh.read().strip()
    except OSError:
        pass
    gpu = probe["name"] if probe else (smi.split(",")[0].strip() if smi else "no-gpu")
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "no-gpu"

    res = {"gpu": gpu, "nvidia_smi": smi, "probe": probe, "exit_codes": {}}
    extra = sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(w, "*.rc")))
    for name in STEPS + [e for e in extra if e not in STEPS]:
        res["exit_codes"][name] = read_rc(w, name)

    selftest = load(os.path.join(w, "selftest.json"))
    if selftest is not None:
        res["selftest"] = {"passed": all(t["passed"] for t in selftest), "tests": selftest}

    for key in ["check", "check_transformer"]:
        s = summarize_check(load(os.path.join(w, key + ".json")))
        if s is not None:
            res[key] = s

    for key, suffix, config in [("train_compare", "", "validation/gpu/train_small.toml"),
                                ("train_compare_transformer", "_transformer", "validation/gpu/train_transformer.toml")]:
        t = train_compare(w, "train%s_cpu" % suffix, "train%s_gpu" % suffix, config)
        if t is not None:
            res[key] = t

    bench = {}
    for name in BENCH:
        b = load(os.path.join(w, name + ".json"))
        if b is not None:
            ls = b.pop("losses", None)
            if ls:
                b["loss_first"], b["loss_last"] = ls[0], ls[-1]
            bench[name] = b
    res["bench"] = bench

    def med(name):
        b = bench.get(name)
        if not b or b.get("ok") is False:
            return None
        return b.get("median_step_ms")

    ratios = {}
    for arch in ["", "_transformer"]:
        for other, prec in [("torch_eager", "f32"), ("torch_eager", "tf32"), ("torch_compile", "f32")]:
            ours, ref = med("ours%s_%s" % (arch, prec)), med("%s%s_%s" % (other, arch, prec))
            if ours and ref:
                ratios["ours_over_%s%s_%s" % (other, arch, prec)] = ours / ref
    res["step_time_ratios"] = ratios
    for arch in ["", "_transformer"]:
        r = ratios.get("ours_over_torch_eager%s_f32" % arch)
        res["ours_not_slower_than_eager%s_f32" % arch] = r <= 1.0 if r is not None else None
    res["mfu"] = {name: bench_mfu(b) for name, b in bench.items()}
    res["mfu_peak_tflops"] = {name: bench_peak(b) for name, b in bench.items()}
    res["mfu_note"] = ("model FLOPs utilization: matrix-product FLOPs of the step (forward x 3) over the median "
                       "step time, divided by the data-sheet dense peak of the precision used (f32 CUDA cores "
                       "or TF32 tensor cores); the same FLOP count for ours and PyTorch")

    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results-%s.json" % slug)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=2)

    print("results: %s" % path)
    print("gpu: %s" % gpu)
    if "selftest" in res:
        for t in res["selftest"]["tests"]:
            print("selftest %-45s %s  error %.2e" % (t["name"], "PASS" if t["passed"] else "FAIL", t["error"]))
    for key in ["check", "check_transformer"]:
        for c in res.get(key, {}).get("configs", []):
            print("%s %-45s %s  max grad rel err %s  param after step %s  load diff %s" % (
                key, os.path.basename(c["config"] or "?"), "PASS" if c["passed"] else "FAIL",
                num(c["max_grad_rel_err"]), num(c["max_param_rel_err_after_step"]),
                num(c["load_max_abs_diff"], "%.1e")))
    for key in ["train_compare", "train_compare_transformer"]:
        if key in res:
            t = res[key]
            print("%s %d steps: final loss cpu %.6e gpu %.6e, max rel diff %.2e" % (
                key, t["records"], t["final_loss_cpu"], t["final_loss_gpu"], t["max_rel_diff_per_step_loss"]))
    for name, b in bench.items():
        if b.get("ok") is False:
            print("%-30s failed: %s" % (name, (b.get("error") or "")[:200]))
        else:
            m = res["mfu"].get(name)
            print("%-30s median %8.2f ms  %7.1f TFLOP/s  MFU %s" % (
                name, b.get("median_step_ms", float("nan")), b.get("achieved_tflops", float("nan")),
                "%.1f%%" % (100 * m) if m is not None else "n/a"))
    for k, v in ratios.items():
        print("%s = %.3f" % (k, v))


if __name__ == "__main__":
    main()
