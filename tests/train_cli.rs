//! `moe-dmft train` end to end through the built binary: determinism, the outputs and their format,
//! divergence as a recorded status, and bad input as exit code 2 with the field named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use moe_dmft::model::io::load_safetensors;
use moe_dmft::train::TrainConfig;

const BIN: &str = env!("CARGO_BIN_EXE_moe-dmft");

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(name)
}

fn train(config: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(BIN)
        .args(["train", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(extra)
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn records(dir: &Path) -> Vec<serde_json::Value> {
    read(&dir.join("metrics.jsonl")).lines().map(|l| serde_json::from_str(l).expect("each line is JSON")).collect()
}

/// A small resnet config in TOML with `patch` appended to the `[param]` section's keys.
fn resnet_config(param_extra: &str, routing_extra: &str, steps: usize) -> String {
    format!(
        r#"seed = 3
threads = 2
steps = {steps}

[model]
arch = "resnet"
input_dim = 4

[model.sizes]
width = 32
depth = 2
experts = 4
active = 2
expert_hidden = 16

[model.routing]
{routing_extra}

[param]
preset = "moe-completep"
optimizer = "sgd"
lr = 0.05
{param_extra}

[data]
kind = "synthetic"

[data.task]
points = 16
input_dim = 4
"#
    )
}

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let p = dir.join("run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn same_seed_and_threads_give_identical_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    for cfg in ["train_resnet_tiny.toml", "train_transformer_markov_tiny.toml"] {
        let (a, b) = (tmp.path().join(format!("{cfg}.a")), tmp.path().join(format!("{cfg}.b")));
        for dir in [&a, &b] {
            let o = train(&example(cfg), dir, &[]);
            assert!(o.status.success(), "{cfg}: {}", stderr(&o));
        }
        let (ma, mb) = (read(&a.join("metrics.jsonl")), read(&b.join("metrics.jsonl")));
        assert!(!ma.is_empty());
        assert_eq!(ma, mb, "{cfg}: metrics differ between two identical runs");
        // A different seed must change the run (so the equality above is not vacuous).
        let text = read(&example(cfg)).replacen("seed = 0", "seed = 1", 1);
        let c = tmp.path().join(format!("{cfg}.c"));
        let o = train(&write_config(tmp.path(), &text), &c, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_ne!(ma, read(&c.join("metrics.jsonl")), "{cfg}: the seed has no effect");
    }
}

#[test]
fn resnet_outputs_are_present_and_well_formed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = train(&example("train_resnet_tiny.toml"), &out, &["--threads", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));

    let cfg = TrainConfig::from_file(&example("train_resnet_tiny.toml")).unwrap();
    let recs = records(&out);
    assert_eq!(recs.len(), cfg.steps + 1, "one record per step plus the trained model's");
    for (t, r) in recs.iter().enumerate() {
        assert_eq!(r["step"].as_u64(), Some(t as u64));
        assert!(r["loss"].as_f64().unwrap().is_finite());
        assert_eq!(r["load"].as_array().unwrap().len(), 2, "load statistics of both MoE layers");
        let frac: f64 = r["load"][0]["fraction"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((frac - 1.0).abs() < 1e-9, "load fractions sum to {frac}");
        for g in ["embedding", "router", "expert_up", "expert_down", "readout"] {
            assert!(r["groups"][g]["param"].as_f64().unwrap() >= 0.0, "group {g} missing at step {t}");
        }
    }
    assert!(recs[0]["val_loss"].as_f64().is_some(), "validation at step 0");
    assert!(recs[1].get("val_loss").is_none(), "no validation between evaluations");
    assert_eq!(recs.last().unwrap()["final"], serde_json::Value::Bool(true));
    assert!(recs[0]["groups"]["expert_up"]["update"].as_f64().unwrap() > 0.0);
    let first = recs[0]["loss"].as_f64().unwrap();
    let last = recs.last().unwrap()["loss"].as_f64().unwrap();
    assert!(last < 0.5 * first, "training barely reduced the loss: {first} -> {last}");

    let summary: serde_json::Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(summary["status"], "ok");
    assert_eq!(summary["loss_convention"], "0.5 * mean over samples of (f - y)^2");
    assert_eq!(summary["final_loss"].as_f64(), Some(last));
    assert!(summary["params_active"].as_u64().unwrap() < summary["params_total"].as_u64().unwrap());
    assert_eq!(summary["threads"], 1);
    // The BLAS kernel set is the third thing (with seed and threads) a bit-for-bit rerun needs.
    let core = moe_dmft::blas_core();
    assert!(!core.is_empty() && core != "unknown", "OpenBLAS names no kernel set: {core:?}");
    assert_eq!(summary["blas_core"], core.as_str());

    // config.toml is the config as run plus the resolved table, and can be run again.
    let written = TrainConfig::from_file(&out.join("config.toml")).unwrap();
    let resolved = written.resolved.as_ref().expect("resolved per-group table");
    assert!(resolved.groups.iter().any(|g| g.group == moe_dmft::param::Group::Router));
    assert_eq!(written.threads, 1);

    let x: ndarray::Array2<f64> = ndarray_npy::read_npy(out.join("task_x.npy")).unwrap();
    let y: ndarray::Array2<f64> = ndarray_npy::read_npy(out.join("task_y.npy")).unwrap();
    assert_eq!(x.dim(), (128, 8));
    assert_eq!(y.dim(), (128, 1));
    let store = load_safetensors(&out.join("weights.safetensors")).unwrap();
    assert_eq!(store.num_elements(), summary["params_total"].as_u64().unwrap() as usize);
}

#[test]
fn absurd_learning_rate_is_recorded_as_divergence() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_config(tmp.path(), &resnet_config("", "", 30).replace("lr = 0.05", "lr = 1e12"));
    let out = tmp.path().join("run");
    let o = train(&cfg, &out, &[]);
    assert!(o.status.success(), "a diverged run exits 0 so sweeps continue: {}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
    assert_eq!(summary["status"], "diverged");
    let at = summary["diverged_at"].as_u64().expect("step of divergence");
    assert!(at < 30);
    assert!(summary["final_loss"].is_null());
    assert_eq!(records(&out).len() as u64, at + 1, "metrics stop at the diverged step");
}

#[test]
fn bad_input_exits_2_and_names_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, String, &str)> = vec![
        ("malformed TOML", "steps = = 3\n".into(), "cannot parse"),
        ("unknown key", resnet_config("learning_rate = 0.1", "", 5), "learning_rate"),
        ("negative capacity", resnet_config("", "capacity_factor = -1.0", 5), "model.routing.capacity_factor"),
        ("zero steps", resnet_config("", "", 0), "`steps`"),
        ("active > experts", resnet_config("", "", 5).replace("active = 2", "active = 5"), "model.sizes.active"),
        ("negative lr", resnet_config("", "", 5).replace("lr = 0.05", "lr = -1.0"), "param.lr"),
        (
            "missing corpus",
            read(&example("train_transformer_tiny.toml"))
                .replace("kind = \"shakespeare\"", &format!("kind = \"shakespeare\"\ncorpus_dir = {:?}", tmp.path().join("nowhere"))),
            "get_corpus.sh",
        ),
    ];
    for (what, text, needle) in cases {
        let out = tmp.path().join("out");
        let o = train(&write_config(tmp.path(), &text), &out, &[]);
        assert_eq!(o.status.code(), Some(2), "{what}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{what}: stderr does not mention `{needle}`: {}", stderr(&o));
        assert!(!out.join("summary.json").exists(), "{what}: no outputs for bad input");
    }
    let o = train(&tmp.path().join("absent.toml"), &tmp.path().join("out"), &[]);
    assert_eq!(o.status.code(), Some(2), "missing config file: {}", stderr(&o));
    let o = train(&example("train_resnet_tiny.toml"), &tmp.path().join("out"), &["--threads", "0"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--threads"));
}

#[test]
fn every_example_config_validates_and_the_corpus_example_runs_when_present() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.starts_with("train_") && name.ends_with(".toml")) {
            continue;
        }
        let cfg = TrainConfig::from_file(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        cfg.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
        seen += 1;
    }
    assert!(seen >= 3, "expected the resnet, transformer and markov examples, found {seen}");

    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("data-cache/shakespeare/corpus.txt");
    if !corpus.exists() {
        println!("note: Shakespeare corpus absent; train_transformer_tiny.toml not run (scripts/get_corpus.sh fetches it)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = Command::new(BIN)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["train", "--config", "examples/train_transformer_tiny.toml", "--out"])
        .arg(&out)
        .env("OPENBLAS_NUM_THREADS", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_str(&read(&out.join("summary.json"))).unwrap();
    let (first, last) = (summary["initial_loss"].as_f64().unwrap(), summary["final_loss"].as_f64().unwrap());
    // Starts near ln(89) = 4.49 (uniform over the vocabulary) and learns character frequencies at least.
    assert!((first - 89f64.ln()).abs() < 0.3, "initial loss {first}");
    assert!(last < first - 0.3, "loss {first} -> {last}");
}
