//! `moe-dmft coord-check`: coordinate checks of the MoE-ResNet (default) or the MoE-Transformer
//! (`--model transformer`, attention groups included) along one axis or all four, for any preset and SGD
//! or Adam, plus the router-initialization ablation; prints Markdown tables and writes one JSON result per
//! check (the input of `moe-dmft figures` and of validation/REPORT.md).

use std::path::PathBuf;

use crate::check::coord::{CoordResult, CoordSpec, RouterInit};
use crate::check::run::{run_coord, CoordSetup};
use crate::check::run_transformer::{self, TransformerCoordSetup};
use crate::param::{Axis, Form, Optimizer, Sizes};
use crate::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// resnet (the MoE-ResNet on a teacher task) or transformer (the MoE-Transformer on a seeded
    /// Markov token sequence: attention, router and expert groups).
    #[arg(long, default_value = "resnet")]
    pub model: String,
    /// width, depth, experts, expert_hidden, or all.
    #[arg(long, default_value = "all")]
    pub axis: String,
    /// sp, mup, completep or moe-completep.
    #[arg(long, default_value = "moe-completep")]
    pub preset: String,
    /// sgd or adam.
    #[arg(long, default_value = "adam")]
    pub optimizer: String,
    /// Comma-separated sizes along the axis (default: 8x or 16x above the base; one axis only).
    #[arg(long)]
    pub sizes: Option<String>,
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Base learning rate (default 0.01 for Adam, 0.05 for SGD).
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f64>,
    /// preset, hidden_like, readout_like or zero.
    #[arg(long, default_value = "preset")]
    pub router_init: String,
    /// Run the router-initialization ablation instead: all four router inits along width at fixed
    /// experts, for the chosen optimizer.
    #[arg(long)]
    pub ablation: bool,
    /// RMS norm in front of every MoE block.
    #[arg(long)]
    pub norm: bool,
    /// Mean-field form of the parameterization (SGD, moe-completep only).
    #[arg(long)]
    pub mean_field: bool,
    /// Router init constant of the preset (readout-like std = sigma_router / N).
    #[arg(long, default_value_t = 1.0)]
    pub sigma_router: f64,
    /// Tolerance on |measured - predicted| slope.
    #[arg(long, default_value_t = 0.15)]
    pub tolerance: f64,
    /// Base sizes: N0, L0, M0, k0, n0.
    #[arg(long, default_value_t = 32)]
    pub base_width: usize,
    #[arg(long, default_value_t = 2)]
    pub base_depth: usize,
    #[arg(long, default_value_t = 8)]
    pub base_experts: usize,
    #[arg(long, default_value_t = 2)]
    pub base_active: usize,
    #[arg(long, default_value_t = 32)]
    pub base_expert_hidden: usize,
    /// Training points P and input dimension D of the task.
    #[arg(long, default_value_t = 16)]
    pub points: usize,
    #[arg(long, default_value_t = 8)]
    pub input_dim: usize,
    /// Folder for the JSON results (one file per check) and `tables.md`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the JSON results instead of the tables.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_axis(s: &str) -> Result<Vec<Axis>> {
    match s {
        "all" => Ok(Axis::ALL.to_vec()),
        _ => Axis::from_name(s)
            .map(|a| vec![a])
            .ok_or_else(|| Error::invalid("axis", format!("unknown axis `{s}`; expected width, depth, experts, expert_hidden or all"))),
    }
}

pub fn parse_optimizer(s: &str) -> Result<Optimizer> {
    match s {
        "sgd" => Ok(Optimizer::Sgd),
        "adam" => Ok(Optimizer::Adam),
        _ => Err(Error::invalid("optimizer", format!("unknown optimizer `{s}`; expected sgd or adam"))),
    }
}

/// Default sizes along each axis from the base: 8x for width, depth and expert_hidden, 16x for experts
/// (five points, so the finite-size fit `a + b k^(-c)` keeps two degrees of freedom).
pub fn default_values(axis: Axis, base: &Sizes) -> Vec<usize> {
    match axis {
        Axis::Width => (0..4).map(|i| base.width << i).collect(),
        Axis::Depth => (0..4).map(|i| base.depth << i).collect(),
        Axis::Experts => {
            let start = (base.experts / base.active).max(1);
            (0..5).map(|i| start << i).collect()
        }
        Axis::ExpertHidden => (0..4).map(|i| base.expert_hidden << i).collect(),
    }
}

/// The setups this invocation asks for.
pub fn setups(args: &Args) -> Result<Vec<CoordSetup>> {
    let optimizer = parse_optimizer(&args.optimizer)?;
    let router_init = RouterInit::from_name(&args.router_init).ok_or_else(|| {
        Error::invalid("router_init", format!("unknown `{}`; expected preset, hidden_like, readout_like or zero", args.router_init))
    })?;
    let base = Sizes {
        width: args.base_width,
        depth: args.base_depth,
        experts: args.base_experts,
        active: args.base_active,
        expert_hidden: args.base_expert_hidden,
    };
    for (f, v) in [
        ("base_width", base.width),
        ("base_depth", base.depth),
        ("base_experts", base.experts),
        ("base_active", base.active),
        ("base_expert_hidden", base.expert_hidden),
    ] {
        if v == 0 {
            return Err(Error::invalid(f, "must be at least 1"));
        }
    }
    if base.active > base.experts {
        return Err(Error::invalid("base_active", "must not exceed base_experts"));
    }
    if !(args.sigma_router.is_finite() && args.sigma_router >= 0.0) {
        return Err(Error::invalid("sigma_router", "must be finite and non-negative"));
    }
    let lr = args.lr.unwrap_or(if optimizer == Optimizer::Adam { 0.01 } else { 0.05 });
    let explicit: Option<Vec<usize>> = match &args.sizes {
        None => None,
        Some(s) => Some(
            s.split(',')
                .map(|t| t.trim().parse::<usize>().map_err(|_| Error::invalid("sizes", format!("`{t}` is not a positive integer"))))
                .collect::<Result<_>>()?,
        ),
    };
    let (axes, inits): (Vec<Axis>, Vec<RouterInit>) = if args.ablation {
        (vec![Axis::Width], vec![RouterInit::HiddenLike, RouterInit::ReadoutLike, RouterInit::Zero])
    } else {
        (parse_axis(&args.axis)?, vec![router_init])
    };
    if explicit.is_some() && axes.len() > 1 {
        return Err(Error::invalid("sizes", "applies to one axis; pass --axis as well"));
    }
    let mut out = Vec::new();
    for &axis in &axes {
        for &init in &inits {
            let spec = CoordSpec {
                axis,
                preset: args.preset.clone(),
                optimizer,
                values: explicit.clone().unwrap_or_else(|| default_values(axis, &base)),
                seeds: args.seeds,
                steps: args.steps,
                lr,
                base,
                router_init: init,
                tolerance: args.tolerance,
            };
            let mut setup = CoordSetup::new(spec);
            setup.norm = args.norm;
            setup.form = if args.mean_field { Form::MeanField } else { Form::Standard };
            setup.sigma_router = args.sigma_router;
            setup.task.points = args.points;
            setup.task.input_dim = args.input_dim;
            setup.spec.validate()?;
            setup.task.validate()?;
            out.push(setup);
        }
    }
    Ok(out)
}

/// File name of a result: `<preset>_<optimizer>_<axis>[_<router_init>].json`.
pub fn result_file(r: &CoordResult) -> String {
    format!("{}.json", r.label().replace('/', "_"))
}

pub use crate::files::write_json;

/// Which model a check runs on.
enum Check {
    ResNet(CoordSetup),
    Transformer(TransformerCoordSetup),
}

/// The checks this invocation asks for: [`setups`], on the model `--model` names.
fn checks(args: &Args) -> Result<Vec<Check>> {
    match args.model.as_str() {
        "resnet" => Ok(setups(args)?.into_iter().map(Check::ResNet).collect()),
        "transformer" => {
            // The transformer is pre-norm in standard form and has its own token task.
            if args.norm {
                return Err(Error::invalid("norm", "the transformer always has its pre-norms; --norm is for the resnet"));
            }
            if args.mean_field {
                return Err(Error::invalid("mean_field", "the mean-field form is checked on the resnet only"));
            }
            setups(args)?
                .into_iter()
                .map(|s| {
                    let mut t = TransformerCoordSetup::new(s.spec);
                    t.sigma_router = args.sigma_router;
                    t.validate()?;
                    Ok(Check::Transformer(t))
                })
                .collect()
        }
        other => Err(Error::invalid("model", format!("unknown model `{other}`; expected resnet or transformer"))),
    }
}

pub fn run(args: Args) -> Result<()> {
    let checks = checks(&args)?;
    let mut tables = String::new();
    let mut results = Vec::new();
    for check in &checks {
        let (r, file, t) = match check {
            Check::ResNet(setup) => {
                let r = run_coord(setup)?;
                let (file, t) = (result_file(&r), r.table());
                (r, file, t)
            }
            Check::Transformer(setup) => {
                let r = run_transformer::run_coord_transformer(setup)?;
                let (file, t) = (run_transformer::result_file(&r), run_transformer::table_markdown(&r));
                (r, file, t)
            }
        };
        if !args.json {
            println!("{t}");
        }
        tables.push_str(&t);
        tables.push('\n');
        if let Some(dir) = &args.out {
            write_json(&dir.join(file), &r)?;
        }
        results.push(r);
    }
    if let Some(dir) = &args.out {
        let prefix = if args.model == "transformer" { "transformer_" } else { "" };
        let name = if args.ablation { "tables_ablation.md" } else { "tables.md" };
        let path = dir.join(format!("{prefix}{name}"));
        std::fs::write(&path, tables).map_err(|source| Error::Write { path, source })?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&results).map_err(|e| Error::Internal(e.to_string()))?);
    }
    Ok(())
}
