//! `moe-dmft train --config FILE --out DIR [--threads N] [--device cpu|cuda]`: trains a finite network from a TOML config
//! (see [`crate::train::TrainConfig`]) and writes `config.toml`, `metrics.jsonl`, `summary.json` and the
//! task or weights into DIR. A progress bar shows on a terminal; a diverged run exits 0 with status
//! `diverged` in `summary.json` so that sweeps continue.

use std::io::IsTerminal;
use std::path::PathBuf;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::train::{self, Observer, StepRecord, TrainConfig};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run config (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory (created if needed).
    #[arg(long)]
    pub out: PathBuf,
    /// Threads of the run's pool (overrides `threads` in the config).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Where to train (overrides `device` in the config): `cpu`, or `cuda` (the GPU backend).
    #[arg(long, value_enum)]
    pub device: Option<train::Device>,
}

/// Drives a progress bar with the latest loss; hidden when stderr is not a terminal.
pub struct ProgressObserver {
    bar: ProgressBar,
}

impl ProgressObserver {
    pub fn new() -> Self {
        let bar = ProgressBar::hidden();
        if std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        ProgressObserver { bar }
    }
}

impl Default for ProgressObserver {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for ProgressObserver {
    fn start(&mut self, steps: usize) {
        self.bar.set_length(steps as u64);
        let style = ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed} < {eta}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        self.bar.set_style(style);
    }

    fn observe(&mut self, record: &StepRecord) -> crate::Result<()> {
        let val = record.val_loss.map(|v| format!("  val {v:.4}")).unwrap_or_default();
        self.bar.set_message(format!("loss {:.4}{val}", record.loss));
        if !record.r#final {
            self.bar.set_position(record.step as u64 + 1);
        }
        Ok(())
    }

    fn finish(&mut self) {
        self.bar.finish_and_clear();
    }
}

pub fn run(args: Args) -> crate::Result<()> {
    let mut cfg = TrainConfig::from_file(&args.config)?;
    if let Some(t) = args.threads {
        if t == 0 {
            return Err(crate::Error::invalid("--threads", "must be at least 1"));
        }
        cfg.threads = t;
    }
    if let Some(d) = args.device {
        cfg.device = d;
    }
    let mut progress = ProgressObserver::new();
    let summary = train::train(&cfg, Some(&args.out), &mut progress)?;
    match summary.status {
        train::Status::Ok => eprintln!(
            "done: {} steps, final loss {:.6}, wall {:.2} s; outputs in {}",
            summary.steps,
            summary.final_loss.unwrap_or(f64::NAN),
            summary.wall_seconds,
            args.out.display()
        ),
        train::Status::Diverged => eprintln!(
            "diverged at step {}: status recorded in {}",
            summary.diverged_at.unwrap_or(0),
            args.out.join("summary.json").display()
        ),
    }
    Ok(())
}
