//! The GPU backend (crate feature `cuda`): cudarc with dynamic loading, cuBLAS for every matrix product,
//! and kernels compiled at run time with NVRTC (`kernels.cu`) for routing, token gather/scatter,
//! activations, RMS norm, routing losses and the optimizer updates.
//!
//! This module owns: the device probe ([`probe`]), the device handle with its cuBLAS handle and kernel
//! cache (`device::Gpu`), device parameters and the optimizer update (`state`), the MoE layer on the
//! GPU (`moe`), the MoE-ResNet and the MoE-Transformer on the GPU (`resnet::GpuResNet`,
//! `transformer::GpuTransformer`: same weights, same semantics and same outputs as their CPU models),
//! and the entry points behind `moe-dmft train` with `device = "cuda"` and the hidden `moe-dmft gpu`
//! subcommand (`run`: train, CPU-vs-GPU check, timing).
//!
//! Without the feature (the default build) everything here still compiles and every entry point
//! returns [`Error::Unavailable`] (exit code 2), so the default build needs no CUDA at all.
//!
//! Why a probe: with cudarc's dynamic loading, the first driver call on a machine without `libcuda.so`
//! panics instead of returning an error (SPEC §7). [`probe`] first asks whether the driver, cuBLAS and
//! NVRTC libraries can be opened at all and turns their absence into a clean error; any remaining panic
//! inside cudarc during start-up is caught and reported the same way.
//!
//! Checked on a GPU by `validation/gpu/run.sh` (CPU vs GPU on the same weights, then timings against
//! PyTorch); its results are committed as `validation/gpu/results-<gpu>.json`.

use serde::{Deserialize, Serialize};

use crate::Error;

#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod moe;
#[cfg(feature = "cuda")]
pub mod resnet;
#[cfg(feature = "cuda")]
pub mod run;
#[cfg(feature = "cuda")]
pub mod selftest;
#[cfg(feature = "cuda")]
pub mod state;
#[cfg(feature = "cuda")]
pub mod transformer;

/// A model on the GPU, beyond the [`crate::model::Model`] interface: a training step that keeps
/// parameters, gradients and optimizer moments on the device, in two halves (the trainer records the
/// gradient's norms and validates between them), and copying the device parameters back into the host
/// store. Every such model trains through [`crate::model::Resident`].
#[cfg(feature = "cuda")]
pub trait DeviceModel: crate::model::Model<f32> {
    /// Forward and backward on the device; the gradients stay there. With `measure`, the sums of squares
    /// of every gradient and parameter (else both empty).
    fn grad_on_device(
        &self,
        batch: &crate::model::Batch,
        rng: &mut rand_chacha::ChaCha8Rng,
        measure: bool,
    ) -> crate::Result<crate::model::ResidentGrad>;

    /// [`state::update`] with this model's balancing biases: the SGD/AdamW update (by the
    /// parameterization's optimizer) with every group's lr times `lr_factor`, from the gradients times
    /// `grad_scale`. With `measure`, each tensor's sum of squared update (else empty).
    fn update_on_device(
        &mut self,
        lr_factor: f64,
        betas: (f64, f64),
        grad_scale: f64,
        measure: bool,
        load: &[crate::routing::LoadStats],
    ) -> crate::Result<Vec<f64>>;

    /// Copies the device parameters into the host store.
    fn download_params(&mut self) -> crate::Result<()>;

    /// Forward, backward and update, measuring nothing (the timing path and the one-step check); returns
    /// the loss and the load of every MoE layer.
    fn device_step(
        &mut self,
        batch: &crate::model::Batch,
        rng: &mut rand_chacha::ChaCha8Rng,
        lr_factor: f64,
        betas: (f64, f64),
    ) -> crate::Result<(f64, Vec<crate::routing::LoadStats>)> {
        let g = self.grad_on_device(batch, rng, false)?;
        self.update_on_device(lr_factor, betas, 1.0, false, &g.load)?;
        Ok((g.loss, g.load))
    }
}

#[cfg(feature = "cuda")]
impl<M: DeviceModel> crate::model::Resident for M {
    fn resident_grad(&mut self, batch: &crate::model::Batch, rng: &mut rand_chacha::ChaCha8Rng) -> crate::Result<crate::model::ResidentGrad> {
        self.grad_on_device(batch, rng, true)
    }

    fn resident_update(&mut self, lr_factor: f64, grad_scale: f64, betas: (f64, f64), load: &[crate::routing::LoadStats]) -> crate::Result<Vec<f64>> {
        self.update_on_device(lr_factor, betas, grad_scale, true, load)
    }

    fn sync_host(&mut self) -> crate::Result<()> {
        self.download_params()
    }
}

/// Which model `moe-dmft gpu bench` times (defined outside the feature so the CLI parses it in every
/// build).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchArch {
    /// The MoE-ResNet on Gaussian inputs (`tokens` samples of `input_dim`, pre-norm with `norm`).
    Resnet,
    /// The MoE-Transformer on random token ids (`batch` sequences of `seq`, `n_head` heads, `vocab`).
    Transformer,
}

/// What [`probe`] found: the first device and the libraries the backend loads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Device name as the driver reports it, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Global memory in bytes.
    pub total_memory: usize,
    /// Number of devices the driver sees.
    pub device_count: i32,
}

/// The error every entry point returns in a build without the `cuda` feature.
pub fn not_built() -> Error {
    Error::Unavailable {
        what: "the GPU backend".into(),
        reason: "this binary was built without the `cuda` feature (cargo build --release --features cuda)".into(),
    }
}

/// Trains a `train` config on the GPU (`device = "cuda"`): see [`run::train`]. Without the feature, or
/// without a GPU, an [`Error::Unavailable`] (exit code 2) before anything is written.
pub fn train(
    cfg: &crate::train::TrainConfig,
    out: Option<&std::path::Path>,
    observer: &mut dyn crate::train::Observer,
) -> crate::Result<crate::train::Summary> {
    #[cfg(feature = "cuda")]
    return run::train(cfg, out, observer, false);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (cfg, out, observer);
        Err(not_built())
    }
}

/// Checks that the NVIDIA driver, cuBLAS and NVRTC can be loaded and that a device answers, without
/// ever panicking. Returns [`Error::Unavailable`] naming what is missing.
#[cfg(not(feature = "cuda"))]
pub fn probe() -> crate::Result<DeviceInfo> {
    Err(not_built())
}

/// Checks that the NVIDIA driver, cuBLAS and NVRTC can be loaded and that a device answers, without
/// ever panicking. Returns [`Error::Unavailable`] naming what is missing.
#[cfg(feature = "cuda")]
pub fn probe() -> crate::Result<DeviceInfo> {
    device::probe()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a machine without a GPU (this one, and CI) the probe must come back as a clean
    /// `Unavailable` error, with or without the feature, never as a panic. Where a GPU is present it
    /// must name the device instead.
    #[test]
    fn probe_is_a_clean_error_without_a_gpu() {
        let outcome = std::panic::catch_unwind(probe);
        let result = outcome.expect("probe must never panic");
        match result {
            Ok(info) => {
                assert!(!info.name.is_empty(), "a device that answers has a name");
                assert!(info.device_count >= 1);
            }
            Err(e) => {
                assert!(matches!(e, Error::Unavailable { .. }), "expected Unavailable, got {e:?}");
                assert_eq!(e.exit_code(), 2);
                let msg = e.to_string();
                assert!(msg.contains("not available"), "message names the problem: {msg}");
            }
        }
    }
}
