//! `moe-dmft param`: the per-group hyperparameters of a parameterization at given sizes, from flags or
//! from a TOML file (`[sizes]` and `[param]`), printed as a table, JSON, Markdown or PyTorch param groups.

use std::path::PathBuf;

use serde::Deserialize;

use crate::param::format::{render, Format};
use crate::param::{Optimizer, ParamConfig, Sizes};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Width N (n_embd).
    #[arg(long, allow_negative_numbers = true)]
    pub width: Option<i64>,
    /// Depth L (blocks).
    #[arg(long, allow_negative_numbers = true)]
    pub depth: Option<i64>,
    /// Number of experts M.
    #[arg(long, allow_negative_numbers = true)]
    pub experts: Option<i64>,
    /// Active experts per token k.
    #[arg(long, allow_negative_numbers = true)]
    pub active: Option<i64>,
    /// Expert hidden size n.
    #[arg(long, allow_negative_numbers = true)]
    pub expert_hidden: Option<i64>,
    /// Base width N0 (where the HPs were tuned); each base size defaults to the target size.
    #[arg(long, allow_negative_numbers = true)]
    pub base_width: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub base_depth: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub base_experts: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub base_active: Option<i64>,
    #[arg(long, allow_negative_numbers = true)]
    pub base_expert_hidden: Option<i64>,
    /// sp, mup, completep or moe-completep.
    #[arg(long)]
    pub preset: Option<String>,
    /// sgd or adam.
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Learning rate at the base sizes (default 1).
    #[arg(long, allow_hyphen_values = true)]
    pub lr: Option<f64>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// TOML file with `[sizes]` and `[param]`; flags given as well override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Sizes as written in a file: signed, so that a negative size gets a message naming the field.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct SizesInput {
    width: Option<i64>,
    depth: Option<i64>,
    experts: Option<i64>,
    active: Option<i64>,
    expert_hidden: Option<i64>,
}

/// A config file for `param`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ParamFile {
    sizes: SizesInput,
    param: ParamConfig,
}

fn size(field: &str, v: Option<i64>) -> crate::Result<usize> {
    match v {
        None => Err(crate::Error::invalid(field, "is required (a flag or the config's [sizes] section)")),
        Some(v) if v < 1 => Err(crate::Error::invalid(field, format!("must be at least 1, got {v}"))),
        Some(v) => usize::try_from(v).map_err(|_| crate::Error::invalid(field, format!("too large: {v}"))),
    }
}

/// Parses an optimizer name as given on the command line.
pub fn parse_optimizer(name: &str) -> crate::Result<Optimizer> {
    match name {
        "sgd" => Ok(Optimizer::Sgd),
        "adam" => Ok(Optimizer::Adam),
        other => Err(crate::Error::invalid("optimizer", format!("unknown optimizer `{other}`; expected sgd or adam"))),
    }
}

/// Merges the file (if any) and the flags into a config and target sizes.
pub fn build(args: &Args) -> crate::Result<(ParamConfig, Sizes)> {
    let file: ParamFile = match &args.config {
        Some(path) => crate::cli::read_toml(path)?,
        None => ParamFile::default(),
    };
    let mut cfg = file.param;
    let s = file.sizes;
    let sizes = Sizes {
        width: size("width", args.width.or(s.width))?,
        depth: size("depth", args.depth.or(s.depth))?,
        experts: size("experts", args.experts.or(s.experts))?,
        active: size("active", args.active.or(s.active))?,
        expert_hidden: size("expert_hidden", args.expert_hidden.or(s.expert_hidden))?,
    };
    let base_flags = [args.base_width, args.base_depth, args.base_experts, args.base_active, args.base_expert_hidden];
    if base_flags.iter().any(Option::is_some) {
        let fallback = cfg.base.unwrap_or(sizes);
        let pick = |field: &str, flag: Option<i64>, default: usize| -> crate::Result<usize> {
            match flag {
                Some(v) => size(field, Some(v)),
                None => Ok(default),
            }
        };
        cfg.base = Some(Sizes {
            width: pick("base.width", args.base_width, fallback.width)?,
            depth: pick("base.depth", args.base_depth, fallback.depth)?,
            experts: pick("base.experts", args.base_experts, fallback.experts)?,
            active: pick("base.active", args.base_active, fallback.active)?,
            expert_hidden: pick("base.expert_hidden", args.base_expert_hidden, fallback.expert_hidden)?,
        });
    }
    if let Some(p) = &args.preset {
        cfg.preset = p.clone();
    }
    if let Some(o) = &args.optimizer {
        cfg.optimizer = parse_optimizer(o)?;
    }
    if let Some(lr) = args.lr {
        cfg.lr = lr;
    }
    Ok((cfg, sizes))
}

pub fn run(args: Args) -> crate::Result<()> {
    let (cfg, sizes) = build(&args)?;
    let table = cfg.resolve_table(&sizes)?;
    print!("{}", render(&table, args.format)?);
    Ok(())
}
