//! `moe-dmft bench` end to end at tiny sizes: it prints both models and the ratio, writes consistent
//! JSON, and rejects bad flags with exit code 2 naming the flag.

use std::process::Command;

/// Runs `moe-dmft bench` at tiny sizes; `args` are extra flags, or replace a tiny-size flag of the same name.
fn bench(args: &[&str]) -> std::process::Output {
    let mut flags: Vec<(String, String)> = [
        ("--width", "16"),
        ("--depth", "1"),
        ("--experts", "4"),
        ("--active", "2"),
        ("--expert-hidden", "8"),
        ("--heads", "2"),
        ("--seq", "8"),
        ("--batch", "2"),
        ("--steps", "3"),
        ("--warmup", "1"),
    ]
    .iter()
    .map(|(f, v)| (f.to_string(), v.to_string()))
    .collect();
    for pair in args.chunks(2) {
        match flags.iter_mut().find(|(f, _)| f == pair[0]) {
            Some(slot) => slot.1 = pair[1].to_string(),
            None => flags.push((pair[0].to_string(), pair[1].to_string())),
        }
    }
    Command::new(env!("CARGO_BIN_EXE_moe-dmft"))
        .arg("bench")
        .args(flags.iter().flat_map(|(f, v)| [f.as_str(), v.as_str()]))
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .expect("run moe-dmft")
}

#[test]
fn bench_reports_moe_dense_and_ratio_in_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = bench(&["--json", json.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("moe (M=4, k=2, n=8)") && stdout.contains("dense (hidden 16)"),
        "{stdout}"
    );
    assert!(stdout.contains("ratio MoE / dense"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let timings = report["timings"].as_array().unwrap();
    assert_eq!(timings.len(), 3);
    let (moe, dense) = (&timings[0], &timings[1]);
    let ratio = report["ratio_moe_over_dense"].as_f64().unwrap();
    let expected = moe["median_s"].as_f64().unwrap() / dense["median_s"].as_f64().unwrap();
    assert!((ratio - expected).abs() < 1e-12);
    // Equal active parameters up to the router (M x N per MoE block) and the layer norms' bookkeeping.
    let (a_moe, a_dense) = (
        moe["active_params"].as_u64().unwrap(),
        dense["active_params"].as_u64().unwrap(),
    );
    assert_eq!(
        a_moe - a_dense,
        4 * 16,
        "MoE active params exceed the dense ones by the router only"
    );
    let tokens_per_s = moe["tokens_per_s"].as_f64().unwrap();
    assert!((tokens_per_s * moe["median_s"].as_f64().unwrap() - 16.0).abs() < 1e-6);
}

#[test]
fn bench_rejects_bad_flags_with_exit_code_2() {
    for (args, field) in [
        (vec!["--threads", "0"], "--threads"),
        (vec!["--steps", "0"], "--steps"),
        (vec!["--active", "5"], "model.sizes.active"),
        (vec!["--heads", "3"], "model.n_head"),
    ] {
        let out = bench(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(field), "{args:?}: {stderr}");
    }
}
