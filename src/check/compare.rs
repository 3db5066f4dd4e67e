//! Finite networks against the DMFT: the same MoE-ResNet task solved in the limit and trained at a
//! ladder of growing (N, M, n) at fixed kappa, in the mean-field SGD parameterization the solver
//! describes (router zero at init, ties broken at random). Compared: loss curves, the final
//! residual-stream kernel, routing thresholds and the expert-load distribution; each gap is fitted
//! against width (log-log slope, the rate at which finite networks approach the limit).

use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::fit::{self, PowerLawFit, SlopeFit};
use crate::data::{make_task, Task};
use crate::dmft::{solve, Solution, SolveConfig, LOAD_QUANTILES};
use crate::model::resnet::{MoeResNet, ResNetConfig};
use crate::model::{Batch, Model};
use crate::param::{Form, Optimizer, ParamConfig, Sizes};
use crate::train::optim::{Optimizer as _, Sgd};
use crate::{Error, Result};

/// What to compare: the solver's config (task, kappa, depth, gamma0, eta0, steps, resolution) and the
/// finite ladder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareSpec {
    pub solve: SolveConfig,
    /// (N, M, n) of each finite size; k = kappa * M.
    pub ladder: Vec<(usize, usize, usize)>,
    pub seeds: usize,
}

impl CompareSpec {
    pub fn sizes(&self) -> Result<Vec<Sizes>> {
        if self.ladder.len() < 2 {
            return Err(Error::invalid("compare.ladder", "needs at least 2 sizes"));
        }
        if self.seeds == 0 {
            return Err(Error::invalid("compare.seeds", "must be at least 1"));
        }
        self.ladder
            .iter()
            .map(|&(width, experts, expert_hidden)| {
                let k = self.solve.kappa * experts as f64;
                if width == 0 || experts == 0 || expert_hidden == 0 {
                    return Err(Error::invalid("compare.ladder", "sizes must be positive"));
                }
                if (k - k.round()).abs() > 1e-9 || k.round() < 1.0 {
                    return Err(Error::invalid("compare.ladder", format!("M = {experts} at kappa = {} gives no integer k >= 1", self.solve.kappa)));
                }
                Ok(Sizes { width, depth: self.solve.depth, experts, active: k.round() as usize, expert_hidden })
            })
            .collect()
    }
}

/// One finite network's trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FiniteRun {
    pub seed: u64,
    /// (T+1) losses.
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub loss: Vec<f64>,
    /// Final residual-stream kernel <h_L, h_L>/N, row-major P x P.
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub kernel: Vec<f64>,
    /// Final routing threshold of the last block per sample: midpoint of the k-th and (k+1)-th largest
    /// router logit (the (1 - kappa) quantile over experts).
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub thresholds: Vec<f64>,
    /// Final load quantiles (levels of [`LOAD_QUANTILES`]) of `load_e / kappa` in the last block.
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub load_quantiles: Vec<f64>,
}

/// Seed averages and gaps to the DMFT at one size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizeSummary {
    pub sizes: Sizes,
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub loss_mean: Vec<f64>,
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub loss_sem: Vec<f64>,
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub load_quantiles: Vec<f64>,
    /// Mean over steps of |L_finite(t) - L_dmft(t)|, relative to the mean DMFT loss (seed-averaged curve).
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub loss_gap: f64,
    /// Seed spread of the same gap (standard error over seeds of each seed's gap).
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub loss_gap_sem: f64,
    /// ||K_finite - K_dmft||_F / ||K_dmft||_F of the final residual kernel.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub kernel_gap: f64,
    /// RMS over samples of q_finite - q_dmft at the final step.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub threshold_gap: f64,
    /// max over quantile levels of |quantile_finite - quantile_dmft| of load_e/kappa at the final step.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub load_gap: f64,
    pub runs: Vec<FiniteRun>,
}

/// A gap against width: log-log slope (the convergence rate is minus the slope) and finite-size fit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GapFit {
    pub quantity: String,
    pub slope: Option<SlopeFit>,
    pub finite_size: Option<PowerLawFit>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DmftSummary {
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub loss: Vec<f64>,
    pub loss_err: Option<Vec<f64>>,
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub kernel: Vec<f64>,
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub thresholds: Vec<f64>,
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub load_quantiles: Vec<f64>,
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub wall_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareResult {
    pub spec: CompareSpec,
    pub dmft: DmftSummary,
    pub sizes: Vec<SizeSummary>,
    pub fits: Vec<GapFit>,
    /// Finite-size fit of the final loss against width: its limit `a` is the finite networks' own
    /// extrapolation, to set next to the DMFT's final loss.
    pub final_loss_fit: Option<PowerLawFit>,
}

/// The mean-field SGD parameterization of the solver at `sizes`.
pub fn mean_field_param(cfg: &SolveConfig) -> ParamConfig {
    ParamConfig {
        preset: "moe-completep".into(),
        optimizer: Optimizer::Sgd,
        form: Form::MeanField,
        lr: cfg.eta0,
        gamma0: cfg.gamma0,
        input_dim: cfg.task.input_dim,
        sigma_router: 0.0,
        ..ParamConfig::default()
    }
}

fn quantiles(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    LOAD_QUANTILES
        .iter()
        .map(|&p| {
            // Linear interpolation between order statistics.
            let x = p * (n - 1) as f64;
            let (i, f) = (x.floor() as usize, x.fract());
            if i + 1 < n {
                v[i] * (1.0 - f) + v[i + 1] * f
            } else {
                v[n - 1]
            }
        })
        .collect()
}

/// Trains one finite network in the mean-field form with full-batch SGD for `cfg.steps` steps.
pub fn train_finite(cfg: &SolveConfig, task: &Task, sizes: &Sizes, seed: u64) -> Result<FiniteRun> {
    let hp = mean_field_param(cfg).resolve(sizes)?;
    let mcfg = ResNetConfig {
        input_dim: cfg.task.input_dim,
        outputs: task.y.ncols(),
        sizes: *sizes,
        activation: cfg.activation,
        norm: false,
        routing: cfg.routing.clone(),
    };
    let mut model: MoeResNet<f64> = MoeResNet::new(&mcfg, &hp, &mut ChaCha8Rng::seed_from_u64(seed))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x7a11));
    let batch = Batch::Regression { x: task.x.clone(), y: task.y.clone() };
    let mut opt = Sgd::new(model.store(), &hp)?;
    let mut loss = Vec::with_capacity(cfg.steps + 1);
    let mut last_load = Vec::new();
    for _ in 0..cfg.steps {
        let out = model.loss_and_grad(&batch, &mut rng)?;
        loss.push(out.loss);
        if !out.loss.is_finite() {
            return Err(Error::Diverged { step: loss.len() - 1, reason: format!("finite network {sizes:?} seed {seed}") });
        }
        opt.step(model.store_mut(), &out.grads, 1.0)?;
        model.after_step(&out.load);
    }
    let out = model.loss_and_grad(&batch, &mut rng)?;
    loss.push(out.loss);
    if let Some(l) = out.load.last() {
        last_load = l.fraction.iter().map(|f| f * sizes.experts as f64).collect();
    }
    let probe = super::run::probe_resnet_light(&model, &task.x, &mut rng)?;
    let h = probe.residual;
    let kernel = h.dot(&h.t()) / sizes.width as f64;
    // Threshold between the k-th and (k+1)-th largest logit of each sample.
    let k = sizes.active;
    let thresholds: Vec<f64> = probe
        .last_logits
        .rows()
        .into_iter()
        .map(|row| {
            let mut v: Vec<f64> = row.to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            if k < v.len() {
                0.5 * (v[k - 1] + v[k])
            } else {
                v[v.len() - 1]
            }
        })
        .collect();
    Ok(FiniteRun { seed, loss, kernel: kernel.iter().copied().collect(), thresholds, load_quantiles: quantiles(last_load) })
}

fn rel_fro(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den.max(1e-300)).sqrt()
}

fn loss_gap(curve: &[f64], dmft: &[f64]) -> f64 {
    let scale = dmft.iter().sum::<f64>() / dmft.len() as f64;
    curve.iter().zip(dmft).map(|(a, b)| (a - b).abs()).sum::<f64>() / dmft.len() as f64 / scale
}

fn summarize_dmft(sol: &Solution) -> DmftSummary {
    let t = sol.loss.len() - 1;
    let l = sol.kernels.shape()[1] - 1;
    let blocks = sol.thresholds.shape()[1];
    DmftSummary {
        loss: sol.loss.to_vec(),
        loss_err: sol.loss_err.as_ref().map(|e| e.to_vec()),
        kernel: sol.kernels.slice(ndarray::s![t, l, .., ..]).iter().copied().collect(),
        thresholds: sol.thresholds.slice(ndarray::s![t, blocks - 1, ..]).to_vec(),
        load_quantiles: sol.load_quantiles.slice(ndarray::s![t, blocks - 1, ..]).to_vec(),
        wall_s: sol.wall_s,
    }
}

/// Solves the DMFT and trains every (size, seed) of the ladder (in parallel, collected in a fixed order).
pub fn run_compare(spec: &CompareSpec) -> Result<CompareResult> {
    let sizes = spec.sizes()?;
    spec.solve.validate()?;
    let task = make_task(&spec.solve.task)?;
    let sol = solve(&spec.solve, &task, None)?;
    let dmft = summarize_dmft(&sol);
    let jobs: Vec<(usize, u64)> = (0..sizes.len()).flat_map(|i| (0..spec.seeds as u64).map(move |s| (i, s))).collect();
    let runs: Vec<Result<FiniteRun>> = jobs.par_iter().map(|&(i, s)| train_finite(&spec.solve, &task, &sizes[i], s)).collect();
    let mut per_size: Vec<Vec<FiniteRun>> = vec![Vec::new(); sizes.len()];
    for (&(i, _), r) in jobs.iter().zip(runs) {
        per_size[i].push(r?);
    }
    let mut summaries = Vec::new();
    for (s, runs) in sizes.iter().zip(per_size) {
        let steps = dmft.loss.len();
        let stats: Vec<(f64, f64)> = (0..steps).map(|t| fit::mean_and_sem(&runs.iter().map(|r| r.loss[t]).collect::<Vec<_>>())).collect();
        let loss_mean: Vec<f64> = stats.iter().map(|p| p.0).collect();
        let loss_sem: Vec<f64> = stats.iter().map(|p| p.1).collect();
        let mean_of = |f: &dyn Fn(&FiniteRun) -> &Vec<f64>| -> Vec<f64> {
            let n = f(&runs[0]).len();
            (0..n).map(|j| runs.iter().map(|r| f(r)[j]).sum::<f64>() / runs.len() as f64).collect()
        };
        let kernel = mean_of(&|r| &r.kernel);
        let thresholds = mean_of(&|r| &r.thresholds);
        let load_quantiles = mean_of(&|r| &r.load_quantiles);
        let per_seed_gaps: Vec<f64> = runs.iter().map(|r| loss_gap(&r.loss, &dmft.loss)).collect();
        let threshold_gap = (thresholds.iter().zip(&dmft.thresholds).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / thresholds.len() as f64).sqrt();
        let load_gap = load_quantiles.iter().zip(&dmft.load_quantiles).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        summaries.push(SizeSummary {
            sizes: *s,
            loss_gap: loss_gap(&loss_mean, &dmft.loss),
            loss_gap_sem: fit::mean_and_sem(&per_seed_gaps).1,
            kernel_gap: rel_fro(&kernel, &dmft.kernel),
            threshold_gap,
            load_gap,
            loss_mean,
            loss_sem,
            load_quantiles,
            runs,
        });
    }
    let x: Vec<f64> = sizes.iter().map(|s| s.width as f64).collect();
    let gap_fit = |name: &str, f: &dyn Fn(&SizeSummary) -> f64| -> GapFit {
        let y: Vec<f64> = summaries.iter().map(f).collect();
        GapFit {
            quantity: name.into(),
            slope: fit::loglog_slope(&x, &y).ok(),
            finite_size: if x.len() >= 4 { fit::fit_power_correction(&x, &y, None).ok() } else { None },
        }
    };
    let fits = vec![
        gap_fit("loss_gap", &|s| s.loss_gap),
        gap_fit("kernel_gap", &|s| s.kernel_gap),
        gap_fit("threshold_gap", &|s| s.threshold_gap),
        gap_fit("load_gap", &|s| s.load_gap),
    ];
    let finals: Vec<f64> = summaries.iter().map(|s| *s.loss_mean.last().unwrap_or(&f64::NAN)).collect();
    let sems: Vec<f64> = summaries.iter().map(|s| *s.loss_sem.last().unwrap_or(&0.0)).collect();
    let final_loss_fit = if x.len() >= 4 { fit::fit_power_correction(&x, &finals, Some(&sems)).ok() } else { None };
    Ok(CompareResult { spec: spec.clone(), dmft, sizes: summaries, fits, final_loss_fit })
}

impl CompareResult {
    /// Markdown table of final losses and gaps per size, the DMFT line and the fitted rates.
    pub fn table(&self) -> String {
        let (dl, de) = (self.dmft.loss.last().copied().unwrap_or(f64::NAN), self.dmft.loss_err.as_ref().and_then(|e| e.last().copied()));
        let mut out = format!(
            "DMFT final loss {dl:.5}{} ({} expert x {} neuron sites, {} repeats, {:.1} s)\n\n",
            de.map(|e| format!(" ± {e:.5}")).unwrap_or_default(),
            self.spec.solve.resolution.expert_samples,
            self.spec.solve.resolution.neuron_samples,
            self.spec.solve.resolution.repeats,
            self.dmft.wall_s
        );
        out.push_str("| N | M | k | n | final loss | loss gap | kernel gap | threshold gap | load gap |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
        for s in &self.sizes {
            let z = &s.sizes;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {:.5} ± {:.5} | {:.4} ± {:.4} | {:.4} | {:.4} | {:.3} |\n",
                z.width,
                z.experts,
                z.active,
                z.expert_hidden,
                s.loss_mean.last().unwrap_or(&f64::NAN),
                s.loss_sem.last().unwrap_or(&f64::NAN),
                s.loss_gap,
                s.loss_gap_sem,
                s.kernel_gap,
                s.threshold_gap,
                s.load_gap
            ));
        }
        out.push_str("\n| gap | log-log slope vs N | rate c of a + b N^-c | limit a |\n| --- | --- | --- | --- |\n");
        for f in &self.fits {
            let sl = f.slope.map(|s| format!("{:+.2} ± {:.2}", s.slope, s.err)).unwrap_or_else(|| "—".into());
            let (c, a) = match f.finite_size.filter(super::coord::identified) {
                Some(p) => (format!("{:.2} ± {:.2}", p.c, p.c_err), format!("{:.2e} ± {:.1e}", p.a, p.a_err)),
                None => ("—".into(), "—".into()),
            };
            out.push_str(&format!("| {} | {} | {} | {} |\n", f.quantity, sl, c, a));
        }
        if let Some(f) = &self.final_loss_fit {
            out.push_str(&format!(
                "\nFinal loss extrapolated from the finite ladder (a + b N^-c): a = {:.5} ± {:.5}, c = {:.2} ± {:.2}; DMFT {dl:.5}\n",
                f.a, f.a_err, f.c, f.c_err
            ));
        }
        out
    }
}

/// Residual stream and last block's router logits of a forward pass (no per-expert preactivations:
/// cheap enough for large ladders).
pub struct LightProbe {
    pub residual: Array2<f64>,
    pub last_logits: Array2<f64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dmft::Resolution;

    #[test]
    fn quantiles_interpolate() {
        let q = quantiles(vec![4.0, 0.0, 2.0, 1.0, 3.0]);
        assert_eq!(q, vec![0.0, 0.4, 1.0, 2.0, 3.0, 3.6, 4.0]);
    }

    #[test]
    fn small_ladder_approaches_dmft() {
        let solve = SolveConfig { steps: 8, resolution: Resolution { expert_samples: 256, neuron_samples: 64, repeats: 2 }, ..SolveConfig::default() };
        let spec = CompareSpec { solve, ladder: vec![(32, 8, 16), (128, 32, 64)], seeds: 2 };
        let r = run_compare(&spec).unwrap();
        assert_eq!(r.sizes.len(), 2);
        assert_eq!(r.dmft.loss.len(), 9);
        // The larger network is closer to the limit in its kernel and its load distribution (the loss
        // gap at 2 seeds and 8 steps is within the seed noise at these sizes).
        assert!(r.sizes[1].kernel_gap < r.sizes[0].kernel_gap, "{}", r.table());
        assert!(r.sizes[1].load_gap < r.sizes[0].load_gap, "{}", r.table());
        assert!(r.sizes.iter().all(|s| s.loss_gap.is_finite() && s.loss_gap < 0.5), "{}", r.table());
        // Deterministic (the solver's wall time aside).
        let again = run_compare(&spec).unwrap();
        assert_eq!((&r.sizes, &r.dmft.loss, &r.fits), (&again.sizes, &again.dmft.loss, &again.fits));
    }
}
