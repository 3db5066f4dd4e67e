//! Finite networks: the MoE-ResNet (the DMFT model) and the MoE-Transformer (for text), with hand-written
//! forward and backward passes, generic over f32 (training) and f64 (gradient checks).
//!
//! Every parameter lives in a [`ParamStore`]: a flat list of named tensors, each tagged with its
//! [`Group`], so that init, multipliers, learning rates, epsilon and weight decay come per group from a
//! [`crate::param::Resolved`] and nothing is hard-coded per size. Gradients come back as a [`Grads`] aligned
//! with the store.

use ndarray::{ArrayD, LinalgScalar, ScalarOperand};
use num_traits::{Float, FromPrimitive};
use rand_chacha::ChaCha8Rng;

use crate::param::Group;
use crate::routing::LoadStats;

pub mod attention;
pub mod gradcheck;
pub mod io;
pub mod moe;
pub mod norm;
pub mod resnet;
pub mod transformer;

/// Floating-point type of a finite network: f32 for training, f64 for gradient checks.
pub trait Real:
    Float + FromPrimitive + LinalgScalar + ScalarOperand + Send + Sync + std::fmt::Debug + std::fmt::Display
    + std::iter::Sum + serde::Serialize + 'static
{
    fn of(x: f64) -> Self {
        Self::from_f64(x).expect("f64 converts to any Real")
    }
}
impl Real for f32 {}
impl Real for f64 {}

/// One named parameter tensor.
#[derive(Debug, Clone)]
pub struct Param<F> {
    /// Safetensors name, e.g. `blocks.0.moe.expert_up` (documented in the README).
    pub name: String,
    pub group: Group,
    pub value: ArrayD<F>,
}

/// All parameters of a model, in a fixed order.
#[derive(Debug, Clone, Default)]
pub struct ParamStore<F> {
    pub params: Vec<Param<F>>,
}

/// Gradients aligned with a [`ParamStore`] (same order, same shapes).
pub type Grads<F> = Vec<ArrayD<F>>;

impl<F: Real> ParamStore<F> {
    pub fn push(&mut self, name: impl Into<String>, group: Group, value: ArrayD<F>) -> usize {
        self.params.push(Param { name: name.into(), group, value });
        self.params.len() - 1
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.params.iter().position(|p| p.name == name)
    }

    pub fn zeros_like(&self) -> Grads<F> {
        self.params.iter().map(|p| ArrayD::zeros(p.value.raw_dim())).collect()
    }

    pub fn num_elements(&self) -> usize {
        self.params.iter().map(|p| p.value.len()).sum()
    }
}

/// A batch of training data.
#[derive(Debug, Clone)]
pub enum Batch {
    /// Regression: inputs `x` (B x D) and targets `y` (B x outputs). Loss 0.5 * mean_B sum_out (f - y)^2.
    Regression { x: ndarray::Array2<f64>, y: ndarray::Array2<f64> },
    /// Next-token prediction: token ids (B x (T + 1)); inputs are `[.., ..T]`, targets `[.., 1..]`.
    Tokens { ids: ndarray::Array2<u32> },
}

/// What one forward+backward pass returns.
#[derive(Debug, Clone)]
pub struct StepOutput<F> {
    /// Task loss (without auxiliary losses).
    pub loss: f64,
    /// Total auxiliary loss that was added to the objective (load balance, z-loss), already weighted.
    pub aux_loss: f64,
    /// Gradient of loss + aux_loss, aligned with the store.
    pub grads: Grads<F>,
    /// Routing load statistics per MoE layer, in block order.
    pub load: Vec<LoadStats>,
    /// Named scalar diagnostics (e.g. RMS of activations per group) for metrics and coordinate checks.
    pub diagnostics: Vec<(String, f64)>,
}

/// A finite network: parameters plus an architecture that can run forward and backward.
pub trait Model<F: Real>: Send + Sync {
    fn store(&self) -> &ParamStore<F>;
    fn store_mut(&mut self) -> &mut ParamStore<F>;
    /// Forward and backward on `batch`. `rng` drives only routing randomness (random tie-breaking).
    fn loss_and_grad(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<StepOutput<F>>;
    /// Forward only: predictions (Regression: B x outputs; Tokens: loss only, predictions empty).
    fn forward(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<(f64, ndarray::Array2<f64>)>;
    /// Called by the trainer after each optimizer step, e.g. to update balancing biases from the loads.
    fn after_step(&mut self, _load: &[LoadStats]) {}
    /// A model whose parameters, gradients and optimizer moments live on its own device (the GPU backend)
    /// trains there through [`Resident`]; `None` (the CPU models): the trainer updates host tensors.
    fn resident(&mut self) -> Option<&mut dyn Resident> {
        None
    }
}

/// What [`Resident::resident_grad`] hands the trainer instead of the gradients: what its step record needs.
#[derive(Debug, Clone)]
pub struct ResidentGrad {
    pub loss: f64,
    pub aux_loss: f64,
    pub load: Vec<LoadStats>,
    pub diagnostics: Vec<(String, f64)>,
    /// Sum of squares of every gradient tensor, in store order.
    pub grad_sq: Vec<f64>,
    /// Sum of squares of every parameter tensor (before the update), in store order.
    pub param_sq: Vec<f64>,
}

/// Training on the model's own device. Moving every parameter up and every gradient down each step, with
/// the update on the host, costs more than the step itself once the model is large (at width 2048 about
/// 0.7 GB each way per step); so the trainer asks only for the sums of squares its records need. While
/// the device is ahead, [`Model::store`] holds the parameters of the last [`Resident::sync_host`].
pub trait Resident {
    /// Forward and backward on `batch`; the gradients stay on the device.
    fn resident_grad(&mut self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<ResidentGrad>;
    /// The optimizer update from the device gradients times `grad_scale` (clipping), every group's LR times
    /// `lr_factor`, then [`Model::after_step`]'s work on `load`. Returns each tensor's sum of squared
    /// update, in store order.
    fn resident_update(&mut self, lr_factor: f64, grad_scale: f64, betas: (f64, f64), load: &[LoadStats]) -> crate::Result<Vec<f64>>;
    /// Copies the device parameters into the host store.
    fn sync_host(&mut self) -> crate::Result<()>;
}

/// Pointwise nonlinearity of the expert hidden layer (and of synthetic teachers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    #[default]
    Relu,
    Tanh,
    Gelu,
    Linear,
}

impl Activation {
    pub fn apply(self, x: f64) -> f64 {
        match self {
            Activation::Relu => x.max(0.0),
            Activation::Tanh => x.tanh(),
            Activation::Gelu => 0.5 * x * (1.0 + (0.7978845608028654 * (x + 0.044715 * x * x * x)).tanh()),
            Activation::Linear => x,
        }
    }

    /// `(phi(x), phi'(x))` in the network's own float type, with the formulas of [`Activation::apply`]
    /// and [`Activation::derivative`]: f32 training avoids a round trip through f64, and computing both
    /// at once costs one tanh per entry instead of two.
    pub fn value_and_slope<F: Real>(self, x: F) -> (F, F) {
        match self {
            Activation::Relu => {
                if x > F::zero() {
                    (x, F::one())
                } else {
                    (F::zero(), F::zero())
                }
            }
            Activation::Tanh => {
                let t = x.tanh();
                (t, F::one() - t * t)
            }
            Activation::Gelu => {
                let (c, a, half, one) = (F::of(0.7978845608028654), F::of(0.044715), F::of(0.5), F::one());
                let t = (c * (x + a * x * x * x)).tanh();
                let slope = half * (one + t) + half * x * (one - t * t) * c * (one + F::of(3.0) * a * x * x);
                (half * x * (one + t), slope)
            }
            Activation::Linear => (x, F::one()),
        }
    }

    /// Derivative with respect to the input.
    pub fn derivative(self, x: f64) -> f64 {
        match self {
            Activation::Relu => {
                if x > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::Tanh => 1.0 - x.tanh().powi(2),
            Activation::Gelu => {
                let c = 0.7978845608028654;
                let inner = c * (x + 0.044715 * x * x * x);
                let t = inner.tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * x * x)
            }
            Activation::Linear => 1.0,
        }
    }
}
