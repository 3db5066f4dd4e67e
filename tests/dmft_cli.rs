//! `moe-dmft solve`: outputs on disk, exit code 2 for a finite size in the config.

use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_moe-dmft"))
}

#[test]
fn dmft_cli_rejects_width_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "kappa = 0.25\nwidth = 512\n").unwrap();
    let out = bin()
        .args(["solve", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("width") && err.contains("not inputs"), "{err}");
    std::fs::write(&cfg, "kappa = 0.25\n[resolution]\nexpert_hidden = 64\n").unwrap();
    let out = bin()
        .args(["solve", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(dir.path().join("o"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn dmft_cli_writes_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ok.toml");
    std::fs::write(
        &cfg,
        "kappa = 0.5\nsteps = 3\ndepth = 2\n[task]\npoints = 5\ninput_dim = 3\n\
         [resolution]\nexpert_samples = 16\nneuron_samples = 8\nrepeats = 2\n",
    )
    .unwrap();
    let out_dir = dir.path().join("run");
    let out = bin()
        .args(["solve", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "config.toml",
        "metrics.jsonl",
        "summary.json",
        "task_x.npy",
        "task_y.npy",
        "predictions.npy",
        "kernels.npy",
        "moe_kernels.npy",
        "thresholds.npy",
        "load_quantiles.npy",
        "loss_repeats.npy",
    ] {
        assert!(out_dir.join(f).exists(), "missing {f}");
    }
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[3]["step"], 3);
    assert!(lines[3]["loss"].as_f64().unwrap() < lines[0]["loss"].as_f64().unwrap());
    assert!(lines[3]["loss_err"].as_f64().is_some());
    assert_eq!(
        lines[0]["q"].as_array().unwrap().len(),
        2,
        "one threshold vector per block"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["status"], "ok");
    assert!(summary["loss_convention"]
        .as_str()
        .unwrap()
        .contains("0.5 * mean over samples"));
    let pred: ndarray::Array2<f64> =
        ndarray_npy::read_npy(out_dir.join("predictions.npy")).unwrap();
    assert_eq!(pred.dim(), (4, 5));
    let kern: ndarray::Array4<f64> = ndarray_npy::read_npy(out_dir.join("kernels.npy")).unwrap();
    assert_eq!(kern.dim(), (4, 3, 5, 5));
    // The resolved config reads back as the same solver config.
    let text = std::fs::read_to_string(out_dir.join("config.toml")).unwrap();
    let back = moe_dmft::dmft::SolveConfig::from_toml_str(&text).unwrap();
    assert_eq!(back.depth, 2);
    assert_eq!(back.resolution.expert_samples, 16);
}
