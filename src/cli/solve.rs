//! `moe-dmft solve --config FILE --out DIR`: solves the DMFT of the MoE-ResNet described by a TOML
//! [`crate::dmft::SolveConfig`] on its `[task]` and writes the outputs of [`crate::dmft::output`].

use std::path::PathBuf;

use crate::dmft::{self, output, SolveConfig};
use crate::Error;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML config (a dmft::SolveConfig: no width, expert count or expert hidden size).
    #[arg(long)]
    pub config: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> crate::Result<()> {
    let text = std::fs::read_to_string(&args.config).map_err(|source| Error::Read {
        path: args.config.clone(),
        source,
    })?;
    let cfg = SolveConfig::from_toml_str(&text).map_err(|e| match e {
        Error::Parse { reason, .. } => Error::Parse {
            path: args.config.clone(),
            reason,
        },
        other => other,
    })?;
    let task = crate::data::make_task(&cfg.task)?;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        let b = indicatif::ProgressBar::new(((cfg.steps + 1) * cfg.resolution.repeats) as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template("solve {bar:40} {pos}/{len} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(b)
    } else {
        None
    };
    let mut observe = |p: &dmft::Progress| {
        if let Some(b) = &bar {
            b.inc(1);
            b.set_message(format!(
                "repeat {}/{} loss {:.5}",
                p.repeat + 1,
                p.repeats,
                p.loss
            ));
        }
    };
    let result = dmft::solve(&cfg, &task, Some(&mut observe));
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    match result {
        Ok(sol) => {
            output::write_outputs(&args.out, &cfg, &task, &sol)?;
            let (loss, err) = sol.final_loss();
            match err {
                Some(e) => println!(
                    "final loss {loss:.6} +- {e:.6} ({:.1} s) -> {}",
                    sol.wall_s,
                    args.out.display()
                ),
                None => println!(
                    "final loss {loss:.6} ({:.1} s) -> {}",
                    sol.wall_s,
                    args.out.display()
                ),
            }
            Ok(())
        }
        Err(Error::Diverged { step, reason }) => {
            output::write_diverged(&args.out, &cfg, step, &reason)?;
            Err(Error::Diverged { step, reason })
        }
        Err(e) => Err(e),
    }
}
