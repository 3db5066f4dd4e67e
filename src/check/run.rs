//! Running coordinate checks on the finite MoE-ResNet: build the network at each size from the
//! parameterization engine, record its intermediate activations at initialization, train a few
//! full-batch steps with the project's optimizers, record them again, and hand the per-seed numbers to
//! [`super::coord::analyze`].
//!
//! The activations come from [`probe_resnet`], which replays the network's forward pass with the model's
//! own MoE layer and norm (so it cannot drift from the model: a test checks that its output equals
//! `Model::forward`) and additionally keeps every expert's preactivation on every token, routed or not,
//! so that feature learning in `expert_up` is seen whatever the routing does.

use ndarray::{Array2, Axis as NdAxis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::coord::{analyze, sizes_along, CoordResult, CoordSpec};
use crate::data::{make_task, TaskConfig};
use crate::model::moe::{moe_forward, MoeMultipliers, MoeParamIds, MoeShape};
use crate::model::norm::rms_norm_forward;
use crate::model::resnet::{MoeResNet, ResNetConfig, NORM_EPS};
use crate::model::{Activation, Batch, Model};
use crate::param::{Form, Group, Optimizer, ParamConfig, Resolved, Sizes};
use crate::routing::RoutingConfig;
use crate::train::optim::{AdamW, Sgd};
use crate::{Error, Result};

/// Everything a coordinate check needs besides the spec: the task, the architecture details and the
/// parameterization constants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoordSetup {
    pub spec: CoordSpec,
    pub task: TaskConfig,
    pub activation: Activation,
    /// RMS norm in front of every MoE block.
    pub norm: bool,
    /// Standard or mean-field form of the parameterization.
    pub form: Form,
    /// Router init constant of the preset (readout-like: std = sigma_router / N); only used with
    /// `router_init = preset`.
    pub sigma_router: f64,
    /// Adam (beta1, beta2).
    pub adam_betas: (f64, f64),
}

impl CoordSetup {
    /// Defaults for a spec: the SPEC §4 task (P = 16, D = 8, tanh single-index teacher), ReLU experts, no
    /// norm, standard form, sigma_router = 1 (so the router's logits are visible at initialization).
    pub fn new(spec: CoordSpec) -> Self {
        CoordSetup {
            spec,
            task: TaskConfig::default(),
            activation: Activation::Relu,
            norm: false,
            form: Form::Standard,
            sigma_router: 1.0,
            adam_betas: (0.9, 0.999),
        }
    }

    fn param_config(&self) -> ParamConfig {
        ParamConfig {
            preset: self.spec.preset.clone(),
            optimizer: self.spec.optimizer,
            form: self.form,
            lr: self.spec.lr,
            base: Some(self.spec.base),
            sigma_router: self.sigma_router,
            input_dim: self.task.input_dim,
            ..ParamConfig::default()
        }
    }

    /// The parameterization at `sizes` with the spec's router initialization applied.
    pub fn resolve(&self, sizes: &Sizes) -> Result<Resolved> {
        let mut hp = self.param_config().resolve(sizes)?;
        self.spec.router_init.apply(&mut hp);
        Ok(hp)
    }

    pub fn model_config(&self, sizes: &Sizes) -> ResNetConfig {
        ResNetConfig {
            input_dim: self.task.input_dim,
            outputs: 1,
            sizes: *sizes,
            activation: self.activation,
            norm: self.norm,
            routing: RoutingConfig::default(),
        }
    }
}

/// Intermediate activations of one forward pass, each flattened over blocks, tokens and units.
#[derive(Debug, Clone, PartialEq)]
pub struct Activations {
    /// (name, values): `embedding`, `router_logits`, `expert_pre`, `moe_out`, `residual`, `output`.
    pub fields: Vec<(&'static str, Vec<f64>)>,
}

impl Activations {
    pub fn get(&self, name: &str) -> Option<&[f64]> {
        self.fields.iter().find(|f| f.0 == name).map(|f| f.1.as_slice())
    }
}

fn flat<F: crate::model::Real>(a: &Array2<F>, out: &mut Vec<f64>) {
    out.extend(a.iter().map(|v| v.to_f64().unwrap_or(f64::NAN)));
}

/// Replays the MoE-ResNet's forward pass on `x`, keeping what a coordinate check measures:
/// `h0`, the router logits, every expert's preactivation on every token (`m_up * U_e a`, all experts,
/// not only the routed ones), the MoE outputs `m`, the last residual stream `h_L` and the output `f`.
/// `rng` drives tie-breaking exactly as in `Model::forward`, so the same rng state gives the same `f`.
pub fn probe_resnet<F: crate::model::Real>(model: &MoeResNet<F>, x: &Array2<f64>, rng: &mut ChaCha8Rng) -> Result<Activations> {
    replay(model, x, rng, true).map(|(a, _)| a)
}

/// The last residual stream `h_L` (B x N) and the last block's router logits (B x M) of a forward pass,
/// without the per-expert preactivations (cheap enough for large networks).
pub fn probe_resnet_light<F: crate::model::Real>(
    model: &MoeResNet<F>,
    x: &Array2<f64>,
    rng: &mut ChaCha8Rng,
) -> Result<super::compare::LightProbe> {
    replay(model, x, rng, false).map(|(_, l)| l)
}

fn replay<F: crate::model::Real>(
    model: &MoeResNet<F>,
    x: &Array2<f64>,
    rng: &mut ChaCha8Rng,
    all_experts: bool,
) -> Result<(Activations, super::compare::LightProbe)> {
    let cfg = model.config();
    let m = model.multipliers();
    let store = model.store();
    let matrix = |name: &str| -> Result<ndarray::ArrayView2<'_, F>> {
        let i = store.index_of(name).ok_or_else(|| Error::Internal(format!("probe: `{name}` missing")))?;
        store.params[i].value.view().into_dimensionality().map_err(|_| Error::Internal(format!("probe: `{name}` is not a matrix")))
    };
    let mult = MoeMultipliers { router: m.router, up: m.up, down: m.down };
    let shape = MoeShape {
        width: cfg.sizes.width,
        experts: cfg.sizes.experts,
        expert_hidden: cfg.sizes.expert_hidden,
        shared_experts: cfg.routing.shared_experts,
    };
    let mut h = x.mapv(F::of).dot(&matrix("embedding")?.t());
    h.mapv_inplace(|v| v * F::of(m.input));
    let mut embedding = Vec::new();
    flat(&h, &mut embedding);
    let (mut logits, mut pre, mut moe_out) = (Vec::new(), Vec::new(), Vec::new());
    let mut last_logits = Array2::zeros((x.nrows(), shape.experts));
    for l in 0..cfg.sizes.depth {
        let a = if cfg.norm {
            let i = store.index_of(&format!("blocks.{l}.norm")).ok_or_else(|| Error::Internal("probe: norm missing".into()))?;
            let gain = store.params[i].value.view().into_dimensionality().map_err(|_| Error::Internal("probe: norm gain".into()))?;
            let (mut a, _) = rms_norm_forward(h.view(), gain, NORM_EPS);
            if m.norm != 1.0 {
                a.mapv_inplace(|v| v * F::of(m.norm));
            }
            a
        } else {
            h.clone()
        };
        let ids = MoeParamIds::find(store, &format!("blocks.{l}.moe"), &shape)?;
        let w = ids.weights(store)?;
        let mut r = a.dot(&w.router.t());
        r.mapv_inplace(|v| v * F::of(mult.router));
        flat(&r, &mut logits);
        last_logits = r.mapv(|v| v.to_f64().unwrap_or(f64::NAN));
        for e in (0..shape.experts).filter(|_| all_experts) {
            let mut u = a.dot(&w.up.index_axis(NdAxis(0), e).t());
            u.mapv_inplace(|v| v * F::of(mult.up));
            flat(&u, &mut pre);
        }
        let out = moe_forward(&w, &mult, cfg.activation, &cfg.routing, cfg.sizes.active, a.view(), rng)?;
        flat(&out.out, &mut moe_out);
        h.scaled_add(F::of(m.residual), &out.out);
    }
    let mut f = h.dot(&matrix("readout")?.t());
    f.mapv_inplace(|v| v * F::of(m.readout));
    let (mut residual, mut output) = (Vec::new(), Vec::new());
    flat(&h, &mut residual);
    flat(&f, &mut output);
    let light = super::compare::LightProbe { residual: h.mapv(|v| v.to_f64().unwrap_or(f64::NAN)), last_logits };
    let acts = Activations {
        fields: vec![
            ("embedding", embedding),
            ("router_logits", logits),
            ("expert_pre", pre),
            ("moe_out", moe_out),
            ("residual", residual),
            ("output", output),
        ],
    };
    Ok((acts, light))
}

/// RMS of the entries (0 for none).
pub(crate) fn rms(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
}

/// RMS of the entrywise difference (NaN when the lengths differ or are 0).
pub(crate) fn rms_diff(a: &[f64], b: &[f64]) -> f64 {
    if a.is_empty() || a.len() != b.len() {
        return f64::NAN;
    }
    (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / a.len() as f64).sqrt()
}

/// Groups whose gradient RMS is recorded (in this order; `norm` only with a norm).
const GRAD_GROUPS: [Group; 6] = [Group::Embedding, Group::Router, Group::ExpertUp, Group::ExpertDown, Group::Norm, Group::Readout];

/// Names of the recorded quantities, in the order [`measure`] returns them: `act.*` (RMS at
/// initialization), `delta.*` (RMS change after the steps), `grad.*` (gradient RMS per group at the
/// trained parameters, after the last step: the regime the engine's `grad_rms` and Adam epsilon describe),
/// `grad_init.*` (the same at initialization, step 0), `loss.init`, `loss.final`. Gradient RMS is per unit
/// RMS residual `sqrt(2 loss)` at the same parameters (see [`per_residual`]); the raw RMS is that times
/// `sqrt(2 loss.init)` or `sqrt(2 loss.final)`.
pub fn quantity_names(norm: bool) -> Vec<String> {
    let mut v: Vec<String> = ["embedding", "router_logits", "expert_pre", "moe_out", "residual", "output"]
        .iter()
        .map(|f| format!("act.{f}"))
        .collect();
    v.extend(["router_logits", "expert_pre", "moe_out", "residual", "output"].iter().map(|f| format!("delta.{f}")));
    for prefix in ["grad", "grad_init"] {
        v.extend(GRAD_GROUPS.iter().filter(|g| norm || **g != Group::Norm).map(|g| format!("{prefix}.{}", g.name())));
    }
    v.push("loss.init".into());
    v.push("loss.final".into());
    v
}

/// RMS of the gradient entries of each recorded group (NaN for a group the model lacks).
fn group_grad_rms(model: &MoeResNet<f64>, grads: &[ndarray::ArrayD<f64>], norm: bool) -> Vec<f64> {
    GRAD_GROUPS
        .iter()
        .filter(|g| norm || **g != Group::Norm)
        .map(|g| {
            let (mut s, mut c) = (0.0, 0usize);
            for (p, gr) in model.store().params.iter().zip(grads) {
                if p.group == *g {
                    s += gr.iter().map(|v| v * v).sum::<f64>();
                    c += gr.len();
                }
            }
            if c == 0 {
                f64::NAN
            } else {
                (s / c as f64).sqrt()
            }
        })
        .collect()
}

/// Gradient RMS per unit RMS residual: for the squared loss every gradient is `J^T (f - y) / P`, linear
/// in the residual, whose size at a given step says how far training has got (it shrinks with depth or
/// experts when bigger networks fit faster, and at initialization it carries the random output `f`);
/// the parameterization sets the scaling of `J`, which is what the engine's `grad_rms` exponents (and
/// Adam epsilon relative to the gradient at a given loss) describe. `loss = mean (f - y)^2 / 2`.
fn per_residual(rms: Vec<f64>, loss: f64) -> Vec<f64> {
    let r = (2.0 * loss).sqrt();
    rms.into_iter().map(|g| if r.is_finite() && r > 0.0 { g / r } else { f64::NAN }).collect()
}

/// One network at `sizes` with model seed `seed`: the quantities of [`quantity_names`], in order. A run
/// that diverges records NaN for what it could not measure.
pub fn measure(setup: &CoordSetup, sizes: &Sizes, seed: u64) -> Result<Vec<f64>> {
    let hp = setup.resolve(sizes)?;
    let task = make_task(&setup.task)?;
    let mut init_rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model: MoeResNet<f64> = MoeResNet::new(&setup.model_config(sizes), &hp, &mut init_rng)?;
    let batch = Batch::Regression { x: task.x.clone(), y: task.y.clone() };
    // Probes use their own fixed rng so the tie-breaking draws are the same before and after training.
    let probe_seed = seed ^ 0x9e37_79b9_7f4a_7c15;
    let before = probe_resnet(&model, &task.x, &mut ChaCha8Rng::seed_from_u64(probe_seed))?;
    let mut route_rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x5151));
    let mut opt: Box<dyn crate::train::optim::Optimizer<f64>> = match setup.spec.optimizer {
        Optimizer::Sgd => Box::new(Sgd::new(model.store(), &hp)?),
        Optimizer::Adam => Box::new(AdamW::new(model.store(), &hp, setup.adam_betas.0, setup.adam_betas.1)?),
    };
    let mut grads_init = Vec::new();
    let mut loss_init = f64::NAN;
    let mut diverged = false;
    for step in 0..setup.spec.steps {
        let out = model.loss_and_grad(&batch, &mut route_rng)?;
        if step == 0 {
            loss_init = out.loss;
            grads_init = per_residual(group_grad_rms(&model, &out.grads, setup.norm), out.loss);
        }
        if !out.loss.is_finite() {
            diverged = true;
            break;
        }
        opt.step(model.store_mut(), &out.grads, 1.0)?;
        model.after_step(&out.load);
    }
    // The gradient at the trained parameters: the one Adam's epsilon competes with late in training.
    let (loss_final, grads_last) = if diverged {
        (f64::NAN, vec![f64::NAN; grads_init.len()])
    } else {
        let last = model.loss_and_grad(&batch, &mut route_rng)?;
        let g = per_residual(group_grad_rms(&model, &last.grads, setup.norm), last.loss);
        (last.loss, g)
    };
    let after = probe_resnet(&model, &task.x, &mut ChaCha8Rng::seed_from_u64(probe_seed))?;
    let mut v: Vec<f64> = before.fields.iter().map(|(_, a)| rms(a)).collect();
    for name in ["router_logits", "expert_pre", "moe_out", "residual", "output"] {
        let d = match (before.get(name), after.get(name)) {
            (Some(a), Some(b)) if !diverged => rms_diff(a, b),
            _ => f64::NAN,
        };
        v.push(d);
    }
    v.extend(grads_last);
    v.extend(grads_init);
    v.push(loss_init);
    v.push(if diverged { f64::NAN } else { loss_final });
    Ok(v)
}

/// Runs the coordinate check: every size and seed (in parallel, collected in a fixed order so the result
/// does not depend on the thread count), then the fits.
pub fn run_coord(setup: &CoordSetup) -> Result<CoordResult> {
    let spec = &setup.spec;
    spec.validate()?;
    setup.task.validate()?;
    let sizes: Vec<Sizes> = spec.values.iter().map(|v| sizes_along(&spec.base, spec.axis, *v)).collect::<Result<_>>()?;
    let table = setup.param_config().resolve_table(&spec.base)?;
    let jobs: Vec<(usize, usize)> = (0..sizes.len()).flat_map(|i| (0..spec.seeds).map(move |s| (i, s))).collect();
    let runs: Vec<Result<Vec<f64>>> = jobs.par_iter().map(|&(i, s)| measure(setup, &sizes[i], s as u64)).collect();
    let names = quantity_names(setup.norm);
    // values[q][seed][size]
    let mut values = vec![vec![vec![f64::NAN; sizes.len()]; spec.seeds]; names.len()];
    for (&(i, s), run) in jobs.iter().zip(runs) {
        let run = run?;
        for (q, v) in run.into_iter().enumerate() {
            values[q][s][i] = v;
        }
    }
    let quantities = analyze(spec, &names, values, &table)?;
    Ok(CoordResult { spec: spec.clone(), sizes, quantities })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::param::Axis;

    /// A tiny Adam check (base N = n = 16, M = 4, k = 2; 2 seeds, 2 steps) for unit tests of any model.
    pub(crate) fn small_spec(axis: Axis, values: Vec<usize>) -> CoordSpec {
        use crate::check::coord::RouterInit;
        CoordSpec {
            axis,
            preset: "moe-completep".into(),
            optimizer: Optimizer::Adam,
            values,
            seeds: 2,
            steps: 2,
            lr: 0.01,
            base: Sizes { width: 16, depth: 2, experts: 4, active: 2, expert_hidden: 16 },
            router_init: RouterInit::Preset,
            tolerance: 0.15,
        }
    }

    fn setup(axis: Axis, values: Vec<usize>) -> CoordSetup {
        CoordSetup::new(small_spec(axis, values))
    }

    #[test]
    fn probe_output_matches_model_forward() {
        for norm in [false, true] {
            let mut s = setup(Axis::Width, vec![16, 32]);
            s.norm = norm;
            let sizes = sizes_along(&s.spec.base, Axis::Width, 32).unwrap();
            let hp = s.resolve(&sizes).unwrap();
            let model: MoeResNet<f64> = MoeResNet::new(&s.model_config(&sizes), &hp, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
            let task = make_task(&s.task).unwrap();
            let probe = probe_resnet(&model, &task.x, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
            let batch = Batch::Regression { x: task.x.clone(), y: task.y.clone() };
            let (_, f) = model.forward(&batch, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
            let pf = probe.get("output").unwrap();
            assert_eq!(pf.len(), f.len());
            for (a, b) in pf.iter().zip(f.iter()) {
                assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
            }
            assert_eq!(probe.get("expert_pre").unwrap().len(), 2 * 4 * 16 * 32 * 16 / 16);
        }
    }

    #[test]
    fn measure_is_deterministic_and_learns() {
        let s = setup(Axis::Width, vec![16, 32]);
        let sizes = sizes_along(&s.spec.base, Axis::Width, 16).unwrap();
        let a = measure(&s, &sizes, 1).unwrap();
        assert_eq!(a, measure(&s, &sizes, 1).unwrap());
        let names = quantity_names(false);
        assert_eq!(a.len(), names.len());
        let get = |n: &str| a[names.iter().position(|x| x == n).unwrap()];
        assert!(get("delta.expert_pre") > 0.0 && get("delta.output") > 0.0);
        assert!(get("loss.final") < get("loss.init"));
    }
}
