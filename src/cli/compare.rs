//! `moe-dmft compare`: the DMFT solution against finite MoE-ResNets at growing (N, M, n) on the same task
//! (loss curves, final kernel, routing thresholds, expert-load distribution), with the gaps' fitted
//! rates. Writes `compare.json`, `table.md` and the curves as `.npy` for other tools, and each finished
//! run as `runs/*.json` (so `--resume` continues an interrupted compare).

use std::path::PathBuf;

use ndarray::Array2;

use crate::check::compare::{run_compare_with, Antithetic, CompareSpec, RunStore};
use crate::dmft::SolveConfig;
use crate::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Solver config (TOML, as for `moe-dmft solve`); default: the SPEC §4 task, kappa = 1/4, 20 steps.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Finite ladder as N:M:n triples, comma-separated.
    #[arg(long, default_value = "128:32:32,256:64:64,512:128:128,1024:256:256")]
    pub ladder: String,
    /// Seed groups per size (each group is 1, 2 or 4 training runs, see --antithetic).
    #[arg(long, default_value_t = 3)]
    pub seeds: usize,
    /// Seed groups of each ladder size, comma-separated (overrides --seeds; small sizes are cheap).
    #[arg(long)]
    pub seeds_per_size: Option<String>,
    /// Antithetic seed groups: `off` (independent seeds), `readout` (each seed also run with the readout
    /// negated, f0 -> -f0) or `readout+down` (2 x 2 with the expert down-projections negated too). All
    /// keep the seed-mean unbiased; `readout` gave the smallest variance per training run (see
    /// validation/compare/table.md).
    #[arg(long, default_value = "readout")]
    pub antithetic: String,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Richardson-extrapolate the DMFT loss to infinite neuron samples (2 L(n_s) - L(n_s/2)), removing
    /// the solver's O(1/n_s) bias from the reference the gaps are measured against.
    #[arg(long)]
    pub dmft_extrapolate: bool,
    /// Control variates: subtract from each seed group's loss curve its cross-fitted linear response to
    /// mean-zero statistics of the initial embedding and readout (docs/theory.md, "Control variates").
    /// Unbiased; removes most of the seed noise of the gaps. Needs a one-output task.
    #[arg(long)]
    pub control_variates: bool,
    /// Reuse the finished runs in OUT/runs/ (same solver config required).
    #[arg(long)]
    pub resume: bool,
}

fn parse_seeds(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<usize>()
                .map_err(|_| Error::invalid("seeds-per-size", format!("`{t}` is not a positive integer")))
        })
        .collect()
}

pub fn parse_ladder(s: &str) -> Result<Vec<(usize, usize, usize)>> {
    s.split(',')
        .map(|t| {
            let parts: Vec<&str> = t.trim().split(':').collect();
            let num = |x: &str| {
                x.parse::<usize>()
                    .map_err(|_| Error::invalid("ladder", format!("`{t}` is not N:M:n with positive integers")))
            };
            match parts.as_slice() {
                [a, b, c] => Ok((num(a)?, num(b)?, num(c)?)),
                _ => Err(Error::invalid("ladder", format!("`{t}` is not N:M:n"))),
            }
        })
        .collect()
}

pub fn run(args: Args) -> Result<()> {
    let solve = match &args.config {
        Some(path) => {
            let text = super::read_text(path)?;
            SolveConfig::from_toml_str(&text)?
        }
        None => SolveConfig::default(),
    };
    let mut spec = CompareSpec::new(solve, parse_ladder(&args.ladder)?, args.seeds);
    spec.seeds_per_size = args.seeds_per_size.as_deref().map(parse_seeds).transpose()?;
    spec.antithetic = args.antithetic.parse::<Antithetic>()?;
    spec.dmft_extrapolate = args.dmft_extrapolate;
    spec.control_variates = args.control_variates;
    if args.resume && args.out.is_none() {
        return Err(Error::invalid("resume", "needs --out (the runs to resume are in OUT/runs/)"));
    }
    let store = args.out.as_ref().map(|d| RunStore { dir: d.join("runs"), resume: args.resume });
    let r = run_compare_with(&spec, store.as_ref())?;
    let table = r.table();
    println!("{table}");
    if let Some(dir) = &args.out {
        // Each run's full record (final kernel, thresholds) is in runs/; compare.json keeps the per-run
        // loss curves and loads (what the gap estimators use) so it stays small at hundreds of runs.
        let mut r = r;
        for s in r.sizes.iter_mut() {
            for run in s.runs.iter_mut() {
                run.kernel.clear();
                run.thresholds.clear();
                run.controls.clear();
            }
        }
        super::coord_check::write_json(&dir.join("compare.json"), &r)?;
        std::fs::write(dir.join("table.md"), &table)
            .map_err(|source| Error::Write { path: dir.join("table.md"), source })?;
        let t = r.dmft.loss.len();
        let mut curves = Array2::<f64>::zeros((r.sizes.len() + 1, t));
        curves.row_mut(0).assign(&ndarray::Array1::from(r.dmft.loss.clone()));
        for (i, s) in r.sizes.iter().enumerate() {
            curves.row_mut(i + 1).assign(&ndarray::Array1::from(s.loss_mean.clone()));
        }
        let path = dir.join("loss_curves.npy");
        ndarray_npy::write_npy(&path, &curves)
            .map_err(|e| Error::Write { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
    }
    Ok(())
}
