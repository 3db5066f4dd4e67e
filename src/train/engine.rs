//! The training loop over any [`Model`]: batches (full or minibatch, or token windows), forward and
//! backward, gradient clipping, the optimizer step with the schedule's factor, the model's `after_step`,
//! validation, per-step metrics records, and divergence detection. It writes no files: [`super::train`]
//! adds those, and the coordinate checks and DMFT comparisons call [`run_loop`] directly. A model that
//! holds its tensors on its own device ([`crate::model::Resident`], the GPU backend) steps there: the loop
//! gets the sums of squares its records need instead of the gradients, and syncs the host store at the end.
//!
//! Random streams (all ChaCha8 from the run seed, one stream each, so that changing e.g. the batch size
//! never changes the initialization): 0 model init, 1 batch sampling, 2 routing tie-breaks during
//! training, 3 validation windows, 4 routing tie-breaks during evaluation.

use std::collections::BTreeMap;
use std::time::Instant;

use ndarray::{Array2, Axis};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, Optimizer, Sgd};
use super::schedule::Schedule;
use crate::data::text::{random_windows, Corpus};
use crate::data::Task;
use crate::model::{Batch, Grads, Model, ParamStore, Real, StepOutput};
use crate::param::{Group, Resolved};
use crate::routing::LoadStats;

pub const STREAM_INIT: u64 = 0;
pub const STREAM_BATCH: u64 = 1;
pub const STREAM_ROUTING: u64 = 2;
pub const STREAM_VALIDATION: u64 = 3;
pub const STREAM_EVAL_ROUTING: u64 = 4;

/// A ChaCha8 generator on one of the run's streams.
pub fn stream_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Loss convention of squared-loss tasks (SPEC §9), written into every summary.
pub const REGRESSION_LOSS: &str = "0.5 * mean over samples of (f - y)^2";
/// Loss convention of next-token prediction.
pub const TOKEN_LOSS: &str = "mean over predicted tokens of the cross-entropy in nats";

/// What the loop trains on.
#[derive(Debug, Clone)]
pub enum TrainData {
    /// A regression task with an optional validation set.
    Regression { train: Task, validation: Option<Task> },
    /// A token stream: batches are random windows of `seq_len + 1` tokens of `corpus.train`; validation
    /// uses a fixed set of `validation_windows` windows of `corpus.validation`.
    Tokens { corpus: Corpus, seq_len: usize, validation_windows: usize },
}

impl TrainData {
    pub fn loss_convention(&self) -> &'static str {
        match self {
            TrainData::Regression { .. } => REGRESSION_LOSS,
            TrainData::Tokens { .. } => TOKEN_LOSS,
        }
    }
}

/// Settings of the loop itself (independent of the model and the parameterization).
#[derive(Debug, Clone, PartialEq)]
pub struct LoopSettings {
    pub seed: u64,
    pub steps: usize,
    pub schedule: Schedule,
    /// `None`: full batch (regression only).
    pub batch_size: Option<usize>,
    /// Validation every this many steps (and after the last step); 0 = only after the last step.
    pub eval_every: usize,
    /// Rescale the gradient to this global L2 norm when it is larger.
    pub grad_clip: Option<f64>,
    pub beta1: f64,
    pub beta2: f64,
}

/// RMS quantities of one parameter group at one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GroupRms {
    /// Learning rate used at this step (group lr times the schedule's factor).
    pub lr: f64,
    /// RMS of the group's entries before the step.
    pub param: f64,
    /// RMS of the gradient entries (after clipping).
    pub grad: f64,
    /// RMS of the update applied.
    pub update: f64,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Number of optimizer steps taken before the loss was measured: 0 is the initial model, and the
    /// record with `step == steps` (`final: true`) is the trained model, with no update of its own.
    pub step: usize,
    /// Training loss on this step's batch (the full training set for full batch), before the update.
    pub loss: f64,
    /// Weighted auxiliary losses (load balance, z-loss) added to the objective.
    pub aux_loss: f64,
    /// The schedule's factor multiplying every group's learning rate.
    pub lr_factor: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f64>,
    /// Global L2 norm of the gradient before clipping.
    pub grad_norm: f64,
    /// Load statistics per MoE layer, in block order.
    pub load: Vec<LoadStats>,
    /// RMS quantities per group, keyed by group name.
    pub groups: BTreeMap<String, GroupRms>,
    /// The model's named diagnostics.
    pub diagnostics: BTreeMap<String, f64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub r#final: bool,
}

/// Called by the loop; the CLI's implementation drives a progress bar, [`super::MetricsFile`] writes
/// `metrics.jsonl`.
/// Observers are `Send` because the run executes inside its own rayon pool.
pub trait Observer: Send {
    fn start(&mut self, _steps: usize) {}
    /// Called once per record, in step order; an error stops the run (e.g. a full disk).
    fn observe(&mut self, _record: &StepRecord) -> crate::Result<()> {
        Ok(())
    }
    fn finish(&mut self) {}
}

/// An observer that does nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;
impl Observer for NoObserver {}

/// Sends every record to two observers.
pub struct Both<'a>(pub &'a mut dyn Observer, pub &'a mut dyn Observer);
impl Observer for Both<'_> {
    fn start(&mut self, steps: usize) {
        self.0.start(steps);
        self.1.start(steps);
    }
    fn observe(&mut self, record: &StepRecord) -> crate::Result<()> {
        self.0.observe(record)?;
        self.1.observe(record)
    }
    fn finish(&mut self) {
        self.0.finish();
        self.1.finish();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    /// A loss or a parameter became NaN or infinite; the run stopped there.
    Diverged,
}

/// What the loop returns.
#[derive(Debug, Clone, PartialEq)]
pub struct LoopResult {
    pub status: Status,
    /// Step at which the non-finite loss was seen.
    pub diverged_at: Option<usize>,
    /// Loss per record: entry t is the loss after t optimizer steps (length steps + 1 when it finished).
    pub losses: Vec<f64>,
    /// (step, validation loss) at every evaluation.
    pub val_losses: Vec<(usize, f64)>,
    pub wall_seconds: f64,
    /// Tokens (regression: samples) processed per second by the training steps.
    pub tokens_per_second: f64,
}

fn rms(sum_sq: f64, count: usize) -> f64 {
    if count == 0 {
        0.0
    } else {
        (sum_sq / count as f64).sqrt()
    }
}

fn sum_sq<F: Real>(a: &ndarray::ArrayD<F>) -> f64 {
    a.iter().map(|v| v.to_f64().unwrap_or(f64::NAN).powi(2)).sum()
}

/// Number of parameters, and of those used per token: routed expert tensors count with weight k/M
/// (shared experts, whose names contain `shared`, count fully).
pub fn parameter_counts<F: Real>(store: &ParamStore<F>, kappa: f64) -> (usize, usize) {
    let total = store.num_elements();
    let inactive: f64 = store
        .params
        .iter()
        .filter(|p| matches!(p.group, Group::ExpertUp | Group::ExpertDown) && !p.name.contains("shared"))
        .map(|p| p.value.len() as f64 * (1.0 - kappa))
        .sum();
    (total, total - inactive.round() as usize)
}

fn rows(a: &Array2<f64>, idx: &[usize]) -> Array2<f64> {
    a.select(Axis(0), idx)
}

/// Builds the optimizer that the parameterization names.
pub fn make_optimizer<F: Real>(
    store: &ParamStore<F>,
    hp: &Resolved,
    settings: &LoopSettings,
) -> crate::Result<Box<dyn Optimizer<F>>> {
    Ok(match hp.optimizer {
        crate::param::Optimizer::Sgd => Box::new(Sgd::new(store, hp)?),
        crate::param::Optimizer::Adam => Box::new(AdamW::new(store, hp, settings.beta1, settings.beta2)?),
    })
}

/// Trains `model` in place. Runs on the current rayon pool (callers install a pool of fixed size for
/// results that depend only on the seed and that size). A non-finite loss or parameter stops the run with
/// [`Status::Diverged`]; that is a result, not an error.
pub fn run_loop<F: Real>(
    model: &mut dyn Model<F>,
    hp: &Resolved,
    data: &TrainData,
    settings: &LoopSettings,
    observer: &mut dyn Observer,
) -> crate::Result<LoopResult> {
    let start = Instant::now();
    let mut batch_rng = stream_rng(settings.seed, STREAM_BATCH);
    let mut route_rng = stream_rng(settings.seed, STREAM_ROUTING);
    let mut eval_rng = stream_rng(settings.seed, STREAM_EVAL_ROUTING);

    let validation: Option<Batch> = match data {
        TrainData::Regression { validation: Some(v), .. } if v.x.nrows() > 0 => {
            Some(Batch::Regression { x: v.x.clone(), y: v.y.clone() })
        }
        TrainData::Regression { .. } => None,
        TrainData::Tokens { corpus, seq_len, validation_windows } => {
            let mut rng = stream_rng(settings.seed, STREAM_VALIDATION);
            Some(Batch::Tokens { ids: random_windows(&corpus.validation, *seq_len, *validation_windows, &mut rng)? })
        }
    };
    let next_batch = |rng: &mut ChaCha8Rng| -> crate::Result<(Batch, usize)> {
        match data {
            TrainData::Regression { train, .. } => match settings.batch_size {
                None => Ok((Batch::Regression { x: train.x.clone(), y: train.y.clone() }, train.x.nrows())),
                Some(b) => {
                    let idx = rand::seq::index::sample(rng, train.x.nrows(), b).into_vec();
                    Ok((Batch::Regression { x: rows(&train.x, &idx), y: rows(&train.y, &idx) }, b))
                }
            },
            TrainData::Tokens { corpus, seq_len, .. } => {
                let b = settings.batch_size.ok_or_else(|| crate::Error::invalid("optim.batch_size", "is required for text data"))?;
                Ok((Batch::Tokens { ids: random_windows(&corpus.train, *seq_len, b, rng)? }, b * seq_len))
            }
        }
    };

    // A resident model (the GPU backend) updates itself on its device; a host optimizer would only hold
    // moments it never uses.
    let mut optimizer = match model.resident() {
        Some(_) => None,
        None => Some(make_optimizer(model.store(), hp, settings)?),
    };
    let groups_present: Vec<Group> = {
        let mut g: Vec<Group> = model.store().params.iter().map(|p| p.group).collect();
        g.sort();
        g.dedup();
        g
    };
    let group_lr = |g: Group| hp.groups.iter().find(|r| r.group == g).map_or(0.0, |r| r.lr);

    observer.start(settings.steps);
    let mut result = LoopResult {
        status: Status::Ok,
        diverged_at: None,
        losses: Vec::with_capacity(settings.steps + 1),
        val_losses: Vec::new(),
        wall_seconds: 0.0,
        tokens_per_second: 0.0,
    };
    let mut tokens = 0usize;
    let mut train_seconds = 0.0;
    let evaluate = |model: &dyn Model<F>, rng: &mut ChaCha8Rng| -> crate::Result<Option<f64>> {
        match &validation {
            Some(b) => Ok(Some(model.forward(b, rng)?.0)),
            None => Ok(None),
        }
    };

    for step in 0..settings.steps {
        let t0 = Instant::now();
        let (batch, batch_tokens) = next_batch(&mut batch_rng)?;
        let (out, mut grads, grad_sq, param_sq) = match model.resident() {
            Some(r) => {
                let g = r.resident_grad(&batch, &mut route_rng)?;
                let out = StepOutput { loss: g.loss, aux_loss: g.aux_loss, grads: Vec::new(), load: g.load, diagnostics: g.diagnostics };
                (out, None, g.grad_sq, g.param_sq)
            }
            None => {
                let mut out = model.loss_and_grad(&batch, &mut route_rng)?;
                let grads: Grads<F> = std::mem::take(&mut out.grads);
                let grad_sq: Vec<f64> = grads.iter().map(sum_sq).collect();
                let param_sq: Vec<f64> = model.store().params.iter().map(|p| sum_sq(&p.value)).collect();
                (out, Some(grads), grad_sq, param_sq)
            }
        };
        let grad_norm = grad_sq.iter().sum::<f64>().sqrt();
        let lr_factor = settings.schedule.factor(step);
        let finite = out.loss.is_finite() && out.aux_loss.is_finite() && grad_norm.is_finite();

        // Validation of the same parameters the training loss was measured on, before the update.
        let due = settings.eval_every > 0 && step % settings.eval_every == 0;
        let t_eval = Instant::now();
        let val_loss = if finite && due { evaluate(&*model, &mut eval_rng)? } else { None };
        let eval_seconds = t_eval.elapsed().as_secs_f64();
        let mut clip_scale = 1.0;
        let mut update_sq = vec![0.0; grad_sq.len()];
        if finite {
            if let Some(c) = settings.grad_clip {
                if grad_norm > c {
                    clip_scale = c / grad_norm;
                }
            }
            match (model.resident(), grads.as_mut(), optimizer.as_mut()) {
                (Some(r), _, _) => {
                    update_sq = r.resident_update(lr_factor, clip_scale, (settings.beta1, settings.beta2), &out.load)?;
                }
                (None, Some(grads), Some(optimizer)) => {
                    if clip_scale != 1.0 {
                        let s = F::of(clip_scale);
                        grads.iter_mut().for_each(|g| g.mapv_inplace(|v| v * s));
                    }
                    update_sq = optimizer.step(model.store_mut(), grads, lr_factor)?;
                    model.after_step(&out.load);
                }
                _ => return Err(crate::Error::Internal("train: host step without gradients or optimizer".into())),
            }
            tokens += batch_tokens;
        }
        train_seconds += t0.elapsed().as_secs_f64() - eval_seconds;

        if let Some(v) = val_loss {
            result.val_losses.push((step, v));
        }
        let mut groups = BTreeMap::new();
        for &g in &groups_present {
            let (mut p, mut gr, mut u, mut n) = (0.0, 0.0, 0.0, 0usize);
            for (i, prm) in model.store().params.iter().enumerate() {
                if prm.group == g {
                    p += param_sq[i];
                    gr += grad_sq[i] * clip_scale * clip_scale;
                    u += update_sq[i];
                    n += prm.value.len();
                }
            }
            let lr = if g == Group::ExpertBias { 0.0 } else { group_lr(g) * lr_factor };
            groups.insert(g.name().to_string(), GroupRms { lr, param: rms(p, n), grad: rms(gr, n), update: rms(u, n) });
        }
        let record = StepRecord {
            step,
            loss: out.loss,
            aux_loss: out.aux_loss,
            lr_factor,
            val_loss,
            grad_norm,
            load: out.load,
            groups,
            diagnostics: out.diagnostics.into_iter().collect(),
            r#final: false,
        };
        result.losses.push(out.loss);
        observer.observe(&record)?;
        if !finite {
            result.status = Status::Diverged;
            result.diverged_at = Some(step);
            break;
        }
    }

    if let Some(r) = model.resident() {
        // The final record and the caller's summary read the host store.
        r.sync_host()?;
    }
    if result.status == Status::Ok {
        // The trained model's own record: loss of the final parameters, no update.
        let (batch, _) = next_batch(&mut batch_rng)?;
        let out = model.loss_and_grad(&batch, &mut route_rng)?;
        let finite_params = model.store().params.iter().all(|p| p.value.iter().all(|v| v.is_finite()));
        let finite = out.loss.is_finite() && finite_params;
        let val_loss = if finite { evaluate(&*model, &mut eval_rng)? } else { None };
        if let Some(v) = val_loss {
            result.val_losses.push((settings.steps, v));
        }
        let groups = model
            .store()
            .params
            .iter()
            .fold(BTreeMap::<String, (f64, usize)>::new(), |mut acc, p| {
                let e = acc.entry(p.group.name().to_string()).or_default();
                e.0 += sum_sq(&p.value);
                e.1 += p.value.len();
                acc
            })
            .into_iter()
            .map(|(k, (s, n))| (k, GroupRms { lr: 0.0, param: rms(s, n), grad: 0.0, update: 0.0 }))
            .collect();
        let record = StepRecord {
            step: settings.steps,
            loss: out.loss,
            aux_loss: out.aux_loss,
            lr_factor: 0.0,
            val_loss,
            grad_norm: 0.0,
            load: out.load,
            groups,
            diagnostics: out.diagnostics.into_iter().collect(),
            r#final: true,
        };
        result.losses.push(out.loss);
        observer.observe(&record)?;
        if !finite {
            result.status = Status::Diverged;
            result.diverged_at = Some(settings.steps);
        }
    }
    observer.finish();
    result.wall_seconds = start.elapsed().as_secs_f64();
    result.tokens_per_second = if train_seconds > 0.0 { tokens as f64 / train_seconds } else { 0.0 };
    Ok(result)
}
