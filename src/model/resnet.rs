//! The MoE-ResNet of SPEC §3, the finite network the DMFT describes:
//!
//! `h0 = m_in W x`; per block `a = m_norm * rmsnorm(h; gain)` (or `a = h` without norm), `m = MoE(a)`,
//! `h <- h + beta_L m`; output `f = m_out w . h_L`. Loss `0.5 * mean over samples of sum over outputs
//! (f - y)^2`; the gradient is that of the mean plus the weighted auxiliary routing losses.
//!
//! Every init std and multiplier comes from a [`Resolved`] parameterization; the norm gain starts at 1
//! and the balancing bias at 0 whatever their group's `init_std`. Tensor names and shapes are
//! documented in docs/tensors.md.

use ndarray::{Array2, ArrayView2, Ix1, Ix2};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::moe::{moe_backward, moe_forward, MoeCache, MoeMultipliers, MoeParamIds, MoeShape};
use super::norm::{rms_norm_backward, rms_norm_forward, NormCache};
use super::{Activation, Batch, Grads, Model, ParamStore, Real, StepOutput};
use crate::param::{Group, Resolved, Sizes};
use crate::routing::{self, LoadStats, RoutingConfig};
use crate::Error;

/// Epsilon inside the RMS norm, `sqrt(mean(h^2) + eps)`.
pub const NORM_EPS: f64 = 1e-6;

fn one() -> usize {
    1
}

/// Architecture of an MoE-ResNet (the parameterization and the seed come separately).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetConfig {
    /// D, the input dimension.
    pub input_dim: usize,
    /// Number of outputs (1 for a scalar regression).
    #[serde(default = "one")]
    pub outputs: usize,
    /// Width N, depth L, experts M, active k, expert hidden n.
    pub sizes: Sizes,
    /// Nonlinearity of the expert hidden layer.
    #[serde(default)]
    pub activation: Activation,
    /// RMS norm with gain in front of every MoE block (off in the DMFT model).
    #[serde(default)]
    pub norm: bool,
    #[serde(default)]
    pub routing: RoutingConfig,
}

impl ResNetConfig {
    /// Checks every field; errors name the field and the rule.
    pub fn validate(&self) -> crate::Result<()> {
        if self.input_dim == 0 {
            return Err(Error::invalid("input_dim", "must be at least 1"));
        }
        if self.outputs == 0 {
            return Err(Error::invalid("outputs", "must be at least 1"));
        }
        let s = &self.sizes;
        for (field, v) in [
            ("sizes.width", s.width),
            ("sizes.depth", s.depth),
            ("sizes.experts", s.experts),
            ("sizes.active", s.active),
            ("sizes.expert_hidden", s.expert_hidden),
        ] {
            if v == 0 {
                return Err(Error::invalid(field, "must be at least 1"));
            }
        }
        if s.active > s.experts {
            return Err(Error::invalid(
                "sizes.active",
                format!("must not exceed sizes.experts ({}), got {}", s.experts, s.active),
            ));
        }
        self.routing.validate(s.experts, s.active)
    }

    /// Shapes of a block's MoE tensors.
    pub fn moe_shape(&self) -> MoeShape {
        MoeShape {
            width: self.sizes.width,
            experts: self.sizes.experts,
            expert_hidden: self.sizes.expert_hidden,
            shared_experts: self.routing.shared_experts,
        }
    }

    /// (name, group, shape) of every tensor in store order; see docs/tensors.md.
    pub fn layout(&self) -> Vec<(String, Group, Vec<usize>)> {
        let n = self.sizes.width;
        let mut v = vec![("embedding".to_string(), Group::Embedding, vec![n, self.input_dim])];
        for l in 0..self.sizes.depth {
            if self.norm {
                v.push((format!("blocks.{l}.norm"), Group::Norm, vec![n]));
            }
            v.extend(self.moe_shape().layout(&format!("blocks.{l}.moe")));
        }
        v.push(("readout".to_string(), Group::Readout, vec![self.outputs, n]));
        v
    }
}

/// Forward multipliers of the MoE-ResNet, taken from a [`Resolved`] parameterization.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ResNetMultipliers {
    /// `m_in` (group `embedding`).
    pub input: f64,
    /// `m_r` (group `router`).
    pub router: f64,
    /// `m_up` (group `expert_up`, also shared experts).
    pub up: f64,
    /// `m_down` (group `expert_down`, also shared experts).
    pub down: f64,
    /// Multiplier of the normalized activations (group `norm`; 1 unless the parameterization says so).
    pub norm: f64,
    /// `m_out` (group `readout`).
    pub readout: f64,
    /// `beta_L`, the residual branch multiplier.
    pub residual: f64,
}

impl ResNetMultipliers {
    pub fn from_resolved(hp: &Resolved, norm: bool) -> Self {
        let moe = MoeMultipliers::from_resolved(hp);
        ResNetMultipliers {
            input: hp.get(Group::Embedding).multiplier,
            router: moe.router,
            up: moe.up,
            down: moe.down,
            norm: if norm { hp.get(Group::Norm).multiplier } else { 1.0 },
            readout: hp.get(Group::Readout).multiplier,
            residual: hp.residual_multiplier,
        }
    }

    fn moe(&self) -> MoeMultipliers {
        MoeMultipliers { router: self.router, up: self.up, down: self.down }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct BlockIds {
    norm: Option<usize>,
    moe: MoeParamIds,
}

/// A finite MoE-ResNet with its parameters.
#[derive(Debug, Clone)]
pub struct MoeResNet<F> {
    cfg: ResNetConfig,
    mult: ResNetMultipliers,
    store: ParamStore<F>,
    embedding: usize,
    readout: usize,
    blocks: Vec<BlockIds>,
}

struct BlockCache<F> {
    norm: Option<NormCache<F>>,
    moe: MoeCache<F>,
}

struct ForwardPass<F> {
    /// Residual stream after the last block (B x N).
    h_last: Array2<F>,
    /// Predictions (B x outputs).
    f: Array2<F>,
    blocks: Vec<BlockCache<F>>,
    load: Vec<LoadStats>,
    aux_loss: f64,
    diagnostics: Vec<(String, f64)>,
}

fn rms<F: Real>(a: &Array2<F>) -> f64 {
    if a.is_empty() {
        return 0.0;
    }
    (a.iter().map(|v| v.to_f64().unwrap_or(f64::NAN).powi(2)).sum::<f64>() / a.len() as f64).sqrt()
}

impl<F: Real> MoeResNet<F> {
    /// A freshly initialised network: entries N(0, init_std^2) of their group in `hp` (zero std gives
    /// zeros), norm gains 1, balancing biases 0, in the order of [`ResNetConfig::layout`].
    pub fn new(cfg: &ResNetConfig, hp: &Resolved, rng: &mut ChaCha8Rng) -> crate::Result<Self> {
        Self::check(cfg, hp)?;
        let mut store = ParamStore { params: Vec::new() };
        for (name, group, dims) in cfg.layout() {
            let value = match group {
                Group::Norm => ndarray::ArrayD::from_elem(dims, F::one()),
                Group::ExpertBias => ndarray::ArrayD::zeros(dims),
                g => super::moe::normal_init(&dims, hp.get(g).init_std, rng),
            };
            store.push(name, group, value);
        }
        Self::assemble(cfg, hp, store)
    }

    /// A network with the given weights (e.g. from [`super::io::load_safetensors`]). Every tensor of
    /// the layout must be present with its shape and group; extra tensors are an error. The order of
    /// `store` does not matter.
    pub fn from_store(cfg: &ResNetConfig, hp: &Resolved, store: ParamStore<F>) -> crate::Result<Self> {
        Self::check(cfg, hp)?;
        let layout = cfg.layout();
        let mut params: Vec<Option<super::Param<F>>> = store.params.into_iter().map(Some).collect();
        let mut ordered = ParamStore { params: Vec::new() };
        for (name, group, dims) in &layout {
            let pos = params
                .iter()
                .position(|p| p.as_ref().is_some_and(|p| &p.name == name))
                .ok_or_else(|| Error::invalid(format!("weights.{name}"), "missing"))?;
            let p = params[pos].take().ok_or_else(|| Error::Internal("tensor taken twice".into()))?;
            if p.value.shape() != dims.as_slice() {
                return Err(Error::invalid(
                    format!("weights.{name}"),
                    format!("has shape {:?}, the config needs {:?}", p.value.shape(), dims),
                ));
            }
            if p.group != *group {
                return Err(Error::invalid(
                    format!("weights.{name}"),
                    format!("is in group `{}`, expected `{}`", p.group.name(), group.name()),
                ));
            }
            ordered.params.push(p);
        }
        if let Some(extra) = params.into_iter().flatten().next() {
            return Err(Error::invalid(format!("weights.{}", extra.name), "is not a tensor of this model"));
        }
        Self::assemble(cfg, hp, ordered)
    }

    fn check(cfg: &ResNetConfig, hp: &Resolved) -> crate::Result<()> {
        cfg.validate()?;
        if hp.sizes != cfg.sizes {
            return Err(Error::invalid(
                "sizes",
                format!("the parameterization was resolved at {:?} but the model has {:?}", hp.sizes, cfg.sizes),
            ));
        }
        Ok(())
    }

    /// Finds the tensor positions of a store already in layout order.
    fn assemble(cfg: &ResNetConfig, hp: &Resolved, store: ParamStore<F>) -> crate::Result<Self> {
        let mut blocks = Vec::with_capacity(cfg.sizes.depth);
        for l in 0..cfg.sizes.depth {
            let norm = if cfg.norm {
                Some(store.index_of(&format!("blocks.{l}.norm")).ok_or_else(|| Error::Internal("norm missing".into()))?)
            } else {
                None
            };
            let moe = MoeParamIds::find(&store, &format!("blocks.{l}.moe"), &cfg.moe_shape())?;
            blocks.push(BlockIds { norm, moe });
        }
        let embedding = store.index_of("embedding").ok_or_else(|| Error::Internal("embedding missing".into()))?;
        let readout = store.index_of("readout").ok_or_else(|| Error::Internal("readout missing".into()))?;
        Ok(MoeResNet {
            cfg: cfg.clone(),
            mult: ResNetMultipliers::from_resolved(hp, cfg.norm),
            store,
            embedding,
            readout,
            blocks,
        })
    }

    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    pub fn multipliers(&self) -> &ResNetMultipliers {
        &self.mult
    }

    /// The same network with every tensor converted to another float type (f32 <-> f64, for checks).
    pub fn cast<G: Real>(&self) -> MoeResNet<G> {
        let store = ParamStore {
            params: self
                .store
                .params
                .iter()
                .map(|p| super::Param {
                    name: p.name.clone(),
                    group: p.group,
                    value: p.value.mapv(|v| G::of(v.to_f64().unwrap_or(f64::NAN))),
                })
                .collect(),
        };
        MoeResNet {
            cfg: self.cfg.clone(),
            mult: self.mult,
            store,
            embedding: self.embedding,
            readout: self.readout,
            blocks: self.blocks.clone(),
        }
    }

    fn matrix(&self, id: usize) -> crate::Result<ArrayView2<'_, F>> {
        self.store.params[id]
            .value
            .view()
            .into_dimensionality::<Ix2>()
            .map_err(|_| Error::Internal(format!("`{}` is not a matrix", self.store.params[id].name)))
    }

    fn vector(&self, id: usize) -> crate::Result<ndarray::ArrayView1<'_, F>> {
        self.store.params[id]
            .value
            .view()
            .into_dimensionality::<Ix1>()
            .map_err(|_| Error::Internal(format!("`{}` is not a vector", self.store.params[id].name)))
    }

    fn check_batch<'b>(&self, batch: &'b Batch) -> crate::Result<(&'b Array2<f64>, &'b Array2<f64>)> {
        match batch {
            Batch::Regression { x, y } => {
                if x.ncols() != self.cfg.input_dim {
                    return Err(Error::invalid(
                        "batch.x",
                        format!("has {} columns, the model's input_dim is {}", x.ncols(), self.cfg.input_dim),
                    ));
                }
                if y.ncols() != self.cfg.outputs || y.nrows() != x.nrows() {
                    return Err(Error::invalid(
                        "batch.y",
                        format!(
                            "has shape {:?}, expected ({}, {}) (rows of x, outputs)",
                            y.dim(),
                            x.nrows(),
                            self.cfg.outputs
                        ),
                    ));
                }
                Ok((x, y))
            }
            Batch::Tokens { .. } => Err(Error::invalid("batch", "the MoE-ResNet takes regression batches (x, y)")),
        }
    }

    fn run_forward(&self, x: &Array2<f64>, rng: &mut ChaCha8Rng) -> crate::Result<ForwardPass<F>> {
        let m = &self.mult;
        let xf = x.mapv(F::of);
        let mut h = xf.dot(&self.matrix(self.embedding)?.t());
        h.mapv_inplace(|v| v * F::of(m.input));
        let mut diagnostics = vec![("embedding.h_rms".to_string(), rms(&h))];
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let mut load = Vec::with_capacity(self.blocks.len());
        let mut aux_loss = 0.0;
        let beta = F::of(m.residual);
        for (l, ids) in self.blocks.iter().enumerate() {
            let (a, norm_cache) = match ids.norm {
                Some(nid) => {
                    let (mut a, c) = rms_norm_forward(h.view(), self.vector(nid)?, NORM_EPS);
                    if m.norm != 1.0 {
                        a.mapv_inplace(|v| v * F::of(m.norm));
                    }
                    (a, Some(c))
                }
                None => (h.clone(), None),
            };
            let w = ids.moe.weights(&self.store)?;
            let out = moe_forward(&w, &m.moe(), self.cfg.activation, &self.cfg.routing, self.cfg.sizes.active, a.view(), rng)?;
            h.scaled_add(beta, &out.out);
            diagnostics.push((format!("block{l}.router_logits_rms"), out.diagnostics.router_logits_rms));
            diagnostics.push((format!("block{l}.expert_preact_rms"), out.diagnostics.expert_preact_rms));
            diagnostics.push((format!("block{l}.moe_out_rms"), out.diagnostics.out_rms));
            diagnostics.push((format!("block{l}.h_rms"), rms(&h)));
            aux_loss += out.aux_loss;
            load.push(out.load);
            blocks.push(BlockCache { norm: norm_cache, moe: out.cache });
        }
        let mut f = h.dot(&self.matrix(self.readout)?.t());
        f.mapv_inplace(|v| v * F::of(m.readout));
        diagnostics.push(("output.f_rms".to_string(), rms(&f)));
        Ok(ForwardPass { h_last: h, f, blocks, load, aux_loss, diagnostics })
    }

    fn loss_of(f: &Array2<F>, y: &Array2<f64>) -> f64 {
        let b = y.nrows().max(1) as f64;
        0.5 * f.iter().zip(y.iter()).map(|(p, t)| (p.to_f64().unwrap_or(f64::NAN) - t).powi(2)).sum::<f64>() / b
    }
}

impl<F: Real> Model<F> for MoeResNet<F> {
    fn store(&self) -> &ParamStore<F> {
        &self.store
    }

    fn store_mut(&mut self) -> &mut ParamStore<F> {
        &mut self.store
    }

    fn loss_and_grad(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<StepOutput<F>> {
        let (x, y) = self.check_batch(batch)?;
        let fw = self.run_forward(x, rng)?;
        let loss = Self::loss_of(&fw.f, y);
        let m = &self.mult;
        let b = x.nrows().max(1) as f64;
        let mut grads: Grads<F> = self.store.zeros_like();

        // dL/df of 0.5 * mean_B sum_out (f - y)^2.
        let df: Array2<F> = ndarray::Zip::from(&fw.f).and(y).map_collect(|&p, &t| F::of((p.to_f64().unwrap_or(f64::NAN) - t) / b));
        let readout = self.matrix(self.readout)?;
        let mut d_readout = df.t().dot(&fw.h_last);
        d_readout.mapv_inplace(|v| v * F::of(m.readout));
        grads[self.readout] = d_readout.into_dyn();
        let mut dh = df.dot(&readout);
        dh.mapv_inplace(|v| v * F::of(m.readout));

        for (ids, cache) in self.blocks.iter().zip(fw.blocks.iter()).rev() {
            let dm = dh.mapv(|v| v * F::of(m.residual));
            let w = ids.moe.weights(&self.store)?;
            let (mut da, g) = moe_backward(&w, &m.moe(), self.cfg.activation, &self.cfg.routing, &cache.moe, dm.view());
            ids.moe.add_grads(g, &mut grads);
            match (ids.norm, &cache.norm) {
                (Some(nid), Some(nc)) => {
                    if m.norm != 1.0 {
                        da.mapv_inplace(|v| v * F::of(m.norm));
                    }
                    let (dh_norm, dgain) = rms_norm_backward(nc, self.vector(nid)?, da.view());
                    grads[nid] = dgain.into_dyn();
                    dh.scaled_add(F::one(), &dh_norm);
                }
                _ => dh.scaled_add(F::one(), &da),
            }
        }
        let xf = x.mapv(F::of);
        let mut d_embedding = dh.t().dot(&xf);
        d_embedding.mapv_inplace(|v| v * F::of(m.input));
        grads[self.embedding] = d_embedding.into_dyn();

        Ok(StepOutput { loss, aux_loss: fw.aux_loss, grads, load: fw.load, diagnostics: fw.diagnostics })
    }

    fn forward(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> crate::Result<(f64, Array2<f64>)> {
        let (x, y) = self.check_batch(batch)?;
        let fw = self.run_forward(x, rng)?;
        Ok((Self::loss_of(&fw.f, y), fw.f.mapv(|v| v.to_f64().unwrap_or(f64::NAN))))
    }

    /// Auxiliary-loss-free balancing: moves each block's `expert_bias` by the routing config's
    /// `bias_update_rate` towards balance ([`routing::update_bias`]).
    fn after_step(&mut self, load: &[LoadStats]) {
        let rate = self.cfg.routing.bias_update_rate;
        if rate == 0.0 {
            return;
        }
        for (ids, l) in self.blocks.iter().zip(load.iter()) {
            if let Ok(b) = self.store.params[ids.moe.bias].value.view_mut().into_dimensionality::<Ix1>() {
                routing::update_bias(b, l, rate);
            }
        }
    }
}
