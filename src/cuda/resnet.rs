//! The MoE-ResNet on the GPU in f32: the same weights, routing rules, losses, gradients, load statistics
//! and diagnostics as [`crate::model::resnet::MoeResNet`], computed with cuBLAS products and the kernels
//! of `kernels.cu`; the MoE layers are [`super::moe::GpuMoe`].
//!
//! [`GpuResNet`] implements [`Model<f32>`] and trains through [`Resident`]: parameters, gradients and
//! optimizer moments stay on the device ([`super::DeviceModel`]), and the host [`ParamStore`] is brought
//! up to date when the trainer asks (`sync_host`). `loss_and_grad` still downloads the gradients, for
//! the CPU-vs-GPU check.
//!
//! Routing randomness matches the CPU bit for bit: random tie-breaking draws the same `T * M` numbers
//! from the same rng, in the same order, on the host, and the kernel compares them the same way.

use std::sync::Mutex;

use cudarc::driver::CudaSlice;
use ndarray::Array2;
use rand_chacha::ChaCha8Rng;

use super::device::{cu, Gpu};
use super::moe::{self, rms, GpuMoe, MoeCache};
use super::state::{self, position, DeviceParams};
use crate::cuda_launch;
use crate::model::moe::{MoeMultipliers, MoeParamIds};
use crate::model::resnet::{MoeResNet, ResNetConfig, ResNetMultipliers, NORM_EPS};
use crate::model::{Batch, Model, ParamStore, Resident, ResidentGrad, StepOutput};
use crate::param::Resolved;
use crate::routing::LoadStats;
use crate::Error;

/// Store positions of one block's tensors.
#[derive(Debug, Clone, Copy)]
struct BlockIds {
    norm: Option<usize>,
    moe: MoeParamIds,
}

/// What the backward pass of one block needs: the MoE's cache and, with norm, the normalized rows
/// before gain and multiplier and their inverse RMS.
struct BlockCache {
    moe: MoeCache,
    xhat: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
}

struct Forward {
    x: CudaSlice<f32>,
    /// Residual stream after the last block (B x N).
    h: CudaSlice<f32>,
    /// Predictions (B x outputs), on the host.
    f: Vec<f32>,
    blocks: Vec<BlockCache>,
    load: Vec<LoadStats>,
    aux_loss: f64,
    diagnostics: Vec<(String, f64)>,
}

/// The MoE-ResNet with its parameters on the host ([`MoeResNet`]) and a device copy.
pub struct GpuResNet {
    host: MoeResNet<f32>,
    hp: Resolved,
    gpu: Gpu,
    embedding: usize,
    readout: usize,
    blocks: Vec<BlockIds>,
    state: Mutex<DeviceParams>,
}

impl std::fmt::Debug for GpuResNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuResNet").field("gpu", &self.gpu).field("config", self.host.config()).finish()
    }
}

/// Checks the options the GPU backend supports; errors name the config field.
pub fn check_supported(cfg: &ResNetConfig) -> crate::Result<()> {
    cfg.validate()?;
    moe::check_supported(&cfg.sizes)
}

impl GpuResNet {
    /// Puts `host` (weights as they are) on the device `gpu`.
    pub fn new(host: MoeResNet<f32>, hp: &Resolved, gpu: Gpu) -> crate::Result<Self> {
        let cfg = host.config().clone();
        check_supported(&cfg)?;
        let store = host.store();
        let mut blocks = Vec::with_capacity(cfg.sizes.depth);
        for l in 0..cfg.sizes.depth {
            let norm = if cfg.norm { Some(position(store, &format!("blocks.{l}.norm"))?) } else { None };
            let moe = MoeParamIds::find(store, &format!("blocks.{l}.moe"), &cfg.moe_shape())?;
            blocks.push(BlockIds { norm, moe });
        }
        let embedding = position(store, "embedding")?;
        let readout = position(store, "readout")?;
        let state = DeviceParams::new(&gpu, store)?;
        Ok(GpuResNet { host, hp: hp.clone(), gpu, embedding, readout, blocks, state: Mutex::new(state) })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The host model (its store is the reference copy of the weights in the [`Model`] path).
    pub fn host(&self) -> &MoeResNet<f32> {
        &self.host
    }

    /// The MoE layer description of every block.
    fn moe(&self) -> GpuMoe<'_> {
        let cfg = self.host.config();
        let m = self.host.multipliers();
        GpuMoe::new(&cfg.sizes, &cfg.routing, cfg.activation, MoeMultipliers { router: m.router, up: m.up, down: m.down })
    }

    fn regression<'b>(&self, batch: &'b Batch) -> crate::Result<(&'b Array2<f64>, &'b Array2<f64>)> {
        let cfg = self.host.config();
        match batch {
            Batch::Regression { x, y } => {
                if x.ncols() != cfg.input_dim {
                    return Err(Error::invalid(
                        "batch.x",
                        format!("has {} columns, the model's input_dim is {}", x.ncols(), cfg.input_dim),
                    ));
                }
                if y.ncols() != cfg.outputs || y.nrows() != x.nrows() {
                    return Err(Error::invalid(
                        "batch.y",
                        format!("has shape {:?}, expected ({}, {})", y.dim(), x.nrows(), cfg.outputs),
                    ));
                }
                Ok((x, y))
            }
            Batch::Tokens { .. } => Err(Error::invalid("batch", "the MoE-ResNet takes regression batches (x, y)")),
        }
    }

    fn forward_pass(&self, st: &DeviceParams, x: &Array2<f64>, rng: &mut ChaCha8Rng) -> crate::Result<Forward> {
        let cfg = self.host.config();
        let m: ResNetMultipliers = *self.host.multipliers();
        let g = &self.gpu;
        let (b, d, n) = (x.nrows(), cfg.input_dim, cfg.sizes.width);
        let xs: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let xd = g.upload(&xs)?;
        let mut h = g.zeros::<f32>(b * n)?;
        let emb = &st.params[self.embedding];
        g.gemm(false, true, (b, n, d), m.input as f32, &xd.slice(..), d, &emb.slice(..), d, 0.0, &mut h.slice_mut(..), n)?;
        let mut diagnostics = vec![("embedding.h_rms".to_string(), rms(g, &h, b, n)?)];
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut load = Vec::with_capacity(self.blocks.len());
        let mut aux_loss = 0.0;
        let total_bn = (b * n) as i64;
        let moe = self.moe();
        for (l, ids) in self.blocks.iter().enumerate() {
            let (a, xhat) = match ids.norm {
                Some(nid) => {
                    let mut a = g.zeros::<f32>(b * n)?;
                    let mut xh = g.zeros::<f32>(b * n)?;
                    let mut inv = g.zeros::<f32>(b)?;
                    let (r, w, eps, mult) = (b as i32, n as i32, NORM_EPS as f32, m.norm as f32);
                    cuda_launch!(g, "rms_norm_forward", Gpu::per_warp(b), &h, &st.params[nid], &mut a, &mut xh, &mut inv, &r, &w, &eps, &mult)?;
                    (a, Some((xh, inv)))
                }
                None => (cu(g.stream.clone_dtod(&h), "copy")?, None),
            };
            let o = moe.forward(g, &st.params, &ids.moe, a, b, rng)?;
            let beta = m.residual as f32;
            cuda_launch!(g, "axpy", Gpu::per_item(b * n), &mut h, &o.out, &beta, &total_bn)?;
            diagnostics.push((format!("block{l}.router_logits_rms"), o.router_logits_rms));
            diagnostics.push((format!("block{l}.expert_preact_rms"), o.expert_preact_rms));
            diagnostics.push((format!("block{l}.moe_out_rms"), o.out_rms));
            diagnostics.push((format!("block{l}.h_rms"), rms(g, &h, b, n)?));
            aux_loss += o.aux_loss;
            load.push(o.load);
            blocks.push(BlockCache { moe: o.cache, xhat });
        }
        let outputs = cfg.outputs;
        let mut f = g.zeros::<f32>(b * outputs)?;
        let ro = &st.params[self.readout];
        g.gemm(false, true, (b, outputs, n), m.readout as f32, &h.slice(..), n, &ro.slice(..), n, 0.0, &mut f.slice_mut(..), outputs)?;
        let f_host = g.download(&f, b * outputs)?;
        let f_rms = if f_host.is_empty() {
            0.0
        } else {
            (f_host.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / f_host.len() as f64).sqrt()
        };
        diagnostics.push(("output.f_rms".to_string(), f_rms));
        Ok(Forward { x: xd, h, f: f_host, blocks, load, aux_loss, diagnostics })
    }


    /// Forward and backward on the device with the device parameters as they are; gradients stay in
    /// `st.grads`. Returns (loss, forward results without caches).
    fn forward_backward(
        &self,
        st: &mut DeviceParams,
        x: &Array2<f64>,
        y: &Array2<f64>,
        rng: &mut ChaCha8Rng,
    ) -> crate::Result<(f64, Forward)> {
        let cfg = self.host.config();
        let m = *self.host.multipliers();
        let g = &self.gpu;
        let fw = self.forward_pass(st, x, rng)?;
        let (b, n, d, outputs) = (x.nrows(), cfg.sizes.width, cfg.input_dim, cfg.outputs);
        let bf = b.max(1) as f64;
        let loss = 0.5 * fw.f.iter().zip(y.iter()).map(|(&p, &t)| (p as f64 - t).powi(2)).sum::<f64>() / bf;
        let df: Vec<f32> = fw.f.iter().zip(y.iter()).map(|(&p, &t)| ((p as f64 - t) / bf) as f32).collect();
        let df_d = g.upload(&df)?;

        let mut grads = std::mem::take(&mut st.grads);
        let result = (|| -> crate::Result<()> {
            for gr in grads.iter_mut() {
                g.fill_zeros(gr)?;
            }
            g.gemm(true, false, (outputs, n, b), m.readout as f32, &df_d.slice(..), outputs, &fw.h.slice(..), n, 0.0, &mut grads[self.readout].slice_mut(..), n)?;
            let mut dh = g.zeros::<f32>(b * n)?;
            g.gemm(false, false, (b, n, outputs), m.readout as f32, &df_d.slice(..), outputs, &st.params[self.readout].slice(..), n, 0.0, &mut dh.slice_mut(..), n)?;
            let len = (b * n) as i64;
            let (r, w) = (b as i32, n as i32);
            let moe = self.moe();
            for (ids, cache) in self.blocks.iter().zip(fw.blocks.iter()).rev() {
                let mut dm = g.zeros::<f32>(b * n)?;
                let beta = m.residual as f32;
                cuda_launch!(g, "axpy", Gpu::per_item(b * n), &mut dm, &dh, &beta, &len)?;
                let mut da = moe.backward(g, &st.params, &mut grads, &ids.moe, &cache.moe, &dm, b)?;
                match (ids.norm, &cache.xhat) {
                    (Some(nid), Some((xh, inv))) => {
                        if m.norm != 1.0 {
                            let s = m.norm as f32;
                            cuda_launch!(g, "scale_inplace", Gpu::per_item(b * n), &mut da, &s, &len)?;
                        }
                        cuda_launch!(g, "column_dot", Gpu::per_item(n), &da, xh, &mut grads[nid], &r, &w)?;
                        cuda_launch!(g, "rms_norm_backward", Gpu::per_warp(b), &da, &st.params[nid], xh, inv, &mut dh, &r, &w)?;
                    }
                    _ => {
                        let one = 1.0f32;
                        cuda_launch!(g, "axpy", Gpu::per_item(b * n), &mut dh, &da, &one, &len)?;
                    }
                }
            }
            g.gemm(true, false, (n, d, b), m.input as f32, &dh.slice(..), n, &fw.x.slice(..), d, 0.0, &mut grads[self.embedding].slice_mut(..), d)?;
            Ok(())
        })();
        st.grads = grads;
        result?;
        Ok((loss, fw))
    }

    /// Store positions of the balancing biases, when the config moves them (else none).
    fn balancing_bias_ids(&self) -> Vec<usize> {
        if self.host.config().routing.bias_update_rate == 0.0 {
            return Vec::new();
        }
        self.blocks.iter().map(|ids| ids.moe.bias).collect()
    }
}

impl Model<f32> for GpuResNet {
    fn store(&self) -> &ParamStore<f32> {
        self.host.store()
    }

    fn store_mut(&mut self) -> &mut ParamStore<f32> {
        state::before_host_edit(&mut self.state, &self.gpu, self.host.store_mut());
        self.host.store_mut()
    }

    fn loss_and_grad(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<StepOutput<f32>> {
        let (x, y) = self.regression(batch)?;
        let mut st = state::lock(&self.state)?;
        st.upload(&self.gpu, self.host.store())?;
        let (loss, fw) = self.forward_backward(&mut st, x, y, rng)?;
        let grads = st.grads_to_host(&self.gpu, self.host.store())?;
        Ok(StepOutput { loss, aux_loss: fw.aux_loss, grads, load: fw.load, diagnostics: fw.diagnostics })
    }

    fn forward(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<(f64, Array2<f64>)> {
        let (x, y) = self.regression(batch)?;
        let mut st = state::lock(&self.state)?;
        st.upload(&self.gpu, self.host.store())?;
        let fw = self.forward_pass(&st, x, rng)?;
        let b = x.nrows();
        let outputs = self.host.config().outputs;
        let f = Array2::from_shape_vec((b, outputs), fw.f.iter().map(|&v| v as f64).collect())
            .map_err(|e| Error::Internal(format!("cuda: prediction shape: {e}")))?;
        let loss = 0.5 * f.iter().zip(y.iter()).map(|(p, t)| (p - t).powi(2)).sum::<f64>() / b.max(1) as f64;
        Ok((loss, f))
    }

    fn after_step(&mut self, load: &[LoadStats]) {
        state::before_host_edit(&mut self.state, &self.gpu, self.host.store_mut());
        self.host.after_step(load);
    }

    fn resident(&mut self) -> Option<&mut dyn Resident> {
        Some(self)
    }
}


impl super::DeviceModel for GpuResNet {
    fn grad_on_device(&self, batch: &Batch, rng: &mut ChaCha8Rng, measure: bool) -> crate::Result<ResidentGrad> {
        let (x, y) = self.regression(batch)?;
        let mut st = state::lock(&self.state)?;
        st.upload(&self.gpu, self.host.store())?;
        let (loss, fw) = self.forward_backward(&mut st, x, y, rng)?;
        let (grad_sq, param_sq) = if measure { st.sums_of_squares(&self.gpu)? } else { Default::default() };
        Ok(ResidentGrad { loss, aux_loss: fw.aux_loss, load: fw.load, diagnostics: fw.diagnostics, grad_sq, param_sq })
    }

    fn update_on_device(&mut self, lr_factor: f64, betas: (f64, f64), grad_scale: f64, measure: bool, load: &[LoadStats]) -> crate::Result<Vec<f64>> {
        let biases = self.balancing_bias_ids();
        state::update(&mut self.state, &self.gpu, &mut self.host, &self.hp, (lr_factor, betas, grad_scale), measure, load, &biases)
    }

    fn download_params(&mut self) -> crate::Result<()> {
        let st = state::get_mut(&mut self.state)?;
        st.download_into(&self.gpu, self.host.store_mut())
    }
}
