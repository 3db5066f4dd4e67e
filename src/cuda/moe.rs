//! One MoE layer on the GPU, shared by the MoE-ResNet and the MoE-Transformer: the router product, top-k
//! routing with capacity and prototypes (`route_topk`, `expert_counts`, `expert_lists`), the experts'
//! products with cuBLAS on their gathered tokens, shared experts and the auxiliary routing losses, and
//! the backward of all of it. Same rules, same random draws and same summation order as
//! [`crate::model::moe`], so a layer's output and gradients match the CPU's to f32 rounding.
//!
//! The kept assignments of each expert are gathered in token order into contiguous rows (the CPU's
//! order), each expert does its products with cuBLAS, and outputs are combined per token in slot order
//! without atomics, so a run is deterministic.

use cudarc::driver::CudaSlice;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::device::{Gpu, MAX_ACTIVE, NULL};
use crate::cuda_launch;
use crate::model::moe::{MoeMultipliers, MoeParamIds};
use crate::model::Activation;
use crate::param::Sizes;
use crate::routing::{Gate, LoadStats, RoutingConfig, TieBreak};
use crate::Error;

/// The kernels' code of an activation (the order of [`Activation`]).
pub fn act_kind(a: Activation) -> i32 {
    match a {
        Activation::Relu => 0,
        Activation::Tanh => 1,
        Activation::Gelu => 2,
        Activation::Linear => 3,
    }
}

/// RMS of the first `rows * width` entries of `x`, reduced on the host in f64 in row order.
pub fn rms(g: &Gpu, x: &CudaSlice<f32>, rows: usize, width: usize) -> crate::Result<f64> {
    if rows == 0 || width == 0 {
        return Ok(0.0);
    }
    let mut out = g.zeros::<f64>(rows)?;
    let (r, w) = (rows as i32, width as i32);
    cuda_launch!(g, "row_sumsq", Gpu::per_warp(rows), x, &mut out, &r, &w)?;
    let sums = g.download(&out, rows)?;
    Ok((sums.iter().sum::<f64>() / (rows * width) as f64).sqrt())
}

/// The limits of the routing kernel, as a config error naming the field.
pub fn check_supported(sizes: &Sizes) -> crate::Result<()> {
    if sizes.active > MAX_ACTIVE {
        return Err(Error::invalid(
            "model.sizes.active",
            format!("the GPU backend routes at most {MAX_ACTIVE} experts per token, got {}", sizes.active),
        ));
    }
    if [sizes.width * 3, sizes.experts, sizes.expert_hidden].iter().any(|&v| v > i32::MAX as usize / 4) {
        return Err(Error::invalid("model.sizes", "too large for the GPU backend's 32-bit indices"));
    }
    Ok(())
}

/// [`crate::routing::Routing::load_stats`] from the kept counts per expert.
pub fn load_stats(kept: &[usize], tokens: usize, active: usize) -> LoadStats {
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

/// Shape, routing rules, activation and multipliers of one MoE layer.
#[derive(Debug, Clone, Copy)]
pub struct GpuMoe<'a> {
    pub width: usize,
    pub experts: usize,
    pub active: usize,
    pub expert_hidden: usize,
    pub routing: &'a RoutingConfig,
    pub activation: Activation,
    pub mult: MoeMultipliers,
}

/// What the backward pass of one MoE layer needs, all on the device.
pub struct MoeCache {
    /// Input of the layer (T x N).
    pub a: CudaSlice<f32>,
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

/// What [`GpuMoe::forward`] returns besides the cache.
pub struct MoeForward {
    /// Layer output (T x N).
    pub out: CudaSlice<f32>,
    pub cache: MoeCache,
    pub load: LoadStats,
    /// Weighted auxiliary losses (balance, z-loss).
    pub aux_loss: f64,
    pub router_logits_rms: f64,
    pub expert_preact_rms: f64,
    pub out_rms: f64,
}

impl<'a> GpuMoe<'a> {
    pub fn new(sizes: &Sizes, routing: &'a RoutingConfig, activation: Activation, mult: MoeMultipliers) -> Self {
        GpuMoe {
            width: sizes.width,
            experts: sizes.experts,
            active: sizes.active,
            expert_hidden: sizes.expert_hidden,
            routing,
            activation,
            mult,
        }
    }

    /// Forward on `a` (T x N) with the layer's tensors at `ids` in `p`; `rng` gives the tie-break
    /// draws, the same ones as [`crate::routing::route`].
    pub fn forward(
        &self,
        g: &Gpu,
        p: &[CudaSlice<f32>],
        ids: &MoeParamIds,
        a: CudaSlice<f32>,
        tokens: usize,
        rng: &mut ChaCha8Rng,
    ) -> crate::Result<MoeForward> {
        let m = &self.mult;
        let (n, experts, k, hid) = (self.width, self.experts, self.active, self.expert_hidden);
        let routing = self.routing;

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
    let act = act_kind(self.activation);
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
        for s in 0..self.routing.shared_experts {
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
        let (router_logits_rms, expert_preact_rms, out_rms) = (rms(g, &logits, tokens, experts)?, rms(g, &u, total, hid)?, rms(g, &out, tokens, n)?);
        let cache = MoeCache {
            a,
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
        Ok(MoeForward { out, cache, load, aux_loss, router_logits_rms, expert_preact_rms, out_rms })
    }

    /// Backward given dL/d(out) `dm` (T x N): writes the layer's parameter gradients into `grads` and
    /// returns dL/da (T x N).
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        g: &Gpu,
        p: &[CudaSlice<f32>],
        grads: &mut [CudaSlice<f32>],
        ids: &MoeParamIds,
        c: &MoeCache,
        dm: &CudaSlice<f32>,
        tokens: usize,
    ) -> crate::Result<CudaSlice<f32>> {
        let m = &self.mult;
        let (n, experts, k, hid) = (self.width, self.experts, self.active, self.expert_hidden);
    let total = c.total;
    let (t_i, m_i, k_i, n_i, tot_i) = (tokens as i32, experts as i32, k as i32, n as i32, total as i32);
    let act = act_kind(self.activation);

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
    let gate_kind: i32 = match self.routing.gate {
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
}
