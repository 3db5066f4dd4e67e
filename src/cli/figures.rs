//! `moe-dmft figures`: regenerates `figures/` (PNG and SVG) from the results under `validation/`
//! (`coord/*.json` from `coord-check --out`, `compare/compare.json` from `compare --out`) and writes
//! `validation/REPORT.md`: predicted vs measured exponents with uncertainties, convergence rates,
//! figure links and the exact commands.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::check::compare::CompareResult;
use crate::check::coord::{identified, optimizer_name, verdict_name, CoordResult, RouterInit, Verdict};
use crate::dmft::LOAD_QUANTILES;
use crate::param::Axis;
use crate::plot::{line_plot, panel_grid, Panel, Series};
use crate::{Error, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Folder with `coord/` and `compare/` results.
    #[arg(long, default_value = "validation")]
    pub validation: PathBuf,
    /// Folder for the figures.
    #[arg(long, default_value = "figures")]
    pub out: PathBuf,
    /// Where to write the report (default: `<validation>/REPORT.md`).
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Quantities drawn in the coordinate-check panels.
const PANEL_QUANTITIES: [&str; 8] = [
    "delta.router_logits",
    "delta.expert_pre",
    "delta.moe_out",
    "delta.residual",
    "delta.output",
    "act.moe_out",
    "act.residual",
    "loss.final",
];

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::Parse { path: path.to_path_buf(), reason: e.to_string() })
}

/// Every coordinate-check result under `dir`, sorted by file name.
pub fn load_coord(dir: &Path) -> Result<Vec<CoordResult>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "json")).collect(),
        Err(_) => Vec::new(),
    };
    files.sort();
    files.iter().map(|p| read_json(p)).collect()
}

fn series_of(r: &CoordResult, q: &str, label: String, color: usize) -> Option<Series> {
    let qr = r.get(q)?;
    let pts: Vec<(f64, f64, f64)> = r.spec.values.iter().zip(qr.mean.iter().zip(&qr.sem)).map(|(x, (m, e))| (*x as f64, *m, *e)).collect();
    Some(Series::new(label, pts).color(color))
}

fn axis_label(axis: Axis) -> &'static str {
    match axis {
        Axis::Width => "width N (n = N)",
        Axis::Depth => "depth L",
        Axis::Experts => "experts M (k = M/4)",
        Axis::ExpertHidden => "expert hidden n (N fixed)",
    }
}

fn preset_color(p: &str) -> usize {
    match p {
        "moe-completep" => 0,
        "sp" => 1,
        "mup" => 2,
        _ => 3,
    }
}

/// Coordinate-check panels: one figure per (optimizer, axis), presets as series; and one figure per
/// optimizer for the router-initialization ablation.
pub fn coord_figures(results: &[CoordResult], out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut groups: BTreeMap<(String, String), Vec<&CoordResult>> = BTreeMap::new();
    let mut ablation: BTreeMap<String, Vec<&CoordResult>> = BTreeMap::new();
    for r in results {
        let opt = optimizer_name(r.spec.optimizer).to_string();
        if r.spec.router_init == RouterInit::Preset {
            groups.entry((opt, r.spec.axis.name().to_string())).or_default().push(r);
        } else {
            ablation.entry(opt).or_default().push(r);
        }
    }
    for ((opt, axis), rs) in &groups {
        let ax = rs[0].spec.axis;
        let panels: Vec<Panel> = PANEL_QUANTITIES
            .iter()
            .map(|q| {
                let mut p = Panel::new(*q, axis_label(ax), "seed mean ± s.e.").log_x().log_y();
                for r in rs {
                    if let Some(s) = series_of(r, q, r.spec.preset.clone(), preset_color(&r.spec.preset)) {
                        // muP coincides with MoE-CompleteP along width: dashed, so both stay visible.
                        p = p.with(if r.spec.preset == "mup" { s.dashed() } else { s });
                    }
                }
                p
            })
            .collect();
        let title = format!("coordinate check along {axis} ({opt}, {} steps): Θ(1) = flat", rs[0].spec.steps);
        written.extend(panel_grid(&out.join(format!("coord_{opt}_{axis}")), &title, &panels, 4)?);
    }
    for (opt, rs) in &ablation {
        let panels: Vec<Panel> = ["delta.router_logits", "delta.residual", "delta.output", "act.router_logits", "grad.router", "loss.final"]
            .iter()
            .map(|q| {
                let mut p = Panel::new(*q, "width N (M fixed)", "seed mean ± s.e.").log_x().log_y();
                for (i, r) in rs.iter().enumerate() {
                    if let Some(s) = series_of(r, q, format!("router {}", r.spec.router_init.name()), i) {
                        p = p.with(s);
                    }
                }
                p
            })
            .collect();
        let title = format!("router initialization ablation along width ({opt}, moe-completep otherwise)");
        written.extend(panel_grid(&out.join(format!("router_ablation_{opt}")), &title, &panels, 3)?);
    }
    Ok(written)
}

/// DMFT vs finite networks: loss curves, gaps vs width, load distribution.
pub fn compare_figures(c: &CompareResult, out: &Path) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let label = |s: &crate::param::Sizes| format!("N={} M={} n={}", s.width, s.experts, s.expert_hidden);
    let mut loss = Panel::new("training loss: DMFT vs finite MoE-ResNets", "step", "loss").log_y();
    let dmft_err = c.dmft.loss_err.clone().unwrap_or_else(|| vec![0.0; c.dmft.loss.len()]);
    for (i, s) in c.sizes.iter().enumerate() {
        let pts = s.loss_mean.iter().zip(&s.loss_sem).enumerate().map(|(t, (m, e))| (t as f64, *m, *e)).collect();
        loss = loss.with(Series::new(label(&s.sizes), pts).color(i + 1));
    }
    loss = loss.with(
        Series::new("DMFT (limit)", c.dmft.loss.iter().zip(&dmft_err).enumerate().map(|(t, (m, e))| (t as f64, *m, *e)).collect())
            .dashed()
            .color(6),
    );
    written.extend(line_plot(&out.join("compare_loss"), &loss)?);

    let mut gaps = Panel::new("gap to the DMFT vs width, N, M, n grown together", "width N", "relative gap").log_x().log_y();
    for (i, f) in c.fits.iter().enumerate() {
        let ys: Vec<f64> = c
            .sizes
            .iter()
            .map(|s| match f.quantity.as_str() {
                "loss_gap" => s.loss_gap,
                "kernel_gap" => s.kernel_gap,
                "threshold_gap" => s.threshold_gap,
                _ => s.load_gap,
            })
            .collect();
        let errs: Vec<f64> = c.sizes.iter().map(|s| if f.quantity == "loss_gap" { s.loss_gap_sem } else { 0.0 }).collect();
        let xs: Vec<f64> = c.sizes.iter().map(|s| s.sizes.width as f64).collect();
        let name = match f.slope {
            Some(sl) => format!("{} (slope {:+.2} ± {:.2})", f.quantity, sl.slope, sl.err),
            None => f.quantity.clone(),
        };
        gaps = gaps.with(Series::new(name, xs.iter().zip(ys.iter().zip(&errs)).map(|(x, (y, e))| (*x, *y, *e)).collect()).color(i));
        if let Some(sl) = f.slope {
            let fitted = xs.iter().map(|x| (*x, (sl.intercept + sl.slope * x.ln()).exp()));
            gaps = gaps.with(Series::from_xy("", fitted).dashed().color(i));
        }
    }
    written.extend(line_plot(&out.join("compare_gaps"), &gaps)?);

    let mut load = Panel::new("expert load at the last step: quantiles over experts", "quantile level", "load_e / kappa");
    for (i, s) in c.sizes.iter().enumerate() {
        load = load.with(Series::from_xy(label(&s.sizes), LOAD_QUANTILES.iter().copied().zip(s.load_quantiles.iter().copied())).color(i + 1));
    }
    load = load.with(Series::from_xy("DMFT (limit)", LOAD_QUANTILES.iter().copied().zip(c.dmft.load_quantiles.iter().copied())).dashed().color(6));
    written.extend(line_plot(&out.join("compare_load"), &load)?);
    Ok(written)
}

fn rel(path: &Path, from: &Path) -> String {
    // Links in the report are relative to the report's folder.
    let depth = from.components().count();
    let up = "../".repeat(depth.saturating_sub(1));
    format!("{up}{}", path.display())
}

/// Why a measured exponent departs from its prediction, for the report (matched on the label and
/// quantity; the text states the mechanism and points at the fitted rate where there is one).
fn explanation(r: &CoordResult, q: &str) -> &'static str {
    use crate::param::Optimizer::{Adam, Sgd};
    let axis = r.spec.axis;
    let opt = r.spec.optimizer;
    let init = r.spec.router_init;
    match (axis, q) {
        (Axis::Depth, _) if r.spec.preset == "moe-completep" || r.spec.preset == "completep" => {
            "finite depth: the random part of the branch sum (1/L) sum_l m_l is ∝ L^(-1/2) relative to the learned part; with L ≤ 16 it still shows (the fit a + b L^-c has a non-zero limit where it is resolved)"
        }
        (Axis::Experts, "delta.router_logits" | "delta.residual" | "delta.output") if opt == Sgd => {
            "SGD: the engine's router and expert rates grow ∝ k; the changes grow like k^0.2-0.3 over k = 2..64. Either a finite-size approach from below or a rate exponent too large by about 0.3: these sizes do not resolve it (no identified fit). Open point for the parameterization"
        }
        (Axis::Experts, "delta.moe_out" | "delta.residual" | "act.residual") => {
            "random-initialization part of the average over k experts, ∝ k^(-1/2) (SPEC §4): a non-zero limit a plus a correction at the fitted rate c ≈ 1/2"
        }
        (Axis::Experts, "act.moe_out") if r.spec.preset == "sp" => {
            "SP's hidden-like router gives Θ(1) logits with RMS ≈ 2.8, so softmax gates over the active set concentrate on few experts: the effective number of averaged experts saturates and the MoE output keeps a non-zero limit instead of k^(-1/2)"
        }
        (_, "grad.router") => {
            "at initialization the router's backward signal g_e (z_e - m) · delta_h pairs expert outputs with a readout they are uncorrelated with, a random sum ∝ N^(-1/2) (and the zero router's ties make it noisy); the engine's grad_rms for the router counts the aligned (learned) part only. Adam epsilon for the router should not exceed this init RMS"
        }
        (Axis::Width, "grad.expert_up") if opt == Sgd => {
            "SGD: the engine initializes expert_down mean-field-like (std ∝ 1/n), so the backward signal V^T delta into expert_up is at initialization a random sum a further N^(-1/2) smaller; the engine's -1 is the aligned (learned) regime"
        }
        (Axis::Width, g) if g.starts_with("grad.") && opt == Adam => {
            "every gradient carries the residual f - y; at initialization f is a random term ∝ N^(-1/2), so |f - y| itself falls with width here (loss.init slope ≈ -0.3, i.e. |f - y| ∝ N^(-0.15)): the common extra -0.15 to -0.25 is this shared factor, a correction that vanishes like N^(-1/2)"
        }
        (Axis::Width, "delta.router_logits") if init == RouterInit::HiddenLike => {
            "hidden-like router: its logit changes grow with width (the ablation's point: the router needs the readout-like or zero rule)"
        }
        (Axis::Width, "delta.router_logits") if init == RouterInit::ReadoutLike && opt == Adam => {
            "readout-like router: logits start ∝ N^(-1/2) and the first steps' change still carries part of that initial scale; the fit has a non-zero limit"
        }
        (Axis::Width, "delta.output") if opt == Adam => {
            "borderline (|slope| 0.15-0.17): the output change through the random part of the readout (∝ N^(-1/2)) has not died out at N ≤ 256"
        }
        (Axis::Width, _) if opt == Sgd => {
            "standard-form SGD at 5 steps: the router and expert updates are driven by (z_e - m) · delta_h, whose aligned part builds up only as the readout and experts learn; early changes still carry the N^(-1/2) random part (fits with a non-zero limit where resolved). The DMFT's SGD instance (mean-field form, joint N, M, n ladder) is checked by `compare` instead"
        }
        (Axis::ExpertHidden, "act.output") => "within 2.1 standard errors of 0: seed noise of the random readout output at initialization (5 seeds)",
        (Axis::ExpertHidden, _) => "n/N grows from 1 to 8 at fixed N: the N/(k n) backward field of SPEC §5 shrinks, a correction that approaches the limit from below",
        _ => "not explained yet: see the table",
    }
}

/// The report: every predicted exponent next to its measurement, disagreements with explanations,
/// convergence rates, figure links and the commands.
pub fn report(results: &[CoordResult], compare: Option<&CompareResult>, figures: &[PathBuf], report_path: &Path) -> String {
    let mut s = String::new();
    s.push_str("# moe-dmft validation report\n\n");
    s.push_str("Generated by `moe-dmft figures` from the JSON results under `validation/`; rerun everything with\n`validation/run_all.sh` (it writes the exact commands below). Slopes are log-log least-squares fits of the\nseed mean against the size; the uncertainty is the larger of the residual standard error and a seed\nbootstrap (200 resamples). Finite-size fits `a + b x^-c` (variable projection + Brent) are shown where\n`c` is resolved. Verdicts: *agrees* = within 0.15 (or two standard errors) of the prediction, or above\na lower bound `≥`; *finite-size correction* = predicted Θ(1), slope off, but the fit has a non-zero limit.\n\n");
    s.push_str("## Commands\n\n```\n");
    s.push_str(COMMANDS);
    s.push_str("```\n\n");
    if let Some(c) = compare {
        s.push_str("## DMFT vs finite networks (mean-field SGD, joint N, M, n ladder at kappa = 1/4)\n\n");
        s.push_str(&c.table());
        s.push('\n');
        for f in ["compare_loss", "compare_gaps", "compare_load"] {
            s.push_str(&format!("![{f}]({})\n", rel(&PathBuf::from("figures").join(format!("{f}.png")), report_path)));
        }
        s.push('\n');
    }
    s.push_str("## Disagreements and their explanations\n\n");
    let mut any = false;
    for r in results {
        for q in &r.quantities {
            if matches!(q.verdict, Verdict::Disagrees | Verdict::FiniteSize) {
                any = true;
                let pred = q.predicted.map(|p| format!("{}{:+.2}", if p.lower_bound { "≥ " } else { "" }, p.value)).unwrap_or_default();
                let meas = q.slope.map(|sl| format!("{:+.3} ± {:.3}", sl.slope, sl.err)).unwrap_or_default();
                let fitted = q
                    .finite_size
                    .filter(identified)
                    .map(|f| format!("; fit a = {:.3e} ± {:.1e}, c = {:.2} ± {:.2}", f.a, f.a_err, f.c, f.c_err))
                    .unwrap_or_default();
                s.push_str(&format!(
                    "- `{}` {}: predicted {pred}, measured {meas}{fitted} ({}). {}\n",
                    r.label(),
                    q.name,
                    verdict_name(q.verdict),
                    explanation(r, &q.name)
                ));
            }
        }
    }
    if !any {
        s.push_str("None.\n");
    }
    s.push_str("\n## Coordinate checks: predicted vs measured exponents\n\n");
    for r in results {
        s.push_str("### ");
        s.push_str(&r.table());
        s.push('\n');
    }
    // The HP-transfer sweeps keep their own report, written by `moe-dmft sweep --collect`.
    s.push_str("## HP transfer on text\n\nLR sweeps of the MoE-Transformer along the four axes: see ");
    s.push_str("[sweeps/REPORT.md](sweeps/REPORT.md) (configs, what ran, optimum-LR drift per preset).\n\n");
    s.push_str("## Figures\n\n");
    for f in figures.iter().filter(|f| f.extension().is_some_and(|e| e == "png")) {
        s.push_str(&format!("- [{}]({})\n", f.display(), rel(f, report_path)));
    }
    s
}

/// The commands `validation/run_all.sh` runs (kept here so the report states them exactly).
pub const COMMANDS: &str = include_str!("../../validation/commands.txt");

pub fn run(args: Args) -> Result<()> {
    let coord = load_coord(&args.validation.join("coord"))?;
    let compare_path = args.validation.join("compare").join("compare.json");
    let compare: Option<CompareResult> = if compare_path.exists() { Some(read_json(&compare_path)?) } else { None };
    if coord.is_empty() && compare.is_none() {
        return Err(Error::Unavailable {
            what: "validation results".into(),
            reason: format!("nothing under {} (run validation/run_all.sh first)", args.validation.display()),
        });
    }
    let mut figures = coord_figures(&coord, &args.out)?;
    if let Some(c) = &compare {
        figures.extend(compare_figures(c, &args.out)?);
    }
    let report_path = args.report.clone().unwrap_or_else(|| args.validation.join("REPORT.md"));
    let text = report(&coord, compare.as_ref(), &figures, &report_path);
    std::fs::write(&report_path, text).map_err(|source| Error::Write { path: report_path.clone(), source })?;
    for f in &figures {
        println!("{}", f.display());
    }
    println!("{}", report_path.display());
    Ok(())
}
