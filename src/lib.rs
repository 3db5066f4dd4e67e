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
    fn openblas_get_corename() -> *const std::os::raw::c_char;
}

/// The OpenBLAS kernel set this process uses (e.g. `Haswell`, `Zen`, `SkylakeX`): chosen per CPU at start-up
/// unless the environment variable `OPENBLAS_CORETYPE` names one. Matrix products, and so the last digits of
/// every loss, depend on it: a run reproduces bit for bit on the same kernel set and thread count, and two
/// kernel sets give initial losses that differ in the tenth digit. Every run's `summary.json` records it.
pub fn blas_core() -> String {
    // SAFETY: OpenBLAS exports this getter; it returns a pointer to a static NUL-terminated name.
    let name = unsafe { openblas_get_corename() };
    if name.is_null() {
        return "unknown".into();
    }
    // SAFETY: non-null, NUL-terminated and static (see above).
    unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned()
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
