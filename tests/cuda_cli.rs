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

/// `device = "cuda"` (or `train --device cuda`) on a machine without a GPU, or in a build without the
/// feature: exit 2 naming what is missing, and nothing written. The same config on the CPU records no
/// `device` key, so CPU runs' `config.toml` files are unchanged by the option.
#[test]
fn training_on_cuda_without_a_gpu_is_a_clean_error_that_writes_nothing() {
    if moe_dmft::cuda::probe().is_ok() {
        eprintln!("skipped: a GPU is present");
        return;
    }
    let dir = std::env::temp_dir().join(format!("moe_cuda_cli_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/validation/gpu/train_transformer.toml");
    let gpu_out = dir.join("gpu");
    let out = Command::new(env!("CARGO_BIN_EXE_moe-dmft"))
        .args(["train", "--config", config, "--device", "cuda", "--out"])
        .arg(&gpu_out)
        .output()
        .expect("binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not available"), "names what is missing: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!gpu_out.exists(), "nothing may be written before the device is up");

    let mut cfg = moe_dmft::train::TrainConfig::from_file(std::path::Path::new(config)).expect("config parses");
    cfg.steps = 1;
    cfg.device = moe_dmft::train::Device::Cuda;
    let text = toml::to_string(&cfg).expect("serializes");
    assert!(text.contains("device = \"cuda\""), "{text}");
    let back = moe_dmft::train::TrainConfig::from_toml_str(&text).expect("round trip");
    assert_eq!(back.device, moe_dmft::train::Device::Cuda);
    cfg.device = moe_dmft::train::Device::Cpu;
    assert!(!toml::to_string(&cfg).expect("serializes").contains("device"), "CPU configs stay as they were");
}
