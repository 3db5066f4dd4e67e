//! `moe-dmft sweep`: runs (one shard of) a resumable LR sweep from a TOML config, or only rebuilds its
//! summary and figures from the results present. See [`crate::train::sweep`] for the layout of `--out`.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::train::sweep::{self, Shard, SweepConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sweep config (TOML): `[base]` (a train config), `[grid]` (axis, sizes, lr_log2, presets, seeds,
    /// init_scales, lr_groups: sweep only these groups' LR), optional `[analysis]` (metric, window, cliff: leave
    /// points at higher LRs than the best that lie more than this above it out of the fit).
    #[arg(long, required_unless_present = "collect")]
    pub config: Option<PathBuf>,
    /// Output folder; results go to OUT/runs/<id>/, the summary to OUT/summary.{md,json}. With
    /// `--collect`: where transfer.md and the transfer figures go.
    #[arg(long)]
    pub out: PathBuf,
    /// Run only the grid points whose index is i modulo n (0-based), e.g. `--shard $SLURM_ARRAY_TASK_ID/8`.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Continue a sweep in OUT. Every run does this anyway (finished points are never repeated); the flag
    /// states the intent in job scripts.
    #[arg(long)]
    pub resume: bool,
    /// Where this process trains its points (`cpu`, or `cuda`: the GPU backend), whatever the base
    /// config says; each point's `config.toml` records it.
    #[arg(long, value_enum, conflicts_with = "collect")]
    pub device: Option<crate::train::Device>,
    /// Run nothing: rebuild OUT/summary.{md,json} and OUT/figures/ from the results present (e.g. once
    /// all shards of a job array have finished).
    #[arg(long, conflicts_with = "collect")]
    pub summary_only: bool,
    /// Run nothing: read the summary.json of each of these sweep folders and write OUT/transfer.md (optimum
    /// LR per size and its drift, per axis and preset) with the figures OUT/transfer_*.{png,svg}.
    #[arg(long, num_args = 1.., conflicts_with_all = ["config", "shard", "resume"])]
    pub collect: Vec<PathBuf>,
    /// With `--collect`: the largest drift (log2 units across an axis) that counts as transfer.
    #[arg(long, default_value_t = 0.5)]
    pub tolerance: f64,
}

pub fn run(args: Args) -> crate::Result<()> {
    if !args.collect.is_empty() {
        if !(args.tolerance.is_finite() && args.tolerance >= 0.0) {
            return Err(crate::Error::invalid("tolerance", "must be finite and non-negative"));
        }
        let summaries = sweep::collect(&args.collect, &args.out, args.tolerance)?;
        println!("{} sweeps collected into {}", summaries.len(), args.out.join("transfer.md").display());
        return Ok(());
    }
    let Some(config) = &args.config else {
        return Err(crate::Error::invalid("config", "is required (unless --collect is given)"));
    };
    let cfg = SweepConfig::from_file(config)?;
    if args.summary_only {
        // A summary of nothing is a typo in --out, not a result: say so rather than fail on the write.
        if !args.out.is_dir() {
            return Err(crate::Error::invalid("out", format!("{} is not a sweep folder", args.out.display())));
        }
        let summary = sweep::summarize(&cfg, &args.out)?;
        sweep::write_summary(&summary, &args.out)?;
        println!(
            "{} of {} grid points done ({} diverged); summary in {}",
            summary.done,
            summary.grid_points,
            summary.diverged,
            args.out.join("summary.md").display()
        );
        return Ok(());
    }
    let runner = sweep::TrainRunner { device: args.device };
    let report = sweep::run_sweep(&cfg, &args.out, args.shard, &runner, std::io::stderr().is_terminal())?;
    println!(
        "shard {}: {} points, {} ran ({} diverged), {} already done, {} failed, {:.1} s; summary in {}",
        args.shard,
        report.in_shard,
        report.ran,
        report.diverged,
        report.skipped,
        report.failed.len(),
        report.wall_s,
        args.out.join("summary.md").display()
    );
    if let Some((id, e)) = report.failed.first() {
        return Err(crate::Error::Internal(format!(
            "{} point(s) failed (first: {id}: {e}); rerun the same command to retry them",
            report.failed.len()
        )));
    }
    Ok(())
}
