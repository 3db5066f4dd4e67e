//! `moe-dmft bench`: wall time of one forward+backward step of the MoE-Transformer against a dense
//! transformer of equal active parameters, both measured in the same run on the same thread pool.
//!
//! The dense baseline is the same code with `moe_every = 0`, one expert of hidden size `k n` (so each
//! token meets the same number of FFN weights as in the MoE model), no router. As a further reference
//! the MoE layer itself is timed with `experts = active = 1` and hidden `k n` (the MoE code path's
//! overhead on a dense problem). Steps of the models are interleaved so that drift of the machine hits
//! them alike; the reported time per step is the median over `--steps`.

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::model::transformer::{random_tokens, MoeTransformer, TransformerConfig};
use crate::model::{Activation, Batch, Model, Real};
use crate::param::{ParamConfig, Sizes};
use crate::routing::RoutingConfig;
use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    F64,
}

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Width N (n_embd).
    #[arg(long, default_value_t = 128)]
    pub width: usize,
    /// Blocks L.
    #[arg(long, default_value_t = 4)]
    pub depth: usize,
    /// Experts M.
    #[arg(long, default_value_t = 16)]
    pub experts: usize,
    /// Active experts per token k.
    #[arg(long, default_value_t = 2)]
    pub active: usize,
    /// Expert hidden size n.
    #[arg(long, default_value_t = 128)]
    pub expert_hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Sequence length T.
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Sequences per batch B.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Vocabulary size (characters).
    #[arg(long, default_value_t = 65)]
    pub vocab: usize,
    /// Threads of the rayon pool (BLAS runs single-threaded inside it).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Timed steps per model.
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Untimed steps per model first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Skip the single-expert MoE-layer reference.
    #[arg(long)]
    pub no_single_expert: bool,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// Timing of one model.
#[derive(Debug, Clone, Serialize)]
pub struct Timing {
    pub name: String,
    pub total_params: usize,
    pub active_params: usize,
    /// Median seconds per forward+backward step.
    pub median_s: f64,
    pub min_s: f64,
    pub mean_s: f64,
    /// Tokens (B * T) per second at the median.
    pub tokens_per_s: f64,
    /// Loss of the last step (a sanity value: about ln(vocab) at init).
    pub loss: f64,
}

/// Results of one bench run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub threads: usize,
    pub precision: Precision,
    pub batch: usize,
    pub seq: usize,
    pub sizes: Sizes,
    pub timings: Vec<Timing>,
    /// MoE median step time over the dense median step time.
    pub ratio_moe_over_dense: f64,
}

impl Args {
    fn validate(&self) -> crate::Result<()> {
        for (flag, v) in [
            ("--threads", self.threads),
            ("--steps", self.steps),
            ("--batch", self.batch),
            ("--seq", self.seq),
        ] {
            if v == 0 {
                return Err(Error::invalid(flag, "must be at least 1"));
            }
        }
        Ok(())
    }

    fn config(&self, sizes: Sizes, moe_every: usize) -> TransformerConfig {
        TransformerConfig {
            vocab: self.vocab,
            seq_len: self.seq,
            sizes,
            n_head: self.heads,
            moe_every,
            tied_embeddings: false,
            activation: Activation::Gelu,
            routing: RoutingConfig::default(),
            norm_eps: 1e-6,
            attn_logit_multiplier: 1.0,
        }
    }

    /// (name, config) of the MoE model, the dense baseline and optionally the single-expert MoE layer.
    fn models(&self) -> Vec<(String, TransformerConfig)> {
        let moe = Sizes {
            width: self.width,
            depth: self.depth,
            experts: self.experts,
            active: self.active,
            expert_hidden: self.expert_hidden,
        };
        let dense = Sizes {
            experts: 1,
            active: 1,
            expert_hidden: self.active * self.expert_hidden,
            ..moe
        };
        let mut v = vec![
            (
                format!("moe (M={}, k={}, n={})", self.experts, self.active, self.expert_hidden),
                self.config(moe, 1),
            ),
            (format!("dense (hidden {})", dense.expert_hidden), self.config(dense, 0)),
        ];
        if !self.no_single_expert {
            v.push((
                format!("moe layer, 1 expert (hidden {})", dense.expert_hidden),
                self.config(dense, 1),
            ));
        }
        v
    }
}

/// Runs the benchmark and returns its report (the CLI prints it).
pub fn bench(args: &Args) -> crate::Result<Report> {
    args.validate()?;
    let configs = args.models();
    for (_, c) in &configs {
        c.validate()?;
    }
    crate::set_blas_single_threaded();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build()
        .map_err(|e| Error::Internal(format!("cannot build a thread pool: {e}")))?;
    let timings = pool.install(|| match args.precision {
        Precision::F32 => time_models::<f32>(args, &configs),
        Precision::F64 => time_models::<f64>(args, &configs),
    })?;
    let ratio = timings[0].median_s / timings[1].median_s;
    Ok(Report {
        threads: args.threads,
        precision: args.precision,
        batch: args.batch,
        seq: args.seq,
        sizes: configs[0].1.sizes,
        timings,
        ratio_moe_over_dense: ratio,
    })
}

fn time_models<F: Real>(args: &Args, configs: &[(String, TransformerConfig)]) -> crate::Result<Vec<Timing>> {
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let mut models = Vec::new();
    for (_, cfg) in configs {
        let hp = ParamConfig::default().resolve(&cfg.sizes)?;
        models.push(MoeTransformer::<F>::new(cfg, &hp, &mut rng)?);
    }
    let batch: Batch = random_tokens(args.batch, args.seq, args.vocab, &mut rng);
    let mut times = vec![Vec::with_capacity(args.steps); models.len()];
    let mut losses = vec![f64::NAN; models.len()];
    for step in 0..args.warmup + args.steps {
        for (i, model) in models.iter().enumerate() {
            let start = Instant::now();
            let out = model.loss_and_grad(&batch, &mut rng)?;
            let elapsed = start.elapsed().as_secs_f64();
            std::hint::black_box(&out.grads);
            losses[i] = out.loss;
            if step >= args.warmup {
                times[i].push(elapsed);
            }
        }
    }
    let tokens = (args.batch * args.seq) as f64;
    Ok(configs
        .iter()
        .zip(models.iter())
        .zip(times.iter_mut())
        .zip(losses)
        .map(|((((name, _), model), t), loss)| {
            t.sort_by(f64::total_cmp);
            let median = if t.len() % 2 == 1 {
                t[t.len() / 2]
            } else {
                0.5 * (t[t.len() / 2 - 1] + t[t.len() / 2])
            };
            Timing {
                name: name.clone(),
                total_params: model.store().num_elements(),
                active_params: model.active_parameters(),
                median_s: median,
                min_s: t[0],
                mean_s: t.iter().sum::<f64>() / t.len() as f64,
                tokens_per_s: tokens / median,
                loss,
            }
        })
        .collect())
}

pub fn run(args: Args) -> crate::Result<()> {
    let report = bench(&args)?;
    println!(
        "moe-dmft bench: one forward+backward step, batch {} x seq {}, {} thread(s), {:?}",
        report.batch, report.seq, report.threads, report.precision
    );
    println!(
        "{:<40} {:>12} {:>12} {:>11} {:>11} {:>13} {:>8}",
        "model", "params", "active", "median ms", "min ms", "tokens/s", "loss"
    );
    for t in &report.timings {
        println!(
            "{:<40} {:>12} {:>12} {:>11.2} {:>11.2} {:>13.0} {:>8.4}",
            t.name,
            t.total_params,
            t.active_params,
            t.median_s * 1e3,
            t.min_s * 1e3,
            t.tokens_per_s,
            t.loss
        );
    }
    println!(
        "ratio MoE / dense (median step time): {:.3} (target <= 1.5)",
        report.ratio_moe_over_dense
    );
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Internal(e.to_string()))?;
        std::fs::write(path, text).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(())
}
