//! End-to-end checks of `moe-dmft sweep` through the built binary: a sweep killed with SIGKILL and run
//! again finishes with exactly one result per grid point and repeats no finished point; shards run as
//! separate processes partition the grid; bad input exits with code 2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_moe-dmft");

/// A tiny MoE-Transformer on a seeded Markov token stream (no corpus needed): 2 presets x 2 widths x 4 LRs
/// = 16 points of roughly 0.1 s each on one thread.
fn write_config(dir: &Path, steps: usize) -> PathBuf {
    let text = format!(
        r#"
[base]
seed = 0
threads = 1
steps = {steps}
[base.model]
arch = "transformer"
vocab = 16
seq_len = 16
n_head = 2
[base.model.sizes]
width = 16
depth = 1
experts = 4
active = 1
expert_hidden = 16
[base.param]
preset = "moe-completep"
optimizer = "adam"
lr = 0.01
base = {{ width = 16, depth = 1, experts = 4, active = 1, expert_hidden = 16 }}
[base.optim]
batch_size = 4
eval_every = 0
[base.data]
kind = "markov"
vocab_size = 16
branching = 3
length = 4000
seed = 1
validation_windows = 8

[grid]
axis = "width"
sizes = [16, 32]
lr_log2 = [-9, -7, -5, -3]
presets = ["moe-completep", "sp"]
"#
    );
    let path = dir.join("sweep.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn sweep_cmd(config: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("sweep").arg("--config").arg(config).arg("--out").arg(out).args(extra);
    c.env("OPENBLAS_NUM_THREADS", "1");
    c
}

/// id -> bytes of `runs/<id>/result.json` for every finished point; also checks that `runs/` holds
/// nothing but finished points and the `.partial` folder.
fn results(out: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut map = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(out.join("runs")) else { return map };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == ".partial" {
            continue;
        }
        let rec = e.path().join("result.json");
        assert!(rec.is_file(), "runs/{name} has no result.json: only finished points may appear in runs/");
        map.insert(name, std::fs::read(rec).unwrap());
    }
    map
}

fn record(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

#[test]
fn killed_sweep_resumes_with_exactly_one_result_per_point() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 120);
    let out = dir.path().join("out");

    let mut child = sweep_cmd(&config, &out, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let first_pid = child.id() as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    while results(&out).is_empty() {
        assert!(Instant::now() < deadline, "no result appeared within 120 s");
        assert!(child.try_wait().unwrap().is_none(), "the sweep exited before its first result was seen");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL on Unix: no cleanup runs.
    child.wait().unwrap();
    let before = results(&out);
    assert!(!before.is_empty());
    assert!(before.len() < 16, "the sweep finished all 16 points before the kill: the test proves nothing");

    let status = sweep_cmd(&config, &out, &["--resume"]).stdout(Stdio::null()).status().unwrap();
    assert!(status.success());
    let after = results(&out);
    assert_eq!(after.len(), 16, "exactly one result per grid point");
    for (id, bytes) in &before {
        assert_eq!(after.get(id), Some(bytes), "finished point {id} was repeated or changed");
        assert_eq!(record(bytes)["pid"].as_u64(), Some(first_pid));
    }
    let rerun: Vec<&String> = after
        .iter()
        .filter(|(id, b)| !before.contains_key(*id) && record(b)["pid"].as_u64() != Some(first_pid))
        .map(|(id, _)| id)
        .collect();
    assert_eq!(rerun.len(), 16 - before.len());
    // The point in flight at the kill left a partial folder; the rerun cleaned it up.
    let partial = std::fs::read_dir(out.join("runs/.partial")).unwrap().count();
    assert_eq!(partial, 0);

    // A third run does nothing, and the interrupted sweep equals one run without interruption.
    let again = sweep_cmd(&config, &out, &[]).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 ran"));
    assert_eq!(results(&out), after);
    let clean = dir.path().join("clean");
    assert!(sweep_cmd(&config, &clean, &[]).stdout(Stdio::null()).status().unwrap().success());
    for (id, bytes) in results(&clean) {
        let (a, b) = (record(&bytes), record(&after[&id]));
        assert_eq!(a["val_loss"], b["val_loss"], "{id}: same seed and threads must give the same result");
        assert_eq!(a["status"], b["status"]);
    }
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["done"].as_u64(), Some(16));
    assert!(out.join("summary.md").is_file());
    assert!(out.join("figures/lr_curves.png").is_file());
}

#[test]
fn shards_in_parallel_processes_partition_the_grid() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let out = dir.path().join("out");
    let children: Vec<_> = (0..3)
        .map(|i| sweep_cmd(&config, &out, &["--shard", &format!("{i}/3")]).stdout(Stdio::null()).spawn().unwrap())
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let all = results(&out);
    assert_eq!(all.len(), 16);
    for (id, bytes) in &all {
        let r = record(bytes);
        let index = r["point"]["index"].as_u64().unwrap();
        assert_eq!(r["shard"]["index"].as_u64(), Some(index % 3), "{id} ran in the wrong shard");
    }
    let o = sweep_cmd(&config, &out, &["--summary-only"]).output().unwrap();
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("16 of 16 grid points done"));

    // `figures` puts the finished sweep's optimum-LR table into the validation report.
    let validation = dir.path().join("validation");
    let named = validation.join("sweeps/results/width_moe-completep");
    std::fs::create_dir_all(named.parent().unwrap()).unwrap();
    std::fs::rename(&out, &named).unwrap();
    let report = dir.path().join("REPORT.md");
    let o = Command::new(BIN)
        .args(["figures", "--validation"])
        .arg(&validation)
        .arg("--out")
        .arg(dir.path().join("figures"))
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&report).unwrap();
    let section = &text[text.find("## HP transfer on text").expect("no HP-transfer section")..];
    for preset in ["moe-completep", "sp"] {
        let row = section.lines().find(|l| l.starts_with(&format!("| width_moe-completep | width | {preset} |"))).expect(preset);
        assert!(row.contains("16: ") && row.contains("32: ") && row.contains("8 (0) / 8"), "{row}");
    }
    assert!(section.contains("Not run yet: `width_sp`, `width_mup`, `depth_moe-completep`"), "{section}");
}

#[test]
fn bad_input_exits_with_code_2_and_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), 10);
    let out = dir.path().join("out");
    let o = sweep_cmd(&config, &out, &["--shard", "3/3"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("shard"));

    let o = sweep_cmd(&dir.path().join("missing.toml"), &out, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));

    // Summarizing a folder that does not exist is a typo in --out: named, and nothing is created.
    let o = sweep_cmd(&config, &dir.path().join("no-such-sweep"), &["--summary-only"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("out"));
    assert!(!dir.path().join("no-such-sweep").exists());

    let text = std::fs::read_to_string(&config).unwrap().replace("sizes = [16, 32]", "sizes = [16, 0]");
    std::fs::write(&config, text).unwrap();
    let o = sweep_cmd(&config, &out, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("grid.sizes"));

    // A missing corpus stops the sweep at its first point with code 2, leaving no result.
    let corpus = dir.path().join("corpus.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace("sizes = [16, 0]", "sizes = [16, 32]");
    let text = text.replace(
        "kind = \"markov\"\nvocab_size = 16\nbranching = 3\nlength = 4000\nseed = 1",
        &format!("kind = \"shakespeare\"\ncorpus_dir = \"{}\"", dir.path().join("no-corpus").display()),
    );
    assert!(text.contains("no-corpus"));
    std::fs::write(&corpus, text).unwrap();
    let o = sweep_cmd(&corpus, &dir.path().join("out_corpus"), &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(results(&dir.path().join("out_corpus")).is_empty());

    // A grid point the trainer rejects fails the sweep before anything runs.
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("sizes = [16, 0]", "sizes = [16, 32]")
        .replace("n_head = 2", "n_head = 3");
    std::fs::write(&config, text).unwrap();
    let o = sweep_cmd(&config, &out, &[]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!out.join("runs").exists() || results(&out).is_empty());
}
