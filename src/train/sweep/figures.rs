//! Figures of LR sweeps, drawn with [`crate::plot`]: loss against log2 LR with one curve per size and one
//! panel per (axis, preset), and the optimum log2 LR against log2 size with one curve per preset and one
//! panel per axis.

use std::path::{Path, PathBuf};

use crate::plot::{panel_grid, Panel, Series};
use crate::Result;

use super::SweepSummary;
use crate::param::Axis;

/// One panel per preset of `summary`: the metric against log2 LR, one curve per size (finite cells only;
/// error bars are standard errors over seeds).
pub fn lr_curve_panels(summary: &SweepSummary) -> Vec<Panel> {
    let axis = summary.axis.name();
    summary
        .presets
        .iter()
        .map(|p| {
            let title = format!("{axis}: {}", summary.preset_label(p));
            let mut panel = Panel::new(title, summary.lr_name(), summary.metric.name());
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

/// One panel per axis: optimum log2 LR against log2 size, one curve per (sweep, preset), labelled by the
/// preset (or by `label` of the sweep, when given); error bars one standard deviation of the fit.
pub fn drift_panels(summaries: &[(&SweepSummary, Option<&str>)]) -> Vec<Panel> {
    let mut axes: Vec<Axis> = Vec::new();
    for (s, _) in summaries {
        if !axes.contains(&s.axis) {
            axes.push(s.axis);
        }
    }
    axes.iter()
        .map(|&axis| {
            let name = axis.name();
            let mut panel = Panel::new(format!("optimum LR along {name}"), format!("log2 {name}"), "optimum log2 LR");
            for (s, label) in summaries.iter().filter(|(s, _)| s.axis == axis) {
                for p in &s.presets {
                    let pts: Vec<(f64, f64, f64)> = p
                        .sizes
                        .iter()
                        .filter_map(|z| z.optimum.map(|o| ((z.size as f64).log2(), o.lr_log2, o.std.unwrap_or(0.0))))
                        .collect();
                    if !pts.is_empty() {
                        panel = panel.with(Series::new(label.map_or_else(|| s.preset_label(p), str::to_string), pts));
                    }
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
    let drift = drift_panels(&[(summary, None)]);
    if !drift.is_empty() {
        files.extend(panel_grid(&dir.join("optimum_drift"), "", &drift, 1)?);
    }
    Ok(files)
}

/// Figures over several sweeps, each named (its folder): `<dir>/transfer_lr_curves.{png,svg}` (one panel
/// per (sweep, preset), three to a row) and `<dir>/transfer_drift.{png,svg}` (one panel per axis). A sweep
/// whose name is not `<axis>_<preset>` (a follow-up) is labelled by its name; returns the files written.
pub fn write_transfer_figures(summaries: &[(String, SweepSummary)], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let label = |name: &str, s: &SweepSummary| {
        let canonical = s.presets.len() == 1 && name == format!("{}_{}", s.axis.name(), s.presets[0].label());
        (!canonical).then(|| name.to_string())
    };
    let labels: Vec<Option<String>> = summaries.iter().map(|(n, s)| label(n, s)).collect();
    let mut curves: Vec<Panel> = Vec::new();
    for ((_, s), follow_up) in summaries.iter().zip(&labels) {
        curves.extend(lr_curve_panels(s).into_iter().map(|mut p| {
            if let Some(n) = follow_up {
                p.title = n.clone();
            }
            p
        }));
    }
    if !curves.is_empty() {
        files.extend(panel_grid(&dir.join("transfer_lr_curves"), "loss vs LR per (axis, preset)", &curves, curves.len().min(3))?);
    }
    let refs: Vec<(&SweepSummary, Option<&str>)> =
        summaries.iter().zip(&labels).map(|((_, s), l)| (s, l.as_deref())).collect();
    let drift = drift_panels(&refs);
    if !drift.is_empty() {
        files.extend(panel_grid(&dir.join("transfer_drift"), "optimum LR drift", &drift, drift.len().min(4))?);
    }
    Ok(files)
}
