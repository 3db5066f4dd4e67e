//! `moe-dmft demo`: the main demo. Solves the DMFT of an MoE-ResNet block on a small teacher task, trains
//! finite networks at two sizes (kappa fixed) on the same task under the same mean-field SGD
//! parameterization, prints the final losses and gaps, and writes one figure of the three loss curves.

use std::path::PathBuf;

use crate::check::compare::{run_compare, CompareResult, CompareSpec};
use crate::dmft::SolveConfig;
use crate::plot::{line_plot, Panel, Series};
use crate::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output folder for the figure and `compare.json`.
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Finite sizes as N:M:n triples (k = kappa * M), comma-separated.
    #[arg(long, default_value = "128:32:32,512:128:128")]
    pub ladder: String,
    /// Seeds per finite size.
    #[arg(long, default_value_t = 4)]
    pub seeds: usize,
    /// Gradient-descent steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
}

pub fn run(args: Args) -> Result<()> {
    if args.steps == 0 {
        return Err(Error::invalid("steps", "must be at least 1"));
    }
    let solve = SolveConfig::default().with_steps(args.steps).with_resolution(1024, 128, 4);
    let spec = CompareSpec::new(solve, super::compare::parse_ladder(&args.ladder)?, args.seeds);
    eprintln!(
        "solving the DMFT (P = {}, kappa = {}, {} steps; 1024 expert x 128 neuron samples x 4 repeats) and training {} finite sizes x {} seeds ...",
        spec.solve.task.points,
        spec.solve.kappa,
        args.steps,
        spec.ladder.len(),
        args.seeds
    );
    let result = run_compare(&spec)?;
    println!("{}", result.table());
    std::fs::create_dir_all(&args.out).map_err(|source| Error::Write { path: args.out.clone(), source })?;
    crate::files::write_json(&args.out.join("compare.json"), &result)?;
    let files = line_plot(&args.out.join("loss_curves"), &loss_panel(&result))?;
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

/// The DMFT loss (with its Monte Carlo error bar) and each finite size's seed-averaged loss.
fn loss_panel(r: &CompareResult) -> Panel {
    let dmft_err = r.dmft.loss_err.clone().unwrap_or_else(|| vec![0.0; r.dmft.loss.len()]);
    let dmft: Vec<(f64, f64, f64)> =
        r.dmft.loss.iter().zip(&dmft_err).enumerate().map(|(t, (l, e))| (t as f64, *l, *e)).collect();
    let mut panel = Panel::new(
        format!("MoE-ResNet, kappa = {}: DMFT vs finite networks", r.spec.solve.kappa),
        "gradient-descent step",
        "training loss 0.5 * mean (f - y)^2",
    )
    .log_y()
    .with(Series::new("DMFT (N, M, n = infinity)", dmft).color(0));
    for (i, s) in r.sizes.iter().enumerate() {
        let pts = s.loss_mean.iter().zip(&s.loss_sem).enumerate().map(|(t, (l, e))| (t as f64, *l, *e)).collect();
        let label = format!(
            "finite N = {}, M = {}, k = {}, n = {} ({} seeds)",
            s.sizes.width,
            s.sizes.experts,
            s.sizes.active,
            s.sizes.expert_hidden,
            s.runs.len()
        );
        panel = panel.with(Series::new(label, pts).dashed().color(i + 1));
    }
    panel
}
