//! Run outputs of `moe-dmft solve`, laid out like those of `train` so that a DMFT curve and a
//! finite-network curve load the same way: `config.toml` (resolved), `metrics.jsonl` (one object per
//! step with `step` and `loss`), `summary.json`, the task (`task_x.npy`, `task_y.npy`) and arrays.

use std::path::Path;

use ndarray::{s, Array2};
use ndarray_npy::WriteNpyExt;
use serde_json::json;

use super::{Solution, SolveConfig, LOAD_QUANTILES};
use crate::data::Task;
use crate::Error;

/// The loss convention stated in every summary.
pub const LOSS_CONVENTION: &str =
    "0.5 * mean over samples of (f - y)^2 (summed over outputs); the SGD step uses the gradient of that mean";

fn write_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn write_npy<A: WriteNpyExt>(dir: &Path, name: &str, array: &A) -> crate::Result<()> {
    crate::files::write_npy(&dir.join(name), array)
}

fn write_text(dir: &Path, name: &str, text: &str) -> crate::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(write_err(&path))
}

/// One `metrics.jsonl` object for step `t`.
pub fn metrics_line(sol: &Solution, t: usize) -> serde_json::Value {
    let (_, p, o) = sol.predictions.dim();
    let depth = sol.thresholds.dim().1;
    let pred: Vec<f64> = sol
        .predictions
        .slice(s![t, .., ..])
        .iter()
        .copied()
        .collect();
    let q: Vec<Vec<f64>> = (0..depth)
        .map(|l| sol.thresholds.slice(s![t, l, ..]).to_vec())
        .collect();
    let q_err: Option<Vec<Vec<f64>>> = sol
        .thresholds_err
        .as_ref()
        .map(|e| (0..depth).map(|l| e.slice(s![t, l, ..]).to_vec()).collect());
    let quantiles: Vec<Vec<f64>> = (0..depth)
        .map(|l| sol.load_quantiles.slice(s![t, l, ..]).to_vec())
        .collect();
    json!({
        "step": t,
        "loss": sol.loss[t],
        "loss_err": sol.loss_err.as_ref().map(|e| e[t]),
        "predictions": if o == 1 { json!(pred) } else { json!(pred.chunks(o).map(|c| c.to_vec()).collect::<Vec<_>>()) },
        "q": if depth == 1 { json!(q[0]) } else { json!(q) },
        "q_err": q_err.map(|v| if depth == 1 { json!(v[0]) } else { json!(v) }),
        "load": {
            "relative_load_quantile_levels": LOAD_QUANTILES,
            "relative_load_quantiles": if depth == 1 { json!(quantiles[0]) } else { json!(quantiles) },
            "cv": sol.load_cv.row(t).to_vec(),
            "dropped": sol.dropped.row(t).to_vec(),
        },
        "points": p,
    })
}

/// The `summary.json` object.
pub fn summary(cfg: &SolveConfig, sol: &Solution) -> serde_json::Value {
    let (loss, err) = sol.final_loss();
    json!({
        "kind": "dmft",
        "status": "ok",
        "final_loss": loss,
        "final_loss_err": err,
        "steps": cfg.steps,
        "depth": cfg.depth,
        "kappa": cfg.kappa,
        "resolution": cfg.resolution,
        "error_bars": "standard error of the mean over independent repeats (null with one repeat)",
        "loss_convention": LOSS_CONVENTION,
        "wall_s": sol.wall_s,
        "arrays": {
            "predictions.npy": "(T+1, P) predictions f_mu(t) for one output, (T+1, P, O) otherwise; mean over repeats",
            "predictions_err.npy": "standard error of predictions (with >= 2 repeats)",
            "loss_repeats.npy": "(repeats, T+1) loss of every repeat",
            "kernels.npy": "(T+1, L+1, P, P) residual-stream kernels <h^l_mu, h^l_nu>/N, l = 0 is the input layer",
            "moe_kernels.npy": "(T+1, L, P, P) MoE-output kernels <m^l_mu, m^l_nu>/N",
            "coordinates.npy": "(T+1, L+1, P, K) residual-stream coordinates H^l_mu(t) in the orthonormal frame of docs/theory.md §2; two-time kernels Phi^l(t, s) = H^l(t) H^l(s)^T",
            "backward_coordinates.npy": "(T, L+1, P, K) backward coordinates Delta^l_mu(t) = N dL/dh^l_mu in the frame; gradient kernels are their inner products",
            "thresholds.npy": "(T+1, L, P) routing thresholds q^l_mu(t)",
            "load_quantiles.npy": "(T+1, L, 7) quantiles over experts of load_e/kappa (load_e: fraction of samples routed to e) at levels 0, .1, .25, .5, .75, .9, 1",
        },
    })
}

/// Writes every output of a solve into `dir` (created if missing).
pub fn write_outputs(
    dir: &Path,
    cfg: &SolveConfig,
    task: &Task,
    sol: &Solution,
) -> crate::Result<()> {
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let resolved = toml::to_string(cfg)
        .map_err(|e| Error::Internal(format!("cannot serialize the config: {e}")))?;
    write_text(dir, "config.toml", &resolved)?;
    let mut lines = String::new();
    for t in 0..sol.loss.len() {
        lines.push_str(&metrics_line(sol, t).to_string());
        lines.push('\n');
    }
    write_text(dir, "metrics.jsonl", &lines)?;
    let text = serde_json::to_string_pretty(&summary(cfg, sol))
        .map_err(|e| Error::Internal(e.to_string()))?;
    write_text(dir, "summary.json", &text)?;
    write_npy(dir, "task_x.npy", &task.x)?;
    write_npy(dir, "task_y.npy", &task.y)?;
    let (t1, p, o) = sol.predictions.dim();
    if o == 1 {
        write_npy(
            dir,
            "predictions.npy",
            &sol.predictions
                .clone()
                .into_shape_with_order((t1, p))
                .expect("contiguous"),
        )?;
        if let Some(e) = &sol.predictions_err {
            write_npy(
                dir,
                "predictions_err.npy",
                &e.clone()
                    .into_shape_with_order((t1, p))
                    .expect("contiguous"),
            )?;
        }
    } else {
        write_npy(dir, "predictions.npy", &sol.predictions)?;
        if let Some(e) = &sol.predictions_err {
            write_npy(dir, "predictions_err.npy", e)?;
        }
    }
    let losses = Array2::from_shape_fn((sol.repeats.len(), t1), |(r, t)| sol.repeats[r].loss[t]);
    write_npy(dir, "loss_repeats.npy", &losses)?;
    write_npy(dir, "kernels.npy", &sol.kernels)?;
    write_npy(dir, "moe_kernels.npy", &sol.moe_kernels)?;
    write_npy(dir, "thresholds.npy", &sol.thresholds)?;
    write_npy(dir, "coordinates.npy", &sol.coordinates)?;
    write_npy(dir, "backward_coordinates.npy", &sol.backward_coordinates)?;
    write_npy(dir, "load_quantiles.npy", &sol.load_quantiles)?;
    Ok(())
}

/// Records a diverged run: `summary.json` with status `diverged` and the step.
pub fn write_diverged(
    dir: &Path,
    cfg: &SolveConfig,
    step: usize,
    reason: &str,
) -> crate::Result<()> {
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let text = serde_json::to_string_pretty(&json!({
        "kind": "dmft",
        "status": "diverged",
        "diverged_at_step": step,
        "reason": reason,
        "steps": cfg.steps,
        "loss_convention": LOSS_CONVENTION,
    }))
    .map_err(|e| Error::Internal(e.to_string()))?;
    write_text(dir, "summary.json", &text)
}
