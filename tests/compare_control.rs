//! `compare`'s control variates: the init statistics have mean zero, the adjustment leaves the seed-mean
//! where it was and removes most of its seed noise, and the shared-rate fit recovers a known exponent.

use moe_dmft::check::compare::{controls_of, fit_shared_rate, run_compare, Antithetic, CompareSpec};
use moe_dmft::check::control::control_names;
use moe_dmft::data::make_task;
use moe_dmft::dmft::SolveConfig;
use moe_dmft::param::Sizes;

/// A fast solver side: 256 expert x 64 neuron samples, 2 repeats.
fn small_solve(steps: usize) -> SolveConfig {
    SolveConfig { steps, ..SolveConfig::default() }.with_resolution(256, 64, 2)
}

/// Every control is centred: over 400 seeds its mean is within 4 standard errors of 0, and the
/// root-mean-square z-score over all controls is about 1 (it would be far above 1 if any were biased).
#[test]
fn init_controls_have_mean_zero() {
    let cfg = small_solve(2);
    let task = make_task(&cfg.task).unwrap();
    let sizes = Sizes { width: 32, depth: 1, experts: 8, active: 2, expert_hidden: 8 };
    let seeds = 400;
    let rows: Vec<Vec<f64>> =
        (0..seeds).map(|s| controls_of(&cfg, &task, &sizes, s, (s % 2 == 1, false)).unwrap()).collect();
    let names = control_names(cfg.task.input_dim);
    assert_eq!(rows[0].len(), names.len());
    let mut z2 = 0.0;
    for j in 0..names.len() {
        let col: Vec<f64> = rows.iter().map(|r| r[j]).collect();
        let (m, se) = moe_dmft::check::fit::mean_and_sem(&col);
        assert!(se > 0.0, "{} does not fluctuate", names[j]);
        assert!((m / se).abs() < 4.5, "{}: mean {m:.3e} is {:.1} standard errors from 0", names[j], m / se);
        z2 += (m / se).powi(2);
    }
    let rms = (z2 / names.len() as f64).sqrt();
    assert!(rms < 1.4, "rms z-score {rms:.2} over {} controls", names.len());
}

/// On a small ladder the adjusted seed-mean curve agrees with the raw one within the raw errors (the
/// adjustment is unbiased), and the variance across groups falls by at least half.
#[test]
fn control_variates_keep_the_mean_and_cut_the_noise() {
    let mut spec = CompareSpec::new(small_solve(6), vec![(32, 8, 8), (64, 16, 16)], 160);
    spec.antithetic = Antithetic::Readout;
    let raw = run_compare(&spec).unwrap();
    spec.control_variates = true;
    let cv = run_compare(&spec).unwrap();
    for (r, c) in raw.sizes.iter().zip(&cv.sizes) {
        assert!(c.control_ratio < 0.5, "N = {}: variance ratio {:.3}", c.sizes.width, c.control_ratio);
        assert!(r.control_ratio.is_nan(), "no ratio without control variates");
        assert_eq!(c.loss_gap_raw, r.loss_gap);
        for t in 0..r.loss_mean.len() {
            let d = (c.loss_mean[t] - r.loss_mean[t]).abs();
            assert!(d < 4.0 * r.loss_sem[t] + 1e-12, "N = {} step {t}: {d:.2e} vs sem {:.2e}", c.sizes.width, r.loss_sem[t]);
            assert!(c.loss_sem[t] <= r.loss_sem[t] * 1.05 + 1e-15, "step {t}: sem grew");
        }
    }
}

/// `fit_shared_rate` recovers the exponent of curves built as A_t N^-p + B_t N^-(p+1) with noise.
#[test]
fn shared_rate_fit_recovers_the_exponent() {
    let x = [128.0, 256.0, 512.0, 1024.0];
    let p = 1.0;
    let steps = 12;
    let g: Vec<Vec<f64>> = x
        .iter()
        .enumerate()
        .map(|(i, &n): (usize, &f64)| {
            (0..steps)
                .map(|t| {
                    let a = -2.0 - 0.3 * t as f64;
                    let b = 150.0 + 10.0 * t as f64;
                    // Deterministic small "noise" so the fit is not exact.
                    let e = 1e-5 * (((i * 7 + t * 3) % 5) as f64 - 2.0);
                    a * n.powf(-p) + b * n.powf(-p - 1.0) + e
                })
                .collect()
        })
        .collect();
    let se = vec![vec![1e-5; steps]; x.len()];
    let (fit, chi2) = fit_shared_rate(&x, &g, &se, Some(1.0));
    assert!((fit - p).abs() < 0.05, "p = {fit}");
    let (_, pure) = fit_shared_rate(&x, &g, &se, None);
    assert!(pure > 10.0 * chi2.max(1.0), "a pure power should fit far worse: {pure} vs {chi2}");
}
