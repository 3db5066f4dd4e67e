//! Training of finite networks: optimizers ([`optim`]), learning-rate schedules ([`schedule`]) and the
//! training loop with its outputs (`config.toml`, `metrics.jsonl`, `summary.json`).

pub mod optim;
pub mod schedule;
pub mod sweep;
pub mod engine;
