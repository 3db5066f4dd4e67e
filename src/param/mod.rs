//! Parameterizations: how init, multipliers, learning rates, Adam epsilon and weight decay of every
//! parameter group scale with width, depth, experts (at fixed kappa) and expert hidden size.
//!
//! This module owns the engine that derives the exponents from the desiderata of SPEC §4, the presets
//! (`sp`, `mup`, `completep`, `moe-completep`) as instances of it, and the resolved per-group table that
//! every other module (finite networks, DMFT, checks) consumes.
//!
//! CONTRACT (other modules rely on these types; the engine fills them):
//! [`Group`], [`Axis`], [`Sizes`], [`Optimizer`], [`GroupHp`], [`Resolved`].

use serde::{Deserialize, Serialize};

pub mod config;
pub mod diff;
pub mod engine;
pub mod format;
pub mod presets;

pub use config::{ParamConfig, Table};
pub use engine::Form;

/// Resolves `cfg` at `sizes` (the same as [`ParamConfig::resolve`]; handy in notebooks).
pub fn table(cfg: &ParamConfig, sizes: &Sizes) -> crate::Result<Resolved> {
    cfg.resolve(sizes)
}

/// The full table with exponents per axis (what `moe-dmft param` prints).
pub fn full_table(cfg: &ParamConfig, sizes: &Sizes) -> crate::Result<Table> {
    cfg.resolve_table(sizes)
}

/// Parameter groups; their names (see [`Group::name`]) are part of the public interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    Embedding,
    AttnQkv,
    AttnOut,
    Router,
    ExpertUp,
    ExpertDown,
    ExpertBias,
    Norm,
    Unembedding,
    Readout,
}

impl Group {
    pub const ALL: [Group; 10] = [
        Group::Embedding,
        Group::AttnQkv,
        Group::AttnOut,
        Group::Router,
        Group::ExpertUp,
        Group::ExpertDown,
        Group::ExpertBias,
        Group::Norm,
        Group::Unembedding,
        Group::Readout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Group::Embedding => "embedding",
            Group::AttnQkv => "attn_qkv",
            Group::AttnOut => "attn_out",
            Group::Router => "router",
            Group::ExpertUp => "expert_up",
            Group::ExpertDown => "expert_down",
            Group::ExpertBias => "expert_bias",
            Group::Norm => "norm",
            Group::Unembedding => "unembedding",
            Group::Readout => "readout",
        }
    }

    pub fn from_name(name: &str) -> Option<Group> {
        Group::ALL.into_iter().find(|g| g.name() == name)
    }
}

/// The four scaling axes of SPEC §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Axis {
    /// N and n together at fixed n/N.
    Width,
    /// L, the number of blocks.
    Depth,
    /// M and k together at fixed kappa = k/M.
    Experts,
    /// n at fixed N.
    ExpertHidden,
}

impl Axis {
    pub const ALL: [Axis; 4] = [Axis::Width, Axis::Depth, Axis::Experts, Axis::ExpertHidden];

    pub fn name(self) -> &'static str {
        match self {
            Axis::Width => "width",
            Axis::Depth => "depth",
            Axis::Experts => "experts",
            Axis::ExpertHidden => "expert_hidden",
        }
    }

    pub fn from_name(name: &str) -> Option<Axis> {
        Axis::ALL.into_iter().find(|a| a.name() == name)
    }
}

/// Model sizes: width N, depth L, experts M, active k, expert hidden n.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sizes {
    pub width: usize,
    pub depth: usize,
    pub experts: usize,
    pub active: usize,
    pub expert_hidden: usize,
}

impl Sizes {
    /// kappa = k / M.
    pub fn kappa(&self) -> f64 {
        self.active as f64 / self.experts as f64
    }

    /// These sizes moved to `value` along `axis` as SPEC §2 defines the axes: along `width` the expert
    /// hidden size follows at fixed n/N, along `experts` the active count follows at fixed kappa; both
    /// must come out as integers >= 1 (exact integer arithmetic). `field` names the input in errors.
    pub fn along(&self, axis: Axis, value: usize, field: &str) -> crate::Result<Sizes> {
        if value == 0 {
            return Err(crate::Error::invalid(field, "sizes must be positive"));
        }
        let follow = |lead0: usize, follow0: usize, what: &str| {
            let num = value as u128 * follow0 as u128;
            if lead0 == 0 || num % lead0 as u128 != 0 || num < lead0 as u128 {
                return Err(crate::Error::invalid(
                    field,
                    format!("{} {value} gives a non-integer {what} (or one below 1) at {what}/{} = {follow0}/{lead0}", axis.name(), axis.name()),
                ));
            }
            Ok((num / lead0 as u128) as usize)
        };
        let mut s = *self;
        match axis {
            Axis::Width => {
                s.expert_hidden = follow(self.width, self.expert_hidden, "expert_hidden")?;
                s.width = value;
            }
            Axis::Depth => s.depth = value,
            Axis::Experts => {
                s.active = follow(self.experts, self.active, "active")?;
                s.experts = value;
            }
            Axis::ExpertHidden => s.expert_hidden = value,
        }
        Ok(s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Sgd,
    Adam,
}

/// Resolved hyperparameters of one group at the target sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupHp {
    pub group: Group,
    /// Standard deviation of the initial entries (0 allowed: e.g. a zero router).
    pub init_std: f64,
    /// Forward multiplier applied to the group's output (e.g. 1/N for a mean-field readout).
    pub multiplier: f64,
    /// Learning rate (for Adam: of the update; for SGD: of the raw gradient).
    pub lr: f64,
    /// Adam epsilon; `None` for SGD.
    pub adam_eps: Option<f64>,
    /// Decoupled weight decay coefficient (lr * wd kept fixed across sizes).
    pub weight_decay: f64,
}

/// A parameterization resolved at given sizes: what a model needs to initialise and train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolved {
    pub preset: String,
    pub optimizer: Optimizer,
    pub sizes: Sizes,
    pub base: Sizes,
    /// beta_L, the multiplier of every residual branch.
    pub residual_multiplier: f64,
    pub groups: Vec<GroupHp>,
}

impl Resolved {
    /// The hyperparameters of `group`; panics only on a programming error (a model asking for a group
    /// its parameterization does not define).
    pub fn get(&self, group: Group) -> &GroupHp {
        self.groups
            .iter()
            .find(|g| g.group == group)
            .unwrap_or_else(|| panic!("parameterization `{}` has no group `{}`", self.preset, group.name()))
    }
}
