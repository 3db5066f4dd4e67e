//! Resumable, sharded hyperparameter sweeps: a grid over sizes along one axis x learning rate (x presets,
//! seeds, optionally init scales) around a base training config, run point by point with each result
//! written atomically, then aggregated into a summary table, optimum-LR fits and figures.
//!
//! Layout of a sweep's output folder `DIR`:
//! - `DIR/sweep.toml`: the sweep config of the first run into `DIR`; a later run with a different `[base]`
//!   is refused (its results would not be comparable), while the grid may grow.
//! - `DIR/runs/<id>/`: one finished grid point: `result.json` (the sweep's record, [`RunRecord`]) beside
//!   whatever the runner wrote (the trainer's `config.toml`, `metrics.jsonl`, `summary.json`). A point
//!   runs in `DIR/runs/.partial/<id>.<pid>-<random>/` and that folder is renamed to `DIR/runs/<id>` only when its
//!   record is complete, so a point is done iff `DIR/runs/<id>/result.json` exists: a killed sweep loses
//!   only the point in flight and a rerun repeats no finished point.
//! - `DIR/summary.json`, `DIR/summary.md`: aggregated from whatever records exist (any shard may write
//!   them; each write is atomic and covers every record present at that time).
//!
//! Sharding: points are enumerated in a fixed order (presets, sizes, init scales, seeds, LRs, each in
//! config order) and shard `i/n` takes the points whose index is `i` modulo `n`, so the shards of a job
//! array partition the grid without talking to each other.

pub mod analysis;
pub mod figures;

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::param::{Axis, Sizes};
use crate::{Error, Result};
use analysis::{Drift, LrPoint, Optimum, SeedRun};

/// A sweep: a base training config and the grid laid over it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepConfig {
    /// The training config every grid point starts from (the trainer's TOML: seed, threads, steps,
    /// `[model]`, `[param]`, `[optim]`, `[data]`). The grid overrides the fields it sweeps.
    pub base: toml::Table,
    pub grid: Grid,
    #[serde(default)]
    pub analysis: AnalysisConfig,
}

/// What is swept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    /// The size axis: `width` (N, with expert_hidden scaled along at fixed n/N), `depth` (L), `experts`
    /// (M, with active k scaled along at fixed kappa) or `expert_hidden` (n at fixed N).
    pub axis: Axis,
    /// Sizes along the axis (N, L, M or n).
    pub sizes: Vec<usize>,
    /// log2 of the base learning rate (the LR the parameterization scales per group).
    pub lr_log2: Vec<f64>,
    /// Parameterization presets, e.g. `moe-completep`, `sp`, `mup`.
    pub presets: Vec<String>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Optional init scales (written to `[param] sigma`, the init std constant of every weight matrix);
    /// empty keeps the base's.
    #[serde(default)]
    pub init_scales: Vec<f64>,
    /// Groups whose learning rate alone is swept (e.g. `["expert_down"]`): the grid's LR is then written to
    /// `[param.groups.<name>] lr_scale`, a multiplier of those groups' rates, while every other group keeps
    /// the base's `[param] lr`. Empty (the default) sweeps the base LR of all groups. A per-group sweep
    /// asks which group's optimum moves along an axis.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lr_groups: Vec<String>,
}

fn default_seeds() -> Vec<u64> {
    vec![0]
}

/// Which loss the optimum is taken on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Final validation loss (language modelling: held-out text).
    #[default]
    ValLoss,
    /// Final training loss (tasks without a validation split).
    TrainLoss,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::ValLoss => "val_loss",
            Metric::TrainLoss => "train_loss",
        }
    }
}

/// How results are analysed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisConfig {
    pub metric: Metric,
    /// Half-width (log2 units) of the LR window around the best grid point that the parabola is fitted on.
    pub window: f64,
    /// Stability-edge guard (metric units; off when absent): points in the window above the best LR whose
    /// metric exceeds the best point's by more than this are left out of the fit, with every point beyond
    /// them ([`analysis::FitWindow::cliff`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cliff: Option<f64>,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig { metric: Metric::ValLoss, window: 2.0, cliff: None }
    }
}

impl AnalysisConfig {
    pub fn fit_window(&self) -> analysis::FitWindow {
        analysis::FitWindow { half_width: self.window, cliff: self.cliff }
    }
}

/// One point of the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GridPoint {
    /// Position in the fixed enumeration order (decides the shard).
    pub index: usize,
    pub preset: String,
    pub axis: Axis,
    pub size: usize,
    pub lr_log2: f64,
    pub seed: u64,
    pub init_scale: Option<f64>,
}

impl GridPoint {
    /// Stable, readable identifier: the folder name of the point's results. It depends only on the point's
    /// values, not on its index, so growing the grid keeps finished points finished.
    pub fn id(&self) -> String {
        let mut id =
            format!("{}-{}{:05}-lr{:+08.3}-s{}", self.preset, self.axis.name(), self.size, self.lr_log2, self.seed);
        if let Some(s) = self.init_scale {
            id.push_str(&format!("-init{s:.4}"));
        }
        id
    }

    pub fn lr(&self) -> f64 {
        self.lr_log2.exp2()
    }
}

/// Where the grid's values go in the trainer's TOML ([`crate::train::TrainConfig`]). One place, so a
/// renamed trainer field is one edit.
mod keys {
    pub const SEED: &[&str] = &["seed"];
    pub const PRESET: &[&str] = &["param", "preset"];
    pub const LR: &[&str] = &["param", "lr"];
    /// Sizes the parameterization was tuned at: must be fixed across the grid, or nothing scales.
    pub const PARAM_BASE: &[&str] = &["param", "base"];
    pub const INIT_SCALE: &[&str] = &["param", "sigma"];
    pub const WIDTH: &[&str] = &["model", "sizes", "width"];
    pub const DEPTH: &[&str] = &["model", "sizes", "depth"];
    pub const EXPERTS: &[&str] = &["model", "sizes", "experts"];
    pub const ACTIVE: &[&str] = &["model", "sizes", "active"];
    pub const EXPERT_HIDDEN: &[&str] = &["model", "sizes", "expert_hidden"];
}

/// Where a per-group LR multiplier goes: `[param.groups.<name>] lr_scale`.
fn group_lr_scale_key(name: &str) -> [&str; 4] {
    ["param", "groups", name, "lr_scale"]
}

fn get<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = table;
    for p in parents {
        t = t.get(*p)?.as_table()?;
    }
    t.get(*last)
}

fn set(table: &mut toml::Table, path: &[&str], value: toml::Value) -> Result<()> {
    let Some((last, parents)) = path.split_last() else {
        return Ok(());
    };
    let mut t = table;
    for p in parents {
        let entry = t.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| Error::invalid(format!("base.{}", path.join(".")), format!("`{p}` must be a table")))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

fn base_size(base: &toml::Table, path: &[&str]) -> Result<usize> {
    let field = format!("base.{}", path.join("."));
    let v = get(base, path).ok_or_else(|| Error::invalid(&field, "must be set: the sweep scales it"))?;
    v.as_integer()
        .filter(|&x| x > 0)
        .map(|x| x as usize)
        .ok_or_else(|| Error::invalid(&field, "must be a positive integer"))
}

/// The file names of `[base] include`: one string or a list of them.
fn include_paths(value: &toml::Value) -> Result<Vec<&str>> {
    let bad = || Error::invalid("base.include", "must be a file path or a list of file paths");
    match value {
        toml::Value::String(s) => Ok(vec![s.as_str()]),
        toml::Value::Array(items) => items.iter().map(|v| v.as_str().ok_or_else(bad)).collect(),
        _ => Err(bad()),
    }
}

/// Merges an included file's tables into `base` (`at` is the dotted path of `base`, for errors).
fn merge_include(base: &mut toml::Table, fragment: toml::Table, at: &str, file: &Path) -> Result<()> {
    for (key, value) in fragment {
        let field = format!("{at}.{key}");
        match (base.get_mut(&key), value) {
            (None, value) => {
                base.insert(key, value);
            }
            (Some(toml::Value::Table(inner)), toml::Value::Table(more)) => merge_include(inner, more, &field, file)?,
            (Some(_), _) => {
                return Err(Error::invalid(
                    field,
                    format!("is set both in the sweep config and in its include {}; set it in one place", file.display()),
                ))
            }
        }
    }
    Ok(())
}

fn toml_number(v: &toml::Value) -> Option<f64> {
    v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
}

fn to_toml_int(x: usize) -> toml::Value {
    toml::Value::Integer(x as i64)
}

impl Grid {
    /// A grid of one seed (0) and no init-scale axis; set the other fields directly to change that.
    pub fn new(axis: Axis, sizes: Vec<usize>, lr_log2: Vec<f64>, presets: &[&str]) -> Grid {
        Grid {
            axis,
            sizes,
            lr_log2,
            presets: presets.iter().map(|p| p.to_string()).collect(),
            seeds: default_seeds(),
            init_scales: Vec::new(),
            lr_groups: Vec::new(),
        }
    }
}

impl SweepConfig {
    /// A sweep around a train config built in Rust (e.g. in a notebook); validated like a file.
    pub fn from_train_config(base: &super::TrainConfig, grid: Grid) -> Result<SweepConfig> {
        let mut base = base.clone();
        // The per-group table is derived again for every point; a stale copy would only confuse.
        base.resolved = None;
        let table = toml::Table::try_from(&base)
            .map_err(|e| Error::Internal(format!("cannot turn the train config into TOML: {e}")))?;
        let cfg = SweepConfig { base: table, grid, analysis: AnalysisConfig::default() };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a sweep config from TOML (unknown keys rejected). `[base] include = ["a.toml", ...]` merges
    /// those files (paths relative to the config's folder) into `[base]` first, so that a set of settings
    /// shared by several sweeps (e.g. per-group LR multipliers) has one source. A key set both in the
    /// config and in an include, or in two includes, is refused rather than overridden: which one wins
    /// would be a silent choice. The resolved config is what the sweep records (`DIR/sweep.toml`, each
    /// run's `config.toml`), so moving settings into an include leaves existing results valid.
    pub fn from_file(path: &Path) -> Result<SweepConfig> {
        let text = crate::cli::read_text(path)?;
        let mut raw: toml::Table = crate::cli::parse_toml(&text, path)?;
        let include = raw.get_mut("base").and_then(|b| b.as_table_mut()).and_then(|b| b.remove("include"));
        let cfg: SweepConfig = match include {
            // No include: deserialize the text itself, whose errors carry line and column.
            None => crate::cli::parse_toml(&text, path)?,
            Some(files) => {
                let dir = path.parent().unwrap_or(Path::new("."));
                let base = raw
                    .get_mut("base")
                    .and_then(|b| b.as_table_mut())
                    .ok_or_else(|| Error::invalid("base", "must be a table"))?;
                for file in include_paths(&files)? {
                    let file = dir.join(file);
                    let fragment: toml::Table = crate::cli::read_toml(&file)?;
                    if fragment.contains_key("include") {
                        return Err(Error::invalid(
                            "base.include",
                            format!("{} has an `include` of its own; includes do not nest", file.display()),
                        ));
                    }
                    merge_include(base, fragment, "base", &file)?;
                }
                toml::Value::Table(raw)
                    .try_into()
                    .map_err(|e: toml::de::Error| Error::Parse { path: path.to_path_buf(), reason: e.to_string() })?
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let g = &self.grid;
        if g.sizes.is_empty() {
            return Err(Error::invalid("grid.sizes", "must list at least one size"));
        }
        if g.sizes.contains(&0) {
            return Err(Error::invalid("grid.sizes", "sizes must be positive"));
        }
        if g.lr_log2.is_empty() {
            return Err(Error::invalid("grid.lr_log2", "must list at least one log2 learning rate"));
        }
        if g.lr_log2.iter().any(|x| !x.is_finite()) {
            return Err(Error::invalid("grid.lr_log2", "values must be finite"));
        }
        if g.presets.is_empty() {
            return Err(Error::invalid("grid.presets", "must list at least one preset"));
        }
        if g.seeds.is_empty() {
            return Err(Error::invalid("grid.seeds", "must list at least one seed"));
        }
        if g.init_scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(Error::invalid("grid.init_scales", "values must be finite and positive"));
        }
        if !g.lr_groups.is_empty() {
            let mut seen = std::collections::HashSet::new();
            if let Some(dup) = g.lr_groups.iter().find(|n| !seen.insert(n.as_str())) {
                return Err(Error::invalid("grid.lr_groups", format!("group `{dup}` is listed twice")));
            }
            if get(&self.base, keys::LR).is_none() {
                return Err(Error::invalid(
                    format!("base.{}", keys::LR.join(".")),
                    "must be set when grid.lr_groups is: it is the rate of every group the grid does not sweep",
                ));
            }
            for name in &g.lr_groups {
                if get(&self.base, &group_lr_scale_key(name)).is_some() {
                    return Err(Error::invalid(
                        format!("base.param.groups.{name}.lr_scale"),
                        "is swept by grid.lr_groups; remove it from the base",
                    ));
                }
            }
        }
        if get(&self.base, keys::PARAM_BASE).is_none() {
            return Err(Error::invalid(
                format!("base.{}", keys::PARAM_BASE.join(".")),
                "must be set (the sizes the HPs are tuned at): without it every size is its own base and no \
                 preset scales anything",
            ));
        }
        if !(self.analysis.window.is_finite() && self.analysis.window > 0.0) {
            return Err(Error::invalid("analysis.window", "must be finite and positive (log2 units)"));
        }
        if self.analysis.cliff.is_some_and(|c| !(c.is_finite() && c > 0.0)) {
            return Err(Error::invalid("analysis.cliff", "must be finite and positive (a loss difference)"));
        }
        // Two points with one id would share a result folder.
        let points = self.enumerate();
        let mut ids = std::collections::HashSet::new();
        for p in &points {
            if !ids.insert(p.id()) {
                return Err(Error::invalid(
                    "grid",
                    format!("duplicate grid point `{}` (repeated value, or LRs closer than 0.001 in log2)", p.id()),
                ));
            }
        }
        for p in &points {
            self.point_config(p)?;
        }
        Ok(())
    }

    fn enumerate(&self) -> Vec<GridPoint> {
        let g = &self.grid;
        let scales: Vec<Option<f64>> =
            if g.init_scales.is_empty() { vec![None] } else { g.init_scales.iter().map(|&s| Some(s)).collect() };
        let mut points = Vec::new();
        for preset in &g.presets {
            for &size in &g.sizes {
                for &init_scale in &scales {
                    for &seed in &g.seeds {
                        for &lr_log2 in &g.lr_log2 {
                            points.push(GridPoint {
                                index: points.len(),
                                preset: preset.clone(),
                                axis: g.axis,
                                size,
                                lr_log2,
                                seed,
                                init_scale,
                            });
                        }
                    }
                }
            }
        }
        points
    }

    /// All grid points in the fixed order that sharding uses.
    pub fn points(&self) -> Result<Vec<GridPoint>> {
        self.validate()?;
        Ok(self.enumerate())
    }

    /// The parameterization table (with exponents per axis) of one point's training config.
    pub fn point_param_table(&self, p: &GridPoint) -> Result<crate::param::Table> {
        TrainRunner::parse(&self.point_config(p)?)?.param_table()
    }

    /// Whether this sweep trains exactly the networks of `other` (the same points up to the preset's name,
    /// the same configs and the same resolved hyperparameters at every point), as muP and moe-completep do
    /// along width: the two sweeps are then one experiment, whatever their presets are called.
    pub fn same_networks(&self, other: &SweepConfig) -> Result<bool> {
        let (mine, theirs) = (self.points()?, other.points()?);
        if mine.len() != theirs.len() {
            return Ok(false);
        }
        let key = |p: &GridPoint| (p.axis, p.size, p.lr_log2.to_bits(), p.seed, p.init_scale.map(f64::to_bits));
        let without_preset = |mut t: toml::Table| {
            if let Some(toml::Value::Table(param)) = t.get_mut("param") {
                param.remove("preset");
            }
            t
        };
        for (a, b) in mine.iter().zip(&theirs) {
            if key(a) != key(b) || without_preset(self.point_config(a)?) != without_preset(other.point_config(b)?) {
                return Ok(false);
            }
            let (mut x, y) = (self.point_param_table(a)?.to_resolved(), other.point_param_table(b)?.to_resolved());
            x.preset.clone_from(&y.preset);
            if x != y {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The training config of one point: the base with the point's preset, LR, seed, init scale and sizes.
    /// Along `width` the expert hidden size follows at the base's ratio n/N, and along `experts` the active
    /// count follows at the base's kappa; both must come out integer.
    pub fn point_config(&self, p: &GridPoint) -> Result<toml::Table> {
        let mut t = self.base.clone();
        set(&mut t, keys::SEED, toml::Value::Integer(p.seed as i64))?;
        set(&mut t, keys::PRESET, toml::Value::String(p.preset.clone()))?;
        if self.grid.lr_groups.is_empty() {
            set(&mut t, keys::LR, toml::Value::Float(p.lr()))?;
        }
        for name in &self.grid.lr_groups {
            set(&mut t, &group_lr_scale_key(name), toml::Value::Float(p.lr()))?;
        }
        if let Some(s) = p.init_scale {
            set(&mut t, keys::INIT_SCALE, toml::Value::Float(s))?;
        }
        // Only the sizes the axis moves (or that follow it) need to be in the base; the rest stay as they are.
        let pick = |key: &[&str]| base_size(&self.base, key);
        let ones = Sizes { width: 1, depth: 1, experts: 1, active: 1, expert_hidden: 1 };
        let base = match p.axis {
            Axis::Width => Sizes { width: pick(keys::WIDTH)?, expert_hidden: pick(keys::EXPERT_HIDDEN)?, ..ones },
            Axis::Experts => Sizes { experts: pick(keys::EXPERTS)?, active: pick(keys::ACTIVE)?, ..ones },
            Axis::Depth | Axis::ExpertHidden => ones,
        };
        let s = base.along(p.axis, p.size, "grid.sizes")?;
        let moved: &[(&[&str], usize)] = match p.axis {
            Axis::Width => &[(keys::WIDTH, s.width), (keys::EXPERT_HIDDEN, s.expert_hidden)],
            Axis::Depth => &[(keys::DEPTH, s.depth)],
            Axis::Experts => &[(keys::EXPERTS, s.experts), (keys::ACTIVE, s.active)],
            Axis::ExpertHidden => &[(keys::EXPERT_HIDDEN, s.expert_hidden)],
        };
        for &(key, value) in moved {
            set(&mut t, key, to_toml_int(value))?;
        }
        Ok(t)
    }
}

/// One shard of a sweep: `index` of `count` (written `i/n`, 0-based, as Slurm's `SLURM_ARRAY_TASK_ID`
/// and Kubernetes' `JOB_COMPLETION_INDEX` count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

impl Shard {
    pub fn new(index: usize, count: usize) -> Result<Shard> {
        if count == 0 {
            return Err(Error::invalid("shard", "the shard count n in i/n must be at least 1"));
        }
        if index >= count {
            return Err(Error::invalid(
                "shard",
                format!("index {index} must be below the count {count} (0-based i/n)"),
            ));
        }
        Ok(Shard { index, count })
    }

    pub fn takes(&self, point: &GridPoint) -> bool {
        point.index % self.count == self.index
    }
}

impl FromStr for Shard {
    type Err = Error;
    fn from_str(s: &str) -> Result<Shard> {
        let bad = || Error::invalid("shard", format!("`{s}` is not of the form i/n (e.g. 0/4)"));
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        Shard::new(i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    Ok,
    /// The loss became NaN or infinite; the run stopped there.
    Diverged,
}

/// What a runner reports for one grid point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: RunStatus,
    pub train_loss: Option<f64>,
    pub val_loss: Option<f64>,
    /// Optimizer steps taken (fewer than configured when the run diverged).
    pub steps: usize,
    /// Training tokens (or samples) seen.
    pub tokens: Option<u64>,
    /// Anything else the runner wants kept (e.g. the trainer's summary).
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// Runs one grid point. The sweep machinery is generic over it so that it can be tested on synthetic
/// objectives and reused with any trainer.
pub trait PointRunner: Sync {
    /// Rejects a point's config before anything runs (so a typo fails the sweep at once, not after hours).
    fn check(&self, _config: &toml::Table) -> Result<()> {
        Ok(())
    }
    /// Trains the point with `config`, writing any outputs into `dir` (an empty folder). Divergence is
    /// reported as `Ok` with [`RunStatus::Diverged`] (or as [`Error::Diverged`]). An input error (exit code
    /// 2: invalid config, missing corpus) stops the sweep; any other error marks the point failed: it gets
    /// no record, the sweep goes on, and the next sweep run retries it.
    fn run(&self, point: &GridPoint, config: &toml::Table, dir: &Path) -> Result<Outcome>;
}

impl<F> PointRunner for F
where
    F: Fn(&GridPoint, &toml::Table, &Path) -> Result<Outcome> + Sync,
{
    fn run(&self, point: &GridPoint, config: &toml::Table, dir: &Path) -> Result<Outcome> {
        self(point, config, dir)
    }
}

/// Runs grid points with the crate's trainer ([`crate::train::train`]): each point's outputs
/// (`config.toml`, `metrics.jsonl`, `summary.json`) land in its folder, and the trainer's summary is kept
/// in the record's `detail`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainRunner {
    /// Where the points train, overriding the base config's `device` (the sweep's grid and results do not
    /// depend on it; each point's `config.toml` records where it ran).
    pub device: Option<super::Device>,
}

impl TrainRunner {
    fn parse(config: &toml::Table) -> Result<super::TrainConfig> {
        let cfg: super::TrainConfig = toml::Value::Table(config.clone())
            .try_into()
            .map_err(|e| Error::invalid("base", format!("not a valid train config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }
}

impl PointRunner for TrainRunner {
    fn check(&self, config: &toml::Table) -> Result<()> {
        let cfg = Self::parse(config)?;
        // Resolving the parameterization catches sizes a preset rejects (e.g. k > M) before any run.
        cfg.resolve().map(|_| ())
    }

    fn run(&self, _point: &GridPoint, config: &toml::Table, dir: &Path) -> Result<Outcome> {
        let mut cfg = Self::parse(config)?;
        if let Some(device) = self.device {
            cfg.device = device;
        }
        let summary = super::train(&cfg, Some(dir), &mut super::NoObserver)?;
        let status = match summary.status {
            super::Status::Ok => RunStatus::Ok,
            super::Status::Diverged => RunStatus::Diverged,
        };
        let steps = summary.diverged_at.unwrap_or(summary.steps);
        let tokens = match (&cfg.model, cfg.optim.batch_size) {
            (super::ModelConfig::Transformer(m), Some(b)) => Some((steps * b * m.seq_len) as u64),
            _ => None,
        };
        Ok(Outcome {
            status,
            train_loss: summary.final_loss,
            val_loss: summary.final_val_loss,
            steps,
            tokens,
            detail: serde_json::to_value(&summary).unwrap_or(serde_json::Value::Null),
        })
    }
}

/// The record of one finished grid point (`DIR/runs/<id>/result.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub point: GridPoint,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// Wall time of the run in seconds.
    pub wall_s: f64,
    /// Shard that ran it and its process id (for tracing a result to a job log).
    pub shard: Shard,
    pub pid: u32,
}

impl RunRecord {
    pub fn metric(&self, metric: Metric) -> Option<f64> {
        match self.outcome.status {
            RunStatus::Diverged => None,
            RunStatus::Ok => match metric {
                Metric::ValLoss => self.outcome.val_loss,
                Metric::TrainLoss => self.outcome.train_loss,
            },
        }
    }
}

/// What one invocation of [`run_sweep`] did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    pub grid_points: usize,
    pub in_shard: usize,
    /// Points of this shard already done before this invocation (or finished meanwhile by another process).
    pub skipped: usize,
    pub ran: usize,
    pub diverged: usize,
    /// (id, error) of points that failed with an error other than divergence; they have no record.
    pub failed: Vec<(String, String)>,
    pub wall_s: f64,
}

pub fn runs_dir(out: &Path) -> PathBuf {
    out.join("runs")
}

/// The record file of a point; the point is done iff it exists.
pub fn record_path(out: &Path, point: &GridPoint) -> PathBuf {
    runs_dir(out).join(point.id()).join("result.json")
}

pub fn is_done(out: &Path, point: &GridPoint) -> bool {
    record_path(out, point).is_file()
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Write { path: path.to_path_buf(), source }
}

pub use crate::files::{unique_tag, write_atomic};

/// Checks `DIR/sweep.toml` against `cfg` (same `[base]` required) or writes it on the first run.
fn check_manifest(cfg: &SweepConfig, out: &Path) -> Result<()> {
    let path = out.join("sweep.toml");
    if path.is_file() {
        let old: SweepConfig = crate::cli::read_toml(&path)?;
        if old.base != cfg.base {
            return Err(Error::invalid(
                "base",
                format!(
                    "{} holds results of a sweep with a different [base] config (see {}); use a new --out",
                    out.display(),
                    path.display()
                ),
            ));
        }
        // Point ids do not name the swept groups, so records of another group's sweep would pass as ours.
        if old.grid.lr_groups != cfg.grid.lr_groups {
            return Err(Error::invalid(
                "grid.lr_groups",
                format!(
                    "{} holds results of a sweep of the LR of {:?} (see {}); use a new --out",
                    out.display(),
                    old.grid.lr_groups,
                    path.display()
                ),
            ));
        }
        if old == *cfg {
            return Ok(());
        }
    }
    let text = toml::to_string(cfg).map_err(|e| Error::Internal(format!("cannot serialise the sweep config: {e}")))?;
    write_atomic(&path, text.as_bytes())
}

/// Runs the points of `shard` that are not done yet, writing each result atomically, then writes the
/// summary of every record present. `progress` shows a bar on a terminal (never in a log file).
pub fn run_sweep(
    cfg: &SweepConfig,
    out: &Path,
    shard: Shard,
    runner: &dyn PointRunner,
    progress: bool,
) -> Result<SweepReport> {
    let start = Instant::now();
    let points = cfg.points()?;
    for p in &points {
        runner.check(&cfg.point_config(p)?)?;
    }
    let partial = runs_dir(out).join(".partial");
    std::fs::create_dir_all(&partial).map_err(write_err(&partial))?;
    check_manifest(cfg, out)?;

    let mine: Vec<&GridPoint> = points.iter().filter(|p| shard.takes(p)).collect();
    let bar = if progress { indicatif::ProgressBar::new(mine.len() as u64) } else { indicatif::ProgressBar::hidden() };
    if let Ok(style) = indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta}] {msg}") {
        bar.set_style(style);
    }
    let mut report = SweepReport {
        grid_points: points.len(),
        in_shard: mine.len(),
        skipped: 0,
        ran: 0,
        diverged: 0,
        failed: Vec::new(),
        wall_s: 0.0,
    };
    let pid = std::process::id();
    for p in mine {
        if is_done(out, p) {
            report.skipped += 1;
            bar.inc(1);
            continue;
        }
        let id = p.id();
        bar.set_message(id.clone());
        remove_stale_partials(&partial, &id);
        let tmp = partial.join(format!("{id}.{}", unique_tag()));
        std::fs::create_dir_all(&tmp).map_err(write_err(&tmp))?;
        let config = cfg.point_config(p)?;
        let t0 = Instant::now();
        let outcome = match runner.run(p, &config, &tmp) {
            Ok(o) => o,
            Err(Error::Diverged { step, reason }) => Outcome {
                status: RunStatus::Diverged,
                train_loss: None,
                val_loss: None,
                steps: step,
                tokens: None,
                detail: serde_json::json!({ "reason": reason }),
            },
            Err(e) if e.exit_code() == 2 => {
                // Bad input or a missing resource (e.g. no corpus) fails every point alike: stop now.
                let _ = std::fs::remove_dir_all(&tmp);
                bar.finish_and_clear();
                return Err(e);
            }
            Err(e) => {
                // A failed point leaves no record, so the next run of the sweep retries it.
                let _ = std::fs::remove_dir_all(&tmp);
                bar.println(format!("point {id} failed: {e}"));
                report.failed.push((id, e.to_string()));
                bar.inc(1);
                continue;
            }
        };
        let record =
            RunRecord { id: id.clone(), point: p.clone(), outcome, wall_s: t0.elapsed().as_secs_f64(), shard, pid };
        let json = serde_json::to_vec_pretty(&record)
            .map_err(|e| Error::Internal(format!("cannot serialise the record of {id}: {e}")))?;
        let rec_tmp = tmp.join("result.json");
        {
            let mut f = std::fs::File::create(&rec_tmp).map_err(write_err(&rec_tmp))?;
            f.write_all(&json).map_err(write_err(&rec_tmp))?;
            f.sync_all().map_err(write_err(&rec_tmp))?;
        }
        let dest = runs_dir(out).join(&id);
        match std::fs::rename(&tmp, &dest) {
            Ok(()) => {
                report.ran += 1;
                if record.outcome.status == RunStatus::Diverged {
                    report.diverged += 1;
                }
            }
            // Another process finished the same point first (e.g. one shard launched twice): keep its
            // result, drop ours, so each point has exactly one.
            Err(_) if dest.join("result.json").is_file() => {
                let _ = std::fs::remove_dir_all(&tmp);
                report.skipped += 1;
            }
            // Our folder vanished (a second copy of this shard cleaned it up as stale) or the filesystem
            // refused: the point stays undone and the next run retries it.
            Err(source) => {
                let _ = std::fs::remove_dir_all(&tmp);
                let e = Error::Write { path: dest, source };
                bar.println(format!("point {id} failed: {e}"));
                report.failed.push((id, e.to_string()));
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    // The records are the product; a summary that cannot be written (e.g. no fonts for the figures on a
    // compute node) must not turn a finished shard into a failed one. It can be rebuilt later.
    if let Err(e) = summarize(cfg, out).and_then(|summary| write_summary(&summary, out)) {
        eprintln!(
            "warning: the summary of {} was not fully written ({e}); rebuild it with --summary-only",
            out.display()
        );
    }
    report.wall_s = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Removes folders of a point left by killed runs (`<id>.<tag>`, see [`unique_tag`]).
fn remove_stale_partials(partial: &Path, id: &str) {
    let Ok(entries) = std::fs::read_dir(partial) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(id).and_then(|r| r.strip_prefix('.')) {
            if rest.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Reads every record under `DIR/runs`, keyed by id.
pub fn read_records(out: &Path) -> Result<BTreeMap<String, RunRecord>> {
    let dir = runs_dir(out);
    let mut records = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(records) };
    for e in entries.flatten() {
        let path = e.path().join("result.json");
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
        let rec: RunRecord =
            serde_json::from_str(&text).map_err(|e| Error::Parse { path: path.clone(), reason: e.to_string() })?;
        records.insert(rec.id.clone(), rec);
    }
    Ok(records)
}

/// Optimum and LR curve of one size under one preset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SizeAnalysis {
    pub size: usize,
    pub curve: Vec<LrPoint>,
    pub optimum: Option<Optimum>,
}

/// All sizes of one preset (and init scale, when the grid sweeps it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PresetAnalysis {
    pub preset: String,
    pub init_scale: Option<f64>,
    pub sizes: Vec<SizeAnalysis>,
    pub drift: Option<Drift>,
    /// Sum of the wall times of this preset's finished runs (seconds).
    pub wall_s: f64,
}

impl PresetAnalysis {
    /// Label for tables and legends: the preset, with its init scale when swept.
    pub fn label(&self) -> String {
        match self.init_scale {
            Some(s) => format!("{} (init x{s})", self.preset),
            None => self.preset.clone(),
        }
    }
}

/// Everything known about a sweep from the records present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSummary {
    pub axis: Axis,
    pub metric: Metric,
    pub window: f64,
    /// The fit's stability-edge guard ([`AnalysisConfig::cliff`]; absent in summaries written without it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cliff: Option<f64>,
    pub grid_points: usize,
    pub done: usize,
    pub diverged: usize,
    /// Ids of grid points without a record yet.
    pub missing: Vec<String>,
    pub presets: Vec<PresetAnalysis>,
    /// Training tokens of a finished (not diverged) run: the sweep's fixed budget (`None` if unknown).
    #[serde(default)]
    pub tokens_per_run: Option<u64>,
    /// Sum of the wall times of all finished runs (seconds).
    #[serde(default)]
    pub wall_s: f64,
    /// Records of the current grid's points, in grid order.
    pub runs: Vec<RunRecord>,
    /// The groups whose LR alone was swept ([`Grid::lr_groups`]; empty: the base LR of all groups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lr_groups: Vec<String>,
    /// With `lr_groups`: the base LR every other group kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_lr: Option<f64>,
}

/// Aggregates the records of `cfg`'s grid found under `out` (records of points no longer in the grid
/// are ignored) and fits the optimum LR per size and its drift per preset.
pub fn summarize(cfg: &SweepConfig, out: &Path) -> Result<SweepSummary> {
    let points = cfg.points()?;
    let records = read_records(out)?;
    let g = &cfg.grid;
    let metric = cfg.analysis.metric;
    let runs: Vec<RunRecord> = points.iter().filter_map(|p| records.get(&p.id()).cloned()).collect();
    let missing: Vec<String> = points.iter().map(|p| p.id()).filter(|id| !records.contains_key(id)).collect();
    let scales: Vec<Option<f64>> =
        if g.init_scales.is_empty() { vec![None] } else { g.init_scales.iter().map(|&s| Some(s)).collect() };
    let mut presets = Vec::new();
    for preset in &g.presets {
        for &init_scale in &scales {
            let mine: Vec<&RunRecord> =
                runs.iter().filter(|r| &r.point.preset == preset && r.point.init_scale == init_scale).collect();
            let mut sizes = Vec::new();
            for &size in &g.sizes {
                let curve: Vec<LrPoint> = g
                    .lr_log2
                    .iter()
                    .map(|&lr| {
                        let cell: Vec<&&RunRecord> =
                            mine.iter().filter(|r| r.point.size == size && r.point.lr_log2 == lr).collect();
                        lr_point(lr, &cell, metric)
                    })
                    .filter(|p| p.seeds > 0)
                    .collect();
                let optimum = analysis::fit_optimum(&curve, cfg.analysis.fit_window());
                sizes.push(SizeAnalysis { size, curve, optimum });
            }
            let optima: Vec<(usize, Optimum)> = sizes.iter().filter_map(|s| s.optimum.map(|o| (s.size, o))).collect();
            presets.push(PresetAnalysis {
                preset: preset.clone(),
                init_scale,
                drift: analysis::drift(&optima),
                wall_s: mine.iter().map(|r| r.wall_s).sum(),
                sizes,
            });
        }
    }
    Ok(SweepSummary {
        axis: g.axis,
        metric,
        window: cfg.analysis.window,
        cliff: cfg.analysis.cliff,
        grid_points: points.len(),
        done: runs.len(),
        diverged: runs.iter().filter(|r| r.outcome.status == RunStatus::Diverged).count(),
        missing,
        presets,
        tokens_per_run: runs.iter().filter(|r| r.outcome.status == RunStatus::Ok).find_map(|r| r.outcome.tokens),
        wall_s: runs.iter().map(|r| r.wall_s).sum(),
        runs,
        lr_groups: g.lr_groups.clone(),
        base_lr: if g.lr_groups.is_empty() { None } else { get(&cfg.base, keys::LR).and_then(toml_number) },
    })
}

fn lr_point(lr_log2: f64, cell: &[&&RunRecord], metric: Metric) -> LrPoint {
    let values: Vec<Option<f64>> = cell.iter().map(|r| r.metric(metric)).collect();
    LrPoint::from_seeds(lr_log2, &values)
}

fn fmt_opt(x: Option<f64>, digits: usize) -> String {
    x.map_or_else(|| "n/a".to_string(), |v| format!("{v:.digits$}"))
}

impl SweepSummary {
    pub fn fit_window(&self) -> analysis::FitWindow {
        analysis::FitWindow { half_width: self.window, cliff: self.cliff }
    }

    /// What the LR axis is: `log2 LR`, or `log2 LR scale of <groups>` for a per-group sweep.
    pub fn lr_name(&self) -> String {
        if self.lr_groups.is_empty() {
            "log2 LR".into()
        } else {
            format!("log2 LR scale of {}", self.lr_groups.join(", "))
        }
    }

    /// A preset's label in tables and legends, naming the swept groups of a per-group sweep.
    pub fn preset_label(&self, p: &PresetAnalysis) -> String {
        if self.lr_groups.is_empty() {
            p.label()
        } else {
            format!("{} (LR of {})", p.label(), self.lr_groups.join(", "))
        }
    }

    /// The summary as a Markdown report: optimum per size, drift per preset, and the loss table.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let axis = self.axis.name();
        s.push_str(&format!("# LR sweep along `{axis}` ({})\n\n", self.metric.name()));
        if !self.lr_groups.is_empty() {
            s.push_str(&format!(
                "Only the learning rate of {} is swept: the grid's LR multiplies its rate as the preset scales \
                 it (`lr_scale`), and every other group keeps the base LR {}. Optimum and drift below are of \
                 that multiplier.\n\n",
                self.lr_groups.iter().map(|g| format!("`{g}`")).collect::<Vec<_>>().join(", "),
                self.base_lr.map_or_else(|| "of the base config".into(), |lr| format!("2^{:.3}", lr.log2()))
            ));
        }
        let lr_name = self.lr_name();
        s.push_str(&format!(
            "{} of {} grid points done ({} diverged, {} missing). Optimum: vertex of a parabola in {lr_name} \
             fitted within +-{} log2 of the best grid point{}; +- is one standard deviation (n/a: exact \
             3-point fit or optimum on the grid edge).\n\n",
            self.done,
            self.grid_points,
            self.diverged,
            self.missing.len(),
            self.window,
            self.cliff.map_or_else(String::new, |c| format!(
                ", up to a stability edge (points at a higher LR than the best whose {} exceeds the best's by \
                 more than {c}, and those beyond them, are left out)",
                self.metric.name()
            ))
        ));
        s.push_str("## Optimum LR per size\n\n");
        s.push_str(&format!(
            "| preset | {axis} | optimum {lr_name} | +- | method | bracketed | {} at optimum |\n",
            self.metric.name()
        ));
        s.push_str("| --- | ---: | ---: | ---: | --- | --- | ---: |\n");
        for p in &self.presets {
            for z in &p.sizes {
                match &z.optimum {
                    Some(o) => s.push_str(&format!(
                        "| {} | {} | {:.3} | {} | {} | {} | {:.4} |\n",
                        self.preset_label(p),
                        z.size,
                        o.lr_log2,
                        fmt_opt(o.std, 3),
                        match o.method {
                            analysis::FitMethod::Parabola => "parabola",
                            analysis::FitMethod::GridArgmin => "grid argmin",
                        },
                        if o.bracketed { "yes" } else { "no" },
                        o.loss
                    )),
                    None => s.push_str(&format!(
                        "| {} | {} | n/a | | no finite run | | |\n",
                        self.preset_label(p),
                        z.size
                    )),
                }
            }
        }
        s.push_str("\n## Drift of the optimum across sizes (log2 units)\n\n");
        s.push_str("| preset | sizes | doublings | range (max - min) | +- | per doubling | +- | all bracketed | run wall time |\n");
        s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |\n");
        for p in &self.presets {
            match &p.drift {
                Some(d) => s.push_str(&format!(
                    "| {} | {} | {:.1} | {:.3} | {} | {:+.3} | {} | {} | {:.1} s |\n",
                    self.preset_label(p),
                    d.sizes,
                    d.doublings,
                    d.range,
                    fmt_opt(d.range_std, 3),
                    d.per_doubling,
                    fmt_opt(d.per_doubling_std, 3),
                    if d.all_bracketed { "yes" } else { "no" },
                    p.wall_s
                )),
                None => s.push_str(&format!("| {} | <2 | | n/a | | | | | {:.1} s |\n", self.preset_label(p), p.wall_s)),
            }
        }
        s.push_str(&format!("\n## {} per (size, {lr_name})\n\n", self.metric.name()));
        s.push_str("Mean over seeds; `div`: at least one seed diverged; blank: not run yet.\n\n");
        let mut lrs: Vec<f64> =
            self.presets.iter().flat_map(|p| p.sizes.iter().flat_map(|z| z.curve.iter().map(|c| c.lr_log2))).collect();
        lrs.sort_by(f64::total_cmp);
        lrs.dedup();
        s.push_str(&format!("| preset | {axis} |"));
        for lr in &lrs {
            s.push_str(&format!(" {lr} |"));
        }
        s.push_str("\n| --- | ---: |");
        s.push_str(&" ---: |".repeat(lrs.len()));
        s.push('\n');
        for p in &self.presets {
            for z in &p.sizes {
                s.push_str(&format!("| {} | {} |", self.preset_label(p), z.size));
                for lr in &lrs {
                    let cell = z.curve.iter().find(|c| c.lr_log2 == *lr);
                    let text = match cell {
                        None => String::new(),
                        Some(c) if c.diverged > 0 => "div".to_string(),
                        Some(c) => fmt_opt(c.loss, 4),
                    };
                    s.push_str(&format!(" {text} |"));
                }
                s.push('\n');
            }
        }
        s
    }
}

/// The drift the same curves give with a 3-point parabola at each size's best grid point (window = the
/// curve's finest LR step). A check on the main fit: its wider window can straddle the cliff above the
/// optimum on one size and not on the next. `None` with fewer than two sizes.
pub fn three_point_drift(p: &PresetAnalysis) -> Option<Drift> {
    let optima: Vec<(usize, Optimum)> = p
        .sizes
        .iter()
        .filter_map(|z| {
            let mut lrs: Vec<f64> = z.curve.iter().map(|c| c.lr_log2).collect();
            lrs.sort_by(f64::total_cmp);
            let step = lrs.windows(2).map(|w| w[1] - w[0]).filter(|d| *d > 0.0).fold(f64::INFINITY, f64::min);
            analysis::fit_optimum(&z.curve, if step.is_finite() { step } else { 0.0 }).map(|o| (z.size, o))
        })
        .collect();
    analysis::drift(&optima)
}

/// The drift over every size but the smallest: does the optimum settle once past the bottom of the axis?
/// Finite-size corrections (1/L along depth, k^(-1/2) along experts) are largest at the smallest size, so a
/// drift confined to its first step is the signature of an optimum converging to its limit, while a drift
/// that goes on is one the parameterization misses. `None` with fewer than three sizes or a missing optimum.
pub fn drift_past_smallest(p: &PresetAnalysis) -> Option<Drift> {
    let mut optima: Vec<(usize, Optimum)> = p.sizes.iter().filter_map(|z| z.optimum.map(|o| (z.size, o))).collect();
    if optima.len() < 3 || optima.len() < p.sizes.len() {
        return None;
    }
    optima.sort_by_key(|o| o.0);
    analysis::drift(&optima[1..])
}

/// Resamples of the seed bootstrap in the transfer table (a few milliseconds per row).
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// HP transfer across several sweeps (one per axis, or one per (axis, preset)): one row per (axis, preset)
/// with the optimum log2 LR of every size, the drift across the axis, and whether the drift stays within
/// `tolerance` log2 units (the acceptance for MoE-CompleteP is 0.5): `yes` when the drift plus one standard
/// deviation is within it, `no` when the drift minus one standard deviation exceeds it, `undecided`
/// otherwise or when an optimum is missing or sits on the edge of the grid; `undecided (fit window)` when
/// [`three_point_drift`] puts the drift on the other side of `tolerance`. A further column gives the
/// [`analysis::bootstrap_drift`] over seeds: percentiles of the drift and the share of resamples within
/// `tolerance` (`n/a` with one seed); another the [`drift_past_smallest`].
pub fn transfer_markdown(summaries: &[(String, SweepSummary)], tolerance: f64) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "| sweep | axis | preset | tokens per run | optimum log2 LR per size (+- 1 sd) | drift max - min | per doubling | drift, 3-point check | within {tolerance} | drift without the smallest size | seed bootstrap: drift 16 / 50 / 84%, share within {tolerance} | cost: loss at the largest size at the smallest's optimum minus its best (bootstrap 16 / 50 / 84%) | runs (diverged) / grid | run wall time |\n"
    ));
    s.push_str("| --- | --- | --- | ---: | --- | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: |\n");
    for (name, sum) in summaries {
        for p in &sum.presets {
            let optima: Vec<String> = p
                .sizes
                .iter()
                .map(|z| match &z.optimum {
                    Some(o) => format!(
                        "{}: {:.2}{}{}",
                        z.size,
                        o.lr_log2,
                        o.std.map_or_else(String::new, |sd| format!(" +- {sd:.2}")),
                        if o.bracketed { "" } else { " (edge)" }
                    ),
                    None => format!("{}: n/a", z.size),
                })
                .collect();
            let complete = p.sizes.iter().all(|z| z.optimum.is_some());
            let check = three_point_drift(p).map(|c| c.range);
            let (drift, slope, verdict) = match &p.drift {
                Some(d) => (
                    format!("{:.2}{}", d.range, d.range_std.map_or_else(String::new, |sd| format!(" +- {sd:.2}"))),
                    format!(
                        "{:+.2}{}",
                        d.per_doubling,
                        d.per_doubling_std.map_or_else(String::new, |sd| format!(" +- {sd:.2}"))
                    ),
                    {
                        let sd = d.range_std.unwrap_or(0.0);
                        // A verdict must survive the change of fit window; if the check lands on the other
                        // side of the tolerance, the answer depends on the estimator, not on the data.
                        let check_agrees = |within: bool| check.is_none_or(|c| (c <= tolerance) == within);
                        if !complete || !d.all_bracketed {
                            "undecided (edge)"
                        } else if d.range + sd <= tolerance {
                            if check_agrees(true) { "yes" } else { "undecided (fit window)" }
                        } else if d.range - sd > tolerance {
                            if check_agrees(false) { "no" } else { "undecided (fit window)" }
                        } else {
                            "undecided (1 sd)"
                        }
                    },
                ),
                None => ("n/a".into(), "n/a".into(), "undecided"),
            };
            let check = check.map_or_else(|| "n/a".into(), |c| format!("{c:.2}"));
            let past_smallest = drift_past_smallest(p).map_or_else(
                || "n/a".into(),
                |d| format!("{:.2}{}", d.range, d.range_std.map_or_else(String::new, |sd| format!(" +- {sd:.2}"))),
            );
            let runs: Vec<&RunRecord> =
                sum.runs.iter().filter(|r| r.point.preset == p.preset && r.point.init_scale == p.init_scale).collect();
            let diverged = runs.iter().filter(|r| r.outcome.status == RunStatus::Diverged).count();
            let grid = sum.grid_points / sum.presets.len().max(1);
            let seed_runs: Vec<SeedRun> = runs
                .iter()
                .map(|r| SeedRun {
                    size: r.point.size,
                    lr_log2: r.point.lr_log2,
                    seed: r.point.seed,
                    loss: r.metric(sum.metric),
                })
                .collect();
            let bootstrap = analysis::bootstrap_drift(&seed_runs, sum.fit_window(), tolerance, BOOTSTRAP_RESAMPLES, 0);
            let boot = match &bootstrap {
                Some(b) => format!(
                    "{:.2} / {:.2} / {:.2}, {:.2} ({} seeds)",
                    b.range[0], b.range[1], b.range[2], b.within, b.seeds
                ),
                None => "n/a".into(),
            };
            let cost = transfer_cost_cell(p, sum.window, bootstrap.and_then(|b| b.cost));
            s.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {drift} | {slope} | {check} | {verdict} | {past_smallest} | {boot} | {cost} | {} ({diverged}) / {grid} | {:.0} s |\n",
                sum.axis.name(),
                sum.preset_label(p),
                sum.tokens_per_run.map_or_else(|| "n/a".into(), |t| t.to_string()),
                optima.join("; "),
                runs.len(),
                p.wall_s
            ));
        }
    }
    s
}

/// The transfer table's cost cell: [`analysis::transfer_cost`] from the smallest size to the largest, then
/// the seed bootstrap's 16 / 50 / 84% of it when there are seeds to resample; `~` marks a cost interpolated
/// between grid points (an upper bound), `n/a` a missing or edge optimum at either end or a source optimum
/// off the largest size's grid.
fn transfer_cost_cell(p: &PresetAnalysis, window: f64, bootstrap: Option<[f64; 3]>) -> String {
    let ends = p.sizes.iter().min_by_key(|z| z.size).zip(p.sizes.iter().max_by_key(|z| z.size));
    let cost = ends.filter(|(a, b)| a.size < b.size).and_then(|(small, large)| {
        let (from, to) = (small.optimum.filter(|o| o.bracketed)?, large.optimum.filter(|o| o.bracketed)?);
        analysis::transfer_cost(&from, &large.curve, &to, window)
    });
    match cost {
        Some(c) => format!(
            "{}{:.4}{}",
            if c.method == analysis::FitMethod::Parabola { "" } else { "~" },
            c.cost,
            bootstrap.map_or_else(String::new, |b| format!(" ({:.4} / {:.4} / {:.4})", b[0], b[1], b[2]))
        ),
        None => "n/a".into(),
    }
}

/// Reads the `summary.json` of each sweep folder in `dirs`, writes `<out>/transfer.md` (the table of
/// [`transfer_markdown`]) and the figures of [`figures::write_transfer_figures`]; returns the summaries.
pub fn collect(dirs: &[PathBuf], out: &Path, tolerance: f64) -> Result<Vec<SweepSummary>> {
    let mut summaries = Vec::new();
    for d in dirs {
        let path = d.join("summary.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Read { path: path.clone(), source })?;
        let sum: SweepSummary =
            serde_json::from_str(&text).map_err(|e| Error::Parse { path: path.clone(), reason: e.to_string() })?;
        summaries.push(sum);
    }
    std::fs::create_dir_all(out).map_err(write_err(out))?;
    let mut md = String::from("# HP transfer: optimum learning rate across sizes\n\n");
    md.push_str(&format!(
        "Optimum: vertex of a parabola of the final loss in log2 LR near the best grid point, +- one standard \
         deviation from the fit; `(edge)`: the best LR is at the end of the grid (drift undecided). Drift \
         in log2 units across the whole range of each axis. Sweeps: {}.\n\n",
        dirs.iter().map(|d| format!("`{}`", d.display())).collect::<Vec<_>>().join(", ")
    ));
    let named: Vec<(String, SweepSummary)> = dirs
        .iter()
        .zip(&summaries)
        .map(|(d, s)| (d.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()), s.clone()))
        .collect();
    md.push_str(&transfer_markdown(&named, tolerance));
    write_atomic(&out.join("transfer.md"), md.as_bytes())?;
    figures::write_transfer_figures(&named, out)?;
    Ok(summaries)
}

/// Writes `DIR/summary.json` and `DIR/summary.md` atomically, and the figures under `DIR/figures/`.
pub fn write_summary(summary: &SweepSummary, out: &Path) -> Result<()> {
    let json = serde_json::to_vec_pretty(summary)
        .map_err(|e| Error::Internal(format!("cannot serialise the summary: {e}")))?;
    write_atomic(&out.join("summary.json"), &json)?;
    write_atomic(&out.join("summary.md"), summary.markdown().as_bytes())?;
    figures::write_sweep_figures(summary, &out.join("figures"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `[base]` of the test sweeps (tables of their own may follow it).
    const BASE: &str = r#"
            [base]
            seed = 0
            steps = 10
            [base.model.sizes]
            width = 32
            depth = 2
            experts = 8
            active = 2
            expert_hidden = 64
            [base.param]
            preset = "sp"
            lr = 0.001
            base = { width = 32, depth = 2, experts = 8, active = 2, expert_hidden = 64 }
            "#;

    fn config(extra_grid: &str) -> SweepConfig {
        let text = format!(
            r#"{BASE}
            [grid]
            axis = "width"
            sizes = [32, 64]
            lr_log2 = [-8, -7, -6, -5, -4]
            presets = ["moe-completep", "sp"]
            {extra_grid}
            "#
        );
        let cfg: SweepConfig = toml::from_str(&text).unwrap();
        cfg.validate().unwrap();
        cfg
    }

    /// A synthetic objective whose optimum is known: log2 LR* = -6 - 0.5 log2(size/32) under `sp` and
    /// -6 under `moe-completep`.
    fn synthetic(p: &GridPoint, _c: &toml::Table, _d: &Path) -> Result<Outcome> {
        let shift = if p.preset == "sp" { -0.5 * (p.size as f64 / 32.0).log2() } else { 0.0 };
        let x = p.lr_log2 - (-6.0 + shift);
        let loss = 1.0 + 0.05 * x * x + 0.001 * p.seed as f64;
        let diverged = p.lr_log2 >= -4.0 && p.size == 64;
        Ok(Outcome {
            status: if diverged { RunStatus::Diverged } else { RunStatus::Ok },
            train_loss: Some(loss),
            val_loss: (!diverged).then_some(loss),
            steps: 10,
            tokens: Some(100),
            detail: serde_json::Value::Null,
        })
    }

    #[test]
    fn point_configs_scale_the_right_fields() {
        let cfg = config("");
        let pts = cfg.points().unwrap();
        assert_eq!(pts.len(), 2 * 2 * 5);
        let p = pts.iter().find(|p| p.size == 64 && p.lr_log2 == -7.0 && p.preset == "sp").unwrap();
        let t = cfg.point_config(p).unwrap();
        assert_eq!(get(&t, keys::WIDTH).unwrap().as_integer(), Some(64));
        assert_eq!(get(&t, keys::EXPERT_HIDDEN).unwrap().as_integer(), Some(128));
        assert_eq!(get(&t, keys::EXPERTS).unwrap().as_integer(), Some(8));
        assert_eq!(get(&t, keys::LR).unwrap().as_float(), Some(2f64.powi(-7)));
        assert_eq!(get(&t, keys::PRESET).unwrap().as_str(), Some("sp"));
        assert_eq!(p.id(), "sp-width00064-lr-007.000-s0");

        let mut cfg = config("");
        cfg.grid.axis = Axis::Experts;
        cfg.grid.sizes = vec![8, 16, 64];
        let p = &cfg.points().unwrap()[5];
        assert_eq!(p.size, 16);
        let t = cfg.point_config(p).unwrap();
        assert_eq!(get(&t, keys::ACTIVE).unwrap().as_integer(), Some(4));
        cfg.grid.sizes = vec![8, 10];
        let err = cfg.validate().unwrap_err();
        assert!(err.to_string().contains("non-integer active"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn bad_grids_are_rejected_with_the_field_named() {
        let mut cfg = config("");
        cfg.grid.lr_log2 = vec![-3.0, f64::NAN];
        assert!(cfg.validate().unwrap_err().to_string().contains("grid.lr_log2"));
        let mut cfg = config("");
        cfg.grid.sizes = vec![32, 32];
        assert!(cfg.validate().unwrap_err().to_string().contains("duplicate grid point"));
        let mut cfg = config("");
        cfg.base.remove("model");
        assert!(cfg.validate().unwrap_err().to_string().contains("base.model.sizes.width"));
        let mut cfg = config("");
        cfg.base.get_mut("param").unwrap().as_table_mut().unwrap().remove("base");
        assert!(cfg.validate().unwrap_err().to_string().contains("base.param.base"));
        for bad in [0.0, -0.5, f64::INFINITY] {
            let mut cfg = config("");
            cfg.analysis.cliff = Some(bad);
            let e = cfg.validate().unwrap_err();
            assert!(e.to_string().contains("analysis.cliff") && e.exit_code() == 2, "{bad}: {e}");
        }
        let text = "[base]\n[grid]\naxis = \"width\"\nsizes = [1]\nlr_log2 = [0]\npresets = [\"sp\"]\nlrs = [1]\n";
        assert!(toml::from_str::<SweepConfig>(text).is_err(), "unknown keys must be rejected");
    }

    #[test]
    fn shards_partition_the_grid() {
        let cfg = config("seeds = [0, 1, 2]");
        let pts = cfg.points().unwrap();
        for n in 1..=7 {
            let mut count = vec![0; pts.len()];
            for i in 0..n {
                let shard: Shard = format!("{i}/{n}").parse().unwrap();
                for p in pts.iter().filter(|p| shard.takes(p)) {
                    count[p.index] += 1;
                }
            }
            assert!(count.iter().all(|&c| c == 1), "n = {n}");
        }
        for bad in ["3/3", "1", "a/2", "0/0", "-1/2"] {
            let e = bad.parse::<Shard>().unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn sweep_runs_each_point_once_and_finds_known_optima() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config("seeds = [0, 1]");
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let counting = |p: &GridPoint, c: &toml::Table, d: &Path| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::fs::write(d.join("metrics.jsonl"), "{}\n").unwrap();
            synthetic(p, c, d)
        };
        // Two shards, then both again: the second pass must run nothing.
        let r0 = run_sweep(&cfg, dir.path(), Shard::new(0, 2).unwrap(), &counting, false).unwrap();
        let r1 = run_sweep(&cfg, dir.path(), Shard::new(1, 2).unwrap(), &counting, false).unwrap();
        assert_eq!(r0.ran + r1.ran, 40);
        assert_eq!(r0.in_shard, 20);
        // Width 64 at log2 LR -4 diverges: 2 presets x 2 seeds.
        assert_eq!(r0.diverged + r1.diverged, 4);
        let again = run_sweep(&cfg, dir.path(), Shard::default(), &counting, false).unwrap();
        assert_eq!((again.ran, again.skipped), (0, 40));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 40);
        assert!(dir.path().join("runs/sp-width00032-lr-006.000-s1/metrics.jsonl").is_file());
        let leftovers = std::fs::read_dir(dir.path().join("runs/.partial")).unwrap().count();
        assert_eq!(leftovers, 0);

        let summary: SweepSummary =
            serde_json::from_slice(&std::fs::read(dir.path().join("summary.json")).unwrap()).unwrap();
        assert_eq!((summary.done, summary.diverged), (40, 4));
        assert!(summary.missing.is_empty());
        let opt = |preset: &str, size: usize| {
            let p = summary.presets.iter().find(|p| p.preset == preset).unwrap();
            p.sizes.iter().find(|s| s.size == size).unwrap().optimum.unwrap()
        };
        assert!((opt("moe-completep", 32).lr_log2 + 6.0).abs() < 1e-6);
        assert!((opt("sp", 64).lr_log2 + 6.5).abs() < 1e-6);
        let sp = summary.presets.iter().find(|p| p.preset == "sp").unwrap().drift.unwrap();
        assert!((sp.per_doubling + 0.5).abs() < 1e-6);
        let md = std::fs::read_to_string(dir.path().join("summary.md")).unwrap();
        assert!(md.contains("| sp | 64 | -6.500 |"), "{md}");
        assert!(md.contains("div"));
    }

    #[test]
    fn failed_points_get_no_record_and_are_retried() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config("");
        let flaky = |p: &GridPoint, c: &toml::Table, d: &Path| {
            if p.lr_log2 == -5.0 {
                Err(Error::Internal("disk full".into()))
            } else {
                synthetic(p, c, d)
            }
        };
        let r = run_sweep(&cfg, dir.path(), Shard::default(), &flaky, false).unwrap();
        assert_eq!((r.ran, r.failed.len()), (16, 4));
        let r = run_sweep(&cfg, dir.path(), Shard::default(), &synthetic, false).unwrap();
        assert_eq!((r.ran, r.skipped, r.failed.len()), (4, 16, 0));
        // Divergence reported as an error is recorded like a diverged outcome.
        let dir = tempfile::tempdir().unwrap();
        let blows_up = |_: &GridPoint, _: &toml::Table, _: &Path| -> Result<Outcome> {
            Err(Error::Diverged { step: 3, reason: "loss is NaN".into() })
        };
        let r = run_sweep(&cfg, dir.path(), Shard::default(), &blows_up, false).unwrap();
        assert_eq!((r.ran, r.diverged), (20, 20));
    }

    #[test]
    fn included_settings_resolve_to_the_inline_config_and_clashes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let inline = &format!(
            r#"{BASE}
            [base.param.groups.expert_down]
            lr_scale = 4.0
            [base.param.groups.router]
            lr_scale = 0.5

            [grid]
            axis = "width"
            sizes = [32, 64]
            lr_log2 = [-8, -7]
            presets = ["sp"]
            "#
        );
        std::fs::write(dir.path().join("inline.toml"), inline).unwrap();
        std::fs::create_dir(dir.path().join("shared")).unwrap();
        std::fs::write(dir.path().join("shared/down.toml"), "[param.groups.expert_down]\nlr_scale = 4.0\n").unwrap();
        std::fs::write(dir.path().join("shared/router.toml"), "[param.groups.router]\nlr_scale = 0.5\n").unwrap();
        let without = |text: &str| {
            text.replace("[base.param.groups.expert_down]\n            lr_scale = 4.0\n", "")
                .replace("[base.param.groups.router]\n            lr_scale = 0.5\n", "")
        };
        let included = without(inline)
            .replace("[base]\n", "[base]\ninclude = [\"shared/down.toml\", \"shared/router.toml\"]\n");
        std::fs::write(dir.path().join("included.toml"), &included).unwrap();
        let a = SweepConfig::from_file(&dir.path().join("inline.toml")).unwrap();
        let b = SweepConfig::from_file(&dir.path().join("included.toml")).unwrap();
        assert_eq!(a, b);
        assert!(b.base.get("include").is_none(), "the resolved config records values, not file names");
        // Results of the inline form stay valid when its settings move into an include.
        run_sweep(&a, dir.path().join("out").as_path(), Shard::default(), &synthetic, false).unwrap();
        let r = run_sweep(&b, dir.path().join("out").as_path(), Shard::default(), &synthetic, false).unwrap();
        assert_eq!((r.ran, r.skipped), (0, 4));

        // The same key in the config and in an include: refused, naming the field and the file.
        let clash = inline.replace("[base]\n", "[base]\ninclude = \"shared/down.toml\"\n");
        std::fs::write(dir.path().join("clash.toml"), clash).unwrap();
        let e = SweepConfig::from_file(&dir.path().join("clash.toml")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        assert!(msg.contains("base.param.groups.expert_down.lr_scale") && msg.contains("down.toml"), "{msg}");

        // A missing include and a malformed one are input errors too.
        let missing = without(inline).replace("[base]\n", "[base]\ninclude = [\"shared/nope.toml\"]\n");
        std::fs::write(dir.path().join("missing.toml"), missing).unwrap();
        let e = SweepConfig::from_file(&dir.path().join("missing.toml")).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("nope.toml"), "{e}");
        let malformed = without(inline).replace("[base]\n", "[base]\ninclude = 3\n");
        std::fs::write(dir.path().join("malformed.toml"), malformed).unwrap();
        let e = SweepConfig::from_file(&dir.path().join("malformed.toml")).unwrap_err();
        assert!(e.to_string().contains("base.include"), "{e}");
    }

    #[test]
    fn a_different_base_in_the_same_folder_is_refused_but_the_grid_may_grow() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config("");
        run_sweep(&cfg, dir.path(), Shard::default(), &synthetic, false).unwrap();
        let mut grown = cfg.clone();
        grown.grid.lr_log2.push(-3.0);
        let r = run_sweep(&grown, dir.path(), Shard::default(), &synthetic, false).unwrap();
        assert_eq!((r.ran, r.skipped), (4, 20));
        let mut other = cfg.clone();
        other.base.insert("steps".into(), toml::Value::Integer(11));
        let e = run_sweep(&other, dir.path(), Shard::default(), &synthetic, false).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("different [base]"));
    }

    #[test]
    fn a_per_group_lr_sweep_moves_only_that_groups_rate() {
        // A base the trainer accepts (the other tests' runners never parse it).
        let mut cfg = config("lr_groups = [\"expert_down\"]");
        let extra: toml::Table = toml::from_str(
            "model = { arch = \"transformer\", vocab = 16, seq_len = 8, n_head = 2 }\n\
             optim = { batch_size = 4 }\n\
             data = { kind = \"markov\", vocab_size = 16, branching = 3, length = 4000 }",
        )
        .unwrap();
        for (section, fields) in extra {
            let t = cfg.base.entry(section).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            t.as_table_mut().unwrap().extend(fields.as_table().unwrap().clone());
        }
        let pts = cfg.points().unwrap();
        let at = |lr: f64| pts.iter().find(|p| p.size == 64 && p.lr_log2 == lr && p.preset == "moe-completep").unwrap();
        let t = cfg.point_config(at(-7.0)).unwrap();
        assert_eq!(get(&t, keys::LR).unwrap().as_float(), Some(0.001), "the base LR stays");
        assert_eq!(get(&t, &group_lr_scale_key("expert_down")).unwrap().as_float(), Some(2f64.powi(-7)));
        // One step up the grid doubles expert_down's resolved rate and leaves every other group's alone.
        let (lo, hi) = (cfg.point_param_table(at(-7.0)).unwrap(), cfg.point_param_table(at(-6.0)).unwrap());
        for (a, b) in lo.groups.iter().zip(&hi.groups) {
            let want = if a.name == "expert_down" { 2.0 } else { 1.0 };
            assert!((b.lr / a.lr - want).abs() < 1e-12, "{}: {} -> {}", a.name, a.lr, b.lr);
        }

        let mut typo = cfg.clone();
        typo.grid.lr_groups = vec!["expert_dwon".into()];
        let e = typo.point_param_table(at(-7.0)).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("expert_dwon"), "{e}");
        let mut twice = cfg.clone();
        twice.grid.lr_groups = vec!["router".into(), "router".into()];
        assert!(twice.validate().unwrap_err().to_string().contains("grid.lr_groups"));
        let mut no_lr = cfg.clone();
        no_lr.base.get_mut("param").unwrap().as_table_mut().unwrap().remove("lr");
        assert!(no_lr.validate().unwrap_err().to_string().contains("base.param.lr"));

        // Records of one group's sweep must not pass for another's: the ids do not name the groups.
        let dir = tempfile::tempdir().unwrap();
        run_sweep(&cfg, dir.path(), Shard::default(), &synthetic, false).unwrap();
        let sum = summarize(&cfg, dir.path()).unwrap();
        assert_eq!(sum.base_lr, Some(0.001));
        let md = sum.markdown();
        assert!(md.contains("Only the learning rate of `expert_down`"), "{md}");
        assert!(md.contains("optimum log2 LR scale of expert_down"), "{md}");
        assert!(transfer_markdown(&[("g".into(), sum)], 0.5).contains("moe-completep (LR of expert_down)"));
        let mut other = cfg.clone();
        other.grid.lr_groups = vec!["expert_up".into()];
        let e = run_sweep(&other, dir.path(), Shard::default(), &synthetic, false).unwrap_err();
        assert!(e.to_string().contains("grid.lr_groups"), "{e}");
        let mut all = cfg.clone();
        all.grid.lr_groups.clear();
        assert!(run_sweep(&all, dir.path(), Shard::default(), &synthetic, false).is_err());
    }

    #[test]
    fn collected_transfer_report_gives_verdicts_per_axis_and_preset() {
        let root = tempfile::tempdir().unwrap();
        let mut dirs = Vec::new();
        for axis in [Axis::Width, Axis::ExpertHidden] {
            let mut cfg = config("");
            cfg.grid.axis = axis;
            cfg.grid.sizes = vec![32, 64, 128];
            let dir = root.path().join(axis.name());
            run_sweep(&cfg, &dir, Shard::default(), &synthetic, false).unwrap();
            dirs.push(dir);
        }
        let out = root.path().join("transfer");
        let sums = collect(&dirs, &out, 0.5).unwrap();
        assert_eq!(sums.len(), 2);
        assert_eq!(sums[0].tokens_per_run, Some(100));
        let md = std::fs::read_to_string(out.join("transfer.md")).unwrap();
        let row = |axis: &str, preset: &str| -> Vec<String> {
            // The sweep column names the folder (here the axis).
            let line = md.lines().find(|l| l.starts_with(&format!("| {axis} | {axis} | {preset} |"))).unwrap();
            line.split('|').map(|c| c.trim().to_string()).collect()
        };
        // Columns: 5 optima, 6 drift, 7 per doubling, 8 the 3-point check, 9 verdict. moe-completep: optimum
        // -6 at every size; sp: -6, -6.5, -7 (drift 1.0 > 0.5). Exact parabolas: the check agrees.
        let r = row("width", "moe-completep");
        assert!(r[6].starts_with("0.00") && r[7].starts_with("+0.00") && r[8] == "0.00" && r[9] == "yes", "{md}");
        let r = row("expert_hidden", "sp");
        assert!(r[6].starts_with("1.00") && r[7].starts_with("-0.50") && r[8] == "1.00" && r[9] == "no", "{md}");
        assert!(row("width", "sp")[5].contains("128: -7.00"), "{md}");
        // Column 10: the drift over 64 and 128 alone, half of sp's (the optimum goes on moving) and none of
        // moe-completep's.
        assert!(row("expert_hidden", "sp")[10].starts_with("0.50"), "{md}");
        assert!(row("width", "moe-completep")[10].starts_with("0.00"), "{md}");
        // Column 11, the seed bootstrap, needs two seeds; these sweeps have one.
        assert_eq!(row("width", "sp")[11], "n/a", "{md}");
        // Column 12: what the drift costs. sp at 128 trained at 32's optimum, one log2 unit off: 0.05 x 1^2.
        assert_eq!(row("expert_hidden", "sp")[12], "0.0500", "{md}");
        assert_eq!(row("width", "moe-completep")[12], "0.0000", "{md}");
        for f in ["transfer_lr_curves.png", "transfer_lr_curves.svg", "transfer_drift.png"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let e = collect(&[root.path().join("nothing")], &out, 0.5).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn the_three_point_check_sees_past_a_cliff_that_biases_the_wide_fit() {
        // Size 8: loss (x + 6)^2, no cliff. Size 64: (x + 6.4)^2 up to log2 LR -5, then a cliff (training
        // breaks down), which the +-2 window takes in and the 3-point fit at the best point does not.
        let curve = |vertex: f64, cliff: bool| -> Vec<LrPoint> {
            (-11..=-3)
                .map(|x| {
                    let x = x as f64;
                    let loss = if cliff && x >= -4.0 { 10.0 } else { (x - vertex).powi(2) };
                    LrPoint { lr_log2: x, loss: Some(loss), stderr: None, seeds: 1, diverged: 0 }
                })
                .collect()
        };
        let sizes: Vec<SizeAnalysis> = [(8, -6.0, false), (64, -6.4, true)]
            .into_iter()
            .map(|(size, v, cliff)| {
                let curve = curve(v, cliff);
                let optimum = analysis::fit_optimum(&curve, 2.0);
                SizeAnalysis { size, curve, optimum }
            })
            .collect();
        let wide = sizes[1].optimum.unwrap().lr_log2;
        assert!((wide + 6.4).abs() > 0.05, "the +-2 fit should be biased by the cliff, got {wide}");
        let p = PresetAnalysis { preset: "moe-completep".into(), init_scale: None, sizes, drift: None, wall_s: 0.0 };
        let check = three_point_drift(&p).unwrap();
        assert!((check.range - 0.4).abs() < 1e-9, "{check:?}");
    }

    #[test]
    fn a_sweep_built_in_rust_matches_its_file_form() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/train_transformer_markov_tiny.toml");
        let mut train = crate::train::TrainConfig::from_file(&path).unwrap();
        let base = train.model.sizes();
        train.param.base = Some(base);
        let grid = Grid::new(Axis::Experts, vec![8, 16], vec![-8.0, -7.0], &["moe-completep", "mup"]);
        let cfg = SweepConfig::from_train_config(&train, grid).unwrap();
        let points = cfg.points().unwrap();
        assert_eq!(points.len(), 8);
        let t = cfg.point_config(&points[3]).unwrap();
        assert_eq!(get(&t, keys::EXPERTS).unwrap().as_integer(), Some(16));
        assert_eq!(get(&t, keys::ACTIVE).unwrap().as_integer(), Some(4));
        // Every point is a train config the trainer accepts, and a file round trip changes nothing.
        for p in &points {
            TrainRunner::default().check(&cfg.point_config(p).unwrap()).unwrap();
        }
        let back: SweepConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
        train.param.base = None;
        let grid = Grid::new(Axis::Experts, vec![8], vec![-8.0], &["sp"]);
        assert!(SweepConfig::from_train_config(&train, grid).unwrap_err().to_string().contains("base.param.base"));
    }

    #[test]
    fn stale_partial_folders_of_killed_runs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config("");
        let id = cfg.points().unwrap()[0].id();
        let stale = runs_dir(dir.path()).join(".partial").join(format!("{id}.99999-00000000deadbeef"));
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("metrics.jsonl"), "half").unwrap();
        run_sweep(&cfg, dir.path(), Shard::default(), &synthetic, false).unwrap();
        assert!(!stale.exists());
    }
}
