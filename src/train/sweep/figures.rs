//! Figures of LR sweeps, drawn with [`crate::plot`]: loss against log2 LR with one curve per size and one
//! panel per (axis, preset), and the optimum log2 LR against log2 size with one curve per preset and one
//! panel per axis.

use std::path::{Path, PathBuf};

use crate::plot::{panel_grid, Panel, Series};
use crate::Result;

use super::SweepSummary;

/// One panel per preset of `summary`: the metric against log2 LR, one curve per size (finite cells only;
/// error bars are standard errors over seeds).
pub fn lr_curve_panels(summary: &SweepSummary) -> Vec<Panel> {
    let axis = summary.axis.name();
    summary
        .presets
        .iter()
        .map(|p| {
            let mut panel = Panel::new(format!("{axis}: {}", p.label()), "log2 LR", summary.metric.name());
            for z in &p.sizes {
                let pts: Vec<(f64, f64, f64)> =
                    z.curve.iter().filter_map(|c| c.loss.map(|l| (c.lr_log2, l, c.stderr.unwrap_or(0.0)))).collect();
                if !pts.is_empty() {
                    panel = panel.with(Series::new(format!("{axis} {}", z.size), pts));
                }
            }
            panel
        })
        .filter(|p| !p.series.is_empty())
        .collect()
}

/// One panel per summary (axis): optimum log2 LR against log2 size, one curve per preset, error bars one
/// standard deviation of the fit.
pub fn drift_panels(summaries: &[&SweepSummary]) -> Vec<Panel> {
    summaries
        .iter()
        .map(|s| {
            let axis = s.axis.name();
            let mut panel = Panel::new(format!("optimum LR along {axis}"), format!("log2 {axis}"), "optimum log2 LR");
            for p in &s.presets {
                let pts: Vec<(f64, f64, f64)> = p
                    .sizes
                    .iter()
                    .filter_map(|z| z.optimum.map(|o| ((z.size as f64).log2(), o.lr_log2, o.std.unwrap_or(0.0))))
                    .collect();
                if !pts.is_empty() {
                    panel = panel.with(Series::new(p.label(), pts));
                }
            }
            panel
        })
        .filter(|p| !p.series.is_empty())
        .collect()
}

/// Writes `<dir>/lr_curves.{png,svg}` and `<dir>/optimum_drift.{png,svg}` for one sweep; returns the files
/// written (none when no run has finished yet).
pub fn write_sweep_figures(summary: &SweepSummary, dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let curves = lr_curve_panels(summary);
    if !curves.is_empty() {
        let title = format!("{} vs LR along {}", summary.metric.name(), summary.axis.name());
        files.extend(panel_grid(&dir.join("lr_curves"), &title, &curves, curves.len().min(3))?);
    }
    let drift = drift_panels(&[summary]);
    if !drift.is_empty() {
        files.extend(panel_grid(&dir.join("optimum_drift"), "", &drift, 1)?);
    }
    Ok(files)
}

/// Figures over several sweeps: `<dir>/transfer_lr_curves.{png,svg}` (one panel per (axis, preset), one
/// row per axis) and `<dir>/transfer_drift.{png,svg}` (one panel per axis); returns the files written.
pub fn write_transfer_figures(summaries: &[SweepSummary], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let cols = summaries.iter().map(|s| s.presets.len()).max().unwrap_or(1).max(1);
    let curves: Vec<Panel> = summaries.iter().flat_map(lr_curve_panels).collect();
    if !curves.is_empty() {
        files.extend(panel_grid(&dir.join("transfer_lr_curves"), "loss vs LR per (axis, preset)", &curves, cols)?);
    }
    let refs: Vec<&SweepSummary> = summaries.iter().collect();
    let drift = drift_panels(&refs);
    if !drift.is_empty() {
        files.extend(panel_grid(&dir.join("transfer_drift"), "optimum LR drift", &drift, drift.len().min(4))?);
    }
    Ok(files)
}
