//! The exactly solvable case (docs/theory.md §7): linear experts, frozen router, tie-breaking draws fixed
//! for the run. Then each expert's active set is a fixed pattern `a in {0,1}^P` (probability
//! `kappa^|a| (1 - kappa)^(P - |a|)`), every neuron's learned coordinates are linear in its Gaussian
//! `chi` (`up = A chi`, `down = C chi` with K x K matrices per pattern), and the neuron level closes on
//! these matrices. Enumerating the 2^P patterns gives a deterministic integrator with no Monte Carlo.

use ndarray::{s, Array2, Array3};

use super::config::{SolveConfig, TieJitter};
use crate::data::Task;
use crate::model::Activation;
use crate::routing::TieBreak;
use crate::Error;

/// Largest P the pattern enumeration accepts (2^P patterns per block).
pub const MAX_POINTS: usize = 12;

/// Trajectory of the exact integrator.
#[derive(Debug, Clone)]
pub struct ExactSolution {
    /// (T+1): loss `0.5 * mean_mu sum_o (f - y)^2`.
    pub loss: Vec<f64>,
    /// (T+1, P, O): predictions.
    pub predictions: Array3<f64>,
}

/// Integrates the linear-expert, frozen-router dynamics exactly. The config must have
/// `activation = "linear"`, `lr_scale.router = 0`, `tie_jitter = "fixed"`, random tie-breaking, no
/// capacity and no balancing bias; the resolution is ignored.
pub fn solve_linear_frozen_router(cfg: &SolveConfig, task: &Task) -> crate::Result<ExactSolution> {
    cfg.validate()?;
    if cfg.activation != Activation::Linear {
        return Err(Error::invalid(
            "activation",
            "the exact integrator needs `linear` experts",
        ));
    }
    if cfg.lr_scale.router != 0.0 {
        return Err(Error::invalid(
            "lr_scale.router",
            "the exact integrator needs a frozen router (0)",
        ));
    }
    if cfg.tie_jitter != TieJitter::Fixed || cfg.routing.tie_break != TieBreak::Random {
        return Err(Error::invalid(
            "tie_jitter",
            "the exact integrator needs `fixed` jitter with random tie-breaking (fixed active patterns)",
        ));
    }
    if cfg.routing.capacity_factor.is_some() || cfg.routing.bias_update_rate != 0.0 {
        return Err(Error::invalid(
            "routing",
            "the exact integrator supports neither capacity nor balancing bias",
        ));
    }
    let (p, _) = task.x.dim();
    if p > MAX_POINTS {
        return Err(Error::invalid(
            "task.points",
            format!("the exact integrator enumerates 2^P patterns: P <= {MAX_POINTS}"),
        ));
    }
    let xc = super::solver::input_factor(task.x.view());
    let kx = xc.dot(&xc.t());
    let (o, l_n, t_n) = (task.y.ncols(), cfg.depth, cfg.steps);
    let k = o + xc.ncols();
    let branch = 1.0 / l_n as f64;
    let lr = cfg.eta0 * cfg.gamma0 * cfg.gamma0;
    let (lr_up, lr_down) = (lr * cfg.lr_scale.expert_up, lr * cfg.lr_scale.expert_down);

    let patterns: Vec<(f64, Vec<f64>)> = (0..1usize << p)
        .map(|bits| {
            let a: Vec<f64> = (0..p).map(|mu| ((bits >> mu) & 1) as f64).collect();
            let on = a.iter().sum::<f64>();
            (
                cfg.kappa.powf(on) * (1.0 - cfg.kappa).powf(p as f64 - on),
                a,
            )
        })
        .filter(|(w, _)| *w > 0.0)
        .collect();
    let eye = Array2::<f64>::eye(k);
    // Per block, per pattern: (A, C) with up = A chi, down = C chi.
    let mut mats: Vec<Vec<(Array2<f64>, Array2<f64>)>> = (0..l_n)
        .map(|_| {
            patterns
                .iter()
                .map(|_| (Array2::zeros((k, k)), Array2::zeros((k, k))))
                .collect()
        })
        .collect();
    let mut omega = Array2::zeros((o, k));
    for i in 0..o {
        omega[[i, i]] = 1.0;
    }
    let mut h0 = Array2::zeros((p, k));
    h0.slice_mut(s![.., o..]).assign(&xc);
    let mut out = ExactSolution {
        loss: Vec::with_capacity(t_n + 1),
        predictions: Array3::zeros((t_n + 1, p, o)),
    };
    let diag = |a: &[f64], m: &Array2<f64>| -> Array2<f64> {
        let mut r = m.clone();
        for (mu, mut row) in r.rows_mut().into_iter().enumerate() {
            row *= a[mu];
        }
        r
    };
    for t in 0..=t_n {
        let mut hs = vec![h0.clone()];
        for l in 0..l_n {
            let hin = hs[l].clone();
            let mut moe = Array2::<f64>::zeros((p, k));
            for ((w, a), (am, cm)) in patterns.iter().zip(&mats[l]) {
                // zeta_mu = C (I + A)^T h_mu, gated by the pattern (gate = 1 when the router is zero).
                let zeta = hin.dot(&(&eye + am)).dot(&cm.t());
                moe.scaled_add(*w, &diag(a, &zeta));
            }
            moe /= cfg.kappa;
            hs.push(&hin + &(moe * branch));
        }
        let hl = hs[l_n].clone();
        let f = hl.dot(&omega.t()) / cfg.gamma0;
        let err = &f - &task.y;
        out.loss
            .push(0.5 * err.iter().map(|v| v * v).sum::<f64>() / p as f64);
        out.predictions.slice_mut(s![t, .., ..]).assign(&f);
        if t == t_n {
            break;
        }
        let gf = &err / p as f64;
        let mut delta = gf.dot(&omega) / cfg.gamma0;
        for l in (0..l_n).rev() {
            let hin = &hs[l];
            let mut total = Array2::<f64>::zeros((p, k));
            for ((w, a), (am, cm)) in patterns.iter().zip(mats[l].iter_mut()) {
                let gd = diag(a, &delta);
                let i_a = &eye + &*am;
                total.scaled_add(*w, &gd.dot(&*cm).dot(&i_a.t()));
                let d_c = gd.t().dot(hin).dot(&i_a);
                let d_a = hin.t().dot(&gd).dot(&*cm);
                cm.scaled_add(-lr_down, &d_c);
                am.scaled_add(-lr_up, &d_a);
            }
            delta = &delta + &(total * (branch / cfg.kappa));
        }
        let dh0 = kx.dot(&delta) * (lr * cfg.lr_scale.embedding);
        let domega = gf.t().dot(&hl) * (cfg.eta0 * cfg.gamma0 * cfg.lr_scale.readout);
        h0 -= &dh0;
        omega -= &domega;
    }
    Ok(out)
}
