//! The MoE-Transformer of SPEC §3: a pre-norm decoder for character-level language modelling.
//!
//! ```text
//! h0 = alpha_in * (E[token] + P[position])
//! per block l:  h += beta_L * attn(rmsnorm(h))      causal, logits * logit_multiplier / d_head
//!               h += beta_L * ffn(rmsnorm(h))       MoE FFN (or dense FFN in non-MoE blocks)
//! logits = (alpha_out / mN) * rmsnorm(h) U^T        U = E when embeddings are tied
//! loss = mean over tokens of the next-token cross-entropy (+ weighted auxiliary routing losses)
//! ```
//!
//! Every init std and forward multiplier comes from a [`Resolved`] parameterization (groups `embedding`,
//! `attn_qkv`, `attn_out`, `router`, `expert_up`, `expert_down`, `expert_bias`, `norm`, `unembedding`);
//! `beta_L` is its `residual_multiplier` and scales both branches. Norm gains start at 1 (the `norm`
//! group's init std is ignored: a gain is a multiplier, not a random matrix). Learned position embeddings
//! belong to group `embedding`.
//!
//! Blocks whose index satisfies `l % moe_every == moe_every - 1` carry the MoE layer of
//! [`crate::model::moe`]; the others (all of them when `moe_every = 0`) carry a dense FFN: a single
//! always-active expert of hidden size `expert_hidden` with groups `expert_up` / `expert_down`. A dense
//! transformer of equal active parameters is therefore `moe_every = 0`, `experts = active = 1`,
//! `expert_hidden = k n`.

use ndarray::{s, Array2, ArrayD, ArrayView1, ArrayView2, Axis, Ix1, Ix2, Zip};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::attention::{
    attention_backward, attention_forward, par_matmul, par_matmul_scaled, AttentionCache, AttentionConfig,
    AttentionWeights,
};
use super::moe::{moe_backward, moe_forward, normal_init, MoeCache, MoeMultipliers, MoeParamIds, MoeShape};
use super::norm::{rms_norm_backward, rms_norm_forward, NormCache};
use super::{Activation, Batch, Grads, Model, Param, ParamStore, Real, StepOutput};
use crate::param::{Group, Resolved, Sizes};
use crate::routing::{update_bias, LoadStats, RoutingConfig};
use crate::Error;

/// Architecture of the MoE-Transformer (everything except the per-group hyperparameters).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerConfig {
    /// Number of token ids (characters).
    pub vocab: usize,
    /// Longest context; batches may be shorter.
    pub seq_len: usize,
    /// Width N, depth L (blocks), experts M, active k, expert hidden n.
    pub sizes: Sizes,
    /// Attention heads; d_head = N / n_head.
    pub n_head: usize,
    /// 1 = MoE FFN in every block, 2 = every other block (the second, fourth, ...), 0 = none (dense).
    #[serde(default = "default_moe_every")]
    pub moe_every: usize,
    /// Use the embedding matrix as the unembedding too.
    #[serde(default)]
    pub tied_embeddings: bool,
    /// Expert (and dense FFN) nonlinearity.
    #[serde(default = "default_activation")]
    pub activation: Activation,
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Added to the mean square inside every RMS norm.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Base factor of the attention logits, which are `attn_logit_multiplier * q . k / d_head`.
    #[serde(default = "default_logit_multiplier")]
    pub attn_logit_multiplier: f64,
}

fn default_moe_every() -> usize {
    1
}
fn default_activation() -> Activation {
    Activation::Gelu
}
fn default_norm_eps() -> f64 {
    1e-6
}
fn default_logit_multiplier() -> f64 {
    1.0
}

impl Default for TransformerConfig {
    /// A small character-level model: N = 64, L = 2, M = 8, k = 2, n = 64, 4 heads, context 64.
    fn default() -> Self {
        TransformerConfig {
            vocab: 65,
            seq_len: 64,
            sizes: Sizes {
                width: 64,
                depth: 2,
                experts: 8,
                active: 2,
                expert_hidden: 64,
            },
            n_head: 4,
            moe_every: default_moe_every(),
            tied_embeddings: false,
            activation: default_activation(),
            routing: RoutingConfig::default(),
            norm_eps: default_norm_eps(),
            attn_logit_multiplier: default_logit_multiplier(),
        }
    }
}

impl TransformerConfig {
    /// Checks every field; errors name the field (`model.*`, `routing.*`) and the rule.
    pub fn validate(&self) -> crate::Result<()> {
        let s = &self.sizes;
        if self.vocab < 2 {
            return Err(Error::invalid("model.vocab", "must be at least 2"));
        }
        if self.seq_len == 0 {
            return Err(Error::invalid("model.seq_len", "must be at least 1"));
        }
        for (field, v) in [
            ("model.sizes.width", s.width),
            ("model.sizes.depth", s.depth),
            ("model.sizes.experts", s.experts),
            ("model.sizes.active", s.active),
            ("model.sizes.expert_hidden", s.expert_hidden),
        ] {
            if v == 0 {
                return Err(Error::invalid(field, "must be at least 1"));
            }
        }
        if s.active > s.experts {
            return Err(Error::invalid(
                "model.sizes.active",
                format!("must not exceed experts ({}), got {}", s.experts, s.active),
            ));
        }
        if self.n_head == 0 || s.width % self.n_head != 0 {
            return Err(Error::invalid(
                "model.n_head",
                format!(
                    "must be positive and divide the width ({}), got {}",
                    s.width, self.n_head
                ),
            ));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::invalid("model.norm_eps", "must be finite and positive"));
        }
        if !(self.attn_logit_multiplier.is_finite() && self.attn_logit_multiplier > 0.0) {
            return Err(Error::invalid(
                "model.attn_logit_multiplier",
                "must be finite and positive",
            ));
        }
        self.routing.validate(s.experts, s.active)
    }

    /// Shapes of an MoE block's tensors.
    pub fn moe_shape(&self) -> MoeShape {
        let s = &self.sizes;
        MoeShape {
            width: s.width,
            experts: s.experts,
            expert_hidden: s.expert_hidden,
            shared_experts: self.routing.shared_experts,
        }
    }

    /// (name, group, shape) of every tensor in store order; the names are the safetensors names.
    /// Tied embeddings have no `unembedding` tensor.
    pub fn layout(&self) -> Vec<(String, Group, Vec<usize>)> {
        let (n, h) = (self.sizes.width, self.sizes.expert_hidden);
        let mut v = vec![
            ("embedding".to_string(), Group::Embedding, vec![self.vocab, n]),
            (
                "position_embedding".to_string(),
                Group::Embedding,
                vec![self.seq_len, n],
            ),
        ];
        for l in 0..self.sizes.depth {
            let prefix = format!("blocks.{l}");
            v.push((format!("{prefix}.attn_norm"), Group::Norm, vec![n]));
            v.push((format!("{prefix}.attn.qkv"), Group::AttnQkv, vec![3 * n, n]));
            v.push((format!("{prefix}.attn.out"), Group::AttnOut, vec![n, n]));
            v.push((format!("{prefix}.ffn_norm"), Group::Norm, vec![n]));
            if self.is_moe_block(l) {
                v.extend(self.moe_shape().layout(&format!("{prefix}.moe")));
            } else {
                v.push((format!("{prefix}.ffn.expert_up"), Group::ExpertUp, vec![h, n]));
                v.push((format!("{prefix}.ffn.expert_down"), Group::ExpertDown, vec![n, h]));
            }
        }
        v.push(("final_norm".to_string(), Group::Norm, vec![n]));
        if !self.tied_embeddings {
            v.push(("unembedding".to_string(), Group::Unembedding, vec![self.vocab, n]));
        }
        v
    }

    /// Whether block `l` carries the MoE FFN.
    pub fn is_moe_block(&self, l: usize) -> bool {
        self.moe_every > 0 && l % self.moe_every == self.moe_every - 1
    }
}

/// Where one block's tensors sit in the store (positions in [`ParamStore::params`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockIds {
    pub attn_norm: usize,
    pub qkv: usize,
    pub out: usize,
    pub ffn_norm: usize,
    pub ffn: FfnIds,
}

/// A block's feed-forward tensors: the MoE layer's, or the dense FFN's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnIds {
    Moe(MoeParamIds),
    Dense { up: usize, down: usize },
}

/// Forward multipliers, read once from the parameterization.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransformerMultipliers {
    /// `alpha_in` (group `embedding`, token and position embeddings).
    pub embedding: f64,
    pub qkv: f64,
    pub out: f64,
    pub moe: MoeMultipliers,
    /// `alpha_out` (group `unembedding`).
    pub unembedding: f64,
    /// `beta_L`, the multiplier of both residual branches.
    pub residual: f64,
}

/// The MoE-Transformer: configuration, multipliers and parameters.
#[derive(Debug, Clone)]
pub struct MoeTransformer<F> {
    cfg: TransformerConfig,
    mult: TransformerMultipliers,
    store: ParamStore<F>,
    embedding: usize,
    position: usize,
    blocks: Vec<BlockIds>,
    final_norm: usize,
    /// `None` when tied to the embedding.
    unembedding: Option<usize>,
}

/// Intermediate results of one block kept for the backward pass.
struct BlockCache<F> {
    attn_norm: NormCache<F>,
    attn: AttentionCache<F>,
    ffn_norm: NormCache<F>,
    ffn: FfnCache<F>,
}

enum FfnCache<F> {
    Moe(Box<MoeCache<F>>),
    /// FFN input, `phi(u)` and `phi'(u)` (the slope is kept so the backward needs no second tanh).
    Dense {
        input: Array2<F>,
        hidden: Array2<F>,
        slope: Array2<F>,
    },
}

/// Everything the forward pass produces.
struct ForwardPass<F> {
    batch: usize,
    seq: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    blocks: Vec<BlockCache<F>>,
    final_norm: NormCache<F>,
    final_hidden: Array2<F>,
    logits: Array2<F>,
    loss: f64,
    aux_loss: f64,
    load: Vec<LoadStats>,
    diagnostics: Vec<(String, f64)>,
}

fn rms<F: Real>(a: ArrayView2<F>) -> f64 {
    let n = a.len().max(1) as f64;
    (a.iter().map(|v| v.to_f64().unwrap_or(f64::NAN).powi(2)).sum::<f64>() / n).sqrt()
}


fn view1<F: Real>(p: &ArrayD<F>) -> ArrayView1<'_, F> {
    p.view()
        .into_dimensionality::<Ix1>()
        .expect("store layout fixed at construction")
}

fn view2<F: Real>(p: &ArrayD<F>) -> ArrayView2<'_, F> {
    p.view()
        .into_dimensionality::<Ix2>()
        .expect("store layout fixed at construction")
}

fn scaled<F: Real>(mut a: Array2<F>, factor: f64) -> Array2<F> {
    let f = F::of(factor);
    a.par_mapv_inplace(|v| v * f);
    a
}

impl<F: Real> MoeTransformer<F> {
    /// Builds the model with weights initialised from `hp` using `rng`: every matrix N(0, init_std^2) of
    /// its group, norm gains 1, balancing biases 0, in [`TransformerConfig::layout`] order.
    pub fn new(cfg: &TransformerConfig, hp: &Resolved, rng: &mut ChaCha8Rng) -> crate::Result<Self> {
        Self::check(cfg, hp)?;
        let params = cfg
            .layout()
            .into_iter()
            .map(|(name, group, dims)| {
                let value = match group {
                    Group::Norm => ArrayD::from_elem(dims, F::one()),
                    Group::ExpertBias => ArrayD::zeros(dims),
                    _ => normal_init(&dims, hp.get(group).init_std, rng),
                };
                Param { name, group, value }
            })
            .collect();
        Self::assemble(cfg, hp, ParamStore { params })
    }

    /// A model with the given weights (e.g. from [`super::io::load_safetensors`]). Every tensor of the
    /// layout must be present with its shape and group; extra tensors are an error; order is free.
    pub fn from_store(cfg: &TransformerConfig, hp: &Resolved, store: ParamStore<F>) -> crate::Result<Self> {
        Self::check(cfg, hp)?;
        let mut params: Vec<Option<Param<F>>> = store.params.into_iter().map(Some).collect();
        let mut ordered = Vec::new();
        for (name, group, dims) in cfg.layout() {
            let p = params
                .iter_mut()
                .find(|p| p.as_ref().is_some_and(|p| p.name == name))
                .and_then(Option::take)
                .ok_or_else(|| Error::invalid(format!("weights.{name}"), "missing"))?;
            if p.value.shape() != dims.as_slice() {
                return Err(Error::invalid(
                    format!("weights.{name}"),
                    format!("has shape {:?}, the config needs {dims:?}", p.value.shape()),
                ));
            }
            if p.group != group {
                return Err(Error::invalid(
                    format!("weights.{name}"),
                    format!("is in group `{}`, expected `{}`", p.group.name(), group.name()),
                ));
            }
            ordered.push(p);
        }
        if let Some(extra) = params.into_iter().flatten().next() {
            return Err(Error::invalid(
                format!("weights.{}", extra.name),
                "is not a tensor of this model",
            ));
        }
        Self::assemble(cfg, hp, ParamStore { params: ordered })
    }

    /// The same model with every tensor converted to another float type (f32 <-> f64, for checks).
    pub fn cast<G: Real>(&self) -> MoeTransformer<G> {
        let params = self
            .store
            .params
            .iter()
            .map(|p| Param {
                name: p.name.clone(),
                group: p.group,
                value: p.value.mapv(|v| G::of(v.to_f64().unwrap_or(f64::NAN))),
            })
            .collect();
        MoeTransformer {
            cfg: self.cfg.clone(),
            mult: self.mult,
            store: ParamStore { params },
            embedding: self.embedding,
            position: self.position,
            blocks: self.blocks.clone(),
            final_norm: self.final_norm,
            unembedding: self.unembedding,
        }
    }

    fn check(cfg: &TransformerConfig, hp: &Resolved) -> crate::Result<()> {
        cfg.validate()?;
        if hp.sizes != cfg.sizes {
            return Err(Error::invalid(
                "param.sizes",
                format!(
                    "the parameterization was resolved at {:?}, the model has {:?}",
                    hp.sizes, cfg.sizes
                ),
            ));
        }
        Ok(())
    }

    /// Finds the tensor positions of a store in layout order and reads the multipliers from `hp`.
    fn assemble(cfg: &TransformerConfig, hp: &Resolved, store: ParamStore<F>) -> crate::Result<Self> {
        let find = |name: &str| {
            store
                .index_of(name)
                .ok_or_else(|| Error::Internal(format!("tensor `{name}` missing")))
        };
        let mut blocks = Vec::with_capacity(cfg.sizes.depth);
        for l in 0..cfg.sizes.depth {
            let prefix = format!("blocks.{l}");
            let ffn = if cfg.is_moe_block(l) {
                FfnIds::Moe(MoeParamIds::find(&store, &format!("{prefix}.moe"), &cfg.moe_shape())?)
            } else {
                FfnIds::Dense {
                    up: find(&format!("{prefix}.ffn.expert_up"))?,
                    down: find(&format!("{prefix}.ffn.expert_down"))?,
                }
            };
            blocks.push(BlockIds {
                attn_norm: find(&format!("{prefix}.attn_norm"))?,
                qkv: find(&format!("{prefix}.attn.qkv"))?,
                out: find(&format!("{prefix}.attn.out"))?,
                ffn_norm: find(&format!("{prefix}.ffn_norm"))?,
                ffn,
            });
        }
        let mult = TransformerMultipliers {
            embedding: hp.get(Group::Embedding).multiplier,
            qkv: hp.get(Group::AttnQkv).multiplier,
            out: hp.get(Group::AttnOut).multiplier,
            moe: MoeMultipliers::from_resolved(hp),
            unembedding: hp.get(Group::Unembedding).multiplier,
            residual: hp.residual_multiplier,
        };
        Ok(MoeTransformer {
            cfg: cfg.clone(),
            mult,
            embedding: find("embedding")?,
            position: find("position_embedding")?,
            blocks,
            final_norm: find("final_norm")?,
            unembedding: if cfg.tied_embeddings {
                None
            } else {
                Some(find("unembedding")?)
            },
            store,
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn multipliers(&self) -> &TransformerMultipliers {
        &self.mult
    }

    /// Store positions of every block's tensors, in block order.
    pub fn block_ids(&self) -> &[BlockIds] {
        &self.blocks
    }

    /// Store positions of the token embedding, the position embedding, the final norm's gain, and the
    /// unembedding (`None` when tied to the token embedding).
    pub fn io_ids(&self) -> (usize, usize, usize, Option<usize>) {
        (self.embedding, self.position, self.final_norm, self.unembedding)
    }

    /// Parameters that take part in one token's forward pass (routed experts counted k times out of M,
    /// position embeddings and the balancing bias not counted, tied embeddings counted once).
    pub fn active_parameters(&self) -> usize {
        let s = &self.cfg.sizes;
        self.store
            .params
            .iter()
            .map(|p| match p.group {
                Group::ExpertBias => 0,
                _ if p.name == "position_embedding" => 0,
                Group::ExpertUp | Group::ExpertDown if p.name.contains(".moe.expert_") => {
                    p.value.len() / s.experts * s.active
                }
                _ => p.value.len(),
            })
            .sum()
    }

    fn attention_cfg(&self) -> AttentionConfig {
        AttentionConfig {
            n_head: self.cfg.n_head,
            logit_multiplier: self.cfg.attn_logit_multiplier,
        }
    }

    fn attention_weights(&self, b: &BlockIds) -> AttentionWeights<'_, F> {
        AttentionWeights {
            qkv: view2(&self.store.params[b.qkv].value),
            out: view2(&self.store.params[b.out].value),
            qkv_multiplier: self.mult.qkv,
            out_multiplier: self.mult.out,
        }
    }

    fn unembedding_matrix(&self) -> ArrayView2<'_, F> {
        view2(&self.store.params[self.unembedding.unwrap_or(self.embedding)].value)
    }

    /// Splits a token batch into inputs and targets after checking ids and length.
    pub fn tokens(&self, batch: &Batch) -> crate::Result<(usize, usize, Vec<u32>, Vec<u32>)> {
        let Batch::Tokens { ids } = batch else {
            return Err(Error::invalid("batch", "the MoE-Transformer takes token batches"));
        };
        let (b, cols) = ids.dim();
        if b == 0 || cols < 2 {
            return Err(Error::invalid(
                "batch.ids",
                "needs at least one sequence of at least 2 tokens",
            ));
        }
        let seq = cols - 1;
        if seq > self.cfg.seq_len {
            return Err(Error::invalid(
                "batch.ids",
                format!("sequences of {seq} inputs exceed model.seq_len = {}", self.cfg.seq_len),
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.cfg.vocab) {
            return Err(Error::invalid(
                "batch.ids",
                format!("token id {bad} is outside the vocabulary of {}", self.cfg.vocab),
            ));
        }
        let inputs = ids.slice(s![.., ..seq]).iter().copied().collect();
        let targets = ids.slice(s![.., 1..]).iter().copied().collect();
        Ok((b, seq, inputs, targets))
    }

    fn forward_pass(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<ForwardPass<F>> {
        let (b, seq, inputs, targets) = self.tokens(batch)?;
        let width = self.cfg.sizes.width;
        let tokens = b * seq;
        let emb = view2(&self.store.params[self.embedding].value);
        let pos = view2(&self.store.params[self.position].value);
        let alpha_in = F::of(self.mult.embedding);
        let mut h = Array2::<F>::zeros((tokens, width));
        for (t, mut row) in h.rows_mut().into_iter().enumerate() {
            Zip::from(&mut row)
                .and(emb.row(inputs[t] as usize))
                .and(pos.row(t % seq))
                .for_each(|r, &e, &p| *r = alpha_in * (e + p));
        }

        let beta = self.mult.residual;
        let attn_cfg = self.attention_cfg();
        let mut diagnostics = Vec::new();
        let mut caches = Vec::with_capacity(self.blocks.len());
        let (mut aux_loss, mut load) = (0.0, Vec::new());
        for (l, ids) in self.blocks.iter().enumerate() {
            let p = &self.store.params;
            let (a, attn_norm) = rms_norm_forward(h.view(), view1(&p[ids.attn_norm].value), self.cfg.norm_eps);
            let a3 = a.into_shape_with_order((b, seq, width)).expect("standard layout");
            let (attn_out, attn) = attention_forward(&self.attention_weights(ids), &attn_cfg, a3.view());
            let attn_out = attn_out
                .into_shape_with_order((tokens, width))
                .expect("standard layout");
            diagnostics.push((format!("block{l}.attn_out_rms"), rms(attn_out.view())));
            h.scaled_add(F::of(beta), &attn_out);

            let (a, ffn_norm) = rms_norm_forward(h.view(), view1(&p[ids.ffn_norm].value), self.cfg.norm_eps);
            let (ffn_out, ffn) = match &ids.ffn {
                FfnIds::Moe(moe_ids) => {
                    let w = moe_ids.weights(&self.store)?;
                    let s = &self.cfg.sizes;
                    let o = moe_forward(
                        &w,
                        &self.mult.moe,
                        self.cfg.activation,
                        &self.cfg.routing,
                        s.active,
                        a.view(),
                        rng,
                    )?;
                    diagnostics.push((format!("block{l}.router_logits_rms"), o.diagnostics.router_logits_rms));
                    diagnostics.push((format!("block{l}.expert_preact_rms"), o.diagnostics.expert_preact_rms));
                    aux_loss += o.aux_loss;
                    load.push(o.load);
                    (o.out, FfnCache::Moe(Box::new(o.cache)))
                }
                FfnIds::Dense { up, down } => {
                    let (out, hidden, slope, pre_rms) = self.dense_forward(a.view(), *up, *down);
                    diagnostics.push((format!("block{l}.expert_preact_rms"), pre_rms));
                    (
                        out,
                        FfnCache::Dense {
                            input: a,
                            hidden,
                            slope,
                        },
                    )
                }
            };
            diagnostics.push((format!("block{l}.ffn_out_rms"), rms(ffn_out.view())));
            h.scaled_add(F::of(beta), &ffn_out);
            diagnostics.push((format!("block{l}.resid_rms"), rms(h.view())));
            caches.push(BlockCache {
                attn_norm,
                attn,
                ffn_norm,
                ffn,
            });
        }

        let (final_hidden, final_norm) = rms_norm_forward(
            h.view(),
            view1(&self.store.params[self.final_norm].value),
            self.cfg.norm_eps,
        );
        let logits = par_matmul_scaled(
            self.mult.unembedding,
            final_hidden.view(),
            self.unembedding_matrix().t(),
        );
        diagnostics.push(("logits_rms".into(), rms(logits.view())));

        // Cross-entropy in f64 so the loss value does not depend on the training precision.
        let loss = logits
            .rows()
            .into_iter()
            .zip(targets.iter())
            .map(|(row, &y)| {
                let max = row
                    .iter()
                    .fold(f64::NEG_INFINITY, |m, v| m.max(v.to_f64().unwrap_or(f64::NAN)));
                let lse = max
                    + row
                        .iter()
                        .map(|v| (v.to_f64().unwrap_or(f64::NAN) - max).exp())
                        .sum::<f64>()
                        .ln();
                lse - row[y as usize].to_f64().unwrap_or(f64::NAN)
            })
            .sum::<f64>()
            / tokens as f64;
        Ok(ForwardPass {
            batch: b,
            seq,
            inputs,
            targets,
            blocks: caches,
            final_norm,
            final_hidden,
            logits,
            loss,
            aux_loss,
            load,
            diagnostics,
        })
    }

    /// Dense FFN `m_down * phi(m_up * a U^T) V^T`; returns (output, phi(u), phi'(u), RMS of u).
    fn dense_forward(&self, a: ArrayView2<F>, up: usize, down: usize) -> (Array2<F>, Array2<F>, Array2<F>, f64) {
        let act = self.cfg.activation;
        let mut hidden = par_matmul(a, view2(&self.store.params[up].value).t());
        let mut slope = Array2::<F>::zeros(hidden.raw_dim());
        let m_up = F::of(self.mult.moe.up);
        // Sums of u^2 per row, added in row order afterwards: deterministic for any thread count.
        let row_sq: Vec<f64> = hidden
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(slope.axis_iter_mut(Axis(0)))
            .map(|(mut h_row, mut s_row)| {
                let mut sq = 0.0;
                Zip::from(&mut h_row).and(&mut s_row).for_each(|h, d| {
                    let u = *h * m_up;
                    let x = u.to_f64().unwrap_or(f64::NAN);
                    sq += x * x;
                    (*h, *d) = act.value_and_slope(u);
                });
                sq
            })
            .collect();
        let pre_rms = (row_sq.iter().sum::<f64>() / hidden.len().max(1) as f64).sqrt();
        let down_w = view2(&self.store.params[down].value);
        let out = par_matmul_scaled(self.mult.moe.down, hidden.view(), down_w.t());
        (out, hidden, slope, pre_rms)
    }

    /// Backward of [`Self::dense_forward`]: returns dL/da and adds the weight gradients to `grads`.
    #[allow(clippy::too_many_arguments)]
    fn dense_backward(
        &self,
        grad_out: ArrayView2<F>,
        input: &Array2<F>,
        hidden: &Array2<F>,
        slope: &Array2<F>,
        up: usize,
        down: usize,
        grads: &mut Grads<F>,
    ) -> Array2<F> {
        let (m_up, m_down) = (self.mult.moe.up, self.mult.moe.down);
        let d_down = par_matmul_scaled(m_down, grad_out.t(), hidden.view());
        let mut d_pre = par_matmul(grad_out, view2(&self.store.params[down].value));
        let m_down_f = F::of(m_down);
        Zip::from(&mut d_pre)
            .and(slope)
            .par_for_each(|d, &s| *d = *d * m_down_f * s);
        let d_up = par_matmul_scaled(m_up, d_pre.t(), input.view());
        grads[up].scaled_add(F::one(), &d_up.into_dyn());
        grads[down].scaled_add(F::one(), &d_down.into_dyn());
        par_matmul_scaled(m_up, d_pre.view(), view2(&self.store.params[up].value))
    }

    fn backward(&self, fp: &ForwardPass<F>) -> crate::Result<Grads<F>> {
        let (b, seq) = (fp.batch, fp.seq);
        let tokens = b * seq;
        let width = self.cfg.sizes.width;
        let mut grads = self.store.zeros_like();
        let p = &self.store.params;

        // d(mean CE)/d logits = (softmax - onehot) / tokens.
        let inv_tokens = 1.0 / tokens as f64;
        let mut d_logits = fp.logits.clone();
        d_logits
            .axis_iter_mut(Axis(0))
            .into_par_iter()
            .zip(fp.targets.par_iter())
            .for_each(|(mut row, &y)| {
                let max = row.iter().fold(F::neg_infinity(), |m, &v| m.max(v));
                row.mapv_inplace(|v| (v - max).exp());
                let total = row.sum();
                row.mapv_inplace(|v| v / total * F::of(inv_tokens));
                row[y as usize] = row[y as usize] - F::of(inv_tokens);
            });
        let m_out = self.mult.unembedding;
        let d_unemb = par_matmul_scaled(m_out, d_logits.t(), fp.final_hidden.view());
        grads[self.unembedding.unwrap_or(self.embedding)].scaled_add(F::one(), &d_unemb.into_dyn());
        let d_final = par_matmul_scaled(m_out, d_logits.view(), self.unembedding_matrix());
        let (mut dh, d_gain) = rms_norm_backward(&fp.final_norm, view1(&p[self.final_norm].value), d_final.view());
        grads[self.final_norm].scaled_add(F::one(), &d_gain.into_dyn());

        let beta = self.mult.residual;
        let attn_cfg = self.attention_cfg();
        for (ids, cache) in self.blocks.iter().zip(fp.blocks.iter()).rev() {
            let d_branch = scaled(dh.clone(), beta);
            let d_a = match (&ids.ffn, &cache.ffn) {
                (FfnIds::Moe(moe_ids), FfnCache::Moe(moe_cache)) => {
                    let w = moe_ids.weights(&self.store)?;
                    let (d_a, g) = moe_backward(
                        &w,
                        &self.mult.moe,
                        self.cfg.activation,
                        &self.cfg.routing,
                        moe_cache,
                        d_branch.view(),
                    );
                    moe_ids.add_grads(g, &mut grads);
                    d_a
                }
                (FfnIds::Dense { up, down }, FfnCache::Dense { input, hidden, slope }) => {
                    self.dense_backward(d_branch.view(), input, hidden, slope, *up, *down, &mut grads)
                }
                _ => return Err(Error::Internal("block cache does not match the block kind".into())),
            };
            let (d_h, d_gain) = rms_norm_backward(&cache.ffn_norm, view1(&p[ids.ffn_norm].value), d_a.view());
            grads[ids.ffn_norm].scaled_add(F::one(), &d_gain.into_dyn());
            dh.scaled_add(F::one(), &d_h);

            let d_branch = scaled(dh.clone(), beta)
                .into_shape_with_order((b, seq, width))
                .expect("standard layout");
            let (d_a, g) = attention_backward(&self.attention_weights(ids), &attn_cfg, &cache.attn, d_branch.view());
            grads[ids.qkv].scaled_add(F::one(), &g.qkv.into_dyn());
            grads[ids.out].scaled_add(F::one(), &g.out.into_dyn());
            let d_a = d_a.into_shape_with_order((tokens, width)).expect("standard layout");
            let (d_h, d_gain) = rms_norm_backward(&cache.attn_norm, view1(&p[ids.attn_norm].value), d_a.view());
            grads[ids.attn_norm].scaled_add(F::one(), &d_gain.into_dyn());
            dh.scaled_add(F::one(), &d_h);
        }

        // Scatter into the embedding rows in token order (fixed order: deterministic sums).
        let alpha_in = F::of(self.mult.embedding);
        let mut d_emb = Array2::<F>::zeros((self.cfg.vocab, width));
        let mut d_pos = Array2::<F>::zeros((self.cfg.seq_len, width));
        for (t, row) in dh.rows().into_iter().enumerate() {
            d_emb.row_mut(fp.inputs[t] as usize).scaled_add(alpha_in, &row);
            d_pos.row_mut(t % seq).scaled_add(alpha_in, &row);
        }
        grads[self.embedding].scaled_add(F::one(), &d_emb.into_dyn());
        grads[self.position].scaled_add(F::one(), &d_pos.into_dyn());
        Ok(grads)
    }
}

impl<F: Real> Model<F> for MoeTransformer<F> {
    fn store(&self) -> &ParamStore<F> {
        &self.store
    }

    fn store_mut(&mut self) -> &mut ParamStore<F> {
        &mut self.store
    }

    fn loss_and_grad(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<StepOutput<F>> {
        let fp = self.forward_pass(batch, rng)?;
        let grads = self.backward(&fp)?;
        Ok(StepOutput {
            loss: fp.loss,
            aux_loss: fp.aux_loss,
            grads,
            load: fp.load,
            diagnostics: fp.diagnostics,
        })
    }

    fn forward(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<(f64, Array2<f64>)> {
        let fp = self.forward_pass(batch, rng)?;
        Ok((fp.loss, Array2::zeros((0, 0))))
    }

    fn after_step(&mut self, load: &[LoadStats]) {
        let rate = self.cfg.routing.bias_update_rate;
        let moe_blocks = self.blocks.iter().filter_map(|b| match &b.ffn {
            FfnIds::Moe(ids) => Some(ids.bias),
            FfnIds::Dense { .. } => None,
        });
        for (bias, stats) in moe_blocks.zip(load.iter()) {
            let mut v = self.store.params[bias].value.view_mut();
            if let Ok(v1) = v.view_mut().into_dimensionality::<Ix1>() {
                update_bias(v1, stats, rate);
            }
        }
    }
}

/// A batch of `batch` sequences of `seq + 1` uniformly random ids below `vocab` (tests, benchmarks).
pub fn random_tokens(batch: usize, seq: usize, vocab: usize, rng: &mut ChaCha8Rng) -> Batch {
    use rand::Rng;
    let ids = Array2::from_shape_simple_fn((batch, seq + 1), || rng.gen_range(0..vocab as u32));
    Batch::Tokens { ids }
}
