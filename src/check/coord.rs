//! Coordinate checks: train a finite network at sizes spanning a decade along one axis, several seeds,
//! fixed base hyperparameters and steps, and measure how per-group quantities scale with the axis:
//! RMS of activations at initialization (`act.*`), RMS change after the steps (`delta.*`), and gradient
//! RMS per parameter group at initialization (`grad.*`). Each quantity gets a log-log slope with its
//! uncertainty, a finite-size fit `a + b * size^(-c)`, a predicted exponent and a verdict.
//!
//! The measurement itself (building and training a model at each size) lives in [`crate::check::run`];
//! this file holds the result types, the predictions and the analysis, which need no model.

use serde::{Deserialize, Serialize};

use crate::check::fit::{self, PowerLawFit, SlopeFit};
use crate::param::presets::Preset;
use crate::param::{Axis, Group, Optimizer, Resolved, Sizes, Table};
use crate::{Error, Result};

/// How the router is initialized in a coordinate check (SPEC §4 router-initialization ablation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouterInit {
    /// Whatever the parameterization says.
    #[default]
    Preset,
    /// Like a hidden layer reading the residual stream: same init std and multiplier scaling as
    /// `expert_up`, so router logits are Θ(1) at initialization at every width.
    HiddenLike,
    /// Like a readout: the hidden-like std divided by `sqrt(N/N0)`, so logits vanish like N^(-1/2).
    ReadoutLike,
    /// All zeros (ties at t = 0 broken at random).
    Zero,
}

impl RouterInit {
    pub const ALL: [RouterInit; 4] = [RouterInit::Preset, RouterInit::HiddenLike, RouterInit::ReadoutLike, RouterInit::Zero];

    pub fn name(self) -> &'static str {
        match self {
            RouterInit::Preset => "preset",
            RouterInit::HiddenLike => "hidden_like",
            RouterInit::ReadoutLike => "readout_like",
            RouterInit::Zero => "zero",
        }
    }

    pub fn from_name(name: &str) -> Option<RouterInit> {
        RouterInit::ALL.into_iter().find(|r| r.name() == name)
    }

    /// Applies this choice to a resolved parameterization (router init std only; LR and multiplier are
    /// the preset's, so the ablation isolates the initialization).
    pub fn apply(self, hp: &mut Resolved) {
        let hidden = {
            let up = hp.get(Group::ExpertUp);
            let router = hp.get(Group::Router);
            // Match the logit scale a hidden layer would have: std * multiplier equal to expert_up's.
            if router.multiplier != 0.0 {
                up.init_std * up.multiplier / router.multiplier
            } else {
                up.init_std
            }
        };
        let m_n = hp.sizes.width as f64 / hp.base.width as f64;
        let std = match self {
            RouterInit::Preset => return,
            RouterInit::HiddenLike => hidden,
            RouterInit::ReadoutLike => hidden / m_n.sqrt(),
            RouterInit::Zero => 0.0,
        };
        if let Some(g) = hp.groups.iter_mut().find(|g| g.group == Group::Router) {
            g.init_std = std;
        }
    }
}

/// The sizes at `value` along `axis`, starting from `base`:
/// `width` sets N = value and n = value * n0 / N0 (n/N fixed, so `N/(k n)` never grows);
/// `depth` sets L; `experts` sets M = value and k = value * kappa (must be an integer);
/// `expert_hidden` sets n at fixed N.
pub fn sizes_along(base: &Sizes, axis: Axis, value: usize) -> Result<Sizes> {
    base.along(axis, value, "coord.sizes")
}

/// The value of `axis` in `s` (the x of the fits).
pub fn axis_value(s: &Sizes, axis: Axis) -> usize {
    match axis {
        Axis::Width => s.width,
        Axis::Depth => s.depth,
        Axis::Experts => s.experts,
        Axis::ExpertHidden => s.expert_hidden,
    }
}

/// How a measured exponent compares with its prediction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Within the tolerance (or two standard errors) of the prediction.
    Agrees,
    /// Predicted Θ(1); the slope is off, but the finite-size fit has a non-zero limit `a`: the
    /// deviation is a correction that vanishes at the fitted rate `c`.
    FiniteSize,
    Disagrees,
    /// No prediction for this preset/axis/quantity: measured only.
    Measured,
    /// The quantity is zero (e.g. router logits of a zero-initialized router): nothing to fit.
    Zero,
    /// A run diverged (non-finite values at some size and seed): nothing to fit.
    Diverged,
}

/// The measurement and fits of one quantity along the axis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantityResult {
    pub name: String,
    /// values[seed][size].
    #[serde(deserialize_with = "crate::check::fit::nan::vec2")]
    pub values: Vec<Vec<f64>>,
    /// Seed mean and standard error at each size.
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub mean: Vec<f64>,
    #[serde(deserialize_with = "crate::check::fit::nan::vec")]
    pub sem: Vec<f64>,
    pub predicted: Option<Prediction>,
    pub slope: Option<SlopeFit>,
    /// Finite-size fit `y * x^(-p) = a + b * x^(-c)` of the seed mean compensated by the predicted
    /// exponent `p` ([`QuantityResult::fit_exponent`]): a limit `a > 0` resolved from zero means the
    /// prediction holds asymptotically and the deviation of the slope is a correction vanishing like
    /// `x^(-c)`.
    pub finite_size: Option<PowerLawFit>,
    /// The exponent `p` the finite-size fit compensates (the exact prediction; 0 without one).
    #[serde(default)]
    pub fit_exponent: f64,
    /// The rate `c` of `finite_size` was fixed at [`RANDOM_PART_RATE`] (the free rate was not resolved)
    /// rather than fitted.
    #[serde(default)]
    pub rate_fixed: bool,
    /// For `delta.*`: log-log slope of the change per unit initial residual, `delta / sqrt(2 loss.init)`
    /// per seed (when `loss.init` was measured).
    #[serde(default)]
    pub per_residual: Option<SlopeFit>,
    pub verdict: Verdict,
}

/// Relative size of the random-initialization part of a sum of x independent terms next to its learned
/// (coherent) part: x^(-1/2). The rate a finite-size fit falls back to when it cannot resolve its own.
pub const RANDOM_PART_RATE: f64 = 0.5;

/// What a coordinate check was asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordSpec {
    pub axis: Axis,
    pub preset: String,
    pub optimizer: Optimizer,
    /// Values along the axis (N, L, M or n).
    pub values: Vec<usize>,
    pub seeds: usize,
    pub steps: usize,
    /// Base learning rate (multiplies every group's LR).
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub lr: f64,
    pub base: Sizes,
    pub router_init: RouterInit,
    /// Tolerance on |measured - predicted| slope.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub tolerance: f64,
}

impl CoordSpec {
    pub fn validate(&self) -> Result<()> {
        if self.values.len() < 2 {
            return Err(Error::invalid("coord.sizes", "needs at least 2 sizes"));
        }
        if self.values.windows(2).any(|w| w[1] <= w[0]) {
            return Err(Error::invalid("coord.sizes", "must be strictly increasing"));
        }
        if self.seeds == 0 {
            return Err(Error::invalid("coord.seeds", "must be at least 1"));
        }
        if self.steps == 0 {
            return Err(Error::invalid("coord.steps", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::invalid("coord.lr", "must be finite and positive"));
        }
        if !(self.tolerance.is_finite() && self.tolerance > 0.0) {
            return Err(Error::invalid("coord.tolerance", "must be finite and positive"));
        }
        for v in &self.values {
            sizes_along(&self.base, self.axis, *v)?;
        }
        Ok(())
    }

    /// Ratio of the largest to the smallest size.
    pub fn span(&self) -> f64 {
        match (self.values.first(), self.values.last()) {
            (Some(a), Some(b)) => *b as f64 / *a as f64,
            _ => 1.0,
        }
    }
}

/// The result of one coordinate check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CoordResult {
    pub spec: CoordSpec,
    pub sizes: Vec<Sizes>,
    pub quantities: Vec<QuantityResult>,
}

impl CoordResult {
    pub fn get(&self, name: &str) -> Option<&QuantityResult> {
        self.quantities.iter().find(|q| q.name == name)
    }

    /// A short label: `preset/optimizer/axis[/router_init]`.
    pub fn label(&self) -> String {
        let mut s = format!("{}/{}/{}", self.spec.preset, optimizer_name(self.spec.optimizer), self.spec.axis.name());
        if self.spec.router_init != RouterInit::Preset {
            s.push('/');
            s.push_str(self.spec.router_init.name());
        }
        s
    }

    /// Markdown table: quantity, predicted exponent p, measured slope ± err, the compensated finite-size fit
/// `y x^-p = a + b x^-c` (where its rate is resolved), verdict.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{} — sizes {:?}, {} seeds, {} steps, lr {}\n\n",
            self.label(),
            self.spec.values,
            self.spec.seeds,
            self.spec.steps,
            self.spec.lr
        ));
        out.push_str("| quantity | predicted p | measured slope | y x^-p = a + b x^-c: a (limit) | c (rate) | verdict |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- |\n");
        for q in &self.quantities {
            let pred = match q.predicted {
                Some(p) if p.lower_bound => format!("≥ {:+.2}", p.value),
                Some(p) => format!("{:+.2}", p.value),
                None => "—".into(),
            };
            let mut slope = q.slope.map(|s| format!("{:+.3} ± {:.3}", s.slope, s.err)).unwrap_or_else(|| "—".into());
            if let (Some(r), true) = (q.per_residual, q.verdict != Verdict::Agrees) {
                slope.push_str(&format!(" (per residual {:+.3} ± {:.3})", r.slope, r.err));
            }
            let (a, c) = match q.finite_size {
                Some(f) if q.rate_fixed => (format!("{:.3e} ± {:.1e}", f.a, f.a_err), format!("{:.2} (fixed)", f.c)),
                Some(f) if identified(&f) => (format!("{:.3e} ± {:.1e}", f.a, f.a_err), format!("{:.2} ± {:.2}", f.c, f.c_err)),
                _ => ("—".into(), "—".into()),
            };
            out.push_str(&format!("| {} | {} | {} | {} | {} | {} |\n", q.name, pred, slope, a, c, verdict_name(q.verdict)));
        }
        out
    }
}

/// A finite-size fit whose rate is resolved: inside the searched range (not pinned at an end) with a
/// finite error smaller than the rate itself.
pub fn identified(f: &PowerLawFit) -> bool {
    let (lo, hi) = fit::RATE_RANGE;
    f.c > lo * 1.01 && f.c < hi * 0.99 && f.c_err.is_finite() && f.c_err < f.c
}

pub fn optimizer_name(o: Optimizer) -> &'static str {
    match o {
        Optimizer::Sgd => "sgd",
        Optimizer::Adam => "adam",
    }
}

pub fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Agrees => "agrees",
        Verdict::FiniteSize => "finite-size correction",
        Verdict::Disagrees => "DISAGREES",
        Verdict::Measured => "measured",
        Verdict::Zero => "zero",
        Verdict::Diverged => "diverged (NaN)",
    }
}

/// A predicted exponent: a value, or a lower bound (a violation of at least that size).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub value: f64,
    pub lower_bound: bool,
}

impl Prediction {
    fn exact(value: f64) -> Option<Prediction> {
        Some(Prediction { value, lower_bound: false })
    }
    fn at_least(value: f64) -> Option<Prediction> {
        Some(Prediction { value, lower_bound: true })
    }
}

/// Predicted exponent of `quantity` along `spec.axis`; `table` is the engine's full table (with
/// exponents) for the checked preset and form.
///
/// *Activations at initialization* (`act.*`) are power-counted from the engine's own init-variance and
/// multiplier exponents: a layer with fan-in F, init variance ∝ F^v' and multiplier ∝ m' has output RMS
/// ∝ sqrt(F · var) · mult (entries of a sum of F independent terms); the MoE output of k independent
/// random experts with gates renormalized over the active set is their average, hence a further
/// k^(-1/2) along `experts`; the residual stream is the larger of the embedding and the branch sum
/// `beta_L * sum_l m_l` of L independent random branches (∝ beta_L · sqrt(L)).
///
/// *Changes after the steps* (`delta.*`) are Θ(1) (slope 0) along every axis the preset claims to scale
/// (the engine's own list: `moe-completep` all four, `completep` width and depth, `mup` width). Along an
/// axis a preset leaves at SP, power counting under Adam (every entry moves by Θ(lr)) gives lower
/// bounds on the violation: a layer whose fan-in grows like the axis changes its output like the axis at
/// the first step (router logits and expert preactivations along width; MoE output along
/// `expert_hidden`), and without the 1/L branch multiplier the residual stream's change grows like L.
/// Later steps compound or saturate these, so they are checked as lower bounds (slope ≥ 1/2).
///
/// *Gradient RMS* per group is the engine's own prediction (its `grad_rms` exponents, which set Adam
/// epsilon) on the axes the preset scales; the engine says nothing about the others.
pub fn predicted_slope(spec: &CoordSpec, quantity: &str, table: &Table) -> Option<Prediction> {
    let axis = spec.axis;
    let scaled = Preset::by_name(&spec.preset).map(|p| p.scales(axis)).unwrap_or(false);
    if let Some(group) = quantity.strip_prefix("grad.") {
        return if scaled { table.row(group).and_then(|r| Prediction::exact(r.grad_rms.get(axis))) } else { None };
    }
    if let Some(group) = quantity.strip_prefix("grad_init.") {
        return if scaled { init_grad_slope(spec, group, table).and_then(Prediction::exact) } else { None };
    }
    // Exponents of the fan-ins along this axis.
    let fan_n = if axis == Axis::Width { 1.0 } else { 0.0 };
    let fan_h = if matches!(axis, Axis::Width | Axis::ExpertHidden) { 1.0 } else { 0.0 };
    let layer = |group: &str, fan: f64| -> Option<f64> {
        let e = table.row(group)?.exponents.get(axis);
        Some(0.5 * (fan + e.init_var) + e.multiplier)
    };
    let embedding = layer("embedding", 0.0)?;
    let expert_pre = embedding + layer("expert_up", fan_n)?;
    // ReLU and the other activations used here are Θ(1) on Θ(1) inputs and linear at scale for ReLU.
    let experts_avg = if axis == Axis::Experts { -0.5 } else { 0.0 };
    let moe_out = expert_pre + layer("expert_down", fan_h)? + experts_avg;
    let depth_sum = if axis == Axis::Depth { 0.5 } else { 0.0 };
    let residual = embedding.max(table.residual_exponents.get(axis) + moe_out + depth_sum);
    // Without a 1/L branch multiplier and without a norm, every block reads a stream that each block
    // before it has enlarged (h <- h + m(h) with m homogeneous in h): growth compounds along depth and is
    // no power law, so only a lower bound is predicted for what reads the stream.
    // Under SGD the engine initializes expert_down mean-field-like (std ∝ 1/n), so the branches start
    // small at the base size and no growth law is visible at L <= 16: no prediction there.
    if axis == Axis::Depth && table.residual_exponents.get(axis) == 0.0 && quantity.starts_with("act.") && quantity != "act.embedding" {
        return if spec.optimizer == Optimizer::Adam { Prediction::at_least(0.5) } else { None };
    }
    match quantity {
        "act.embedding" => return Prediction::exact(embedding),
        "act.expert_pre" => return Prediction::exact(expert_pre),
        "act.moe_out" => return Prediction::exact(moe_out),
        "act.residual" => return Prediction::exact(residual),
        "act.output" => return Prediction::exact(residual + layer("readout", fan_n)?),
        "act.router_logits" => {
            return match spec.router_init {
                RouterInit::Zero => None,
                RouterInit::HiddenLike => Prediction::exact(expert_pre),
                RouterInit::ReadoutLike => Prediction::exact(expert_pre - 0.5 * fan_n),
                RouterInit::Preset => Prediction::exact(embedding + layer("router", fan_n)?),
            };
        }
        _ => {}
    }
    if !quantity.starts_with("delta.") {
        return None;
    }
    if scaled {
        return Prediction::exact(0.0);
    }
    if spec.optimizer != Optimizer::Adam {
        return None;
    }
    match (axis, quantity) {
        (Axis::Width, "delta.router_logits" | "delta.expert_pre") => Prediction::at_least(0.5),
        (Axis::ExpertHidden, "delta.moe_out") => Prediction::at_least(0.3),
        (Axis::Depth, "delta.residual") => Prediction::at_least(0.5),
        _ => None,
    }
}

/// Predicted exponent of a group's gradient RMS at initialization, power-counted from the engine's
/// init-variance and multiplier exponents like the `act.*` predictions (every sum of F independent random
/// terms ∝ sqrt(F)). The engine's own `grad_rms` describes the learned regime, where each backward sum is
/// coherent; at initialization the sums that pair two independent random vectors are not:
/// - stream gradient per entry `delta_h = (f - y) * w_eff` (Θ(1) residual: `f` vanishes or stays Θ(1));
/// - readout: `mult * (f - y) * h`; embedding: `mult * delta_h * x` (the blocks' Jacobians are Θ(1));
/// - expert output gradient `delta_z = beta_L * g * delta_h` with gates `g ∝ 1/k`;
/// - expert_down: `mult * delta_z * phi(u)`;
/// - expert_up: `mult * (V^T delta_z) * a`, where `V^T delta_z` sums N terms of random sign:
///   `sqrt(N) * std_eff(V) * delta_z`;
/// - router: `mult * beta_L * g * (z_e - m) . delta_h * a`, where the N-term sum pairs the random expert
///   output `z_e` with the readout direction it is independent of: `sqrt(N) * z_e * delta_h`.
///
/// `None` where the power counting does not apply (a missing group; depth without a 1/L branch
/// multiplier, where growth compounds).
pub fn init_grad_slope(spec: &CoordSpec, group: &str, table: &Table) -> Option<f64> {
    let axis = spec.axis;
    if axis == Axis::Depth && table.residual_exponents.get(axis) == 0.0 {
        return None;
    }
    let fan_n = if axis == Axis::Width { 1.0 } else { 0.0 };
    let fan_h = if matches!(axis, Axis::Width | Axis::ExpertHidden) { 1.0 } else { 0.0 };
    let gate = if axis == Axis::Experts { -1.0 } else { 0.0 };
    let e = |g: &str| table.row(g).map(|r| *r.exponents.get(axis));
    let eff = |g: &str| e(g).map(|x| 0.5 * x.init_var + x.multiplier);
    let mult = |g: &str| e(g).map(|x| x.multiplier);
    let embedding = eff("embedding")?;
    let expert_pre = embedding + 0.5 * fan_n + eff("expert_up")?;
    let z = expert_pre + 0.5 * fan_h + eff("expert_down")?;
    let experts_avg = if axis == Axis::Experts { -0.5 } else { 0.0 };
    let beta = table.residual_exponents.get(axis);
    let depth_sum = if axis == Axis::Depth { 0.5 } else { 0.0 };
    let residual = embedding.max(beta + z + experts_avg + depth_sum);
    let delta_h = eff("readout")?;
    let delta_z = beta + gate + delta_h;
    Some(match group {
        "readout" | "unembedding" => mult(group)? + residual,
        "embedding" => mult("embedding")? + delta_h,
        "expert_down" => mult("expert_down")? + delta_z + expert_pre,
        "expert_up" => mult("expert_up")? + 0.5 * fan_n + eff("expert_down")? + delta_z + residual,
        "router" => mult("router")? + beta + gate + 0.5 * fan_n + z + delta_h + residual,
        _ => return None,
    })
}

/// A finite-size fit that supports "the prediction holds asymptotically": a positive limit more than two
/// standard errors from zero, a resolved rate, and a correction that no longer dominates at the largest
/// size (|b x_max^(-c)| < a), so a different exponent cannot pass as a slow correction.
pub fn supports_limit(f: &PowerLawFit, x_max: f64) -> bool {
    f.a > 0.0 && f.a_nonzero && identified(f) && (f.b * x_max.powf(-f.c)).abs() < f.a
}

/// The same for a fit at the random-initialization rate: a positive limit resolved from zero, a positive
/// correction (a random part adds to the RMS in quadrature, so it approaches the limit from above; a
/// quantity growing towards a limit is not this mechanism) smaller than the limit at the largest size, and
/// a model the data do not reject (reduced chi^2 below 4).
fn supports_limit_fixed(f: &PowerLawFit, x_max: f64) -> bool {
    let chi2_ok = f.dof == 0 || f.rss / f.dof as f64 <= 4.0;
    f.a > 0.0 && f.a_nonzero && f.b > 0.0 && chi2_ok && (f.b * x_max.powf(-f.c)).abs() < f.a
}

/// Exponent along `experts` of `sqrt(E sum_{e in S} g_e^2)`, the RMS of an average of independent random
/// expert outputs weighted by the gates, for router logits that are i.i.d. Gaussian with RMS `logit_rms`
/// at initialization: top-k selection (k = kappa M) and softmax renormalized over the active set, by Monte
/// Carlo (`draws` per size, fixed seed). With vanishing logits the gates are 1/k and the exponent is -1/2;
/// Θ(1) logits (a hidden-like router, SP) concentrate the gates on the largest logits, so the effective
/// number of averaged experts 1/sum g^2 grows like k only beyond a crossover `~ exp(logit_rms^2)`.
pub fn gate_average_exponent(values: &[usize], kappa: f64, logit_rms: f64, draws: usize, seed: u64) -> Option<f64> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, Normal};
    if values.len() < 2 || !(logit_rms.is_finite() && logit_rms >= 0.0) || draws == 0 {
        return None;
    }
    let normal = Normal::new(0.0, logit_rms.max(1e-12)).ok()?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut xs = Vec::new();
    let mut ys = Vec::new();
    for &m in values {
        let k = ((m as f64 * kappa).round() as usize).clamp(1, m);
        let mut sum = 0.0;
        let mut r = vec![0.0f64; m];
        for _ in 0..draws {
            r.iter_mut().for_each(|v| *v = normal.sample(&mut rng));
            r.sort_by(|a, b| b.total_cmp(a));
            let top = &r[..k];
            let w: Vec<f64> = top.iter().map(|v| (v - top[0]).exp()).collect();
            let z: f64 = w.iter().sum();
            sum += w.iter().map(|v| (v / z).powi(2)).sum::<f64>();
        }
        xs.push(m as f64);
        ys.push((sum / draws as f64).sqrt());
    }
    fit::loglog_slope(&xs, &ys).ok().map(|f| f.slope)
}

/// A quantity's verdict against its prediction, with the finite-size fit behind it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Judgement {
    pub finite_size: Option<PowerLawFit>,
    /// The predicted exponent p compensated in the fit `y x^-p = a + b x^-c` (0 without an exact prediction).
    pub fit_exponent: f64,
    /// The fit's rate was fixed at [`RANDOM_PART_RATE`] because the free rate was not resolved.
    pub rate_fixed: bool,
    pub verdict: Verdict,
}

/// Judges the seed means `mean` (± `sem`) at `spec.values`, with log-log `slope` and, for changes, the
/// slope per unit initial residual, against `predicted`: agreement within the tolerance (or two standard
/// errors), else a finite-size correction when the compensated fit supports the predicted limit (free
/// rate first, then the random-initialization rate), else a disagreement. Shared by every model's check.
pub fn judge(spec: &CoordSpec, mean: &[f64], sem: &[f64], slope: &SlopeFit, per_residual: Option<&SlopeFit>, predicted: Option<Prediction>) -> Judgement {
    let x: Vec<f64> = spec.values.iter().map(|v| *v as f64).collect();
    // Compensate the predicted exponent, so that the fitted limit is the prefactor of the predicted
    // power law and the correction is what is left.
    let p = match predicted {
        Some(Prediction { value, lower_bound: false }) => value,
        _ => 0.0,
    };
    let comp: Vec<f64> = x.iter().map(|v| v.powf(-p)).collect();
    let cmean: Vec<f64> = mean.iter().zip(&comp).map(|(m, c)| m * c).collect();
    let csem: Vec<f64> = sem.iter().zip(&comp).map(|(e, c)| e * c).collect();
    let mut finite_size = if x.len() >= 4 { fit::fit_power_correction(&x, &cmean, Some(&csem)).ok() } else { None };
    let x_max = x.last().copied().unwrap_or(1.0);
    let mut rate_fixed = false;
    let verdict = match predicted {
        None => Verdict::Measured,
        Some(Prediction { value, lower_bound: true }) => {
            if slope.slope >= value - spec.tolerance.min(2.0 * slope.err) {
                Verdict::Agrees
            } else {
                Verdict::Disagrees
            }
        }
        Some(Prediction { value, .. }) => {
            let close = |s: &SlopeFit| {
                let d = (s.slope - value).abs();
                d <= spec.tolerance || d <= 2.0 * s.err
            };
            if close(slope) {
                Verdict::Agrees
            } else if finite_size.is_some_and(|f| supports_limit(&f, x_max)) {
                Verdict::FiniteSize
            } else if per_residual.is_some_and(close) {
                // The change per unit initial residual scales as predicted; the residual |f0 - y| tends
                // to |y| > 0 as the random initial output f0 vanishes (or stays Θ(1)), so the change does too.
                Verdict::FiniteSize
            } else {
                // The free rate was not resolved: try the random-initialization rate.
                match fit::fit_power_correction_fixed_rate(&x, &cmean, Some(&csem), RANDOM_PART_RATE) {
                    Ok(f) if x.len() >= 4 && supports_limit_fixed(&f, x_max) => {
                        finite_size = Some(f);
                        rate_fixed = true;
                        Verdict::FiniteSize
                    }
                    _ => Verdict::Disagrees,
                }
            }
        }
    };
    Judgement { finite_size, fit_exponent: p, rate_fixed, verdict }
}

/// Fits and judges every quantity. `values[q][seed][size]` are the measurements of `names[q]`; `table`
/// is the engine's table of the checked preset (for its predicted exponents).
pub fn analyze(spec: &CoordSpec, names: &[String], values: Vec<Vec<Vec<f64>>>, table: &Table) -> Result<Vec<QuantityResult>> {
    let x: Vec<f64> = spec.values.iter().map(|v| *v as f64).collect();
    // Initial residual RMS sqrt(2 loss.init) per seed and size, for the per-residual slopes of `delta.*`.
    let residual0: Option<Vec<Vec<f64>>> = names
        .iter()
        .position(|n| n == "loss.init")
        .map(|i| values[i].iter().map(|s| s.iter().map(|l| (2.0 * l).sqrt()).collect()).collect());
    // RMS of the router logits at initialization (all seeds and sizes), for the gate-weighted average.
    let logit_rms: Option<f64> = names.iter().position(|n| n == "act.router_logits").map(|i| {
        let v: Vec<f64> = values[i].iter().flatten().copied().filter(|v| v.is_finite()).collect();
        if v.is_empty() {
            0.0
        } else {
            v.iter().sum::<f64>() / v.len() as f64
        }
    });
    let mut out = Vec::with_capacity(names.len());
    for (name, vals) in names.iter().zip(values) {
        let per_size: Vec<(f64, f64)> =
            (0..x.len()).map(|i| fit::mean_and_sem(&vals.iter().map(|s| s[i]).collect::<Vec<_>>())).collect();
        let mean: Vec<f64> = per_size.iter().map(|p| p.0).collect();
        let sem: Vec<f64> = per_size.iter().map(|p| p.1).collect();
        let mut predicted = predicted_slope(spec, name, table);
        // Along experts the MoE output at init is a gate-weighted average: its exponent is that of
        // sqrt(sum g^2) at the measured logit scale (-1/2 only when the logits vanish).
        if let (Axis::Experts, "act.moe_out", Some(rms), Some(p)) = (spec.axis, name.as_str(), logit_rms, predicted.as_mut()) {
            let kappa = spec.base.active as f64 / spec.base.experts as f64;
            if let Some(e) = gate_average_exponent(&spec.values, kappa, rms, 4000, 0x6a7e) {
                p.value = p.value + 0.5 + e;
            }
        }
        let positive = vals.iter().all(|s| s.iter().all(|v| v.is_finite() && *v > 0.0));
        let scale = mean.iter().map(|m| m.abs()).fold(0.0, f64::max);
        // Quantities at rounding level (e.g. logits of a zero router, 1e-300-ish) are reported as zero.
        let finite = vals.iter().all(|s| s.iter().all(|v| v.is_finite()));
        if !positive || scale < 1e-12 {
            out.push(QuantityResult {
                name: name.clone(),
                values: vals,
                mean,
                sem,
                predicted,
                slope: None,
                finite_size: None,
                fit_exponent: 0.0,
                rate_fixed: false,
                per_residual: None,
                verdict: if finite { Verdict::Zero } else { Verdict::Diverged },
            });
            continue;
        }
        let slope = fit::loglog_slope_seeds(&x, &vals, 200, 0x5eed)?;
        let per_residual = match (&residual0, name.starts_with("delta.")) {
            (Some(r0), true) => {
                let ratio: Vec<Vec<f64>> = vals.iter().zip(r0).map(|(v, r)| v.iter().zip(r).map(|(a, b)| a / b).collect()).collect();
                if ratio.iter().all(|s| s.iter().all(|v| v.is_finite() && *v > 0.0)) {
                    fit::loglog_slope_seeds(&x, &ratio, 200, 0x5eed).ok()
                } else {
                    None
                }
            }
            _ => None,
        };
        let Judgement { finite_size, fit_exponent: p, rate_fixed, verdict } = judge(spec, &mean, &sem, &slope, per_residual.as_ref(), predicted);
        out.push(QuantityResult {
            name: name.clone(),
            values: vals,
            mean,
            sem,
            predicted,
            slope: Some(slope),
            finite_size,
            fit_exponent: p,
            rate_fixed,
            per_residual,
            verdict,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::param::GroupHp;

    fn base() -> Sizes {
        Sizes { width: 64, depth: 2, experts: 8, active: 2, expert_hidden: 32 }
    }

    fn resolved(sizes: Sizes, eps: f64) -> Resolved {
        let row = |group, init_std, multiplier| GroupHp {
            group,
            init_std,
            multiplier,
            lr: 1.0,
            adam_eps: Some(eps),
            weight_decay: 0.0,
        };
        Resolved {
            preset: "moe-completep".into(),
            optimizer: Optimizer::Adam,
            sizes,
            base: base(),
            residual_multiplier: 1.0,
            groups: vec![row(Group::ExpertUp, 0.5, 1.0), row(Group::Router, 0.1, 2.0)],
        }
    }

    fn spec(axis: Axis, values: Vec<usize>) -> CoordSpec {
        CoordSpec {
            axis,
            preset: "moe-completep".into(),
            optimizer: Optimizer::Adam,
            values,
            seeds: 3,
            steps: 3,
            lr: 0.01,
            base: base(),
            router_init: RouterInit::Preset,
            tolerance: 0.15,
        }
    }

    #[test]
    fn sizes_along_axes() {
        let b = base();
        let w = sizes_along(&b, Axis::Width, 256).unwrap();
        assert_eq!((w.width, w.expert_hidden), (256, 128));
        let e = sizes_along(&b, Axis::Experts, 32).unwrap();
        assert_eq!((e.experts, e.active), (32, 8));
        assert!(sizes_along(&b, Axis::Experts, 6).is_err());
        assert!(sizes_along(&b, Axis::Width, 3).is_err());
        assert_eq!(sizes_along(&b, Axis::ExpertHidden, 7).unwrap().expert_hidden, 7);
        assert_eq!(sizes_along(&b, Axis::Depth, 16).unwrap().depth, 16);
    }

    #[test]
    fn router_init_ablation_scales() {
        let mut small = resolved(base(), 1.0);
        RouterInit::HiddenLike.apply(&mut small);
        assert!((small.get(Group::Router).init_std - 0.25).abs() < 1e-12);
        let mut big = resolved(sizes_along(&base(), Axis::Width, 256).unwrap(), 1.0);
        RouterInit::ReadoutLike.apply(&mut big);
        assert!((big.get(Group::Router).init_std - 0.125).abs() < 1e-12);
        RouterInit::Zero.apply(&mut big);
        assert_eq!(big.get(Group::Router).init_std, 0.0);
    }

    fn table(preset: &str) -> Table {
        let cfg = crate::param::ParamConfig {
            preset: preset.into(),
            optimizer: Optimizer::Adam,
            base: Some(base()),
            ..Default::default()
        };
        cfg.resolve_table(&base()).unwrap()
    }

    #[test]
    fn analysis_judges_slopes() {
        let s = spec(Axis::Width, vec![64, 128, 256, 512]);
        let t = table("moe-completep");
        let g = t.row("expert_up").unwrap().grad_rms.width;
        let names: Vec<String> = ["delta.residual", "delta.expert_pre", "grad.expert_up", "act.router_logits"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let x = [64.0f64, 128.0, 256.0, 512.0];
        let seeds = |f: &dyn Fn(f64) -> f64| -> Vec<Vec<f64>> {
            (0..3).map(|k| x.iter().map(|&v| f(v) * (1.0 + 0.01 * k as f64)).collect()).collect()
        };
        let values =
            vec![seeds(&|_| 0.3), seeds(&|v| v / 64.0), seeds(&|v| (v / 64.0).powf(g)), vec![vec![0.0; 4]; 3]];
        let r = analyze(&s, &names, values, &t).unwrap();
        assert_eq!(r[0].verdict, Verdict::Agrees);
        assert_eq!(r[1].verdict, Verdict::Disagrees);
        assert!((r[1].slope.unwrap().slope - 1.0).abs() < 1e-9);
        assert_eq!(r[2].predicted.map(|p| p.value), Some(g));
        assert_eq!(r[2].verdict, Verdict::Agrees);
        assert_eq!(r[3].verdict, Verdict::Zero);
        let res = CoordResult { spec: s, sizes: vec![], quantities: r };
        let md = res.table();
        assert!(md.contains("DISAGREES") && md.contains("delta.residual"));
    }

    #[test]
    fn presets_predict_violations_only_on_ignored_axes() {
        let mut s = spec(Axis::Width, vec![64, 512]);
        s.preset = "sp".into();
        let t = table("sp");
        let p = |s: &CoordSpec, q: &str, t: &Table| predicted_slope(s, q, t).map(|p| (p.value, p.lower_bound));
        assert_eq!(p(&s, "delta.router_logits", &t), Some((0.5, true)));
        // SP's readout is a hidden-like layer: its output stays Θ(1) along width.
        assert_eq!(p(&s, "act.output", &t), Some((0.0, false)));
        let mt = table("mup");
        s.preset = "mup".into();
        assert_eq!(p(&s, "delta.router_logits", &mt), Some((0.0, false)));
        assert_eq!(p(&s, "act.output", &mt), Some((-0.5, false)));
        s.axis = Axis::Depth;
        assert_eq!(p(&s, "delta.residual", &mt), Some((0.5, true)));
        // No 1/L branch multiplier: L random branches add up to at least sqrt(L).
        assert_eq!(p(&s, "act.residual", &mt), Some((0.5, true)));
        let ct = table("moe-completep");
        s.preset = "moe-completep".into();
        assert_eq!(p(&s, "delta.residual", &ct), Some((0.0, false)));
        assert_eq!(p(&s, "act.residual", &ct), Some((0.0, false)));
        s.axis = Axis::Experts;
        assert_eq!(p(&s, "act.moe_out", &ct), Some((-0.5, false)));
    }

    #[test]
    fn finite_size_verdict() {
        let s = spec(Axis::Experts, vec![4, 8, 16, 32, 64]);
        let names = vec!["delta.moe_out".to_string()];
        let x = [4.0f64, 8.0, 16.0, 32.0, 64.0];
        let vals: Vec<Vec<f64>> =
            (0..3).map(|k| x.iter().map(|v| 0.2 + 0.8 * v.powf(-0.5) + 0.001 * k as f64).collect()).collect();
        let r = analyze(&s, &names, vec![vals], &table("moe-completep")).unwrap();
        assert_eq!(r[0].verdict, Verdict::FiniteSize, "{:?}", r[0]);
        let f = r[0].finite_size.unwrap();
        assert!((f.c - 0.5).abs() < 0.05 && (f.a - 0.201).abs() < 0.01, "{f:?}");
    }

    #[test]
    fn gate_average_exponent_limits() {
        let m = [8usize, 16, 32, 64, 128, 256];
        // Vanishing logits: uniform gates over k = M/4, an average of k experts.
        let e0 = gate_average_exponent(&m, 0.25, 1e-9, 200, 1).unwrap();
        assert!((e0 + 0.5).abs() < 1e-6, "{e0}");
        // Θ(1) logits (SP's hidden-like router): the gates concentrate, the average saturates.
        let e = gate_average_exponent(&m, 0.25, 2.7, 2000, 1).unwrap();
        assert!(e > -0.3 && e < -0.1, "{e}");
        assert_eq!(e, gate_average_exponent(&m, 0.25, 2.7, 2000, 1).unwrap());
    }

    #[test]
    fn init_gradient_power_counting() {
        let s = spec(Axis::Width, vec![64, 128]);
        let t = table("moe-completep");
        // Adam: the router's init backward sum pairs independent random vectors: N^(-1/2), not N^0.
        assert_eq!(init_grad_slope(&s, "router", &t), Some(-0.5));
        assert_eq!(init_grad_slope(&s, "expert_up", &t), Some(-1.0));
        assert_eq!(init_grad_slope(&s, "readout", &t), Some(-1.0));
        let e = spec(Axis::Experts, vec![4, 8]);
        assert_eq!(init_grad_slope(&e, "router", &t), Some(-1.0));
    }

    #[test]
    fn spec_validation() {
        let mut s = spec(Axis::Width, vec![64, 128]);
        assert!(s.validate().is_ok());
        s.values = vec![128, 64];
        assert!(s.validate().is_err());
        s.values = vec![64, 128];
        s.lr = f64::NAN;
        assert!(s.validate().is_err());
    }
}
