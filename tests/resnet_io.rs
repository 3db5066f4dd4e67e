//! Safetensors export of the MoE-ResNet: names, shapes, groups and values survive the round trip, the
//! reloaded model predicts exactly the same, and wrong files are refused with the tensor's name.

use moe_dmft::model::io::{load_safetensors, save_safetensors};
use moe_dmft::model::resnet::{MoeResNet, ResNetConfig};
use moe_dmft::model::{Activation, Batch, Model};
use moe_dmft::param::{Group, GroupHp, Optimizer, Resolved, Sizes};
use moe_dmft::routing::{RoutingConfig, TieBreak};
use ndarray::{Array2, ArrayD};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn hp(sizes: Sizes) -> Resolved {
    let g = |group, init_std: f64, multiplier: f64| GroupHp { group, init_std, multiplier, lr: 0.1, adam_eps: None, weight_decay: 0.0 };
    let n = sizes.width as f64;
    Resolved {
        preset: "io-test".into(),
        optimizer: Optimizer::Sgd,
        sizes,
        base: sizes,
        residual_multiplier: 0.5,
        groups: vec![
            g(Group::Embedding, 1.0, 0.5),
            g(Group::Router, 1.0, 1.0 / n.sqrt()),
            g(Group::ExpertUp, 1.0, 1.0 / n.sqrt()),
            g(Group::ExpertDown, 1.0, 1.0 / sizes.expert_hidden as f64),
            g(Group::ExpertBias, 0.0, 1.0),
            g(Group::Norm, 1.0, 1.0),
            g(Group::Readout, 1.0, 1.0 / n),
        ],
    }
}

fn cfg() -> ResNetConfig {
    ResNetConfig {
        input_dim: 5,
        outputs: 2,
        sizes: Sizes { width: 12, depth: 2, experts: 4, active: 2, expert_hidden: 6 },
        activation: Activation::Gelu,
        norm: true,
        routing: RoutingConfig { tie_break: TieBreak::Index, shared_experts: 1, capacity_factor: Some(1.5), ..RoutingConfig::default() },
    }
}

#[test]
fn safetensors_round_trip_keeps_names_shapes_groups_and_predictions() {
    let cfg = cfg();
    let hp = hp(cfg.sizes);
    let model = MoeResNet::<f32>::new(&cfg, &hp, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    save_safetensors(model.store(), &path).unwrap();

    let loaded = load_safetensors(&path).unwrap();
    assert_eq!(loaded.params.len(), model.store().params.len());
    // The documented names and shapes (docs/tensors.md), with N = 12, D = 5, M = 4, n = 6, S = 1, outputs 2.
    let expect: Vec<(&str, Group, Vec<usize>)> = vec![
        ("embedding", Group::Embedding, vec![12, 5]),
        ("blocks.0.norm", Group::Norm, vec![12]),
        ("blocks.0.moe.router", Group::Router, vec![4, 12]),
        ("blocks.0.moe.expert_bias", Group::ExpertBias, vec![4]),
        ("blocks.0.moe.expert_up", Group::ExpertUp, vec![4, 6, 12]),
        ("blocks.0.moe.expert_down", Group::ExpertDown, vec![4, 12, 6]),
        ("blocks.0.moe.shared_up", Group::ExpertUp, vec![1, 6, 12]),
        ("blocks.0.moe.shared_down", Group::ExpertDown, vec![1, 12, 6]),
        ("blocks.1.norm", Group::Norm, vec![12]),
        ("readout", Group::Readout, vec![2, 12]),
    ];
    for (name, group, shape) in expect {
        let i = loaded.index_of(name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!(loaded.params[i].group, group, "{name}");
        assert_eq!(loaded.params[i].value.shape(), shape.as_slice(), "{name}");
        let j = model.store().index_of(name).unwrap();
        assert_eq!(loaded.params[i].value, model.store().params[j].value, "{name} values");
    }
    assert_eq!(cfg.layout().len(), loaded.params.len());

    let reloaded = MoeResNet::<f32>::from_store(&cfg, &hp, loaded).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(2);
    let x = Array2::from_shape_simple_fn((10, 5), || StandardNormal.sample(&mut r));
    let y = Array2::zeros((10, 2));
    let batch = Batch::Regression { x, y };
    let (_, a) = model.forward(&batch, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
    let (_, b) = reloaded.forward(&batch, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
    assert_eq!(a, b);

    // An f64 model is written as f32 and loads back to the rounded values.
    let m64: MoeResNet<f64> = model.cast();
    let path64 = dir.path().join("w64.safetensors");
    save_safetensors(m64.store(), &path64).unwrap();
    let back = MoeResNet::<f32>::from_store(&cfg, &hp, load_safetensors(&path64).unwrap()).unwrap();
    let (_, c) = back.forward(&batch, &mut ChaCha8Rng::seed_from_u64(0)).unwrap();
    assert_eq!(a, c);
}

#[test]
fn loading_refuses_missing_reshaped_regrouped_or_extra_tensors() {
    let cfg = cfg();
    let hp = hp(cfg.sizes);
    let model = MoeResNet::<f32>::new(&cfg, &hp, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
    let base = model.store().clone();

    let mut missing = base.clone();
    missing.params.retain(|p| p.name != "blocks.1.moe.router");
    let e = MoeResNet::<f32>::from_store(&cfg, &hp, missing).unwrap_err();
    assert!(e.to_string().contains("blocks.1.moe.router") && e.exit_code() == 2, "{e}");

    let mut reshaped = base.clone();
    let i = reshaped.index_of("readout").unwrap();
    reshaped.params[i].value = ArrayD::zeros(vec![3, 12]);
    let e = MoeResNet::<f32>::from_store(&cfg, &hp, reshaped).unwrap_err();
    assert!(e.to_string().contains("readout") && e.to_string().contains("shape"), "{e}");

    let mut regrouped = base.clone();
    let i = regrouped.index_of("embedding").unwrap();
    regrouped.params[i].group = Group::Readout;
    let e = MoeResNet::<f32>::from_store(&cfg, &hp, regrouped).unwrap_err();
    assert!(e.to_string().contains("group"), "{e}");

    let mut extra = base.clone();
    extra.push("blocks.2.norm", Group::Norm, ArrayD::zeros(vec![12]));
    let e = MoeResNet::<f32>::from_store(&cfg, &hp, extra).unwrap_err();
    assert!(e.to_string().contains("blocks.2.norm"), "{e}");

    // Order does not matter.
    let mut shuffled = base.clone();
    shuffled.params.reverse();
    assert!(MoeResNet::<f32>::from_store(&cfg, &hp, shuffled).is_ok());

    // A missing or corrupt file is a clear error, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let e = load_safetensors(&dir.path().join("nope.safetensors")).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let e = load_safetensors(&bad).unwrap_err();
    assert_eq!(e.exit_code(), 2, "{e}");
}
