//! Gradient checks: hand-written backward passes against central finite differences in f64.
//!
//! For every checked entry `x_i` of a parameter, the numeric derivative is the fourth-order central
//! difference
//!
//! `n_i = (8 (J(x + eps e_i) - J(x - eps e_i)) - (J(x + 2 eps e_i) - J(x - 2 eps e_i))) / (12 eps)`
//!
//! (truncation error O(eps^4), so eps can be large enough that round-off, about `1e-16 |J| / eps`, stays
//! near 1e-12; the plain two-point difference at eps = 1e-6 leaves an absolute noise of ~1e-10, which is a
//! relative 1e-5 on the small entries of a tensor). The error is reported as
//!
//! `rel_i = |a_i - n_i| / max(|a_i|, |n_i|, floor)`
//!
//! where `a_i` is the analytic gradient. The floor keeps entries whose true gradient is (nearly) zero
//! from turning round-off into a large relative error; with the defaults (`eps = 1e-4`,
//! `floor = 1e-8`) an entry of size 1e-8 must still agree to 1e-13 in absolute terms.
//!
//! Routing is piecewise constant in the weights: every evaluation re-seeds the routing rng with the
//! same seed so random tie-breaking draws the same jitter at `x`, `x + eps` and `x - eps`, and the
//! check uses weights without exact ties (a nonzero router) so `eps` does not flip a selection. Use a
//! smooth activation (tanh, gelu): ReLU kinks spoil finite differences.

use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Batch, Grads, Model, ParamStore};
use crate::param::Group;

/// Settings of a finite-difference check.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradCheckOptions {
    /// Step of the central difference (the stencil reaches +-2 eps).
    pub eps: f64,
    /// Floor of the denominator of the relative error.
    pub floor: f64,
    /// At most this many entries per tensor are checked (a seeded random subset when larger).
    pub max_entries: usize,
    /// Seed of the entry subset and of the routing rng used for every evaluation.
    pub seed: u64,
}

impl Default for GradCheckOptions {
    fn default() -> Self {
        GradCheckOptions { eps: 1e-4, floor: 1e-8, max_entries: 48, seed: 0 }
    }
}

/// Result for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamCheck {
    pub name: String,
    pub group: Group,
    /// Number of entries compared.
    pub checked: usize,
    pub max_rel_error: f64,
    pub max_abs_error: f64,
    /// Largest |analytic| among the checked entries (shows the check was not vacuous).
    pub max_abs_grad: f64,
}

/// Result for all checked tensors.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GradCheckReport {
    pub params: Vec<ParamCheck>,
}

impl GradCheckReport {
    /// Largest relative error over all tensors.
    pub fn max_rel_error(&self) -> f64 {
        self.params.iter().map(|p| p.max_rel_error).fold(0.0, f64::max)
    }

    /// One line per tensor, for test failure messages and logs.
    pub fn summary(&self) -> String {
        self.params
            .iter()
            .map(|p| {
                format!(
                    "{:<32} {:<12} n={:<4} max_rel={:.2e} max_abs={:.2e} max|grad|={:.2e}",
                    p.name,
                    p.group.name(),
                    p.checked,
                    p.max_rel_error,
                    p.max_abs_error,
                    p.max_abs_grad
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The groups that were checked (each once).
    pub fn groups(&self) -> Vec<Group> {
        let mut g: Vec<Group> = self.params.iter().map(|p| p.group).collect();
        g.sort();
        g.dedup();
        g
    }
}

/// Checks `analytic` (aligned with `store`) against central differences of `objective`, which is
/// evaluated on the store with one entry moved at a time (and restored afterwards).
pub fn check_store(
    store: &mut ParamStore<f64>,
    analytic: &Grads<f64>,
    mut objective: impl FnMut(&ParamStore<f64>) -> crate::Result<f64>,
    opts: &GradCheckOptions,
) -> crate::Result<GradCheckReport> {
    if analytic.len() != store.params.len() {
        return Err(crate::Error::Internal(format!(
            "gradient has {} tensors, the store {}",
            analytic.len(),
            store.params.len()
        )));
    }
    let mut pick_rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x9e37_79b9_7f4a_7c15);
    let mut report = GradCheckReport::default();
    for p in 0..store.params.len() {
        let len = store.params[p].value.len();
        if analytic[p].len() != len {
            return Err(crate::Error::Internal(format!("gradient of `{}` has the wrong size", store.params[p].name)));
        }
        let entries: Vec<usize> =
            if len <= opts.max_entries { (0..len).collect() } else { sample(&mut pick_rng, len, opts.max_entries).into_vec() };
        let mut check = ParamCheck {
            name: store.params[p].name.clone(),
            group: store.params[p].group,
            checked: entries.len(),
            max_rel_error: 0.0,
            max_abs_error: 0.0,
            max_abs_grad: 0.0,
        };
        for &i in &entries {
            let original = flat(&store.params[p].value, i);
            let mut at = |shift: f64, store: &mut ParamStore<f64>| -> crate::Result<f64> {
                set_flat(&mut store.params[p].value, i, original + shift * opts.eps);
                objective(store)
            };
            let (plus1, minus1) = (at(1.0, store)?, at(-1.0, store)?);
            let (plus2, minus2) = (at(2.0, store)?, at(-2.0, store)?);
            set_flat(&mut store.params[p].value, i, original);
            let numeric = (8.0 * (plus1 - minus1) - (plus2 - minus2)) / (12.0 * opts.eps);
            let a = flat(&analytic[p], i);
            let abs = (a - numeric).abs();
            let rel = abs / a.abs().max(numeric.abs()).max(opts.floor);
            // NaN must fail the check, so compare with `!(x <= max)`.
            if !(rel <= check.max_rel_error) {
                check.max_rel_error = if rel.is_nan() { f64::INFINITY } else { rel };
            }
            check.max_abs_error = check.max_abs_error.max(abs);
            check.max_abs_grad = check.max_abs_grad.max(a.abs());
        }
        report.params.push(check);
    }
    Ok(report)
}

/// Checks a whole model: the objective is `loss + aux_loss` of [`Model::loss_and_grad`] on `batch`,
/// with the routing rng re-seeded from `opts.seed` at every evaluation.
pub fn check_model<M: Model<f64>>(
    model: &mut M,
    batch: &Batch,
    opts: &GradCheckOptions,
) -> crate::Result<GradCheckReport> {
    let out = model.loss_and_grad(batch, &mut ChaCha8Rng::seed_from_u64(opts.seed))?;
    let analytic = out.grads;
    // The objective needs the model with the moved store; swap the store in and out around each call.
    let mut store = std::mem::take(model.store_mut());
    let report = check_store(
        &mut store,
        &analytic,
        |s| {
            *model.store_mut() = s.clone();
            let o = model.loss_and_grad(batch, &mut ChaCha8Rng::seed_from_u64(opts.seed))?;
            Ok(o.loss + o.aux_loss)
        },
        opts,
    );
    *model.store_mut() = store;
    report
}

fn flat(a: &ndarray::ArrayD<f64>, i: usize) -> f64 {
    match a.as_slice() {
        Some(s) => s[i],
        None => a.iter().nth(i).copied().unwrap_or(f64::NAN),
    }
}

fn set_flat(a: &mut ndarray::ArrayD<f64>, i: usize, v: f64) {
    if let Some(s) = a.as_slice_mut() {
        s[i] = v;
    } else if let Some(x) = a.iter_mut().nth(i) {
        *x = v;
    }
}
