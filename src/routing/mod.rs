//! Routing: which experts each token visits and with what gate. Top-k with softmax or sigmoid gates
//! renormalized over the active set, capacity factor with token dropping, expert prototyping (Z groups),
//! Switch load-balance loss, auxiliary-loss-free balancing bias, router z-loss, shared experts, and the
//! per-step load statistics.
//!
//! CONTRACT: [`RoutingConfig`] and [`LoadStats`] are used by `model`, `train`, `dmft` and `check`.

use ndarray::{Array2, ArrayView1, ArrayView2};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// softmax over all logits, restricted to the active set and renormalized.
    #[default]
    Softmax,
    /// sigmoid of each logit, renormalized over the active set.
    Sigmoid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TieBreak {
    /// Independent uniform jitter per (token, expert): in the limit each expert is active on each token
    /// independently with probability kappa when all logits tie (zero router at t = 0).
    #[default]
    Random,
    /// Lowest expert index wins ties (all tokens go to the same k experts at t = 0).
    Index,
}

/// How tokens are routed to experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub gate: Gate,
    pub tie_break: TieBreak,
    /// Capacity factor C: each expert takes at most ceil(C * tokens * k / M) tokens; `None` = unlimited.
    pub capacity_factor: Option<f64>,
    /// Number of prototype groups Z (M6-T); 1 = plain top-k. Requires Z | M and Z | k.
    pub prototypes: usize,
    /// Weight of the Switch auxiliary load-balance loss (0 = off).
    pub balance_loss: f64,
    /// Weight of the router z-loss (0 = off).
    pub z_loss: f64,
    /// Update rate u of the auxiliary-loss-free balancing bias (0 = off).
    pub bias_update_rate: f64,
    /// Number of shared (always active) experts, added to the routed mixture.
    pub shared_experts: usize,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            gate: Gate::Softmax,
            tie_break: TieBreak::Random,
            capacity_factor: None,
            prototypes: 1,
            balance_loss: 0.0,
            z_loss: 0.0,
            bias_update_rate: 0.0,
            shared_experts: 0,
        }
    }
}

/// Load statistics of one MoE layer for one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LoadStats {
    /// Fraction of (token, slot) assignments received by each expert (sums to 1 without drops).
    pub fraction: Vec<f64>,
    /// Coefficient of variation of `fraction` across experts.
    pub cv: f64,
    /// Fraction of (token, slot) assignments dropped by capacity.
    pub dropped: f64,
}

impl RoutingConfig {
    /// Checks the routing options against the layer's expert count `experts` (M) and active count
    /// `active` (k). Field names are those of the config file (`routing.*`).
    pub fn validate(&self, experts: usize, active: usize) -> crate::Result<()> {
        use crate::Error;
        if self.prototypes == 0 {
            return Err(Error::invalid("routing.prototypes", "must be at least 1"));
        }
        if experts % self.prototypes != 0 {
            return Err(Error::invalid(
                "routing.prototypes",
                format!("must divide the number of experts ({experts}), got {}", self.prototypes),
            ));
        }
        if active % self.prototypes != 0 {
            return Err(Error::invalid(
                "routing.prototypes",
                format!("must divide the number of active experts ({active}), got {}", self.prototypes),
            ));
        }
        if let Some(c) = self.capacity_factor {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::invalid("routing.capacity_factor", "must be finite and positive"));
            }
        }
        for (field, v) in [
            ("routing.balance_loss", self.balance_loss),
            ("routing.z_loss", self.z_loss),
            ("routing.bias_update_rate", self.bias_update_rate),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(field, "must be finite and non-negative"));
            }
        }
        Ok(())
    }

    /// Per-expert capacity ceil(C * tokens * k / M) for `tokens` tokens, or `None` when unlimited.
    pub fn capacity(&self, tokens: usize, experts: usize, active: usize) -> Option<usize> {
        self.capacity_factor
            .map(|c| (c * tokens as f64 * active as f64 / experts as f64).ceil().max(0.0) as usize)
    }
}

/// The routing decision for `tokens` tokens among `experts` experts with `active` slots per token.
///
/// Selection: the score of (token t, expert e) is `logit + bias_e`. Each token takes the `active`
/// highest scores (with prototyping, the `active / Z` highest inside each of the `Z` contiguous groups of
/// `experts / Z` experts, M6-T style). Ties are broken by [`TieBreak`]: `Index` prefers the lower expert
/// index; `Random` compares an independent uniform draw per (token, expert) taken from the rng, and only
/// among exactly equal scores, so it never reorders distinct scores. Slots are stored in descending
/// score order (same tie rule).
///
/// Gates: renormalized over the selected set S (the union of the per-group selections under
/// prototyping, which therefore differs from plain top-k in the selection only): softmax gives
/// `exp(r_e) / sum_{j in S} exp(r_j)`, sigmoid gives `sigmoid(r_e) / sum_{j in S} sigmoid(r_j)`. The
/// bias never enters the gates.
///
/// Capacity: with a capacity factor C each expert takes at most `ceil(C * T * k / M)` assignments.
/// Drop order (GShard/Switch style, slot-major): first every token's highest-scored slot in token order,
/// then every token's second slot in token order, and so on; an assignment whose expert is already
/// full is dropped. A dropped assignment contributes nothing and the remaining gates are *not*
/// renormalized (its gate mass is lost, as in Switch), so gates stay smooth functions of the logits.
#[derive(Debug, Clone)]
pub struct Routing {
    pub tokens: usize,
    pub experts: usize,
    pub active: usize,
    /// T x k: selected experts per token, descending score.
    pub selected: Array2<usize>,
    /// T x k: gate of each slot.
    pub gates: Array2<f64>,
    /// T x k: false when the assignment was dropped by capacity.
    pub kept: Array2<bool>,
    /// Capacity per expert in force for this call (`None` = unlimited).
    pub capacity: Option<usize>,
    gate: Gate,
    /// T x k: sigmoid of the selected logits (sigmoid gates only; empty otherwise).
    sigmoid: Array2<f64>,
    /// T: sum of the selected sigmoids (sigmoid gates only).
    sigmoid_sum: Vec<f64>,
}

/// Routes the tokens given router logits (T x M, multiplier already applied) and the balancing bias
/// (M). `rng` is used only by `TieBreak::Random`; it draws exactly T * M numbers in row-major order, so
/// the stream consumed does not depend on the logits.
pub fn route(
    logits: ArrayView2<f64>,
    bias: ArrayView1<f64>,
    active: usize,
    cfg: &RoutingConfig,
    rng: &mut ChaCha8Rng,
) -> crate::Result<Routing> {
    let (tokens, experts) = logits.dim();
    if bias.len() != experts {
        return Err(crate::Error::invalid("routing.bias", format!("has {} entries, expected {experts}", bias.len())));
    }
    if active == 0 || active > experts {
        return Err(crate::Error::invalid(
            "sizes.active",
            format!("must be between 1 and the number of experts ({experts}), got {active}"),
        ));
    }
    cfg.validate(experts, active)?;
    let jitter: Option<Array2<u64>> = match cfg.tie_break {
        TieBreak::Random => Some(Array2::from_shape_simple_fn((tokens, experts), || rng.gen::<u64>())),
        TieBreak::Index => None,
    };
    let z = cfg.prototypes;
    let group = experts / z;
    let per_group = active / z;

    // Selection is independent per token: run it in parallel, collect rows in token order.
    let rows: Vec<(Vec<usize>, Vec<f64>, Vec<f64>, f64)> = (0..tokens)
        .into_par_iter()
        .map(|t| {
            // NaN (a diverging run) ranks last so the order stays total and sorting cannot panic; adding
            // +0.0 turns -0.0 into +0.0 so signed zeros from a zero router still tie.
            let score = |e: usize| {
                let s = logits[[t, e]] + bias[e] + 0.0;
                if s.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    s
                }
            };
            // Less means expert a ranks before expert b.
            let cmp = |a: &usize, b: &usize| -> std::cmp::Ordering {
                let (sa, sb) = (score(*a), score(*b));
                sb.total_cmp(&sa).then_with(|| match &jitter {
                    Some(j) => j[[t, *b]].cmp(&j[[t, *a]]).then(a.cmp(b)),
                    None => a.cmp(b),
                })
            };
            let mut sel: Vec<usize> = Vec::with_capacity(active);
            for g in 0..z {
                let mut idx: Vec<usize> = (g * group..(g + 1) * group).collect();
                if per_group < idx.len() {
                    idx.select_nth_unstable_by(per_group - 1, cmp);
                    idx.truncate(per_group);
                }
                sel.extend_from_slice(&idx);
            }
            sel.sort_by(cmp);
            let r: Vec<f64> = sel.iter().map(|&e| logits[[t, e]]).collect();
            match cfg.gate {
                Gate::Softmax => {
                    let mx = r.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ex: Vec<f64> = r.iter().map(|v| (v - mx).exp()).collect();
                    let s: f64 = ex.iter().sum();
                    (sel, ex.iter().map(|v| v / s).collect(), Vec::new(), 0.0)
                }
                Gate::Sigmoid => {
                    let sg: Vec<f64> = r.iter().map(|&v| sigmoid(v)).collect();
                    let s: f64 = sg.iter().sum();
                    (sel, sg.iter().map(|v| v / s).collect(), sg, s)
                }
            }
        })
        .collect();

    let mut selected = Array2::<usize>::zeros((tokens, active));
    let mut gates = Array2::<f64>::zeros((tokens, active));
    let mut sigmoid_vals =
        if cfg.gate == Gate::Sigmoid { Array2::<f64>::zeros((tokens, active)) } else { Array2::zeros((0, 0)) };
    let mut sigmoid_sum = Vec::new();
    for (t, (sel, g, sg, s)) in rows.into_iter().enumerate() {
        for j in 0..active {
            selected[[t, j]] = sel[j];
            gates[[t, j]] = g[j];
            if cfg.gate == Gate::Sigmoid {
                sigmoid_vals[[t, j]] = sg[j];
            }
        }
        if cfg.gate == Gate::Sigmoid {
            sigmoid_sum.push(s);
        }
    }

    let capacity = cfg.capacity(tokens, experts, active);
    let mut kept = Array2::from_elem((tokens, active), true);
    if let Some(cap) = capacity {
        let mut filled = vec![0usize; experts];
        for j in 0..active {
            for t in 0..tokens {
                let e = selected[[t, j]];
                if filled[e] < cap {
                    filled[e] += 1;
                } else {
                    kept[[t, j]] = false;
                }
            }
        }
    }
    Ok(Routing {
        tokens,
        experts,
        active,
        selected,
        gates,
        kept,
        capacity,
        gate: cfg.gate,
        sigmoid: sigmoid_vals,
        sigmoid_sum,
    })
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

impl Routing {
    /// Backward of the gates: given dL/dgate (T x k) returns dL/dlogits (T x M). Selection and capacity
    /// are piecewise constant in the logits and contribute nothing.
    pub fn gates_backward(&self, grad_gates: ArrayView2<f64>) -> Array2<f64> {
        let mut out = Array2::<f64>::zeros((self.tokens, self.experts));
        for t in 0..self.tokens {
            // sum_j g_j dL/dg_j, shared by both gate kinds.
            let dot: f64 = (0..self.active).map(|j| self.gates[[t, j]] * grad_gates[[t, j]]).sum();
            for j in 0..self.active {
                let e = self.selected[[t, j]];
                let centred = grad_gates[[t, j]] - dot;
                out[[t, e]] += match self.gate {
                    Gate::Softmax => self.gates[[t, j]] * centred,
                    Gate::Sigmoid => {
                        let s = self.sigmoid[[t, j]];
                        centred / self.sigmoid_sum[t] * s * (1.0 - s)
                    }
                };
            }
        }
        out
    }

    /// Number of assignments each expert received: (selected before capacity, kept after capacity).
    pub fn counts(&self) -> (Vec<usize>, Vec<usize>) {
        let mut selected = vec![0usize; self.experts];
        let mut kept = vec![0usize; self.experts];
        for (&e, &k) in self.selected.iter().zip(self.kept.iter()) {
            selected[e] += 1;
            if k {
                kept[e] += 1;
            }
        }
        (selected, kept)
    }

    /// Load statistics: kept assignments per expert over all T * k assignments, their coefficient of
    /// variation (population std / mean across experts; 0 when nothing was kept) and the dropped fraction.
    pub fn load_stats(&self) -> LoadStats {
        let (_, kept) = self.counts();
        let total = (self.tokens * self.active).max(1) as f64;
        let fraction: Vec<f64> = kept.iter().map(|&c| c as f64 / total).collect();
        let m = self.experts as f64;
        let mean = fraction.iter().sum::<f64>() / m;
        let var = fraction.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / m;
        let cv = if mean > 0.0 { var.sqrt() / mean } else { 0.0 };
        let kept_total: usize = kept.iter().sum();
        let dropped = if self.tokens == 0 { 0.0 } else { 1.0 - kept_total as f64 / total };
        LoadStats { fraction, cv, dropped }
    }
}

/// The weighted auxiliary losses on the router logits and their gradient (T x M):
/// - Switch load balance, `balance_loss * M * sum_e f_e P_e`, with `f_e` the fraction of the T * k
///   selections (before capacity) that went to expert e (held constant: it is piecewise constant) and
///   `P_e` the mean over tokens of the full softmax of the logits (whatever the gate kind). It equals
///   `balance_loss` under perfect balance.
/// - router z-loss, `z_loss * mean_t (logsumexp_e r_te)^2`.
pub fn aux_losses(logits: ArrayView2<f64>, routing: &Routing, cfg: &RoutingConfig) -> (f64, Array2<f64>) {
    let (tokens, experts) = logits.dim();
    let mut grad = Array2::<f64>::zeros((tokens, experts));
    if tokens == 0 || (cfg.balance_loss == 0.0 && cfg.z_loss == 0.0) {
        return (0.0, grad);
    }
    let t_f = tokens as f64;
    let m_f = experts as f64;
    let (sel_counts, _) = routing.counts();
    let f: Vec<f64> = sel_counts.iter().map(|&c| c as f64 / (tokens * routing.active) as f64).collect();
    let mut p_mean = vec![0.0; experts];
    let mut loss = 0.0;
    let mut z_sum = 0.0;
    for t in 0..tokens {
        let row = logits.row(t);
        let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let ex: Vec<f64> = row.iter().map(|v| (v - mx).exp()).collect();
        let s: f64 = ex.iter().sum();
        let lse = mx + s.ln();
        let p: Vec<f64> = ex.iter().map(|v| v / s).collect();
        if cfg.balance_loss != 0.0 {
            let fp: f64 = (0..experts).map(|e| f[e] * p[e]).sum();
            let scale = cfg.balance_loss * m_f / t_f;
            for e in 0..experts {
                p_mean[e] += p[e] / t_f;
                grad[[t, e]] += scale * p[e] * (f[e] - fp);
            }
        }
        if cfg.z_loss != 0.0 {
            z_sum += lse * lse;
            let scale = cfg.z_loss * 2.0 * lse / t_f;
            for e in 0..experts {
                grad[[t, e]] += scale * p[e];
            }
        }
    }
    if cfg.balance_loss != 0.0 {
        loss += cfg.balance_loss * m_f * (0..experts).map(|e| f[e] * p_mean[e]).sum::<f64>();
    }
    if cfg.z_loss != 0.0 {
        loss += cfg.z_loss * z_sum / t_f;
    }
    (loss, grad)
}

/// Auxiliary-loss-free balancing (DeepSeek-V3 style): `b_e += rate * sign(target - load_e)` with
/// `load_e = load.fraction[e]` and target the mean load `sum_e load_e / M` (= 1/M without drops; with
/// drops the same shortfall is shared by all experts). `sign(0) = 0`: a balanced expert keeps its bias.
pub fn update_bias<F: crate::model::Real>(mut bias: ndarray::ArrayViewMut1<F>, load: &LoadStats, rate: f64) {
    if rate == 0.0 || load.fraction.is_empty() {
        return;
    }
    let target = load.fraction.iter().sum::<f64>() / load.fraction.len() as f64;
    for (b, &l) in bias.iter_mut().zip(load.fraction.iter()) {
        let d = target - l;
        let step = if d > 0.0 {
            rate
        } else if d < 0.0 {
            -rate
        } else {
            0.0
        };
        *b = *b + F::of(step);
    }
}
