//! `moe-dmft sweep`: runs (one shard of) a resumable LR sweep from a TOML config, or only rebuilds its
//! summary and figures from the results present. See [`crate::train::sweep`] for the layout of `--out`.

use std::io::IsTerminal;
use std::path::PathBuf;

use crate::train::sweep::{self, Shard, SweepConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sweep config (TOML): `[base]` (a train config), `[grid]` (axis, sizes, lr_log2, presets, seeds,
    /// init_scales), optional `[analysis]` (metric, window).
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder; results go to OUT/runs/<id>/, the summary to OUT/summary.{md,json}.
    #[arg(long)]
    pub out: PathBuf,
    /// Run only the grid points whose index is i modulo n (0-based), e.g. `--shard $SLURM_ARRAY_TASK_ID/8`.
    #[arg(long, default_value = "0/1")]
    pub shard: Shard,
    /// Continue a sweep in OUT. Every run does this anyway (finished points are never repeated); the flag
    /// states the intent in job scripts.
    #[arg(long)]
    pub resume: bool,
    /// Run nothing: rebuild OUT/summary.{md,json} and OUT/figures/ from the results present (e.g. once
    /// all shards of a job array have finished).
    #[arg(long)]
    pub summary_only: bool,
}

pub fn run(args: Args) -> crate::Result<()> {
    let cfg = SweepConfig::from_file(&args.config)?;
    if args.summary_only {
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
    let runner = sweep::TrainRunner;
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
