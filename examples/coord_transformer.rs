//! Coordinate checks of the MoE-Transformer (issue 5): writes one `CoordResult` JSON per check to
//! `validation/coord/transformer_<preset>_<optimizer>_<axis>.json` and all tables to
//! `validation/coord/transformer_tables.md`.
//!
//!   cargo run --release --example coord_transformer                 # the standard set (below)
//!   cargo run --release --example coord_transformer -- OUT PRESET OPT AXIS [SIZES] [SEEDS] [STEPS]
//!
//! Standard set (16x spans, 8 seeds, 5 full-batch steps, lr 0.01): moe-completep, sp and mup with Adam
//! along width (N = 32..512, n follows N), and moe-completep with Adam along depth (L = 2..32), experts
//! (M = 8..256 at kappa = 1/4; M = 4 would give k = 1, where the renormalized gate is constant and the
//! router gets no gradient) and expert_hidden (n = 32..512). Base N = 32, L = 2, M = 8, k = 2, n = 32,
//! 4 heads; 8 sequences of 16 tokens of a seeded Markov chain (vocabulary 32, 3 successors per token).

use std::path::PathBuf;
use std::time::Instant;

use moe_dmft::check::coord::{CoordSpec, RouterInit};
use moe_dmft::check::run_transformer::{run_and_write, table_markdown, TransformerCoordSetup};
use moe_dmft::param::{Axis, Optimizer, Sizes};

fn spec(preset: &str, optimizer: Optimizer, axis: Axis, values: Vec<usize>, seeds: usize, steps: usize) -> CoordSpec {
    CoordSpec {
        axis,
        preset: preset.into(),
        optimizer,
        values,
        seeds,
        steps,
        lr: if optimizer == Optimizer::Adam { 0.01 } else { 0.05 },
        base: Sizes { width: 32, depth: 2, experts: 8, active: 2, expert_hidden: 32 },
        router_init: RouterInit::Preset,
        tolerance: 0.15,
    }
}

/// Seeds of the standard set (the whole set takes about a minute on 2 cores).
const SEEDS: usize = 8;

fn default_values(axis: Axis) -> Vec<usize> {
    match axis {
        Axis::Width | Axis::ExpertHidden => vec![32, 64, 128, 256, 512],
        Axis::Depth => vec![2, 4, 8, 16, 32],
        Axis::Experts => vec![8, 16, 32, 64, 128, 256],
    }
}

fn parse_axis(s: &str) -> Result<Axis, String> {
    Axis::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| format!("axis: unknown `{s}`"))
}

fn main() {
    moe_dmft::set_blas_single_threaded();
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (out, specs) = if args.is_empty() {
        let mut v = Vec::new();
        for preset in ["moe-completep", "sp", "mup"] {
            v.push(spec(preset, Optimizer::Adam, Axis::Width, default_values(Axis::Width), SEEDS, 5));
        }
        for axis in [Axis::Depth, Axis::Experts, Axis::ExpertHidden] {
            v.push(spec("moe-completep", Optimizer::Adam, axis, default_values(axis), SEEDS, 5));
        }
        (PathBuf::from("validation/coord"), v)
    } else {
        if args.len() < 4 {
            return Err("usage: coord_transformer OUT PRESET OPT AXIS [SIZES] [SEEDS] [STEPS]".into());
        }
        let optimizer = match args[2].as_str() {
            "adam" => Optimizer::Adam,
            "sgd" => Optimizer::Sgd,
            o => return Err(format!("optimizer: unknown `{o}`")),
        };
        let axis = parse_axis(&args[3])?;
        let values = match args.get(4) {
            Some(s) => s.split(',').map(|t| t.trim().parse().map_err(|_| format!("sizes: `{t}` is not an integer"))).collect::<Result<_, _>>()?,
            None => default_values(axis),
        };
        let num = |i: usize, d: usize, f: &str| args.get(i).map_or(Ok(d), |s| s.parse().map_err(|_| format!("{f}: `{s}` is not an integer")));
        (PathBuf::from(&args[0]), vec![spec(&args[1], optimizer, axis, values, num(5, 3, "seeds")?, num(6, 5, "steps")?)])
    };
    let mut tables = String::new();
    for s in specs {
        let t0 = Instant::now();
        let setup = TransformerCoordSetup::new(s);
        let (r, path) = run_and_write(&setup, &out).map_err(|e| e.to_string())?;
        let t = table_markdown(&r);
        println!("{t}\n({:.1} s, {})\n", t0.elapsed().as_secs_f64(), path.display());
        tables.push_str(&t);
        tables.push('\n');
    }
    if args.is_empty() {
        let path = out.join("transformer_tables.md");
        std::fs::write(&path, tables).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}
