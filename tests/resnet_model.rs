//! The MoE-ResNet: gradient checks of every parameter group under every routing variant, config
//! validation, initialisation, determinism, f32/f64 agreement, balancing-bias updates and a few steps
//! of mean-field SGD that must reduce the loss.

use moe_dmft::data::{make_task, TaskConfig};
use moe_dmft::model::gradcheck::{check_model, GradCheckOptions};
use moe_dmft::model::resnet::{MoeResNet, ResNetConfig};
use moe_dmft::model::{Activation, Batch, Model};
use moe_dmft::param::{Group, GroupHp, Optimizer, Resolved, Sizes};
use moe_dmft::routing::{Gate, RoutingConfig, TieBreak};
use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn group(group: Group, init_std: f64, multiplier: f64, lr: f64) -> GroupHp {
    GroupHp { group, init_std, multiplier, lr, adam_eps: None, weight_decay: 0.0 }
}

/// The mean-field SGD instance of SPEC §4 (router at zero, multipliers carry the scalings).
fn mean_field(sizes: Sizes, input_dim: usize, gamma0: f64, eta0: f64) -> Resolved {
    let (n, l, k, h) = (sizes.width as f64, sizes.depth as f64, sizes.active as f64, sizes.expert_hidden as f64);
    let base = eta0 * gamma0 * gamma0;
    Resolved {
        preset: "mean-field-sgd".into(),
        optimizer: Optimizer::Sgd,
        sizes,
        base: sizes,
        residual_multiplier: 1.0 / l,
        groups: vec![
            group(Group::Embedding, 1.0, 1.0 / (input_dim as f64).sqrt(), base * n),
            group(Group::Router, 0.0, 1.0 / n.sqrt(), base * k * l),
            group(Group::ExpertUp, 1.0, 1.0 / n.sqrt(), base * h * k * l),
            group(Group::ExpertDown, 1.0, 1.0 / h, base * n * h * k * l),
            group(Group::ExpertBias, 0.0, 1.0, 0.0),
            group(Group::Norm, 1.0, 1.0, base),
            group(Group::Readout, 1.0, 1.0 / (gamma0 * n), base * n),
        ],
    }
}

/// Theta(1) router logits (no ties) and O(1) gradients everywhere: what the finite differences need.
fn check_hp(sizes: Sizes) -> Resolved {
    let n = sizes.width as f64;
    Resolved {
        preset: "gradcheck".into(),
        optimizer: Optimizer::Sgd,
        sizes,
        base: sizes,
        residual_multiplier: 0.7,
        groups: vec![
            group(Group::Embedding, 1.0, 0.5, 0.1),
            group(Group::Router, 1.0, 1.0 / n.sqrt(), 0.1),
            group(Group::ExpertUp, 1.0, 1.0 / n.sqrt(), 0.1),
            group(Group::ExpertDown, 1.0, 1.0 / sizes.expert_hidden as f64, 0.1),
            group(Group::ExpertBias, 0.0, 1.0, 0.0),
            group(Group::Norm, 1.0, 1.3, 0.1),
            group(Group::Readout, 1.0, 1.0 / n.sqrt(), 0.1),
        ],
    }
}

fn small_cfg(routing: RoutingConfig, norm: bool, activation: Activation) -> ResNetConfig {
    ResNetConfig {
        input_dim: 4,
        outputs: 2,
        sizes: Sizes { width: 8, depth: 2, experts: 6, active: 2, expert_hidden: 5 },
        activation,
        norm,
        routing,
    }
}

fn regression_batch(points: usize, input_dim: usize, outputs: usize, seed: u64) -> Batch {
    let mut r = rng(seed);
    let x = Array2::from_shape_simple_fn((points, input_dim), || StandardNormal.sample(&mut r));
    let y = Array2::from_shape_simple_fn((points, outputs), || StandardNormal.sample(&mut r));
    Batch::Regression { x, y }
}

fn check(cfg: &ResNetConfig) -> f64 {
    let hp = check_hp(cfg.sizes);
    let mut model = MoeResNet::<f64>::new(cfg, &hp, &mut rng(3)).unwrap();
    // Nonzero balancing biases so selection differs from the logits' own top-k.
    for p in &mut model.store_mut().params {
        if p.group == Group::ExpertBias {
            p.value.iter_mut().enumerate().for_each(|(i, v)| *v = 0.2 * i as f64);
        }
    }
    let batch = regression_batch(7, cfg.input_dim, cfg.outputs, 9);
    let report = check_model(&mut model, &batch, &GradCheckOptions { max_entries: 24, ..Default::default() }).unwrap();
    let mut want = vec![Group::Embedding, Group::Router, Group::ExpertUp, Group::ExpertDown, Group::ExpertBias, Group::Readout];
    if cfg.norm {
        want.push(Group::Norm);
    }
    for g in want {
        assert!(report.groups().contains(&g), "group {} not checked", g.name());
    }
    for p in &report.params {
        if p.group != Group::ExpertBias {
            assert!(p.max_abs_grad > 1e-5, "{} has a vanishing gradient\n{}", p.name, report.summary());
        }
    }
    assert!(report.max_rel_error() < 1e-5, "{:?}\n{}", cfg.routing, report.summary());
    report.max_rel_error()
}

#[test]
fn resnet_gradients_match_finite_differences_for_every_group_and_routing_variant() {
    let base = RoutingConfig { tie_break: TieBreak::Index, ..RoutingConfig::default() };
    let variants = vec![
        ("top-k softmax", base.clone(), false),
        ("top-k + norm", base.clone(), true),
        ("random tie-break", RoutingConfig { tie_break: TieBreak::Random, ..base.clone() }, false),
        ("sigmoid", RoutingConfig { gate: Gate::Sigmoid, ..base.clone() }, false),
        ("capacity", RoutingConfig { capacity_factor: Some(0.7), ..base.clone() }, false),
        ("prototypes", RoutingConfig { prototypes: 2, ..base.clone() }, false),
        ("balance loss", RoutingConfig { balance_loss: 0.2, ..base.clone() }, false),
        ("z-loss", RoutingConfig { z_loss: 0.1, ..base.clone() }, false),
        ("shared experts", RoutingConfig { shared_experts: 1, ..base.clone() }, true),
        (
            "all together",
            RoutingConfig {
                gate: Gate::Sigmoid,
                tie_break: TieBreak::Random,
                capacity_factor: Some(0.9),
                prototypes: 2,
                balance_loss: 0.1,
                z_loss: 0.05,
                bias_update_rate: 0.01,
                shared_experts: 2,
            },
            true,
        ),
    ];
    for (name, routing, norm) in variants {
        let e = check(&small_cfg(routing, norm, Activation::Tanh));
        eprintln!("{name:<18} max rel error {e:.2e}");
    }
    let e = check(&small_cfg(base, true, Activation::Gelu));
    eprintln!("gelu + norm        max rel error {e:.2e}");
}

#[test]
fn config_validation_names_the_field() {
    let ok = small_cfg(RoutingConfig::default(), false, Activation::Relu);
    ok.validate().unwrap();
    let cases: Vec<(Box<dyn Fn(&mut ResNetConfig)>, &str)> = vec![
        (Box::new(|c| c.sizes.active = 7), "sizes.active"),
        (Box::new(|c| c.sizes.width = 0), "sizes.width"),
        (Box::new(|c| c.sizes.depth = 0), "sizes.depth"),
        (Box::new(|c| c.sizes.expert_hidden = 0), "sizes.expert_hidden"),
        (Box::new(|c| c.input_dim = 0), "input_dim"),
        (Box::new(|c| c.outputs = 0), "outputs"),
        (Box::new(|c| c.routing.prototypes = 4), "routing.prototypes"),
        (Box::new(|c| c.routing.capacity_factor = Some(-0.5)), "routing.capacity_factor"),
        (Box::new(|c| c.routing.balance_loss = -1.0), "routing.balance_loss"),
    ];
    for (edit, field) in cases {
        let mut c = ok.clone();
        edit(&mut c);
        let err = c.validate().unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains(field), "{err} should name {field}");
        // The constructor refuses it too, without panicking.
        assert!(MoeResNet::<f32>::new(&c, &check_hp(c.sizes), &mut rng(0)).is_err());
    }
    // Sizes of the parameterization must be the model's.
    let mut other = ok.sizes;
    other.width = 16;
    let err = MoeResNet::<f32>::new(&ok, &check_hp(other), &mut rng(0)).unwrap_err();
    assert!(err.to_string().contains("sizes"));
    // TOML: unknown fields are rejected, defaults fill the rest.
    let text = "input_dim = 8\n[sizes]\nwidth = 16\ndepth = 1\nexperts = 4\nactive = 1\nexpert_hidden = 8\n";
    let parsed: ResNetConfig = toml::from_str(text).unwrap();
    assert_eq!(parsed.outputs, 1);
    assert!(!parsed.norm);
    assert!(toml::from_str::<ResNetConfig>(&format!("{text}widht = 3\n")).is_err());
    // A regression batch of the wrong width is a user error.
    let model = MoeResNet::<f32>::new(&ok, &check_hp(ok.sizes), &mut rng(0)).unwrap();
    let err = model.forward(&regression_batch(3, 5, 2, 0), &mut rng(0)).unwrap_err();
    assert!(err.to_string().contains("batch.x"));
}

#[test]
fn init_follows_the_parameterization_and_is_deterministic() {
    let cfg = small_cfg(RoutingConfig::default(), true, Activation::Relu);
    let hp = mean_field(cfg.sizes, cfg.input_dim, 1.0, 0.1);
    let a = MoeResNet::<f32>::new(&cfg, &hp, &mut rng(1)).unwrap();
    let b = MoeResNet::<f32>::new(&cfg, &hp, &mut rng(1)).unwrap();
    let names: Vec<&str> = a.store().params.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names[0], "embedding");
    assert_eq!(names[1], "blocks.0.norm");
    assert!(names.contains(&"blocks.1.moe.expert_down"));
    assert_eq!(*names.last().unwrap(), "readout");
    for (p, q) in a.store().params.iter().zip(b.store().params.iter()) {
        assert_eq!(p.value, q.value, "{} differs between equal seeds", p.name);
        match p.group {
            Group::Router | Group::ExpertBias => assert!(p.value.iter().all(|&v| v == 0.0), "{} must start at zero", p.name),
            Group::Norm => assert!(p.value.iter().all(|&v| v == 1.0)),
            _ => {
                let var = p.value.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / p.value.len() as f64;
                assert!((var - 1.0).abs() < 0.5, "{}: variance {var}", p.name);
            }
        }
    }
    // Same seed and routing seed: identical gradients.
    let batch = regression_batch(5, 4, 2, 0);
    let ga = a.loss_and_grad(&batch, &mut rng(7)).unwrap();
    let gb = b.loss_and_grad(&batch, &mut rng(7)).unwrap();
    assert_eq!(ga.grads, gb.grads);
    assert_eq!(ga.loss, gb.loss);
    for name in ["embedding.h_rms", "block0.router_logits_rms", "block0.expert_preact_rms", "block1.moe_out_rms", "block1.h_rms", "output.f_rms"] {
        assert!(ga.diagnostics.iter().any(|(n, v)| n == name && v.is_finite()), "missing diagnostic {name}");
    }
    // Zero router: all logits tie, RMS 0.
    assert_eq!(ga.diagnostics.iter().find(|(n, _)| n == "block0.router_logits_rms").unwrap().1, 0.0);
}

#[test]
fn zero_router_with_random_ties_activates_each_expert_with_probability_kappa() {
    let cfg = ResNetConfig {
        input_dim: 8,
        outputs: 1,
        sizes: Sizes { width: 16, depth: 1, experts: 8, active: 2, expert_hidden: 8 },
        activation: Activation::Tanh,
        norm: false,
        routing: RoutingConfig::default(),
    };
    let hp = mean_field(cfg.sizes, 8, 1.0, 0.1);
    let model = MoeResNet::<f32>::new(&cfg, &hp, &mut rng(0)).unwrap();
    let batch = regression_batch(2000, 8, 1, 1);
    let out = model.loss_and_grad(&batch, &mut rng(2)).unwrap();
    for &f in &out.load[0].fraction {
        // fraction of T * k assignments: 1/M = 0.125 on average.
        assert!((f - 0.125).abs() < 0.02, "load fraction {f}");
    }
    assert!(out.load[0].cv < 0.15);
}

#[test]
fn f32_and_f64_models_agree_and_cast_round_trips() {
    let cfg = small_cfg(RoutingConfig { tie_break: TieBreak::Index, shared_experts: 1, ..RoutingConfig::default() }, true, Activation::Gelu);
    let hp = check_hp(cfg.sizes);
    let m32 = MoeResNet::<f32>::new(&cfg, &hp, &mut rng(4)).unwrap();
    let m64: MoeResNet<f64> = m32.cast();
    let batch = regression_batch(6, 4, 2, 5);
    let (l32, p32) = m32.forward(&batch, &mut rng(0)).unwrap();
    let (l64, p64) = m64.forward(&batch, &mut rng(0)).unwrap();
    let diff = (&p32 - &p64).mapv(f64::abs).fold(0.0f64, |a, &b| a.max(b));
    assert!(diff < 1e-5, "f32 vs f64 predictions differ by {diff}");
    assert!((l32 - l64).abs() < 1e-5);
    let back: MoeResNet<f32> = m64.cast();
    for (p, q) in back.store().params.iter().zip(m32.store().params.iter()) {
        assert_eq!(p.value, q.value);
    }
}

#[test]
fn balancing_bias_is_updated_after_each_step_and_not_by_the_gradient() {
    let routing = RoutingConfig { tie_break: TieBreak::Index, bias_update_rate: 0.05, ..RoutingConfig::default() };
    let cfg = small_cfg(routing, false, Activation::Tanh);
    let mut hp = mean_field(cfg.sizes, 4, 1.0, 0.1);
    hp.groups.iter_mut().for_each(|g| if g.group == Group::Router { g.init_std = 0.0 });
    let mut model = MoeResNet::<f64>::new(&cfg, &hp, &mut rng(0)).unwrap();
    let batch = regression_batch(12, 4, 2, 0);
    let out = model.loss_and_grad(&batch, &mut rng(0)).unwrap();
    let bias_id = model.store().index_of("blocks.0.moe.expert_bias").unwrap();
    assert!(out.grads[bias_id].iter().all(|&g| g == 0.0));
    // Index ties: experts 0 and 1 take everything, so their biases go down and the others' up.
    model.after_step(&out.load);
    let b = &model.store().params[bias_id].value;
    assert_eq!(b.as_slice().unwrap(), &[-0.05, -0.05, 0.05, 0.05, 0.05, 0.05]);
    // After the update the next step routes to other experts.
    let next = model.loss_and_grad(&batch, &mut rng(0)).unwrap();
    assert_eq!(next.load[0].fraction[0], 0.0);
}

#[test]
fn mean_field_sgd_reduces_the_loss_on_the_default_task() {
    let task = make_task(&TaskConfig::default()).unwrap();
    let cfg = ResNetConfig {
        input_dim: task.x.ncols(),
        outputs: 1,
        sizes: Sizes { width: 64, depth: 2, experts: 8, active: 2, expert_hidden: 32 },
        activation: Activation::Tanh,
        norm: false,
        routing: RoutingConfig::default(),
    };
    let hp = mean_field(cfg.sizes, cfg.input_dim, 1.0, 0.2);
    let mut model = MoeResNet::<f32>::new(&cfg, &hp, &mut rng(0)).unwrap();
    let batch = Batch::Regression { x: task.x.clone(), y: task.y.clone() };
    let mut route_rng = rng(1);
    let mut losses = Vec::new();
    for _ in 0..20 {
        let out = model.loss_and_grad(&batch, &mut route_rng).unwrap();
        losses.push(out.loss);
        let groups: Vec<Group> = model.store().params.iter().map(|p| p.group).collect();
        for ((p, g), grp) in model.store_mut().params.iter_mut().zip(out.grads.iter()).zip(groups) {
            let lr = hp.get(grp).lr as f32;
            p.value.zip_mut_with(g, |v, &d| *v -= lr * d);
        }
        model.after_step(&out.load);
    }
    let last = model.forward(&batch, &mut route_rng).unwrap().0;
    eprintln!("mean-field SGD losses: first {:.4}, step 10 {:.4}, final {last:.4}", losses[0], losses[10]);
    assert!(losses.iter().all(|l| l.is_finite()));
    assert!(last < 0.5 * losses[0], "loss {} -> {last}", losses[0]);
    // The router learned: logits are no longer all zero.
    let router = model.store().index_of("blocks.0.moe.router").unwrap();
    assert!(model.store().params[router].value.iter().any(|&v| v != 0.0));
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let routing = RoutingConfig { capacity_factor: Some(1.0), shared_experts: 1, balance_loss: 0.01, ..RoutingConfig::default() };
    let cfg = ResNetConfig {
        input_dim: 6,
        outputs: 1,
        sizes: Sizes { width: 24, depth: 2, experts: 8, active: 2, expert_hidden: 12 },
        activation: Activation::Gelu,
        norm: true,
        routing,
    };
    let model = MoeResNet::<f32>::new(&cfg, &check_hp(cfg.sizes), &mut rng(0)).unwrap();
    let batch = regression_batch(64, 6, 1, 3);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| model.loss_and_grad(&batch, &mut rng(5)).unwrap())
    };
    let (one, two) = (run(1), run(2));
    assert_eq!(one.loss, two.loss);
    assert_eq!(one.grads, two.grads);
    assert_eq!(one.load, two.load);
}
