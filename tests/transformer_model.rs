//! MoE-Transformer behaviour: config validation with field names, batch checks, the dense baseline
//! being exactly a one-expert MoE, determinism, initial loss, learning, balancing-bias updates,
//! tied embeddings and diagnostics.

use moe_dmft::model::transformer::{random_tokens, MoeTransformer, TransformerConfig};
use moe_dmft::model::{Activation, Batch, Model};
use moe_dmft::param::{Group, ParamConfig, Sizes};
use moe_dmft::routing::RoutingConfig;
use moe_dmft::Error;
use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn small() -> TransformerConfig {
    TransformerConfig {
        vocab: 11,
        seq_len: 8,
        sizes: Sizes {
            width: 16,
            depth: 2,
            experts: 4,
            active: 2,
            expert_hidden: 8,
        },
        n_head: 2,
        activation: Activation::Gelu,
        ..TransformerConfig::default()
    }
}

fn build<F: moe_dmft::model::Real>(cfg: &TransformerConfig, seed: u64) -> MoeTransformer<F> {
    let hp = ParamConfig {
        sigma_router: 1.0,
        ..ParamConfig::default()
    }
    .resolve(&cfg.sizes)
    .unwrap();
    MoeTransformer::new(cfg, &hp, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap()
}

fn invalid_field(e: Error) -> String {
    assert_eq!(e.exit_code(), 2, "{e}");
    match e {
        Error::Invalid { field, .. } => field,
        other => panic!("expected an Invalid error, got {other}"),
    }
}

#[test]
fn config_errors_name_the_field() {
    type Mutation = Box<dyn Fn(&mut TransformerConfig)>;
    let cases: Vec<(&str, Mutation)> = vec![
        ("model.n_head", Box::new(|c| c.n_head = 3)),
        ("model.sizes.active", Box::new(|c| c.sizes.active = 5)),
        ("model.sizes.width", Box::new(|c| c.sizes.width = 0)),
        ("model.vocab", Box::new(|c| c.vocab = 1)),
        ("model.seq_len", Box::new(|c| c.seq_len = 0)),
        ("model.norm_eps", Box::new(|c| c.norm_eps = f64::NAN)),
        (
            "model.attn_logit_multiplier",
            Box::new(|c| c.attn_logit_multiplier = -1.0),
        ),
        ("routing.prototypes", Box::new(|c| c.routing.prototypes = 3)),
        (
            "routing.capacity_factor",
            Box::new(|c| c.routing.capacity_factor = Some(0.0)),
        ),
    ];
    for (field, mutate) in cases {
        let mut cfg = small();
        mutate(&mut cfg);
        assert_eq!(invalid_field(cfg.validate().unwrap_err()), field);
    }
    small().validate().unwrap();
}

#[test]
fn toml_rejects_unknown_keys_and_round_trips() {
    let cfg = small();
    let text = toml::to_string(&cfg).unwrap();
    let back: TransformerConfig = toml::from_str(&text).unwrap();
    assert_eq!(back, cfg);
    let bad = format!("{text}\nbogus = 1\n");
    assert!(toml::from_str::<TransformerConfig>(&bad).is_err());
    // Only the architecture's essentials are required; the rest has defaults.
    let minimal = "vocab = 65\nseq_len = 32\nn_head = 2\n[sizes]\nwidth = 8\ndepth = 1\nexperts = 4\nactive = 1\nexpert_hidden = 8\n";
    let m: TransformerConfig = toml::from_str(minimal).unwrap();
    assert_eq!(
        (m.moe_every, m.tied_embeddings, m.activation),
        (1, false, Activation::Gelu)
    );
}

#[test]
fn parameterization_must_match_the_sizes() {
    let cfg = small();
    let other = Sizes { width: 32, ..cfg.sizes };
    let hp = ParamConfig::default().resolve(&other).unwrap();
    let err = MoeTransformer::<f64>::new(&cfg, &hp, &mut ChaCha8Rng::seed_from_u64(0)).unwrap_err();
    assert_eq!(invalid_field(err), "param.sizes");
}

#[test]
fn bad_batches_are_user_errors() {
    let cfg = small();
    let model = build::<f64>(&cfg, 0);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let out_of_vocab = Batch::Tokens {
        ids: Array2::from_elem((2, 5), 11),
    };
    assert_eq!(
        invalid_field(model.loss_and_grad(&out_of_vocab, &mut rng).unwrap_err()),
        "batch.ids"
    );
    let too_long = random_tokens(1, 9, cfg.vocab, &mut rng);
    assert_eq!(
        invalid_field(model.loss_and_grad(&too_long, &mut rng).unwrap_err()),
        "batch.ids"
    );
    let regression = Batch::Regression {
        x: Array2::zeros((2, 3)),
        y: Array2::zeros((2, 1)),
    };
    assert_eq!(
        invalid_field(model.forward(&regression, &mut rng).unwrap_err()),
        "batch"
    );
}

#[test]
fn initial_loss_is_near_log_vocab() {
    // alpha_out / mN multiplies the logits; a small alpha_out makes them nearly uniform.
    let cfg = small();
    let hp = ParamConfig {
        alpha_out: 1e-3,
        ..ParamConfig::default()
    }
    .resolve(&cfg.sizes)
    .unwrap();
    let model = MoeTransformer::<f64>::new(&cfg, &hp, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let batch = random_tokens(4, 8, cfg.vocab, &mut rng);
    let (loss, _) = model.forward(&batch, &mut rng).unwrap();
    assert!((loss - (cfg.vocab as f64).ln()).abs() < 1e-2, "loss {loss}");
}

#[test]
fn dense_baseline_equals_a_single_expert_moe() {
    // A one-expert MoE layer has gate 1: with the same weights it must match the dense FFN exactly,
    // which is what makes the benchmark's dense baseline "the same model without routing".
    let sizes = Sizes {
        width: 16,
        depth: 2,
        experts: 1,
        active: 1,
        expert_hidden: 12,
    };
    let dense_cfg = TransformerConfig {
        sizes,
        moe_every: 0,
        ..small()
    };
    let moe_cfg = TransformerConfig {
        sizes,
        moe_every: 1,
        ..small()
    };
    let dense = build::<f64>(&dense_cfg, 3);
    let mut moe = build::<f64>(&moe_cfg, 4);
    for p in moe.store_mut().params.iter_mut() {
        let dense_name = p.name.replace(".moe.", ".ffn.");
        if let Some(i) = dense.store().index_of(&dense_name) {
            let src = &dense.store().params[i].value;
            p.value = src.to_shape(p.value.shape()).unwrap().to_owned();
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let batch = random_tokens(3, 6, dense_cfg.vocab, &mut rng);
    let a = dense.loss_and_grad(&batch, &mut ChaCha8Rng::seed_from_u64(6)).unwrap();
    let b = moe.loss_and_grad(&batch, &mut ChaCha8Rng::seed_from_u64(6)).unwrap();
    assert!((a.loss - b.loss).abs() < 1e-12, "{} vs {}", a.loss, b.loss);
    for (i, p) in dense.store().params.iter().enumerate() {
        let j = moe.store().index_of(&p.name.replace(".ffn.", ".moe.")).unwrap();
        let diff = (&a.grads[i] - &b.grads[j].to_shape(a.grads[i].shape()).unwrap()).mapv(f64::abs);
        assert!(diff.iter().all(|&d| d < 1e-12), "gradient of {} differs", p.name);
    }
}

#[test]
fn same_seed_and_threads_give_identical_steps() {
    let cfg = TransformerConfig {
        routing: RoutingConfig {
            capacity_factor: Some(1.0),
            ..Default::default()
        },
        ..small()
    };
    let run = || {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            let model = build::<f32>(&cfg, 7);
            let mut rng = ChaCha8Rng::seed_from_u64(8);
            let batch = random_tokens(4, 8, cfg.vocab, &mut rng);
            model.loss_and_grad(&batch, &mut rng).unwrap()
        })
    };
    let (a, b) = (run(), run());
    assert_eq!(a.loss, b.loss);
    assert_eq!(a.grads, b.grads);
    assert_eq!(a.load, b.load);
}

#[test]
fn gradient_descent_lowers_the_loss() {
    // A periodic sequence is learnable by attention + position embeddings in a few dozen steps.
    let cfg = small();
    let mut model = build::<f64>(&cfg, 9);
    let ids = Array2::from_shape_fn((4, 9), |(b, t)| ((b + 3 * t) % 5) as u32);
    let batch = Batch::Tokens { ids };
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let first = model.loss_and_grad(&batch, &mut rng).unwrap().loss;
    let mut last = first;
    for _ in 0..60 {
        let out = model.loss_and_grad(&batch, &mut rng).unwrap();
        last = out.loss;
        for (p, g) in model.store_mut().params.iter_mut().zip(out.grads.iter()) {
            p.value.scaled_add(-0.5, g);
        }
    }
    assert!(last < 0.5 * first, "loss {first} -> {last}");
}

#[test]
fn balancing_bias_moves_against_the_load() {
    let cfg = TransformerConfig {
        routing: RoutingConfig {
            bias_update_rate: 0.1,
            ..Default::default()
        },
        ..small()
    };
    let mut model = build::<f64>(&cfg, 11);
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let batch = random_tokens(4, 8, cfg.vocab, &mut rng);
    let out = model.loss_and_grad(&batch, &mut rng).unwrap();
    assert_eq!(out.load.len(), cfg.sizes.depth);
    model.after_step(&out.load);
    let bias = &model.store().params[model.store().index_of("blocks.0.moe.expert_bias").unwrap()].value;
    let fractions = &out.load[0].fraction;
    let target = fractions.iter().sum::<f64>() / fractions.len() as f64;
    for (b, f) in bias.iter().zip(fractions) {
        let expected = if *f < target {
            0.1
        } else if *f > target {
            -0.1
        } else {
            0.0
        };
        assert!((b - expected).abs() < 1e-15, "bias {b}, load {f}, target {target}");
    }
}

#[test]
fn tied_embeddings_use_one_tensor_and_every_other_block_is_moe() {
    let cfg = TransformerConfig {
        tied_embeddings: true,
        moe_every: 2,
        ..small()
    };
    let model = build::<f64>(&cfg, 13);
    let names: Vec<&str> = model.store().params.iter().map(|p| p.name.as_str()).collect();
    assert!(!names.contains(&"unembedding"));
    assert!(names.contains(&"blocks.0.ffn.expert_up") && names.contains(&"blocks.1.moe.router"));
    assert!(!model.store().params.iter().any(|p| p.group == Group::Unembedding));
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let out = model
        .loss_and_grad(&random_tokens(2, 8, cfg.vocab, &mut rng), &mut rng)
        .unwrap();
    assert_eq!(out.load.len(), 1, "one MoE block out of two");
}

#[test]
fn active_parameters_count_k_of_m_experts() {
    let cfg = small();
    let model = build::<f64>(&cfg, 15);
    let (n, l, m, k, h, v) = (16, 2, 4, 2, 8, 11);
    let per_block = 4 * n * n + 2 * n + m * n + k * 2 * h * n;
    assert_eq!(model.active_parameters(), 2 * v * n + n + l * per_block);
    assert_eq!(
        model.store().num_elements(),
        2 * v * n + 8 * n + n + l * (per_block - k * 2 * h * n + m * 2 * h * n + m)
    );
}

#[test]
fn diagnostics_cover_every_block() {
    let cfg = small();
    let model = build::<f32>(&cfg, 16);
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let out = model
        .loss_and_grad(&random_tokens(2, 8, cfg.vocab, &mut rng), &mut rng)
        .unwrap();
    for l in 0..cfg.sizes.depth {
        for key in [
            "resid_rms",
            "attn_out_rms",
            "router_logits_rms",
            "expert_preact_rms",
            "ffn_out_rms",
        ] {
            let name = format!("block{l}.{key}");
            let v = out.diagnostics.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
            assert!(v.is_some_and(|v| v.is_finite() && v > 0.0), "{name}: {v:?}");
        }
    }
    assert!(out.diagnostics.iter().any(|(k, v)| k == "logits_rms" && *v > 0.0));
}

#[test]
fn safetensors_round_trip_and_from_store_checks() {
    let cfg = TransformerConfig {
        moe_every: 2,
        routing: RoutingConfig {
            shared_experts: 1,
            ..Default::default()
        },
        ..small()
    };
    let hp = ParamConfig {
        sigma_router: 1.0,
        ..ParamConfig::default()
    }
    .resolve(&cfg.sizes)
    .unwrap();
    let model = MoeTransformer::<f32>::new(&cfg, &hp, &mut ChaCha8Rng::seed_from_u64(18)).unwrap();
    let names: Vec<String> = model.store().params.iter().map(|p| p.name.clone()).collect();
    let expected: Vec<String> = cfg.layout().into_iter().map(|(n, _, _)| n).collect();
    assert_eq!(names, expected);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    moe_dmft::model::io::save_safetensors(model.store(), &path).unwrap();
    let loaded =
        MoeTransformer::<f32>::from_store(&cfg, &hp, moe_dmft::model::io::load_safetensors(&path).unwrap()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let batch = random_tokens(2, 8, cfg.vocab, &mut rng);
    let a = model.loss_and_grad(&batch, &mut ChaCha8Rng::seed_from_u64(20)).unwrap();
    let b = loaded
        .loss_and_grad(&batch, &mut ChaCha8Rng::seed_from_u64(20))
        .unwrap();
    assert_eq!(a.loss, b.loss);
    assert_eq!(a.grads, b.grads);

    // f64 copy of the same weights: same loss up to f32 rounding.
    let (l64, _) = model
        .cast::<f64>()
        .forward(&batch, &mut ChaCha8Rng::seed_from_u64(20))
        .unwrap();
    assert!((l64 - a.loss).abs() < 1e-4, "{l64} vs {}", a.loss);

    let mut missing = model.store().clone();
    missing.params.retain(|p| p.name != "blocks.1.moe.router");
    let e = MoeTransformer::<f32>::from_store(&cfg, &hp, missing).err().unwrap();
    assert_eq!(invalid_field(e), "weights.blocks.1.moe.router");
    let mut wrong = model.store().clone();
    wrong.params[0].value = ndarray::ArrayD::zeros(vec![3, 3]);
    let e = MoeTransformer::<f32>::from_store(&cfg, &hp, wrong).err().unwrap();
    assert_eq!(invalid_field(e), "weights.embedding");
    let mut extra = model.store().clone();
    extra.push("stray", Group::Norm, ndarray::ArrayD::zeros(vec![2]));
    let e = MoeTransformer::<f32>::from_store(&cfg, &hp, extra).err().unwrap();
    assert_eq!(invalid_field(e), "weights.stray");
}
