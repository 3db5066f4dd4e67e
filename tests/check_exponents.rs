//! Exponent regression tests (SPEC §6): the engine's table against the expected one of SPEC §4, and
//! measured coordinate-check slopes at small sizes against the predictions, with stated tolerances.
//! Every check is seeded, so a failure is a change in the code, not bad luck.

use moe_dmft::check::coord::{CoordResult, CoordSpec, RouterInit};
use moe_dmft::check::run::{run_coord, CoordSetup};
use moe_dmft::param::{Axis, Optimizer, ParamConfig, Sizes};

const TOL: f64 = 0.15;

fn base() -> Sizes {
    Sizes { width: 32, depth: 2, experts: 8, active: 2, expert_hidden: 32 }
}

fn check(preset: &str, optimizer: Optimizer, axis: Axis, values: Vec<usize>, base: Sizes, seeds: usize) -> CoordResult {
    check_steps(preset, optimizer, axis, values, base, seeds, 5)
}

fn check_steps(preset: &str, optimizer: Optimizer, axis: Axis, values: Vec<usize>, base: Sizes, seeds: usize, steps: usize) -> CoordResult {
    let spec = CoordSpec {
        axis,
        preset: preset.into(),
        optimizer,
        values,
        seeds,
        steps,
        lr: if optimizer == Optimizer::Adam { 0.01 } else { 0.05 },
        base,
        router_init: RouterInit::Preset,
        tolerance: TOL,
    };
    run_coord(&CoordSetup::new(spec)).unwrap()
}

fn slope(r: &CoordResult, q: &str) -> f64 {
    r.get(q).and_then(|q| q.slope).unwrap_or_else(|| panic!("{}: no slope for {q}", r.label())).slope
}

#[test]
fn engine_table_matches_spec_adam_table() {
    let cfg = ParamConfig { preset: "moe-completep".into(), optimizer: Optimizer::Adam, base: Some(base()), ..Default::default() };
    let t = cfg.resolve_table(&base()).unwrap();
    // (group, [init_var, multiplier, lr] along width, the same along expert_hidden); every exponent along
    // depth and experts is 0 (with Adam no learning rate scales with mM; depth enters through beta_L).
    let expected: [(&str, [f64; 3], [f64; 3]); 8] = [
        ("embedding", [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
        ("attn_qkv", [-1.0, 0.0, -1.0], [0.0, 0.0, 0.0]),
        ("attn_out", [-1.0, 0.0, -1.0], [0.0, 0.0, 0.0]),
        ("router", [-2.0, 0.0, -1.0], [0.0, 0.0, 0.0]),
        ("expert_up", [-1.0, 0.0, -1.0], [0.0, 0.0, 0.0]),
        ("expert_down", [-1.0, 0.0, -1.0], [-1.0, 0.0, -1.0]),
        ("norm", [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
        ("readout", [0.0, -1.0, 0.0], [0.0, 0.0, 0.0]),
    ];
    for (name, width, hidden) in expected {
        let row = t.row(name).unwrap_or_else(|| panic!("no row {name}"));
        for (axis, want) in [(Axis::Width, width), (Axis::ExpertHidden, hidden), (Axis::Depth, [0.0; 3]), (Axis::Experts, [0.0; 3])] {
            let e = row.exponents.get(axis);
            assert_eq!([e.init_var, e.multiplier, e.lr], want, "{name} along {}", axis.name());
        }
    }
    assert_eq!(t.residual_exponents.get(Axis::Depth), -1.0, "beta_L = 1/L");
}

/// Θ(1) quantities (predicted slope 0) and the predicted non-zero ones (readout output and readout-like
/// router logits ∝ N^(-1/2)) along width under MoE-CompleteP with Adam.
#[test]
fn moe_completep_width_slopes() {
    // 8 seeds: the gradient slopes at the trained parameters scatter by ±0.1 with 3.
    let r = check("moe-completep", Optimizer::Adam, Axis::Width, vec![32, 64, 128, 256], base(), 8);
    for q in ["delta.router_logits", "delta.expert_pre", "delta.moe_out", "delta.residual", "delta.output", "act.expert_pre", "act.moe_out", "act.residual"] {
        assert!(slope(&r, q).abs() <= TOL, "{q}: {}\n{}", slope(&r, q), r.table());
    }
    for q in ["act.output", "act.router_logits"] {
        assert!((slope(&r, q) + 0.5).abs() <= TOL, "{q}: {}\n{}", slope(&r, q), r.table());
    }
    // Gradient RMS per unit residual: at the trained parameters the engine's grad_rms exponents (Adam
    // epsilon); at initialization the power-counted ones, where the router's backward sum is random (-1/2).
    let t = ParamConfig { preset: "moe-completep".into(), optimizer: Optimizer::Adam, base: Some(base()), ..Default::default() }
        .resolve_table(&base())
        .unwrap();
    for g in ["embedding", "router", "expert_up", "expert_down", "readout"] {
        let want = t.row(g).unwrap().grad_rms.width;
        let q = format!("grad.{g}");
        assert!((slope(&r, &q) - want).abs() <= TOL, "{q}: {} vs {want}\n{}", slope(&r, &q), r.table());
    }
    assert!((slope(&r, "grad_init.router") + 0.5).abs() <= TOL, "{}", r.table());
    assert!((slope(&r, "grad_init.expert_up") + 1.0).abs() <= TOL, "{}", r.table());
}

/// Standard-form SGD along width after 50 steps: the changes are proportional to the initial residual
/// |f0 - y|, which carries the random initial output f0 ∝ N^(-1/2); per unit initial residual they are
/// Θ(1), and the expert up-projection's gradient at initialization is the random V^T delta ∝ N^(-3/2).
#[test]
fn moe_completep_sgd_width_per_residual() {
    let r = check_steps("moe-completep", Optimizer::Sgd, Axis::Width, vec![16, 32, 64, 128, 256], base(), 8, 50);
    for q in ["delta.router_logits", "delta.expert_pre", "delta.moe_out", "delta.residual", "delta.output"] {
        let pr = r.get(q).and_then(|q| q.per_residual).expect("per-residual slope").slope;
        assert!(pr.abs() <= TOL, "{q}: per residual {pr}\n{}", r.table());
    }
    assert!((slope(&r, "grad_init.expert_up") + 1.5).abs() <= TOL, "{}", r.table());
}

#[test]
fn moe_completep_expert_hidden_slopes() {
    let b = Sizes { width: 64, expert_hidden: 64, ..base() };
    let r = check("moe-completep", Optimizer::Adam, Axis::ExpertHidden, vec![64, 128, 256, 512], b, 3);
    for q in ["delta.router_logits", "delta.expert_pre", "delta.moe_out", "delta.residual", "delta.output", "act.moe_out", "act.residual"] {
        assert!(slope(&r, q).abs() <= TOL, "{q}: {}\n{}", slope(&r, q), r.table());
    }
}

/// Along depth every block's change is Θ(1). The residual stream's change is the branch sum
/// (1/L) sum_l Δm_l: a learned part coherent across blocks plus a block-independent random part ∝ L^(-1/2),
/// RMS = sqrt(A + B/L); at L = 8..64 after 20 steps the learned part dominates (at L = 2..16 after 5 steps
/// the slope was -0.28). SP-like depth scaling (muP, no 1/L) instead grows.
#[test]
fn depth_slopes_moe_completep_vs_mup() {
    let r = check_steps("moe-completep", Optimizer::Adam, Axis::Depth, vec![8, 16, 32, 64], base(), 3, 20);
    for q in ["delta.router_logits", "delta.expert_pre", "delta.moe_out", "delta.residual", "delta.output", "act.moe_out", "act.residual"] {
        assert!(slope(&r, q).abs() <= TOL, "{q}: {}\n{}", slope(&r, q), r.table());
    }
    for q in ["grad.embedding", "grad.readout"] {
        assert!(slope(&r, q).abs() <= TOL, "{q}: {}\n{}", slope(&r, q), r.table());
    }
    for q in ["grad.router", "grad.expert_up", "grad.expert_down"] {
        assert!((slope(&r, q) + 1.0).abs() <= TOL, "{q}: {}\n{}", slope(&r, q), r.table());
    }
    let m = check("mup", Optimizer::Adam, Axis::Depth, vec![2, 4, 8, 16], base(), 3);
    assert!(slope(&m, "delta.residual") >= 0.5, "{}", m.table());
    assert!(slope(&m, "act.residual") >= 0.5, "{}", m.table());
}

/// Along experts the MoE output at init is an average of k random experts (slope -1/2), and its change
/// after training is a non-zero limit plus the random-initialization part ∝ k^(-1/2).
#[test]
fn experts_finite_size_rate() {
    let r = check("moe-completep", Optimizer::Adam, Axis::Experts, vec![8, 16, 32, 64, 128, 256], base(), 8);
    assert!((slope(&r, "act.moe_out") + 0.5).abs() <= TOL, "{}", r.table());
    let f = r.get("delta.moe_out").and_then(|q| q.finite_size).expect("finite-size fit");
    assert!(f.a > 0.0 && f.a_nonzero, "{f:?}");
    assert!((f.c - 0.5).abs() <= TOL, "{f:?}");
    for q in ["delta.router_logits", "delta.expert_pre", "delta.output"] {
        assert!(slope(&r, q).abs() <= TOL, "{q}: {}\n{}", slope(&r, q), r.table());
    }
}

#[test]
fn sp_grows_along_width_under_adam() {
    let r = check("sp", Optimizer::Adam, Axis::Width, vec![32, 64, 128, 256], base(), 3);
    assert!(slope(&r, "delta.router_logits") >= 0.5, "{}", r.table());
    assert!(slope(&r, "delta.expert_pre") >= 0.5, "{}", r.table());
}

#[test]
fn mup_fails_along_expert_hidden() {
    let b = Sizes { width: 64, expert_hidden: 64, ..base() };
    let m = check("mup", Optimizer::Adam, Axis::ExpertHidden, vec![64, 128, 256, 512], b, 3);
    assert!(slope(&m, "delta.moe_out") >= 0.3, "{}", m.table());
    // ...while MoE-CompleteP on the same sizes stays within the tolerance.
    let c = check("moe-completep", Optimizer::Adam, Axis::ExpertHidden, vec![64, 128, 256, 512], b, 3);
    assert!(slope(&c, "delta.moe_out") <= TOL, "{}", c.table());
}

/// SPEC §4 router ablation along width at fixed experts: a hidden-like router's logit change grows with
/// width relative to the zero router's.
#[test]
fn router_ablation_hidden_like_grows() {
    let run = |init| {
        let spec = CoordSpec {
            axis: Axis::Width,
            preset: "moe-completep".into(),
            optimizer: Optimizer::Adam,
            values: vec![32, 64, 128, 256],
            seeds: 3,
            steps: 5,
            lr: 0.01,
            base: base(),
            router_init: init,
            tolerance: TOL,
        };
        run_coord(&CoordSetup::new(spec)).unwrap()
    };
    let hidden = run(RouterInit::HiddenLike);
    let zero = run(RouterInit::Zero);
    let (h, z) = (slope(&hidden, "delta.router_logits"), slope(&zero, "delta.router_logits"));
    assert!(h - z >= 0.2, "hidden-like {h}, zero {z}");
    assert!(z.abs() <= TOL, "zero router {z}");
}

/// SP along experts: its hidden-like router has Θ(1) logits, so the softmax gates concentrate and the MoE
/// output at init is not an average of k experts (-1/2) but of 1/sum g^2 of them; the prediction from the
/// measured logit scale (Monte Carlo of Gaussian logits) matches the measured slope.
#[test]
fn sp_experts_gate_concentration() {
    let r = check("sp", Optimizer::Adam, Axis::Experts, vec![8, 16, 32, 64, 128, 256], base(), 4);
    let q = r.get("act.moe_out").unwrap();
    let p = q.predicted.expect("prediction").value;
    assert!(p > -0.35, "predicted {p}");
    assert!((slope(&r, "act.moe_out") - p).abs() <= TOL, "{}", r.table());
}
