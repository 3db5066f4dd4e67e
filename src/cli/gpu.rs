//! `moe-dmft gpu ...` (hidden): the GPU backend's commands, used by `validation/gpu/run.sh` on a machine
//! with only the built binary, an NVIDIA driver and the CUDA libraries.
//!
//! - `gpu probe`: prints the device as JSON, or exits 2 naming what is missing.
//! - `gpu train --config FILE --out DIR`: trains an ordinary `train` config (either arch) on the GPU and
//!   writes the same outputs as `moe-dmft train`.
//! - `gpu selftest --out FILE`: the cuBLAS wrapper and the routing kernels against their CPU counterparts.
//! - `gpu check --config FILE... --out FILE`: CPU vs GPU on the same weights (see `cuda::run::check`);
//!   exits 1 when a config fails its tolerance.
//! - `gpu bench [--arch resnet|transformer] ... --out FILE`: times device training steps.
//!
//! In a build without `--features cuda` every command exits 2 saying so.

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: GpuCommand,
}

#[derive(Debug, Subcommand)]
pub enum GpuCommand {
    /// Print the first device as JSON, or fail with exit code 2 naming what is missing.
    Probe,
    /// Train a `train` config on the GPU; same outputs as `moe-dmft train`.
    Train {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Let cuBLAS use TF32 tensor cores (faster, about 1e-3 relative error in products).
        #[arg(long)]
        tf32: bool,
    },
    /// Component checks: cuBLAS wrapper and routing kernels against their CPU counterparts.
    Selftest {
        /// JSON report (one entry per component check).
        #[arg(long)]
        out: PathBuf,
    },
    /// Compare CPU and GPU on the same weights: loss, predictions, load, gradients, one optimizer step.
    Check {
        /// One or more `train` configs (either arch).
        #[arg(long, required = true, num_args = 1..)]
        config: Vec<PathBuf>,
        /// JSON report (a list with one entry per config).
        #[arg(long)]
        out: PathBuf,
        /// Largest relative error allowed for every compared quantity.
        #[arg(long, default_value_t = 1e-3)]
        tolerance: f64,
    },
    /// Time training steps of an MoE-ResNet or MoE-Transformer on the device (forward, backward, AdamW).
    Bench {
        /// Which model: the MoE-ResNet (Gaussian inputs) or the MoE-Transformer (random tokens).
        #[arg(long, value_enum, default_value = "resnet")]
        arch: crate::cuda::BenchArch,
        #[arg(long, default_value_t = 1024)]
        width: usize,
        #[arg(long, default_value_t = 8)]
        depth: usize,
        #[arg(long, default_value_t = 64)]
        experts: usize,
        #[arg(long, default_value_t = 8)]
        active: usize,
        #[arg(long, default_value_t = 512)]
        expert_hidden: usize,
        /// Tokens per step of the MoE-ResNet (e.g. batch 32 x sequence 256 = 8192); the Transformer's are
        /// --batch x --seq.
        #[arg(long, default_value_t = 8192)]
        tokens: usize,
        /// Transformer: sequences per step.
        #[arg(long, default_value_t = 32)]
        batch: usize,
        /// Transformer: sequence length.
        #[arg(long, default_value_t = 256)]
        seq: usize,
        /// Transformer: attention heads.
        #[arg(long, default_value_t = 16)]
        n_head: usize,
        /// Transformer: vocabulary (65: the Shakespeare characters).
        #[arg(long, default_value_t = 65)]
        vocab: usize,
        #[arg(long, default_value_t = 64)]
        input_dim: usize,
        /// RMS norm in front of every MoE block (pre-norm, as in the Transformer).
        #[arg(long)]
        norm: bool,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        #[arg(long)]
        tf32: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(args: Args) -> crate::Result<()> {
    imp::run(args)
}

#[cfg(not(feature = "cuda"))]
mod imp {
    pub fn run(args: super::Args) -> crate::Result<()> {
        let _ = args;
        Err(crate::cuda::not_built())
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::{Args, GpuCommand};
    use crate::cuda::run::{bench, check, train, BenchSpec};
    use crate::cuda::BenchArch;
    use crate::param::Sizes;
    use crate::train::TrainConfig;
    use crate::Error;

    use crate::files::write_json;

    pub fn run(args: Args) -> crate::Result<()> {
        match args.command {
            GpuCommand::Probe => {
                let info = crate::cuda::probe()?;
                let text = serde_json::to_string_pretty(&info).map_err(|e| Error::Internal(format!("json: {e}")))?;
                println!("{text}");
                Ok(())
            }
            GpuCommand::Selftest { out } => {
                let gpu = crate::cuda::device::Gpu::new(0, false)?;
                let tests = crate::cuda::selftest::run(&gpu)?;
                for t in &tests {
                    eprintln!("{:<45} error {:.2e}: {}", t.name, t.error, if t.passed { "PASS" } else { "FAIL" });
                }
                write_json(&out, &tests)?;
                if tests.iter().all(|t| t.passed) {
                    Ok(())
                } else {
                    Err(Error::Internal(format!("a component check failed; see {}", out.display())))
                }
            }
            GpuCommand::Train { config, out, tf32 } => {
                let cfg = TrainConfig::from_file(&config)?;
                let mut progress = crate::cli::train::ProgressObserver::new();
                let s = train(&cfg, Some(&out), &mut progress, tf32)?;
                eprintln!(
                    "done on the GPU: {} steps, final loss {:.6}, wall {:.2} s; outputs in {}",
                    s.steps,
                    s.final_loss.unwrap_or(f64::NAN),
                    s.wall_seconds,
                    out.display()
                );
                Ok(())
            }
            GpuCommand::Check { config, out, tolerance } => {
                if !(tolerance.is_finite() && tolerance > 0.0) {
                    return Err(Error::invalid("--tolerance", "must be finite and positive"));
                }
                let mut reports = Vec::new();
                for path in &config {
                    let cfg = TrainConfig::from_file(path)?;
                    let r = check(&cfg, &path.display().to_string(), tolerance)?;
                    eprintln!(
                        "{}: loss cpu {:.6e} gpu {:.6e}; max grad rel err {:.2e}; max param rel err after step {:.2e}; load diff {:.1e}: {}",
                        r.config,
                        r.loss_cpu,
                        r.loss_gpu,
                        r.max_grad_rel_err,
                        r.max_param_rel_err_after_step,
                        r.load_max_abs_diff,
                        if r.passed { "PASS" } else { "FAIL" }
                    );
                    reports.push(r);
                }
                write_json(&out, &reports)?;
                if reports.iter().all(|r| r.passed) {
                    Ok(())
                } else {
                    Err(Error::Internal(format!("CPU and GPU disagree beyond {tolerance}; see {}", out.display())))
                }
            }
            GpuCommand::Bench {
                arch,
                width,
                depth,
                experts,
                active,
                expert_hidden,
                tokens,
                batch,
                seq,
                n_head,
                vocab,
                input_dim,
                norm,
                steps,
                warmup,
                tf32,
                seed,
                out,
            } => {
                // The torch reference (validation/gpu/torch_ref.py) uses the same activations.
                let (tokens, activation) = match arch {
                    BenchArch::Resnet => (tokens, crate::model::Activation::Relu),
                    BenchArch::Transformer => (batch * seq, crate::model::Activation::Gelu),
                };
                let spec = BenchSpec {
                    arch,
                    sizes: Sizes { width, depth, experts, active, expert_hidden },
                    tokens,
                    input_dim,
                    norm,
                    batch,
                    seq,
                    n_head,
                    vocab,
                    activation,
                    steps,
                    warmup,
                    tf32,
                    seed,
                };
                let r = bench(&spec)?;
                eprintln!(
                    "{}: median step {:.2} ms, {:.1} TFLOP/s{}",
                    r.device.name,
                    r.median_step_ms,
                    r.achieved_tflops,
                    r.mfu.map(|m| format!(", MFU {:.1}%", 100.0 * m)).unwrap_or_default()
                );
                write_json(&out, &r)
            }
        }
    }
}
