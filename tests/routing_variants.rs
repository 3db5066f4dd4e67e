//! Routing rules (selection, tie-breaking, prototyping, capacity drop order, gates, auxiliary losses,
//! balancing bias, load statistics) and gradient checks of the MoE layer for every routing variant.

use moe_dmft::model::gradcheck::{check_store, GradCheckOptions};
use moe_dmft::model::moe::{moe_backward, moe_forward, MoeMultipliers, MoeParamIds, MoeShape};
use moe_dmft::model::{Activation, ParamStore};
use moe_dmft::param::{Group, GroupHp, Optimizer, Resolved, Sizes};
use moe_dmft::routing::{aux_losses, route, update_bias, Gate, LoadStats, RoutingConfig, TieBreak};
use ndarray::{array, Array1, Array2, ArrayD, Ix2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn cfg(tie: TieBreak) -> RoutingConfig {
    RoutingConfig { tie_break: tie, ..RoutingConfig::default() }
}

#[test]
fn top_k_takes_the_highest_scores_and_bias_moves_selection_not_gates() {
    let logits = array![[0.1, 2.0, -1.0, 1.0], [3.0, 0.0, 0.5, 0.2]];
    let zero = Array1::zeros(4);
    let r = route(logits.view(), zero.view(), 2, &cfg(TieBreak::Index), &mut rng(0)).unwrap();
    assert_eq!(r.selected, array![[1, 3], [0, 2]]);
    // Softmax over the selected set.
    let g = 1.0 / (1.0 + (-1.0f64).exp());
    assert!((r.gates[[0, 0]] - g).abs() < 1e-12);
    assert!((r.gates.row(1).sum() - 1.0).abs() < 1e-12);

    // A bias on expert 2 moves it into token 0's set; its gate still comes from the logits only.
    let bias = array![0.0, 0.0, 2.5, 0.0];
    let r2 = route(logits.view(), bias.view(), 2, &cfg(TieBreak::Index), &mut rng(0)).unwrap();
    assert_eq!(r2.selected.row(0).to_vec(), vec![1, 2]);
    let expect = 1.0 / (1.0 + (-3.0f64).exp());
    assert!((r2.gates[[0, 0]] - expect).abs() < 1e-12);
}

#[test]
fn sigmoid_gates_are_renormalized_over_the_active_set() {
    let logits = array![[0.3, -0.7, 1.2]];
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    let c = RoutingConfig { gate: Gate::Sigmoid, tie_break: TieBreak::Index, ..RoutingConfig::default() };
    let r = route(logits.view(), Array1::zeros(3).view(), 2, &c, &mut rng(0)).unwrap();
    assert_eq!(r.selected.row(0).to_vec(), vec![2, 0]);
    let s = sig(1.2) + sig(0.3);
    assert!((r.gates[[0, 0]] - sig(1.2) / s).abs() < 1e-12);
    assert!((r.gates[[0, 1]] - sig(0.3) / s).abs() < 1e-12);
}

#[test]
fn index_tie_break_sends_all_tied_tokens_to_the_first_experts() {
    let logits = Array2::zeros((50, 8));
    let r = route(logits.view(), Array1::zeros(8).view(), 2, &cfg(TieBreak::Index), &mut rng(0)).unwrap();
    for t in 0..50 {
        assert_eq!(r.selected.row(t).to_vec(), vec![0, 1]);
    }
    let load = r.load_stats();
    assert_eq!(load.fraction[0], 0.5);
    assert_eq!(load.fraction[7], 0.0);
}

#[test]
fn random_tie_break_activates_each_expert_with_probability_kappa() {
    let (tokens, experts, k) = (4000, 8, 2);
    let logits = Array2::zeros((tokens, experts));
    let r = route(logits.view(), Array1::zeros(experts).view(), k, &cfg(TieBreak::Random), &mut rng(3)).unwrap();
    let (counts, _) = r.counts();
    for &c in &counts {
        let p = c as f64 / tokens as f64;
        // kappa = 1/4; binomial std sqrt(kappa (1 - kappa) / 4000) = 0.007.
        assert!((p - 0.25).abs() < 0.03, "activation frequency {p}");
    }
    for t in 0..tokens {
        assert_ne!(r.selected[[t, 0]], r.selected[[t, 1]]);
    }
    // Same seed, same selection; different seed, different selection.
    let again = route(logits.view(), Array1::zeros(experts).view(), k, &cfg(TieBreak::Random), &mut rng(3)).unwrap();
    assert_eq!(again.selected, r.selected);
    let other = route(logits.view(), Array1::zeros(experts).view(), k, &cfg(TieBreak::Random), &mut rng(4)).unwrap();
    assert_ne!(other.selected, r.selected);
    // Jitter only orders exact ties: distinct scores keep their order.
    let logits2 = array![[0.0, 1e-12, 0.0, 0.0]];
    for s in 0..20 {
        let r = route(logits2.view(), Array1::zeros(4).view(), 1, &cfg(TieBreak::Random), &mut rng(s)).unwrap();
        assert_eq!(r.selected[[0, 0]], 1);
    }
}

#[test]
fn prototyping_picks_k_over_z_experts_in_each_group() {
    // Z = 2 groups {0,1,2,3} and {4,5,6,7}; k = 2: one expert per group even though group 0 holds the two
    // highest logits.
    let logits = array![[5.0, 4.0, 0.0, 0.0, 1.0, 0.5, 0.2, 0.1]];
    let c = RoutingConfig { prototypes: 2, tie_break: TieBreak::Index, ..RoutingConfig::default() };
    let r = route(logits.view(), Array1::zeros(8).view(), 2, &c, &mut rng(0)).unwrap();
    assert_eq!(r.selected.row(0).to_vec(), vec![0, 4]);
    let plain = route(logits.view(), Array1::zeros(8).view(), 2, &cfg(TieBreak::Index), &mut rng(0)).unwrap();
    assert_eq!(plain.selected.row(0).to_vec(), vec![0, 1]);
    // Gates are renormalized over the union, exactly like top-k gates on that set.
    let e = (1.0f64 - 5.0).exp();
    assert!((r.gates[[0, 1]] - e / (1.0 + e)).abs() < 1e-12);
}

#[test]
fn capacity_drops_slot_major_in_token_order() {
    // Every token prefers expert 0, then expert 1. C = 1, T = 4, k = 1, M = 2: capacity 2.
    let logits = array![[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]];
    let c = RoutingConfig { capacity_factor: Some(1.0), tie_break: TieBreak::Index, ..RoutingConfig::default() };
    let r = route(logits.view(), Array1::zeros(2).view(), 1, &c, &mut rng(0)).unwrap();
    assert_eq!(r.capacity, Some(2));
    assert_eq!(r.kept.column(0).to_vec(), vec![true, true, false, false]);
    let load = r.load_stats();
    assert_eq!(load.dropped, 0.5);
    assert_eq!(load.fraction, vec![0.5, 0.0]);

    // k = 2, M = 3, C = 0.75: capacity ceil(0.75 * 4 * 2 / 3) = 2. First slots (token order) fill
    // expert 0 with tokens 0, 1 and drop tokens 2, 3; second slots then fill expert 1 with tokens 0, 1.
    let logits = array![[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [2.0, 1.0, 0.0]];
    let c = RoutingConfig { capacity_factor: Some(0.75), tie_break: TieBreak::Index, ..RoutingConfig::default() };
    let r = route(logits.view(), Array1::zeros(3).view(), 2, &c, &mut rng(0)).unwrap();
    assert_eq!(r.capacity, Some(2));
    assert_eq!(r.kept, array![[true, true], [true, true], [false, false], [false, false]]);
    let (_, kept) = r.counts();
    assert!(kept.iter().all(|&c| c <= 2));
    assert_eq!(r.load_stats().dropped, 0.5);
}

#[test]
fn load_statistics_give_fraction_cv_and_drops() {
    let logits = array![[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]];
    let r = route(logits.view(), Array1::zeros(4).view(), 1, &cfg(TieBreak::Index), &mut rng(0)).unwrap();
    let l = r.load_stats();
    assert_eq!(l.fraction, vec![0.5, 0.25, 0.25, 0.0]);
    // mean 0.25, population std sqrt((0.0625 + 0 + 0 + 0.0625) / 4) = 0.1767767.
    assert!((l.cv - 0.1767766952966369 / 0.25).abs() < 1e-12);
    assert_eq!(l.dropped, 0.0);
}

#[test]
fn auxiliary_losses_have_their_documented_values() {
    let (t, m) = (6, 4);
    let logits = Array2::zeros((t, m));
    let c = RoutingConfig { balance_loss: 0.01, z_loss: 0.001, tie_break: TieBreak::Index, ..RoutingConfig::default() };
    let r = route(logits.view(), Array1::zeros(m).view(), 2, &c, &mut rng(0)).unwrap();
    let (loss, grad) = aux_losses(logits.view(), &r, &c);
    // Uniform softmax: balance term = w * M * sum_e f_e / M = w whatever f; z term = w_z (ln M)^2.
    let expect = 0.01 + 0.001 * (m as f64).ln().powi(2);
    assert!((loss - expect).abs() < 1e-14, "{loss} vs {expect}");
    // The balance gradient pushes logits of over-selected experts (0, 1) down relative to the others.
    assert!(grad[[0, 0]] > grad[[0, 3]]);
}

#[test]
fn balancing_bias_moves_toward_the_mean_load() {
    let mut bias = Array1::<f64>::zeros(4);
    let load = LoadStats { fraction: vec![0.4, 0.25, 0.25, 0.1], cv: 0.0, dropped: 0.0 };
    update_bias(bias.view_mut(), &load, 0.01);
    assert_eq!(bias.to_vec(), vec![-0.01, 0.0, 0.0, 0.01]);
}

#[test]
fn routing_config_rejects_bad_values_with_field_names() {
    let bad = RoutingConfig { prototypes: 3, ..RoutingConfig::default() };
    let e = bad.validate(8, 2).unwrap_err().to_string();
    assert!(e.contains("routing.prototypes"), "{e}");
    let bad = RoutingConfig { prototypes: 4, ..RoutingConfig::default() };
    assert!(bad.validate(8, 2).unwrap_err().to_string().contains("routing.prototypes"));
    let bad = RoutingConfig { capacity_factor: Some(-1.0), ..RoutingConfig::default() };
    assert!(bad.validate(8, 2).unwrap_err().to_string().contains("routing.capacity_factor"));
    let bad = RoutingConfig { z_loss: f64::NAN, ..RoutingConfig::default() };
    assert!(bad.validate(8, 2).unwrap_err().to_string().contains("routing.z_loss"));
    let e = route(Array2::zeros((2, 4)).view(), Array1::zeros(4).view(), 5, &RoutingConfig::default(), &mut rng(0));
    assert!(e.unwrap_err().to_string().contains("sizes.active"));
    let bad: Result<RoutingConfig, _> = toml::from_str("gate = \"softmax\"\ncapacity = 2.0\n");
    assert!(bad.is_err(), "unknown fields are rejected");
}

/// A hand-built parameterization with Theta(1) router logits (no ties), for the gradient checks.
pub fn check_hp(sizes: Sizes) -> Resolved {
    let g = |group, init_std, multiplier| GroupHp { group, init_std, multiplier, lr: 0.1, adam_eps: None, weight_decay: 0.0 };
    let n = sizes.width as f64;
    Resolved {
        preset: "gradcheck".into(),
        optimizer: Optimizer::Sgd,
        sizes,
        base: sizes,
        residual_multiplier: 0.7,
        groups: vec![
            g(Group::Embedding, 1.0, 0.5),
            g(Group::Router, 1.0, 1.0 / n.sqrt()),
            g(Group::ExpertUp, 1.0, 1.0 / n.sqrt()),
            g(Group::ExpertDown, 1.0, 1.0 / sizes.expert_hidden as f64),
            g(Group::ExpertBias, 0.0, 1.0),
            g(Group::Norm, 1.0, 1.3),
            g(Group::Readout, 1.0, 1.0 / n),
        ],
    }
}

/// Gradient check of the MoE layer alone: objective `sum(out * C) + aux`, with the input `a` checked as a
/// tensor too (it carries dL/da).
fn check_layer(routing: RoutingConfig, act: Activation) -> f64 {
    let sizes = Sizes { width: 6, depth: 1, experts: 6, active: 2, expert_hidden: 5 };
    let hp = check_hp(sizes);
    let shape = MoeShape { width: 6, experts: 6, expert_hidden: 5, shared_experts: routing.shared_experts };
    let mut r = rng(11);
    let mut store = ParamStore::<f64> { params: Vec::new() };
    let ids = MoeParamIds::push_init(&mut store, "moe", &shape, &hp, &mut r);
    // A nonzero bias so selection differs from the logits' top-k.
    let bias: ArrayD<f64> = ArrayD::from_shape_fn(vec![6], |i| 0.3 * i[0] as f64);
    store.params[ids.bias].value = bias;
    let tokens = 9;
    let a_id = store.push("a", Group::Embedding, ArrayD::from_shape_simple_fn(vec![tokens, 6], || StandardNormal.sample(&mut r)));
    let c: Array2<f64> = Array2::from_shape_simple_fn((tokens, 6), || StandardNormal.sample(&mut r));
    let mult = MoeMultipliers::from_resolved(&hp);
    let seed = 5;
    let run = |s: &ParamStore<f64>| {
        let w = ids.weights(s).unwrap();
        let a = s.params[a_id].value.view().into_dimensionality::<Ix2>().unwrap();
        moe_forward(&w, &mult, act, &routing, 2, a, &mut rng(seed)).unwrap()
    };
    let out = run(&store);
    let w = ids.weights(&store).unwrap();
    let (da, g) = moe_backward(&w, &mult, act, &routing, &out.cache, c.view());
    let mut grads = store.zeros_like();
    ids.add_grads(g, &mut grads);
    grads[a_id] = da.into_dyn();
    let report = check_store(
        &mut store,
        &grads,
        |s| {
            let o = run(s);
            Ok((&o.out * &c).sum() + o.aux_loss)
        },
        &GradCheckOptions::default(),
    )
    .unwrap();
    let groups = report.groups();
    for want in [Group::Router, Group::ExpertUp, Group::ExpertDown, Group::ExpertBias, Group::Embedding] {
        assert!(groups.contains(&want), "group {} not checked", want.name());
    }
    // Not vacuous: the router and experts get nonzero gradients.
    for p in &report.params {
        if p.group != Group::ExpertBias {
            assert!(p.max_abs_grad > 1e-4, "{}: gradient vanishes\n{}", p.name, report.summary());
        }
    }
    assert!(report.max_rel_error() < 1e-5, "{:?}\n{}", routing, report.summary());
    report.max_rel_error()
}

#[test]
fn moe_layer_gradients_match_finite_differences_for_every_routing_variant() {
    let base = RoutingConfig { tie_break: TieBreak::Index, ..RoutingConfig::default() };
    let variants = vec![
        ("top-k softmax", base.clone()),
        ("random tie-break", RoutingConfig { tie_break: TieBreak::Random, ..base.clone() }),
        ("sigmoid", RoutingConfig { gate: Gate::Sigmoid, ..base.clone() }),
        ("capacity", RoutingConfig { capacity_factor: Some(0.6), ..base.clone() }),
        ("prototypes", RoutingConfig { prototypes: 2, ..base.clone() }),
        ("balance loss", RoutingConfig { balance_loss: 0.3, ..base.clone() }),
        ("z-loss", RoutingConfig { z_loss: 0.2, ..base.clone() }),
        ("shared experts", RoutingConfig { shared_experts: 2, ..base.clone() }),
        (
            "all together",
            RoutingConfig {
                gate: Gate::Sigmoid,
                tie_break: TieBreak::Random,
                capacity_factor: Some(0.8),
                prototypes: 2,
                balance_loss: 0.1,
                z_loss: 0.05,
                bias_update_rate: 0.01,
                shared_experts: 1,
            },
        ),
    ];
    for (name, v) in variants {
        let e = check_layer(v, Activation::Tanh);
        eprintln!("{name:<16} max rel error {e:.2e}");
    }
    let e = check_layer(base, Activation::Gelu);
    eprintln!("gelu             max rel error {e:.2e}");
}

#[test]
fn capacity_variant_really_drops_tokens_in_the_layer() {
    let sizes = Sizes { width: 6, depth: 1, experts: 6, active: 2, expert_hidden: 5 };
    let hp = check_hp(sizes);
    let shape = MoeShape { width: 6, experts: 6, expert_hidden: 5, shared_experts: 0 };
    let mut r = rng(1);
    let mut store = ParamStore::<f64> { params: Vec::new() };
    let ids = MoeParamIds::push_init(&mut store, "moe", &shape, &hp, &mut r);
    let a: Array2<f64> = Array2::from_shape_simple_fn((9, 6), || StandardNormal.sample(&mut r));
    let routing = RoutingConfig { capacity_factor: Some(0.6), tie_break: TieBreak::Index, ..RoutingConfig::default() };
    let out = moe_forward(&ids.weights(&store).unwrap(), &MoeMultipliers::from_resolved(&hp), Activation::Tanh, &routing, 2, a.view(), &mut rng(0)).unwrap();
    assert!(out.load.dropped > 0.0, "the capacity check must exercise drops");
    assert!((out.load.fraction.iter().sum::<f64>() + out.load.dropped - 1.0).abs() < 1e-12);
}

#[test]
fn non_finite_logits_route_without_panicking() {
    let logits = array![[f64::NAN, 1.0, f64::INFINITY, -0.0], [f64::NAN, f64::NAN, f64::NAN, f64::NAN]];
    let r = route(logits.view(), Array1::zeros(4).view(), 2, &cfg(TieBreak::Random), &mut rng(0)).unwrap();
    assert_eq!(r.selected.row(0).to_vec(), vec![2, 1]);
    assert_ne!(r.selected[[1, 0]], r.selected[[1, 1]]);
    // -0.0 and +0.0 tie: with index tie-breaking the lower index wins either way.
    let z = array![[0.0, -0.0, 0.0]];
    let r = route(z.view(), Array1::zeros(3).view(), 1, &cfg(TieBreak::Index), &mut rng(0)).unwrap();
    assert_eq!(r.selected[[0, 0]], 0);
    let z = array![[-0.0, 0.0, 0.0]];
    let r = route(z.view(), Array1::zeros(3).view(), 1, &cfg(TieBreak::Index), &mut rng(0)).unwrap();
    assert_eq!(r.selected[[0, 0]], 0);
}
