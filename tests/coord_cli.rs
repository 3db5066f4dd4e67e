//! `moe-dmft coord-check` from the command line: bad input exits 2 naming the field; both models write
//! their JSON result under the documented file name.

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moe-dmft")).arg("coord-check").args(args).output().expect("binary runs")
}

fn assert_invalid(args: &[&str], field: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(&format!("`{field}`")), "{args:?} should name `{field}`: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_names_the_field() {
    assert_invalid(&["--model", "rnn"], "model");
    assert_invalid(&["--model", "transformer", "--norm"], "norm");
    assert_invalid(&["--model", "transformer", "--mean-field"], "mean_field");
    assert_invalid(&["--axis", "height"], "axis");
    assert_invalid(&["--optimizer", "lion"], "optimizer");
    assert_invalid(&["--axis", "width", "--sizes", "16,x"], "sizes");
    assert_invalid(&["--base-active", "9"], "base_active");
}

#[test]
fn both_models_write_their_results() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let common = ["--axis", "width", "--sizes", "16,32", "--seeds", "2", "--steps", "2", "--base-width", "16", "--base-expert-hidden", "16", "--base-experts", "4"];
    for (model, file) in [("resnet", "moe-completep_adam_width.json"), ("transformer", "transformer_moe-completep_adam_width.json")] {
        let mut args = vec!["--model", model, "--out", out_dir];
        args.extend_from_slice(&common);
        let out = run(&args);
        assert!(out.status.success(), "{model}: {}", String::from_utf8_lossy(&out.stderr));
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(file)).unwrap()).unwrap();
        let names: Vec<&str> = json["quantities"].as_array().unwrap().iter().filter_map(|q| q["name"].as_str()).collect();
        assert!(names.contains(&"delta.residual"), "{model}: {names:?}");
        // Only the transformer has attention groups.
        assert_eq!(names.contains(&"grad.attn_qkv"), model == "transformer", "{model}: {names:?}");
    }
}
