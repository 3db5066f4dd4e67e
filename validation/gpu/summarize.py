"""Collects the outputs of validation/gpu/run.sh into one results-<gpu>.json and prints a short table.
Standard library only."""

import argparse
import json
import os
import re


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
    for name in ["probe", "selftest", "check", "train_cpu", "train_gpu", "ours_f32", "torch_eager_f32", "ours_tf32",
                 "torch_eager_tf32", "torch_compile_f32"]:
        res["exit_codes"][name] = read_rc(w, name)

    selftest = load(os.path.join(w, "selftest.json"))
    if selftest is not None:
        res["selftest"] = {"passed": all(t["passed"] for t in selftest), "tests": selftest}

    check = load(os.path.join(w, "check.json"))
    if check is not None:
        res["check"] = {
            "tolerance": check[0]["tolerance"] if check else None,
            "passed": all(c["passed"] for c in check),
            "configs": [{k: c[k] for k in ("config", "passed", "loss_cpu", "loss_gpu", "loss_rel_diff",
                                           "prediction_rel_err", "load_max_abs_diff", "max_grad_rel_err",
                                           "max_param_rel_err_after_step", "loss_after_step_cpu",
                                           "loss_after_step_gpu")} for c in check],
            "details": check,
        }

    cpu = losses(os.path.join(w, "train_cpu", "metrics.jsonl"))
    gpu_l = losses(os.path.join(w, "train_gpu", "metrics.jsonl"))
    if cpu and gpu_l:
        n = min(len(cpu), len(gpu_l))
        rel = [abs(g - c) / max(abs(c), 1e-30) for c, g in zip(cpu[:n], gpu_l[:n])]
        res["train_compare"] = {
            "config": "validation/gpu/train_small.toml",
            "records": n,
            "final_loss_cpu": cpu[n - 1],
            "final_loss_gpu": gpu_l[n - 1],
            "max_rel_diff_per_step_loss": max(rel),
            "summary_cpu": load(os.path.join(w, "train_cpu", "summary.json")),
            "summary_gpu": load(os.path.join(w, "train_gpu", "summary.json")),
        }

    bench = {}
    for name in ["ours_f32", "torch_eager_f32", "ours_tf32", "torch_eager_tf32", "torch_compile_f32"]:
        b = load(os.path.join(w, name + ".json"))
        if b is not None:
            b.pop("losses", None)
            bench[name] = b
    res["bench"] = bench

    def med(name):
        b = bench.get(name)
        if not b or b.get("ok") is False:
            return None
        return b.get("median_step_ms")

    ratios = {}
    for prec in ["f32", "tf32"]:
        ours, eager = med("ours_" + prec), med("torch_eager_" + prec)
        if ours and eager:
            ratios["ours_over_torch_eager_" + prec] = ours / eager
    if med("ours_f32") and med("torch_compile_f32"):
        ratios["ours_over_torch_compile_f32"] = med("ours_f32") / med("torch_compile_f32")
    res["step_time_ratios"] = ratios
    res["ours_not_slower_than_eager_f32"] = (ratios["ours_over_torch_eager_f32"] <= 1.0
                                             if "ours_over_torch_eager_f32" in ratios else None)
    res["mfu"] = {name: bench[name].get("mfu") for name in ["ours_f32", "ours_tf32"] if name in bench}
    peak = {name: bench[name].get("peak_tflops") for name in ["ours_f32", "ours_tf32"] if name in bench}
    for prec, name in [("f32", "torch_eager_f32"), ("tf32", "torch_eager_tf32"), ("f32", "torch_compile_f32")]:
        b = bench.get(name)
        pk = peak.get("ours_" + prec)
        if b and b.get("achieved_tflops") and pk:
            res["mfu"][name] = b["achieved_tflops"] / pk
    res["mfu_note"] = ("model FLOPs utilization: matrix-product FLOPs of the step (forward x 3) over the median "
                       "step time, divided by the data-sheet dense peak of the precision used (f32 CUDA cores "
                       "or TF32 tensor cores)")

    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "results-%s.json" % slug)
    with open(path, "w") as fh:
        json.dump(res, fh, indent=2)

    print("results: %s" % path)
    print("gpu: %s" % gpu)
    if "selftest" in res:
        for t in res["selftest"]["tests"]:
            print("selftest %-45s %s  error %.2e" % (t["name"], "PASS" if t["passed"] else "FAIL", t["error"]))
    if "check" in res:
        for c in res["check"]["configs"]:
            print("check %-45s %s  max grad rel err %.2e  param after step %.2e  load diff %.1e" % (
                os.path.basename(c["config"]), "PASS" if c["passed"] else "FAIL", c["max_grad_rel_err"],
                c["max_param_rel_err_after_step"], c["load_max_abs_diff"]))
    if "train_compare" in res:
        t = res["train_compare"]
        print("train 50 steps: final loss cpu %.6e gpu %.6e, max rel diff %.2e" % (
            t["final_loss_cpu"], t["final_loss_gpu"], t["max_rel_diff_per_step_loss"]))
    for name, b in bench.items():
        if b.get("ok") is False:
            print("%-18s failed: %s" % (name, b.get("error", "")[:200]))
        else:
            print("%-18s median %8.2f ms  %7.1f TFLOP/s" % (name, b.get("median_step_ms", float("nan")),
                                                          b.get("achieved_tflops", float("nan"))))
    for k, v in ratios.items():
        print("%s = %.3f" % (k, v))
    for k, v in res["mfu"].items():
        if v is not None:
            print("MFU %s = %.1f%%" % (k, 100 * v))


if __name__ == "__main__":
    main()
