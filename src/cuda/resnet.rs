//! The MoE-ResNet on the GPU in f32: the same weights, routing rules, losses, gradients, load statistics
//! and diagnostics as [`crate::model::resnet::MoeResNet`], computed with cuBLAS products and the kernels
//! of `kernels.cu`.
//!
//! [`GpuResNet`] implements [`Model<f32>`], so the CPU trainer drives it unchanged: the host
//! [`ParamStore`] stays the reference copy (the optimizer updates it), and every `loss_and_grad` uploads
//! the parameters and downloads the gradients. [`GpuResNet::device_step`] instead keeps parameters,
//! gradients and optimizer moments on the device (the timing path).
//!
//! Routing randomness matches the CPU bit for bit: random tie-breaking draws the same `T * M` numbers
//! from the same rng, in the same order, on the host, and the kernel compares them the same way. The
//! MoE per expert: the kept assignments of each expert are gathered in token order into contiguous
//! rows (the CPU's order), each expert does its products with cuBLAS, and outputs are combined per
//! token in slot order without atomics, so a run is deterministic.

use std::sync::Mutex;

use cudarc::driver::CudaSlice;
use ndarray::{Array2, ArrayD, IxDyn};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::device::{cu, Gpu, MAX_ACTIVE, NULL};
use crate::cuda_launch;
use crate::model::resnet::{MoeResNet, ResNetConfig, ResNetMultipliers, NORM_EPS};
use crate::model::{Activation, Batch, Grads, Model, ParamStore, StepOutput};
use crate::param::Resolved;
use crate::routing::{Gate, LoadStats, TieBreak};
use crate::train::optim::{param_hps, ParamHp};
use crate::Error;

fn act_kind(a: Activation) -> i32 {
    match a {
        Activation::Relu => 0,
        Activation::Tanh => 1,
        Activation::Gelu => 2,
        Activation::Linear => 3,
    }
}

/// Store positions of one block's tensors.
#[derive(Debug, Clone, Copy)]
struct BlockIds {
    norm: Option<usize>,
    router: usize,
    bias: usize,
    up: usize,
    down: usize,
    shared_up: Option<usize>,
    shared_down: Option<usize>,
}

/// What the backward pass of one MoE block needs, all on the device.
struct BlockCache {
    /// Input of the MoE (T x N): the normalized stream, or a copy of it without norm.
    a: CudaSlice<f32>,
    /// Normalized rows before gain and multiplier, and inverse RMS (with norm only).
    xhat: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    selected: CudaSlice<i32>,
    gates: CudaSlice<f32>,
    sig: CudaSlice<f32>,
    sig_sum: CudaSlice<f32>,
    pos: CudaSlice<i32>,
    list_token: CudaSlice<i32>,
    list_gate: CudaSlice<f32>,
    /// Kept assignments per expert and their first row in the gathered buffers.
    counts: Vec<usize>,
    offsets: Vec<usize>,
    total: usize,
    /// Gathered inputs (total x N), preactivations and hidden (total x n), expert outputs (total x N).
    a_g: CudaSlice<f32>,
    u: CudaSlice<f32>,
    hidden: CudaSlice<f32>,
    z: CudaSlice<f32>,
    /// Per shared expert: preactivations and hidden (T x n).
    shared: Vec<(CudaSlice<f32>, CudaSlice<f32>)>,
    /// Gradient of the weighted aux losses on the logits (T x M), when any is on.
    aux_grad: Option<CudaSlice<f32>>,
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

/// Adam's first and second moments on the device, aligned with the parameters.
type Moments = (Vec<CudaSlice<f32>>, Vec<CudaSlice<f32>>);

/// Device copies of parameters, gradients and (for [`GpuResNet::device_step`]) optimizer moments.
struct DeviceState {
    params: Vec<CudaSlice<f32>>,
    grads: Vec<CudaSlice<f32>>,
    moments: Option<Moments>,
    adam_steps: u64,
}

/// The MoE-ResNet with its parameters on the host ([`MoeResNet`]) and a device copy.
pub struct GpuResNet {
    host: MoeResNet<f32>,
    hp: Resolved,
    gpu: Gpu,
    embedding: usize,
    readout: usize,
    blocks: Vec<BlockIds>,
    state: Mutex<DeviceState>,
}

impl std::fmt::Debug for GpuResNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuResNet").field("gpu", &self.gpu).field("config", self.host.config()).finish()
    }
}

fn position(store: &ParamStore<f32>, name: &str) -> crate::Result<usize> {
    store.index_of(name).ok_or_else(|| Error::Internal(format!("cuda: tensor `{name}` missing from the store")))
}

/// Checks the options the GPU backend supports; errors name the config field.
pub fn check_supported(cfg: &ResNetConfig) -> crate::Result<()> {
    cfg.validate()?;
    if cfg.sizes.active > MAX_ACTIVE {
        return Err(Error::invalid(
            "model.sizes.active",
            format!("the GPU backend routes at most {MAX_ACTIVE} experts per token, got {}", cfg.sizes.active),
        ));
    }
    if cfg.sizes.width > i32::MAX as usize / 4 || cfg.sizes.experts > i32::MAX as usize / 4 {
        return Err(Error::invalid("model.sizes", "too large for the GPU backend's 32-bit indices"));
    }
    Ok(())
}

impl GpuResNet {
    /// Puts `host` (weights as they are) on the device `gpu`.
    pub fn new(host: MoeResNet<f32>, hp: &Resolved, gpu: Gpu) -> crate::Result<Self> {
        let cfg = host.config().clone();
        check_supported(&cfg)?;
        let store = host.store();
        let mut blocks = Vec::with_capacity(cfg.sizes.depth);
        for l in 0..cfg.sizes.depth {
            let p = |s: &str| position(store, &format!("blocks.{l}.{s}"));
            let shared = cfg.routing.shared_experts > 0;
            blocks.push(BlockIds {
                norm: if cfg.norm { Some(p("norm")?) } else { None },
                router: p("moe.router")?,
                bias: p("moe.expert_bias")?,
                up: p("moe.expert_up")?,
                down: p("moe.expert_down")?,
                shared_up: if shared { Some(p("moe.shared_up")?) } else { None },
                shared_down: if shared { Some(p("moe.shared_down")?) } else { None },
            });
        }
        let embedding = position(store, "embedding")?;
        let readout = position(store, "readout")?;
        let mut params = Vec::with_capacity(store.params.len());
        let mut grads = Vec::with_capacity(store.params.len());
        for p in &store.params {
            params.push(gpu.upload(&flat(&p.value))?);
            grads.push(gpu.zeros::<f32>(p.value.len())?);
        }
        let state = DeviceState { params, grads, moments: None, adam_steps: 0 };
        Ok(GpuResNet { host, hp: hp.clone(), gpu, embedding, readout, blocks, state: Mutex::new(state) })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The host model (its store is the reference copy of the weights in the [`Model`] path).
    pub fn host(&self) -> &MoeResNet<f32> {
        &self.host
    }

    fn lock(&self) -> crate::Result<std::sync::MutexGuard<'_, DeviceState>> {
        self.state.lock().map_err(|_| Error::Internal("cuda: device state poisoned by an earlier failure".into()))
    }

    /// Copies every host tensor to the device.
    fn upload_params(&self, st: &mut DeviceState) -> crate::Result<()> {
        for (p, d) in self.host.store().params.iter().zip(st.params.iter_mut()) {
            self.gpu.upload_into(&flat(&p.value), d)?;
        }
        Ok(())
    }

    /// Copies the device parameters back into the host store (after [`Self::device_step`]).
    pub fn download_params(&mut self) -> crate::Result<()> {
        let st = self.state.get_mut().map_err(|_| Error::Internal("cuda: device state poisoned".into()))?;
        for (p, d) in self.host.store_mut().params.iter_mut().zip(st.params.iter()) {
            let v = self.gpu.download(d, p.value.len())?;
            p.value = ArrayD::from_shape_vec(IxDyn(p.value.shape()), v)
                .map_err(|e| Error::Internal(format!("cuda: parameter shape: {e}")))?;
        }
        Ok(())
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

    /// RMS of the first `rows * width` entries of `x`, reduced on the host in f64 in row order.
    fn rms(&self, x: &CudaSlice<f32>, rows: usize, width: usize) -> crate::Result<f64> {
        if rows == 0 || width == 0 {
            return Ok(0.0);
        }
        let mut out = self.gpu.zeros::<f64>(rows)?;
        let (r, w) = (rows as i32, width as i32);
        cuda_launch!(self.gpu, "row_sumsq", Gpu::per_warp(rows), x, &mut out, &r, &w)?;
        let sums = self.gpu.download(&out, rows)?;
        Ok((sums.iter().sum::<f64>() / (rows * width) as f64).sqrt())
    }

    fn forward_pass(&self, st: &DeviceState, x: &Array2<f64>, rng: &mut ChaCha8Rng) -> crate::Result<Forward> {
        let cfg = self.host.config();
        let m: ResNetMultipliers = *self.host.multipliers();
        let g = &self.gpu;
        let (b, d, n) = (x.nrows(), cfg.input_dim, cfg.sizes.width);
        let xs: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let xd = g.upload(&xs)?;
        let mut h = g.zeros::<f32>(b * n)?;
        let emb = &st.params[self.embedding];
        g.gemm(false, true, (b, n, d), m.input as f32, &xd.slice(..), d, &emb.slice(..), d, 0.0, &mut h.slice_mut(..), n)?;
        let mut diagnostics = vec![("embedding.h_rms".to_string(), self.rms(&h, b, n)?)];
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut load = Vec::with_capacity(self.blocks.len());
        let mut aux_loss = 0.0;
        let total_bn = (b * n) as i64;
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
            let (out, cache, block_load, block_aux, diag) = self.moe_forward(st, ids, a, xhat, b, rng)?;
            let beta = m.residual as f32;
            cuda_launch!(g, "axpy", Gpu::per_item(b * n), &mut h, &out, &beta, &total_bn)?;
            diagnostics.push((format!("block{l}.router_logits_rms"), diag.0));
            diagnostics.push((format!("block{l}.expert_preact_rms"), diag.1));
            diagnostics.push((format!("block{l}.moe_out_rms"), diag.2));
            diagnostics.push((format!("block{l}.h_rms"), self.rms(&h, b, n)?));
            aux_loss += block_aux;
            load.push(block_load);
            blocks.push(cache);
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

    /// One MoE block forward on `a` (T x N). Returns (output T x N, cache, load, weighted aux loss,
    /// (router logits RMS, expert preactivation RMS, output RMS)).
    #[allow(clippy::type_complexity)]
    fn moe_forward(
        &self,
        st: &DeviceState,
        ids: &BlockIds,
        a: CudaSlice<f32>,
        xhat: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
        tokens: usize,
        rng: &mut ChaCha8Rng,
    ) -> crate::Result<(CudaSlice<f32>, BlockCache, LoadStats, f64, (f64, f64, f64))> {
        let cfg = self.host.config();
        let m = self.host.multipliers();
        let g = &self.gpu;
        let (n, experts, k, hid) = (cfg.sizes.width, cfg.sizes.experts, cfg.sizes.active, cfg.sizes.expert_hidden);
        let routing = &cfg.routing;
        let p = &st.params;

        let mut logits = g.zeros::<f32>(tokens * experts)?;
        g.gemm(false, true, (tokens, experts, n), m.router as f32, &a.slice(..), n, &p[ids.router].slice(..), n, 0.0, &mut logits.slice_mut(..), experts)?;

        // The same draws as routing::route: T * M numbers, row-major, before any selection.
        let jitter = match routing.tie_break {
            TieBreak::Random => {
                let j: Vec<u64> = (0..tokens * experts).map(|_| rng.gen::<u64>()).collect();
                Some(g.upload(&j)?)
            }
            TieBreak::Index => None,
        };
        let mut selected = g.zeros::<i32>(tokens * k)?;
        let mut gates = g.zeros::<f32>(tokens * k)?;
        let mut sig = g.zeros::<f32>(tokens * k)?;
        let mut sig_sum = g.zeros::<f32>(tokens)?;
        let gate_kind: i32 = match routing.gate {
            Gate::Softmax => 0,
            Gate::Sigmoid => 1,
        };
        let (t_i, m_i, k_i, z_i) = (tokens as i32, experts as i32, k as i32, routing.prototypes as i32);
        match &jitter {
            Some(j) => cuda_launch!(g, "route_topk", Gpu::per_item(tokens), &logits, &p[ids.bias], j, &t_i, &m_i, &k_i, &z_i, &gate_kind, &mut selected, &mut gates, &mut sig, &mut sig_sum)?,
            None => cuda_launch!(g, "route_topk", Gpu::per_item(tokens), &logits, &p[ids.bias], &NULL, &t_i, &m_i, &k_i, &z_i, &gate_kind, &mut selected, &mut gates, &mut sig, &mut sig_sum)?,
        }

        let capacity: i32 = match routing.capacity(tokens, experts, k) {
            Some(c) => i32::try_from(c).unwrap_or(i32::MAX),
            None => -1,
        };
        let mut kept = g.zeros::<i32>(tokens * k)?;
        let mut count_sel = g.zeros::<i32>(experts)?;
        let mut count_kept = g.zeros::<i32>(experts)?;
        cuda_launch!(g, "expert_counts", Gpu::per_item(experts), &selected, &t_i, &k_i, &m_i, &capacity, &mut kept, &mut count_sel, &mut count_kept)?;
        let sel_counts: Vec<usize> = g.download(&count_sel, experts)?.into_iter().map(|c| c as usize).collect();
        let counts: Vec<usize> = g.download(&count_kept, experts)?.into_iter().map(|c| c as usize).collect();
        let mut offsets = Vec::with_capacity(experts);
        let mut total = 0usize;
        for &c in &counts {
            offsets.push(total);
            total += c;
        }
        let offsets_i: Vec<i32> = offsets.iter().map(|&o| o as i32).collect();
        let offsets_d = g.upload(&offsets_i)?;
        let mut list_token = g.zeros::<i32>(total)?;
        let mut list_gate = g.zeros::<f32>(total)?;
        let mut pos = g.zeros::<i32>(tokens * k)?;
        cuda_launch!(g, "expert_lists", Gpu::per_item(experts), &selected, &kept, &gates, &offsets_d, &t_i, &k_i, &m_i, &mut list_token, &mut list_gate, &mut pos)?;

        // Experts: gather, up-projection, activation, down-projection, per expert with cuBLAS.
        let (tot_i, n_i) = (total as i32, n as i32);
        let mut a_g = g.zeros::<f32>(total * n)?;
        if total > 0 {
            cuda_launch!(g, "gather_rows", Gpu::per_item(total * n), &a, &list_token, &NULL, &mut a_g, &tot_i, &n_i)?;
        }
        let mut u = g.zeros::<f32>(total * hid)?;
        let (up, down) = (&p[ids.up], &p[ids.down]);
        for e in 0..experts {
            let (c, o) = (counts[e], offsets[e]);
            if c == 0 {
                continue;
            }
            g.gemm(false, true, (c, hid, n), m.up as f32, &a_g.slice(o * n..(o + c) * n), n, &up.slice(e * hid * n..(e + 1) * hid * n), n, 0.0, &mut u.slice_mut(o * hid..(o + c) * hid), hid)?;
        }
        let act = act_kind(cfg.activation);
        let mut hidden = g.zeros::<f32>(total * hid)?;
        let len_h = (total * hid) as i64;
        if total > 0 {
            cuda_launch!(g, "act_forward", Gpu::per_item(total * hid), &u, &mut hidden, &len_h, &act)?;
        }
        let mut z = g.zeros::<f32>(total * n)?;
        for e in 0..experts {
            let (c, o) = (counts[e], offsets[e]);
            if c == 0 {
                continue;
            }
            g.gemm(false, true, (c, n, hid), m.down as f32, &hidden.slice(o * hid..(o + c) * hid), hid, &down.slice(e * n * hid..(e + 1) * n * hid), hid, 0.0, &mut z.slice_mut(o * n..(o + c) * n), n)?;
        }
        let mut out = g.zeros::<f32>(tokens * n)?;
        let zero_i: i32 = 0;
        cuda_launch!(g, "combine", Gpu::per_item(tokens * n), &z, &pos, &gates, &mut out, &t_i, &k_i, &n_i, &zero_i)?;

        // Shared experts: every token, weight 1, added straight into the output by cuBLAS (beta = 1).
        let mut shared = Vec::new();
        if let (Some(su), Some(sd)) = (ids.shared_up, ids.shared_down) {
            let len_s = (tokens * hid) as i64;
            for s in 0..cfg.routing.shared_experts {
                let mut us = g.zeros::<f32>(tokens * hid)?;
                g.gemm(false, true, (tokens, hid, n), m.up as f32, &a.slice(..), n, &p[su].slice(s * hid * n..(s + 1) * hid * n), n, 0.0, &mut us.slice_mut(..), hid)?;
                let mut hs = g.zeros::<f32>(tokens * hid)?;
                cuda_launch!(g, "act_forward", Gpu::per_item(tokens * hid), &us, &mut hs, &len_s, &act)?;
                g.gemm(false, true, (tokens, n, hid), m.down as f32, &hs.slice(..), hid, &p[sd].slice(s * n * hid..(s + 1) * n * hid), hid, 1.0, &mut out.slice_mut(..), n)?;
                shared.push((us, hs));
            }
        }

        // Weighted aux losses (routing::aux_losses), computed from the full softmax of the logits.
        let mut aux_loss = 0.0;
        let mut aux_grad = None;
        if tokens > 0 && (routing.balance_loss != 0.0 || routing.z_loss != 0.0) {
            let mut probs = g.zeros::<f32>(tokens * experts)?;
            let mut lse = g.zeros::<f64>(tokens)?;
            cuda_launch!(g, "softmax_rows", Gpu::per_item(tokens), &logits, &mut probs, &mut lse, &t_i, &m_i)?;
            let fractions: Vec<f64> = sel_counts.iter().map(|&c| c as f64 / (tokens * k) as f64).collect();
            let f_d = g.upload(&fractions)?;
            let bal_scale = routing.balance_loss * experts as f64 / tokens as f64;
            let z_scale = routing.z_loss * 2.0 / tokens as f64;
            let mut grad = g.zeros::<f32>(tokens * experts)?;
            cuda_launch!(g, "aux_grad", Gpu::per_item(tokens), &probs, &lse, &f_d, &mut grad, &t_i, &m_i, &bal_scale, &z_scale)?;
            if routing.balance_loss != 0.0 {
                let mut col = g.zeros::<f32>(experts)?;
                cuda_launch!(g, "column_dot", Gpu::per_item(experts), &probs, &NULL, &mut col, &t_i, &m_i)?;
                let p_sum = g.download(&col, experts)?;
                let fp: f64 = fractions.iter().zip(&p_sum).map(|(f, &ps)| f * ps as f64 / tokens as f64).sum();
                aux_loss += routing.balance_loss * experts as f64 * fp;
            }
            if routing.z_loss != 0.0 {
                let l = g.download(&lse, tokens)?;
                aux_loss += routing.z_loss * l.iter().map(|v| v * v).sum::<f64>() / tokens as f64;
            }
            aux_grad = Some(grad);
        }

        let load = load_stats(&counts, tokens, k);
        let diag = (self.rms(&logits, tokens, experts)?, self.rms(&u, total, hid)?, self.rms(&out, tokens, n)?);
        let cache = BlockCache {
            a,
            xhat,
            selected,
            gates,
            sig,
            sig_sum,
            pos,
            list_token,
            list_gate,
            counts,
            offsets,
            total,
            a_g,
            u,
            hidden,
            z,
            shared,
            aux_grad,
        };
        Ok((out, cache, load, aux_loss, diag))
    }

    /// Backward of one MoE block given dL/d(out) `dm` (T x N); writes the block's parameter gradients
    /// into `grads` and returns dL/da (T x N).
    fn moe_backward(
        &self,
        st: &DeviceState,
        grads: &mut [CudaSlice<f32>],
        ids: &BlockIds,
        c: &BlockCache,
        dm: &CudaSlice<f32>,
        tokens: usize,
    ) -> crate::Result<CudaSlice<f32>> {
        let cfg = self.host.config();
        let m = self.host.multipliers();
        let g = &self.gpu;
        let (n, experts, k, hid) = (cfg.sizes.width, cfg.sizes.experts, cfg.sizes.active, cfg.sizes.expert_hidden);
        let p = &st.params;
        let total = c.total;
        let (t_i, m_i, k_i, n_i, tot_i) = (tokens as i32, experts as i32, k as i32, n as i32, total as i32);
        let act = act_kind(cfg.activation);

        // Gate-scaled output gradients per kept assignment, and dL/dgate per (token, slot).
        let mut g_rows = g.zeros::<f32>(total * n)?;
        if total > 0 {
            cuda_launch!(g, "gather_rows", Gpu::per_item(total * n), dm, &c.list_token, &c.list_gate, &mut g_rows, &tot_i, &n_i)?;
        }
        let mut d_gate = g.zeros::<f32>(tokens * k)?;
        cuda_launch!(g, "gate_grad", Gpu::per_warp(tokens * k), dm, &c.z, &c.pos, &mut d_gate, &t_i, &k_i, &n_i)?;

        let (up, down) = (&p[ids.up], &p[ids.down]);
        let mut du = g.zeros::<f32>(total * hid)?;
        for e in 0..experts {
            let (cnt, o) = (c.counts[e], c.offsets[e]);
            if cnt == 0 {
                continue;
            }
            let ge = g_rows.slice(o * n..(o + cnt) * n);
            g.gemm(true, false, (n, hid, cnt), m.down as f32, &ge, n, &c.hidden.slice(o * hid..(o + cnt) * hid), hid, 0.0, &mut grads[ids.down].slice_mut(e * n * hid..(e + 1) * n * hid), hid)?;
            g.gemm(false, false, (cnt, hid, n), m.down as f32, &ge, n, &down.slice(e * n * hid..(e + 1) * n * hid), hid, 0.0, &mut du.slice_mut(o * hid..(o + cnt) * hid), hid)?;
        }
        let len_h = (total * hid) as i64;
        if total > 0 {
            cuda_launch!(g, "act_backward", Gpu::per_item(total * hid), &c.u, &mut du, &len_h, &act)?;
        }
        let mut da_g = g.zeros::<f32>(total * n)?;
        for e in 0..experts {
            let (cnt, o) = (c.counts[e], c.offsets[e]);
            if cnt == 0 {
                continue;
            }
            let due = du.slice(o * hid..(o + cnt) * hid);
            g.gemm(true, false, (hid, n, cnt), m.up as f32, &due, hid, &c.a_g.slice(o * n..(o + cnt) * n), n, 0.0, &mut grads[ids.up].slice_mut(e * hid * n..(e + 1) * hid * n), n)?;
            g.gemm(false, false, (cnt, n, hid), m.up as f32, &due, hid, &up.slice(e * hid * n..(e + 1) * hid * n), n, 0.0, &mut da_g.slice_mut(o * n..(o + cnt) * n), n)?;
        }
        let mut da = g.zeros::<f32>(tokens * n)?;
        let zero_i: i32 = 0;
        cuda_launch!(g, "combine", Gpu::per_item(tokens * n), &da_g, &c.pos, &NULL, &mut da, &t_i, &k_i, &n_i, &zero_i)?;

        if let (Some(su), Some(sd)) = (ids.shared_up, ids.shared_down) {
            let len_s = (tokens * hid) as i64;
            for (s, (us, hs)) in c.shared.iter().enumerate() {
                g.gemm(true, false, (n, hid, tokens), m.down as f32, &dm.slice(..), n, &hs.slice(..), hid, 0.0, &mut grads[sd].slice_mut(s * n * hid..(s + 1) * n * hid), hid)?;
                let mut dus = g.zeros::<f32>(tokens * hid)?;
                g.gemm(false, false, (tokens, hid, n), m.down as f32, &dm.slice(..), n, &p[sd].slice(s * n * hid..(s + 1) * n * hid), hid, 0.0, &mut dus.slice_mut(..), hid)?;
                cuda_launch!(g, "act_backward", Gpu::per_item(tokens * hid), us, &mut dus, &len_s, &act)?;
                g.gemm(true, false, (hid, n, tokens), m.up as f32, &dus.slice(..), hid, &c.a.slice(..), n, 0.0, &mut grads[su].slice_mut(s * hid * n..(s + 1) * hid * n), n)?;
                g.gemm(false, false, (tokens, n, hid), m.up as f32, &dus.slice(..), hid, &p[su].slice(s * hid * n..(s + 1) * hid * n), n, 1.0, &mut da.slice_mut(..), n)?;
            }
        }

        // Router: gate backward plus aux gradient, times the router multiplier, then two products.
        let gate_kind: i32 = match cfg.routing.gate {
            Gate::Softmax => 0,
            Gate::Sigmoid => 1,
        };
        let mult = m.router as f32;
        let mut d_logits = g.zeros::<f32>(tokens * experts)?;
        match &c.aux_grad {
            Some(aux) => cuda_launch!(g, "gates_backward", Gpu::per_item(tokens), &c.gates, &c.sig, &c.sig_sum, &c.selected, &d_gate, aux, &mut d_logits, &t_i, &m_i, &k_i, &gate_kind, &mult)?,
            None => cuda_launch!(g, "gates_backward", Gpu::per_item(tokens), &c.gates, &c.sig, &c.sig_sum, &c.selected, &d_gate, &NULL, &mut d_logits, &t_i, &m_i, &k_i, &gate_kind, &mult)?,
        }
        g.gemm(true, false, (experts, n, tokens), 1.0, &d_logits.slice(..), experts, &c.a.slice(..), n, 0.0, &mut grads[ids.router].slice_mut(..), n)?;
        g.gemm(false, false, (tokens, n, experts), 1.0, &d_logits.slice(..), experts, &p[ids.router].slice(..), n, 1.0, &mut da.slice_mut(..), n)?;
        Ok(da)
    }

    /// Forward and backward on the device with the device parameters as they are; gradients stay in
    /// `st.grads`. Returns (loss, forward results without caches).
    fn forward_backward(
        &self,
        st: &mut DeviceState,
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
            for (ids, cache) in self.blocks.iter().zip(fw.blocks.iter()).rev() {
                let mut dm = g.zeros::<f32>(b * n)?;
                let beta = m.residual as f32;
                cuda_launch!(g, "axpy", Gpu::per_item(b * n), &mut dm, &dh, &beta, &len)?;
                let mut da = self.moe_backward(st, &mut grads, ids, cache, &dm, b)?;
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

    /// One training step entirely on the device: forward, backward, then SGD or AdamW (by the
    /// parameterization's optimizer) with every group's lr times `lr_factor`, on the device copies.
    /// The host store is not updated (see [`Self::download_params`]) except the balancing biases.
    pub fn device_step(
        &mut self,
        x: &Array2<f64>,
        y: &Array2<f64>,
        rng: &mut ChaCha8Rng,
        lr_factor: f64,
        beta1: f64,
        beta2: f64,
    ) -> crate::Result<(f64, Vec<LoadStats>)> {
        let hps: Vec<ParamHp> = param_hps(self.host.store(), &self.hp)?;
        let sizes: Vec<usize> = self.host.store().params.iter().map(|p| p.value.len()).collect();
        let mut st = std::mem::replace(
            self.state.get_mut().map_err(|_| Error::Internal("cuda: device state poisoned".into()))?,
            DeviceState { params: Vec::new(), grads: Vec::new(), moments: None, adam_steps: 0 },
        );
        let result = (|| -> crate::Result<(f64, Vec<LoadStats>)> {
            let (loss, fw) = self.forward_backward(&mut st, x, y, rng)?;
            let g = &self.gpu;
            let adam = self.hp.optimizer == crate::param::Optimizer::Adam;
            if adam && st.moments.is_none() {
                let mut mm = Vec::new();
                let mut vv = Vec::new();
                for &len in &sizes {
                    mm.push(g.zeros::<f32>(len)?);
                    vv.push(g.zeros::<f32>(len)?);
                }
                st.moments = Some((mm, vv));
            }
            if adam {
                st.adam_steps += 1;
            }
            let t = st.adam_steps as i32;
            let (bc1, bc2) = (1.0 - beta1.powi(t), 1.0 - beta2.powi(t));
            let DeviceState { params, grads, moments, .. } = &mut st;
            for i in 0..params.len() {
                let hp = hps[i];
                if hp.frozen || sizes[i] == 0 {
                    continue;
                }
                let lr = hp.lr * lr_factor;
                let decay = (1.0 - lr * hp.weight_decay) as f32;
                let len = sizes[i] as i64;
                match moments {
                    Some((mm, vv)) => {
                        let (b1, b2) = (beta1 as f32, beta2 as f32);
                        let (step, inv, eps) = ((lr / bc1) as f32, (1.0 / bc2.sqrt()) as f32, hp.adam_eps as f32);
                        cuda_launch!(g, "adamw", Gpu::per_item(sizes[i]), &mut params[i], &grads[i], &mut mm[i], &mut vv[i], &len, &b1, &b2, &decay, &step, &inv, &eps)?;
                    }
                    None => {
                        let lr32 = lr as f32;
                        cuda_launch!(g, "sgd", Gpu::per_item(sizes[i]), &mut params[i], &grads[i], &len, &decay, &lr32)?;
                    }
                }
            }
            g.sync()?;
            Ok((loss, fw.load))
        })();
        *self.state.get_mut().map_err(|_| Error::Internal("cuda: device state poisoned".into()))? = st;
        let (loss, load) = result?;
        // Auxiliary-loss-free balancing moves the biases on the host; copy them to the device.
        if self.host.config().routing.bias_update_rate != 0.0 {
            self.host.after_step(&load);
            let st = self.state.get_mut().map_err(|_| Error::Internal("cuda: device state poisoned".into()))?;
            for ids in &self.blocks {
                let v = flat(&self.host.store().params[ids.bias].value);
                self.gpu.upload_into(&v, &mut st.params[ids.bias])?;
            }
        }
        Ok((loss, load))
    }
}

/// Row-major entries of a tensor.
fn flat(a: &ArrayD<f32>) -> Vec<f32> {
    a.as_standard_layout().iter().copied().collect()
}

/// [`crate::routing::Routing::load_stats`] from the kept counts per expert.
fn load_stats(kept: &[usize], tokens: usize, active: usize) -> LoadStats {
    let total = (tokens * active).max(1) as f64;
    let fraction: Vec<f64> = kept.iter().map(|&c| c as f64 / total).collect();
    let m = kept.len() as f64;
    let mean = fraction.iter().sum::<f64>() / m;
    let var = fraction.iter().map(|f| (f - mean).powi(2)).sum::<f64>() / m;
    let cv = if mean > 0.0 { var.sqrt() / mean } else { 0.0 };
    let kept_total: usize = kept.iter().sum();
    let dropped = if tokens == 0 { 0.0 } else { 1.0 - kept_total as f64 / total };
    LoadStats { fraction, cv, dropped }
}

impl Model<f32> for GpuResNet {
    fn store(&self) -> &ParamStore<f32> {
        self.host.store()
    }

    fn store_mut(&mut self) -> &mut ParamStore<f32> {
        self.host.store_mut()
    }

    fn loss_and_grad(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<StepOutput<f32>> {
        let (x, y) = self.regression(batch)?;
        let mut st = self.lock()?;
        self.upload_params(&mut st)?;
        let (loss, fw) = self.forward_backward(&mut st, x, y, rng)?;
        let mut grads: Grads<f32> = Vec::with_capacity(st.grads.len());
        for (p, d) in self.host.store().params.iter().zip(st.grads.iter()) {
            let v = self.gpu.download(d, p.value.len())?;
            grads.push(
                ArrayD::from_shape_vec(IxDyn(p.value.shape()), v)
                    .map_err(|e| Error::Internal(format!("cuda: gradient shape: {e}")))?,
            );
        }
        Ok(StepOutput { loss, aux_loss: fw.aux_loss, grads, load: fw.load, diagnostics: fw.diagnostics })
    }

    fn forward(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<(f64, Array2<f64>)> {
        let (x, y) = self.regression(batch)?;
        let mut st = self.lock()?;
        self.upload_params(&mut st)?;
        let fw = self.forward_pass(&st, x, rng)?;
        let b = x.nrows();
        let outputs = self.host.config().outputs;
        let f = Array2::from_shape_vec((b, outputs), fw.f.iter().map(|&v| v as f64).collect())
            .map_err(|e| Error::Internal(format!("cuda: prediction shape: {e}")))?;
        let loss = 0.5 * f.iter().zip(y.iter()).map(|(p, t)| (p - t).powi(2)).sum::<f64>() / b.max(1) as f64;
        Ok((loss, f))
    }

    fn after_step(&mut self, load: &[LoadStats]) {
        self.host.after_step(load);
    }
}

