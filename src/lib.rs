//! moe-dmft: hyperparameter scaling of Mixture-of-Experts transformers, made computable and checkable.
//!
//! Modules, one per concept:
//! - [`param`]: the parameterization engine (SP, muP, CompleteP, MoE-CompleteP, user-defined).
//! - [`model`]: finite networks (MoE-ResNet, MoE-Transformer), forward and backward passes.
//! - [`routing`]: expert selection, gates, capacity, prototyping, balancing, load statistics.
//! - [`train`]: optimizers, schedules and the training loop with its outputs.
//! - [`dmft`]: the mean-field dynamics of MoE layers in the joint infinite limit.
//! - [`check`]: coordinate checks, exponent fits, finite-vs-DMFT comparisons.
//! - [`data`]: synthetic teacher tasks and character-level text.
//! - [`plot`]: figures (PNG and SVG) with plotters.
//! - [`cli`]: the `moe-dmft` command line.
//! - [`cuda`]: the GPU backend (feature `cuda`).

// Links OpenBLAS for ndarray's matrix products.
extern crate blas_src;

pub mod check;
pub mod cli;
pub mod cuda;
pub mod data;
pub mod dmft;
pub mod error;
pub mod files;
pub mod model;
pub mod param;
pub mod plot;
pub mod routing;
pub mod train;

pub use error::{Error, Result};

extern "C" {
    fn openblas_set_num_threads(n: std::os::raw::c_int);
}

/// Makes OpenBLAS single-threaded. Parallelism comes from rayon (over experts, tokens, seeds); a
/// multi-threaded BLAS inside every rayon task oversubscribes the cores (measured: `moe_backward` 82 ms
/// instead of 13.6 ms on 2 cores). The command line calls this at start-up; library users who run
/// models from their own rayon pools should call it too.
pub fn set_blas_single_threaded() {
    // SAFETY: OpenBLAS (linked through blas-src/openblas-src) exports this setter; it only stores the
    // thread count used by later calls.
    unsafe { openblas_set_num_threads(1) }
}
