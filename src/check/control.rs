//! Control variates for `compare`: statistics of a finite network's random initialisation whose mean
//! under the init law is exactly zero, and the cross-fitted regression that subtracts their share of
//! the seed-to-seed spread from each seed group's loss curve.
//!
//! To leading order a finite network's loss curve deviates from its mean by a linear response to the
//! O(N^-1/2) fluctuations of the empirical law of its neurons' initial weights. The part carried by the
//! input layer and the readout is captured by a handful of centred moments (`init_controls`); their
//! expectation is known in closed form, so `L - beta . c` has the mean of `L` for every fixed `beta`,
//! and `beta` fitted on other seed groups (`adjust`) keeps it so exactly (docs/theory.md, "Control
//! variates").

use nalgebra::{DMatrix, DVector};
use ndarray::{Array1, Array2, Axis, Ix2};

use crate::model::resnet::MoeResNet;
use crate::model::Model;
use crate::param::{Group, Resolved};
use crate::{Error, Result};

fn upper(m: &Array2<f64>, scale: f64, out: &mut Vec<f64>) {
    for i in 0..m.nrows() {
        for j in i..m.ncols() {
            out.push(m[[i, j]] * scale);
        }
    }
}

fn standardised(model: &MoeResNet<f64>, hp: &Resolved, g: Group) -> Result<Array2<f64>> {
    let p = model
        .store()
        .params
        .iter()
        .find(|p| p.group == g)
        .ok_or_else(|| Error::Internal(format!("no `{}` tensor", g.name())))?;
    let std = hp.get(g).init_std;
    if std <= 0.0 {
        return Err(Error::invalid(
            format!("param.{}.init_std", g.name()),
            "control variates need a random (non-zero) init of this group",
        ));
    }
    p.value
        .mapv(|v| v / std)
        .into_dimensionality::<Ix2>()
        .map_err(|e| Error::Internal(format!("`{}` is not a matrix: {e}", g.name())))
}

/// Names of [`init_controls`]' entries for input dimension `d`.
pub fn control_names(d: usize) -> Vec<String> {
    let mut v = Vec::new();
    let pairs = |p: &str, v: &mut Vec<String>| {
        for i in 0..d {
            for j in i..d {
                v.push(format!("{p}.{i}.{j}"));
            }
        }
    };
    pairs("emb", &mut v);
    v.push("ro.a2".into());
    pairs("ro.cov", &mut v);
    pairs("ro.cc", &mut v);
    v
}

/// Centred init moments of a freshly initialised (and possibly sign-flipped) single-output
/// MoE-ResNet, with W the embedding (rows w_i in R^D) and a the readout, both divided by their init std
/// so their entries are standard normal:
/// - `emb` = W^T W / N - I;
/// - `ro.a2` = mean a_i^2 - 1 and `ro.cov` = sum_i a_i^2 w_i w_i^T / N - I (the joint law of readout and
///   embedding, which sets how the input layer is trained);
/// - `ro.cc` = (c c^T - W^T W / N) / N with c = W^T a / sqrt(N): the initial output is f0(x) ∝ c.x /
///   sqrt(N), and E[c c^T | W] = W^T W / N. These enter the loss through f0^2, at order 1/N with O(1)
///   fluctuations; the 1/N makes their regression coefficient size-independent like the others'.
///
/// Every entry has mean exactly 0 (upper triangles of the D x D matrices, in [`control_names`] order).
pub fn init_controls(model: &MoeResNet<f64>, hp: &Resolved) -> Result<Vec<f64>> {
    let w = standardised(model, hp, Group::Embedding)?; // N x D
    let a = standardised(model, hp, Group::Readout)?; // outputs x N
    if a.nrows() != 1 {
        return Err(Error::invalid("task.outputs", "control variates are defined for one output"));
    }
    let (n, d) = w.dim();
    let nf = n as f64;
    let eye = Array2::<f64>::eye(d);
    let cov = w.t().dot(&w) / nf;
    let mut out = Vec::with_capacity(control_names(d).len());
    upper(&(&cov - &eye), 1.0, &mut out);
    let a2: Array1<f64> = a.row(0).mapv(|v| v * v);
    out.push(a2.mean().unwrap_or(0.0) - 1.0);
    let mut wa = w.clone();
    for (mut row, &s) in wa.axis_iter_mut(Axis(0)).zip(&a2) {
        row.mapv_inplace(|v| v * s);
    }
    upper(&(w.t().dot(&wa) / nf - &eye), 1.0, &mut out);
    let c = w.t().dot(&a.row(0)) / nf.sqrt();
    let cc = Array2::from_shape_fn((d, d), |(i, j)| c[i] * c[j]);
    upper(&(&cc - &cov), 1.0 / nf, &mut out);
    Ok(out)
}

/// Cross-fitted control-variate adjustment of seed-group loss curves, pooled over the ladder.
///
/// `curves[s][g]` is the (T+1)-step mean loss curve of seed group g at size s and `controls[s][g]` its
/// group-mean controls (mean zero). Group g of size s falls in fold g mod `folds`; its coefficients
/// (one per step and control, ridge-regularised least squares on standardised controls) are fitted on
/// every other group of every size, each size centred on its own means, so they are independent of
/// the group they adjust and `curve - beta . controls` keeps the group's expectation exactly. The ridge
/// (relative to the standardised Gram diagonal) is the one of `ridges` with the smallest inner 5-fold
/// prediction error on that training set: small when groups far outnumber controls, large when they do
/// not (a few groups per size), where an unshrunk fit would add noise instead of removing it. Returns
/// the adjusted curves in the same layout.
pub fn adjust(
    curves: &[Vec<Vec<f64>>],
    controls: &[Vec<Vec<f64>>],
    folds: usize,
    ridges: &[f64],
) -> Result<Vec<Vec<Vec<f64>>>> {
    let folds = folds.max(2);
    let f = controls.iter().flatten().map(|c| c.len()).next().unwrap_or(0);
    let t = curves.iter().flatten().map(|c| c.len()).next().unwrap_or(0);
    for (s, (cs, xs)) in curves.iter().zip(controls).enumerate() {
        if cs.len() != xs.len() || xs.iter().any(|x| x.len() != f) || cs.iter().any(|c| c.len() != t) {
            return Err(Error::Internal(format!("control variates: ragged data at ladder entry {s}")));
        }
    }
    let mut adjusted: Vec<Vec<Vec<f64>>> = curves.to_vec();
    if f == 0 {
        return Ok(adjusted);
    }
    for s in 0..curves.len() {
        for fold in 0..folds.min(curves[s].len()) {
            let held = |s2: usize, g: usize| s2 == s && g % folds == fold;
            // Centre each size on its own training means (the sizes' mean curves differ).
            let mut rows_x: Vec<Vec<f64>> = Vec::new();
            let mut rows_y: Vec<Vec<f64>> = Vec::new();
            for s2 in 0..curves.len() {
                let keep: Vec<usize> = (0..curves[s2].len()).filter(|&g| !held(s2, g)).collect();
                if keep.len() < 2 {
                    continue;
                }
                let k = keep.len() as f64;
                let mx: Vec<f64> = (0..f).map(|j| keep.iter().map(|&g| controls[s2][g][j]).sum::<f64>() / k).collect();
                let my: Vec<f64> = (0..t).map(|j| keep.iter().map(|&g| curves[s2][g][j]).sum::<f64>() / k).collect();
                for &g in &keep {
                    rows_x.push(controls[s2][g].iter().zip(&mx).map(|(x, m)| x - m).collect());
                    rows_y.push(curves[s2][g].iter().zip(&my).map(|(y, m)| y - m).collect());
                }
            }
            let rows = rows_x.len();
            if rows < 2 {
                continue;
            }
            let x = DMatrix::from_fn(rows, f, |i, j| rows_x[i][j]);
            let y = DMatrix::from_fn(rows, t, |i, j| rows_y[i][j]);
            let scale: DVector<f64> =
                DVector::from_fn(f, |j, _| (x.column(j).norm_squared() / rows as f64).sqrt().max(1e-300));
            let xs = DMatrix::from_fn(rows, f, |i, j| x[(i, j)] / scale[j]);
            let ridge = choose_ridge(&xs, &y, ridges)?;
            let beta = ridge_fit(&xs, &y, ridge)?;
            for g in (0..curves[s].len()).filter(|&g| g % folds == fold) {
                let c = DVector::from_fn(f, |j, _| controls[s][g][j] / scale[j]);
                let shift = beta.transpose() * c; // t x 1
                for (j, v) in adjusted[s][g].iter_mut().enumerate() {
                    *v -= shift[j];
                }
            }
        }
    }
    Ok(adjusted)
}

/// Ridge least squares `(X^T X + ridge rows I)^-1 X^T Y` (all columns of Y at once).
fn ridge_fit(x: &DMatrix<f64>, y: &DMatrix<f64>, ridge: f64) -> Result<DMatrix<f64>> {
    let mut gram = x.transpose() * x;
    for j in 0..x.ncols() {
        gram[(j, j)] += ridge * x.nrows() as f64;
    }
    Ok(gram
        .cholesky()
        .ok_or_else(|| Error::Internal("control variates: singular normal equations".into()))?
        .solve(&(x.transpose() * y)))
}

/// The ridge of `ridges` with the least squared prediction error, summed over steps, in a 5-fold split
/// of the rows (row i in fold i mod 5).
fn choose_ridge(x: &DMatrix<f64>, y: &DMatrix<f64>, ridges: &[f64]) -> Result<f64> {
    const INNER: usize = 5;
    let rows = x.nrows();
    if ridges.len() < 2 || rows < 2 * INNER {
        return Ok(ridges.iter().copied().fold(0.0, f64::max));
    }
    let mut best = (f64::INFINITY, ridges[0]);
    for &ridge in ridges {
        let mut sse = 0.0;
        for fold in 0..INNER {
            let train: Vec<usize> = (0..rows).filter(|i| i % INNER != fold).collect();
            let test: Vec<usize> = (0..rows).filter(|i| i % INNER == fold).collect();
            let beta = ridge_fit(&x.select_rows(&train), &y.select_rows(&train), ridge)?;
            let resid = y.select_rows(&test) - x.select_rows(&test) * beta;
            sse += resid.norm_squared();
        }
        if sse < best.0 {
            best = (sse, ridge);
        }
    }
    Ok(best.1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Curves that are a known linear response to mean-zero controls plus noise: the adjustment must
    /// remove the response (variance falls to the noise's) and leave the mean where it was.
    #[test]
    fn adjust_removes_a_linear_response_and_keeps_the_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut normal = || -> f64 { (0..12).map(|_| rng.gen::<f64>()).sum::<f64>() - 6.0 };
        let (sizes, groups, f, t) = (3, 200, 4, 3);
        let beta = [[1.0, -2.0, 0.5, 0.0], [0.3, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]];
        let mut curves = Vec::new();
        let mut controls = Vec::new();
        for s in 0..sizes {
            let (mut cs, mut xs) = (Vec::new(), Vec::new());
            for _ in 0..groups {
                let x: Vec<f64> = (0..f).map(|_| normal()).collect();
                let c: Vec<f64> = (0..t)
                    .map(|j| s as f64 + (0..f).map(|i| beta[j][i] * x[i]).sum::<f64>() + 0.1 * normal())
                    .collect();
                cs.push(c);
                xs.push(x);
            }
            curves.push(cs);
            controls.push(xs);
        }
        let adj = adjust(&curves, &controls, 8, &[1e-6, 1e-2, 1.0]).unwrap();
        for s in 0..sizes {
            for j in 0..2 {
                let col: Vec<f64> = adj[s].iter().map(|c| c[j]).collect();
                let raw: Vec<f64> = curves[s].iter().map(|c| c[j]).collect();
                let (m, se) = crate::check::fit::mean_and_sem(&col);
                let (_, se_raw) = crate::check::fit::mean_and_sem(&raw);
                assert!((m - s as f64).abs() < 4.0 * se, "size {s} step {j}: mean {m} vs {s} (se {se})");
                assert!(se < 0.2 * se_raw, "size {s} step {j}: se {se} not far below {se_raw}");
            }
        }
    }
}
