//! RMS normalization with a learned gain (parameter group `norm`) on a token matrix (T x N), used in
//! front of every residual branch (pre-norm) of the MoE-Transformer and the MoE-ResNet.
//!
//! `y = gain * x / sqrt(mean(x^2) + eps)`, row by row. The cache keeps the normalized rows and the
//! inverse RMS so the backward pass needs no recomputation.

use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, Zip};

use super::Real;

/// What the backward pass of [`rms_norm_forward`] needs.
#[derive(Debug, Clone)]
pub struct NormCache<F> {
    /// `x / rms(x)` before the gain (T x N).
    pub normalized: Array2<F>,
    /// `1 / sqrt(mean(x^2) + eps)` per row (T).
    pub inv_rms: Array1<F>,
}

/// RMS norm of every row of `x` (T x N) times `gain` (N).
pub fn rms_norm_forward<F: Real>(x: ArrayView2<F>, gain: ArrayView1<F>, eps: f64) -> (Array2<F>, NormCache<F>) {
    let width = x.ncols();
    let inv_width = F::of(1.0 / width as f64);
    let eps = F::of(eps);
    let inv_rms: Array1<F> = x
        .rows()
        .into_iter()
        .map(|row| {
            let mean_sq = row.iter().fold(F::zero(), |acc, &v| acc + v * v) * inv_width;
            (mean_sq + eps).sqrt().recip()
        })
        .collect();
    let normalized = &x * &inv_rms.view().insert_axis(Axis(1));
    let y = &normalized * &gain.view().insert_axis(Axis(0));
    (y, NormCache { normalized, inv_rms })
}

/// Backward of [`rms_norm_forward`]: returns `(dL/dx, dL/dgain)`.
///
/// With `xhat = x * r`, `r = (mean(x^2) + eps)^(-1/2)`:
/// `dx = r * (dxhat - xhat * mean(dxhat * xhat))`, where `dxhat = grad_y * gain`.
pub fn rms_norm_backward<F: Real>(
    cache: &NormCache<F>,
    gain: ArrayView1<F>,
    grad_y: ArrayView2<F>,
) -> (Array2<F>, Array1<F>) {
    let width = grad_y.ncols();
    let inv_width = F::of(1.0 / width as f64);
    let dgain = (&grad_y * &cache.normalized).sum_axis(Axis(0));
    let mut dx = &grad_y * &gain.view().insert_axis(Axis(0));
    Zip::from(dx.rows_mut())
        .and(cache.normalized.rows())
        .and(&cache.inv_rms)
        .for_each(|mut d, xhat, &r| {
            let proj = d.iter().zip(xhat.iter()).fold(F::zero(), |acc, (&a, &b)| acc + a * b) * inv_width;
            Zip::from(&mut d)
                .and(&xhat)
                .for_each(|dv, &xv| *dv = r * (*dv - xv * proj));
        });
    (dx, dgain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn random(shape: (usize, usize), rng: &mut ChaCha8Rng) -> Array2<f64> {
        Array::from_shape_simple_fn(shape, || StandardNormal.sample(rng))
    }

    /// Scalar objective sum(y * probe) so every output entry gets a distinct weight.
    fn objective(x: &Array2<f64>, gain: &Array1<f64>, probe: &Array2<f64>, eps: f64) -> f64 {
        let (y, _) = rms_norm_forward(x.view(), gain.view(), eps);
        (&y * probe).sum()
    }

    #[test]
    fn rows_have_unit_rms_with_unit_gain() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = random((5, 16), &mut rng) * 3.0;
        let (y, _) = rms_norm_forward(x.view(), Array1::ones(16).view(), 0.0);
        for row in y.rows() {
            let rms = (row.mapv(|v| v * v).mean().unwrap()).sqrt();
            assert!((rms - 1.0).abs() < 1e-12, "rms {rms}");
        }
    }

    #[test]
    fn backward_matches_central_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (t, n, eps) = (4, 6, 1e-5);
        let x = random((t, n), &mut rng);
        let gain = Array1::from_shape_simple_fn(n, || {
            let z: f64 = StandardNormal.sample(&mut rng);
            1.0 + 0.3 * z
        });
        let probe = random((t, n), &mut rng);
        let (_, cache) = rms_norm_forward(x.view(), gain.view(), eps);
        let (dx, dgain) = rms_norm_backward(&cache, gain.view(), probe.view());
        let h = 1e-5;
        let mut worst: f64 = 0.0;
        for i in 0..t {
            for j in 0..n {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[[i, j]] += h;
                xm[[i, j]] -= h;
                let fd = (objective(&xp, &gain, &probe, eps) - objective(&xm, &gain, &probe, eps)) / (2.0 * h);
                worst = worst.max((fd - dx[[i, j]]).abs() / fd.abs().max(dx[[i, j]].abs()).max(1e-8));
            }
        }
        for j in 0..n {
            let (mut gp, mut gm) = (gain.clone(), gain.clone());
            gp[j] += h;
            gm[j] -= h;
            let fd = (objective(&x, &gp, &probe, eps) - objective(&x, &gm, &probe, eps)) / (2.0 * h);
            worst = worst.max((fd - dgain[j]).abs() / fd.abs().max(dgain[j].abs()).max(1e-8));
        }
        assert!(worst < 1e-7, "max relative error {worst}");
    }
}
