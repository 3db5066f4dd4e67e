//! Training of finite networks: optimizers ([`optim`]), learning-rate schedules ([`schedule`]), the
//! training loop ([`engine`]) and, here, the run config ([`TrainConfig`]) and the run with its outputs
//! (`config.toml`, `metrics.jsonl`, `summary.json`, `task_*.npy`, `weights.safetensors`).
//!
//! A run is deterministic for a given config: the seed fixes every random stream and the run uses its own
//! rayon pool of `threads` threads (results may differ between thread counts, never between runs).
//!
//! A config file (every section but `[model]` and `[data]` optional; unknown keys are errors):
//! ```toml
//! seed = 0
//! threads = 2
//! steps = 50
//! precision = "f32"          # or "f64"
//! save_weights = false
//! [model]                    # arch = "resnet" | "transformer", then that model's fields
//! arch = "resnet"
//! input_dim = 8
//! [model.sizes]
//! width = 64
//! depth = 2
//! experts = 8
//! active = 2
//! expert_hidden = 32
//! [param]                    # crate::param::ParamConfig: preset, optimizer, lr, ...
//! preset = "moe-completep"
//! optimizer = "adam"
//! lr = 0.01
//! [optim]                    # schedule = "constant" | "cosine" | "linear", warmup, final_lr_fraction,
//! batch_size = 32            # batch_size (absent: full batch), eval_every, grad_clip, beta1, beta2
//! [data]                     # kind = "synthetic" | "shakespeare" | "markov"
//! kind = "synthetic"
//! validation_points = 64
//! [data.task]                # crate::data::TaskConfig
//! points = 128
//! input_dim = 8
//! ```

pub mod engine;
pub mod optim;
pub mod schedule;
pub mod sweep;

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use engine::{run_loop, LoopResult, LoopSettings, NoObserver, Observer, Status, StepRecord, TrainData};

use crate::data::text::{default_corpus_dir, Corpus};
use crate::data::{make_task_with_validation, Task, TaskConfig};
use crate::model::resnet::{MoeResNet, ResNetConfig};
use crate::model::transformer::{MoeTransformer, TransformerConfig};
use crate::model::{Model, ParamStore, Real};
use crate::param::{ParamConfig, Resolved};
use crate::files::{write_atomic, write_npy};
use crate::Error;
use schedule::{Schedule, ScheduleKind};

/// The architecture to train, tagged by `arch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "arch", rename_all = "snake_case")]
pub enum ModelConfig {
    Resnet(ResNetConfig),
    Transformer(TransformerConfig),
}

impl ModelConfig {
    pub fn sizes(&self) -> crate::param::Sizes {
        match self {
            ModelConfig::Resnet(c) => c.sizes,
            ModelConfig::Transformer(c) => c.sizes,
        }
    }

    pub fn arch(&self) -> &'static str {
        match self {
            ModelConfig::Resnet(_) => "resnet",
            ModelConfig::Transformer(_) => "transformer",
        }
    }
}

fn default_validation_windows() -> usize {
    16
}

/// What the model trains on, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DataConfig {
    /// A seeded teacher task (regression; for `arch = "resnet"`).
    Synthetic {
        task: TaskConfig,
        /// Fresh inputs labelled by the same teacher, evaluated every `optim.eval_every` steps.
        #[serde(default)]
        validation_points: usize,
    },
    /// The Shakespeare corpus (for `arch = "transformer"`), from `corpus_dir` (default
    /// `data-cache/shakespeare`, filled by `scripts/get_corpus.sh`).
    Shakespeare {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        corpus_dir: Option<PathBuf>,
        /// Fixed validation windows (of `model.seq_len + 1` tokens) from the held-out last 10%.
        #[serde(default = "default_validation_windows")]
        validation_windows: usize,
    },
    /// A seeded random Markov chain of tokens (for `arch = "transformer"` without the corpus).
    Markov {
        vocab_size: usize,
        branching: usize,
        length: usize,
        #[serde(default)]
        seed: u64,
        #[serde(default = "default_validation_windows")]
        validation_windows: usize,
    },
}

/// The optimizer-independent part of training (the optimizer itself, its learning rates, epsilon and
/// weight decay per group come from `[param]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub schedule: ScheduleKind,
    /// Linear warmup steps.
    pub warmup: usize,
    /// Learning-rate factor reached at the last step by `cosine` and `linear`.
    pub final_lr_fraction: f64,
    /// Minibatch size (samples; for text, sequences); absent = full batch (regression only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// Validation every this many steps and after the last; 0 = only after the last.
    pub eval_every: usize,
    /// Clip the global gradient norm to this value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// Adam's moment decay rates (ignored by SGD).
    pub beta1: f64,
    pub beta2: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            schedule: ScheduleKind::Constant,
            warmup: 0,
            final_lr_fraction: 0.0,
            batch_size: None,
            eval_every: 10,
            grad_clip: None,
            beta1: 0.9,
            beta2: 0.999,
        }
    }
}

/// Where a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// ndarray and rayon on the CPU, f32 or f64.
    #[default]
    Cpu,
    /// The GPU backend (`crate::cuda`, f32; needs a build with `--features cuda` and an NVIDIA GPU).
    Cuda,
}

impl Device {
    fn is_cpu(&self) -> bool {
        *self == Device::Cpu
    }
}

/// Floating-point precision of the network during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    F64,
}

fn default_threads() -> usize {
    2
}

/// A training run as written in a TOML file (`moe-dmft train --config FILE`). Unknown keys are errors.
///
/// For `arch = "resnet"` with synthetic data, `param.input_dim` is set from `data.task.input_dim` (the
/// mean-field form's `1/sqrt(D)` needs the true D); the written `config.toml` shows the value used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Seed of the model init, batch sampling and routing tie-breaks (the synthetic task has its own).
    #[serde(default)]
    pub seed: u64,
    /// Size of the run's rayon pool; results are reproducible for a given seed and thread count.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Number of optimizer steps.
    pub steps: usize,
    #[serde(default)]
    pub precision: Precision,
    /// `"cpu"` (default) or `"cuda"`: the same run on the GPU backend, with the same outputs.
    #[serde(default, skip_serializing_if = "Device::is_cpu")]
    pub device: Device,
    /// Write `weights.safetensors` after training.
    #[serde(default)]
    pub save_weights: bool,
    pub model: ModelConfig,
    #[serde(default)]
    pub param: ParamConfig,
    #[serde(default)]
    pub optim: OptimConfig,
    pub data: DataConfig,
    /// Written by `train` into `config.toml` for the record: the per-group table of the run. Ignored as
    /// input (the table is always derived again from `param`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved: Option<Resolved>,
}

/// Prefixes the field of an [`Error::Invalid`] with the config section it came from.
fn in_section(section: &str, e: Error) -> Error {
    match e {
        Error::Invalid { field, reason } if !field.starts_with(section) => {
            Error::Invalid { field: format!("{section}{field}"), reason }
        }
        other => other,
    }
}

impl TrainConfig {
    /// A run of `steps` steps of `model` on `data` with every other setting at its default (seed 0,
    /// 2 threads, f32, default `[param]` and `[optim]`); change them with the `with_*` methods.
    pub fn new(model: ModelConfig, data: DataConfig, steps: usize) -> Self {
        TrainConfig {
            seed: 0,
            threads: default_threads(),
            steps,
            precision: Precision::F32,
            device: Device::Cpu,
            save_weights: false,
            model,
            param: ParamConfig::default(),
            optim: OptimConfig::default(),
            data,
            resolved: None,
        }
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads;
        self
    }

    pub fn with_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn with_param(mut self, param: ParamConfig) -> Self {
        self.param = param;
        self
    }

    pub fn with_optim(mut self, optim: OptimConfig) -> Self {
        self.optim = optim;
        self
    }

    /// Parses a TOML file; unknown keys and type errors are [`Error::Parse`] (exit code 2).
    pub fn from_file(path: &Path) -> crate::Result<Self> {
        crate::cli::read_toml(path)
    }

    /// Parses TOML text (e.g. in a notebook); errors as for [`TrainConfig::from_file`].
    pub fn from_toml_str(text: &str) -> crate::Result<Self> {
        toml::from_str(text).map_err(|e| Error::Parse { path: PathBuf::from("<string>"), reason: e.to_string() })
    }

    /// Checks every field that can be checked without loading data; errors name the field and the rule.
    pub fn validate(&self) -> crate::Result<()> {
        if self.steps == 0 {
            return Err(Error::invalid("steps", "must be at least 1"));
        }
        if self.threads == 0 {
            return Err(Error::invalid("threads", "must be at least 1"));
        }
        match &self.model {
            ModelConfig::Resnet(m) => m.validate().map_err(|e| in_section("model.", e))?,
            ModelConfig::Transformer(m) => m.validate().map_err(|e| in_section("model.", e))?,
        }
        self.param.validate().map_err(|e| in_section("param.", e))?;
        let o = &self.optim;
        self.schedule().validate()?;
        if o.batch_size == Some(0) {
            return Err(Error::invalid("optim.batch_size", "must be at least 1 (omit it for full batch)"));
        }
        if let Some(c) = o.grad_clip {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::invalid("optim.grad_clip", "must be finite and positive"));
            }
        }
        if !(0.0..1.0).contains(&o.beta1) {
            return Err(Error::invalid("optim.beta1", "must lie in [0, 1)"));
        }
        if !(0.0..1.0).contains(&o.beta2) {
            return Err(Error::invalid("optim.beta2", "must lie in [0, 1)"));
        }
        match (&self.model, &self.data) {
            (ModelConfig::Resnet(m), DataConfig::Synthetic { task, .. }) => {
                task.validate().map_err(|e| match e {
                    Error::Invalid { field, reason } => {
                        Error::invalid(field.replacen("task.", "data.task.", 1), reason)
                    }
                    other => other,
                })?;
                if m.input_dim != task.input_dim {
                    return Err(Error::invalid(
                        "model.input_dim",
                        format!("must equal data.task.input_dim ({}), got {}", task.input_dim, m.input_dim),
                    ));
                }
                if m.outputs != 1 {
                    return Err(Error::invalid("model.outputs", "must be 1: synthetic teachers have one output"));
                }
                if let Some(b) = o.batch_size {
                    if b > task.points {
                        return Err(Error::invalid(
                            "optim.batch_size",
                            format!("must not exceed data.task.points ({}), got {b}", task.points),
                        ));
                    }
                }
            }
            (ModelConfig::Transformer(_), DataConfig::Shakespeare { validation_windows, .. })
            | (ModelConfig::Transformer(_), DataConfig::Markov { validation_windows, .. }) => {
                if o.batch_size.is_none() {
                    return Err(Error::invalid("optim.batch_size", "is required for text (number of sequences per step)"));
                }
                if *validation_windows == 0 {
                    return Err(Error::invalid("data.validation_windows", "must be at least 1"));
                }
            }
            (ModelConfig::Resnet(_), _) => {
                return Err(Error::invalid("data.kind", "arch = \"resnet\" trains on kind = \"synthetic\""));
            }
            (ModelConfig::Transformer(_), _) => {
                return Err(Error::invalid(
                    "data.kind",
                    "arch = \"transformer\" trains on kind = \"shakespeare\" or \"markov\"",
                ));
            }
        }
        Ok(())
    }

    pub fn schedule(&self) -> Schedule {
        Schedule {
            kind: self.optim.schedule,
            warmup: self.optim.warmup,
            final_fraction: self.optim.final_lr_fraction,
            steps: self.steps,
        }
    }

    pub fn loop_settings(&self) -> LoopSettings {
        LoopSettings {
            seed: self.seed,
            steps: self.steps,
            schedule: self.schedule(),
            batch_size: self.optim.batch_size,
            eval_every: self.optim.eval_every,
            grad_clip: self.optim.grad_clip,
            beta1: self.optim.beta1,
            beta2: self.optim.beta2,
        }
    }

    /// The parameterization as used: `[param]` with the data's input dimension for the MoE-ResNet.
    pub fn param_as_run(&self) -> ParamConfig {
        let mut p = self.param.clone();
        if let DataConfig::Synthetic { task, .. } = &self.data {
            p.input_dim = task.input_dim;
        }
        p
    }

    /// Resolves the parameterization at the model's sizes.
    pub fn resolve(&self) -> crate::Result<Resolved> {
        Ok(self.param_table()?.to_resolved())
    }

    /// The full parameterization table (exponents per axis included) at the model's sizes.
    pub fn param_table(&self) -> crate::Result<crate::param::Table> {
        self.param_as_run().resolve_table(&self.model.sizes()).map_err(|e| in_section("param.", e))
    }
}

/// Data, parameterization and config ready to run.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The config as run (`param.input_dim` filled in, `resolved` set).
    pub config: TrainConfig,
    pub resolved: Resolved,
    pub data: TrainData,
}

/// Validates `cfg`, loads or generates its data and resolves its parameterization.
pub fn prepare(cfg: &TrainConfig) -> crate::Result<Prepared> {
    cfg.validate()?;
    let resolved = cfg.resolve()?;
    let data = match (&cfg.model, &cfg.data) {
        (_, DataConfig::Synthetic { task, validation_points }) => {
            let (train, validation) = make_task_with_validation(task, *validation_points)?;
            TrainData::Regression { train, validation: (*validation_points > 0).then_some(validation) }
        }
        (model, DataConfig::Shakespeare { corpus_dir, validation_windows }) => {
            let dir = corpus_dir.clone().unwrap_or_else(default_corpus_dir);
            token_data(model, Corpus::load(&dir)?, *validation_windows)?
        }
        (model, DataConfig::Markov { vocab_size, branching, length, seed, validation_windows }) => {
            token_data(model, Corpus::markov(*vocab_size, *branching, *length, *seed)?, *validation_windows)?
        }
    };
    let mut config = cfg.clone();
    config.param = cfg.param_as_run();
    config.resolved = Some(resolved.clone());
    Ok(Prepared { config, resolved, data })
}

fn token_data(model: &ModelConfig, corpus: Corpus, validation_windows: usize) -> crate::Result<TrainData> {
    let ModelConfig::Transformer(m) = model else {
        return Err(Error::invalid("data.kind", "text data needs arch = \"transformer\""));
    };
    if m.vocab < corpus.vocab.len() {
        return Err(Error::invalid(
            "model.vocab",
            format!("must be at least the data's vocabulary size ({}), got {}", corpus.vocab.len(), m.vocab),
        ));
    }
    for (part, stream) in [("training", &corpus.train), ("validation", &corpus.validation)] {
        if stream.len() < m.seq_len + 1 {
            return Err(Error::invalid(
                "model.seq_len",
                format!("windows of seq_len + 1 = {} tokens do not fit in the {part} stream ({} tokens)", m.seq_len + 1, stream.len()),
            ));
        }
    }
    Ok(TrainData::Tokens { corpus, seq_len: m.seq_len, validation_windows })
}

/// A trained network of either architecture.
#[derive(Debug, Clone)]
pub enum TrainedModel<F> {
    Resnet(MoeResNet<F>),
    Transformer(MoeTransformer<F>),
}

impl<F: Real> TrainedModel<F> {
    pub fn as_model(&self) -> &dyn Model<F> {
        match self {
            TrainedModel::Resnet(m) => m,
            TrainedModel::Transformer(m) => m,
        }
    }

    fn as_model_mut(&mut self) -> &mut dyn Model<F> {
        match self {
            TrainedModel::Resnet(m) => m,
            TrainedModel::Transformer(m) => m,
        }
    }

    /// A freshly initialised model of `cfg` (init stream of the run seed).
    pub fn init(cfg: &TrainConfig, hp: &Resolved) -> crate::Result<Self> {
        let mut rng = engine::stream_rng(cfg.seed, engine::STREAM_INIT);
        Ok(match &cfg.model {
            ModelConfig::Resnet(m) => TrainedModel::Resnet(MoeResNet::new(m, hp, &mut rng).map_err(|e| in_section("model.", e))?),
            ModelConfig::Transformer(m) => {
                TrainedModel::Transformer(MoeTransformer::new(m, hp, &mut rng).map_err(|e| in_section("model.", e))?)
            }
        })
    }
}

/// The outcome of a run kept in memory.
#[derive(Debug, Clone)]
pub struct Trained<F> {
    pub prepared: Prepared,
    pub model: TrainedModel<F>,
    pub result: LoopResult,
    pub summary: Summary,
}

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub status: Status,
    /// Step whose loss (or parameters) became NaN or infinite.
    pub diverged_at: Option<usize>,
    pub steps: usize,
    /// Loss records written (steps + 1 when the run finished: the initial model to the trained one).
    pub records: usize,
    pub initial_loss: f64,
    /// Loss of the trained model (record `step == steps`); null when diverged.
    pub final_loss: Option<f64>,
    pub best_loss: Option<f64>,
    pub best_step: Option<usize>,
    pub final_val_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub loss_convention: String,
    pub wall_seconds: f64,
    /// Training throughput: tokens (regression: samples) per second of training steps.
    pub tokens_per_second: f64,
    pub params_total: usize,
    /// Parameters used per token (routed experts counted with weight k/M).
    pub params_active: usize,
    pub arch: String,
    pub preset: String,
    pub optimizer: crate::param::Optimizer,
    pub seed: u64,
    pub threads: usize,
    /// The CPU's BLAS kernel set ([`crate::blas_core`]): with `seed` and `threads`, what a bit-for-bit rerun
    /// needs. Empty in summaries written before it was recorded.
    #[serde(default)]
    pub blas_core: String,
}

/// The `summary.json` of a finished (or diverged) run; shared by the CPU trainer and the GPU backend.
pub fn summarize<F: Real>(p: &Prepared, store: &ParamStore<F>, r: &LoopResult) -> Summary {
    let finite = |v: f64| v.is_finite().then_some(v);
    let best = r
        .losses
        .iter()
        .enumerate()
        .filter(|(_, l)| l.is_finite())
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, &l)| (i, l));
    let (total, active) = engine::parameter_counts(store, p.resolved.sizes.kappa());
    Summary {
        status: r.status,
        diverged_at: r.diverged_at,
        steps: p.config.steps,
        records: r.losses.len(),
        initial_loss: r.losses.first().copied().unwrap_or(f64::NAN),
        final_loss: if r.status == Status::Ok { r.losses.last().copied().and_then(finite) } else { None },
        best_loss: best.map(|b| b.1),
        best_step: best.map(|b| b.0),
        final_val_loss: r.val_losses.last().filter(|v| v.0 == p.config.steps).map(|v| v.1).and_then(finite),
        best_val_loss: r.val_losses.iter().map(|v| v.1).filter(|v| v.is_finite()).min_by(|a, b| a.total_cmp(b)),
        loss_convention: p.data.loss_convention().to_string(),
        wall_seconds: r.wall_seconds,
        tokens_per_second: r.tokens_per_second,
        params_total: total,
        params_active: active,
        arch: p.config.model.arch().to_string(),
        preset: p.resolved.preset.clone(),
        optimizer: p.resolved.optimizer,
        seed: p.config.seed,
        threads: p.config.threads,
        blas_core: crate::blas_core(),
    }
}

/// A rayon pool of `threads` threads, as every run uses (results depend on the thread count, not on timing).
pub fn thread_pool(threads: usize) -> crate::Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .map_err(|e| Error::Internal(format!("cannot start a pool of {threads} threads: {e}")))
}

/// Trains in memory at precision `F` (whatever `cfg.precision` says) and returns the trained model, the
/// per-step losses and the summary; writes nothing. The coordinate checks and the DMFT comparison call
/// this many times.
pub fn train_in_memory<F: Real>(cfg: &TrainConfig, observer: &mut dyn Observer) -> crate::Result<Trained<F>> {
    run_prepared(prepare(cfg)?, observer)
}

/// Trains an already prepared run (see [`prepare`]) in memory.
pub fn run_prepared<F: Real>(prepared: Prepared, observer: &mut dyn Observer) -> crate::Result<Trained<F>> {
    let pool = thread_pool(prepared.config.threads)?;
    pool.install(|| {
        let mut model = TrainedModel::<F>::init(&prepared.config, &prepared.resolved)?;
        let result =
            run_loop(model.as_model_mut(), &prepared.resolved, &prepared.data, &prepared.config.loop_settings(), observer)?;
        let summary = summarize(&prepared, model.as_model().store(), &result);
        Ok(Trained { prepared, model, result, summary })
    })
}

/// Writes every record as one JSON line.
pub struct MetricsFile {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl MetricsFile {
    pub fn create(path: &Path) -> crate::Result<Self> {
        let file = std::fs::File::create(path).map_err(|source| Error::Write { path: path.to_path_buf(), source })?;
        Ok(MetricsFile { path: path.to_path_buf(), out: std::io::BufWriter::new(file) })
    }

    pub fn flush(&mut self) -> crate::Result<()> {
        self.out.flush().map_err(|source| Error::Write { path: self.path.clone(), source })
    }
}

impl Observer for MetricsFile {
    fn observe(&mut self, record: &StepRecord) -> crate::Result<()> {
        let line = serde_json::to_string(record).map_err(|e| Error::Internal(format!("metrics record: {e}")))?;
        writeln!(self.out, "{line}").map_err(|source| Error::Write { path: self.path.clone(), source })
    }
}

fn write_task(dir: &Path, stem: &str, task: &Task) -> crate::Result<()> {
    write_npy(&dir.join(format!("{stem}_x.npy")), &task.x)?;
    write_npy(&dir.join(format!("{stem}_y.npy")), &task.y)
}

/// Runs `cfg` and, with `out`, writes into that directory (created if needed): `config.toml` (the config
/// as run with the resolved per-group table), `metrics.jsonl` (one record per step, see [`StepRecord`]),
/// `summary.json` (written last), `task_x.npy`/`task_y.npy` (and `task_val_*.npy`) for synthetic tasks,
/// and `weights.safetensors` when `save_weights`. A diverged run is a result (status `diverged`), not an
/// error.
pub fn train(cfg: &TrainConfig, out: Option<&Path>, observer: &mut dyn Observer) -> crate::Result<Summary> {
    if cfg.device == Device::Cuda {
        return crate::cuda::train(cfg, out, observer);
    }
    match cfg.precision {
        Precision::F32 => train_at::<f32>(cfg, out, observer),
        Precision::F64 => train_at::<f64>(cfg, out, observer),
    }
}

fn train_at<F: Real>(cfg: &TrainConfig, out: Option<&Path>, observer: &mut dyn Observer) -> crate::Result<Summary> {
    let Some(dir) = out else {
        return Ok(train_in_memory::<F>(cfg, observer)?.summary);
    };
    // Validate and load data before touching the output directory, so bad input leaves nothing behind.
    let prepared = prepare(cfg)?;
    let mut model = thread_pool(prepared.config.threads)?
        .install(|| TrainedModel::<F>::init(&prepared.config, &prepared.resolved))?;
    train_model(&prepared, model.as_model_mut(), Some(dir), observer, &[])
}

/// Trains `model` (initialised from `prepared` on any backend: the CPU models, or the GPU's) with the
/// run's loop in the run's thread pool. With `out`, writes the files of [`train`] there, plus each
/// `(file name, value)` of `extra` as JSON (the GPU's `device.json`).
pub fn train_model<F: Real>(
    prepared: &Prepared,
    model: &mut dyn Model<F>,
    out: Option<&Path>,
    observer: &mut dyn Observer,
    extra: &[(&str, serde_json::Value)],
) -> crate::Result<Summary> {
    let pool = thread_pool(prepared.config.threads)?;
    let settings = prepared.config.loop_settings();
    let Some(dir) = out else {
        let r = pool.install(|| run_loop(model, &prepared.resolved, &prepared.data, &settings, observer))?;
        return Ok(summarize(prepared, model.store(), &r));
    };
    std::fs::create_dir_all(dir).map_err(|source| Error::Write { path: dir.to_path_buf(), source })?;
    let toml_text = toml::to_string(&prepared.config).map_err(|e| Error::Internal(format!("config.toml: {e}")))?;
    write_atomic(&dir.join("config.toml"), toml_text.as_bytes())?;
    for (name, value) in extra {
        let json = serde_json::to_string_pretty(value).map_err(|e| Error::Internal(format!("{name}: {e}")))?;
        write_atomic(&dir.join(name), json.as_bytes())?;
    }
    if let TrainData::Regression { train, validation } = &prepared.data {
        write_task(dir, "task", train)?;
        if let Some(v) = validation {
            write_task(dir, "task_val", v)?;
        }
    }
    let mut metrics = MetricsFile::create(&dir.join("metrics.jsonl"))?;
    let result = {
        let mut both = engine::Both(&mut metrics, observer);
        pool.install(|| run_loop(model, &prepared.resolved, &prepared.data, &settings, &mut both))?
    };
    metrics.flush()?;
    if prepared.config.save_weights {
        crate::model::io::save_safetensors(model.store(), &dir.join("weights.safetensors"))?;
    }
    let summary = summarize(prepared, model.store(), &result);
    let json = serde_json::to_string_pretty(&summary).map_err(|e| Error::Internal(format!("summary.json: {e}")))?;
    write_atomic(&dir.join("summary.json"), json.as_bytes())?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::param::Sizes;

    fn resnet(input_dim: usize) -> ModelConfig {
        ModelConfig::Resnet(ResNetConfig {
            input_dim,
            outputs: 1,
            sizes: Sizes { width: 8, depth: 1, experts: 4, active: 2, expert_hidden: 8 },
            activation: Default::default(),
            norm: false,
            routing: Default::default(),
        })
    }

    fn synthetic(input_dim: usize) -> DataConfig {
        DataConfig::Synthetic { task: TaskConfig { input_dim, points: 8, ..Default::default() }, validation_points: 0 }
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::Invalid { field, .. } => field,
            other => panic!("expected an invalid field, got {other}"),
        }
    }

    #[test]
    fn builder_round_trips_through_toml() {
        let cfg = TrainConfig::new(resnet(3), synthetic(3), 4).with_seed(9).with_threads(1).with_precision(Precision::F64);
        cfg.validate().unwrap();
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(TrainConfig::from_toml_str(&text).unwrap(), cfg);
        assert!(matches!(TrainConfig::from_toml_str("steps = 1\nbogus = 2"), Err(Error::Parse { .. })));
    }

    #[test]
    fn inconsistent_sections_name_the_field() {
        assert_eq!(field_of(TrainConfig::new(resnet(3), synthetic(4), 4).validate().unwrap_err()), "model.input_dim");
        let markov = DataConfig::Markov { vocab_size: 8, branching: 2, length: 100, seed: 0, validation_windows: 2 };
        assert_eq!(field_of(TrainConfig::new(resnet(3), markov, 4).validate().unwrap_err()), "data.kind");
        let big_batch = OptimConfig { batch_size: Some(9), ..Default::default() };
        let cfg = TrainConfig::new(resnet(3), synthetic(3), 4).with_optim(big_batch);
        assert_eq!(field_of(cfg.validate().unwrap_err()), "optim.batch_size");
        let cfg = TrainConfig::new(resnet(3), synthetic(3), 4).with_threads(0);
        assert_eq!(field_of(cfg.validate().unwrap_err()), "threads");
        let mut cfg = TrainConfig::new(resnet(3), synthetic(3), 4);
        if let ModelConfig::Resnet(m) = &mut cfg.model {
            m.routing.capacity_factor = Some(-1.0);
        }
        assert_eq!(field_of(cfg.validate().unwrap_err()), "model.routing.capacity_factor");
        let mut cfg = TrainConfig::new(resnet(3), synthetic(3), 4);
        if let DataConfig::Synthetic { task, .. } = &mut cfg.data {
            task.noise = -1.0;
        }
        assert_eq!(field_of(cfg.validate().unwrap_err()), "data.task.noise");
    }
}
