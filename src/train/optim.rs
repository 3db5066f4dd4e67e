//! Optimizers over a [`ParamStore`]: SGD and AdamW, with every parameter's learning rate, Adam epsilon and
//! decoupled weight decay taken from its group's row of a [`Resolved`] parameterization.
//!
//! Weight decay is decoupled (`p -= lr * wd * p`, applied before the gradient step as in PyTorch's AdamW),
//! so a parameterization that keeps `lr * wd` fixed per group keeps the decay per step fixed. The
//! `expert_bias` group is never touched here: it is a selection-only bias that the model moves itself in
//! `after_step` (auxiliary-loss-free balancing).

use ndarray::{ArrayD, Zip};

use crate::model::{Grads, ParamStore, Real};
use crate::param::{Group, Resolved};

/// Hyperparameters of one parameter tensor, copied from its group's row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamHp {
    pub lr: f64,
    pub adam_eps: f64,
    pub weight_decay: f64,
    /// True for groups the optimizer must leave alone (`expert_bias`).
    pub frozen: bool,
}

/// Looks up every parameter's group in `hp`; fails (as a bug, not a user error) when a group is missing.
pub fn param_hps<F: Real>(store: &ParamStore<F>, hp: &Resolved) -> crate::Result<Vec<ParamHp>> {
    store
        .params
        .iter()
        .map(|p| {
            let row = hp.groups.iter().find(|g| g.group == p.group).ok_or_else(|| {
                crate::Error::Internal(format!(
                    "parameterization `{}` has no group `{}` (parameter `{}`)",
                    hp.preset,
                    p.group.name(),
                    p.name
                ))
            })?;
            Ok(ParamHp {
                lr: row.lr,
                adam_eps: row.adam_eps.unwrap_or(0.0),
                weight_decay: row.weight_decay,
                frozen: p.group == Group::ExpertBias,
            })
        })
        .collect()
}

/// One optimizer step over a whole store.
pub trait Optimizer<F: Real>: Send {
    /// Applies one step with every learning rate multiplied by `lr_factor` (the schedule). Returns, per
    /// parameter tensor, the sum of squared entries of the update actually applied (for RMS metrics).
    fn step(&mut self, store: &mut ParamStore<F>, grads: &Grads<F>, lr_factor: f64) -> crate::Result<Vec<f64>>;
}

fn check_aligned<F: Real>(store: &ParamStore<F>, grads: &Grads<F>, hps: &[ParamHp]) -> crate::Result<()> {
    if grads.len() != store.params.len() || hps.len() != store.params.len() {
        return Err(crate::Error::Internal(format!(
            "optimizer: {} parameters, {} gradients, {} hyperparameter rows",
            store.params.len(),
            grads.len(),
            hps.len()
        )));
    }
    for (p, g) in store.params.iter().zip(grads) {
        if p.value.shape() != g.shape() {
            return Err(crate::Error::Internal(format!(
                "optimizer: gradient of `{}` has shape {:?}, parameter {:?}",
                p.name,
                g.shape(),
                p.value.shape()
            )));
        }
    }
    Ok(())
}

/// Plain (stochastic) gradient descent: `p <- (1 - lr wd) p - lr g`. Full-batch or minibatch is the
/// trainer's choice of batch.
#[derive(Debug, Clone)]
pub struct Sgd {
    pub hps: Vec<ParamHp>,
}

impl Sgd {
    pub fn new<F: Real>(store: &ParamStore<F>, hp: &Resolved) -> crate::Result<Self> {
        Ok(Sgd { hps: param_hps(store, hp)? })
    }
}

impl<F: Real> Optimizer<F> for Sgd {
    fn step(&mut self, store: &mut ParamStore<F>, grads: &Grads<F>, lr_factor: f64) -> crate::Result<Vec<f64>> {
        check_aligned(store, grads, &self.hps)?;
        let mut sq = Vec::with_capacity(grads.len());
        for ((p, g), hp) in store.params.iter_mut().zip(grads).zip(&self.hps) {
            if hp.frozen {
                sq.push(0.0);
                continue;
            }
            let lr = hp.lr * lr_factor;
            let decay = F::of(1.0 - lr * hp.weight_decay);
            let lr = F::of(lr);
            let mut s = 0.0f64;
            Zip::from(&mut p.value).and(g).for_each(|w, &gr| {
                let new = *w * decay - lr * gr;
                let d = (new - *w).to_f64().unwrap_or(f64::NAN);
                s += d * d;
                *w = new;
            });
            sq.push(s);
        }
        Ok(sq)
    }
}

/// AdamW (Loshchilov & Hutter) with bias correction; epsilon per group from the parameterization.
#[derive(Debug, Clone)]
pub struct AdamW<F> {
    pub hps: Vec<ParamHp>,
    pub beta1: f64,
    pub beta2: f64,
    /// First and second moment estimates, aligned with the store.
    pub m: Vec<ArrayD<F>>,
    pub v: Vec<ArrayD<F>>,
    /// Number of steps taken so far.
    pub t: u64,
}

impl<F: Real> AdamW<F> {
    pub fn new(store: &ParamStore<F>, hp: &Resolved, beta1: f64, beta2: f64) -> crate::Result<Self> {
        if !(0.0..1.0).contains(&beta1) {
            return Err(crate::Error::invalid("optim.beta1", "must lie in [0, 1)"));
        }
        if !(0.0..1.0).contains(&beta2) {
            return Err(crate::Error::invalid("optim.beta2", "must lie in [0, 1)"));
        }
        let hps = param_hps(store, hp)?;
        Ok(AdamW { hps, beta1, beta2, m: store.zeros_like(), v: store.zeros_like(), t: 0 })
    }
}

impl<F: Real> Optimizer<F> for AdamW<F> {
    fn step(&mut self, store: &mut ParamStore<F>, grads: &Grads<F>, lr_factor: f64) -> crate::Result<Vec<f64>> {
        check_aligned(store, grads, &self.hps)?;
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        let (b1, b2) = (F::of(self.beta1), F::of(self.beta2));
        let (one_b1, one_b2) = (F::of(1.0 - self.beta1), F::of(1.0 - self.beta2));
        let mut sq = Vec::with_capacity(grads.len());
        for (i, (p, g)) in store.params.iter_mut().zip(grads).enumerate() {
            let hp = self.hps[i];
            if hp.frozen {
                sq.push(0.0);
                continue;
            }
            let lr = hp.lr * lr_factor;
            let decay = F::of(1.0 - lr * hp.weight_decay);
            // Bias corrections folded into the step size and epsilon, the usual way:
            // lr * m_hat / (sqrt(v_hat) + eps) = (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps).
            let step_size = F::of(lr / bc1);
            let inv_sqrt_bc2 = F::of(1.0 / bc2.sqrt());
            let eps = F::of(hp.adam_eps);
            let mut s = 0.0f64;
            Zip::from(&mut p.value).and(g).and(&mut self.m[i]).and(&mut self.v[i]).for_each(|w, &gr, m, v| {
                *m = b1 * *m + one_b1 * gr;
                *v = b2 * *v + one_b2 * gr * gr;
                let new = *w * decay - step_size * *m / (v.sqrt() * inv_sqrt_bc2 + eps);
                let d = (new - *w).to_f64().unwrap_or(f64::NAN);
                s += d * d;
                *w = new;
            });
            sq.push(s);
        }
        Ok(sq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::param::{GroupHp, Optimizer as Opt, Sizes};
    use approx::assert_abs_diff_eq;
    use ndarray::{arr1, IxDyn};

    fn resolved(opt: Opt) -> Resolved {
        let sizes = Sizes { width: 4, depth: 1, experts: 2, active: 1, expert_hidden: 4 };
        let row = |group, lr, eps: Option<f64>, wd| GroupHp { group, init_std: 1.0, multiplier: 1.0, lr, adam_eps: eps, weight_decay: wd };
        Resolved {
            preset: "test".into(),
            optimizer: opt,
            sizes,
            base: sizes,
            residual_multiplier: 1.0,
            groups: vec![
                row(Group::Router, 0.1, Some(1e-3), 0.5),
                row(Group::ExpertUp, 0.01, Some(1e-8), 0.0),
                row(Group::ExpertBias, 1.0, Some(1e-8), 0.0),
            ],
        }
    }

    fn store() -> ParamStore<f64> {
        let mut s = ParamStore::default();
        s.push("router", Group::Router, arr1(&[1.0, -2.0]).into_dyn());
        s.push("up", Group::ExpertUp, arr1(&[0.5]).into_dyn());
        s.push("bias", Group::ExpertBias, arr1(&[0.3]).into_dyn());
        s
    }

    #[test]
    fn adamw_two_steps_match_hand_computation() {
        let hp = resolved(Opt::Adam);
        let mut st = store();
        let mut opt = AdamW::new(&st, &hp, 0.9, 0.99).unwrap();
        let g1: Grads<f64> = vec![arr1(&[0.2, -0.4]).into_dyn(), arr1(&[3.0]).into_dyn(), arr1(&[5.0]).into_dyn()];
        let sq = opt.step(&mut st, &g1, 1.0).unwrap();
        // Step 1: m = 0.1 g, v = 0.01 g^2, m_hat = g, v_hat = g^2: update -lr g / (|g| + eps), after decay.
        let p0 = 1.0 * (1.0 - 0.1 * 0.5) - 0.1 * 0.2 / (0.2 + 1e-3);
        let p1 = -2.0 * (1.0 - 0.1 * 0.5) - 0.1 * -0.4 / (0.4 + 1e-3);
        assert_abs_diff_eq!(st.params[0].value[IxDyn(&[0])], p0, epsilon = 1e-12);
        assert_abs_diff_eq!(st.params[0].value[IxDyn(&[1])], p1, epsilon = 1e-12);
        assert_abs_diff_eq!(st.params[1].value[IxDyn(&[0])], 0.5 - 0.01 * 3.0 / (3.0 + 1e-8), epsilon = 1e-12);
        assert_eq!(st.params[2].value[IxDyn(&[0])], 0.3, "expert_bias must not be moved by the optimizer");
        assert_abs_diff_eq!(sq[0], (p0 - 1.0).powi(2) + (p1 + 2.0).powi(2), epsilon = 1e-12);
        assert_eq!(sq[2], 0.0);

        // Step 2 with lr factor 0.5 on the router's first entry, written out in full.
        let g2: Grads<f64> = vec![arr1(&[-0.1, 0.0]).into_dyn(), arr1(&[0.0]).into_dyn(), arr1(&[0.0]).into_dyn()];
        opt.step(&mut st, &g2, 0.5).unwrap();
        let m = 0.9 * (0.1 * 0.2) + 0.1 * -0.1;
        let v = 0.99 * (0.01 * 0.04) + 0.01 * 0.01;
        let (m_hat, v_hat) = (m / (1.0 - 0.81), v / (1.0 - 0.99f64.powi(2)));
        let lr = 0.05;
        let expected = p0 * (1.0 - lr * 0.5) - lr * m_hat / (v_hat.sqrt() + 1e-3);
        assert_abs_diff_eq!(st.params[0].value[IxDyn(&[0])], expected, epsilon = 1e-12);
    }

    #[test]
    fn sgd_step_is_decay_then_gradient() {
        let hp = resolved(Opt::Sgd);
        let mut st = store();
        let mut opt = Sgd::new(&st, &hp).unwrap();
        let g: Grads<f64> = vec![arr1(&[1.0, 2.0]).into_dyn(), arr1(&[-4.0]).into_dyn(), arr1(&[1.0]).into_dyn()];
        Optimizer::<f64>::step(&mut opt, &mut st, &g, 2.0).unwrap();
        // lr 0.2 after the factor 2, wd 0.5: p (1 - 0.1) - 0.2 g.
        assert_abs_diff_eq!(st.params[0].value[IxDyn(&[0])], 0.9 - 0.2, epsilon = 1e-12);
        assert_abs_diff_eq!(st.params[0].value[IxDyn(&[1])], -1.8 - 0.4, epsilon = 1e-12);
        assert_abs_diff_eq!(st.params[1].value[IxDyn(&[0])], 0.5 + 0.08, epsilon = 1e-12);
        assert_eq!(st.params[2].value[IxDyn(&[0])], 0.3);
    }

    #[test]
    fn missing_group_is_an_error_not_a_panic() {
        let hp = resolved(Opt::Sgd);
        let mut st = store();
        st.push("norm", Group::Norm, arr1(&[1.0]).into_dyn());
        assert!(matches!(Sgd::new(&st, &hp), Err(crate::Error::Internal(_))));
    }
}
