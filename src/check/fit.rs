//! Exponent fits for coordinate checks and convergence studies: log-log slopes with uncertainties
//! (residual-based and seed-bootstrap) and finite-size fits `a + b * x^(-c)`.
//!
//! The finite-size fit is linear in `(a, b)` once `c` is fixed, so it is solved by variable projection:
//! `c` is found by a grid scan followed by argmin's Brent minimizer on the profiled residual, and the
//! parameter uncertainties come from the Jacobian of the full three-parameter model at the optimum.

use argmin::core::{CostFunction, Executor};
use argmin::solver::brent::BrentOpt;
use nalgebra::{Matrix2, Matrix3, Vector2, Vector3};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A least-squares line through `(ln x, ln y)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SlopeFit {
    /// The exponent: y ∝ x^slope.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub slope: f64,
    /// Combined uncertainty of the slope: the larger of `residual_err` and `bootstrap_err`.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub err: f64,
    /// Standard error of the slope from the scatter of the points about the line.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub residual_err: f64,
    /// Standard deviation of the slope over seed-bootstrap resamples (0 when seeds are not given).
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub bootstrap_err: f64,
    /// ln y at ln x = 0.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub intercept: f64,
    /// Number of sizes in the fit.
    pub points: usize,
}

/// A finite-size fit `y = a + b * x^(-c)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PowerLawFit {
    /// The limit as x -> infinity.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub a: f64,
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub b: f64,
    /// The rate at which the finite-size correction vanishes.
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub c: f64,
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub a_err: f64,
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub b_err: f64,
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub c_err: f64,
    /// Weighted residual sum of squares (chi^2 when `sigma` was given).
    #[serde(deserialize_with = "crate::check::fit::nan::f64")]
    pub rss: f64,
    /// Degrees of freedom: points - 3.
    pub dof: usize,
    /// `a` is more than two standard errors away from zero.
    pub a_nonzero: bool,
}

/// Smallest and largest rate `c` searched; rates outside this range are not resolvable from sizes that
/// span one or two decades.
pub const RATE_RANGE: (f64, f64) = (0.02, 4.0);

fn check_xy(x: &[f64], y: &[f64], min_points: usize, need_positive_y: bool) -> Result<()> {
    if x.len() != y.len() {
        return Err(Error::invalid("fit.y", format!("has {} values for {} sizes", y.len(), x.len())));
    }
    if x.len() < min_points {
        return Err(Error::invalid("fit.sizes", format!("needs at least {min_points} sizes, got {}", x.len())));
    }
    if x.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(Error::invalid("fit.sizes", "must be finite and positive"));
    }
    if need_positive_y && y.iter().any(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(Error::invalid("fit.y", "must be finite and positive for a log-log fit"));
    }
    if !need_positive_y && y.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid("fit.y", "must be finite"));
    }
    let first = x[0];
    if x.iter().all(|v| *v == first) {
        return Err(Error::invalid("fit.sizes", "must not all be equal"));
    }
    Ok(())
}

/// Ordinary least squares of `v` on `u`: (slope, intercept, standard error of the slope).
fn line(u: &[f64], v: &[f64]) -> (f64, f64, f64) {
    let n = u.len() as f64;
    let mu = u.iter().sum::<f64>() / n;
    let mv = v.iter().sum::<f64>() / n;
    let suu: f64 = u.iter().map(|a| (a - mu).powi(2)).sum();
    let suv: f64 = u.iter().zip(v).map(|(a, b)| (a - mu) * (b - mv)).sum();
    let slope = suv / suu;
    let intercept = mv - slope * mu;
    let se = if u.len() > 2 {
        let rss: f64 = u.iter().zip(v).map(|(a, b)| (b - intercept - slope * a).powi(2)).sum();
        (rss / (n - 2.0) / suu).sqrt()
    } else {
        0.0
    };
    (slope, intercept, se)
}

/// Log-log slope of `y` against `x` with its residual standard error.
pub fn loglog_slope(x: &[f64], y: &[f64]) -> Result<SlopeFit> {
    check_xy(x, y, 2, true)?;
    let u: Vec<f64> = x.iter().map(|v| v.ln()).collect();
    let v: Vec<f64> = y.iter().map(|v| v.ln()).collect();
    let (slope, intercept, se) = line(&u, &v);
    Ok(SlopeFit { slope, err: se, residual_err: se, bootstrap_err: 0.0, intercept, points: x.len() })
}

/// Log-log slope of the seed-mean of `y_by_seed[seed][size]` against `x`, with a seed bootstrap:
/// seeds are resampled with replacement `resamples` times (driven by `seed`) and the spread of the
/// refitted slopes is the bootstrap error. Seeds are the independent unit, so the bootstrap captures the
/// correlation between sizes that share a seed, which the residual error ignores.
pub fn loglog_slope_seeds(x: &[f64], y_by_seed: &[Vec<f64>], resamples: usize, seed: u64) -> Result<SlopeFit> {
    if y_by_seed.is_empty() {
        return Err(Error::invalid("fit.seeds", "needs at least one seed"));
    }
    for ys in y_by_seed {
        check_xy(x, ys, 2, true)?;
    }
    let mean_over = |picks: &[usize]| -> Vec<f64> {
        (0..x.len()).map(|i| picks.iter().map(|&s| y_by_seed[s][i]).sum::<f64>() / picks.len() as f64).collect()
    };
    let all: Vec<usize> = (0..y_by_seed.len()).collect();
    let mut fit = loglog_slope(x, &mean_over(&all))?;
    if y_by_seed.len() >= 2 && resamples >= 2 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let u: Vec<f64> = x.iter().map(|v| v.ln()).collect();
        let slopes: Vec<f64> = (0..resamples)
            .map(|_| {
                let picks: Vec<usize> = (0..y_by_seed.len()).map(|_| rng.gen_range(0..y_by_seed.len())).collect();
                let v: Vec<f64> = mean_over(&picks).iter().map(|m| m.ln()).collect();
                line(&u, &v).0
            })
            .collect();
        let m = slopes.iter().sum::<f64>() / slopes.len() as f64;
        let var = slopes.iter().map(|s| (s - m).powi(2)).sum::<f64>() / (slopes.len() - 1) as f64;
        fit.bootstrap_err = var.sqrt();
    }
    fit.err = fit.residual_err.max(fit.bootstrap_err);
    Ok(fit)
}

/// Weighted linear least squares for `(a, b)` at fixed `c`; returns (a, b, weighted rss).
fn profile(x: &[f64], y: &[f64], w: &[f64], c: f64) -> (f64, f64, f64) {
    let mut ata = Matrix2::zeros();
    let mut aty = Vector2::zeros();
    for i in 0..x.len() {
        let row = Vector2::new(1.0, x[i].powf(-c));
        ata += w[i] * row * row.transpose();
        aty += w[i] * y[i] * row;
    }
    let sol = ata.try_inverse().map(|inv| inv * aty).unwrap_or_else(|| {
        // Degenerate only when x^(-c) is constant across sizes; then the best model is the mean.
        let sw: f64 = w.iter().sum();
        Vector2::new(w.iter().zip(y).map(|(a, b)| a * b).sum::<f64>() / sw, 0.0)
    });
    let rss = (0..x.len()).map(|i| w[i] * (y[i] - sol[0] - sol[1] * x[i].powf(-c)).powi(2)).sum();
    (sol[0], sol[1], rss)
}

struct ProfiledRss<'a> {
    x: &'a [f64],
    y: &'a [f64],
    w: &'a [f64],
}

impl CostFunction for ProfiledRss<'_> {
    type Param = f64;
    type Output = f64;
    fn cost(&self, c: &f64) -> std::result::Result<f64, argmin::core::Error> {
        Ok(profile(self.x, self.y, self.w, *c).2)
    }
}

/// Fits `y = a + b * x^(-c)` with `c` in [`RATE_RANGE`]. `sigma` (per-point standard errors, e.g. the
/// seed standard error at each size) weights the points; without it all points weigh the same and the
/// scale of the errors is estimated from the residuals. Needs at least 4 sizes.
pub fn fit_power_correction(x: &[f64], y: &[f64], sigma: Option<&[f64]>) -> Result<PowerLawFit> {
    check_xy(x, y, 4, false)?;
    let w = weights(x, y, sigma)?;
    // A grid first: the profiled residual can have several local minima in c.
    let grid = 80;
    let (lo, hi) = RATE_RANGE;
    let cs: Vec<f64> = (0..=grid).map(|i| lo * (hi / lo).powf(i as f64 / grid as f64)).collect();
    let costs: Vec<f64> = cs.iter().map(|&c| profile(x, y, &w, c).2).collect();
    let best = (0..cs.len()).min_by(|&i, &j| costs[i].total_cmp(&costs[j])).unwrap_or(0);
    let bracket = (cs[best.saturating_sub(1)], cs[(best + 1).min(grid)]);
    let mut c = cs[best];
    if bracket.1 > bracket.0 {
        let solver = BrentOpt::new(bracket.0, bracket.1).set_tolerance(1e-10, 1e-12);
        let problem = ProfiledRss { x, y, w: &w };
        if let Ok(res) = Executor::new(problem, solver).configure(|s| s.param(cs[best]).max_iters(200)).run() {
            if let Some(p) = res.state.best_param {
                if profile(x, y, &w, p).2 <= costs[best] {
                    c = p;
                }
            }
        }
    }
    let (a, b, rss) = profile(x, y, &w, c);
    let dof = x.len() - 3;
    // Covariance from the Jacobian of the three-parameter model; without known sigmas the error scale is
    // the residual variance, with them it is inflated by the reduced chi^2 when the model fits worse than
    // the errors allow.
    let mut jtj = Matrix3::zeros();
    for i in 0..x.len() {
        let p = x[i].powf(-c);
        let j = Vector3::new(1.0, p, -b * p * x[i].ln());
        jtj += w[i] * j * j.transpose();
    }
    let reduced = if dof > 0 { rss / dof as f64 } else { f64::NAN };
    let scale = match sigma {
        Some(_) => {
            if reduced.is_finite() {
                reduced.max(1.0)
            } else {
                1.0
            }
        }
        None => reduced,
    };
    let (a_err, b_err, c_err) = match jtj.try_inverse() {
        Some(cov) if scale.is_finite() => {
            let cov = cov * scale;
            (cov[(0, 0)].max(0.0).sqrt(), cov[(1, 1)].max(0.0).sqrt(), cov[(2, 2)].max(0.0).sqrt())
        }
        // b = 0 makes c unidentifiable; a is then the weighted mean with its own error.
        _ => {
            let sw: f64 = w.iter().sum();
            let a_err = if sigma.is_some() {
                (1.0 / sw).sqrt()
            } else {
                let n = x.len() as f64;
                (y.iter().map(|v| (v - a).powi(2)).sum::<f64>() / (n - 1.0) / n).sqrt()
            };
            (a_err, f64::INFINITY, f64::INFINITY)
        }
    };
    Ok(PowerLawFit { a, b, c, a_err, b_err, c_err, rss, dof, a_nonzero: a.abs() > 2.0 * a_err })
}

/// Fits `y = a + b * x^(-c)` with the rate `c` fixed (by a mechanism, e.g. the random-initialization part
/// of a sum of x independent terms, relative size x^(-1/2)): a weighted linear fit for `(a, b)`. Errors
/// come from the 2x2 covariance, inflated by the reduced chi^2 when the model fits worse than `sigma`
/// allows; `c_err` is 0 and `dof` is points - 2. Needs at least 3 sizes.
pub fn fit_power_correction_fixed_rate(x: &[f64], y: &[f64], sigma: Option<&[f64]>, c: f64) -> Result<PowerLawFit> {
    check_xy(x, y, 3, false)?;
    if !(c.is_finite() && c > 0.0) {
        return Err(Error::invalid("fit.rate", "must be finite and positive"));
    }
    let w = weights(x, y, sigma)?;
    let (a, b, rss) = profile(x, y, &w, c);
    let dof = x.len() - 2;
    let mut ata = Matrix2::zeros();
    for i in 0..x.len() {
        let row = Vector2::new(1.0, x[i].powf(-c));
        ata += w[i] * row * row.transpose();
    }
    let reduced = rss / dof as f64;
    let scale = if sigma.is_some() { reduced.max(1.0) } else { reduced };
    let (a_err, b_err) = match ata.try_inverse() {
        Some(cov) => {
            let cov = cov * scale;
            (cov[(0, 0)].max(0.0).sqrt(), cov[(1, 1)].max(0.0).sqrt())
        }
        None => (f64::INFINITY, f64::INFINITY),
    };
    Ok(PowerLawFit { a, b, c, a_err, b_err, c_err: 0.0, rss, dof, a_nonzero: a.abs() > 2.0 * a_err })
}

fn weights(x: &[f64], y: &[f64], sigma: Option<&[f64]>) -> Result<Vec<f64>> {
    Ok(match sigma {
        Some(s) => {
            if s.len() != x.len() {
                return Err(Error::invalid("fit.sigma", format!("has {} values for {} sizes", s.len(), x.len())));
            }
            // A zero seed spread (e.g. a deterministic quantity) would give infinite weight; floor it
            // at a small fraction of the data's scale.
            let scale = y.iter().map(|v| v.abs()).fold(0.0, f64::max).max(1e-300);
            s.iter().map(|v| 1.0 / v.abs().max(1e-6 * scale).powi(2)).collect()
        }
        None => vec![1.0; x.len()],
    })
}

/// Mean and standard error over seeds.
pub fn mean_and_sem(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let m = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (m, 0.0);
    }
    let var = values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    (m, (var / n as f64).sqrt())
}

/// Reading back JSON written by serde_json, which writes non-finite floats (a diverged run, an
/// unidentifiable fit parameter) as `null`: these read `null` as NaN.
pub mod nan {
    use serde::{Deserialize, Deserializer};

    pub fn f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }

    pub fn vec<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        Ok(Vec::<Option<f64>>::deserialize(d)?.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
    }

    pub fn vec2<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<f64>>, D::Error> {
        Ok(Vec::<Vec<Option<f64>>>::deserialize(d)?
            .into_iter()
            .map(|r| r.into_iter().map(|v| v.unwrap_or(f64::NAN)).collect())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_distr::{Distribution, Normal};

    #[test]
    fn exact_power_law_gives_exact_slope() {
        let x = [64.0, 128.0, 256.0, 512.0];
        let y: Vec<f64> = x.iter().map(|v: &f64| 3.0 * v.powf(-0.5)).collect();
        let f = loglog_slope(&x, &y).unwrap();
        assert!((f.slope + 0.5).abs() < 1e-12, "{f:?}");
        assert!(f.residual_err < 1e-10);
        assert!((f.intercept - 3f64.ln()).abs() < 1e-10);
    }

    #[test]
    fn noisy_slope_error_covers_truth() {
        let x: Vec<f64> = (0..6).map(|i| 32.0 * 2f64.powi(i)).collect();
        let noise = Normal::new(0.0, 0.05).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let seeds: Vec<Vec<f64>> = (0..8)
            .map(|_| x.iter().map(|v: &f64| v.powf(0.25) * (noise.sample(&mut rng) as f64).exp()).collect())
            .collect();
        let f = loglog_slope_seeds(&x, &seeds, 400, 1).unwrap();
        assert!(f.bootstrap_err > 0.0 && f.bootstrap_err < 0.05, "{f:?}");
        assert!((f.slope - 0.25).abs() < 3.0 * f.err + 1e-3, "{f:?}");
        // Same inputs, same seed: same bootstrap.
        assert_eq!(f, loglog_slope_seeds(&x, &seeds, 400, 1).unwrap());
    }

    #[test]
    fn power_correction_recovers_parameters() {
        let x = [4.0, 8.0, 16.0, 32.0, 64.0, 128.0];
        let y: Vec<f64> = x.iter().map(|v: &f64| 0.7 + 1.3 * v.powf(-0.5)).collect();
        let f = fit_power_correction(&x, &y, None).unwrap();
        assert!((f.a - 0.7).abs() < 1e-6 && (f.b - 1.3).abs() < 1e-5 && (f.c - 0.5).abs() < 1e-5, "{f:?}");
        assert!(f.a_nonzero);
    }

    #[test]
    fn power_correction_with_noise_and_sigma() {
        let x = [2.0, 4.0, 8.0, 16.0, 32.0];
        let sig = 0.005;
        let noise = Normal::new(0.0, sig).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let y: Vec<f64> = x.iter().map(|v: &f64| 0.2 + 0.8 * v.powf(-1.0) + noise.sample(&mut rng)).collect();
        let f = fit_power_correction(&x, &y, Some(&[sig; 5])).unwrap();
        assert!((f.a - 0.2).abs() < 4.0 * f.a_err + 1e-9, "{f:?}");
        assert!((f.c - 1.0).abs() < 4.0 * f.c_err + 1e-9, "{f:?}");
        assert!(f.a_nonzero && f.a_err < 0.05, "{f:?}");
    }

    #[test]
    fn pure_decay_has_zero_limit() {
        let x = [8.0, 16.0, 32.0, 64.0, 128.0];
        let y: Vec<f64> = x.iter().map(|v: &f64| 2.0 * v.powf(-0.5)).collect();
        let f = fit_power_correction(&x, &y, Some(&[1e-3; 5])).unwrap();
        assert!(f.a.abs() < 1e-3 && !f.a_nonzero, "{f:?}");
        assert!((f.c - 0.5).abs() < 1e-3, "{f:?}");
    }

    #[test]
    fn fixed_rate_fit_recovers_limit() {
        let x = [16.0, 32.0, 64.0, 128.0, 256.0];
        let y: Vec<f64> = x.iter().map(|v: &f64| 0.3 + 0.9 * v.powf(-0.5)).collect();
        let f = fit_power_correction_fixed_rate(&x, &y, Some(&[1e-3; 5]), 0.5).unwrap();
        assert!((f.a - 0.3).abs() < 1e-9 && (f.b - 0.9).abs() < 1e-9 && f.a_nonzero && f.dof == 3, "{f:?}");
        // A pure power law has no limit at the fixed rate it decays with.
        let y: Vec<f64> = x.iter().map(|v: &f64| 2.0 * v.powf(-0.5)).collect();
        let f = fit_power_correction_fixed_rate(&x, &y, Some(&[1e-3; 5]), 0.5).unwrap();
        assert!(f.a.abs() < 1e-9 && !f.a_nonzero, "{f:?}");
        assert!(fit_power_correction_fixed_rate(&x, &y, None, 0.0).is_err());
    }

    #[test]
    fn constant_data_is_handled() {
        let x = [8.0, 16.0, 32.0, 64.0];
        let f = fit_power_correction(&x, &[1.0; 4], None).unwrap();
        assert!((f.a - 1.0).abs() < 1e-9 && f.b.abs() < 1e-9, "{f:?}");
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(loglog_slope(&[1.0, 2.0], &[1.0]).is_err());
        assert!(loglog_slope(&[1.0, 2.0], &[1.0, -1.0]).is_err());
        assert!(loglog_slope(&[2.0, 2.0], &[1.0, 3.0]).is_err());
        assert!(fit_power_correction(&[1.0, 2.0, 3.0], &[1.0, 2.0, 3.0], None).is_err());
        assert!(fit_power_correction(&[1.0, 2.0, 3.0, 4.0], &[1.0, 2.0, f64::NAN, 3.0], None).is_err());
    }
}
