//! The GPU backend (crate feature `cuda`): cudarc with dynamic loading, cuBLAS for every matrix product,
//! and kernels compiled at run time with NVRTC (`kernels.cu`) for routing, token gather/scatter,
//! activations, RMS norm, routing losses and the optimizer updates.
//!
//! This module owns: the device probe ([`probe`]), the device handle with its cuBLAS handle and kernel
//! cache (`device::Gpu`), the MoE-ResNet on the GPU (`resnet::GpuResNet`, same weights, same semantics
//! and same outputs as [`crate::model::resnet::MoeResNet`]), and the entry points behind the hidden
//! `moe-dmft gpu` subcommand (`run`: train from a `train` config, CPU-vs-GPU check, timing).
//!
//! Without the feature (the default build) everything here still compiles and every entry point
//! returns [`Error::Unavailable`] (exit code 2), so the default build needs no CUDA at all.
//!
//! Why a probe: with cudarc's dynamic loading, the first driver call on a machine without `libcuda.so`
//! panics instead of returning an error (SPEC §7). [`probe`] first asks whether the driver, cuBLAS and
//! NVRTC libraries can be opened at all and turns their absence into a clean error; any remaining panic
//! inside cudarc during start-up is caught and reported the same way.
//!
//! Status: the GPU code paths were written on a machine without a GPU. They compile (the feature is
//! built and its CPU-side tests run here), but no kernel has run yet: `validation/gpu/run.sh` is the
//! first real check (CPU vs GPU on the same weights, then timings against PyTorch).

use serde::{Deserialize, Serialize};

use crate::Error;

#[cfg(feature = "cuda")]
pub mod device;
#[cfg(feature = "cuda")]
pub mod resnet;
#[cfg(feature = "cuda")]
pub mod run;
#[cfg(feature = "cuda")]
pub mod selftest;

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
