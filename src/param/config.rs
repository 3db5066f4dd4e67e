//! The `[param]` section of a config and its resolution at given sizes: validation at the boundary,
//! the engine's exponents per axis (the preset's axes from the rules, the others from SP), user
//! overrides, and the values at the target sizes.
//!
//! Conventions for values (see `docs/theory.md` §Parameterization):
//! - init std and multiplier are *absolute*: at the base sizes they are the base constant (`sigma`,
//!   `sigma_router`, `alpha_in`, `alpha_out`) times the sizes to their exponents (e.g. a hidden layer's
//!   std is `sigma / sqrt(N0)` at base, the readout multiplier `alpha_out / N0`), so the base network is a
//!   sensible network whatever the base sizes;
//! - learning rate, Adam epsilon and weight decay are *relative*: at the base sizes they are the tuned
//!   values (`lr`, `adam_eps`, `weight_decay`), and they move with `(size / base)^exponent`;
//! - in the mean-field form (the DMFT's SGD instance) everything is absolute, learning rates included:
//!   `lr` is `eta0` and each group's learning rate is `eta0 * gamma0^2 * N^a n^b k^c L^d`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::engine::{sp_init_var, AxisValues, Dim, Engine, Form, GroupSpec, InitClass, Prim, Role};
use super::presets::{builtin_specs, Preset};
use super::{Axis, Group, GroupHp, Optimizer, Resolved, Sizes};

/// What a config file's `[param]` section holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParamConfig {
    /// `sp`, `mup`, `completep` or `moe-completep`.
    pub preset: String,
    pub optimizer: Optimizer,
    /// `standard` (scalings in the init) or `mean-field` (every weight O(1), scalings in the multipliers:
    /// the DMFT's SGD instance; needs `optimizer = "sgd"` and `preset = "moe-completep"`).
    pub form: Form,
    /// Learning rate at the base sizes (mean-field form: eta0).
    pub lr: f64,
    /// Sizes the HPs were tuned at; `None` means the target sizes (every scaling factor 1).
    pub base: Option<Sizes>,
    /// Init std constant of every weight matrix (hidden: std = sigma / sqrt(fan_in)).
    pub sigma: f64,
    /// Init std constant of the router (readout-like: std = sigma_router / N); 0 = zero router,
    /// whose tied logits top-k breaks at random.
    pub sigma_router: f64,
    /// Multiplier of the embedding.
    pub alpha_in: f64,
    /// Multiplier constant of the readout and unembedding (multiplier = alpha_out / N).
    pub alpha_out: f64,
    /// Feature-learning strength of the mean-field form (readout multiplier 1/(gamma0 N), lr x gamma0^2).
    pub gamma0: f64,
    /// Input dimension D (mean-field form: embedding multiplier 1/sqrt(D)).
    pub input_dim: usize,
    /// Adam epsilon at the base sizes.
    pub adam_eps: f64,
    /// Decoupled weight decay at the base sizes (lr x weight_decay is kept fixed per group).
    pub weight_decay: f64,
    /// beta_L at the base depth (mean-field form: multiplied by 1/L0).
    pub residual_multiplier: f64,
    /// Per-group overrides and user-defined groups, by name.
    pub groups: BTreeMap<String, GroupConfig>,
}

impl Default for ParamConfig {
    fn default() -> Self {
        ParamConfig {
            preset: "moe-completep".into(),
            optimizer: Optimizer::Adam,
            form: Form::Standard,
            lr: 1.0,
            base: None,
            sigma: 1.0,
            sigma_router: 0.0,
            alpha_in: 1.0,
            alpha_out: 1.0,
            gamma0: 1.0,
            input_dim: 1,
            adam_eps: 1e-8,
            weight_decay: 0.0,
            residual_multiplier: 1.0,
            groups: BTreeMap::new(),
        }
    }
}

/// A user's change to a built-in group or the description of a new group. A new group needs
/// `fan_in`, `fan_out` and `role`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupConfig {
    pub fan_in: Option<Dim>,
    pub fan_out: Option<Dim>,
    pub role: Option<Role>,
    pub residual_branch: Option<bool>,
    /// Name of the group that reads this group's output inside its branch.
    pub feeds: Option<String>,
    pub init: Option<InitClass>,
    /// Replaces `sigma` (or `sigma_router`) for this group.
    pub init_std: Option<f64>,
    /// Replaces the multiplier constant (`alpha_in`, `alpha_out` or 1).
    pub multiplier: Option<f64>,
    /// Multiplies the base learning rate of this group.
    pub lr_scale: Option<f64>,
    /// Replaces `adam_eps` for this group.
    pub adam_eps: Option<f64>,
    /// Replaces `weight_decay` for this group.
    pub weight_decay: Option<f64>,
    /// Exponent overrides per axis.
    pub exponents: AxisOverrides,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AxisOverrides {
    pub width: Option<ExponentOverride>,
    pub depth: Option<ExponentOverride>,
    pub experts: Option<ExponentOverride>,
    pub expert_hidden: Option<ExponentOverride>,
}

impl AxisOverrides {
    pub fn get(&self, axis: Axis) -> Option<&ExponentOverride> {
        match axis {
            Axis::Width => self.width.as_ref(),
            Axis::Depth => self.depth.as_ref(),
            Axis::Experts => self.experts.as_ref(),
            Axis::ExpertHidden => self.expert_hidden.as_ref(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExponentOverride {
    pub init_var: Option<f64>,
    pub multiplier: Option<f64>,
    pub lr: Option<f64>,
    pub adam_eps: Option<f64>,
}

/// Exponents of one group along one axis (JSON of SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QuantityExponents {
    pub init_var: f64,
    pub multiplier: f64,
    pub lr: f64,
    /// `None` for SGD.
    pub adam_eps: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Exponents {
    pub width: QuantityExponents,
    pub depth: QuantityExponents,
    pub experts: QuantityExponents,
    pub expert_hidden: QuantityExponents,
}

impl Exponents {
    pub fn get(&self, axis: Axis) -> &QuantityExponents {
        match axis {
            Axis::Width => &self.width,
            Axis::Depth => &self.depth,
            Axis::Experts => &self.experts,
            Axis::ExpertHidden => &self.expert_hidden,
        }
    }
}

/// One group of the exported table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    /// The built-in group, `None` for a user-defined one.
    #[serde(skip)]
    pub group: Option<Group>,
    pub init_std: f64,
    pub multiplier: f64,
    pub lr: f64,
    pub adam_eps: Option<f64>,
    pub weight_decay: f64,
    pub exponents: Exponents,
    /// Predicted exponents of the RMS of the stored entries' gradient per axis (for coordinate checks;
    /// equal to the Adam-epsilon exponents on the axes the preset scales).
    #[serde(skip)]
    pub grad_rms: AxisValues,
}

/// A parameterization resolved at given sizes, with its exponents: what `moe-dmft param` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub preset: String,
    pub optimizer: Optimizer,
    pub sizes: Sizes,
    pub base: Sizes,
    pub residual_multiplier: f64,
    pub groups: Vec<Row>,
    /// Exponents of beta_L per axis.
    #[serde(skip)]
    pub residual_exponents: AxisValues,
}

impl Table {
    pub fn row(&self, name: &str) -> Option<&Row> {
        self.groups.iter().find(|r| r.name == name)
    }

    /// The part of the table the models consume (built-in groups only).
    pub fn to_resolved(&self) -> Resolved {
        Resolved {
            preset: self.preset.clone(),
            optimizer: self.optimizer,
            sizes: self.sizes,
            base: self.base,
            residual_multiplier: self.residual_multiplier,
            groups: self
                .groups
                .iter()
                .filter_map(|r| {
                    r.group.map(|group| GroupHp {
                        group,
                        init_std: r.init_std,
                        multiplier: r.multiplier,
                        lr: r.lr,
                        adam_eps: r.adam_eps,
                        weight_decay: r.weight_decay,
                    })
                })
                .collect(),
        }
    }
}

/// The scaling factor of each axis from `base` to `sizes`: width N/N0; expert_hidden the change of n
/// beyond what width already did, (n/n0)/(N/N0); depth L/L0; experts M/M0.
pub fn axis_factors(sizes: &Sizes, base: &Sizes) -> AxisValues {
    let r = |a: usize, b: usize| a as f64 / b as f64;
    AxisValues {
        width: r(sizes.width, base.width),
        depth: r(sizes.depth, base.depth),
        experts: r(sizes.experts, base.experts),
        expert_hidden: r(sizes.expert_hidden, base.expert_hidden) / r(sizes.width, base.width),
    }
}

/// `prod_axis factor^exponent`.
pub fn scale(factors: &AxisValues, exponents: &AxisValues) -> f64 {
    Axis::ALL.iter().map(|&a| factors.get(a).powf(exponents.get(a))).product()
}

fn check_finite(field: &str, v: f64, positive: bool, allow_zero: bool) -> crate::Result<()> {
    if !v.is_finite() {
        return Err(crate::Error::invalid(field, format!("must be finite, got {v}")));
    }
    if positive && (v < 0.0 || (v == 0.0 && !allow_zero)) {
        let rule = if allow_zero { "must be non-negative" } else { "must be positive" };
        return Err(crate::Error::invalid(field, format!("{rule}, got {v}")));
    }
    Ok(())
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Checks one set of sizes: every size at least 1 and `active <= experts`. `prefix` is `""` or `"base."`.
pub fn validate_sizes(s: &Sizes, prefix: &str) -> crate::Result<()> {
    for (name, v) in [
        ("width", s.width),
        ("depth", s.depth),
        ("experts", s.experts),
        ("active", s.active),
        ("expert_hidden", s.expert_hidden),
    ] {
        if v == 0 {
            return Err(crate::Error::invalid(format!("{prefix}{name}"), "must be at least 1"));
        }
    }
    if s.active > s.experts {
        return Err(crate::Error::invalid(
            format!("{prefix}active"),
            format!("active experts per token ({}) exceeds the number of experts ({})", s.active, s.experts),
        ));
    }
    Ok(())
}

/// Checks that the target sizes keep the base kappa = k/M (the `experts` axis moves M and k together).
pub fn validate_kappa(sizes: &Sizes, base: &Sizes) -> crate::Result<()> {
    // u128: products of two usize sizes cannot overflow.
    let w = |v: usize| v as u128;
    if w(sizes.active) * w(base.experts) == w(base.active) * w(sizes.experts) {
        return Ok(());
    }
    let g = gcd(base.active, base.experts);
    let (kb, mb) = (w(base.active / g), w(base.experts / g));
    let implied = if (w(sizes.experts) * kb) % mb == 0 {
        format!("at experts = {} that kappa implies active = {}", sizes.experts, w(sizes.experts) * kb / mb)
    } else {
        format!(
            "at experts = {} that kappa gives a non-integer active = {:.4}; choose experts a multiple of {}",
            sizes.experts,
            sizes.experts as f64 * kb as f64 / mb as f64,
            mb
        )
    };
    Err(crate::Error::invalid(
        "active",
        format!(
            "kappa not preserved: active/experts = {}/{} but base active/experts = {}/{} (kappa = {}/{}); {}",
            sizes.active, sizes.experts, base.active, base.experts, kb, mb, implied
        ),
    ))
}

/// Every `feeds` names a defined group and following `feeds` never comes back to where it started.
fn check_feeds(specs: &[GroupSpec]) -> crate::Result<()> {
    for spec in specs {
        let mut current = spec;
        for _ in 0..=specs.len() {
            let Some(next) = &current.feeds else { break };
            current = specs.iter().find(|s| &s.name == next).ok_or_else(|| {
                crate::Error::invalid(format!("groups.{}.feeds", current.name), format!("names `{next}`, which is not a group"))
            })?;
            if current.name == spec.name {
                return Err(crate::Error::invalid(format!("groups.{}.feeds", spec.name), "forms a cycle"));
            }
        }
    }
    Ok(())
}

impl ParamConfig {
    /// Checks the scalar fields (sizes are checked in [`ParamConfig::resolve_table`]).
    pub fn validate(&self) -> crate::Result<()> {
        Preset::by_name(&self.preset)?;
        check_finite("lr", self.lr, true, false)?;
        check_finite("sigma", self.sigma, true, true)?;
        check_finite("sigma_router", self.sigma_router, true, true)?;
        check_finite("alpha_in", self.alpha_in, true, false)?;
        check_finite("alpha_out", self.alpha_out, true, false)?;
        check_finite("gamma0", self.gamma0, true, false)?;
        check_finite("adam_eps", self.adam_eps, true, false)?;
        check_finite("weight_decay", self.weight_decay, true, true)?;
        check_finite("residual_multiplier", self.residual_multiplier, true, false)?;
        if self.input_dim == 0 {
            return Err(crate::Error::invalid("input_dim", "must be at least 1"));
        }
        if self.form == Form::MeanField {
            if self.optimizer != Optimizer::Sgd {
                return Err(crate::Error::invalid("form", "the mean-field form is the SGD instance: needs optimizer = \"sgd\""));
            }
            if self.preset != "moe-completep" {
                return Err(crate::Error::invalid("form", "the mean-field form scales all four axes: needs preset = \"moe-completep\""));
            }
        }
        for (name, g) in &self.groups {
            let f = |k: &str| format!("groups.{name}.{k}");
            if name.is_empty() {
                return Err(crate::Error::invalid("groups", "a group name must not be empty"));
            }
            if let Some(v) = g.init_std {
                check_finite(&f("init_std"), v, true, true)?;
            }
            if let Some(v) = g.multiplier {
                check_finite(&f("multiplier"), v, true, false)?;
            }
            if let Some(v) = g.lr_scale {
                check_finite(&f("lr_scale"), v, true, false)?;
            }
            if let Some(v) = g.adam_eps {
                check_finite(&f("adam_eps"), v, true, false)?;
            }
            if let Some(v) = g.weight_decay {
                check_finite(&f("weight_decay"), v, true, true)?;
            }
            for axis in Axis::ALL {
                if let Some(o) = g.exponents.get(axis) {
                    for (q, v) in [("init_var", o.init_var), ("multiplier", o.multiplier), ("lr", o.lr), ("adam_eps", o.adam_eps)] {
                        if let Some(v) = v {
                            check_finite(&format!("groups.{name}.exponents.{}.{q}", axis.name()), v, false, false)?;
                        }
                    }
                }
            }
            if Group::from_name(name).is_none() && (g.fan_in.is_none() || g.fan_out.is_none() || g.role.is_none()) {
                return Err(crate::Error::invalid(
                    format!("groups.{name}"),
                    "is not a built-in group; a new group needs `fan_in`, `fan_out` and `role`",
                ));
            }
        }
        Ok(())
    }

    /// The group descriptors after the user's changes: built-ins first, then new groups by name.
    pub fn specs(&self) -> Vec<GroupSpec> {
        let mut specs = builtin_specs();
        for (name, g) in &self.groups {
            let pos = match specs.iter().position(|s| &s.name == name) {
                Some(p) => p,
                None => {
                    specs.push(GroupSpec {
                        name: name.clone(),
                        fan_in: Dim::Fixed,
                        fan_out: Dim::Fixed,
                        role: Role::Hidden,
                        residual_branch: false,
                        feeds: None,
                        init: None,
                    });
                    specs.len() - 1
                }
            };
            let s = &mut specs[pos];
            if let Some(v) = g.fan_in {
                s.fan_in = v;
            }
            if let Some(v) = g.fan_out {
                s.fan_out = v;
            }
            if let Some(v) = g.role {
                s.role = v;
            }
            if let Some(v) = g.residual_branch {
                s.residual_branch = v;
            }
            if let Some(v) = &g.feeds {
                s.feeds = Some(v.clone());
            }
            if let Some(v) = g.init {
                s.init = Some(v);
            }
        }
        specs
    }

    /// Resolves the parameterization at `sizes` (what models consume).
    pub fn resolve(&self, sizes: &Sizes) -> crate::Result<Resolved> {
        Ok(self.resolve_table(sizes)?.to_resolved())
    }

    /// Resolves the full table with exponents (what `moe-dmft param` prints).
    pub fn resolve_table(&self, sizes: &Sizes) -> crate::Result<Table> {
        self.validate()?;
        validate_sizes(sizes, "")?;
        let base = self.base.unwrap_or(*sizes);
        validate_sizes(&base, "base.")?;
        validate_kappa(sizes, &base)?;
        let preset = Preset::by_name(&self.preset)?;
        let specs = self.specs();
        check_feeds(&specs)?;
        let engine = Engine { specs: &specs, optimizer: self.optimizer, form: self.form };
        let factors = axis_factors(sizes, &base);
        let (n0, h0, k0, l0) = (base.width as f64, base.expert_hidden as f64, base.active as f64, base.depth as f64);
        let adam = self.optimizer == Optimizer::Adam;
        let mean_field = self.form == Form::MeanField;

        let mut rows = Vec::with_capacity(specs.len());
        for spec in &specs {
            let derived = engine.derive(spec)?;
            let init = engine.init_class(spec);
            let sp_var = sp_init_var(spec, init);
            let user = self.groups.get(&spec.name);
            let mut init_var = AxisValues::default();
            let mut mult = AxisValues::default();
            let mut lr = AxisValues::default();
            let mut eps = AxisValues::default();
            for axis in Axis::ALL {
                if preset.scales(axis) {
                    init_var.set(axis, derived.init_var.along(axis));
                    mult.set(axis, derived.multiplier.along(axis));
                    lr.set(axis, derived.lr.along(axis));
                    eps.set(axis, derived.grad_rms.get(axis));
                } else {
                    init_var.set(axis, sp_var.along(axis));
                }
                if let Some(o) = user.and_then(|u| u.exponents.get(axis)) {
                    if let Some(v) = o.init_var {
                        init_var.set(axis, v);
                    }
                    if let Some(v) = o.multiplier {
                        mult.set(axis, v);
                    }
                    if let Some(v) = o.lr {
                        lr.set(axis, v);
                    }
                    if let Some(v) = o.adam_eps {
                        eps.set(axis, v);
                    }
                }
            }
            // A selection bias is updated at a fixed rate by the balancing rule, not by the optimizer.
            if spec.role == Role::SelectionBias {
                init_var = AxisValues::default();
                mult = AxisValues::default();
                lr = AxisValues::default();
                eps = AxisValues::default();
            }
            let std_prim = Prim::from_axes(&init_var).scale(0.5);
            let mult_prim = Prim::from_axes(&mult);
            let sigma_g = user.and_then(|u| u.init_std).unwrap_or(match (init, spec.role) {
                (InitClass::Zero, _) => 0.0,
                (InitClass::One, _) => 1.0,
                (_, Role::Router) => self.sigma_router,
                _ => self.sigma,
            });
            let mut alpha_g = user.and_then(|u| u.multiplier).unwrap_or(match spec.role {
                Role::Input => self.alpha_in,
                Role::Readout => self.alpha_out,
                _ => 1.0,
            });
            let lr_scale = user.and_then(|u| u.lr_scale).unwrap_or(1.0);
            let mut lr_base = self.lr * lr_scale;
            if mean_field {
                match spec.role {
                    Role::Input => alpha_g /= (self.input_dim as f64).sqrt(),
                    Role::Readout => alpha_g /= self.gamma0,
                    _ => {}
                }
                if spec.role != Role::SelectionBias {
                    lr_base *= self.gamma0 * self.gamma0 * Prim::from_axes(&lr).eval(n0, h0, k0, l0);
                }
            }
            let std_base = sigma_g * std_prim.eval(n0, h0, k0, l0);
            let mult_base = alpha_g * mult_prim.eval(n0, h0, k0, l0);
            let eps_base = user.and_then(|u| u.adam_eps).unwrap_or(self.adam_eps);
            let wd_base = user.and_then(|u| u.weight_decay).unwrap_or(self.weight_decay);
            // lr x weight_decay fixed: the decay per step does not change with size.
            let wd = AxisValues {
                width: -lr.width,
                depth: -lr.depth,
                experts: -lr.experts,
                expert_hidden: -lr.expert_hidden,
            };
            let half = |v: &AxisValues| AxisValues {
                width: 0.5 * v.width,
                depth: 0.5 * v.depth,
                experts: 0.5 * v.experts,
                expert_hidden: 0.5 * v.expert_hidden,
            };
            let q = |axis: Axis| QuantityExponents {
                init_var: init_var.get(axis),
                multiplier: mult.get(axis),
                lr: lr.get(axis),
                adam_eps: if adam { Some(eps.get(axis)) } else { None },
            };
            rows.push(Row {
                name: spec.name.clone(),
                group: Group::from_name(&spec.name),
                init_std: std_base * scale(&factors, &half(&init_var)),
                multiplier: mult_base * scale(&factors, &mult),
                lr: lr_base * scale(&factors, &lr),
                adam_eps: if adam { Some(eps_base * scale(&factors, &eps)) } else { None },
                weight_decay: wd_base * scale(&factors, &wd),
                exponents: Exponents {
                    width: q(Axis::Width),
                    depth: q(Axis::Depth),
                    experts: q(Axis::Experts),
                    expert_hidden: q(Axis::ExpertHidden),
                },
                grad_rms: derived.grad_rms,
            });
        }
        // CompleteP with alpha = 1: beta_L = 1/L along depth.
        let residual_exponents = AxisValues { depth: if preset.scales(Axis::Depth) { -1.0 } else { 0.0 }, ..AxisValues::default() };
        let residual_base = if mean_field { self.residual_multiplier / l0 } else { self.residual_multiplier };
        Ok(Table {
            preset: self.preset.clone(),
            optimizer: self.optimizer,
            sizes: *sizes,
            base,
            residual_multiplier: residual_base * scale(&factors, &residual_exponents),
            groups: rows,
            residual_exponents,
        })
    }
}
