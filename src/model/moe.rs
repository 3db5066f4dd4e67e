//! The MoE layer on a token matrix `a` (T x N): router, expert selection and gates (delegated to
//! [`crate::routing`]), routed experts `z_e = m_down * V_e phi(m_up * U_e a)`, always-active shared
//! experts, and the hand-written backward pass including the weighted auxiliary losses.
//!
//! Layout of the weights (also the safetensors shapes, see docs/tensors.md): router `M x N`, expert up
//! `M x n x N`, expert down `M x N x n`, balancing bias `M`, shared up `S x n x N`, shared down `S x N x n`.
//!
//! Output: `m = sum_{e in S(t)} g_te z_e(a_t) + sum_{s shared} z_s(a_t)` (shared experts enter with weight
//! 1, DeepSeek style; routed gates sum to 1 over the selected set).
//!
//! Efficiency: the tokens kept by each expert are gathered into a contiguous matrix, each expert does two
//! GEMMs (BLAS through ndarray), experts run in parallel with rayon, and the scatter back into the
//! output is done serially in expert order so results do not depend on the thread count.

use ndarray::linalg::general_mat_mul;
use ndarray::{Array1, Array2, Array3, ArrayD, ArrayView1, ArrayView2, ArrayView3, ArrayViewMut2, Axis, Ix1, Ix2, Ix3, IxDyn, Zip};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;

use super::{Activation, Grads, ParamStore, Real};
use crate::param::{Group, Resolved};
use crate::routing::{self, LoadStats, Routing, RoutingConfig};

/// Forward multipliers of the MoE layer's groups (router logits, expert up, expert down).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeMultipliers {
    pub router: f64,
    pub up: f64,
    pub down: f64,
}

impl MoeMultipliers {
    /// The multipliers of groups `router`, `expert_up`, `expert_down` in `hp`.
    pub fn from_resolved(hp: &Resolved) -> Self {
        MoeMultipliers {
            router: hp.get(Group::Router).multiplier,
            up: hp.get(Group::ExpertUp).multiplier,
            down: hp.get(Group::ExpertDown).multiplier,
        }
    }
}

/// Borrowed weights of one MoE layer.
#[derive(Debug, Clone)]
pub struct MoeWeights<'a, F> {
    /// M x N.
    pub router: ArrayView2<'a, F>,
    /// M x n x N.
    pub up: ArrayView3<'a, F>,
    /// M x N x n.
    pub down: ArrayView3<'a, F>,
    /// M, used for selection only.
    pub bias: ArrayView1<'a, F>,
    /// S x n x N.
    pub shared_up: Option<ArrayView3<'a, F>>,
    /// S x N x n.
    pub shared_down: Option<ArrayView3<'a, F>>,
}

/// Per-expert intermediate results kept for the backward pass.
#[derive(Debug, Clone)]
struct ExpertCache<F> {
    /// Token index of every kept assignment, in token order.
    tokens: Vec<usize>,
    /// Slot (0..k) of each assignment in the routing tables.
    slots: Vec<usize>,
    /// Gate of each assignment (1 for shared experts).
    gates: Vec<F>,
    /// `phi(u)` of the preactivations `u = m_up * a_e U_e^T` (T_e x n).
    hidden: Array2<F>,
    /// `phi'(u)` (T_e x n), computed with `phi(u)` so smooth activations evaluate tanh once per entry.
    slope: Array2<F>,
    /// Sum of `u^2` over the entries (for the RMS diagnostic).
    u_sq_sum: f64,
    /// Ungated expert outputs `m_down * phi(u) V_e^T` (T_e x N); empty for shared experts.
    z: Array2<F>,
}

/// What [`moe_backward`] needs from the forward pass.
#[derive(Debug, Clone)]
pub struct MoeCache<F> {
    a: Array2<F>,
    routing: Routing,
    aux_grad: Array2<f64>,
    experts: Vec<ExpertCache<F>>,
    shared: Vec<ExpertCache<F>>,
}

impl<F> MoeCache<F> {
    /// The routing decision of this forward pass.
    pub fn routing(&self) -> &Routing {
        &self.routing
    }
}

/// Scalar diagnostics of one forward pass (RMS over all entries).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MoeDiagnostics {
    /// RMS of the router logits `m_r R a` (T x M).
    pub router_logits_rms: f64,
    /// RMS of the routed experts' preactivations over the kept assignments.
    pub expert_preact_rms: f64,
    /// RMS of the layer output `m` (T x N).
    pub out_rms: f64,
}

#[derive(Debug, Clone)]
pub struct MoeOutput<F> {
    /// T x N.
    pub out: Array2<F>,
    pub cache: MoeCache<F>,
    pub load: LoadStats,
    /// Weighted auxiliary losses (balance + z-loss) of this layer.
    pub aux_loss: f64,
    pub diagnostics: MoeDiagnostics,
}

/// Parameter gradients of one MoE layer (the balancing bias has none: it acts through selection only).
#[derive(Debug, Clone)]
pub struct MoeGrads<F> {
    pub router: Array2<F>,
    pub up: Array3<F>,
    pub down: Array3<F>,
    pub shared_up: Option<Array3<F>>,
    pub shared_down: Option<Array3<F>>,
}

fn internal(msg: String) -> crate::Error {
    crate::Error::Internal(msg)
}

fn check_shapes<F>(w: &MoeWeights<F>, width: usize) -> crate::Result<()> {
    let (m, n_r) = w.router.dim();
    let (m_u, hid, n_u) = w.up.dim();
    let (m_d, n_d, hid_d) = w.down.dim();
    if n_r != width || n_u != width || n_d != width || m_u != m || m_d != m || hid_d != hid || w.bias.len() != m {
        return Err(internal(format!(
            "MoE weight shapes disagree: router {:?}, up {:?}, down {:?}, bias {}, input width {width}",
            w.router.dim(),
            w.up.dim(),
            w.down.dim(),
            w.bias.len()
        )));
    }
    match (&w.shared_up, &w.shared_down) {
        (None, None) => Ok(()),
        (Some(su), Some(sd)) if su.dim().2 == width && sd.dim().1 == width && su.dim().0 == sd.dim().0 => Ok(()),
        _ => Err(internal("MoE shared expert weights missing or of the wrong shape".into())),
    }
}

fn rms<'a, F: Real>(it: impl Iterator<Item = &'a F>) -> f64 {
    let (mut s, mut c) = (0.0f64, 0usize);
    for v in it {
        let x = v.to_f64().unwrap_or(f64::NAN);
        s += x * x;
        c += 1;
    }
    if c == 0 {
        0.0
    } else {
        (s / c as f64).sqrt()
    }
}


/// One expert on a gathered token matrix: returns (phi(u), phi'(u), z, sum of u^2).
fn expert_forward<F: Real>(
    a_e: ArrayView2<F>,
    up: ArrayView2<F>,
    down: ArrayView2<F>,
    mult: &MoeMultipliers,
    act: Activation,
) -> (Array2<F>, Array2<F>, Array2<F>, f64) {
    let mut hidden = a_e.dot(&up.t());
    let m_up = F::of(mult.up);
    let mut u_sq_sum = 0.0;
    // map_collect writes the slope into fresh memory once (no zero fill first).
    let slope = Zip::from(&mut hidden).map_collect(|h| {
        let u = *h * m_up;
        let x = u.to_f64().unwrap_or(f64::NAN);
        u_sq_sum += x * x;
        let (v, s) = act.value_and_slope(u);
        *h = v;
        s
    });
    let mut z = hidden.dot(&down.t());
    z.mapv_inplace(|v| v * F::of(mult.down));
    (hidden, slope, z, u_sq_sum)
}

/// Forward pass of the MoE layer on `a` (T x N) with `active` (k) experts per token.
///
/// `rng` drives only random tie-breaking in the selection ([`routing::route`]).
#[allow(clippy::too_many_arguments)]
pub fn moe_forward<F: Real>(
    w: &MoeWeights<F>,
    mult: &MoeMultipliers,
    act: Activation,
    routing_cfg: &RoutingConfig,
    active: usize,
    a: ArrayView2<F>,
    rng: &mut ChaCha8Rng,
) -> crate::Result<MoeOutput<F>> {
    let (tokens, width) = a.dim();
    check_shapes(w, width)?;
    let experts = w.router.nrows();

    let mut logits_f = a.dot(&w.router.t());
    logits_f.mapv_inplace(|v| v * F::of(mult.router));
    let logits: Array2<f64> = logits_f.mapv(|v| v.to_f64().unwrap_or(f64::NAN));
    let bias: Array1<f64> = w.bias.mapv(|v| v.to_f64().unwrap_or(f64::NAN));
    let routing = routing::route(logits.view(), bias.view(), active, routing_cfg, rng)?;
    let (aux_loss, aux_grad) = routing::aux_losses(logits.view(), &routing, routing_cfg);

    // Kept assignments per expert, in token order.
    let mut assign: Vec<(Vec<usize>, Vec<usize>, Vec<F>)> = vec![(Vec::new(), Vec::new(), Vec::new()); experts];
    for t in 0..tokens {
        for j in 0..active {
            if routing.kept[[t, j]] {
                let e = routing.selected[[t, j]];
                assign[e].0.push(t);
                assign[e].1.push(j);
                assign[e].2.push(F::of(routing.gates[[t, j]]));
            }
        }
    }
    let expert_caches: Vec<ExpertCache<F>> = assign
        .into_par_iter()
        .enumerate()
        .map(|(e, (toks, slots, gates))| {
            let a_e = a.select(Axis(0), &toks);
            let (hidden, slope, z, u_sq_sum) = expert_forward(
                a_e.view(),
                w.up.index_axis(Axis(0), e),
                w.down.index_axis(Axis(0), e),
                mult,
                act,
            );
            ExpertCache { tokens: toks, slots, gates, hidden, slope, u_sq_sum, z }
        })
        .collect();

    let mut out = Array2::<F>::zeros((tokens, width));
    for c in &expert_caches {
        for (i, &t) in c.tokens.iter().enumerate() {
            let g = c.gates[i];
            Zip::from(out.row_mut(t)).and(c.z.row(i)).for_each(|o, &z| *o = *o + g * z);
        }
    }

    let mut shared_caches = Vec::new();
    if let (Some(su), Some(sd)) = (&w.shared_up, &w.shared_down) {
        let results: Vec<(Array2<F>, Array2<F>, Array2<F>, f64)> = (0..su.dim().0)
            .into_par_iter()
            .map(|s| expert_forward(a, su.index_axis(Axis(0), s), sd.index_axis(Axis(0), s), mult, act))
            .collect();
        for (hidden, slope, z, u_sq_sum) in results {
            out.scaled_add(F::one(), &z);
            shared_caches.push(ExpertCache {
                tokens: (0..tokens).collect(),
                slots: Vec::new(),
                gates: vec![F::one(); tokens],
                hidden,
                slope,
                u_sq_sum,
                z: Array2::zeros((0, width)),
            });
        }
    }

    let diagnostics = MoeDiagnostics {
        router_logits_rms: rms(logits_f.iter()),
        expert_preact_rms: {
            let count: usize = expert_caches.iter().map(|c| c.hidden.len()).sum();
            let sum: f64 = expert_caches.iter().map(|c| c.u_sq_sum).sum();
            if count == 0 {
                0.0
            } else {
                (sum / count as f64).sqrt()
            }
        },
        out_rms: rms(out.iter()),
    };
    let load = routing.load_stats();
    Ok(MoeOutput {
        out,
        cache: MoeCache { a: a.to_owned(), routing, aux_grad, experts: expert_caches, shared: shared_caches },
        load,
        aux_loss,
        diagnostics,
    })
}

/// Backward of one expert: given dL/dz rows already scaled by the gates (T_e x N), writes dU_e and dV_e
/// into `d_up` (n x N) and `d_down` (N x n), slices of the layer's gradient tensors (no per-expert
/// gradient arrays: at N = 1024, M = n = 256 those were ~1 GB of fresh, page-faulted memory a step), and
/// returns dL/da_e. The GEMMs run with alpha = 1 and the multiplier is applied afterwards, as `dot` did,
/// so the result is bit-identical to computing a fresh product and copying it in.
#[allow(clippy::too_many_arguments)]
fn expert_backward<F: Real>(
    grad_z: ArrayView2<F>,
    a_e: ArrayView2<F>,
    c_hidden: &Array2<F>,
    c_slope: &Array2<F>,
    up: ArrayView2<F>,
    down: ArrayView2<F>,
    mult: &MoeMultipliers,
    mut d_up: ArrayViewMut2<F>,
    mut d_down: ArrayViewMut2<F>,
) -> Array2<F> {
    let m_down = F::of(mult.down);
    let m_up = F::of(mult.up);
    general_mat_mul(F::one(), &grad_z.t(), c_hidden, F::zero(), &mut d_down);
    d_down.mapv_inplace(|v| v * m_down);
    let mut du = grad_z.dot(&down);
    Zip::from(&mut du)
        .and(c_slope)
        .for_each(|d, &slope| *d = *d * m_down * slope);
    general_mat_mul(F::one(), &du.t(), &a_e, F::zero(), &mut d_up);
    d_up.mapv_inplace(|v| v * m_up);
    let mut da = du.dot(&up);
    da.mapv_inplace(|v| v * m_up);
    da
}

/// Backward pass: returns (dL/da, parameter gradients) given dL/d(out) (T x N). Includes the gradients
/// of the layer's weighted auxiliary losses (balance loss, z-loss). The activation's slope was cached by
/// the forward pass, so `_act` is not needed; it stays in the signature to mirror [`moe_forward`].
pub fn moe_backward<F: Real>(
    w: &MoeWeights<F>,
    mult: &MoeMultipliers,
    _act: Activation,
    _routing_cfg: &RoutingConfig,
    cache: &MoeCache<F>,
    grad_out: ArrayView2<F>,
) -> (Array2<F>, MoeGrads<F>) {
    let (tokens, width) = cache.a.dim();
    let (experts, hid, _) = w.up.dim();
    let routing = &cache.routing;

    // Each expert writes its dU_e / dV_e straight into its slice of the layer's gradient tensors and
    // returns (dL/da_e, dL/dgate per assignment); the scatter into `da` below stays serial, in expert
    // order, so the sums do not depend on the thread count.
    let mut d_up = Array3::<F>::zeros((experts, hid, width));
    let mut d_down = Array3::<F>::zeros((experts, width, hid));
    let per_expert: Vec<(Array2<F>, Vec<f64>)> = d_up
        .axis_iter_mut(Axis(0))
        .into_par_iter()
        .zip(d_down.axis_iter_mut(Axis(0)).into_par_iter())
        .zip(cache.experts.par_iter())
        .enumerate()
        .map(|(e, ((gu, gd), c))| {
            let g_rows = grad_out.select(Axis(0), &c.tokens);
            let d_gate: Vec<f64> = g_rows
                .rows()
                .into_iter()
                .zip(c.z.rows())
                .map(|(g, z)| g.iter().zip(z.iter()).map(|(&x, &y)| (x * y).to_f64().unwrap_or(f64::NAN)).sum())
                .collect();
            let mut grad_z = g_rows;
            for (mut row, &gate) in grad_z.rows_mut().into_iter().zip(c.gates.iter()) {
                row.mapv_inplace(|v| v * gate);
            }
            let a_e = cache.a.select(Axis(0), &c.tokens);
            let da_e = expert_backward(
                grad_z.view(),
                a_e.view(),
                &c.hidden,
                &c.slope,
                w.up.index_axis(Axis(0), e),
                w.down.index_axis(Axis(0), e),
                mult,
                gu,
                gd,
            );
            (da_e, d_gate)
        })
        .collect();

    let mut da = Array2::<F>::zeros((tokens, width));
    let mut grad_gates = Array2::<f64>::zeros((tokens, routing.active));
    for ((da_e, dg), c) in per_expert.into_iter().zip(cache.experts.iter()) {
        for (i, &t) in c.tokens.iter().enumerate() {
            da.row_mut(t).scaled_add(F::one(), &da_e.row(i));
            grad_gates[[t, c.slots[i]]] = dg[i];
        }
    }

    let (mut shared_up, mut shared_down) = (None, None);
    if let (Some(su), Some(sd)) = (&w.shared_up, &w.shared_down) {
        let (count, _, _) = su.dim();
        let mut gu_all = Array3::<F>::zeros((count, hid, width));
        let mut gd_all = Array3::<F>::zeros((count, width, hid));
        let results: Vec<Array2<F>> = gu_all
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(gd_all.axis_iter_mut(Axis(0)).into_par_iter())
            .zip(cache.shared.par_iter())
            .enumerate()
            .map(|(s, ((gu, gd), c))| {
                expert_backward(
                    grad_out,
                    cache.a.view(),
                    &c.hidden,
                    &c.slope,
                    su.index_axis(Axis(0), s),
                    sd.index_axis(Axis(0), s),
                    mult,
                    gu,
                    gd,
                )
            })
            .collect();
        for da_s in results {
            da.scaled_add(F::one(), &da_s);
        }
        shared_up = Some(gu_all);
        shared_down = Some(gd_all);
    }

    let d_logits = routing.gates_backward(grad_gates.view()) + &cache.aux_grad;
    let d_logits_f: Array2<F> = d_logits.mapv(|v| F::of(v * mult.router));
    let d_router = d_logits_f.t().dot(&cache.a);
    da.scaled_add(F::one(), &d_logits_f.dot(&w.router));

    (da, MoeGrads { router: d_router, up: d_up, down: d_down, shared_up, shared_down })
}

/// Entries drawn i.i.d. from N(0, std^2); a zero std gives zeros without drawing.
pub fn normal_init<F: Real>(shape: &[usize], std: f64, rng: &mut ChaCha8Rng) -> ArrayD<F> {
    if std == 0.0 {
        return ArrayD::zeros(IxDyn(shape));
    }
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        let z: f64 = StandardNormal.sample(rng);
        F::of(std * z)
    })
}

/// Where the tensors of one MoE layer sit in a [`ParamStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeParamIds {
    pub router: usize,
    pub up: usize,
    pub down: usize,
    pub bias: usize,
    pub shared_up: Option<usize>,
    pub shared_down: Option<usize>,
}

/// Shapes of one MoE layer's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeShape {
    pub width: usize,
    pub experts: usize,
    pub expert_hidden: usize,
    pub shared_experts: usize,
}

impl MoeShape {
    /// (name, group, shape) of every tensor, in store order, named `{prefix}.router` etc.
    pub fn layout(&self, prefix: &str) -> Vec<(String, Group, Vec<usize>)> {
        let (n, m, h, s) = (self.width, self.experts, self.expert_hidden, self.shared_experts);
        let mut v = vec![
            (format!("{prefix}.router"), Group::Router, vec![m, n]),
            (format!("{prefix}.expert_bias"), Group::ExpertBias, vec![m]),
            (format!("{prefix}.expert_up"), Group::ExpertUp, vec![m, h, n]),
            (format!("{prefix}.expert_down"), Group::ExpertDown, vec![m, n, h]),
        ];
        if s > 0 {
            v.push((format!("{prefix}.shared_up"), Group::ExpertUp, vec![s, h, n]));
            v.push((format!("{prefix}.shared_down"), Group::ExpertDown, vec![s, n, h]));
        }
        v
    }
}

impl MoeParamIds {
    /// Appends freshly initialised tensors of one MoE layer to `store`: router, experts and shared
    /// experts N(0, init_std^2) with their group's `init_std`; the balancing bias starts at zero.
    pub fn push_init<F: Real>(
        store: &mut ParamStore<F>,
        prefix: &str,
        shape: &MoeShape,
        hp: &Resolved,
        rng: &mut ChaCha8Rng,
    ) -> Self {
        let mut ids = Vec::new();
        for (name, group, dims) in shape.layout(prefix) {
            let std = if group == Group::ExpertBias { 0.0 } else { hp.get(group).init_std };
            ids.push(store.push(name, group, normal_init(&dims, std, rng)));
        }
        Self::from_positions(&ids)
    }

    /// Looks the layer's tensors up by name in `store` (shapes are checked by the caller's layout check).
    pub fn find<F: Real>(store: &ParamStore<F>, prefix: &str, shape: &MoeShape) -> crate::Result<Self> {
        let ids = shape
            .layout(prefix)
            .into_iter()
            .map(|(name, _, _)| {
                store.index_of(&name).ok_or_else(|| crate::Error::invalid(name.clone(), "missing from the weights"))
            })
            .collect::<crate::Result<Vec<_>>>()?;
        Ok(Self::from_positions(&ids))
    }

    fn from_positions(ids: &[usize]) -> Self {
        MoeParamIds {
            router: ids[0],
            bias: ids[1],
            up: ids[2],
            down: ids[3],
            shared_up: ids.get(4).copied(),
            shared_down: ids.get(5).copied(),
        }
    }

    /// Views of the layer's weights; fails only if a tensor has the wrong number of dimensions.
    pub fn weights<'a, F: Real>(&self, store: &'a ParamStore<F>) -> crate::Result<MoeWeights<'a, F>> {
        let p = &store.params;
        let dim_err = |i: usize| internal(format!("tensor `{}` has the wrong number of dimensions", p[i].name));
        let v2 = |i: usize| p[i].value.view().into_dimensionality::<Ix2>().map_err(|_| dim_err(i));
        let v3 = |i: usize| p[i].value.view().into_dimensionality::<Ix3>().map_err(|_| dim_err(i));
        Ok(MoeWeights {
            router: v2(self.router)?,
            up: v3(self.up)?,
            down: v3(self.down)?,
            bias: p[self.bias].value.view().into_dimensionality::<Ix1>().map_err(|_| dim_err(self.bias))?,
            shared_up: self.shared_up.map(v3).transpose()?,
            shared_down: self.shared_down.map(v3).transpose()?,
        })
    }

    /// Adds the layer's gradients into `grads` (aligned with the store). The bias gets none.
    pub fn add_grads<F: Real>(&self, g: MoeGrads<F>, grads: &mut Grads<F>) {
        grads[self.router].scaled_add(F::one(), &g.router.into_dyn());
        grads[self.up].scaled_add(F::one(), &g.up.into_dyn());
        grads[self.down].scaled_add(F::one(), &g.down.into_dyn());
        if let (Some(i), Some(v)) = (self.shared_up, g.shared_up) {
            grads[i].scaled_add(F::one(), &v.into_dyn());
        }
        if let (Some(i), Some(v)) = (self.shared_down, g.shared_down) {
            grads[i].scaled_add(F::one(), &v.into_dyn());
        }
    }
}
