//! `moe-dmft param` through the built binary: the JSON of SPEC §4, the other formats, one test per
//! bad-input rule (exit code 2, message naming the field), and a fuzz of the TOML path (never a panic).

use std::io::Write;
use std::process::{Command, Output};

use proptest::prelude::*;

const BIN: &str = env!("CARGO_BIN_EXE_moe-dmft");

fn param(args: &[&str]) -> Output {
    Command::new(BIN).arg("param").args(args).env("OPENBLAS_NUM_THREADS", "1").output().expect("binary runs")
}

const SIZES: [&str; 10] = ["--width", "256", "--depth", "4", "--experts", "16", "--active", "2", "--expert-hidden", "128"];

fn with_sizes(extra: &[&str]) -> Vec<String> {
    SIZES.iter().chain(extra).map(|s| s.to_string()).collect()
}

fn run(args: &[String]) -> Output {
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    param(&a)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit code 2 and a message naming `field`.
fn rejects(o: &Output, field: &str) {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(o));
    let e = stderr(o);
    assert!(e.contains(field), "message should name `{field}`: {e}");
    assert!(!e.contains("internal failure") && !e.contains("panicked"), "{e}");
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

#[test]
fn json_is_spec_shaped() {
    let o = run(&with_sizes(&["--base-width", "64", "--base-expert-hidden", "32", "--optimizer", "adam", "--format", "json"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let obj = v.as_object().unwrap();
    let mut keys: Vec<_> = obj.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["base", "groups", "optimizer", "preset", "residual_multiplier", "sizes"]);
    assert_eq!(v["preset"], "moe-completep");
    assert_eq!(v["optimizer"], "adam");
    assert_eq!(v["sizes"]["width"], 256);
    assert_eq!(v["base"]["width"], 64);
    assert_eq!(v["base"]["depth"], 4);
    let groups = v["groups"].as_array().unwrap();
    let names: Vec<_> = groups.iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["embedding", "attn_qkv", "attn_out", "router", "expert_up", "expert_down", "expert_bias", "norm", "unembedding", "readout"]
    );
    for g in groups {
        let mut k: Vec<_> = g.as_object().unwrap().keys().cloned().collect();
        k.sort();
        assert_eq!(k, ["adam_eps", "exponents", "init_std", "lr", "multiplier", "name", "weight_decay"]);
        for axis in ["width", "depth", "experts", "expert_hidden"] {
            let e = g["exponents"][axis].as_object().unwrap();
            let mut k: Vec<_> = e.keys().cloned().collect();
            k.sort();
            assert_eq!(k, ["adam_eps", "init_var", "lr", "multiplier"]);
            assert!(e["adam_eps"].is_number());
        }
    }
    // Width x4 from the base: expert_up lr x 1/4 of the base LR 1.
    let up = groups.iter().find(|g| g["name"] == "expert_up").unwrap();
    assert_eq!(up["lr"].as_f64().unwrap(), 0.25);
    assert_eq!(up["exponents"]["width"]["lr"].as_f64().unwrap(), -1.0);

    // SGD: adam_eps is null, values and exponents alike; --lr scales every lr.
    let o = run(&with_sizes(&["--optimizer", "sgd", "--lr", "0.5", "--format", "json"]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for g in v["groups"].as_array().unwrap() {
        assert!(g["adam_eps"].is_null());
        assert!(g["exponents"]["width"]["adam_eps"].is_null());
        assert_eq!(g["lr"].as_f64().unwrap(), 0.5);
    }
}

#[test]
fn table_markdown_and_torch_formats() {
    let o = run(&with_sizes(&["--preset", "mup"]));
    assert!(o.status.success());
    let t = String::from_utf8(o.stdout).unwrap();
    assert!(t.contains("preset mup") && t.contains("expert_down"), "{t}");

    let o = run(&with_sizes(&["--format", "markdown"]));
    let t = String::from_utf8(o.stdout).unwrap();
    assert!(t.contains("| group | init std |") && t.contains("| router |"), "{t}");

    let o = run(&with_sizes(&["--format", "torch", "--base-width", "64", "--base-expert-hidden", "32"]));
    let t = String::from_utf8(o.stdout).unwrap();
    assert!(t.contains("param_groups = [\n"), "{t}");
    assert!(t.contains(r#"{"params": groups["expert_up"], "lr": 0.25, "eps": "#), "{t}");
    assert!(t.contains("# expert_up: init_std="), "{t}");
    assert!(t.trim_end().lines().any(|l| l == "]"), "{t}");
    let o = run(&with_sizes(&["--format", "torch", "--optimizer", "sgd"]));
    let t = String::from_utf8(o.stdout).unwrap();
    assert!(!t.contains("\"eps\""), "{t}");
}

#[test]
fn config_file_and_flags_combine() {
    let f = config_file(
        "[sizes]\nwidth = 128\ndepth = 2\nexperts = 8\nactive = 1\nexpert_hidden = 64\n[param]\npreset = \"completep\"\noptimizer = \"sgd\"\nbase = { width = 64, depth = 2, experts = 8, active = 1, expert_hidden = 32 }\n",
    );
    let path = f.path().to_str().unwrap();
    let o = param(&["--config", path, "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["preset"], "completep");
    assert_eq!(v["sizes"]["width"], 128);
    // A flag overrides the file.
    let o = param(&["--config", path, "--width", "256", "--expert-hidden", "128", "--format", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["sizes"]["width"], 256);
    assert_eq!(v["base"]["width"], 64);
}

#[test]
fn rejects_active_above_experts() {
    let o = param(&["--width", "64", "--depth", "2", "--experts", "4", "--active", "5", "--expert-hidden", "32"]);
    rejects(&o, "active");
    let o = run(&with_sizes(&["--base-experts", "2", "--base-active", "3"]));
    rejects(&o, "base.active");
}

#[test]
fn rejects_zero_and_negative_sizes() {
    for (flag, field) in [("--width", "width"), ("--depth", "depth"), ("--experts", "experts"), ("--expert-hidden", "expert_hidden")] {
        for v in ["0", "-3"] {
            let mut a = with_sizes(&[]);
            let i = a.iter().position(|s| s == flag).unwrap();
            a[i + 1] = v.into();
            rejects(&run(&a), field);
        }
    }
    rejects(&run(&with_sizes(&["--base-width", "0"])), "base.width");
    rejects(&run(&with_sizes(&["--base-depth", "-1"])), "base.depth");
    let f = config_file("[sizes]\nwidth = -4\ndepth = 2\nexperts = 8\nactive = 1\nexpert_hidden = 32\n");
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "width");
}

#[test]
fn rejects_missing_sizes() {
    rejects(&param(&["--width", "64"]), "depth");
}

#[test]
fn rejects_kappa_change() {
    // base kappa 1/8; experts 32 with active 2 gives 1/16; the message says active = 4 is implied.
    let o = param(&[
        "--width", "64", "--depth", "2", "--experts", "32", "--active", "2", "--expert-hidden", "32", "--base-experts", "8",
        "--base-active", "1",
    ]);
    rejects(&o, "active");
    assert!(stderr(&o).contains("implies active = 4"), "{}", stderr(&o));
}

#[test]
fn rejects_bad_learning_rates() {
    for lr in ["NaN", "inf", "-inf", "0", "-0.1"] {
        rejects(&run(&with_sizes(&["--lr", lr])), "lr");
    }
    let f = config_file("[sizes]\nwidth = 64\ndepth = 2\nexperts = 8\nactive = 1\nexpert_hidden = 32\n[param]\nlr = nan\n");
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "lr");
}

#[test]
fn rejects_unknown_preset_and_optimizer() {
    let o = run(&with_sizes(&["--preset", "mupp"]));
    rejects(&o, "preset");
    assert!(stderr(&o).contains("moe-completep"));
    rejects(&run(&with_sizes(&["--optimizer", "lion"])), "optimizer");
    let f = config_file("[param]\noptimizer = \"lion\"\n");
    rejects(&param(&["--config", f.path().to_str().unwrap(), "--width", "8", "--depth", "1", "--experts", "2", "--active", "1", "--expert-hidden", "8"]), "optimizer");
}

#[test]
fn rejects_malformed_toml_unknown_keys_and_missing_file() {
    let f = config_file("[param\npreset = \"sp\"\n");
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "TOML");
    let f = config_file("[param]\nlearning_rate = 0.1\n");
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "learning_rate");
    let f = config_file("[param.groups.router]\nlr_scal = 2.0\n");
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "lr_scal");
    let f = config_file("[model]\nwidth = 3\n");
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "model");
    rejects(&param(&["--config", "/nonexistent/param.toml"]), "/nonexistent/param.toml");
}

#[test]
fn rejects_bad_group_definitions() {
    let sizes = "[sizes]\nwidth = 64\ndepth = 2\nexperts = 8\nactive = 1\nexpert_hidden = 32\n";
    let f = config_file(&format!("{sizes}[param.groups.shared]\nrole = \"hidden\"\n"));
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "groups.shared");
    let f = config_file(&format!("{sizes}[param.groups.router]\nfeeds = \"nowhere\"\n"));
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "nowhere");
    let f = config_file(&format!("{sizes}[param.groups.expert_up]\nfeeds = \"expert_up\"\n"));
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "cycle");
    let f = config_file(&format!("{sizes}[param]\nform = \"mean-field\"\n"));
    rejects(&param(&["--config", f.path().to_str().unwrap()]), "form");
}

const VALID: &str = "[sizes]\nwidth = 64\ndepth = 2\nexperts = 8\nactive = 1\nexpert_hidden = 32\n[param]\npreset = \"moe-completep\"\noptimizer = \"adam\"\nlr = 0.01\nsigma_router = 0.5\nbase = { width = 32, depth = 1, experts = 16, active = 2, expert_hidden = 16 }\n[param.groups.router]\nlr_scale = 2.0\nfeeds = \"expert_up\"\n[param.groups.router.exponents.width]\nlr = -0.5\n";

fn survives(text: &str) -> Result<(), TestCaseError> {
    let f = config_file(text);
    let o = param(&["--config", f.path().to_str().unwrap(), "--format", "json"]);
    let code = o.status.code();
    prop_assert!(code == Some(0) || code == Some(2), "exit {:?} for {:?}: {}", code, text, stderr(&o));
    prop_assert!(!stderr(&o).contains("internal failure"), "{}", stderr(&o));
    Ok(())
}

#[test]
fn valid_fuzz_seed_is_accepted() {
    let f = config_file(VALID);
    let o = param(&["--config", f.path().to_str().unwrap(), "--format", "json"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics(text in "\\PC{0,200}") {
        survives(&text)?;
    }

    #[test]
    fn mutated_config_never_panics(edits in proptest::collection::vec((0usize..400, 0usize..4, "[-0-9a-z=\\[\\]{}.\"e ,\n]{0,6}"), 1..5)) {
        let mut text: Vec<char> = VALID.chars().collect();
        for (pos, op, s) in edits {
            let p = pos % (text.len() + 1);
            match op {
                0 => { text.splice(p..p, s.chars()); }
                1 => { let end = (p + s.len().max(1)).min(text.len()); text.drain(p..end); }
                2 => { let end = (p + s.len()).min(text.len()); text.splice(p..end, s.chars()); }
                _ => { let end = (p + 3).min(text.len()); let dup: Vec<char> = text[p..end].to_vec(); text.splice(p..p, dup); }
            }
        }
        survives(&text.into_iter().collect::<String>())?;
    }

    #[test]
    fn random_flags_never_panic(
        nums in proptest::collection::vec(prop_oneof![Just(i64::MAX), Just(0i64), -5i64..5, 1i64..100_000], 10),
        lr in prop_oneof![Just("1e308".to_string()), Just("-0".to_string()), Just("1e-320".to_string()), "[-0-9.e]{1,8}"],
        preset in prop_oneof![Just("sp"), Just("mup"), Just("completep"), Just("moe-completep"), Just("x")],
        optimizer in prop_oneof![Just("sgd"), Just("adam"), Just("")],
    ) {
        let flags = ["--width", "--depth", "--experts", "--active", "--expert-hidden", "--base-width", "--base-depth",
                     "--base-experts", "--base-active", "--base-expert-hidden"];
        let mut args: Vec<String> = Vec::new();
        for (f, v) in flags.iter().zip(&nums) {
            args.push(f.to_string());
            args.push(v.to_string());
        }
        args.extend(["--lr".into(), lr, "--preset".into(), preset.into(), "--optimizer".into(), optimizer.into(), "--format".into(), "json".into()]);
        let o = run(&args);
        let code = o.status.code();
        prop_assert!(code == Some(0) || code == Some(2), "exit {:?} for {:?}: {}", code, args, stderr(&o));
    }
}
