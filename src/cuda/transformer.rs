//! The MoE-Transformer on the GPU in f32: the same weights, forward, loss, gradients, routing, load
//! statistics and diagnostics as [`crate::model::transformer::MoeTransformer`], with cuBLAS for every
//! product (strided-batched over (sequence, head) pairs for attention) and the kernels of `kernels.cu`
//! for embeddings, norms, the causal softmax and the cross-entropy. MoE layers are
//! [`super::moe::GpuMoe`], shared with the MoE-ResNet.
//!
//! Like [`super::resnet::GpuResNet`] it implements [`Model<f32>`] and trains through
//! [`crate::model::Resident`]: parameters, gradients and Adam moments stay on the device.
//!
//! Attention keeps the S x S probabilities of every (sequence, head) pair for the backward pass, as the
//! CPU does: memory B * H * S^2 floats per block (134 MB per block at B = 32, H = 16, S = 256). The
//! embedding gradient is summed per token id over that id's tokens in token order (lists built on the
//! host from the ids), so it has no atomics and matches the CPU's order.

use std::sync::Mutex;

use cudarc::driver::CudaSlice;
use ndarray::Array2;
use rand_chacha::ChaCha8Rng;

use super::device::Gpu;
use super::moe::{self, act_kind, rms, GpuMoe, MoeCache};
use super::state::{self, DeviceParams};
use crate::cuda_launch;
use crate::model::transformer::{BlockIds, FfnIds, MoeTransformer, TransformerConfig, TransformerMultipliers};
use crate::model::{Batch, Model, ParamStore, Resident, ResidentGrad, StepOutput};
use crate::param::Resolved;
use crate::routing::LoadStats;
use crate::Error;

/// An RMS norm's saved values: normalized rows before the gain, and the inverse RMS per row.
struct NormCache {
    xhat: CudaSlice<f32>,
    inv: CudaSlice<f32>,
}

/// Attention's sizes for a batch: width, heads, head size, tokens B*S, (sequence, head) pairs B*H, and the
/// logit scale `attn_logit_multiplier / d_head`.
struct AttnDims {
    n: usize,
    n_head: usize,
    d_head: usize,
    tokens: usize,
    pairs: usize,
    scale: f32,
}

struct AttnCache {
    /// Input rows (T x N), the normalized stream.
    input: CudaSlice<f32>,
    /// Queries, keys, values head-major (3 x B*H x S x d_head), multiplier included.
    heads: CudaSlice<f32>,
    /// Probabilities (B*H x S x S), zero above the diagonal.
    probs: CudaSlice<f32>,
    /// Head outputs concatenated (T x N).
    context: CudaSlice<f32>,
}

enum FfnCache {
    Moe(Box<MoeCache>),
    /// Input (T x N), preactivations and hidden (T x n).
    Dense { input: CudaSlice<f32>, u: CudaSlice<f32>, hidden: CudaSlice<f32> },
}

struct BlockCache {
    attn_norm: NormCache,
    attn: AttnCache,
    ffn_norm: NormCache,
    ffn: FfnCache,
}

struct Forward {
    batch: usize,
    seq: usize,
    inputs: Vec<u32>,
    blocks: Vec<BlockCache>,
    final_norm: NormCache,
    final_hidden: CudaSlice<f32>,
    /// dL/dlogits (T x V), computed with the loss.
    d_logits: CudaSlice<f32>,
    loss: f64,
    aux_loss: f64,
    load: Vec<LoadStats>,
    diagnostics: Vec<(String, f64)>,
}

/// The MoE-Transformer with its parameters on the host ([`MoeTransformer`]) and a device copy.
pub struct GpuTransformer {
    host: MoeTransformer<f32>,
    hp: Resolved,
    gpu: Gpu,
    mult: TransformerMultipliers,
    embedding: usize,
    position: usize,
    blocks: Vec<BlockIds>,
    final_norm: usize,
    /// `None` when tied to the embedding.
    unembedding: Option<usize>,
    state: Mutex<DeviceParams>,
}

impl std::fmt::Debug for GpuTransformer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuTransformer").field("gpu", &self.gpu).field("config", self.host.config()).finish()
    }
}

/// Checks the options the GPU backend supports; errors name the config field.
pub fn check_supported(cfg: &TransformerConfig) -> crate::Result<()> {
    cfg.validate()?;
    moe::check_supported(&cfg.sizes)?;
    if cfg.vocab.max(cfg.seq_len) > i32::MAX as usize / 4 {
        return Err(Error::invalid("model.vocab", "too large for the GPU backend's 32-bit indices"));
    }
    Ok(())
}

/// Token indices grouped by `key(t)` (0..groups), each group in token order, as (list, starts): the
/// order in which the CPU adds a token's gradient into its embedding row.
fn lists_by_key(tokens: usize, groups: usize, key: impl Fn(usize) -> usize) -> (Vec<i32>, Vec<i32>) {
    let mut starts = vec![0i32; groups + 1];
    for t in 0..tokens {
        starts[key(t) + 1] += 1;
    }
    for g in 0..groups {
        starts[g + 1] += starts[g];
    }
    let mut fill: Vec<i32> = starts[..groups].to_vec();
    let mut list = vec![0i32; tokens];
    for t in 0..tokens {
        let g = key(t);
        list[fill[g] as usize] = t as i32;
        fill[g] += 1;
    }
    (list, starts)
}

impl GpuTransformer {
    /// Puts `host` (weights as they are) on the device `gpu`.
    pub fn new(host: MoeTransformer<f32>, hp: &Resolved, gpu: Gpu) -> crate::Result<Self> {
        let cfg = host.config().clone();
        check_supported(&cfg)?;
        let blocks = host.block_ids().to_vec();
        let mult = *host.multipliers();
        let (embedding, position, final_norm, unembedding) = host.io_ids();
        let state = DeviceParams::new(&gpu, host.store())?;
        Ok(GpuTransformer {
            host,
            hp: hp.clone(),
            gpu,
            mult,
            embedding,
            position,
            blocks,
            final_norm,
            unembedding,
            state: Mutex::new(state),
        })
    }

    /// The host model (its store is the reference copy of the weights in the [`Model`] path).
    pub fn host(&self) -> &MoeTransformer<f32> {
        &self.host
    }

    fn moe(&self) -> GpuMoe<'_> {
        let cfg = self.host.config();
        GpuMoe::new(&cfg.sizes, &cfg.routing, cfg.activation, self.mult.moe)
    }

    fn unembedding_id(&self) -> usize {
        self.unembedding.unwrap_or(self.embedding)
    }

    /// RMS norm of `x` (T x N) with gain `gain`: returns the output and the saved values.
    fn norm_forward(&self, x: &CudaSlice<f32>, gain: &CudaSlice<f32>, tokens: usize) -> crate::Result<(CudaSlice<f32>, NormCache)> {
        let g = &self.gpu;
        let n = self.host.config().sizes.width;
        let mut y = g.zeros::<f32>(tokens * n)?;
        let mut xhat = g.zeros::<f32>(tokens * n)?;
        let mut inv = g.zeros::<f32>(tokens)?;
        let (r, w, eps, one) = (tokens as i32, n as i32, self.host.config().norm_eps as f32, 1.0f32);
        cuda_launch!(g, "rms_norm_forward", Gpu::per_warp(tokens), x, gain, &mut y, &mut xhat, &mut inv, &r, &w, &eps, &one)?;
        Ok((y, NormCache { xhat, inv }))
    }

    /// Backward of [`Self::norm_forward`]: writes the gain's gradient into `grad_gain` and adds dL/dx to
    /// `dx`.
    fn norm_backward(
        &self,
        dy: &CudaSlice<f32>,
        gain: &CudaSlice<f32>,
        c: &NormCache,
        grad_gain: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
        tokens: usize,
    ) -> crate::Result<()> {
        let g = &self.gpu;
        let n = self.host.config().sizes.width;
        let (r, w) = (tokens as i32, n as i32);
        cuda_launch!(g, "column_dot", Gpu::per_item(n), dy, &c.xhat, grad_gain, &r, &w)?;
        cuda_launch!(g, "rms_norm_backward", Gpu::per_warp(tokens), dy, gain, &c.xhat, &c.inv, dx, &r, &w)
    }

    /// `beta * x` as a new buffer of `len` entries.
    fn scaled_copy(&self, x: &CudaSlice<f32>, beta: f64, len: usize) -> crate::Result<CudaSlice<f32>> {
        let g = &self.gpu;
        let mut y = g.zeros::<f32>(len)?;
        let (b, l) = (beta as f32, len as i64);
        cuda_launch!(g, "axpy", Gpu::per_item(len), &mut y, x, &b, &l)?;
        Ok(y)
    }

    fn attn_dims(&self, batch: usize, seq: usize) -> AttnDims {
        let cfg = self.host.config();
        let (n, n_head) = (cfg.sizes.width, cfg.n_head);
        let d_head = n / n_head;
        let scale = (cfg.attn_logit_multiplier / d_head as f64) as f32;
        AttnDims { n, n_head, d_head, tokens: batch * seq, pairs: batch * n_head, scale }
    }

    /// Causal multi-head attention on `a` (T x N); returns the output (T x N) and the cache.
    fn attention_forward(&self, p: &[CudaSlice<f32>], ids: &BlockIds, a: CudaSlice<f32>, batch: usize, seq: usize) -> crate::Result<(CudaSlice<f32>, AttnCache)> {
        let g = &self.gpu;
        let AttnDims { n, n_head, d_head, tokens, pairs, scale } = self.attn_dims(batch, seq);
        let mut qkv = g.zeros::<f32>(tokens * 3 * n)?;
        g.gemm(false, true, (tokens, 3 * n, n), self.mult.qkv as f32, &a.slice(..), n, &p[ids.qkv].slice(..), n, 0.0, &mut qkv.slice_mut(..), 3 * n)?;
        let mut heads = g.zeros::<f32>(tokens * 3 * n)?;
        let (b_i, s_i, h_i, d_i) = (batch as i32, seq as i32, n_head as i32, d_head as i32);
        let (three, one, to_heads, from_heads) = (3i32, 1i32, 1i32, 0i32);
        cuda_launch!(g, "split_heads", Gpu::per_item(tokens * 3 * n), &mut qkv, &mut heads, &b_i, &s_i, &h_i, &d_i, &three, &to_heads)?;
        let part = pairs * seq * d_head;
        let (q, k, v) = (heads.slice(0..part), heads.slice(part..2 * part), heads.slice(2 * part..3 * part));
        let mut probs = g.zeros::<f32>(pairs * seq * seq)?;
        let sd = seq * d_head;
        g.gemm_batched(false, true, (seq, seq, d_head), scale, (&q, d_head, sd), (&k, d_head, sd), 0.0, (&mut probs.slice_mut(..), seq, seq * seq), pairs)?;
        let rows = (pairs * seq) as i32;
        cuda_launch!(g, "causal_softmax", Gpu::per_warp(pairs * seq), &mut probs, &rows, &s_i)?;
        let mut ctx_heads = g.zeros::<f32>(tokens * n)?;
        g.gemm_batched(false, false, (seq, d_head, seq), 1.0, (&probs.slice(..), seq, seq * seq), (&v, d_head, sd), 0.0, (&mut ctx_heads.slice_mut(..), d_head, sd), pairs)?;
        let mut context = g.zeros::<f32>(tokens * n)?;
        cuda_launch!(g, "split_heads", Gpu::per_item(tokens * n), &mut context, &mut ctx_heads, &b_i, &s_i, &h_i, &d_i, &one, &from_heads)?;
        let mut out = g.zeros::<f32>(tokens * n)?;
        g.gemm(false, true, (tokens, n, n), self.mult.out as f32, &context.slice(..), n, &p[ids.out].slice(..), n, 0.0, &mut out.slice_mut(..), n)?;
        Ok((out, AttnCache { input: a, heads, probs, context }))
    }

    /// Backward of [`Self::attention_forward`] given dL/d(out) `dy`: writes the projections' gradients
    /// and returns dL/da (T x N).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        p: &[CudaSlice<f32>],
        grads: &mut [CudaSlice<f32>],
        ids: &BlockIds,
        c: &AttnCache,
        dy: &CudaSlice<f32>,
        batch: usize,
        seq: usize,
    ) -> crate::Result<CudaSlice<f32>> {
        let g = &self.gpu;
        let AttnDims { n, n_head, d_head, tokens, pairs, scale } = self.attn_dims(batch, seq);
        let m_out = self.mult.out as f32;
        g.gemm(true, false, (n, n, tokens), m_out, &dy.slice(..), n, &c.context.slice(..), n, 0.0, &mut grads[ids.out].slice_mut(..), n)?;
        let mut d_context = g.zeros::<f32>(tokens * n)?;
        g.gemm(false, false, (tokens, n, n), m_out, &dy.slice(..), n, &p[ids.out].slice(..), n, 0.0, &mut d_context.slice_mut(..), n)?;
        let (b_i, s_i, h_i, d_i) = (batch as i32, seq as i32, n_head as i32, d_head as i32);
        let (three, one, to_heads, from_heads) = (3i32, 1i32, 1i32, 0i32);
        let mut d_ctx = g.zeros::<f32>(tokens * n)?;
        cuda_launch!(g, "split_heads", Gpu::per_item(tokens * n), &mut d_context, &mut d_ctx, &b_i, &s_i, &h_i, &d_i, &one, &to_heads)?;

        let part = pairs * seq * d_head;
        let sd = seq * d_head;
        let (q, k, v) = (c.heads.slice(0..part), c.heads.slice(part..2 * part), c.heads.slice(2 * part..3 * part));
        let mut d_heads = g.zeros::<f32>(3 * part)?;
        let probs = c.probs.slice(..);
        // dV = P^T dctx; dP = dctx V^T; dS = softmax backward; dQ = dS K; dK = dS^T Q.
        g.gemm_batched(true, false, (seq, d_head, seq), 1.0, (&probs, seq, seq * seq), (&d_ctx.slice(..), d_head, sd), 0.0, (&mut d_heads.slice_mut(2 * part..3 * part), d_head, sd), pairs)?;
        let mut d_scores = g.zeros::<f32>(pairs * seq * seq)?;
        g.gemm_batched(false, true, (seq, seq, d_head), 1.0, (&d_ctx.slice(..), d_head, sd), (&v, d_head, sd), 0.0, (&mut d_scores.slice_mut(..), seq, seq * seq), pairs)?;
        let rows = (pairs * seq) as i32;
        cuda_launch!(g, "causal_softmax_backward", Gpu::per_warp(pairs * seq), &c.probs, &mut d_scores, &rows, &s_i, &scale)?;
        g.gemm_batched(false, false, (seq, d_head, seq), 1.0, (&d_scores.slice(..), seq, seq * seq), (&k, d_head, sd), 0.0, (&mut d_heads.slice_mut(0..part), d_head, sd), pairs)?;
        g.gemm_batched(true, false, (seq, d_head, seq), 1.0, (&d_scores.slice(..), seq, seq * seq), (&q, d_head, sd), 0.0, (&mut d_heads.slice_mut(part..2 * part), d_head, sd), pairs)?;
        let mut d_qkv = g.zeros::<f32>(tokens * 3 * n)?;
        cuda_launch!(g, "split_heads", Gpu::per_item(tokens * 3 * n), &mut d_qkv, &mut d_heads, &b_i, &s_i, &h_i, &d_i, &three, &from_heads)?;
        let m_qkv = self.mult.qkv as f32;
        g.gemm(true, false, (3 * n, n, tokens), m_qkv, &d_qkv.slice(..), 3 * n, &c.input.slice(..), n, 0.0, &mut grads[ids.qkv].slice_mut(..), n)?;
        let mut da = g.zeros::<f32>(tokens * n)?;
        g.gemm(false, false, (tokens, n, 3 * n), m_qkv, &d_qkv.slice(..), 3 * n, &p[ids.qkv].slice(..), n, 0.0, &mut da.slice_mut(..), n)?;
        Ok(da)
    }

    /// Dense FFN `m_down * phi(m_up * a U^T) V^T`: returns (output, cache, RMS of the preactivations).
    fn dense_forward(&self, p: &[CudaSlice<f32>], up: usize, down: usize, a: CudaSlice<f32>, tokens: usize) -> crate::Result<(CudaSlice<f32>, FfnCache, f64)> {
        let g = &self.gpu;
        let cfg = self.host.config();
        let (n, hid) = (cfg.sizes.width, cfg.sizes.expert_hidden);
        let m = &self.mult.moe;
        let mut u = g.zeros::<f32>(tokens * hid)?;
        g.gemm(false, true, (tokens, hid, n), m.up as f32, &a.slice(..), n, &p[up].slice(..), n, 0.0, &mut u.slice_mut(..), hid)?;
        let mut hidden = g.zeros::<f32>(tokens * hid)?;
        let (len, act) = ((tokens * hid) as i64, act_kind(cfg.activation));
        cuda_launch!(g, "act_forward", Gpu::per_item(tokens * hid), &u, &mut hidden, &len, &act)?;
        let mut out = g.zeros::<f32>(tokens * n)?;
        g.gemm(false, true, (tokens, n, hid), m.down as f32, &hidden.slice(..), hid, &p[down].slice(..), hid, 0.0, &mut out.slice_mut(..), n)?;
        let pre_rms = rms(g, &u, tokens, hid)?;
        Ok((out, FfnCache::Dense { input: a, u, hidden }, pre_rms))
    }

    #[allow(clippy::too_many_arguments)]
    fn dense_backward(
        &self,
        p: &[CudaSlice<f32>],
        grads: &mut [CudaSlice<f32>],
        (up, down): (usize, usize),
        (input, u, hidden): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<f32>),
        dy: &CudaSlice<f32>,
        tokens: usize,
    ) -> crate::Result<CudaSlice<f32>> {
        let g = &self.gpu;
        let cfg = self.host.config();
        let (n, hid) = (cfg.sizes.width, cfg.sizes.expert_hidden);
        let (m_up, m_down) = (self.mult.moe.up as f32, self.mult.moe.down as f32);
        g.gemm(true, false, (n, hid, tokens), m_down, &dy.slice(..), n, &hidden.slice(..), hid, 0.0, &mut grads[down].slice_mut(..), hid)?;
        let mut du = g.zeros::<f32>(tokens * hid)?;
        g.gemm(false, false, (tokens, hid, n), m_down, &dy.slice(..), n, &p[down].slice(..), hid, 0.0, &mut du.slice_mut(..), hid)?;
        let (len, act) = ((tokens * hid) as i64, act_kind(cfg.activation));
        cuda_launch!(g, "act_backward", Gpu::per_item(tokens * hid), u, &mut du, &len, &act)?;
        g.gemm(true, false, (hid, n, tokens), m_up, &du.slice(..), hid, &input.slice(..), n, 0.0, &mut grads[up].slice_mut(..), n)?;
        let mut da = g.zeros::<f32>(tokens * n)?;
        g.gemm(false, false, (tokens, n, hid), m_up, &du.slice(..), hid, &p[up].slice(..), n, 0.0, &mut da.slice_mut(..), n)?;
        Ok(da)
    }

    fn forward_pass(&self, st: &DeviceParams, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<Forward> {
        let (b, seq, inputs, targets) = self.host.tokens(batch)?;
        let cfg = self.host.config();
        let g = &self.gpu;
        let p = &st.params;
        let (n, vocab) = (cfg.sizes.width, cfg.vocab);
        let tokens = b * seq;
        let ids_d = g.upload(&inputs.iter().map(|&v| v as i32).collect::<Vec<_>>())?;
        let targets_d = g.upload(&targets.iter().map(|&v| v as i32).collect::<Vec<_>>())?;
        let mut h = g.zeros::<f32>(tokens * n)?;
        let (t_i, s_i, n_i, alpha) = (tokens as i32, seq as i32, n as i32, self.mult.embedding as f32);
        cuda_launch!(g, "embed_forward", Gpu::per_item(tokens * n), &p[self.embedding], &p[self.position], &ids_d, &mut h, &t_i, &s_i, &n_i, &alpha)?;

        let beta = self.mult.residual as f32;
        let len = (tokens * n) as i64;
        let moe = self.moe();
        let mut diagnostics = Vec::new();
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let (mut aux_loss, mut load) = (0.0, Vec::new());
        for (l, ids) in self.blocks.iter().enumerate() {
            let (a, attn_norm) = self.norm_forward(&h, &p[ids.attn_norm], tokens)?;
            let (attn_out, attn) = self.attention_forward(p, ids, a, b, seq)?;
            diagnostics.push((format!("block{l}.attn_out_rms"), rms(g, &attn_out, tokens, n)?));
            cuda_launch!(g, "axpy", Gpu::per_item(tokens * n), &mut h, &attn_out, &beta, &len)?;

            let (a, ffn_norm) = self.norm_forward(&h, &p[ids.ffn_norm], tokens)?;
            let (ffn_out, ffn) = match ids.ffn {
                FfnIds::Moe(moe_ids) => {
                    let o = moe.forward(g, p, &moe_ids, a, tokens, rng)?;
                    diagnostics.push((format!("block{l}.router_logits_rms"), o.router_logits_rms));
                    diagnostics.push((format!("block{l}.expert_preact_rms"), o.expert_preact_rms));
                    aux_loss += o.aux_loss;
                    load.push(o.load);
                    (o.out, FfnCache::Moe(Box::new(o.cache)))
                }
                FfnIds::Dense { up, down } => {
                    let (out, cache, pre_rms) = self.dense_forward(p, up, down, a, tokens)?;
                    diagnostics.push((format!("block{l}.expert_preact_rms"), pre_rms));
                    (out, cache)
                }
            };
            diagnostics.push((format!("block{l}.ffn_out_rms"), rms(g, &ffn_out, tokens, n)?));
            cuda_launch!(g, "axpy", Gpu::per_item(tokens * n), &mut h, &ffn_out, &beta, &len)?;
            diagnostics.push((format!("block{l}.resid_rms"), rms(g, &h, tokens, n)?));
            blocks.push(BlockCache { attn_norm, attn, ffn_norm, ffn });
        }

        let (final_hidden, final_norm) = self.norm_forward(&h, &p[self.final_norm], tokens)?;
        let mut logits = g.zeros::<f32>(tokens * vocab)?;
        g.gemm(false, true, (tokens, vocab, n), self.mult.unembedding as f32, &final_hidden.slice(..), n, &p[self.unembedding_id()].slice(..), n, 0.0, &mut logits.slice_mut(..), vocab)?;
        diagnostics.push(("logits_rms".into(), rms(g, &logits, tokens, vocab)?));

        let mut row_loss = g.zeros::<f64>(tokens)?;
        let mut d_logits = g.zeros::<f32>(tokens * vocab)?;
        let (v_i, inv_tokens) = (vocab as i32, (1.0 / tokens as f64) as f32);
        cuda_launch!(g, "cross_entropy", Gpu::per_warp(tokens), &logits, &targets_d, &mut row_loss, &mut d_logits, &t_i, &v_i, &inv_tokens)?;
        let loss = g.download(&row_loss, tokens)?.iter().sum::<f64>() / tokens as f64;
        Ok(Forward { batch: b, seq, inputs, blocks, final_norm, final_hidden, d_logits, loss, aux_loss, load, diagnostics })
    }

    /// Forward and backward with the device parameters as they are; gradients land in `st.grads`.
    fn forward_backward(&self, st: &mut DeviceParams, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<Forward> {
        let fw = self.forward_pass(st, batch, rng)?;
        let g = &self.gpu;
        let cfg = self.host.config();
        let (n, vocab) = (cfg.sizes.width, cfg.vocab);
        let (b, seq) = (fw.batch, fw.seq);
        let tokens = b * seq;
        let DeviceParams { params: p, grads, .. } = st;
        for gr in grads.iter_mut() {
            g.fill_zeros(gr)?;
        }
        let m_un = self.mult.unembedding as f32;
        let un = self.unembedding_id();
        g.gemm(true, false, (vocab, n, tokens), m_un, &fw.d_logits.slice(..), vocab, &fw.final_hidden.slice(..), n, 0.0, &mut grads[un].slice_mut(..), n)?;
        let mut d_final = g.zeros::<f32>(tokens * n)?;
        g.gemm(false, false, (tokens, n, vocab), m_un, &fw.d_logits.slice(..), vocab, &p[un].slice(..), n, 0.0, &mut d_final.slice_mut(..), n)?;
        let mut dh = g.zeros::<f32>(tokens * n)?;
        self.norm_backward(&d_final, &p[self.final_norm], &fw.final_norm, &mut grads[self.final_norm], &mut dh, tokens)?;

        let beta = self.mult.residual;
        let moe = self.moe();
        for (ids, cache) in self.blocks.iter().zip(fw.blocks.iter()).rev() {
            let d_branch = self.scaled_copy(&dh, beta, tokens * n)?;
            let d_a = match (&ids.ffn, &cache.ffn) {
                (FfnIds::Moe(moe_ids), FfnCache::Moe(c)) => moe.backward(g, p, grads, moe_ids, c, &d_branch, tokens)?,
                (FfnIds::Dense { up, down }, FfnCache::Dense { input, u, hidden }) => {
                    self.dense_backward(p, grads, (*up, *down), (input, u, hidden), &d_branch, tokens)?
                }
                _ => return Err(Error::Internal("cuda: block cache does not match the block kind".into())),
            };
            self.norm_backward(&d_a, &p[ids.ffn_norm], &cache.ffn_norm, &mut grads[ids.ffn_norm], &mut dh, tokens)?;
            let d_branch = self.scaled_copy(&dh, beta, tokens * n)?;
            let d_a = self.attention_backward(p, grads, ids, &cache.attn, &d_branch, b, seq)?;
            self.norm_backward(&d_a, &p[ids.attn_norm], &cache.attn_norm, &mut grads[ids.attn_norm], &mut dh, tokens)?;
        }

        // Embedding rows: each id's tokens in token order; positions: each position's tokens likewise.
        let alpha = self.mult.embedding as f32;
        let n_i = n as i32;
        let (list, starts) = lists_by_key(tokens, vocab, |t| fw.inputs[t] as usize);
        let (list_d, starts_d) = (g.upload(&list)?, g.upload(&starts)?);
        let (groups, tied) = (vocab as i32, i32::from(self.unembedding.is_none()));
        cuda_launch!(g, "sum_rows_by_list", Gpu::per_item(vocab * n), &dh, &list_d, &starts_d, &mut grads[self.embedding], &groups, &n_i, &alpha, &tied)?;
        let (list, starts) = lists_by_key(tokens, seq, |t| t % seq);
        let (list_d, starts_d) = (g.upload(&list)?, g.upload(&starts)?);
        let (groups, zero) = (seq as i32, 0i32);
        cuda_launch!(g, "sum_rows_by_list", Gpu::per_item(seq * n), &dh, &list_d, &starts_d, &mut grads[self.position], &groups, &n_i, &alpha, &zero)?;
        Ok(fw)
    }

    /// Store positions of the balancing biases, when the config moves them (else none).
    fn balancing_bias_ids(&self) -> Vec<usize> {
        if self.host.config().routing.bias_update_rate == 0.0 {
            return Vec::new();
        }
        self.blocks.iter().filter_map(|ids| if let FfnIds::Moe(m) = ids.ffn { Some(m.bias) } else { None }).collect()
    }
}

impl Model<f32> for GpuTransformer {
    fn store(&self) -> &ParamStore<f32> {
        self.host.store()
    }

    fn store_mut(&mut self) -> &mut ParamStore<f32> {
        state::before_host_edit(&mut self.state, &self.gpu, self.host.store_mut());
        self.host.store_mut()
    }

    fn loss_and_grad(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<StepOutput<f32>> {
        let mut st = state::lock(&self.state)?;
        st.upload(&self.gpu, self.host.store())?;
        let fw = self.forward_backward(&mut st, batch, rng)?;
        let grads = st.grads_to_host(&self.gpu, self.host.store())?;
        Ok(StepOutput { loss: fw.loss, aux_loss: fw.aux_loss, grads, load: fw.load, diagnostics: fw.diagnostics })
    }

    fn forward(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<(f64, Array2<f64>)> {
        let mut st = state::lock(&self.state)?;
        st.upload(&self.gpu, self.host.store())?;
        let fw = self.forward_pass(&st, batch, rng)?;
        Ok((fw.loss, Array2::zeros((0, 0))))
    }

    fn after_step(&mut self, load: &[LoadStats]) {
        state::before_host_edit(&mut self.state, &self.gpu, self.host.store_mut());
        self.host.after_step(load);
    }

    fn resident(&mut self) -> Option<&mut dyn Resident> {
        Some(self)
    }
}

impl super::DeviceModel for GpuTransformer {
    fn grad_on_device(&self, batch: &Batch, rng: &mut ChaCha8Rng, measure: bool) -> crate::Result<ResidentGrad> {
        let mut st = state::lock(&self.state)?;
        st.upload(&self.gpu, self.host.store())?;
        let fw = self.forward_backward(&mut st, batch, rng)?;
        let (grad_sq, param_sq) = if measure { st.sums_of_squares(&self.gpu)? } else { Default::default() };
        Ok(ResidentGrad { loss: fw.loss, aux_loss: fw.aux_loss, load: fw.load, diagnostics: fw.diagnostics, grad_sq, param_sq })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_group_tokens_by_key_in_token_order() {
        let ids = [2usize, 0, 2, 1, 0, 2];
        let (list, starts) = lists_by_key(ids.len(), 4, |t| ids[t]);
        assert_eq!(starts, vec![0, 2, 3, 6, 6]);
        assert_eq!(list, vec![1, 4, 3, 0, 2, 5]);
    }
}
