//! The parameterization engine: SPEC §4's must-show scalings, every preset's exponents pinned, the
//! mean-field SGD instance to 1e-12, the SGD symmetry between forms, and the algebra of axis factors.

use moe_dmft::param::config::{axis_factors, scale};
use moe_dmft::param::engine::{AxisValues, Form};
use moe_dmft::param::{Axis, Group, Optimizer, ParamConfig, Sizes, Table};
use proptest::prelude::*;

fn sizes(width: usize, depth: usize, experts: usize, active: usize, expert_hidden: usize) -> Sizes {
    Sizes { width, depth, experts, active, expert_hidden }
}

const BASE: Sizes = Sizes { width: 64, depth: 2, experts: 8, active: 1, expert_hidden: 32 };

fn cfg(preset: &str, optimizer: Optimizer) -> ParamConfig {
    ParamConfig { preset: preset.into(), optimizer, base: Some(BASE), sigma_router: 0.5, ..ParamConfig::default() }
}

fn table(c: &ParamConfig, s: Sizes) -> Table {
    c.resolve_table(&s).expect("valid config")
}

fn ratio(c: &ParamConfig, s: Sizes, group: &str, what: fn(&moe_dmft::param::config::Row) -> f64) -> f64 {
    let base = table(c, BASE);
    let t = table(c, s);
    what(t.row(group).unwrap()) / what(base.row(group).unwrap())
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1e-300)
}

#[test]
fn must_show_moe_completep_adam() {
    let c = cfg("moe-completep", Optimizer::Adam);
    let wide = sizes(256, 2, 8, 1, 128);
    for g in ["router", "expert_up", "attn_qkv", "attn_out"] {
        assert!(close(ratio(&c, wide, g, |r| r.lr), 0.25), "{g} lr along width");
    }
    assert!(close(ratio(&c, wide, "expert_up", |r| r.init_std), 0.5));
    assert!(close(ratio(&c, wide, "router", |r| r.init_std), 0.25));
    assert!(close(ratio(&c, wide, "readout", |r| r.multiplier), 0.25));
    assert!(close(ratio(&c, wide, "unembedding", |r| r.multiplier), 0.25));
    assert!(close(ratio(&c, wide, "embedding", |r| r.lr), 1.0));

    let hidden = sizes(64, 2, 8, 1, 128);
    assert!(close(ratio(&c, hidden, "expert_down", |r| r.lr), 0.25));
    assert!(close(ratio(&c, hidden, "expert_down", |r| r.init_std), 0.5));
    assert!(close(ratio(&c, hidden, "expert_up", |r| r.lr), 1.0));

    let deep = sizes(64, 8, 8, 1, 32);
    assert!(close(table(&c, deep).residual_multiplier / table(&c, BASE).residual_multiplier, 0.25));

    let many = sizes(64, 2, 64, 8, 32);
    let (t0, t1) = (table(&c, BASE), table(&c, many));
    for (a, b) in t0.groups.iter().zip(&t1.groups) {
        assert_eq!(a.lr, b.lr, "{}: Adam lr must not move with experts at fixed kappa", a.name);
    }
    // A zero router stays zero at every size.
    let zero = ParamConfig { sigma_router: 0.0, ..c.clone() };
    assert_eq!(table(&zero, wide).row("router").unwrap().init_std, 0.0);
}

/// `w/d/e/h` exponents of one quantity, as a string (exact halves and integers).
fn axes(t: &Table, group: &str, q: &str) -> String {
    let r = t.row(group).unwrap();
    Axis::ALL
        .iter()
        .map(|&a| {
            let e = r.exponents.get(a);
            let v = match q {
                "init_var" => Some(e.init_var),
                "multiplier" => Some(e.multiplier),
                "lr" => Some(e.lr),
                "adam_eps" => e.adam_eps,
                _ => unreachable!(),
            };
            v.map(|v| format!("{}", v + 0.0)).unwrap_or_else(|| "-".into())
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Expected exponents (width/depth/experts/expert_hidden) of init_var, multiplier, lr, adam_eps per group.
type Pins = [(&'static str, &'static str, &'static str, &'static str, &'static str); 10];

fn check_pins(preset: &str, optimizer: Optimizer, pins: &Pins) {
    let t = table(&cfg(preset, optimizer), BASE);
    assert_eq!(t.groups.len(), 10);
    for (g, var, mult, lr, eps) in pins {
        assert_eq!(axes(&t, g, "init_var"), *var, "{preset} {optimizer:?} {g} init_var");
        assert_eq!(axes(&t, g, "multiplier"), *mult, "{preset} {optimizer:?} {g} multiplier");
        assert_eq!(axes(&t, g, "lr"), *lr, "{preset} {optimizer:?} {g} lr");
        assert_eq!(axes(&t, g, "adam_eps"), *eps, "{preset} {optimizer:?} {g} adam_eps");
    }
}

const Z: &str = "0/0/0/0";
const NO: &str = "-/-/-/-";

#[test]
fn pins_sp() {
    // SP: init variance 1/fan_in for every matrix, nothing else moves.
    let pins = |eps: &'static str| -> Pins {
        [
            ("embedding", Z, Z, Z, eps),
            ("attn_qkv", "-1/0/0/0", Z, Z, eps),
            ("attn_out", "-1/0/0/0", Z, Z, eps),
            ("router", "-1/0/0/0", Z, Z, eps),
            ("expert_up", "-1/0/0/0", Z, Z, eps),
            ("expert_down", "-1/0/0/-1", Z, Z, eps),
            ("expert_bias", Z, Z, Z, eps),
            ("norm", Z, Z, Z, eps),
            ("unembedding", "-1/0/0/0", Z, Z, eps),
            ("readout", "-1/0/0/0", Z, Z, eps),
        ]
    };
    check_pins("sp", Optimizer::Adam, &pins(Z));
    check_pins("sp", Optimizer::Sgd, &pins(NO));
}

#[test]
fn pins_mup_adam() {
    check_pins(
        "mup",
        Optimizer::Adam,
        &[
            ("embedding", Z, Z, Z, "-1/0/0/0"),
            ("attn_qkv", "-1/0/0/0", Z, "-1/0/0/0", "-1/0/0/0"),
            ("attn_out", "-1/0/0/0", Z, "-1/0/0/0", "-1/0/0/0"),
            ("router", "-2/0/0/0", Z, "-1/0/0/0", Z),
            ("expert_up", "-1/0/0/0", Z, "-1/0/0/0", "-1/0/0/0"),
            ("expert_down", "-1/0/0/-1", Z, "-1/0/0/0", "-1/0/0/0"),
            ("expert_bias", Z, Z, Z, Z),
            ("norm", Z, Z, Z, "-1/0/0/0"),
            ("unembedding", Z, "-1/0/0/0", Z, "-1/0/0/0"),
            ("readout", Z, "-1/0/0/0", Z, "-1/0/0/0"),
        ],
    );
}

#[test]
fn pins_completep_adam() {
    check_pins(
        "completep",
        Optimizer::Adam,
        &[
            ("embedding", Z, Z, Z, "-1/0/0/0"),
            ("attn_qkv", "-1/0/0/0", Z, "-1/0/0/0", "-1/-1/0/0"),
            ("attn_out", "-1/0/0/0", Z, "-1/0/0/0", "-1/-1/0/0"),
            ("router", "-2/0/0/0", Z, "-1/0/0/0", "0/-1/0/0"),
            ("expert_up", "-1/0/0/0", Z, "-1/0/0/0", "-1/-1/0/0"),
            ("expert_down", "-1/0/0/-1", Z, "-1/0/0/0", "-1/-1/0/0"),
            ("expert_bias", Z, Z, Z, Z),
            ("norm", Z, Z, Z, "-1/-1/0/0"),
            ("unembedding", Z, "-1/0/0/0", Z, "-1/0/0/0"),
            ("readout", Z, "-1/0/0/0", Z, "-1/0/0/0"),
        ],
    );
}

#[test]
fn pins_moe_completep_adam() {
    check_pins(
        "moe-completep",
        Optimizer::Adam,
        &[
            ("embedding", Z, Z, Z, "-1/0/0/0"),
            ("attn_qkv", "-1/0/0/0", Z, "-1/0/0/0", "-1/-1/0/0"),
            ("attn_out", "-1/0/0/0", Z, "-1/0/0/0", "-1/-1/0/0"),
            ("router", "-2/0/0/0", Z, "-1/0/0/0", "0/-1/-1/0"),
            // The random init part of the down-projection dominates the backward signal along expert_hidden.
            ("expert_up", "-1/0/0/0", Z, "-1/0/0/0", "-1/-1/-1/-0.5"),
            ("expert_down", "-1/0/0/-1", Z, "-1/0/0/-1", "-1/-1/-1/0"),
            ("expert_bias", Z, Z, Z, Z),
            ("norm", Z, Z, Z, "-1/-1/0/0"),
            ("unembedding", Z, "-1/0/0/0", Z, "-1/0/0/0"),
            ("readout", Z, "-1/0/0/0", Z, "-1/0/0/0"),
        ],
    );
}

#[test]
fn pins_moe_completep_sgd() {
    check_pins(
        "moe-completep",
        Optimizer::Sgd,
        &[
            ("embedding", Z, Z, "1/0/0/0", NO),
            ("attn_qkv", "-1/0/0/0", Z, "0/1/0/0", NO),
            ("attn_out", "-1/0/0/0", Z, "0/1/0/0", NO),
            ("router", "-2/0/0/0", Z, "-1/1/1/0", NO),
            ("expert_up", "-1/0/0/0", Z, "0/1/1/1", NO),
            ("expert_down", "-2/0/0/-2", Z, "0/1/1/-1", NO),
            ("expert_bias", Z, Z, Z, NO),
            ("norm", Z, Z, "1/1/0/0", NO),
            ("unembedding", Z, "-1/0/0/0", "1/0/0/0", NO),
            ("readout", Z, "-1/0/0/0", "1/0/0/0", NO),
        ],
    );
}

#[test]
fn pins_mup_and_completep_sgd() {
    // Along the axes they scale, SGD muP and CompleteP agree with MoE-CompleteP; elsewhere SP.
    let full = table(&cfg("moe-completep", Optimizer::Sgd), BASE);
    let sp = table(&cfg("sp", Optimizer::Sgd), BASE);
    for (preset, scaled) in [("mup", vec![Axis::Width]), ("completep", vec![Axis::Width, Axis::Depth])] {
        let t = table(&cfg(preset, Optimizer::Sgd), BASE);
        for (i, r) in t.groups.iter().enumerate() {
            for axis in Axis::ALL {
                let want = if scaled.contains(&axis) { full.groups[i].exponents.get(axis) } else { sp.groups[i].exponents.get(axis) };
                assert_eq!(r.exponents.get(axis), want, "{preset} {} {}", r.name, axis.name());
            }
        }
    }
}

#[test]
fn eps_follows_completep_rule() {
    // CompleteP: 1/mN for embedding and unembedding, 1/(mN mL) for hidden groups; experts one more 1/mM.
    let t = table(&cfg("moe-completep", Optimizer::Adam), BASE);
    for g in ["embedding", "unembedding", "readout"] {
        assert_eq!(axes(&t, g, "adam_eps"), "-1/0/0/0", "{g}");
    }
    for g in ["attn_qkv", "attn_out", "norm"] {
        assert_eq!(axes(&t, g, "adam_eps"), "-1/-1/0/0", "{g}");
    }
    assert_eq!(axes(&t, "expert_down", "adam_eps"), "-1/-1/-1/0");
    // The values move accordingly: width x4, depth x2, experts x2 -> expert_down eps x 1/16.
    let c = cfg("moe-completep", Optimizer::Adam);
    let s = sizes(256, 4, 16, 2, 128);
    assert!(close(ratio(&c, s, "expert_down", |r| r.adam_eps.unwrap()), 1.0 / 16.0));
    // lr * weight_decay is fixed per group.
    let c = ParamConfig { weight_decay: 0.1, ..c };
    let (t0, t1) = (table(&c, BASE), table(&c, s));
    for (a, b) in t0.groups.iter().zip(&t1.groups) {
        assert!(close(a.lr * a.weight_decay, b.lr * b.weight_decay), "{}", a.name);
    }
}

/// The mean-field SGD instance of the brief, written out by hand.
struct MeanField {
    std: [(Group, f64); 5],
    mult: [(Group, f64); 5],
    lr: [(Group, f64); 5],
    beta: f64,
}

fn mean_field_formulas(s: Sizes, d: f64, gamma0: f64, eta0: f64) -> MeanField {
    let (n_, l, k, h) = (s.width as f64, s.depth as f64, s.active as f64, s.expert_hidden as f64);
    let e = eta0 * gamma0 * gamma0;
    MeanField {
        std: [(Group::Embedding, 1.0), (Group::Router, 0.0), (Group::ExpertUp, 1.0), (Group::ExpertDown, 1.0), (Group::Readout, 1.0)],
        mult: [
            (Group::Embedding, 1.0 / d.sqrt()),
            (Group::Router, 1.0 / n_.sqrt()),
            (Group::ExpertUp, 1.0 / n_.sqrt()),
            (Group::ExpertDown, 1.0 / h),
            (Group::Readout, 1.0 / (gamma0 * n_)),
        ],
        lr: [
            (Group::Embedding, e * n_),
            (Group::Router, e * k * l),
            (Group::ExpertUp, e * h * k * l),
            (Group::ExpertDown, e * n_ * h * k * l),
            (Group::Readout, e * n_),
        ],
        beta: 1.0 / l,
    }
}

#[test]
fn mean_field_instance_matches_formulas() {
    let base = sizes(128, 1, 32, 8, 32);
    let c = ParamConfig {
        preset: "moe-completep".into(),
        optimizer: Optimizer::Sgd,
        form: Form::MeanField,
        lr: 0.2,
        gamma0: 0.7,
        input_dim: 8,
        base: Some(base),
        ..ParamConfig::default()
    };
    for s in [base, sizes(256, 2, 64, 16, 64), sizes(1024, 4, 256, 64, 256), sizes(512, 3, 40, 10, 96), sizes(100, 7, 12, 3, 1000)] {
        let r = c.resolve(&s).unwrap();
        let f = mean_field_formulas(s, 8.0, 0.7, 0.2);
        for (g, v) in f.std {
            assert!(close(r.get(g).init_std, v) || (v == 0.0 && r.get(g).init_std == 0.0), "{s:?} {} std", g.name());
        }
        for (g, v) in f.mult {
            assert!(close(r.get(g).multiplier, v), "{s:?} {} multiplier {} vs {v}", g.name(), r.get(g).multiplier);
        }
        for (g, v) in f.lr {
            assert!(close(r.get(g).lr, v), "{s:?} {} lr {} vs {v}", g.name(), r.get(g).lr);
            assert_eq!(r.get(g).adam_eps, None);
        }
        assert!(close(r.residual_multiplier, f.beta));
    }
    // The same instance without explicit base sizes: the formulas hold at the sizes themselves.
    let c2 = ParamConfig { base: None, ..c };
    let s = sizes(300, 5, 20, 5, 70);
    let r = c2.resolve(&s).unwrap();
    let f = mean_field_formulas(s, 8.0, 0.7, 0.2);
    for (g, v) in f.lr {
        assert!(close(r.get(g).lr, v), "{}", g.name());
    }
}

#[test]
fn mean_field_and_standard_sgd_differ_only_by_the_symmetry() {
    // SGD is invariant under (std, mult, lr) -> (std s, mult / s, lr s^2): std x mult and mult^2 x lr
    // must scale identically in both forms.
    let standard = ParamConfig { preset: "moe-completep".into(), optimizer: Optimizer::Sgd, base: Some(BASE), ..ParamConfig::default() };
    let mf = ParamConfig { form: Form::MeanField, ..standard.clone() };
    let s = sizes(512, 6, 32, 4, 96);
    let (a0, a1) = (table(&standard, BASE), table(&standard, s));
    let (b0, b1) = (table(&mf, BASE), table(&mf, s));
    for i in 0..a0.groups.len() {
        let name = &a0.groups[i].name;
        if name == "router" || name == "expert_bias" {
            continue; // zero init: the effective init is zero in both forms.
        }
        let eff = |t: &Table| t.groups[i].init_std * t.groups[i].multiplier;
        let upd = |t: &Table| t.groups[i].multiplier.powi(2) * t.groups[i].lr;
        assert!(close(eff(&a1) / eff(&a0), eff(&b1) / eff(&b0)), "{name} effective init");
        assert!(close(upd(&a1) / upd(&a0), upd(&b1) / upd(&b0)), "{name} effective lr");
    }
    let i = a0.groups.iter().position(|r| r.name == "router").unwrap();
    let upd = |t: &Table| t.groups[i].multiplier.powi(2) * t.groups[i].lr;
    assert!(close(upd(&a1) / upd(&a0), upd(&b1) / upd(&b0)), "router effective lr");
}

#[test]
fn resolved_has_every_group_and_base_defaults_to_target() {
    let s = sizes(96, 3, 16, 4, 48);
    let c = ParamConfig { base: None, ..ParamConfig::default() };
    let r = c.resolve(&s).unwrap();
    assert_eq!(r.base, s);
    for g in Group::ALL {
        assert_eq!(r.get(g).group, g);
    }
    let same = ParamConfig { base: Some(s), ..ParamConfig::default() }.resolve(&s).unwrap();
    assert_eq!(r, same);
    assert_eq!(moe_dmft::param::table(&c, &s).unwrap(), r);
}

#[test]
fn toml_overrides_and_new_groups() {
    let text = r#"
        preset = "mup"
        optimizer = "sgd"
        lr = 0.5
        base = { width = 64, depth = 2, experts = 8, active = 1, expert_hidden = 32 }
        [groups.router]
        lr_scale = 2.0
        init_std = 0.3
        [groups.router.exponents.experts]
        lr = 1.0
        [groups.shared_expert_up]
        fan_in = "width"
        fan_out = "expert_hidden"
        role = "hidden"
        residual_branch = true
    "#;
    let c: ParamConfig = toml::from_str(text).unwrap();
    let t = c.resolve_table(&sizes(64, 2, 32, 4, 32)).unwrap();
    let router = t.row("router").unwrap();
    assert_eq!(router.exponents.experts.lr, 1.0);
    assert!(close(router.lr, 0.5 * 2.0 * 4.0));
    assert!(close(router.init_std, 0.3 / 64.0));
    let shared = t.row("shared_expert_up").unwrap();
    assert!(shared.group.is_none());
    assert_eq!(shared.exponents.width.init_var, -1.0);
    // New groups appear in the table but not in what models consume.
    assert_eq!(t.to_resolved().groups.len(), 10);
}

#[test]
fn kappa_message_names_implied_active() {
    let c = ParamConfig { base: Some(BASE), ..ParamConfig::default() };
    let e = c.resolve(&sizes(64, 2, 32, 2, 32)).unwrap_err().to_string();
    assert!(e.contains("active") && e.contains("kappa") && e.contains("implies active = 4"), "{e}");
    let e = c.resolve(&sizes(64, 2, 12, 1, 32)).unwrap_err().to_string();
    assert!(e.contains("non-integer"), "{e}");
}

fn axis_values() -> impl Strategy<Value = AxisValues> {
    (-3.0..3.0f64, -3.0..3.0f64, -3.0..3.0f64, -3.0..3.0f64)
        .prop_map(|(width, depth, experts, expert_hidden)| AxisValues { width, depth, experts, expert_hidden })
}

fn base_sizes() -> impl Strategy<Value = Sizes> {
    (1usize..300, 1usize..12, 1usize..6, 1usize..5, 1usize..300).prop_map(|(w, d, m, k, h)| sizes(w, d, m * k, k, h))
}

fn any_config() -> impl Strategy<Value = ParamConfig> {
    (0usize..4, any::<bool>(), 1e-4..10.0f64, 0.0..2.0f64, 0.0..2.0f64).prop_map(|(p, adam, lr, sigma, sr)| ParamConfig {
        preset: ["sp", "mup", "completep", "moe-completep"][p].into(),
        optimizer: if adam { Optimizer::Adam } else { Optimizer::Sgd },
        lr,
        sigma,
        sigma_router: sr,
        weight_decay: 0.01,
        ..ParamConfig::default()
    })
}

fn values(t: &Table) -> Vec<f64> {
    let mut v = vec![t.residual_multiplier];
    for r in &t.groups {
        v.extend([r.init_std, r.multiplier, r.lr, r.adam_eps.unwrap_or(1.0), r.weight_decay]);
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn base_sizes_give_factors_of_exactly_one(base in base_sizes(), e in axis_values(), c in any_config()) {
        let f = axis_factors(&base, &base);
        prop_assert_eq!(scale(&f, &e), 1.0);
        // Resolving at the base reproduces the base values exactly, whichever way the base is given.
        let with_base = ParamConfig { base: Some(base), ..c.clone() };
        let without = ParamConfig { base: None, ..c };
        prop_assert_eq!(with_base.resolve_table(&base).unwrap(), without.resolve_table(&base).unwrap());
    }

    #[test]
    fn scaling_two_axes_is_the_product(base in base_sizes(), c in any_config(), a in 1usize..5, b in 1usize..5, pick in 0usize..6) {
        let axes = [(Axis::Width, Axis::Depth), (Axis::Width, Axis::Experts), (Axis::Width, Axis::ExpertHidden),
                    (Axis::Depth, Axis::Experts), (Axis::Depth, Axis::ExpertHidden), (Axis::Experts, Axis::ExpertHidden)][pick];
        let apply = |s: Sizes, axis: Axis, f: usize| -> Sizes {
            match axis {
                Axis::Width => Sizes { width: s.width * f, expert_hidden: s.expert_hidden * f, ..s },
                Axis::Depth => Sizes { depth: s.depth * f, ..s },
                Axis::Experts => Sizes { experts: s.experts * f, active: s.active * f, ..s },
                Axis::ExpertHidden => Sizes { expert_hidden: s.expert_hidden * f, ..s },
            }
        };
        let c = ParamConfig { base: Some(base), ..c };
        let t0 = values(&c.resolve_table(&base).unwrap());
        let ta = values(&c.resolve_table(&apply(base, axes.0, a)).unwrap());
        let tb = values(&c.resolve_table(&apply(base, axes.1, b)).unwrap());
        let tab = values(&c.resolve_table(&apply(apply(base, axes.0, a), axes.1, b)).unwrap());
        for i in 0..t0.len() {
            if t0[i] == 0.0 {
                prop_assert_eq!(tab[i], 0.0);
                continue;
            }
            let product = (ta[i] / t0[i]) * (tb[i] / t0[i]);
            let joint = tab[i] / t0[i];
            prop_assert!((product - joint).abs() <= 1e-12 * joint.abs(), "entry {}: {} vs {}", i, product, joint);
        }
    }
}

#[test]
fn backward_field_ratio_never_grows_along_an_axis() {
    use moe_dmft::param::engine::backward_field_ratio;
    let b = sizes(64, 2, 16, 4, 32);
    let r0 = backward_field_ratio(&b);
    for f in [2, 4, 16] {
        let along = [
            sizes(64 * f, 2, 16, 4, 32 * f),
            sizes(64, 2 * f, 16, 4, 32),
            sizes(64, 2, 16 * f, 4 * f, 32),
            sizes(64, 2, 16, 4, 32 * f),
        ];
        for s in along {
            assert!(backward_field_ratio(&s) <= r0 * (1.0 + 1e-12), "{s:?}");
        }
        // N alone (not an axis) grows it.
        assert!(backward_field_ratio(&sizes(64 * f, 2, 16, 4, 32)) > r0);
    }
}
