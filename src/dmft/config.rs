//! The solver's input: task, architecture of the limit (activation, kappa, depth, routing variant),
//! base hyperparameters, number of steps and numerical resolution. There is deliberately no width,
//! expert count or expert hidden size: those are infinite.

use serde::{Deserialize, Serialize};

use crate::data::TaskConfig;
use crate::model::Activation;
use crate::routing::RoutingConfig;
use crate::Error;

/// Per-group multipliers of the base learning rate `eta0` (1 = the mean-field SGD instance of SPEC §4;
/// 0 freezes the group, e.g. `router = 0` for a frozen router).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LrScale {
    pub embedding: f64,
    pub readout: f64,
    pub router: f64,
    pub expert_up: f64,
    pub expert_down: f64,
}

impl Default for LrScale {
    fn default() -> Self {
        LrScale {
            embedding: 1.0,
            readout: 1.0,
            router: 1.0,
            expert_up: 1.0,
            expert_down: 1.0,
        }
    }
}

/// When the uniform draws that break exact ties between routing scores are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TieJitter {
    /// A fresh draw per (sample, expert) at every step, like `routing::route` called once per step.
    #[default]
    PerStep,
    /// One draw per (sample, expert) for the whole run: an infinitesimal random router initialization.
    /// With a frozen router the active sets then never change (the exactly solvable case).
    Fixed,
}

/// Numerical resolution of the Monte Carlo solver; none of these is a size of the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Resolution {
    /// Expert single sites sampled per repeat; `kappa * expert_samples` must be an integer.
    pub expert_samples: usize,
    /// Neuron single sites sampled inside each expert site.
    pub neuron_samples: usize,
    /// Independent repeats (different seeds); the error bars are their standard error (needs >= 2).
    pub repeats: usize,
}

impl Default for Resolution {
    fn default() -> Self {
        Resolution {
            expert_samples: 1024,
            neuron_samples: 128,
            repeats: 2,
        }
    }
}

/// Everything the DMFT solver needs. Build with `SolveConfig::default()` and struct update syntax or
/// the `with_*` helpers; read from TOML with [`SolveConfig::from_toml_str`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SolveConfig {
    /// The synthetic task used by `moe-dmft solve` (library callers may pass any task to `solve`).
    pub task: TaskConfig,
    /// Nonlinearity of the expert hidden layer.
    pub activation: Activation,
    /// Active fraction k/M of experts.
    pub kappa: f64,
    /// Number of MoE blocks L (finite: the branch multiplier is 1/L).
    pub depth: usize,
    /// Richness gamma0 of the mean-field readout `f = w . h / (gamma0 N)`.
    pub gamma0: f64,
    /// Base learning rate; every group's SGD rate is `eta0 * gamma0^2 * lr_scale.<group>` times the
    /// size factors of SPEC §4 (which the limit absorbs).
    pub eta0: f64,
    pub lr_scale: LrScale,
    /// Gradient-descent steps T; outputs are recorded at steps 0..=T.
    pub steps: usize,
    pub routing: RoutingConfig,
    pub tie_jitter: TieJitter,
    pub resolution: Resolution,
    pub seed: u64,
    /// rayon threads (None = rayon's default). Results do not depend on it.
    pub threads: Option<usize>,
}

impl Default for SolveConfig {
    fn default() -> Self {
        SolveConfig {
            task: TaskConfig::default(),
            activation: Activation::default(),
            kappa: 0.25,
            depth: 1,
            gamma0: 1.0,
            eta0: 0.2,
            lr_scale: LrScale::default(),
            steps: 20,
            routing: RoutingConfig::default(),
            tie_jitter: TieJitter::default(),
            resolution: Resolution::default(),
            seed: 0,
            threads: None,
        }
    }
}

/// Keys that name a finite size; the limit has none, so they are rejected with a dedicated message.
const SIZE_KEYS: [&str; 13] = [
    "width",
    "experts",
    "active",
    "expert_hidden",
    "sizes",
    "n_embd",
    "n_exp",
    "n_hid",
    "N",
    "M",
    "n",
    "k",
    "base",
];

impl SolveConfig {
    pub fn with_resolution(
        mut self,
        expert_samples: usize,
        neuron_samples: usize,
        repeats: usize,
    ) -> Self {
        self.resolution = Resolution {
            expert_samples,
            neuron_samples,
            repeats,
        };
        self
    }

    pub fn with_steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    pub fn with_task(mut self, task: TaskConfig) -> Self {
        self.task = task;
        self
    }

    /// Parses a TOML config. A finite size (`width`, `experts`, `expert_hidden`, ...) anywhere at the
    /// top level or in a `[model]`/`[sizes]` table is an [`Error::Invalid`] naming it.
    pub fn from_toml_str(text: &str) -> crate::Result<SolveConfig> {
        let value: toml::Table = text.parse().map_err(|e: toml::de::Error| Error::Parse {
            path: "<solve config>".into(),
            reason: e.to_string(),
        })?;
        let mut tables: Vec<(&str, &toml::Table)> = vec![("", &value)];
        for name in ["model", "resolution"] {
            if let Some(toml::Value::Table(t)) = value.get(name) {
                tables.push((name, t));
            }
        }
        for (prefix, table) in tables {
            for key in table.keys() {
                if SIZE_KEYS.contains(&key.as_str()) {
                    let field = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    return Err(Error::invalid(
                        field,
                        "the DMFT solves the limit N, M, n -> infinity at fixed kappa, so width, expert count \
                         and expert hidden size are not inputs; set `kappa` and the numerical resolution \
                         (`resolution.expert_samples`, `resolution.neuron_samples`, `resolution.repeats`)",
                    ));
                }
            }
        }
        let cfg: SolveConfig = value
            .try_into()
            .map_err(|e: toml::de::Error| Error::Parse {
                path: "<solve config>".into(),
                reason: e.to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every field; errors name the field and the rule.
    pub fn validate(&self) -> crate::Result<()> {
        self.task.validate()?;
        if !(self.kappa.is_finite() && self.kappa > 0.0 && self.kappa <= 1.0) {
            return Err(Error::invalid("kappa", "must be in (0, 1]"));
        }
        if self.depth == 0 {
            return Err(Error::invalid("depth", "must be at least 1"));
        }
        if !(self.gamma0.is_finite() && self.gamma0 > 0.0) {
            return Err(Error::invalid("gamma0", "must be finite and positive"));
        }
        if !(self.eta0.is_finite() && self.eta0 >= 0.0) {
            return Err(Error::invalid("eta0", "must be finite and non-negative"));
        }
        let s = &self.lr_scale;
        for (field, v) in [
            ("lr_scale.embedding", s.embedding),
            ("lr_scale.readout", s.readout),
            ("lr_scale.router", s.router),
            ("lr_scale.expert_up", s.expert_up),
            ("lr_scale.expert_down", s.expert_down),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(field, "must be finite and non-negative"));
            }
        }
        let r = &self.resolution;
        if r.expert_samples == 0 {
            return Err(Error::invalid(
                "resolution.expert_samples",
                "must be at least 1",
            ));
        }
        if r.neuron_samples == 0 {
            return Err(Error::invalid(
                "resolution.neuron_samples",
                "must be at least 1",
            ));
        }
        if r.repeats == 0 {
            return Err(Error::invalid("resolution.repeats", "must be at least 1"));
        }
        let active = self.kappa * r.expert_samples as f64;
        if (active - active.round()).abs() > 1e-9 || active.round() < 1.0 {
            return Err(Error::invalid(
                "resolution.expert_samples",
                format!(
                    "kappa * expert_samples must be a positive integer (the sampled quantile keeps that many \
                     sites active), got {} * {} = {active}",
                    self.kappa, r.expert_samples
                ),
            ));
        }
        let rt = &self.routing;
        if rt.prototypes == 0 {
            return Err(Error::invalid("routing.prototypes", "must be at least 1"));
        }
        if let Some(c) = rt.capacity_factor {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::invalid(
                    "routing.capacity_factor",
                    "must be finite and positive",
                ));
            }
        }
        if !(rt.bias_update_rate.is_finite() && rt.bias_update_rate >= 0.0) {
            return Err(Error::invalid(
                "routing.bias_update_rate",
                "must be finite and non-negative",
            ));
        }
        if !(rt.balance_loss.is_finite() && rt.balance_loss >= 0.0) {
            return Err(Error::invalid("routing.balance_loss", "must be finite and non-negative"));
        }
        if rt.z_loss != 0.0 {
            return Err(Error::invalid(
                "routing.z_loss",
                "the DMFT solver does not model the router z-loss; use 0",
            ));
        }
        if rt.shared_experts != 0 {
            return Err(Error::invalid(
                "routing.shared_experts",
                "the DMFT solver does not model shared experts; use 0",
            ));
        }
        if self.threads == Some(0) {
            return Err(Error::invalid("threads", "must be at least 1 when given"));
        }
        Ok(())
    }
}
