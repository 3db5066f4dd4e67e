//! CPU vs GPU on the same weights for the configs of validation/gpu/ (both architectures, every routing
//! path), when a GPU is present; skipped with a message otherwise (this is the test `validation/gpu/run.sh`
//! repeats from the binary on machines without Rust).
#![cfg(feature = "cuda")]

use std::path::Path;

use moe_dmft::cuda::run::check;
use moe_dmft::train::TrainConfig;

#[test]
fn gpu_matches_cpu_on_every_validation_config() {
    if let Err(e) = moe_dmft::cuda::probe() {
        eprintln!("skipped: {e}");
        return;
    }
    for name in [
        "check_transformer",
        "check_transformer_variants",
        "check_softmax_norm",
        "check_variants",
        "check_zero_router",
        "check_index_ties",
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("validation/gpu/{name}.toml"));
        let cfg = TrainConfig::from_file(&path).expect("validation config parses");
        let r = check(&cfg, name, 1e-3).expect("check runs");
        assert!(r.passed, "{name}: {r:#?}");
    }
}
