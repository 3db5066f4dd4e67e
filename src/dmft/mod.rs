//! The DMFT of MoE-ResNet blocks in the joint limit `N, M, n -> infinity` at fixed `kappa = k/M`
//! (P, D, T and the depth L finite), under full-batch gradient descent with the mean-field SGD
//! parameterization of SPEC §4. The derivation is docs/theory.md; every equation there names the
//! function here that computes it.
//!
//! This module owns the solver's config ([`SolveConfig`]), the Monte Carlo solver ([`solve`]), the
//! deterministic kernel integrator of the exactly solvable case ([`exact`]) and the run outputs
//! ([`output`]) shared by `moe-dmft solve` and the `compare` command.

pub mod config;
pub mod exact;
pub mod output;
mod solver;

use ndarray::{Array1, Array2, Array3, Array4, Axis};

pub use config::{LrScale, Resolution, SolveConfig, TieJitter};
pub use solver::{Progress, Trace, LOAD_QUANTILES};

use crate::data::Task;

/// The solution: per-repeat trajectories, and their means with Monte Carlo error bars (standard
/// errors over repeats; `None` with a single repeat).
#[derive(Debug, Clone)]
pub struct Solution {
    pub repeats: Vec<Trace>,
    /// (T+1): mean loss over repeats.
    pub loss: Array1<f64>,
    /// (T+1): standard error of the mean loss over repeats; `None` with a single repeat.
    pub loss_err: Option<Array1<f64>>,
    /// (T+1, P, O): mean predictions.
    pub predictions: Array3<f64>,
    pub predictions_err: Option<Array3<f64>>,
    /// (T+1, L+1, P, P): mean residual-stream kernels.
    pub kernels: Array4<f64>,
    /// (T+1, L, P, P): mean MoE-output kernels.
    pub moe_kernels: Array4<f64>,
    /// (T+1, L+1, P, K): mean residual-stream coordinates (two-time kernels: `H(t) H(s)^T`).
    pub coordinates: Array4<f64>,
    /// (T, L+1, P, K): mean backward coordinates (gradient kernels: `Delta(t) Delta(s)^T`).
    pub backward_coordinates: Array4<f64>,
    /// (T+1, L, P): mean thresholds q_mu(t).
    pub thresholds: Array3<f64>,
    pub thresholds_err: Option<Array3<f64>>,
    /// (T+1, L, 7): mean load quantiles (levels [`LOAD_QUANTILES`]) of `load_e / kappa`.
    pub load_quantiles: Array3<f64>,
    /// (T+1, L): mean coefficient of variation of the load over experts.
    pub load_cv: Array2<f64>,
    /// (T+1, L): mean fraction of assignments dropped by capacity.
    pub dropped: Array2<f64>,
    /// Wall time of the solve in seconds.
    pub wall_s: f64,
}

impl Solution {
    /// Final loss and its error bar (`None` with one repeat).
    pub fn final_loss(&self) -> (f64, Option<f64>) {
        let t = self.loss.len() - 1;
        (self.loss[t], self.loss_err.as_ref().map(|e| e[t]))
    }
}

/// Mean and standard error over the first axis of stacked repeats.
fn mean_err<D: ndarray::Dimension + ndarray::RemoveAxis>(
    stack: &ndarray::Array<f64, D>,
) -> (
    ndarray::Array<f64, D::Smaller>,
    Option<ndarray::Array<f64, D::Smaller>>,
) {
    let r = stack.len_of(Axis(0));
    let mean = stack.mean_axis(Axis(0)).expect("at least one repeat");
    if r < 2 {
        return (mean, None);
    }
    let sd = stack.std_axis(Axis(0), 1.0);
    (mean, Some(sd / (r as f64).sqrt()))
}

fn stack<D: ndarray::Dimension>(
    items: Vec<ndarray::ArrayView<f64, D>>,
) -> ndarray::Array<f64, D::Larger> {
    ndarray::stack(Axis(0), &items).expect("repeats have equal shapes")
}

/// Solves the DMFT on `task` with the resolution of `cfg`. Deterministic for a given config (the
/// thread count does not change the result: every site has its own random stream and reductions run
/// in a fixed order). `observer` sees every step of every repeat.
pub fn solve(
    cfg: &SolveConfig,
    task: &Task,
    mut observer: Option<&mut (dyn FnMut(&Progress) + Send)>,
) -> crate::Result<Solution> {
    cfg.validate()?;
    let start = std::time::Instant::now();
    let mut run = || -> crate::Result<Vec<Trace>> {
        (0..cfg.resolution.repeats)
            .map(|r| solver::solve_repeat(cfg, task, r, &mut observer))
            .collect()
    };
    let traces = match cfg.threads {
        Some(n) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .map_err(|e| crate::Error::Internal(format!("cannot build a thread pool: {e}")))?;
            pool.install(run)?
        }
        None => run()?,
    };
    let loss_stack = stack(
        traces
            .iter()
            .map(|t| ndarray::ArrayView1::from(&t.loss[..]))
            .collect(),
    );
    let (loss, loss_err) = mean_err(&loss_stack);
    let (predictions, predictions_err) = mean_err(&stack(
        traces.iter().map(|t| t.predictions.view()).collect(),
    ));
    let (kernels, _) = mean_err(&stack(traces.iter().map(|t| t.kernels.view()).collect()));
    let (moe_kernels, _) = mean_err(&stack(
        traces.iter().map(|t| t.moe_kernels.view()).collect(),
    ));
    let (coordinates, _) = mean_err(&stack(
        traces.iter().map(|t| t.coordinates.view()).collect(),
    ));
    let (backward_coordinates, _) = mean_err(&stack(
        traces
            .iter()
            .map(|t| t.backward_coordinates.view())
            .collect(),
    ));
    let (thresholds, thresholds_err) =
        mean_err(&stack(traces.iter().map(|t| t.thresholds.view()).collect()));
    let (load_quantiles, _) = mean_err(&stack(
        traces.iter().map(|t| t.load_quantiles.view()).collect(),
    ));
    let (load_cv, _) = mean_err(&stack(traces.iter().map(|t| t.load_cv.view()).collect()));
    let (dropped, _) = mean_err(&stack(traces.iter().map(|t| t.dropped.view()).collect()));
    Ok(Solution {
        repeats: traces,
        loss,
        loss_err,
        predictions,
        predictions_err,
        kernels,
        moe_kernels,
        coordinates,
        backward_coordinates,
        thresholds,
        thresholds_err,
        load_quantiles,
        load_cv,
        dropped,
        wall_s: start.elapsed().as_secs_f64(),
    })
}
