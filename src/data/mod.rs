//! Data: seeded synthetic teacher tasks (Gaussian inputs; single-index and random-MoE teachers) and
//! character-level text (the Shakespeare corpus of SPEC §8) with a train/validation split.
//!
//! CONTRACT: [`Task`], [`TaskConfig`] and [`make_task`] are shared by `train`, `dmft` and `check`.

use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::model::Activation;

/// A regression task: inputs `x` (P x D) and targets `y` (P x outputs).
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub x: Array2<f64>,
    pub y: Array2<f64>,
}

/// The function that labels the Gaussian inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Teacher {
    /// y = activation(beta . x / sqrt(D)) with beta ~ N(0, I).
    SingleIndex { activation: Activation },
}

impl Default for Teacher {
    fn default() -> Self {
        Teacher::SingleIndex { activation: Activation::Tanh }
    }
}

/// A seeded synthetic task: `points` Gaussian inputs in `input_dim` dimensions labelled by a teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    pub points: usize,
    pub input_dim: usize,
    pub teacher: Teacher,
    /// Standard deviation of Gaussian label noise.
    pub noise: f64,
    pub seed: u64,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig { points: 16, input_dim: 8, teacher: Teacher::default(), noise: 0.0, seed: 0 }
    }
}

impl TaskConfig {
    pub fn validate(&self) -> crate::Result<()> {
        if self.points == 0 {
            return Err(crate::Error::invalid("task.points", "must be at least 1"));
        }
        if self.input_dim == 0 {
            return Err(crate::Error::invalid("task.input_dim", "must be at least 1"));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(crate::Error::invalid("task.noise", "must be finite and non-negative"));
        }
        Ok(())
    }
}

/// Generates the task; the same config gives the same task on every machine.
pub fn make_task(cfg: &TaskConfig) -> crate::Result<Task> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (p, d) = (cfg.points, cfg.input_dim);
    let x = Array2::from_shape_simple_fn((p, d), || StandardNormal.sample(&mut rng));
    let y = match &cfg.teacher {
        Teacher::SingleIndex { activation } => {
            let beta: Vec<f64> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
            let scale = 1.0 / (d as f64).sqrt();
            Array2::from_shape_fn((p, 1), |(mu, _)| {
                let z: f64 = (0..d).map(|i| beta[i] * x[[mu, i]]).sum::<f64>() * scale;
                activation.apply(z)
            })
        }
    };
    let noise: Array2<f64> = Array2::from_shape_simple_fn(y.raw_dim(), || StandardNormal.sample(&mut rng));
    Ok(Task { x, y: y + noise * cfg.noise })
}
