//! The `moe-dmft` command line: one file per subcommand, each with its clap `Args` and a `run`.
//! Errors from user input exit with code 2 and a message naming the field; no panic reaches the user.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod compare;
pub mod coord_check;
pub mod demo;
pub mod figures;
pub mod gpu;
pub mod param;
pub mod solve;
pub mod sweep;
pub mod train;

#[derive(Debug, Parser)]
#[command(name = "moe-dmft", version, about = "Hyperparameter scaling of MoE transformers: parameterizations, DMFT, finite networks, checks")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The main demo: DMFT solve and finite networks at two sizes, one figure of the three loss curves.
    Demo(demo::Args),
    /// Per-group hyperparameters of a parameterization at given sizes.
    Param(param::Args),
    /// Train a finite network from a TOML config.
    Train(train::Args),
    /// Solve the DMFT of an MoE block from a TOML config.
    Solve(solve::Args),
    /// Coordinate checks along one axis or all.
    CoordCheck(coord_check::Args),
    /// DMFT solution vs finite networks at growing sizes on the same task.
    Compare(compare::Args),
    /// Resumable, sharded hyperparameter sweeps.
    Sweep(sweep::Args),
    /// Regenerate figures/ from validation/ results.
    Figures(figures::Args),
    /// Benchmarks with ratios against a baseline measured in the same run.
    Bench(bench::Args),
    /// GPU backend: probe, train, CPU-vs-GPU check, timing (feature `cuda`; used by validation/gpu).
    #[command(hide = true)]
    Gpu(gpu::Args),
}

/// Parses the command line, runs it, and returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    crate::set_blas_single_threaded();
    // A panic is a bug; still, the user gets a message and a non-zero code instead of a backtrace.
    let result = std::panic::catch_unwind(|| run(cli.command));
    match result {
        Ok(Ok(())) => 0,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
        Err(_) => {
            eprintln!("error: internal failure (a bug: please report it with the command that caused it)");
            1
        }
    }
}

pub fn run(command: Command) -> crate::Result<()> {
    match command {
        Command::Demo(a) => demo::run(a),
        Command::Param(a) => param::run(a),
        Command::Train(a) => train::run(a),
        Command::Solve(a) => solve::run(a),
        Command::CoordCheck(a) => coord_check::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Figures(a) => figures::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Gpu(a) => gpu::run(a),
    }
}

/// Reads and parses a TOML config, rejecting unknown keys (via the type's `deny_unknown_fields`).
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> crate::Result<T> {
    parse_toml(&read_text(path)?, path)
}

/// Reads a text file, naming it in the error.
pub fn read_text(path: &std::path::Path) -> crate::Result<String> {
    std::fs::read_to_string(path).map_err(|source| crate::Error::Read { path: path.to_path_buf(), source })
}

/// Parses TOML text read from `path` (named in the error).
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, path: &std::path::Path) -> crate::Result<T> {
    toml::from_str(text).map_err(|e| crate::Error::Parse { path: path.to_path_buf(), reason: e.to_string() })
}
