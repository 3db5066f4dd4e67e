//! The HP-transfer sweep configs under validation/sweeps/ are valid: every grid point is a train config the
//! trainer accepts and the parameterization resolves (no corpus needed), and together they cover the four
//! axes x three presets over an 8x range with the axis ranges of issue 6.

use std::path::Path;

use moe_dmft::param::Axis;
use moe_dmft::train::sweep::{PointRunner, SweepConfig, TrainRunner};

/// Parses a sweep config and checks that every grid point is a train config the trainer accepts.
fn valid_config(path: &Path) -> SweepConfig {
    let cfg = SweepConfig::from_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for p in cfg.points().unwrap() {
        TrainRunner::default().check(&cfg.point_config(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.id()));
    }
    cfg
}

/// The sweep configs under validation/sweeps/ (not the include files in its subfolders).
fn sweep_config_paths() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("validation/sweeps");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths
}

#[test]
fn every_axis_and_preset_has_a_valid_sweep_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("validation/sweeps");
    let expected: [(Axis, [usize; 2]); 4] =
        [(Axis::Width, [64, 512]), (Axis::Depth, [2, 16]), (Axis::Experts, [8, 64]), (Axis::ExpertHidden, [32, 256])];
    for (axis, [lo, hi]) in expected {
        let mut budgets = Vec::new();
        for preset in ["moe-completep", "sp", "mup"] {
            let path = dir.join(format!("{}_{preset}.toml", axis.name()));
            let cfg = valid_config(&path);
            assert_eq!(cfg.grid.axis, axis, "{}", path.display());
            assert_eq!(cfg.grid.presets, vec![preset.to_string()]);
            assert_eq!(cfg.grid.sizes.first(), Some(&lo));
            assert_eq!(cfg.grid.sizes.last(), Some(&hi));
            assert!(cfg.grid.lr_log2.len() >= 7, "an optimum needs room on both sides");
            budgets.push(cfg.base["steps"].as_integer().unwrap());
        }
        // The presets of one axis are compared at the same token budget.
        assert!(budgets.windows(2).all(|w| w[0] == w[1]), "{}: {budgets:?}", axis.name());
    }
}

#[test]
fn every_sweep_config_under_validation_is_valid() {
    // Follow-up and tiny sweeps too: a config that no longer parses would only fail when someone reruns it.
    let paths = sweep_config_paths();
    for path in &paths {
        valid_config(path);
    }
    assert!(paths.len() >= 14, "found {} sweep configs", paths.len());
}

#[test]
fn width_mup_trains_the_networks_of_width_moe_completep_and_no_other_pair_does() {
    // The report treats width x mup as the same experiment as width x moe-completep; this pins why. Along
    // every other axis muP resolves to different hyperparameters (residual scaling along depth, expert_down
    // rate along expert hidden, Adam epsilon along experts), so those sweeps are experiments of their own.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("validation/sweeps");
    let load = |name: &str| valid_config(&dir.join(format!("{name}.toml")));
    for axis in ["width", "depth", "experts", "expert_hidden"] {
        let reference = load(&format!("{axis}_moe-completep"));
        for preset in ["sp", "mup"] {
            let same = load(&format!("{axis}_{preset}")).same_networks(&reference).unwrap();
            assert_eq!(same, axis == "width" && preset == "mup", "{axis}_{preset}");
        }
    }
}

#[test]
fn every_config_with_committed_results_still_resolves_to_the_base_they_ran_with() {
    // Results are committed beside their configs. A config edited later (a moved `[base] include`, a changed
    // multiplier) that no longer matches its results' manifest would make `--resume` refuse the folder, or,
    // worse, a reader take the results for the edited config's; so a config and its manifest must agree.
    let mut n = 0;
    for path in sweep_config_paths() {
        let manifest = path.with_file_name("results").join(path.file_stem().unwrap()).join("sweep.toml");
        if !manifest.is_file() {
            continue;
        }
        let cfg = valid_config(&path);
        let ran: SweepConfig = toml::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        assert!(cfg.base == ran.base, "{}: [base] differs from {}", path.display(), manifest.display());
        assert_eq!(cfg.grid.lr_groups, ran.grid.lr_groups, "{}", path.display());
        n += 1;
    }
    assert!(n >= 20, "found {n} configs with results");
}
