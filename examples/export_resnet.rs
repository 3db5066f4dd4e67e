//! Exports an MoE-ResNet for the PyTorch round trip (validation/torch_roundtrip.py):
//!
//! `cargo run --release --example export_resnet -- DIR`
//!
//! writes `DIR/weights.safetensors` (f32, names in docs/tensors.md), `DIR/model.json` (the
//! `ResNetConfig`, the forward multipliers and the norm epsilon), `DIR/task_x.npy` (inputs, f64) and
//! `DIR/predictions.npy` (the f32 model's outputs, stored as f64).
//!
//! The network exercises every part of the forward pass the script must rebuild: RMS norm, prototyped
//! top-k selection with a balancing bias, softmax gates, capacity drops, a shared expert and GELU. The
//! router is initialised with unit variance (logits Theta(1), no ties) and `TieBreak::Index`, so the
//! routing is deterministic and reproducible outside Rust.

use std::path::PathBuf;

use moe_dmft::data::{make_task, TaskConfig};
use moe_dmft::model::io::{load_safetensors, save_safetensors};
use moe_dmft::model::resnet::{MoeResNet, ResNetConfig, NORM_EPS};
use moe_dmft::model::{Activation, Batch, Model};
use moe_dmft::param::{Group, GroupHp, Optimizer, Resolved, Sizes};
use moe_dmft::routing::{Gate, RoutingConfig, TieBreak};
use ndarray::Array1;
use ndarray_npy::write_npy;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Mean-field multipliers of SPEC §4 with a unit-variance router (so logits do not tie).
fn resolved(sizes: Sizes, input_dim: usize) -> Resolved {
    let g = |group, init_std, multiplier| GroupHp { group, init_std, multiplier, lr: 0.0, adam_eps: None, weight_decay: 0.0 };
    let n = sizes.width as f64;
    Resolved {
        preset: "export-example".into(),
        optimizer: Optimizer::Sgd,
        sizes,
        base: sizes,
        residual_multiplier: 1.0 / sizes.depth as f64,
        groups: vec![
            g(Group::Embedding, 1.0, 1.0 / (input_dim as f64).sqrt()),
            g(Group::Router, 1.0, 1.0 / n.sqrt()),
            g(Group::ExpertUp, 1.0, 1.0 / n.sqrt()),
            g(Group::ExpertDown, 1.0, 1.0 / sizes.expert_hidden as f64),
            g(Group::ExpertBias, 0.0, 1.0),
            g(Group::Norm, 1.0, 1.0),
            g(Group::Readout, 1.0, 1.0 / n.sqrt()),
        ],
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(std::env::args().nth(1).ok_or("usage: export_resnet DIR")?);
    std::fs::create_dir_all(&dir)?;

    let task = make_task(&TaskConfig { points: 64, input_dim: 8, seed: 3, ..TaskConfig::default() })?;
    let cfg = ResNetConfig {
        input_dim: 8,
        outputs: 1,
        sizes: Sizes { width: 32, depth: 2, experts: 8, active: 2, expert_hidden: 16 },
        activation: Activation::Gelu,
        norm: true,
        routing: RoutingConfig {
            gate: Gate::Softmax,
            tie_break: TieBreak::Index,
            capacity_factor: Some(1.0),
            prototypes: 2,
            shared_experts: 1,
            ..RoutingConfig::default()
        },
    };
    let hp = resolved(cfg.sizes, cfg.input_dim);
    let mut model = MoeResNet::<f32>::new(&cfg, &hp, &mut ChaCha8Rng::seed_from_u64(7))?;
    // Nonzero balancing biases and norm gains, so the script must read and use them.
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for p in &mut model.store_mut().params {
        match p.group {
            Group::ExpertBias => p.value = Array1::from_shape_fn(p.value.len(), |e| 0.1 * e as f32).into_dyn(),
            Group::Norm => {
                use rand_distr::{Distribution, Uniform};
                let u = Uniform::new(0.5f32, 1.5);
                p.value.mapv_inplace(|_| u.sample(&mut rng));
            }
            _ => {}
        }
    }

    let batch = Batch::Regression { x: task.x.clone(), y: task.y.clone() };
    let (loss, predictions) = model.forward(&batch, &mut ChaCha8Rng::seed_from_u64(0))?;
    let out = model.loss_and_grad(&batch, &mut ChaCha8Rng::seed_from_u64(0))?;

    save_safetensors(model.store(), &dir.join("weights.safetensors"))?;
    write_npy(dir.join("task_x.npy"), &task.x)?;
    write_npy(dir.join("predictions.npy"), &predictions)?;
    let names: Vec<serde_json::Value> = model
        .store()
        .params
        .iter()
        .map(|p| serde_json::json!({ "name": p.name, "group": p.group.name(), "shape": p.value.shape() }))
        .collect();
    let meta = serde_json::json!({
        "config": cfg,
        "multipliers": model.multipliers(),
        "norm_eps": NORM_EPS,
        "tensors": names,
        "loss": loss,
        "dropped": out.load.iter().map(|l| l.dropped).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("model.json"), serde_json::to_string_pretty(&meta)?)?;

    // The Rust side of the round trip: the reloaded weights give the same predictions, bit for bit.
    let reloaded = MoeResNet::<f32>::from_store(&cfg, &hp, load_safetensors(&dir.join("weights.safetensors"))?)?;
    let (_, again) = reloaded.forward(&batch, &mut ChaCha8Rng::seed_from_u64(0))?;
    if again != predictions {
        return Err("reloaded weights give different predictions".into());
    }
    println!(
        "wrote {} (loss {loss:.6}, dropped fraction per block {:?}); reload check passed",
        dir.display(),
        out.load.iter().map(|l| l.dropped).collect::<Vec<_>>()
    );
    Ok(())
}
