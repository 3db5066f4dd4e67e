//! Analysis of learning-rate sweeps: the optimum log2 LR of each size from a parabola fit of loss against
//! log2 LR near the best grid point (with an uncertainty from the fit), and the drift of that optimum across
//! the sizes of one axis, in log2 units, and a seed bootstrap of that drift (seeds are the replicates, so
//! resampling them shows how much of a drift one more set of seeds could undo). Pure functions on plain
//! numbers, so any result table can be analysed.

use std::collections::BTreeMap;

use nalgebra::{Matrix3, Vector3};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Loss of one (size, LR) cell, aggregated over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrPoint {
    pub lr_log2: f64,
    /// Mean loss over the seeds that finished; `None` when any seed diverged (such an LR is excluded
    /// from the fit: an optimum must not sit where training sometimes blows up).
    pub loss: Option<f64>,
    /// Standard error of the mean over seeds (`None` with fewer than two seeds).
    pub stderr: Option<f64>,
    pub seeds: usize,
    pub diverged: usize,
}

impl LrPoint {
    /// The cell of one LR from its seeds' losses (`None`: that seed diverged).
    pub fn from_seeds(lr_log2: f64, values: &[Option<f64>]) -> LrPoint {
        let finite: Vec<f64> = values.iter().flatten().copied().filter(|v| v.is_finite()).collect();
        let diverged = values.len() - finite.len();
        let n = finite.len() as f64;
        let (loss, stderr) = if diverged > 0 || finite.is_empty() {
            (None, None)
        } else {
            let mean = finite.iter().sum::<f64>() / n;
            let var = finite.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
            (Some(mean), (finite.len() > 1).then(|| (var / n).sqrt()))
        };
        LrPoint { lr_log2, loss, stderr, seeds: values.len(), diverged }
    }
}

/// How an optimum was located.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FitMethod {
    /// Vertex of a parabola in log2 LR fitted to the points within the window of the best grid point.
    Parabola,
    /// The best grid point itself: the parabola was not convex, its vertex left the fitted range, or
    /// too few points were finite. The true optimum may lie off the grid (see `bracketed`).
    GridArgmin,
}

/// The optimum log2 LR of one size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Optimum {
    pub lr_log2: f64,
    /// One standard deviation of `lr_log2` from the fit (`None` when not estimable: an exact 3-point fit
    /// without seed spread, or a grid argmin).
    pub std: Option<f64>,
    /// Loss at the optimum (fitted vertex value, or the grid minimum).
    pub loss: f64,
    /// Curvature c of loss = a + b x + c x^2 (per log2 unit squared); `None` for a grid argmin.
    pub curvature: Option<f64>,
    /// True when finite grid points exist on both sides of the best one: the optimum is inside the grid.
    pub bracketed: bool,
    pub points_used: usize,
    pub method: FitMethod,
}

/// Which grid points the parabola of [`fit_optimum`] is fitted on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct FitWindow {
    /// Half-width (log2 units) of the window around the best grid point.
    pub half_width: f64,
    /// Stability-edge guard (loss units): inside the window, a point above the best LR whose loss exceeds
    /// the best point's by more than this is taken to lie past a stability edge (training broke down there
    /// rather than slowed down), and it and every point beyond it are left out. A parabola through such a
    /// cliff is pulled towards it and its vertex can fall below every measured loss. Only the high-LR side
    /// has an edge: below the best LR training is slower, not broken, and a steep wall there (0.6 to 0.8
    /// above the best at 400 steps along width) belongs in the fit. `None`: every finite point in the
    /// window is fitted.
    pub cliff: Option<f64>,
}

impl From<f64> for FitWindow {
    fn from(half_width: f64) -> Self {
        FitWindow { half_width, cliff: None }
    }
}

impl FitWindow {
    /// The points of `finite` (sorted by log2 LR; `best` indexes the lowest loss) the parabola is fitted on.
    fn select(&self, finite: &[(f64, f64, Option<f64>)], best: usize) -> Vec<(f64, f64, Option<f64>)> {
        let (x_best, y_best, _) = finite[best];
        let inside = |p: &(f64, f64, Option<f64>)| (p.0 - x_best).abs() <= self.half_width + 1e-12;
        let below_edge = |p: &(f64, f64, Option<f64>)| self.cliff.is_none_or(|c| p.1 - y_best <= c);
        // Walking up from the best point, the high-LR side stops at the first point past the edge.
        let left = finite[..best].iter().rev().take_while(|p| inside(p));
        let right = finite[best + 1..].iter().take_while(|p| inside(p) && below_edge(p));
        let mut used: Vec<_> = left.chain(std::iter::once(&finite[best])).chain(right).copied().collect();
        used.sort_by(|a, b| a.0.total_cmp(&b.0));
        used
    }
}

/// Finds the optimum log2 LR of one size from its LR curve.
///
/// Takes the best finite grid point, fits loss = a + b x + c x^2 (x = log2 LR) to the finite points within
/// `window` log2 units of it, up to a stability edge if the window sets one ([`FitWindow::cliff`])
/// (weighted by 1/stderr^2 when every point has a seed spread), and returns the
/// vertex with a delta-method standard deviation. With known standard errors the covariance is
/// (X^T W X)^-1, inflated by the reduced chi-square when that exceeds 1 (the parabola does not describe the
/// points to within their noise); without them it is s^2 (X^T X)^-1 from the residuals, which needs more
/// than three points. Returns `None` when no point is finite.
pub fn fit_optimum(curve: &[LrPoint], window: impl Into<FitWindow>) -> Option<Optimum> {
    let window = window.into();
    let mut finite: Vec<(f64, f64, Option<f64>)> =
        curve.iter().filter_map(|p| p.loss.filter(|l| l.is_finite()).map(|l| (p.lr_log2, l, p.stderr))).collect();
    finite.sort_by(|a, b| a.0.total_cmp(&b.0));
    let best = (0..finite.len()).min_by(|&i, &j| finite[i].1.total_cmp(&finite[j].1))?;
    let (x_best, y_best, _) = finite[best];
    let bracketed = best > 0 && best + 1 < finite.len();
    let argmin = Optimum {
        lr_log2: x_best,
        std: None,
        loss: y_best,
        curvature: None,
        bracketed,
        points_used: 1,
        method: FitMethod::GridArgmin,
    };
    if !bracketed {
        return Some(argmin);
    }
    let used = window.select(&finite, best);
    if used.len() < 3 {
        return Some(argmin);
    }
    // Centering on the best point keeps the normal equations well conditioned for LRs like 2^-12.
    let weighted = used.iter().all(|p| p.2.is_some_and(|s| s > 0.0 && s.is_finite()));
    let mut xtwx = Matrix3::<f64>::zeros();
    let mut xtwy = Vector3::<f64>::zeros();
    for &(x, y, s) in &used {
        let t = x - x_best;
        let row = Vector3::new(1.0, t, t * t);
        let w = if weighted { 1.0 / s.map_or(1.0, |s| s * s) } else { 1.0 };
        xtwx += row * row.transpose() * w;
        xtwy += row * (w * y);
    }
    let inv = xtwx.try_inverse()?;
    let coef = inv * xtwy;
    let (a, b, c) = (coef[0], coef[1], coef[2]);
    let lo = used.first().map(|p| p.0 - x_best).unwrap_or(0.0);
    let hi = used.last().map(|p| p.0 - x_best).unwrap_or(0.0);
    if c.is_nan() || c <= 0.0 {
        return Some(argmin);
    }
    let t_star = -b / (2.0 * c);
    if !(lo..=hi).contains(&t_star) {
        return Some(argmin);
    }
    let dof = used.len() as f64 - 3.0;
    let rss: f64 = used
        .iter()
        .map(|&(x, y, s)| {
            let t = x - x_best;
            let r = y - (a + b * t + c * t * t);
            let w = if weighted { 1.0 / s.map_or(1.0, |s| s * s) } else { 1.0 };
            w * r * r
        })
        .sum();
    let cov = if weighted {
        let scale = if dof > 0.0 { (rss / dof).max(1.0) } else { 1.0 };
        Some(inv * scale)
    } else if dof > 0.0 {
        Some(inv * (rss / dof))
    } else {
        None
    };
    // x* = -b / (2c): gradient (d/db, d/dc) = (-1/(2c), b/(2c^2)).
    let std = cov.map(|cov| {
        let gb = -1.0 / (2.0 * c);
        let gc = b / (2.0 * c * c);
        (gb * gb * cov[(1, 1)] + gc * gc * cov[(2, 2)] + 2.0 * gb * gc * cov[(1, 2)]).max(0.0).sqrt()
    });
    Some(Optimum {
        lr_log2: x_best + t_star,
        std,
        loss: a + b * t_star + c * t_star * t_star,
        curvature: Some(c),
        bracketed,
        points_used: used.len(),
        method: FitMethod::Parabola,
    })
}

/// How far the optimum moves across the sizes of one axis.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Drift {
    /// max - min of the optimum log2 LR over the sizes (log2 units; >= 0).
    pub range: f64,
    /// Standard deviation of `range` from the two extreme optima (`None` if either has none).
    pub range_std: Option<f64>,
    /// Slope of optimum log2 LR against log2 size: drift per doubling (signed).
    pub per_doubling: f64,
    /// Standard error of the slope (`None` with two sizes and no per-size uncertainties).
    pub per_doubling_std: Option<f64>,
    /// Signed change from the smallest to the largest size (log2 units).
    pub end_to_end: f64,
    /// Doublings spanned by the sizes: log2(max size / min size).
    pub doublings: f64,
    /// True when every optimum was bracketed by the grid; otherwise the drift is a lower bound at best.
    pub all_bracketed: bool,
    pub sizes: usize,
}

/// Drift of the optimum across sizes; `optima` is (size, optimum) in any order. `None` with fewer than two
/// sizes.
pub fn drift(optima: &[(usize, Optimum)]) -> Option<Drift> {
    if optima.len() < 2 {
        return None;
    }
    let mut sorted: Vec<(usize, Optimum)> = optima.to_vec();
    sorted.sort_by_key(|p| p.0);
    let argmax = (0..sorted.len()).max_by(|&i, &j| sorted[i].1.lr_log2.total_cmp(&sorted[j].1.lr_log2))?;
    let argmin = (0..sorted.len()).min_by(|&i, &j| sorted[i].1.lr_log2.total_cmp(&sorted[j].1.lr_log2))?;
    let (hi, lo) = (sorted[argmax].1, sorted[argmin].1);
    let range = hi.lr_log2 - lo.lr_log2;
    let range_std = match (hi.std, lo.std) {
        (Some(a), Some(b)) => Some((a * a + b * b).sqrt()),
        _ => None,
    };
    let xs: Vec<f64> = sorted.iter().map(|p| (p.0 as f64).log2()).collect();
    let ys: Vec<f64> = sorted.iter().map(|p| p.1.lr_log2).collect();
    let n = xs.len() as f64;
    let x_mean = xs.iter().sum::<f64>() / n;
    let y_mean = ys.iter().sum::<f64>() / n;
    let sxx: f64 = xs.iter().map(|x| (x - x_mean).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let slope = xs.iter().zip(&ys).map(|(x, y)| (x - x_mean) * (y - y_mean)).sum::<f64>() / sxx;
    // Two error sources for the slope: the per-size fit uncertainties propagated through the (unweighted)
    // least-squares slope, and the scatter around the line; the larger one is reported.
    let propagated = if sorted.iter().all(|p| p.1.std.is_some()) {
        Some(
            xs.iter()
                .zip(&sorted)
                .map(|(x, p)| ((x - x_mean) / sxx).powi(2) * p.1.std.unwrap_or(0.0).powi(2))
                .sum::<f64>()
                .sqrt(),
        )
    } else {
        None
    };
    let scatter = if xs.len() > 2 {
        let intercept = y_mean - slope * x_mean;
        let rss: f64 = xs.iter().zip(&ys).map(|(x, y)| (y - intercept - slope * x).powi(2)).sum();
        Some((rss / (n - 2.0) / sxx).sqrt())
    } else {
        None
    };
    let per_doubling_std = match (propagated, scatter) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let first = sorted.first()?;
    let last = sorted.last()?;
    Some(Drift {
        range,
        range_std,
        per_doubling: slope,
        per_doubling_std,
        end_to_end: last.1.lr_log2 - first.1.lr_log2,
        doublings: (last.0 as f64 / first.0 as f64).log2(),
        all_bracketed: sorted.iter().all(|p| p.1.bracketed),
        sizes: sorted.len(),
    })
}

/// What a drift costs in loss: the target size trained at the source size's optimum LR instead of its own.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TransferCost {
    /// The source's optimum, where the target is evaluated (log2 LR).
    pub lr_log2: f64,
    /// Target loss at `lr_log2` minus the target's loss at its own optimum (>= 0 up to noise).
    pub cost: f64,
    /// `Parabola`: read off the target's fitted parabola; `GridArgmin`: interpolated linearly between the
    /// target's grid points (the source optimum lies outside the fit window, or the target has no parabola).
    pub method: FitMethod,
}

/// The loss lost by transferring `source`'s optimum LR to the size with LR curve `target_curve` and optimum
/// `target`: the muTransfer question asked of the loss rather than of the LR. A drift inside a flat basin
/// costs nothing; the same drift next to a cliff costs a lot. Inside the fit window (`window` log2 units of
/// the target optimum) the cost is c (x - x*)^2 from the target's parabola; elsewhere the target curve is
/// interpolated linearly in log2 LR (a chord of a convex curve: an upper bound between grid points).
/// `None` when the source optimum is off the target's grid or next to a diverged LR.
pub fn transfer_cost(
    source: &Optimum,
    target_curve: &[LrPoint],
    target: &Optimum,
    window: f64,
) -> Option<TransferCost> {
    let x = source.lr_log2;
    if let (FitMethod::Parabola, Some(c)) = (target.method, target.curvature) {
        if (x - target.lr_log2).abs() <= window {
            let cost = c * (x - target.lr_log2).powi(2);
            return Some(TransferCost { lr_log2: x, cost, method: FitMethod::Parabola });
        }
    }
    let mut points: Vec<&LrPoint> = target_curve.iter().collect();
    points.sort_by(|a, b| a.lr_log2.total_cmp(&b.lr_log2));
    let hi = points.iter().position(|p| p.lr_log2 >= x - 1e-12)?;
    let loss_at = |i: usize| points[i].loss.filter(|l| l.is_finite());
    let value = if (points[hi].lr_log2 - x).abs() <= 1e-12 {
        loss_at(hi)?
    } else {
        let lo = hi.checked_sub(1)?;
        let (a, b) = (points[lo], points[hi]);
        let t = (x - a.lr_log2) / (b.lr_log2 - a.lr_log2);
        loss_at(lo)? * (1.0 - t) + loss_at(hi)? * t
    };
    Some(TransferCost { lr_log2: x, cost: value - target.loss, method: FitMethod::GridArgmin })
}

/// One finished run of a sweep, as the bootstrap sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeedRun {
    pub size: usize,
    pub lr_log2: f64,
    pub seed: u64,
    /// The metric; `None` when the run diverged.
    pub loss: Option<f64>,
}

/// The distribution of [`drift`] over seed resamples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DriftBootstrap {
    /// Resamples that gave an optimum at every size.
    pub resamples: usize,
    /// Fewest seeds at any size.
    pub seeds: usize,
    /// 16th, 50th and 84th percentiles of the range (max - min optimum, log2 units).
    pub range: [f64; 3],
    /// 16th, 50th and 84th percentiles of the slope per doubling.
    pub per_doubling: [f64; 3],
    pub tolerance: f64,
    /// Fraction of resamples whose range is within `tolerance`.
    pub within: f64,
    /// 16th, 50th and 84th percentiles of the [`transfer_cost`] from the smallest size to the largest, over
    /// the resamples where both optima are bracketed and the cost is defined (`None` if none is). Each
    /// resample's cost is a difference within one averaged curve, so a seed that shifts its whole curve
    /// does not count as noise, as it would in a standard error of the points.
    #[serde(default)]
    pub cost: Option<[f64; 3]>,
}

/// Seed bootstrap of the drift: at each size, draws as many seeds as it has, with replacement and
/// independently of the other sizes; averages the drawn seeds' curves, fits each size's optimum with
/// [`fit_optimum`] (`window` as in the sweep) and takes the [`drift`]. Repeated `resamples` times with a
/// fixed generator (`rng_seed`), so a table is reproducible. The spread includes what the delta method of
/// [`fit_optimum`] cannot see: a seed moving the best grid point, or a flat curve switching between a
/// parabola and a grid argmin. Resampling sizes independently ignores any correlation of one seed's
/// optima across sizes (same data order), which if positive makes the intervals wider than they need be.
/// `None` with fewer than two sizes or fewer than two seeds at some size.
pub fn bootstrap_drift(
    runs: &[SeedRun],
    window: impl Into<FitWindow>,
    tolerance: f64,
    resamples: usize,
    rng_seed: u64,
) -> Option<DriftBootstrap> {
    let window = window.into();
    // One seed's curve at one size: (log2 LR, loss).
    type Curve = Vec<(f64, Option<f64>)>;
    let mut by_size: BTreeMap<usize, BTreeMap<u64, Curve>> = BTreeMap::new();
    for r in runs {
        by_size.entry(r.size).or_default().entry(r.seed).or_default().push((r.lr_log2, r.loss));
    }
    let seeds = by_size.values().map(|s| s.len()).min()?;
    if by_size.len() < 2 || seeds < 2 {
        return None;
    }
    let lrs: BTreeMap<usize, Vec<f64>> = by_size
        .iter()
        .map(|(&size, seeds)| {
            let mut l: Vec<f64> = seeds.values().flatten().map(|p| p.0).collect();
            l.sort_by(f64::total_cmp);
            l.dedup();
            (size, l)
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
    let (mut ranges, mut slopes) = (Vec::with_capacity(resamples), Vec::with_capacity(resamples));
    // The cost is of moving the smallest size's optimum to the largest size.
    let (smallest, largest) = (*by_size.keys().next()?, *by_size.keys().last()?);
    let mut costs = Vec::with_capacity(resamples);
    for _ in 0..resamples {
        let mut optima = Vec::with_capacity(by_size.len());
        let mut ends: Vec<(Vec<LrPoint>, Optimum)> = Vec::with_capacity(2);
        for (&size, seeds) in &by_size {
            let pool: Vec<&Curve> = seeds.values().collect();
            let drawn: Vec<&Curve> = (0..pool.len()).map(|_| pool[rng.gen_range(0..pool.len())]).collect();
            let curve: Vec<LrPoint> = lrs[&size]
                .iter()
                .filter_map(|&lr| {
                    let values: Vec<Option<f64>> =
                        drawn.iter().filter_map(|runs| runs.iter().find(|p| p.0 == lr).map(|p| p.1)).collect();
                    (!values.is_empty()).then(|| LrPoint::from_seeds(lr, &values))
                })
                .collect();
            if let Some(o) = fit_optimum(&curve, window) {
                optima.push((size, o));
                if (size == smallest || size == largest) && o.bracketed {
                    ends.push((curve, o));
                }
            }
        }
        if let [(_, from), (to_curve, to)] = ends.as_slice() {
            costs.extend(transfer_cost(from, to_curve, to, window.half_width).map(|c| c.cost));
        }
        if optima.len() == by_size.len() {
            if let Some(d) = drift(&optima) {
                ranges.push(d.range);
                slopes.push(d.per_doubling);
            }
        }
    }
    if ranges.is_empty() {
        return None;
    }
    let within = ranges.iter().filter(|&&r| r <= tolerance).count() as f64 / ranges.len() as f64;
    Some(DriftBootstrap {
        resamples: ranges.len(),
        seeds,
        range: percentiles(&mut ranges),
        per_doubling: percentiles(&mut slopes),
        tolerance,
        within,
        cost: (!costs.is_empty()).then(|| percentiles(&mut costs)),
    })
}

/// 16th, 50th and 84th percentiles (nearest rank) of a non-empty sample.
fn percentiles(v: &mut [f64]) -> [f64; 3] {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
    [at(0.16), at(0.5), at(0.84)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    fn curve(mut f: impl FnMut(f64) -> f64, xs: &[f64]) -> Vec<LrPoint> {
        xs.iter().map(|&x| LrPoint { lr_log2: x, loss: Some(f(x)), stderr: None, seeds: 1, diverged: 0 }).collect()
    }

    fn grid(lo: f64, hi: f64, step: f64) -> Vec<f64> {
        let n = ((hi - lo) / step).round() as usize;
        (0..=n).map(|i| lo + step * i as f64).collect()
    }

    #[test]
    fn the_stability_edge_guard_drops_a_cliff_inside_the_window() {
        // A flat basin, 1.7 + 0.05 (x + 6.4)^2, with training broken (loss 3) from log2 LR -5.5 up: the
        // +-2 window around the best point (-6.5) takes in three cliff points.
        let xs = grid(-8.5, -4.0, 0.5);
        let c = curve(|x| if x >= -5.5 { 3.0 } else { 1.7 + 0.05 * (x + 6.4).powi(2) }, &xs);
        let plain = fit_optimum(&c, 2.0).unwrap();
        assert!((plain.lr_log2 + 6.4).abs() > 0.2, "the cliff should pull the plain fit: {plain:?}");
        let guarded = fit_optimum(&c, FitWindow { half_width: 2.0, cliff: Some(0.5) }).unwrap();
        assert_eq!(guarded.method, FitMethod::Parabola);
        // -8.5 .. -6: the points left of the edge, exactly quadratic.
        assert_eq!(guarded.points_used, 6);
        assert!((guarded.lr_log2 + 6.4).abs() < 1e-9, "{guarded:?}");
        assert!((guarded.loss - 1.7).abs() < 1e-9 && (guarded.curvature.unwrap() - 0.05).abs() < 1e-9);
        // A threshold no point exceeds changes nothing.
        let no_cliff = curve(|x| 1.7 + 0.05 * (x + 6.4).powi(2), &xs);
        assert_eq!(
            fit_optimum(&no_cliff, FitWindow { half_width: 2.0, cliff: Some(0.5) }),
            fit_optimum(&no_cliff, 2.0)
        );
        // A point below the threshold beyond one above it is dropped too: the edge ends the side.
        let mut dip = c.clone();
        dip.last_mut().unwrap().loss = Some(1.75);
        assert_eq!(fit_optimum(&dip, FitWindow { half_width: 3.0, cliff: Some(0.5) }), Some(guarded));
        // Below the best LR there is no edge: a steep but smooth wall, 1.3 above the best at -8.5, stays in.
        let steep = curve(|x| 1.7 + if x < -6.4 { 0.3 } else { 0.05 } * (x + 6.4).powi(2), &xs);
        let steep_guarded = fit_optimum(&steep, FitWindow { half_width: 2.0, cliff: Some(0.5) }).unwrap();
        assert_eq!(steep_guarded, fit_optimum(&steep, 2.0).unwrap());
        assert_eq!(steep_guarded.points_used, 9);
    }

    #[test]
    fn exact_parabola_recovers_its_vertex() {
        let xs = grid(-14.0, -4.0, 1.0);
        let c = curve(|x| 1.5 + 0.04 * (x + 8.3).powi(2), &xs);
        let opt = fit_optimum(&c, 2.0).unwrap();
        assert_eq!(opt.method, FitMethod::Parabola);
        assert!((opt.lr_log2 + 8.3).abs() < 1e-9, "{opt:?}");
        assert!((opt.loss - 1.5).abs() < 1e-9);
        assert_eq!(opt.points_used, 5);
        assert!(opt.bracketed);
        // Five exact points: residuals vanish, so the uncertainty does too.
        assert!(opt.std.unwrap() < 1e-6);
    }

    #[test]
    fn asymmetric_curve_lands_within_a_quarter_grid_step() {
        // Loss curves rise faster on the large-LR side; a local parabola must still find the minimum.
        let xs = grid(-14.0, -4.0, 1.0);
        let f = |x: f64| {
            let t = x + 9.6;
            2.0 + 0.05 * t * t + 0.01 * t * t * t.max(0.0)
        };
        let opt = fit_optimum(&curve(f, &xs), 2.0).unwrap();
        assert!((opt.lr_log2 + 9.6).abs() < 0.25, "{opt:?}");
    }

    #[test]
    fn noisy_seeds_give_an_uncertainty_that_covers_the_truth() {
        // 200 synthetic sweeps with 3 seeds each: the 1-sigma interval must cover the true optimum in
        // roughly 68% of them (accept 55%..85%), and the estimate must be unbiased to within 0.05.
        let truth = -7.4;
        let xs = grid(-12.0, -3.0, 0.5);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let noise = Normal::new(0.0, 0.01).unwrap();
        let (mut covered, mut bias, trials) = (0, 0.0, 200);
        for _ in 0..trials {
            let pts: Vec<LrPoint> = xs
                .iter()
                .map(|&x| {
                    let seeds: Vec<f64> =
                        (0..3).map(|_| 1.0 + 0.03 * (x - truth).powi(2) + noise.sample(&mut rng)).collect();
                    let mean = seeds.iter().sum::<f64>() / 3.0;
                    let var = seeds.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / 2.0;
                    LrPoint { lr_log2: x, loss: Some(mean), stderr: Some((var / 3.0).sqrt()), seeds: 3, diverged: 0 }
                })
                .collect();
            let opt = fit_optimum(&pts, 2.0).unwrap();
            assert_eq!(opt.method, FitMethod::Parabola);
            let std = opt.std.unwrap();
            assert!(std > 0.0 && std < 1.0, "{opt:?}");
            if (opt.lr_log2 - truth).abs() <= std {
                covered += 1;
            }
            bias += (opt.lr_log2 - truth) / trials as f64;
        }
        let rate = covered as f64 / trials as f64;
        assert!((0.55..=0.85).contains(&rate), "coverage {rate}");
        assert!(bias.abs() < 0.05, "bias {bias}");
    }

    #[test]
    fn unweighted_fit_uses_residual_scatter() {
        let xs = grid(-10.0, -2.0, 1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let noise = Normal::new(0.0, 0.005).unwrap();
        let c = curve(|x| 1.0 + 0.05 * (x + 6.0).powi(2) + noise.sample(&mut rng), &xs);
        let opt = fit_optimum(&c, 2.0).unwrap();
        let std = opt.std.unwrap();
        assert!(std > 0.0 && (opt.lr_log2 + 6.0).abs() < 4.0 * std + 0.05, "{opt:?}");
    }

    #[test]
    fn optimum_at_the_grid_edge_is_flagged_not_extrapolated() {
        let xs = grid(-10.0, -6.0, 1.0);
        let c = curve(|x| 1.0 + 0.05 * (x + 3.0).powi(2), &xs);
        let opt = fit_optimum(&c, 2.0).unwrap();
        assert_eq!(opt.method, FitMethod::GridArgmin);
        assert!(!opt.bracketed);
        assert_eq!(opt.lr_log2, -6.0);
        assert!(opt.std.is_none());
    }

    #[test]
    fn diverged_lrs_are_excluded_and_can_unbracket_the_optimum() {
        let xs = grid(-10.0, -4.0, 1.0);
        let mut c = curve(|x| 1.0 + 0.05 * (x + 5.5).powi(2), &xs);
        // The two largest LRs diverged: the best finite point (-6) is now the last finite one.
        for p in c.iter_mut().filter(|p| p.lr_log2 > -5.5) {
            p.loss = None;
            p.diverged = 1;
        }
        let opt = fit_optimum(&c, 2.0).unwrap();
        assert!(!opt.bracketed);
        assert_eq!(opt.lr_log2, -6.0);
        assert!(fit_optimum(&curve(|_| f64::NAN, &xs), 2.0).is_none());
    }

    #[test]
    fn drift_of_known_linear_optima() {
        let opt = |x: f64, s: f64| Optimum {
            lr_log2: x,
            std: Some(s),
            loss: 1.0,
            curvature: Some(0.1),
            bracketed: true,
            points_used: 5,
            method: FitMethod::Parabola,
        };
        // Optimum falls by 0.25 per doubling over 64 -> 512 (3 doublings).
        let optima: Vec<(usize, Optimum)> =
            [(512, -8.75), (64, -8.0), (128, -8.25), (256, -8.5)].iter().map(|&(n, x)| (n, opt(x, 0.1))).collect();
        let d = drift(&optima).unwrap();
        assert!((d.range - 0.75).abs() < 1e-12);
        assert!((d.per_doubling + 0.25).abs() < 1e-12);
        assert!((d.end_to_end + 0.75).abs() < 1e-12);
        assert!((d.doublings - 3.0).abs() < 1e-12);
        assert!((d.range_std.unwrap() - 0.1 * 2f64.sqrt()).abs() < 1e-12);
        // Slope error from per-size errors of 0.1 over x = 6..9: 0.1 / sqrt(sxx) with sxx = 5.
        assert!((d.per_doubling_std.unwrap() - 0.1 / 5f64.sqrt()).abs() < 1e-9);
        assert!(d.all_bracketed);
        assert!(drift(&optima[..1]).is_none());
    }

    #[test]
    fn transfer_cost_reads_the_target_parabola_and_interpolates_outside_it() {
        let xs = grid(-10.0, -2.0, 1.0);
        let target = curve(|x| 0.1 * (x + 6.0).powi(2) + 1.0, &xs);
        let t_opt = fit_optimum(&target, 2.0).unwrap();
        let source = |x: f64| Optimum { lr_log2: x, ..t_opt };
        // Inside the window: exactly c d^2.
        let c = transfer_cost(&source(-7.5), &target, &t_opt, 2.0).unwrap();
        assert!((c.cost - 0.1 * 1.5f64.powi(2)).abs() < 1e-9 && c.method == FitMethod::Parabola, "{c:?}");
        // Outside: the chord between -9 and -8, above the curve.
        let c = transfer_cost(&source(-8.5), &target, &t_opt, 2.0).unwrap();
        assert!((c.cost - 0.1 * (9.0 + 4.0) / 2.0).abs() < 1e-9 && c.method == FitMethod::GridArgmin, "{c:?}");
        // Off the grid, or next to a diverged LR: no answer.
        assert!(transfer_cost(&source(-11.0), &target, &t_opt, 2.0).is_none());
        let mut broken = target.clone();
        broken[0].loss = None;
        assert!(transfer_cost(&source(-9.5), &broken, &t_opt, 2.0).is_none());
    }

    /// Runs of a synthetic sweep: loss 1 + 0.03 (x - optimum(size))^2 + per-run noise, seeds 0..seeds.
    fn synthetic_runs(optimum: impl Fn(usize) -> f64, seeds: u64, noise: f64, rng_seed: u64) -> Vec<SeedRun> {
        let mut rng = ChaCha8Rng::seed_from_u64(rng_seed);
        let noise = Normal::new(0.0, noise).unwrap();
        let mut runs = Vec::new();
        for size in [32, 64, 128, 256] {
            for seed in 0..seeds {
                for x in grid(-9.0, -3.0, 0.5) {
                    let loss = 1.0 + 0.03 * (x - optimum(size)).powi(2) + noise.sample(&mut rng);
                    runs.push(SeedRun { size, lr_log2: x, seed, loss: Some(loss) });
                }
            }
        }
        runs
    }

    #[test]
    fn seed_bootstrap_tells_a_fixed_optimum_from_a_drifting_one() {
        let fixed = synthetic_runs(|_| -6.0, 4, 0.003, 1);
        let b = bootstrap_drift(&fixed, 1.0, 0.5, 400, 0).unwrap();
        assert_eq!((b.seeds, b.resamples), (4, 400));
        assert!(b.within > 0.9 && b.range[2] < 0.5, "{b:?}");
        assert!(b.range[0] <= b.range[1] && b.range[1] <= b.range[2]);
        assert!(b.per_doubling[0] < 0.0 && b.per_doubling[2] > 0.0, "{b:?}");
        assert!(b.cost.is_some_and(|c| c[2] < 0.003), "{b:?}");
        // The optimum rises by 0.4 per doubling: 1.2 over the axis, which costs 0.03 x 1.2^2 at size 256.
        let rising = synthetic_runs(|n| -7.0 + 0.4 * ((n / 32) as f64).log2(), 4, 0.003, 2);
        let b = bootstrap_drift(&rising, 1.0, 0.5, 400, 0).unwrap();
        assert!(b.within < 0.05 && (b.per_doubling[1] - 0.4).abs() < 0.1, "{b:?}");
        assert!(b.cost.is_some_and(|c| (c[1] - 0.0432).abs() < 0.01), "{b:?}");
        assert!((b.range[0]..=b.range[2]).contains(&1.2) || (b.range[1] - 1.2).abs() < 0.2, "{b:?}");
        // A seed that shifts its whole curve (a better or worse initialization) moves no optimum and costs
        // nothing, however large the shift.
        let shifted: Vec<SeedRun> = fixed
            .iter()
            .map(|r| SeedRun { loss: r.loss.map(|l| l + 0.05 * r.seed as f64), ..*r })
            .collect();
        let s = bootstrap_drift(&shifted, 1.0, 0.5, 400, 0).unwrap();
        assert!(s.cost.is_some_and(|c| c[2] < 0.003) && s.within > 0.9, "{s:?}");
        // Same generator seed, same answer; noise large enough to matter makes the interval wider.
        assert_eq!(bootstrap_drift(&rising, 1.0, 0.5, 400, 0), Some(b));
        let noisy = synthetic_runs(|_| -6.0, 4, 0.03, 1);
        let n = bootstrap_drift(&noisy, 1.0, 0.5, 400, 0).unwrap();
        let fixed = bootstrap_drift(&fixed, 1.0, 0.5, 400, 0).unwrap();
        assert!(n.range[2] - n.range[0] > fixed.range[2] - fixed.range[0], "{n:?} {fixed:?}");
    }

    #[test]
    fn seed_bootstrap_needs_two_seeds_everywhere_and_honours_divergence() {
        let mut runs = synthetic_runs(|_| -6.0, 2, 0.003, 3);
        assert!(bootstrap_drift(&synthetic_runs(|_| -6.0, 1, 0.003, 3), 1.0, 0.5, 50, 0).is_none());
        // One seed of size 256 diverged at every LR above -6: resamples that draw it put that size's optimum
        // at its last finite LR (-6, unbracketed) or below, never above.
        for r in runs.iter_mut().filter(|r| r.size == 256 && r.seed == 1 && r.lr_log2 > -6.0) {
            r.loss = None;
        }
        let b = bootstrap_drift(&runs, 1.0, 0.5, 200, 0).unwrap();
        assert!(b.range[2] < 0.5, "{b:?}");
        let p = LrPoint::from_seeds(-5.0, &[Some(1.0), None]);
        assert_eq!((p.loss, p.diverged, p.seeds), (None, 1, 2));
        let p = LrPoint::from_seeds(-5.0, &[Some(1.0), Some(3.0)]);
        assert_eq!((p.loss, p.stderr), (Some(2.0), Some(1.0)));
    }
}
