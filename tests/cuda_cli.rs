//! `moe-dmft gpu probe` on a machine without a GPU (or in a build without the `cuda` feature) exits with
//! code 2 and a message, never a panic; on a machine with one it prints the device as JSON.

use std::process::Command;

#[test]
fn gpu_probe_exits_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_moe-dmft")).args(["gpu", "probe"]).output().expect("binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stderr.contains("panicked"), "no panic may reach the user: {stderr}");
    match out.status.code() {
        Some(0) => {
            let v: serde_json::Value = serde_json::from_str(&stdout).expect("probe prints JSON");
            assert!(v["name"].as_str().is_some_and(|s| !s.is_empty()), "{stdout}");
        }
        Some(2) => assert!(stderr.contains("not available"), "message names the problem: {stderr}"),
        other => panic!("unexpected exit {other:?}: {stderr}"),
    }
}

#[test]
fn gpu_check_of_a_missing_config_is_a_clean_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_moe-dmft"))
        .args(["gpu", "check", "--config", "/nonexistent/run.toml", "--out", "/tmp/never.json"])
        .output()
        .expect("binary runs");
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}
