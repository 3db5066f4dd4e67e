//! DMFT solver: configuration rules, determinism, Monte Carlo resolution, the exactly solvable case.

use moe_dmft::data::{make_task, TaskConfig};
use moe_dmft::dmft::{self, exact, LrScale, SolveConfig, TieJitter};
use moe_dmft::model::Activation;

fn small(points: usize, steps: usize) -> SolveConfig {
    SolveConfig {
        task: TaskConfig {
            points,
            input_dim: 4,
            ..TaskConfig::default()
        },
        steps,
        ..SolveConfig::default()
    }
    .with_resolution(128, 32, 2)
}

#[test]
fn dmft_config_rejects_finite_sizes() {
    for key in [
        "width = 256",
        "experts = 64",
        "expert_hidden = 64",
        "[model]\nwidth = 3",
    ] {
        let err = SolveConfig::from_toml_str(&format!("kappa = 0.25\n{key}\n")).unwrap_err();
        assert_eq!(err.exit_code(), 2, "{key}");
        assert!(err.to_string().contains("not inputs"), "{key}: {err}");
    }
    let err = SolveConfig::from_toml_str("kappa = 0.3\n[resolution]\nexpert_samples = 101\n")
        .unwrap_err();
    assert!(
        err.to_string().contains("resolution.expert_samples"),
        "{err}"
    );
    let err = SolveConfig::from_toml_str("kappa = 1.5\n").unwrap_err();
    assert!(err.to_string().contains("`kappa`"), "{err}");
    let err = SolveConfig::from_toml_str("kappa = 0.25\nunknown_key = 1\n").unwrap_err();
    assert_eq!(err.exit_code(), 2);
    let ok =
        SolveConfig::from_toml_str("kappa = 0.25\nsteps = 3\n[resolution]\nexpert_samples = 8\n")
            .unwrap();
    assert_eq!(ok.steps, 3);
}

#[test]
fn dmft_deterministic_and_thread_independent() {
    let cfg = small(6, 4);
    let task = make_task(&cfg.task).unwrap();
    let a = dmft::solve(
        &SolveConfig {
            threads: Some(1),
            ..cfg.clone()
        },
        &task,
        None,
    )
    .unwrap();
    let b = dmft::solve(
        &SolveConfig {
            threads: Some(2),
            ..cfg.clone()
        },
        &task,
        None,
    )
    .unwrap();
    assert_eq!(a.loss, b.loss);
    assert_eq!(a.predictions, b.predictions);
    assert_eq!(a.thresholds, b.thresholds);
    let c = dmft::solve(&SolveConfig { seed: 1, ..cfg }, &task, None).unwrap();
    assert_ne!(a.loss, c.loss);
}

#[test]
fn dmft_learns_and_routes_kappa() {
    let cfg = small(8, 10);
    let task = make_task(&cfg.task).unwrap();
    let sol = dmft::solve(&cfg, &task, None).unwrap();
    let (l0, lt) = (sol.loss[0], sol.final_loss().0);
    assert!(lt < 0.7 * l0, "loss {l0} -> {lt}");
    // At t = 0 the router is zero: every expert ties, the threshold is 0, loads are Binomial(P, kappa)/P.
    assert!(sol
        .thresholds
        .slice(ndarray::s![0, 0, ..])
        .iter()
        .all(|&q| q == 0.0));
    let median = sol.load_quantiles[[0, 0, 3]];
    assert!((median - 1.0).abs() < 0.6, "median relative load {median}");
    // Coordinates reproduce the kernels (per repeat: averages of products are not products of averages).
    let tr = &sol.repeats[0];
    for t in [0, 10] {
        for l in 0..2 {
            let h = tr.coordinates.slice(ndarray::s![t, l, .., ..]);
            let k = tr.kernels.slice(ndarray::s![t, l, .., ..]);
            for ((i, j), &kij) in k.indexed_iter() {
                let hh: f64 = h
                    .row(i)
                    .iter()
                    .zip(h.row(j).iter())
                    .map(|(a, b)| a * b)
                    .sum();
                assert!((hh - kij).abs() < 1e-12);
            }
        }
    }
    // The MoE output vanishes at init and grows with training.
    assert_eq!(sol.moe_kernels[[0, 0, 0, 0]], 0.0);
    assert!(sol.moe_kernels[[10, 0, 0, 0]] > 0.0);
}

#[test]
fn dmft_resolution_error_bar_shrinks() {
    // Doubling the expert samples should shrink the error bar by ~sqrt(2) and move the answer by less
    // than the error bars.
    let base = SolveConfig {
        task: TaskConfig {
            points: 8,
            input_dim: 4,
            ..TaskConfig::default()
        },
        steps: 8,
        ..SolveConfig::default()
    };
    let task = make_task(&base.task).unwrap();
    let lo = dmft::solve(&base.clone().with_resolution(128, 32, 16), &task, None).unwrap();
    let hi = dmft::solve(&base.with_resolution(256, 32, 16), &task, None).unwrap();
    let (l1, e1) = lo.final_loss();
    let (l2, e2) = hi.final_loss();
    let (e1, e2) = (e1.unwrap(), e2.unwrap());
    let ratio = e1 / e2;
    eprintln!("loss {l1:.6} +- {e1:.6} -> {l2:.6} +- {e2:.6}; error ratio {ratio:.3}");
    assert!(ratio > 1.0 && ratio < 2.3, "error-bar ratio {ratio}");
    assert!(
        (l1 - l2).abs() < (e1 * e1 + e2 * e2).sqrt() * 2.0,
        "moved {} vs errors {e1}, {e2}",
        (l1 - l2).abs()
    );
}

fn linear_frozen(points: usize, depth: usize) -> SolveConfig {
    SolveConfig {
        task: TaskConfig {
            points,
            input_dim: 3,
            ..TaskConfig::default()
        },
        activation: Activation::Linear,
        kappa: 0.5,
        depth,
        steps: 10,
        eta0: 0.3,
        lr_scale: LrScale {
            router: 0.0,
            ..LrScale::default()
        },
        tie_jitter: TieJitter::Fixed,
        ..SolveConfig::default()
    }
}

#[test]
fn dmft_matches_exact_linear_frozen_router() {
    for depth in [1, 2] {
        let cfg = linear_frozen(4, depth).with_resolution(512, 128, 4);
        let task = make_task(&cfg.task).unwrap();
        let ex = exact::solve_linear_frozen_router(&cfg, &task).unwrap();
        let mc = dmft::solve(&cfg, &task, None).unwrap();
        let err = mc.loss_err.as_ref().unwrap();
        let worst = (0..=cfg.steps)
            .map(|t| (mc.loss[t] - ex.loss[t]).abs() / err[t].max(1e-300))
            .fold(0.0, f64::max);
        eprintln!(
            "depth {depth}: exact final {:.6}, MC {:.6} +- {:.6}; worst |MC - exact| / error bar over steps {worst:.2}",
            ex.loss[cfg.steps], mc.loss[cfg.steps], err[cfg.steps]
        );
        for t in 0..=cfg.steps {
            let gap = (mc.loss[t] - ex.loss[t]).abs();
            assert!(
                gap < 4.0 * err[t] + 1e-3 * ex.loss[t],
                "depth {depth} step {t}: MC {} +- {} vs exact {}",
                mc.loss[t],
                err[t],
                ex.loss[t]
            );
        }
        assert!(
            ex.loss[cfg.steps] < 0.8 * ex.loss[0],
            "the exact case must learn"
        );
        // Tightness: the error bar is small compared with the learning signal.
        assert!(err[cfg.steps] < 0.05 * (ex.loss[0] - ex.loss[cfg.steps]));
    }
}

#[test]
fn dmft_exact_rejects_unsupported() {
    let cfg = SolveConfig {
        activation: Activation::Relu,
        ..linear_frozen(4, 1)
    };
    let task = make_task(&cfg.task).unwrap();
    assert_eq!(
        exact::solve_linear_frozen_router(&cfg, &task)
            .unwrap_err()
            .exit_code(),
        2
    );
}

#[test]
fn dmft_routing_variants() {
    use moe_dmft::routing::{Gate, RoutingConfig};
    let base = small(8, 6);
    let task = make_task(&base.task).unwrap();
    let plain = dmft::solve(&base, &task, None).unwrap();
    assert!(plain.dropped.iter().all(|&d| d == 0.0));
    // Capacity 1: each expert keeps at most ceil(kappa P) = 2 of its samples; experts with more drop.
    let cap = SolveConfig {
        routing: RoutingConfig {
            capacity_factor: Some(1.0),
            ..RoutingConfig::default()
        },
        ..base.clone()
    };
    let sol = dmft::solve(&cap, &task, None).unwrap();
    let d0 = sol.dropped[[0, 0]];
    // Binomial(8, 1/4): P(load > 2) ~ 0.32, dropped share of assignments ~ 0.16 at t = 0.
    assert!(d0 > 0.05 && d0 < 0.35, "dropped fraction at t = 0: {d0}");
    assert!(sol.final_loss().0.is_finite());
    // A capacity that can hold every sample (ceil(4 kappa P) = P) never drops: plain top-k.
    let roomy = SolveConfig {
        routing: RoutingConfig {
            capacity_factor: Some(4.0),
            ..RoutingConfig::default()
        },
        ..base.clone()
    };
    assert_eq!(dmft::solve(&roomy, &task, None).unwrap().loss, plain.loss);
    // Sigmoid gates learn too.
    let sig = SolveConfig {
        routing: RoutingConfig {
            gate: Gate::Sigmoid,
            ..RoutingConfig::default()
        },
        ..base.clone()
    };
    let sol = dmft::solve(&sig, &task, None).unwrap();
    assert!(sol.final_loss().0 < 0.8 * sol.loss[0]);
    // Loss-free balancing: a bias rate small against the router logits evens out the load over time
    // (a large one overshoots: the sign rule is bang-bang).
    let long = small(16, 20);
    let long_task = make_task(&long.task).unwrap();
    let unbiased = dmft::solve(&long, &long_task, None).unwrap();
    let bal = SolveConfig {
        routing: RoutingConfig {
            bias_update_rate: 1e-4,
            ..RoutingConfig::default()
        },
        ..long.clone()
    };
    let sol = dmft::solve(&bal, &long_task, None).unwrap();
    let (a, b) = (sol.load_cv[[20, 0]], unbiased.load_cv[[20, 0]]);
    assert!(a < 0.9 * b, "load cv with balancing {a} vs without {b}");
    // Prototyping with a fixed number of groups is plain top-k in the limit: same answer.
    let proto = SolveConfig {
        routing: RoutingConfig {
            prototypes: 2,
            ..RoutingConfig::default()
        },
        ..base.clone()
    };
    assert_eq!(dmft::solve(&proto, &task, None).unwrap().loss, plain.loss);
    // Index tie-breaking: at t = 0 every expert is active on all samples or on none.
    let idx = SolveConfig {
        routing: RoutingConfig {
            tie_break: moe_dmft::routing::TieBreak::Index,
            ..RoutingConfig::default()
        },
        ..base
    };
    let sol = dmft::solve(&idx, &task, None).unwrap();
    assert_eq!(sol.load_quantiles[[0, 0, 0]], 0.0);
    assert!(
        (sol.load_quantiles[[0, 0, 6]] - 4.0).abs() < 1e-12,
        "max relative load 1/kappa"
    );
    assert_ne!(sol.loss, plain.loss);
}
