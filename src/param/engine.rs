//! The derivation: from a group's descriptor (fan-in and fan-out dimension, role, residual branch,
//! expert averaging, what reads its output) to the exponents of init variance, multiplier, learning
//! rate, Adam epsilon and weight decay. The reasoning is written out in `docs/theory.md` §Parameterization.
//!
//! Everything here works with *primitive* exponents: powers of the absolute sizes `N` (width), `n`
//! (expert hidden), `k` (active experts; `M` moves with it at fixed kappa) and `L` (depth). The four
//! axes of SPEC §2 are projections of these: `width` moves `N` and `n` together, so the exponent along
//! `width` is `e_N + e_n`; `expert_hidden` moves `n` alone (`e_n`); `experts` is `e_k`; `depth` is `e_L`.

use serde::{Deserialize, Serialize};

use super::{Axis, Optimizer};

/// Exponents of one quantity in the absolute sizes `N`, `n`, `k`, `L`.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Prim {
    /// Power of N (width).
    pub width: f64,
    /// Power of n (expert hidden size).
    pub expert_hidden: f64,
    /// Power of k (active experts; M = k / kappa).
    pub active: f64,
    /// Power of L (depth).
    pub depth: f64,
}

impl Prim {
    pub const ZERO: Prim = Prim { width: 0.0, expert_hidden: 0.0, active: 0.0, depth: 0.0 };

    pub fn n(p: f64) -> Prim {
        Prim { width: p, ..Prim::ZERO }
    }
    pub fn h(p: f64) -> Prim {
        Prim { expert_hidden: p, ..Prim::ZERO }
    }
    pub fn k(p: f64) -> Prim {
        Prim { active: p, ..Prim::ZERO }
    }
    pub fn l(p: f64) -> Prim {
        Prim { depth: p, ..Prim::ZERO }
    }

    pub fn plus(self, o: Prim) -> Prim {
        Prim {
            width: self.width + o.width,
            expert_hidden: self.expert_hidden + o.expert_hidden,
            active: self.active + o.active,
            depth: self.depth + o.depth,
        }
    }
    pub fn minus(self, o: Prim) -> Prim {
        self.plus(o.scale(-1.0))
    }
    pub fn scale(self, c: f64) -> Prim {
        Prim { width: c * self.width, expert_hidden: c * self.expert_hidden, active: c * self.active, depth: c * self.depth }
    }

    /// The exponent along `axis` (see the module doc for why `width` adds the `n` power).
    pub fn along(self, axis: Axis) -> f64 {
        match axis {
            Axis::Width => self.width + self.expert_hidden,
            Axis::Depth => self.depth,
            Axis::Experts => self.active,
            Axis::ExpertHidden => self.expert_hidden,
        }
    }

    /// Inverse of [`Prim::along`]: the primitive exponents that have the given axis exponents.
    pub fn from_axes(e: &AxisValues) -> Prim {
        Prim { width: e.width - e.expert_hidden, expert_hidden: e.expert_hidden, active: e.experts, depth: e.depth }
    }

    pub fn axes(self) -> AxisValues {
        AxisValues {
            width: self.along(Axis::Width),
            depth: self.along(Axis::Depth),
            experts: self.along(Axis::Experts),
            expert_hidden: self.along(Axis::ExpertHidden),
        }
    }

    /// `N^a n^b k^c L^d` at the given absolute sizes.
    pub fn eval(self, width: f64, expert_hidden: f64, active: f64, depth: f64) -> f64 {
        width.powf(self.width) * expert_hidden.powf(self.expert_hidden) * active.powf(self.active) * depth.powf(self.depth)
    }
}

/// One number per axis.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AxisValues {
    pub width: f64,
    pub depth: f64,
    pub experts: f64,
    pub expert_hidden: f64,
}

impl AxisValues {
    pub fn get(&self, axis: Axis) -> f64 {
        match axis {
            Axis::Width => self.width,
            Axis::Depth => self.depth,
            Axis::Experts => self.experts,
            Axis::ExpertHidden => self.expert_hidden,
        }
    }
    pub fn set(&mut self, axis: Axis, v: f64) {
        match axis {
            Axis::Width => self.width = v,
            Axis::Depth => self.depth = v,
            Axis::Experts => self.experts = v,
            Axis::ExpertHidden => self.expert_hidden = v,
        }
    }
}

/// The size a weight's fan-in or fan-out runs along.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dim {
    /// Does not grow with any axis (input dimension, vocabulary, outputs, a single gain).
    Fixed,
    /// N.
    Width,
    /// n.
    ExpertHidden,
    /// M (one entry per expert; moves with k at fixed kappa).
    Experts,
}

impl Dim {
    /// The size as primitive exponents (M counts as k: kappa is fixed).
    pub fn prim(self) -> Prim {
        match self {
            Dim::Fixed => Prim::ZERO,
            Dim::Width => Prim::n(1.0),
            Dim::ExpertHidden => Prim::h(1.0),
            Dim::Experts => Prim::k(1.0),
        }
    }
}

/// What a group does in the network; decides how the backward signal reaches it and how it is initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads a fixed-size input and writes the residual stream (embedding).
    Input,
    /// A dense layer with infinite fan-in and fan-out (attention projections).
    Hidden,
    /// Reads the residual stream and writes one logit per expert; its logits move gates of size 1/k.
    Router,
    /// An expert's weights; the expert's output is averaged over the k active experts by the gates.
    Expert,
    /// Reads the residual stream and writes a fixed number of outputs (readout, unembedding).
    Readout,
    /// An elementwise gain (RMS norm); fan-in 1 per entry.
    Gain,
    /// A bias that only selects experts (auxiliary-loss-free balancing); no gradient, no scaling.
    SelectionBias,
}

/// How a group's weights are initialised, in terms of the effective weight (multiplier x stored).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitClass {
    /// Effective std Theta(1): fan-in does not grow.
    Input,
    /// Effective std fan_in^(-1/2): outputs Theta(1) and random at init.
    Hidden,
    /// Effective std 1/fan_in: outputs vanish like fan_in^(-1/2) at init (readout-like).
    Readout,
    /// Entries equal to one (norm gains).
    One,
    /// Entries equal to zero (selection biases).
    Zero,
}

/// A parameter group as the engine sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    pub name: String,
    pub fan_in: Dim,
    pub fan_out: Dim,
    pub role: Role,
    /// Sits in a residual branch whose output is multiplied by beta_L.
    pub residual_branch: bool,
    /// The group that reads this group's output inside the same branch (e.g. `expert_up` feeds
    /// `expert_down`); `None` when the output goes to the residual stream, the logits or the loss.
    pub feeds: Option<String>,
    /// Init class; `None` lets the engine choose it from the role (see [`default_init`]).
    pub init: Option<InitClass>,
}

/// How scalings are split between stored weights and forward multipliers (the SGD symmetry
/// `(std, multiplier, lr) -> (std * s, multiplier / s, lr * s^2)` and its Adam analogue
/// `(std * s, multiplier / s, lr * s, eps / s)` leave the dynamics unchanged, so this is a convention).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Form {
    /// Multipliers 1 except the readout-like output layers (`readout`, `unembedding`: 1/N); the init
    /// carries the scaling (muP / CompleteP tables).
    #[default]
    Standard,
    /// Every non-zero weight entry is O(1) at init and the multipliers carry the scaling (the DMFT's form).
    MeanField,
}

/// The init class the engine picks when the user does not: input layers `Input`; dense hidden layers
/// `Hidden`; routers and readouts `Readout` (a router initialised like a hidden layer sends a backward
/// signal of relative size sqrt(N/k) into the stream: SPEC §4 evidence); gains `One`; biases `Zero`.
/// An expert's down-projection reads out of the expert's hidden layer: under SGD it is readout-like,
/// so that each expert is a mean-field two-layer net whose output and random backward field vanish at
/// init (the DMFT's closure needs both); under Adam it is hidden-like (SPEC §4 Adam table), which the
/// sign-like Adam update tolerates.
pub fn default_init(spec: &GroupSpec, optimizer: Optimizer) -> InitClass {
    match spec.role {
        Role::Input => InitClass::Input,
        Role::Hidden => InitClass::Hidden,
        Role::Router | Role::Readout => InitClass::Readout,
        Role::Gain => InitClass::One,
        Role::SelectionBias => InitClass::Zero,
        Role::Expert => {
            if spec.fan_in == Dim::ExpertHidden && optimizer == Optimizer::Sgd {
                InitClass::Readout
            } else {
                InitClass::Hidden
            }
        }
    }
}

/// Primitive exponents of everything the engine derives for one group, when every axis is scaled by the rules.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Derived {
    /// Init class used.
    pub init: Option<InitClass>,
    /// Effective init std (multiplier x stored std).
    pub effective_std: Prim,
    /// Backward signal dL/d(output entry) in the feature-learning regime (coherent part).
    pub backward: Prim,
    /// Forward multiplier (the form's choice).
    pub multiplier: Prim,
    /// Init variance of the stored entries.
    pub init_var: Prim,
    /// Learning rate of the stored entries.
    pub lr: Prim,
    /// RMS of the stored entries' gradient, per axis the larger of the coherent and the init-random part.
    pub grad_rms: AxisValues,
}

/// Looks up groups by name during the derivation.
pub struct Engine<'a> {
    pub specs: &'a [GroupSpec],
    pub optimizer: Optimizer,
    pub form: Form,
}

impl<'a> Engine<'a> {
    fn spec(&self, name: &str) -> crate::Result<&'a GroupSpec> {
        self.specs
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| crate::Error::invalid(format!("param.groups.{name}"), "is named in `feeds` but not defined"))
    }

    pub fn init_class(&self, spec: &GroupSpec) -> InitClass {
        spec.init.unwrap_or_else(|| default_init(spec, self.optimizer))
    }

    /// Effective init std of the group's weights.
    pub fn effective_std(&self, spec: &GroupSpec) -> Prim {
        match self.init_class(spec) {
            InitClass::Input | InitClass::One | InitClass::Zero => Prim::ZERO,
            InitClass::Hidden => spec.fan_in.prim().scale(-0.5),
            InitClass::Readout => spec.fan_in.prim().scale(-1.0),
        }
    }

    /// Residual multiplier beta_L = 1/L (CompleteP, alpha = 1) for groups inside a branch.
    fn branch(&self, spec: &GroupSpec) -> Prim {
        if spec.residual_branch {
            Prim::l(-1.0)
        } else {
            Prim::ZERO
        }
    }

    /// Backward signal on one output entry of the group: (coherent part, init-random part).
    ///
    /// The residual stream's gradient is 1/N per entry (the readout multiplies O(1) weights by 1/N);
    /// a branch multiplies it by beta_L; gates of size 1/k multiply it once more for experts and router.
    /// For a group that feeds another one, the signal comes back through the reader's weights: their
    /// learned part is aligned with the signal (fan_out x 1/fan_in per entry), their init part is random
    /// (sqrt(fan_out) x init std).
    pub fn backward(&self, spec: &GroupSpec, depth_guard: usize) -> crate::Result<(Prim, Prim)> {
        if depth_guard > 16 {
            return Err(crate::Error::invalid(format!("param.groups.{}.feeds", spec.name), "forms a cycle"));
        }
        let stream = Prim::n(-1.0);
        let gate = if spec.role == Role::Expert || spec.role == Role::Router { Prim::k(-1.0) } else { Prim::ZERO };
        let out = match spec.role {
            Role::Readout => (Prim::ZERO, Prim::ZERO),
            Role::SelectionBias => (Prim::ZERO, Prim::ZERO),
            // A logit moves a gate g ~ 1/k whose product with the expert output (aligned with the stream
            // gradient after learning, sum of N terms of size 1/N) is O(1).
            Role::Router => {
                let c = self.branch(spec).plus(gate);
                (c, c)
            }
            Role::Gain => {
                let c = stream.plus(self.branch(spec));
                (c, c)
            }
            Role::Input | Role::Hidden | Role::Expert => match &spec.feeds {
                None => {
                    let c = stream.plus(self.branch(spec)).plus(gate);
                    (c, c)
                }
                Some(next_name) => {
                    let next = self.spec(next_name)?;
                    let (next_coherent, _) = self.backward(next, depth_guard + 1)?;
                    let coherent = next_coherent.plus(next.fan_out.prim()).minus(next.fan_in.prim());
                    let random = next_coherent.plus(next.fan_out.prim().scale(0.5)).plus(self.effective_std(next));
                    (coherent, random)
                }
            },
        };
        Ok(out)
    }

    /// The forward multiplier of the form.
    pub fn multiplier(&self, spec: &GroupSpec) -> Prim {
        match self.form {
            Form::Standard => match spec.role {
                Role::Readout => spec.fan_in.prim().scale(-1.0),
                _ => Prim::ZERO,
            },
            Form::MeanField => match self.init_class(spec) {
                // A zero-initialised weight has no init scale to pin; its multiplier is 1/sqrt(fan_in)
                // like the other layers that read the residual stream.
                InitClass::Zero | InitClass::One => Prim::ZERO,
                _ if spec.role == Role::Router => spec.fan_in.prim().scale(-0.5),
                _ => self.effective_std(spec),
            },
        }
    }

    /// Derives every exponent of `spec` under the desiderata, all axes scaled.
    pub fn derive(&self, spec: &GroupSpec) -> crate::Result<Derived> {
        let init = self.init_class(spec);
        let s_eff = self.effective_std(spec);
        let (coherent, random) = self.backward(spec, 0)?;
        let b = self.multiplier(spec);
        let fan_in = spec.fan_in.prim();
        if spec.role == Role::SelectionBias {
            return Ok(Derived { init: Some(init), ..Derived::default() });
        }
        // Theta(1) change per step of each output entry: an update of the effective weight aligned with
        // (backward x input) changes the output by lr_eff x backward x fan_in under SGD and by
        // (multiplier x lr) x fan_in under Adam, whose update entries have size lr whatever the gradient.
        let lr = match self.optimizer {
            Optimizer::Sgd => coherent.plus(fan_in).scale(-1.0).minus(b.scale(2.0)),
            Optimizer::Adam => fan_in.scale(-1.0).minus(b),
        };
        let init_var = match init {
            InitClass::One | InitClass::Zero => Prim::ZERO,
            _ => s_eff.minus(b).scale(2.0),
        };
        // Gradient of a stored entry = multiplier x backward x input entry (inputs are Theta(1)).
        let grad_c = b.plus(coherent).axes();
        let grad_r = b.plus(random).axes();
        let mut grad_rms = AxisValues::default();
        for axis in Axis::ALL {
            grad_rms.set(axis, grad_c.get(axis).max(grad_r.get(axis)));
        }
        Ok(Derived { init: Some(init), effective_std: s_eff, backward: coherent, multiplier: b, init_var, lr, grad_rms })
    }
}

/// Exponents along one axis of an axis the preset does not scale (SP: init variance 1/fan_in for every
/// weight matrix, everything else constant).
pub fn sp_init_var(spec: &GroupSpec, init: InitClass) -> Prim {
    match init {
        InitClass::One | InitClass::Zero | InitClass::Input => Prim::ZERO,
        InitClass::Hidden | InitClass::Readout => spec.fan_in.prim().scale(-1.0),
    }
}

/// `N / (k n)`: the size, relative to the learned signal, of the random backward field that randomly
/// initialised expert up-projections send into the residual stream (SPEC §4). None of the four axes grows
/// it (width keeps it, experts and expert_hidden shrink it); scaling N alone at fixed n would.
pub fn backward_field_ratio(sizes: &super::Sizes) -> f64 {
    sizes.width as f64 / (sizes.active as f64 * sizes.expert_hidden as f64)
}
