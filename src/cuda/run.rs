//! Entry points of the GPU backend behind `moe-dmft gpu`: training from an ordinary `train` config on the
//! GPU ([`train`]), the CPU-vs-GPU check on the same weights ([`check`]) and the timing of device
//! training steps ([`bench`]).

use std::path::Path;
use std::time::Instant;

use ndarray::{Array2, ArrayD};
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use super::device::Gpu;
use super::resnet::{self, GpuResNet};
use super::transformer::{self, GpuTransformer};
use super::{BenchArch, DeviceInfo, DeviceModel};
use crate::data::text::random_windows;
use crate::model::resnet::{MoeResNet, ResNetConfig};
use crate::model::transformer::{random_tokens, MoeTransformer, TransformerConfig};
use crate::model::{Activation, Batch, Model};
use crate::param::{ParamConfig, Sizes};
use crate::routing::RoutingConfig;
use crate::train::engine::{self, stream_rng, Observer, TrainData};
use crate::train::{prepare, thread_pool, train_model, ModelConfig, Precision, Prepared, Summary, TrainConfig};
use crate::Error;

/// Checks that the GPU backend runs `cfg` (f32, supported sizes); errors name the config field.
pub fn gpu_config(cfg: &TrainConfig) -> crate::Result<()> {
    if cfg.precision != Precision::F32 {
        return Err(Error::invalid("precision", "the GPU backend trains in f32"));
    }
    let checked = match &cfg.model {
        ModelConfig::Resnet(m) => resnet::check_supported(m),
        ModelConfig::Transformer(m) => transformer::check_supported(m),
    };
    checked.map_err(|e| match e {
        Error::Invalid { field, reason } if !field.starts_with("model.") => Error::invalid(format!("model.{field}"), reason),
        other => other,
    })
}

/// The freshly initialised CPU model of a prepared run, from the CPU trainer's init stream, so CPU and
/// GPU runs of one config start from identical weights.
enum Host {
    Resnet(MoeResNet<f32>),
    Transformer(MoeTransformer<f32>),
}

fn init_host(p: &Prepared) -> crate::Result<Host> {
    let mut rng = stream_rng(p.config.seed, engine::STREAM_INIT);
    Ok(match &p.config.model {
        ModelConfig::Resnet(m) => Host::Resnet(MoeResNet::new(m, &p.resolved, &mut rng)?),
        ModelConfig::Transformer(m) => Host::Transformer(MoeTransformer::new(m, &p.resolved, &mut rng)?),
    })
}

/// Trains the model of `cfg` (an ordinary `moe-dmft train` config, either architecture) on the GPU with
/// the CPU trainer's loop, and with `out` writes the same files as `moe-dmft train` (`config.toml`,
/// `metrics.jsonl`, `summary.json`, `task_*.npy`, `weights.safetensors` when asked) plus `device.json`.
pub fn train(cfg: &TrainConfig, out: Option<&Path>, observer: &mut dyn Observer, tf32: bool) -> crate::Result<Summary> {
    gpu_config(cfg)?;
    let prepared = prepare(cfg)?;
    let gpu = Gpu::new(0, tf32)?;
    let device = [("device.json", serde_json::to_value(&gpu.info).map_err(|e| Error::Internal(format!("device.json: {e}")))?)];
    match init_host(&prepared)? {
        Host::Resnet(h) => train_model(&prepared, &mut GpuResNet::new(h, &prepared.resolved, gpu)?, out, observer, &device),
        Host::Transformer(h) => {
            train_model(&prepared, &mut GpuTransformer::new(h, &prepared.resolved, gpu)?, out, observer, &device)
        }
    }
}

/// Relative error `|a - b| / |reference|` of two tensors (absolute when the reference is zero).
fn rel_err(a: &ArrayD<f64>, reference: &ArrayD<f64>) -> f64 {
    let diff: f64 = a.iter().zip(reference.iter()).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = reference.iter().map(|y| y * y).sum::<f64>().sqrt();
    if norm > 0.0 {
        diff / norm
    } else {
        diff
    }
}

fn to_f64<F: crate::model::Real>(a: &ArrayD<F>) -> ArrayD<f64> {
    a.mapv(|v| v.to_f64().unwrap_or(f64::NAN))
}

/// One tensor's agreement in [`CheckReport`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorCheck {
    pub name: String,
    /// |GPU - CPU f32| / |CPU f32| of the gradient.
    pub grad_gpu_vs_cpu: f64,
    /// |GPU - CPU f64| / |CPU f64| and |CPU f32 - CPU f64| / |CPU f64|: how far each f32 backend is from
    /// the f64 reference on the same weights (the scale of f32 rounding).
    pub grad_gpu_vs_f64: f64,
    pub grad_cpu_vs_f64: f64,
    /// |GPU - CPU| / |CPU| of the parameter after one optimizer step (CPU optimizer on CPU gradients,
    /// device optimizer on GPU gradients).
    pub param_after_step: f64,
}

/// What `moe-dmft gpu check` writes for one config.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckReport {
    pub config: String,
    pub device: DeviceInfo,
    /// Every relative error below must stay under this for `passed`.
    pub tolerance: f64,
    pub loss_cpu: f64,
    pub loss_gpu: f64,
    pub loss_rel_diff: f64,
    pub aux_loss_cpu: f64,
    pub aux_loss_gpu: f64,
    /// |f_GPU - f_CPU| / |f_CPU| of the predictions.
    pub prediction_rel_err: f64,
    /// Largest difference of any expert's load fraction (0 when both route identically).
    pub load_max_abs_diff: f64,
    pub tensors: Vec<TensorCheck>,
    pub max_grad_rel_err: f64,
    pub max_param_rel_err_after_step: f64,
    /// Loss after the step on both backends.
    pub loss_after_step_cpu: f64,
    pub loss_after_step_gpu: f64,
    pub passed: bool,
}

/// Runs the model of `cfg` on CPU (f32 and f64) and on the GPU from identical weights, on one batch
/// (a regression task's full training set; for text, `optim.batch_size` windows, 8 without one) with
/// identical routing randomness, and compares loss, predictions, load, gradients, one optimizer step
/// and the loss after it.
pub fn check(cfg: &TrainConfig, name: &str, tolerance: f64) -> crate::Result<CheckReport> {
    gpu_config(cfg)?;
    let prepared = prepare(cfg)?;
    let batch = match &prepared.data {
        TrainData::Regression { train, .. } => Batch::Regression { x: train.x.clone(), y: train.y.clone() },
        TrainData::Tokens { corpus, seq_len, .. } => {
            let mut rng = stream_rng(prepared.config.seed, engine::STREAM_BATCH);
            let b = prepared.config.loop_settings().batch_size.unwrap_or(8);
            Batch::Tokens { ids: random_windows(&corpus.train, *seq_len, b, &mut rng)? }
        }
    };
    let gpu = Gpu::new(0, false)?;
    let device = gpu.info.clone();
    let hp = &prepared.resolved;
    match init_host(&prepared)? {
        Host::Resnet(h) => {
            let (h64, dev) = (h.cast::<f64>(), GpuResNet::new(h.clone(), hp, gpu)?);
            compare(&prepared, &batch, name, tolerance, device, h, h64, dev)
        }
        Host::Transformer(h) => {
            let (h64, dev) = (h.cast::<f64>(), GpuTransformer::new(h.clone(), hp, gpu)?);
            compare(&prepared, &batch, name, tolerance, device, h, h64, dev)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn compare<C: Model<f32> + Clone, C64: Model<f64>, D: DeviceModel>(
    prepared: &Prepared,
    batch: &Batch,
    name: &str,
    tolerance: f64,
    device: DeviceInfo,
    mut cpu: C,
    cpu64: C64,
    mut gpu_model: D,
) -> crate::Result<CheckReport> {
    let route = || stream_rng(prepared.config.seed, engine::STREAM_ROUTING);
    let pool = thread_pool(prepared.config.threads)?;
    let (c, c64, (_, f_cpu)) = pool.install(|| -> crate::Result<_> {
        Ok((cpu.loss_and_grad(batch, &mut route())?, cpu64.loss_and_grad(batch, &mut route())?, cpu.forward(batch, &mut route())?))
    })?;
    let gr = gpu_model.loss_and_grad(batch, &mut route())?;
    let (_, f_gpu) = gpu_model.forward(batch, &mut route())?;

    // One step: the CPU trainer's optimizer on the CPU gradients; the device optimizer on the GPU.
    let settings = prepared.config.loop_settings();
    let mut opt = engine::make_optimizer(cpu.store(), &prepared.resolved, &settings)?;
    opt.step(cpu.store_mut(), &c.grads, 1.0)?;
    // As the trainer does after every step (balancing biases); device_step does the same on the GPU.
    cpu.after_step(&c.load);
    gpu_model.device_step(batch, &mut route(), 1.0, (settings.beta1, settings.beta2))?;
    gpu_model.download_params()?;

    let mut tensors = Vec::new();
    for (i, p) in cpu.store().params.iter().enumerate() {
        let g_cpu = to_f64(&c.grads[i]);
        let g_64 = to_f64(&c64.grads[i]);
        let g_gpu = to_f64(&gr.grads[i]);
        tensors.push(TensorCheck {
            name: p.name.clone(),
            grad_gpu_vs_cpu: rel_err(&g_gpu, &g_cpu),
            grad_gpu_vs_f64: rel_err(&g_gpu, &g_64),
            grad_cpu_vs_f64: rel_err(&g_cpu, &g_64),
            param_after_step: rel_err(&to_f64(&gpu_model.store().params[i].value), &to_f64(&p.value)),
        });
    }
    let (loss_after_step_cpu, _) = pool.install(|| cpu.forward(batch, &mut route()))?;
    let (loss_after_step_gpu, _) = gpu_model.forward(batch, &mut route())?;

    let prediction_rel_err = rel_err(&f_gpu.clone().into_dyn(), &f_cpu.clone().into_dyn());
    let load_max_abs_diff = c
        .load
        .iter()
        .zip(gr.load.iter())
        .flat_map(|(a, b)| a.fraction.iter().zip(b.fraction.iter()).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f64::max);
    let max_grad_rel_err = tensors.iter().map(|t| t.grad_gpu_vs_cpu).fold(0.0, f64::max);
    let max_param_rel_err_after_step = tensors.iter().map(|t| t.param_after_step).fold(0.0, f64::max);
    let loss_rel_diff = (gr.loss - c.loss).abs() / c.loss.abs().max(f64::MIN_POSITIVE);
    let after_diff = (loss_after_step_gpu - loss_after_step_cpu).abs() / loss_after_step_cpu.abs().max(f64::MIN_POSITIVE);
    let finite = [gr.loss, loss_after_step_gpu, max_grad_rel_err, max_param_rel_err_after_step].iter().all(|v| v.is_finite());
    let passed = finite
        && loss_rel_diff <= tolerance
        && prediction_rel_err <= tolerance
        && max_grad_rel_err <= tolerance
        && max_param_rel_err_after_step <= tolerance
        && after_diff <= tolerance
        && load_max_abs_diff == 0.0;
    Ok(CheckReport {
        config: name.to_string(),
        device,
        tolerance,
        loss_cpu: c.loss,
        loss_gpu: gr.loss,
        loss_rel_diff,
        aux_loss_cpu: c.aux_loss,
        aux_loss_gpu: gr.aux_loss,
        prediction_rel_err,
        load_max_abs_diff,
        tensors,
        max_grad_rel_err,
        max_param_rel_err_after_step,
        loss_after_step_cpu,
        loss_after_step_gpu,
        passed,
    })
}

/// Sizes and options of [`bench`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchSpec {
    pub arch: BenchArch,
    pub sizes: Sizes,
    /// Tokens (samples) per step; for the Transformer `batch * seq`.
    pub tokens: usize,
    pub input_dim: usize,
    pub norm: bool,
    /// Transformer only: sequences per step, their length, heads and vocabulary.
    pub batch: usize,
    pub seq: usize,
    pub n_head: usize,
    pub vocab: usize,
    pub activation: Activation,
    pub steps: usize,
    pub warmup: usize,
    /// Let cuBLAS use TF32 tensor cores.
    pub tf32: bool,
    pub seed: u64,
}

/// What `moe-dmft gpu bench` writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchReport {
    pub device: DeviceInfo,
    pub spec: BenchSpec,
    pub params_total: usize,
    /// Wall time of every timed step (forward, backward and AdamW, ending with a device sync), ms.
    pub step_ms: Vec<f64>,
    pub median_step_ms: f64,
    /// Matrix-product FLOPs of one step (forward x 3), counting every kept assignment.
    pub flops_per_step: f64,
    pub achieved_tflops: f64,
    /// Peak of the precision used (f32 or TF32 dense) from NVIDIA's data sheet, when the card is known.
    pub peak_tflops: Option<f64>,
    pub mfu: Option<f64>,
    pub losses: Vec<f64>,
}

/// Data-sheet peaks (dense, TFLOP/s) for f32 on CUDA cores and TF32 on tensor cores.
pub fn peak_tflops(device_name: &str, tf32: bool) -> Option<f64> {
    let n = device_name.to_ascii_uppercase();
    let (f32_peak, tf32_peak) = if n.contains("H100") && n.contains("PCIE") {
        (51.2, 378.0)
    } else if n.contains("H100") || n.contains("H200") {
        (66.9, 494.7)
    } else if n.contains("A100") {
        (19.5, 156.0)
    } else {
        return None;
    };
    Some(if tf32 { tf32_peak } else { f32_peak })
}

/// Matrix-product FLOPs of one training step of the MoE-ResNet (forward, and backward at twice the
/// forward).
pub fn resnet_step_flops(cfg: &ResNetConfig, tokens: usize) -> f64 {
    let s = &cfg.sizes;
    let (t, n, m, k, h) = (tokens as f64, s.width as f64, s.experts as f64, s.active as f64, s.expert_hidden as f64);
    let shared = cfg.routing.shared_experts as f64;
    let per_block = 2.0 * t * n * m + (k + shared) * t * 4.0 * n * h;
    let forward = s.depth as f64 * per_block + 2.0 * t * cfg.input_dim as f64 * n + 2.0 * t * n * cfg.outputs as f64;
    3.0 * forward
}

/// Matrix-product FLOPs of one training step of the MoE-Transformer (forward, and backward at twice
/// the forward): per block the fused qkv and output projections, the full S x S score and
/// probability-times-value products (the causal half is computed too), the router and the kept expert
/// assignments (k per token without drops); then the unembedding.
pub fn transformer_step_flops(cfg: &TransformerConfig, batch: usize, seq: usize) -> f64 {
    let s = &cfg.sizes;
    let (t, n, m, k, h) = (
        (batch * seq) as f64,
        s.width as f64,
        s.experts as f64,
        s.active as f64,
        s.expert_hidden as f64,
    );
    let attention = 2.0 * t * n * 3.0 * n + 2.0 * 2.0 * t * seq as f64 * n + 2.0 * t * n * n;
    let moe = 2.0 * t * n * m + (k + cfg.routing.shared_experts as f64) * t * 4.0 * n * h;
    let dense = t * 4.0 * n * h;
    let ffn: f64 = (0..s.depth).map(|l| if cfg.is_moe_block(l) { moe } else { dense }).sum();
    let forward = s.depth as f64 * attention + ffn + 2.0 * t * n * cfg.vocab as f64;
    3.0 * forward
}

/// Times `spec.steps` device training steps (after `spec.warmup` untimed ones) of the MoE-ResNet on
/// Gaussian data or of the MoE-Transformer on random tokens, with MoE-CompleteP/Adam.
pub fn bench(spec: &BenchSpec) -> crate::Result<BenchReport> {
    if spec.tokens == 0 || spec.steps == 0 {
        return Err(Error::invalid("--tokens/--steps", "must be at least 1"));
    }
    let gpu = Gpu::new(0, spec.tf32)?;
    let device = gpu.info.clone();
    let mut rng = stream_rng(spec.seed, engine::STREAM_INIT);
    let mut data_rng = stream_rng(spec.seed, engine::STREAM_BATCH);
    let (mut model, batch, params_total, flops_per_step): (Box<dyn DeviceModel>, Batch, usize, f64) = match spec.arch {
        BenchArch::Resnet => {
            let cfg = ResNetConfig {
                input_dim: spec.input_dim,
                outputs: 1,
                sizes: spec.sizes,
                activation: spec.activation,
                norm: spec.norm,
                routing: RoutingConfig::default(),
            };
            resnet::check_supported(&cfg)?;
            let param = ParamConfig { lr: 1e-3, input_dim: spec.input_dim, sigma_router: 1.0, ..ParamConfig::default() };
            let hp = param.resolve(&spec.sizes)?;
            let host = MoeResNet::<f32>::new(&cfg, &hp, &mut rng)?;
            let params_total = host.store().num_elements();
            let x = Array2::from_shape_simple_fn((spec.tokens, spec.input_dim), || StandardNormal.sample(&mut data_rng));
            let y = Array2::from_shape_simple_fn((spec.tokens, 1), || StandardNormal.sample(&mut data_rng));
            let flops = resnet_step_flops(&cfg, spec.tokens);
            (Box::new(GpuResNet::new(host, &hp, gpu)?), Batch::Regression { x, y }, params_total, flops)
        }
        BenchArch::Transformer => {
            if spec.batch * spec.seq != spec.tokens {
                return Err(Error::invalid("--tokens", format!("must equal --batch x --seq ({} x {})", spec.batch, spec.seq)));
            }
            let cfg = TransformerConfig {
                vocab: spec.vocab,
                seq_len: spec.seq,
                sizes: spec.sizes,
                n_head: spec.n_head,
                activation: spec.activation,
                ..TransformerConfig::default()
            };
            transformer::check_supported(&cfg)?;
            let param = ParamConfig { lr: 1e-3, ..ParamConfig::default() };
            let hp = param.resolve(&spec.sizes)?;
            let host = MoeTransformer::<f32>::new(&cfg, &hp, &mut rng)?;
            let params_total = host.store().num_elements();
            let batch = random_tokens(spec.batch, spec.seq, spec.vocab, &mut data_rng);
            let flops = transformer_step_flops(&cfg, spec.batch, spec.seq);
            (Box::new(GpuTransformer::new(host, &hp, gpu)?), batch, params_total, flops)
        }
    };
    let mut route = stream_rng(spec.seed, engine::STREAM_ROUTING);
    let mut losses = Vec::new();
    for _ in 0..spec.warmup {
        losses.push(model.device_step(&batch, &mut route, 1.0, (0.9, 0.999))?.0);
    }
    let mut step_ms = Vec::with_capacity(spec.steps);
    for _ in 0..spec.steps {
        let start = Instant::now();
        let (loss, _) = model.device_step(&batch, &mut route, 1.0, (0.9, 0.999))?;
        step_ms.push(start.elapsed().as_secs_f64() * 1e3);
        losses.push(loss);
    }
    let mut sorted = step_ms.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median_step_ms = sorted[sorted.len() / 2];
    let achieved_tflops = flops_per_step / (median_step_ms * 1e-3) / 1e12;
    let peak = peak_tflops(&device.name, spec.tf32);
    Ok(BenchReport {
        device,
        spec: spec.clone(),
        params_total,
        step_ms,
        median_step_ms,
        flops_per_step,
        achieved_tflops,
        peak_tflops: peak,
        mfu: peak.map(|p| achieved_tflops / p),
        losses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_flops_count_router_and_active_experts() {
        let sizes = Sizes { width: 4, depth: 2, experts: 8, active: 2, expert_hidden: 3 };
        let cfg = ResNetConfig {
            input_dim: 5,
            outputs: 1,
            sizes,
            activation: Activation::Relu,
            norm: false,
            routing: RoutingConfig::default(),
        };
        // per block: router 2*T*N*M = 2*10*4*8 = 640, experts k*T*4*N*n = 2*10*4*4*3 = 960;
        // embedding 2*10*5*4 = 400, readout 2*10*4*1 = 80; forward 2*(1600) + 480 = 3680, step x3.
        assert_eq!(resnet_step_flops(&cfg, 10), 3.0 * 3680.0);
    }

    #[test]
    fn peaks_known_only_for_listed_cards() {
        assert_eq!(peak_tflops("NVIDIA H100 80GB HBM3", false), Some(66.9));
        assert_eq!(peak_tflops("NVIDIA H200", true), Some(494.7));
        assert_eq!(peak_tflops("NVIDIA H100 PCIe", false), Some(51.2));
        assert_eq!(peak_tflops("Some GPU", false), None);
    }

    const RESNET: &str = r#"
steps = 1
[model]
arch = "resnet"
input_dim = 4
[model.sizes]
width = 8
depth = 1
experts = 4
active = 2
expert_hidden = 8
[data]
kind = "synthetic"
[data.task]
points = 8
input_dim = 4
seed = 1
[data.task.teacher]
kind = "random_moe"
experts = 2
active = 1
hidden = 4
activation = "relu"
"#;

    #[test]
    fn unsupported_options_are_field_errors_before_any_device_call() {
        let cfg: TrainConfig = toml::from_str(RESNET).expect("test config parses");
        assert!(gpu_config(&cfg).is_ok());

        let mut f64_run = cfg.clone();
        f64_run.precision = Precision::F64;
        let e = gpu_config(&f64_run).unwrap_err();
        assert!(matches!(&e, Error::Invalid { field, .. } if field == "precision"), "{e:?}");

        let mut wide = cfg.clone();
        if let ModelConfig::Resnet(m) = &mut wide.model {
            m.sizes.experts = 128;
            m.sizes.active = 65;
        }
        let e = gpu_config(&wide).unwrap_err();
        assert!(matches!(&e, Error::Invalid { field, .. } if field == "model.sizes.active"), "{e:?}");
        assert_eq!(e.exit_code(), 2);
    }
}
