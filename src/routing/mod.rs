//! Routing: which experts each token visits and with what gate. Top-k with softmax or sigmoid gates
//! renormalized over the active set, capacity factor with token dropping, expert prototyping (Z groups),
//! Switch load-balance loss, auxiliary-loss-free balancing bias, router z-loss, shared experts, and the
//! per-step load statistics.
//!
//! CONTRACT: [`RoutingConfig`] and [`LoadStats`] are used by `model`, `train`, `dmft` and `check`.

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
