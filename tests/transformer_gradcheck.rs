//! MoE-Transformer gradients against central finite differences in f64: every parameter group, every
//! differentiable routing variant (softmax, sigmoid, capacity with drops, prototypes, balance loss,
//! z-loss, shared experts), tied embeddings and dense blocks. Max relative error < 1e-5.

use moe_dmft::model::gradcheck::{check_model, GradCheckOptions};
use moe_dmft::model::transformer::{random_tokens, MoeTransformer, TransformerConfig};
use moe_dmft::model::{Activation, Model};
use moe_dmft::param::{Group, GroupHp, Optimizer, Resolved, Sizes};
use moe_dmft::routing::{Gate, RoutingConfig};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn sizes() -> Sizes {
    Sizes {
        width: 8,
        depth: 2,
        experts: 4,
        active: 2,
        expert_hidden: 6,
    }
}

/// A hand-built parameterization with distinct, non-unit multipliers so that a multiplier missing from
/// a backward pass shows up.
fn hp(sizes: Sizes) -> Resolved {
    let g = |group, init_std, multiplier| GroupHp {
        group,
        init_std,
        multiplier,
        lr: 1e-3,
        adam_eps: Some(1e-8),
        weight_decay: 0.0,
    };
    Resolved {
        preset: "test".into(),
        optimizer: Optimizer::Adam,
        sizes,
        base: sizes,
        residual_multiplier: 0.6,
        groups: vec![
            g(Group::Embedding, 1.0, 1.3),
            g(Group::AttnQkv, 0.5, 0.9),
            g(Group::AttnOut, 0.4, 1.1),
            g(Group::Router, 0.7, 0.8),
            g(Group::ExpertUp, 0.5, 1.2),
            g(Group::ExpertDown, 0.5, 0.7),
            g(Group::ExpertBias, 0.0, 1.0),
            g(Group::Norm, 1.0, 1.0),
            g(Group::Unembedding, 0.6, 0.5),
        ],
    }
}

fn config(routing: RoutingConfig) -> TransformerConfig {
    TransformerConfig {
        vocab: 7,
        seq_len: 5,
        sizes: sizes(),
        n_head: 2,
        moe_every: 1,
        tied_embeddings: false,
        activation: Activation::Gelu,
        routing,
        norm_eps: 1e-6,
        attn_logit_multiplier: 1.7,
    }
}

/// Builds the model, nudges the norm gains off 1 (so their gradient paths are not special), runs the
/// finite-difference check on every entry and asserts the error bound and that it was not vacuous.
fn check(cfg: &TransformerConfig, seed: u64) -> Vec<moe_dmft::routing::LoadStats> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model = MoeTransformer::<f64>::new(cfg, &hp(cfg.sizes), &mut rng).unwrap();
    for p in model.store_mut().params.iter_mut().filter(|p| p.group == Group::Norm) {
        p.value
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v += 0.05 * (i % 3) as f64);
    }
    let batch = random_tokens(2, 4, cfg.vocab, &mut rng);
    // The loss is O(1) and built from thousands of operations: central differences carry an absolute
    // round-off of ~1e-16 / eps (measured max |analytic - numeric| ~5e-10 at eps = 1e-6), so an entry
    // whose gradient is ~1e-6 cannot show 1e-5 relative agreement at any eps. eps = 1e-5 balances
    // round-off against the O(eps^2) truncation; entries with |gradient| < 1e-5 (the floor) are held
    // to 1e-10 in absolute terms instead. Every entry of every tensor is checked (max_entries > size).
    let opts = GradCheckOptions {
        eps: 1e-5,
        floor: 1e-5,
        max_entries: 400,
        seed,
    };
    let report = check_model(&mut model, &batch, &opts).unwrap();
    let summary = report.summary();
    println!("seed {seed}: max relative error {:.2e}", report.max_rel_error());
    assert!(
        report.max_rel_error() < 1e-5,
        "max relative error {:.3e}\n{summary}",
        report.max_rel_error()
    );
    for p in &report.params {
        if p.group != Group::ExpertBias {
            assert!(p.max_abs_grad > 1e-6, "vacuous check for `{}`\n{summary}", p.name);
        }
    }
    let out = model
        .loss_and_grad(&batch, &mut ChaCha8Rng::seed_from_u64(seed))
        .unwrap();
    out.load
}

fn all_groups_present(cfg: &TransformerConfig) {
    let model = MoeTransformer::<f64>::new(cfg, &hp(cfg.sizes), &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
    for g in [
        Group::Embedding,
        Group::AttnQkv,
        Group::AttnOut,
        Group::Router,
        Group::ExpertUp,
        Group::ExpertDown,
        Group::ExpertBias,
        Group::Norm,
        Group::Unembedding,
    ] {
        assert!(
            model.store().params.iter().any(|p| p.group == g),
            "group {} missing",
            g.name()
        );
    }
}

#[test]
fn softmax_top_k() {
    let cfg = config(RoutingConfig::default());
    all_groups_present(&cfg);
    check(&cfg, 1);
}

#[test]
fn sigmoid_gates() {
    check(
        &config(RoutingConfig {
            gate: Gate::Sigmoid,
            ..RoutingConfig::default()
        }),
        2,
    );
}

#[test]
fn capacity_with_drops() {
    let load = check(
        &config(RoutingConfig {
            capacity_factor: Some(0.5),
            ..RoutingConfig::default()
        }),
        3,
    );
    assert!(
        load.iter().any(|l| l.dropped > 0.0),
        "capacity 0.5 must drop tokens: {load:?}"
    );
}

#[test]
fn expert_prototypes() {
    check(
        &config(RoutingConfig {
            prototypes: 2,
            ..RoutingConfig::default()
        }),
        4,
    );
}

#[test]
fn balance_loss_and_z_loss() {
    check(
        &config(RoutingConfig {
            balance_loss: 0.3,
            z_loss: 0.05,
            ..RoutingConfig::default()
        }),
        5,
    );
}

#[test]
fn shared_experts() {
    check(
        &config(RoutingConfig {
            shared_experts: 1,
            ..RoutingConfig::default()
        }),
        6,
    );
}

#[test]
fn tied_embeddings_and_dense_blocks() {
    // moe_every = 2: block 0 dense, block 1 MoE; tied: one tensor serves as embedding and unembedding.
    let mut cfg = config(RoutingConfig {
        gate: Gate::Sigmoid,
        ..RoutingConfig::default()
    });
    cfg.tied_embeddings = true;
    cfg.moe_every = 2;
    cfg.activation = Activation::Tanh;
    check(&cfg, 7);
}

#[test]
fn with_trained_balancing_bias() {
    // The bias acts through selection only: after a few updates it is nonzero, and the gradients of
    // everything else must still be exact (its own gradient is zero, as are its finite differences).
    let cfg = config(RoutingConfig {
        bias_update_rate: 0.05,
        ..RoutingConfig::default()
    });
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let mut model = MoeTransformer::<f64>::new(&cfg, &hp(cfg.sizes), &mut rng).unwrap();
    let batch = random_tokens(2, 4, cfg.vocab, &mut rng);
    for _ in 0..3 {
        let out = model.loss_and_grad(&batch, &mut rng).unwrap();
        model.after_step(&out.load);
    }
    let bias_norm: f64 = model
        .store()
        .params
        .iter()
        .filter(|p| p.group == Group::ExpertBias)
        .flat_map(|p| p.value.iter())
        .map(|v| v.abs())
        .sum();
    assert!(bias_norm > 0.0, "bias updates must move the bias");
    let report = check_model(
        &mut model,
        &batch,
        &GradCheckOptions {
            eps: 1e-5,
            floor: 1e-5,
            max_entries: 400,
            seed: 8,
        },
    )
    .unwrap();
    println!("trained bias: max relative error {:.2e}", report.max_rel_error());
    assert!(report.max_rel_error() < 1e-5, "{}", report.summary());
}
