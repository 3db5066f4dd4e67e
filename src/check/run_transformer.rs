//! Coordinate checks on the finite MoE-Transformer (SPEC §3), the counterpart of [`super::run`] for the
//! ResNet: build the transformer at each size from the preset's resolved parameterization, record its
//! intermediate activations at initialization, train a few full-batch steps on one fixed token batch with
//! the project's optimizers, record them again, and hand the per-seed numbers to
//! [`super::coord::analyze`].
//!
//! **Data.** No corpus is needed: the batch is `batch` windows of `seq_len + 1` tokens cut at seeded
//! random offsets from a seeded random Markov chain ([`Corpus::markov`]: every token has `branching`
//! successors with random probabilities), so the next token is learnable and the loss falls during the
//! steps. The batch depends on `data_seed` only; the model seed varies per seed of the check, as in the
//! ResNet check (one task, several networks).
//!
//! **Probe.** [`probe_transformer`] replays the forward pass through the model's public pieces (the
//! store, [`rms_norm_forward`], [`attention_forward`], [`moe_forward`]) with the multipliers of the same
//! [`Resolved`], and additionally computes the pre-softmax attention logits
//! `attn_logit_multiplier * q . k / d_head` on every causal (query, key) pair and every expert's
//! preactivation on every token. Tests check it against the model: the cross-entropy of the probed logits
//! equals the model's loss, and the softmax of the probed attention logits applied to the values gives
//! the attention layer's own context.
//!
//! **Predictions.** `delta.*` and `grad.*` come from the shared [`analyze`] (Θ(1) changes on the axes the
//! preset scales; the engine's `grad_rms` exponents). The activations at initialization (`act.*`) are
//! power-counted here, because the transformer is pre-norm (every branch, the router and the unembedding
//! read an RMS-normalized stream, so nothing compounds along depth) and has attention; see
//! [`transformer_prediction`].

use std::path::{Path, PathBuf};

use ndarray::{s, Array2, ArrayView1, ArrayView2, Axis as NdAxis, Ix1, Ix2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::coord::{analyze, judge, CoordResult, CoordSpec, Prediction, QuantityResult, RouterInit, Verdict};
use super::run::{rms, rms_diff, Activations};
use crate::data::text::{random_windows, Corpus};
use crate::model::attention::{attention_forward, par_matmul_scaled, AttentionConfig, AttentionWeights};
use crate::model::moe::{moe_forward, MoeMultipliers, MoeParamIds};
use crate::model::norm::rms_norm_forward;
use crate::model::transformer::{MoeTransformer, TransformerConfig};
use crate::model::{Activation, Batch, Model, Real};
use crate::param::{Axis, Form, Group, Optimizer, ParamConfig, Resolved, Sizes, Table};
use crate::routing::RoutingConfig;
use crate::train::optim::{AdamW, Sgd};
use crate::{Error, Result};

/// Everything a transformer coordinate check needs besides the spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransformerCoordSetup {
    pub spec: CoordSpec,
    /// Token ids of the Markov task and of the model (2..=94).
    pub vocab: usize,
    /// Successors per token in the Markov chain.
    pub branching: usize,
    /// Input tokens per sequence (the model's context).
    pub seq_len: usize,
    /// Sequences in the fixed batch.
    pub batch: usize,
    /// Seed of the Markov chain and of the window offsets.
    pub data_seed: u64,
    /// Attention heads, fixed along every axis: d_head = N / n_head grows with the width, which is what
    /// puts the 1/d_head logit scale to the test.
    pub n_head: usize,
    /// Expert nonlinearity (the transformer's default is GELU).
    pub activation: Activation,
    /// Router init constant (readout-like std = sigma_router / N); only used with `router_init = preset`.
    pub sigma_router: f64,
    /// Adam (beta1, beta2).
    pub adam_betas: (f64, f64),
}

impl TransformerCoordSetup {
    /// Defaults for a spec: vocabulary 32 with 3 successors per token, 8 sequences of 16 tokens, 4 heads,
    /// GELU experts, sigma_router = 1 (router logits visible at initialization, as in the ResNet check).
    pub fn new(spec: CoordSpec) -> Self {
        TransformerCoordSetup {
            spec,
            vocab: 32,
            branching: 3,
            seq_len: 16,
            batch: 8,
            data_seed: 1,
            n_head: 4,
            activation: Activation::Gelu,
            sigma_router: 1.0,
            adam_betas: (0.9, 0.999),
        }
    }

    /// Checks every field; errors name the field (`coord.*`).
    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        if !(2..=94).contains(&self.vocab) {
            return Err(Error::invalid("coord.vocab", format!("must lie in 2..=94, got {}", self.vocab)));
        }
        if self.branching == 0 || self.branching > self.vocab {
            return Err(Error::invalid("coord.branching", format!("must lie in 1..=vocab ({}), got {}", self.vocab, self.branching)));
        }
        if self.seq_len == 0 {
            return Err(Error::invalid("coord.seq_len", "must be at least 1"));
        }
        if self.batch == 0 {
            return Err(Error::invalid("coord.batch", "must be at least 1"));
        }
        if !(self.sigma_router.is_finite() && self.sigma_router >= 0.0) {
            return Err(Error::invalid("coord.sigma_router", "must be finite and non-negative"));
        }
        let (b1, b2) = self.adam_betas;
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(Error::invalid("coord.adam_betas", "both must lie in [0, 1)"));
        }
        for v in &self.spec.values {
            let sizes = self.spec.base.along(self.spec.axis, *v, "coord.sizes")?;
            if self.n_head == 0 || sizes.width % self.n_head != 0 {
                return Err(Error::invalid(
                    "coord.n_head",
                    format!("must be positive and divide every width; width {} is not a multiple of {}", sizes.width, self.n_head),
                ));
            }
        }
        Ok(())
    }

    fn param_config(&self) -> ParamConfig {
        ParamConfig {
            preset: self.spec.preset.clone(),
            optimizer: self.spec.optimizer,
            form: Form::Standard,
            lr: self.spec.lr,
            base: Some(self.spec.base),
            sigma_router: self.sigma_router,
            ..ParamConfig::default()
        }
    }

    /// The parameterization at `sizes` with the spec's router initialization applied.
    pub fn resolve(&self, sizes: &Sizes) -> Result<Resolved> {
        let mut hp = self.param_config().resolve(sizes)?;
        self.spec.router_init.apply(&mut hp);
        Ok(hp)
    }

    /// The engine's table at the base sizes (for the predicted exponents).
    pub fn table(&self) -> Result<Table> {
        self.param_config().resolve_table(&self.spec.base)
    }

    /// An MoE FFN in every block, untied embeddings, default routing (softmax top-k, no balancing).
    pub fn model_config(&self, sizes: &Sizes) -> TransformerConfig {
        TransformerConfig {
            vocab: self.vocab,
            seq_len: self.seq_len,
            sizes: *sizes,
            n_head: self.n_head,
            moe_every: 1,
            tied_embeddings: false,
            activation: self.activation,
            routing: RoutingConfig::default(),
            norm_eps: 1e-6,
            attn_logit_multiplier: 1.0,
        }
    }

    /// The fixed token batch (`batch` x `seq_len + 1`), a function of `data_seed` only.
    pub fn tokens(&self) -> Result<Batch> {
        let length = (4 * self.batch * (self.seq_len + 1)).max(256);
        let corpus = Corpus::markov(self.vocab, self.branching, length, self.data_seed)?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.data_seed ^ 0x7a11_0c0d);
        let ids = random_windows(&corpus.train, self.seq_len, self.batch, &mut rng)?;
        Ok(Batch::Tokens { ids })
    }
}

fn flat<F: Real>(a: &Array2<F>, out: &mut Vec<f64>) {
    out.extend(a.iter().map(|v| v.to_f64().unwrap_or(f64::NAN)));
}

fn param<'a, F: Real>(model: &'a MoeTransformer<F>, name: &str) -> Result<&'a ndarray::ArrayD<F>> {
    let store = model.store();
    let i = store.index_of(name).ok_or_else(|| Error::Internal(format!("probe: `{name}` missing")))?;
    Ok(&store.params[i].value)
}

fn matrix<'a, F: Real>(model: &'a MoeTransformer<F>, name: &str) -> Result<ArrayView2<'a, F>> {
    param(model, name)?.view().into_dimensionality::<Ix2>().map_err(|_| Error::Internal(format!("probe: `{name}` is not a matrix")))
}

fn vector<'a, F: Real>(model: &'a MoeTransformer<F>, name: &str) -> Result<ArrayView1<'a, F>> {
    param(model, name)?.view().into_dimensionality::<Ix1>().map_err(|_| Error::Internal(format!("probe: `{name}` is not a vector")))
}

/// Names of the probed fields, in the order [`probe_transformer`] returns them.
pub const FIELDS: [&str; 8] = ["embedding", "attn_logits", "attn_out", "router_logits", "expert_pre", "moe_out", "residual", "output"];

/// Replays the MoE-Transformer's forward pass on `batch` (token ids, `B x (T+1)`), keeping, flattened over
/// blocks, sequences, tokens and units: `embedding` (h0), `attn_logits` (pre-softmax scores of every
/// causal pair and head), `attn_out` (attention branch before beta_L), `router_logits`, `expert_pre`
/// (every expert on every token, routed or not), `moe_out` (MoE branch before beta_L), `residual` (the
/// last residual stream, before the final norm) and `output` (the next-token logits). `hp` must be the
/// parameterization the model was built with (the model keeps its multipliers private); `rng` drives
/// tie-breaking exactly as in the model's forward pass. Every block must be an MoE block.
pub fn probe_transformer<F: Real>(model: &MoeTransformer<F>, hp: &Resolved, batch: &Batch, rng: &mut ChaCha8Rng) -> Result<Activations> {
    let cfg = model.config();
    if hp.sizes != cfg.sizes {
        return Err(Error::invalid("param.sizes", "the probe's parameterization was resolved at other sizes than the model's"));
    }
    let Batch::Tokens { ids } = batch else {
        return Err(Error::invalid("batch", "the MoE-Transformer takes token batches"));
    };
    let (b, cols) = ids.dim();
    if b == 0 || cols < 2 || cols - 1 > cfg.seq_len {
        return Err(Error::invalid("batch.ids", format!("needs sequences of 2..={} tokens", cfg.seq_len + 1)));
    }
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab) {
        return Err(Error::invalid("batch.ids", format!("token id {bad} is outside the vocabulary of {}", cfg.vocab)));
    }
    let seq = cols - 1;
    let width = cfg.sizes.width;
    let tokens = b * seq;
    let (n_head, d_head) = (cfg.n_head, width / cfg.n_head);
    let alpha_in = F::of(hp.get(Group::Embedding).multiplier);
    let beta = F::of(hp.residual_multiplier);
    let moe_mult = MoeMultipliers::from_resolved(hp);
    let attn_cfg = AttentionConfig { n_head, logit_multiplier: cfg.attn_logit_multiplier };
    let scale = F::of(cfg.attn_logit_multiplier / d_head as f64);

    let (emb, pos) = (matrix(model, "embedding")?, matrix(model, "position_embedding")?);
    let mut h = Array2::<F>::zeros((tokens, width));
    for (t, mut row) in h.rows_mut().into_iter().enumerate() {
        let (r, c) = (t / seq, t % seq);
        let id = ids[[r, c]] as usize;
        ndarray::Zip::from(&mut row).and(emb.row(id)).and(pos.row(c)).for_each(|o, &e, &p| *o = alpha_in * (e + p));
    }
    let mut f: [Vec<f64>; 8] = Default::default();
    flat(&h, &mut f[0]);
    for l in 0..cfg.sizes.depth {
        if !cfg.is_moe_block(l) {
            return Err(Error::invalid("model.moe_every", "the transformer probe needs an MoE FFN in every block"));
        }
        let prefix = format!("blocks.{l}");
        let (a, _) = rms_norm_forward(h.view(), vector(model, &format!("{prefix}.attn_norm"))?, cfg.norm_eps);
        let weights = AttentionWeights {
            qkv: matrix(model, &format!("{prefix}.attn.qkv"))?,
            out: matrix(model, &format!("{prefix}.attn.out"))?,
            qkv_multiplier: hp.get(Group::AttnQkv).multiplier,
            out_multiplier: hp.get(Group::AttnOut).multiplier,
        };
        // The scores are recomputed here because the attention layer does not expose them; a test checks
        // that their causal softmax reproduces the layer's own context.
        let qkv = par_matmul_scaled(weights.qkv_multiplier, a.view(), weights.qkv.t());
        for sb in 0..b {
            let rows = sb * seq..(sb + 1) * seq;
            for hd in 0..n_head {
                let q = qkv.slice(s![rows.clone(), hd * d_head..(hd + 1) * d_head]);
                let k = qkv.slice(s![rows.clone(), width + hd * d_head..width + (hd + 1) * d_head]);
                let scores = q.dot(&k.t());
                for i in 0..seq {
                    f[1].extend((0..=i).map(|j| (scores[[i, j]] * scale).to_f64().unwrap_or(f64::NAN)));
                }
            }
        }
        let a3 = a.into_shape_with_order((b, seq, width)).map_err(|e| Error::Internal(e.to_string()))?;
        let (attn_out, _) = attention_forward(&weights, &attn_cfg, a3.view());
        let attn_out = attn_out.into_shape_with_order((tokens, width)).map_err(|e| Error::Internal(e.to_string()))?;
        flat(&attn_out, &mut f[2]);
        h.scaled_add(beta, &attn_out);

        let (a, _) = rms_norm_forward(h.view(), vector(model, &format!("{prefix}.ffn_norm"))?, cfg.norm_eps);
        let ids_moe = MoeParamIds::find(model.store(), &format!("{prefix}.moe"), &cfg.moe_shape())?;
        let w = ids_moe.weights(model.store())?;
        let mut r = a.dot(&w.router.t());
        r.mapv_inplace(|v| v * F::of(moe_mult.router));
        flat(&r, &mut f[3]);
        for e in 0..cfg.sizes.experts {
            let mut u = a.dot(&w.up.index_axis(NdAxis(0), e).t());
            u.mapv_inplace(|v| v * F::of(moe_mult.up));
            flat(&u, &mut f[4]);
        }
        let out = moe_forward(&w, &moe_mult, cfg.activation, &cfg.routing, cfg.sizes.active, a.view(), rng)?;
        flat(&out.out, &mut f[5]);
        h.scaled_add(beta, &out.out);
    }
    flat(&h, &mut f[6]);
    let (hn, _) = rms_norm_forward(h.view(), vector(model, "final_norm")?, cfg.norm_eps);
    let unemb = matrix(model, if cfg.tied_embeddings { "embedding" } else { "unembedding" })?;
    let logits = par_matmul_scaled(hp.get(Group::Unembedding).multiplier, hn.view(), unemb.t());
    flat(&logits, &mut f[7]);
    Ok(Activations { fields: FIELDS.iter().copied().zip(f).collect() })
}

/// Mean next-token cross-entropy of flattened logits (`tokens x vocab`, row-major) against `batch`.
pub fn cross_entropy(logits: &[f64], vocab: usize, batch: &Batch) -> Result<f64> {
    let Batch::Tokens { ids } = batch else {
        return Err(Error::invalid("batch", "needs token ids"));
    };
    let seq = ids.ncols().saturating_sub(1);
    let tokens = ids.nrows() * seq;
    if tokens == 0 || logits.len() != tokens * vocab {
        return Err(Error::Internal(format!("cross_entropy: {} logits for {tokens} tokens x {vocab}", logits.len())));
    }
    let total: f64 = logits
        .chunks(vocab)
        .enumerate()
        .map(|(t, row)| {
            let y = ids[[t / seq, t % seq + 1]] as usize;
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
            max + row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() - row[y]
        })
        .sum();
    Ok(total / tokens as f64)
}

/// Groups whose gradient RMS is recorded, in this order.
pub const GRAD_GROUPS: [Group; 8] = [
    Group::Embedding,
    Group::AttnQkv,
    Group::AttnOut,
    Group::Router,
    Group::ExpertUp,
    Group::ExpertDown,
    Group::Norm,
    Group::Unembedding,
];

/// Fields whose change after training is recorded (`delta.*`).
pub const DELTA_FIELDS: [&str; 8] = ["embedding", "attn_logits", "attn_out", "router_logits", "expert_pre", "moe_out", "residual", "output"];

/// Names of the recorded quantities, in the order [`measure_transformer`] returns them: `act.*` at
/// initialization, `delta.*` after the steps, `grad.*` gradient RMS per group at the last step (the
/// gradient the last update used: the learned regime the engine's `grad_rms` and Adam epsilon describe),
/// `grad_init.*` the same at step 0 (the ResNet check's convention), the last-step gradient RMS of group
/// `norm` split into the gains inside the blocks (`grad_blocks.norm`, on the residual branches) and the
/// final norm's gain (`grad_final.norm`, outside them), and the cross-entropy before and after the steps
/// (`loss_ce.init`, `loss_ce.final`; not `loss.*`, which the shared analysis reads as a squared loss to
/// form per-residual slopes). Gradients are raw RMS, not per unit residual: cross-entropy has no residual.
pub fn quantity_names() -> Vec<String> {
    let mut v: Vec<String> = FIELDS.iter().map(|f| format!("act.{f}")).collect();
    v.extend(DELTA_FIELDS.iter().map(|f| format!("delta.{f}")));
    for prefix in ["grad", "grad_init"] {
        v.extend(GRAD_GROUPS.iter().map(|g| format!("{prefix}.{}", g.name())));
    }
    v.push("grad_blocks.norm".into());
    v.push("grad_final.norm".into());
    v.push("loss_ce.init".into());
    v.push("loss_ce.final".into());
    v
}

/// RMS over the entries of every gradient tensor whose parameter passes `keep`.
fn grad_rms<F: Real>(model: &MoeTransformer<F>, grads: &[ndarray::ArrayD<F>], keep: impl Fn(&crate::model::Param<F>) -> bool) -> f64 {
    let (mut s, mut c) = (0.0, 0usize);
    for (p, gr) in model.store().params.iter().zip(grads) {
        if keep(p) {
            s += gr.iter().map(|v| v.to_f64().unwrap_or(f64::NAN).powi(2)).sum::<f64>();
            c += gr.len();
        }
    }
    if c == 0 {
        f64::NAN
    } else {
        (s / c as f64).sqrt()
    }
}

fn group_rms<F: Real>(model: &MoeTransformer<F>, grads: &[ndarray::ArrayD<F>]) -> Vec<f64> {
    GRAD_GROUPS.iter().map(|g| grad_rms(model, grads, |p| p.group == *g)).collect()
}

/// One transformer at `sizes` with model seed `seed`: the quantities of [`quantity_names`], in order. A run
/// that diverges records NaN for what it could not measure.
pub fn measure_transformer(setup: &TransformerCoordSetup, sizes: &Sizes, seed: u64) -> Result<Vec<f64>> {
    let hp = setup.resolve(sizes)?;
    let batch = setup.tokens()?;
    let mut model: MoeTransformer<f64> = MoeTransformer::new(&setup.model_config(sizes), &hp, &mut ChaCha8Rng::seed_from_u64(seed))?;
    // Probes use their own fixed rng so the tie-breaking draws are the same before and after training.
    let probe_seed = seed ^ 0x9e37_79b9_7f4a_7c15;
    let before = probe_transformer(&model, &hp, &batch, &mut ChaCha8Rng::seed_from_u64(probe_seed))?;
    let mut route_rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x5151));
    let mut opt: Box<dyn crate::train::optim::Optimizer<f64>> = match setup.spec.optimizer {
        Optimizer::Sgd => Box::new(Sgd::new(model.store(), &hp)?),
        Optimizer::Adam => Box::new(AdamW::new(model.store(), &hp, setup.adam_betas.0, setup.adam_betas.1)?),
    };
    let nan = vec![f64::NAN; GRAD_GROUPS.len()];
    let (mut grad_first, mut grad_last) = (nan.clone(), nan);
    let mut norm_split = [f64::NAN; 2];
    let mut loss_init = f64::NAN;
    let mut diverged = false;
    for step in 0..setup.spec.steps {
        let out = model.loss_and_grad(&batch, &mut route_rng)?;
        if step == 0 {
            loss_init = out.loss;
            grad_first = group_rms(&model, &out.grads);
        }
        if !out.loss.is_finite() {
            diverged = true;
            break;
        }
        if step + 1 == setup.spec.steps {
            grad_last = group_rms(&model, &out.grads);
            // The engine describes `norm` as a residual-branch group; the final norm is not in a branch.
            norm_split = [
                grad_rms(&model, &out.grads, |p| p.group == Group::Norm && p.name.starts_with("blocks.")),
                grad_rms(&model, &out.grads, |p| p.name == "final_norm"),
            ];
        }
        opt.step(model.store_mut(), &out.grads, 1.0)?;
        model.after_step(&out.load);
    }
    let (loss_final, _) = model.forward(&batch, &mut route_rng)?;
    let after = probe_transformer(&model, &hp, &batch, &mut ChaCha8Rng::seed_from_u64(probe_seed))?;
    let mut v: Vec<f64> = before.fields.iter().map(|(_, a)| rms(a)).collect();
    for name in DELTA_FIELDS {
        v.push(match (before.get(name), after.get(name)) {
            (Some(a), Some(b)) if !diverged => rms_diff(a, b),
            _ => f64::NAN,
        });
    }
    v.extend(grad_last);
    v.extend(grad_first);
    v.extend(norm_split);
    v.push(loss_init);
    v.push(if diverged || !loss_final.is_finite() { f64::NAN } else { loss_final });
    Ok(v)
}

/// Predicted exponent of a transformer quantity along `spec.axis`, where it differs from (or is missing
/// in) the ResNet's [`super::coord::predicted_slope`]; `None` means "keep what [`analyze`] said".
///
/// Power counting from the engine's exponents, with `layer(g, F) = (F + init_var_g)/2 + multiplier_g` the
/// exponent of the output RMS of a layer of fan-in exponent F (1 for N along width, and for n along width
/// and expert_hidden) reading Θ(1) coordinates. The transformer is pre-norm: attention, router, experts
/// and unembedding read an RMS-normalized stream, whose coordinates are Θ(1) whatever the stream's scale.
/// - `act.embedding` = layer(embedding, 0).
/// - `act.attn_logits`: q and k have exponent layer(attn_qkv, 1 along width) each; at initialization q
///   and k are independent, so q . k over d_head ∝ N coordinates is a sum of random signs (∝ sqrt(N)) and
///   the 1/d_head scale leaves 2 layer(attn_qkv) - 1/2 along width (logits vanish like N^(-1/2) in every
///   preset whose projections are Θ(1); this is the 1/d_head choice working as intended: after training q
///   and k align and q . k ∝ d_head, which is what `delta.attn_logits` checks).
/// - `act.attn_out` = layer(attn_qkv) + layer(attn_out) (the softmax average over positions depends on
///   the sequence length only).
/// - `act.router_logits` = layer(router) under the preset's init (ablations as in the ResNet check).
/// - `act.expert_pre` = layer(expert_up); `act.moe_out` = that + layer(expert_down, n) - 1/2 along
///   experts (gates renormalized over k independent experts average them).
/// - `act.residual` = max(embedding, beta_L exponent + max(attn_out, moe_out) + 1/2 along depth): 2L
///   independent branches, no compounding thanks to the norms.
/// - `act.output` = layer(unembedding, 1 along width): the final norm makes its input Θ(1).
///
/// Changes: along width at a preset that leaves width at SP, under Adam, the attention projections have
/// fan-in N and Θ(lr) steps per entry, so the attention output and the logits (whose query change aligns
/// with the keys) change at least like N^(1/2) (lower bound, like the ResNet's router and expert checks).
/// Gradients: `grad.*` (last step) keeps the engine's `grad_rms` exponent from [`analyze`]. `grad_init.*`
/// (step 0) carries the same exponent, replacing the ResNet's init power counting (which knows neither
/// attention nor the pre-norm): backward fields through the normalized hidden layers are the same at
/// initialization as after a few steps, except for the router, whose gradient pairs each expert's random
/// output with the backward field over N coordinates; at initialization the two are independent, so the
/// sum grows like sqrt(N) instead of N: one half below the engine's exponent along width.
/// `grad_blocks.norm` (gains inside the blocks) carries the `norm` group's exponent; `grad_final.norm`
/// (the final norm's gain, read only by the unembedding) the same except Θ(1) along depth, since no
/// 1/L branch multiplier sits between it and the loss. The group RMS `grad.norm` mixes both: its depth
/// slope tends to -1/2 (one Θ(1) tensor among 2L tensors ∝ 1/L), not the engine's -1.
pub fn transformer_prediction(spec: &CoordSpec, quantity: &str, table: &Table) -> Option<Option<Prediction>> {
    let axis = spec.axis;
    let scaled = crate::param::presets::Preset::by_name(&spec.preset).map(|p| p.scales(axis)).unwrap_or(false);
    let exact = |value: f64| Some(Some(Prediction { value, lower_bound: false }));
    if let Some(group) = quantity.strip_prefix("grad_init.") {
        let router_random = if group == "router" && axis == Axis::Width { -0.5 } else { 0.0 };
        return Some(if scaled {
            table.row(group).map(|r| Prediction { value: r.grad_rms.get(axis) + router_random, lower_bound: false })
        } else {
            None
        });
    }
    if quantity == "grad_blocks.norm" {
        return Some(if scaled { table.row("norm").map(|r| Prediction { value: r.grad_rms.get(axis), lower_bound: false }) } else { None });
    }
    if quantity == "grad_final.norm" {
        // Outside every branch, beta_L does not reach it: Θ(1) along depth, the group's law elsewhere.
        let value = if axis == Axis::Depth { 0.0 } else { table.row("norm")?.grad_rms.get(axis) };
        return Some(if scaled { Some(Prediction { value, lower_bound: false }) } else { None });
    }
    if matches!(quantity, "delta.attn_out" | "delta.attn_logits") && axis == Axis::Width && !scaled {
        return Some(if spec.optimizer == Optimizer::Adam { Some(Prediction { value: 0.5, lower_bound: true }) } else { None });
    }
    if !quantity.starts_with("act.") {
        return None;
    }
    let fan_n = if axis == Axis::Width { 1.0 } else { 0.0 };
    let fan_h = if matches!(axis, Axis::Width | Axis::ExpertHidden) { 1.0 } else { 0.0 };
    let layer = |group: &str, fan: f64| -> Option<f64> {
        let e = table.row(group)?.exponents.get(axis);
        Some(0.5 * (fan + e.init_var) + e.multiplier)
    };
    let (embedding, qkv, out, up, down, router, unemb) = (
        layer("embedding", 0.0)?,
        layer("attn_qkv", fan_n)?,
        layer("attn_out", fan_n)?,
        layer("expert_up", fan_n)?,
        layer("expert_down", fan_h)?,
        layer("router", fan_n)?,
        layer("unembedding", fan_n)?,
    );
    let attn_out = qkv + out;
    let moe_out = up + down + if axis == Axis::Experts { -0.5 } else { 0.0 };
    let depth_sum = if axis == Axis::Depth { 0.5 } else { 0.0 };
    let residual = embedding.max(table.residual_exponents.get(axis) + attn_out.max(moe_out) + depth_sum);
    match quantity {
        "act.embedding" => exact(embedding),
        "act.attn_logits" => exact(2.0 * qkv - 0.5 * fan_n),
        "act.attn_out" => exact(attn_out),
        "act.router_logits" => match spec.router_init {
            RouterInit::Zero => Some(None),
            RouterInit::HiddenLike => exact(up),
            RouterInit::ReadoutLike => exact(up - 0.5 * fan_n),
            RouterInit::Preset => exact(router),
        },
        "act.expert_pre" => exact(up),
        "act.moe_out" => exact(moe_out),
        "act.residual" => exact(residual),
        "act.output" => exact(unemb),
        _ => Some(None),
    }
}

/// Re-judges `q` against `predicted` with the rule of [`analyze`], which this mirrors (keep the two in
/// step): within the tolerance or two standard errors; lower bounds met up to the same slack; an exact
/// prediction missed by the slope is a finite-size correction when the fit `y x^(-p) = a + b x^(-c)`
/// (refitted here with this `p`) supports a positive limit, with the free rate or else the
/// random-initialization rate 1/2. (The ResNet's per-residual rescue does not apply: no squared loss.)
fn rejudge(spec: &CoordSpec, q: &mut QuantityResult, predicted: Option<Prediction>) {
    q.predicted = predicted;
    if q.verdict == Verdict::Zero {
        return;
    }
    let Some(slope) = q.slope else { return };
    let j = judge(spec, &q.mean, &q.sem, &slope, q.per_residual.as_ref(), predicted);
    q.finite_size = j.finite_size;
    q.fit_exponent = j.fit_exponent;
    q.rate_fixed = j.rate_fixed;
    q.verdict = j.verdict;
}

/// Runs the transformer coordinate check: every size and seed (in parallel, collected in a fixed order so
/// the result does not depend on the thread count), then the fits and the transformer's predictions.
pub fn run_coord_transformer(setup: &TransformerCoordSetup) -> Result<CoordResult> {
    setup.validate()?;
    let spec = &setup.spec;
    let sizes: Vec<Sizes> = spec.values.iter().map(|v| spec.base.along(spec.axis, *v, "coord.sizes")).collect::<Result<_>>()?;
    let table = setup.table()?;
    let jobs: Vec<(usize, usize)> = (0..sizes.len()).flat_map(|i| (0..spec.seeds).map(move |s| (i, s))).collect();
    let runs: Vec<Result<Vec<f64>>> = jobs.par_iter().map(|&(i, s)| measure_transformer(setup, &sizes[i], s as u64)).collect();
    let names = quantity_names();
    // values[q][seed][size]
    let mut values = vec![vec![vec![f64::NAN; sizes.len()]; spec.seeds]; names.len()];
    for (&(i, s), run) in jobs.iter().zip(runs) {
        for (q, v) in run?.into_iter().enumerate() {
            values[q][s][i] = v;
        }
    }
    let mut quantities = analyze(spec, &names, values, &table)?;
    for q in &mut quantities {
        if let Some(p) = transformer_prediction(spec, &q.name, &table) {
            rejudge(spec, q, p);
        }
    }
    Ok(CoordResult { spec: spec.clone(), sizes, quantities })
}

/// File name of a transformer result: `transformer_<preset>_<optimizer>_<axis>[_<router_init>].json`.
pub fn result_file(r: &CoordResult) -> String {
    format!("transformer_{}.json", r.label().replace('/', "_"))
}

/// The Markdown table of a transformer result, headed so it cannot be mistaken for a ResNet one.
pub fn table_markdown(r: &CoordResult) -> String {
    format!("MoE-Transformer: {}", r.table())
}

/// Runs one check and writes its JSON (a [`CoordResult`], as for the ResNet) into `dir` under
/// [`result_file`]; returns the result and the path (for `moe-dmft coord-check --model transformer`).
pub fn run_and_write(setup: &TransformerCoordSetup, dir: &Path) -> Result<(CoordResult, PathBuf)> {
    let r = run_coord_transformer(setup)?;
    let path = dir.join(result_file(&r));
    crate::files::write_json(&path, &r)?;
    Ok((r, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(axis: Axis, values: Vec<usize>) -> TransformerCoordSetup {
        let mut s = TransformerCoordSetup::new(crate::check::run::tests::small_spec(axis, values));
        s.seq_len = 6;
        s.batch = 3;
        s
    }

    #[test]
    fn probe_matches_the_model() {
        let s = setup(Axis::Width, vec![16, 32]);
        let sizes = s.spec.base.along(Axis::Width, 32, "t").unwrap();
        let hp = s.resolve(&sizes).unwrap();
        let model: MoeTransformer<f64> = MoeTransformer::new(&s.model_config(&sizes), &hp, &mut ChaCha8Rng::seed_from_u64(3)).unwrap();
        let batch = s.tokens().unwrap();
        let probe = probe_transformer(&model, &hp, &batch, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
        let out = model.loss_and_grad(&batch, &mut ChaCha8Rng::seed_from_u64(9)).unwrap();
        let ce = cross_entropy(probe.get("output").unwrap(), s.vocab, &batch).unwrap();
        assert!((ce - out.loss).abs() <= 1e-12 * out.loss.abs(), "{ce} vs {}", out.loss);
        let diag = |n: &str| out.diagnostics.iter().find(|d| d.0 == n).unwrap().1;
        assert!((rms(probe.get("output").unwrap()) - diag("logits_rms")).abs() < 1e-12);
        // Per-block router logits: the probe flattens blocks in order, T x M each.
        let tokens = 3 * 6;
        let r = probe.get("router_logits").unwrap();
        for l in 0..2 {
            let block = &r[l * tokens * 4..(l + 1) * tokens * 4];
            assert!((rms(block) - diag(&format!("block{l}.router_logits_rms"))).abs() < 1e-12);
            let a = &probe.get("attn_out").unwrap()[l * tokens * 32..(l + 1) * tokens * 32];
            assert!((rms(a) - diag(&format!("block{l}.attn_out_rms"))).abs() < 1e-12);
        }
        // 2 blocks x 3 sequences x 4 heads x causal pairs of 6 positions.
        assert_eq!(probe.get("attn_logits").unwrap().len(), 2 * 3 * 4 * 21);
        assert_eq!(probe.get("expert_pre").unwrap().len(), 2 * 4 * tokens * 32);
    }

    #[test]
    fn attention_logits_reproduce_the_context() {
        // Causal softmax of the probed scores, applied to the values, must give the layer's own context.
        let s = setup(Axis::Width, vec![16, 32]);
        let sizes = s.spec.base;
        let hp = s.resolve(&sizes).unwrap();
        let model: MoeTransformer<f64> = MoeTransformer::new(&s.model_config(&sizes), &hp, &mut ChaCha8Rng::seed_from_u64(4)).unwrap();
        let batch = s.tokens().unwrap();
        let probe = probe_transformer(&model, &hp, &batch, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        let Batch::Tokens { ids } = &batch else { unreachable!() };
        let (b, seq, n, heads) = (ids.nrows(), ids.ncols() - 1, 16, 4);
        let dh = n / heads;
        // Block 0's input: norm of h0 (h0 is the probe's embedding field).
        let h0 = Array2::from_shape_vec((b * seq, n), probe.get("embedding").unwrap().to_vec()).unwrap();
        let (a, _) = rms_norm_forward(h0.view(), vector(&model, "blocks.0.attn_norm").unwrap(), 1e-6);
        let w = AttentionWeights {
            qkv: matrix(&model, "blocks.0.attn.qkv").unwrap(),
            out: matrix(&model, "blocks.0.attn.out").unwrap(),
            qkv_multiplier: hp.get(Group::AttnQkv).multiplier,
            out_multiplier: hp.get(Group::AttnOut).multiplier,
        };
        let (_, cache) = attention_forward(&w, &AttentionConfig { n_head: heads, logit_multiplier: 1.0 }, a.clone().into_shape_with_order((b, seq, n)).unwrap().view());
        let qkv = a.dot(&w.qkv.t()) * w.qkv_multiplier;
        let logits = probe.get("attn_logits").unwrap();
        let mut k = 0;
        for sb in 0..b {
            for hd in 0..heads {
                for i in 0..seq {
                    let row = &logits[k..k + i + 1];
                    k += i + 1;
                    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
                    let z: f64 = row.iter().map(|v| (v - max).exp()).sum();
                    for c in 0..dh {
                        let ctx: f64 = (0..=i).map(|j| (row[j] - max).exp() / z * qkv[[sb * seq + j, 2 * n + hd * dh + c]]).sum();
                        let want = cache.context()[[sb * seq + i, hd * dh + c]];
                        assert!((ctx - want).abs() < 1e-12, "{ctx} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn measure_is_deterministic_and_learns() {
        let s = setup(Axis::Width, vec![16, 32]);
        let a = measure_transformer(&s, &s.spec.base, 1).unwrap();
        assert_eq!(a, measure_transformer(&s, &s.spec.base, 1).unwrap());
        let names = quantity_names();
        assert_eq!(a.len(), names.len());
        let get = |n: &str| a[names.iter().position(|x| x == n).unwrap()];
        for q in ["delta.attn_out", "delta.attn_logits", "delta.expert_pre", "grad.attn_qkv", "grad_init.attn_out", "grad_final.norm"] {
            assert!(get(q) > 0.0 && get(q).is_finite(), "{q} = {}", get(q));
        }
        assert!(get("loss_ce.final") < get("loss_ce.init"));
    }

    #[test]
    fn bad_setup_names_the_field() {
        let mut s = setup(Axis::Width, vec![16, 32]);
        s.n_head = 3;
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("coord.n_head"), "{e}");
        let mut s = setup(Axis::Width, vec![16, 32]);
        s.vocab = 1;
        assert!(s.validate().unwrap_err().to_string().contains("coord.vocab"));
    }
}
