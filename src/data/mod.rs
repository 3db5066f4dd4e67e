//! Data: seeded synthetic teacher tasks (Gaussian inputs; single-index and random-MoE teachers) and
//! character-level text (the Shakespeare corpus of SPEC §8) with a train/validation split.
//!
//! CONTRACT: [`Task`] is shared by `train`, `dmft` and `check`.

use ndarray::Array2;

/// A regression task: inputs `x` (P x D) and targets `y` (P x outputs).
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub x: Array2<f64>,
    pub y: Array2<f64>,
}
