//! Coordinate checks of the MoE-Transformer (issue 5): the attention groups and the MoE groups along
//! width under moe-completep (Θ(1) changes) and SP (growing changes), determinism, file output and input
//! errors. Sizes N = 32..256 (8x), 3 seeds, 5 Adam steps: a few seconds each in release.

use std::sync::OnceLock;

use moe_dmft::check::coord::{CoordResult, CoordSpec, RouterInit, Verdict};
use moe_dmft::check::run_transformer::{measure_transformer, quantity_names, result_file, run_and_write, run_coord_transformer, TransformerCoordSetup};
use moe_dmft::param::{Axis, Optimizer, Sizes};

fn setup(preset: &str) -> TransformerCoordSetup {
    TransformerCoordSetup::new(CoordSpec {
        axis: Axis::Width,
        preset: preset.into(),
        optimizer: Optimizer::Adam,
        values: vec![32, 64, 128, 256],
        seeds: 3,
        steps: 5,
        lr: 0.01,
        base: Sizes { width: 32, depth: 2, experts: 8, active: 2, expert_hidden: 32 },
        router_init: RouterInit::Preset,
        tolerance: 0.15,
    })
}

fn completep() -> &'static CoordResult {
    static R: OnceLock<CoordResult> = OnceLock::new();
    R.get_or_init(|| run_coord_transformer(&setup("moe-completep")).unwrap())
}

fn slope(r: &CoordResult, q: &str) -> f64 {
    r.get(q).unwrap_or_else(|| panic!("no {q}")).slope.unwrap_or_else(|| panic!("{q} has no slope")).slope
}

#[test]
fn moe_completep_width_changes_are_order_one() {
    let r = completep();
    // Θ(1) on the nose: embedding, attention output, experts, MoE output, residual stream.
    for q in ["delta.embedding", "delta.attn_out", "delta.expert_pre", "delta.moe_out", "delta.residual"] {
        let s = slope(r, q);
        assert!(s.abs() <= 0.15, "{q}: slope {s}");
        assert_eq!(r.get(q).unwrap().verdict, Verdict::Agrees, "{q}");
    }
    // The logit-like quantities (q.k/d_head, router logits, output logits) start at N^(-1/2) and their
    // change is a Θ(1) aligned part plus a random part that decays like N^(-1/2): Θ(1) in the limit, with a
    // finite-size correction at these widths (measured slopes about -0.4, -0.2, -0.2), never faster decay
    // than the random part alone.
    for q in ["delta.attn_logits", "delta.router_logits", "delta.output"] {
        let x = r.get(q).unwrap();
        let s = slope(r, q);
        assert!(matches!(x.verdict, Verdict::Agrees | Verdict::FiniteSize), "{q}: {:?} slope {s}", x.verdict);
        assert!(s > -0.5, "{q}: slope {s}");
    }
}

#[test]
fn moe_completep_width_init_and_gradients_follow_power_counting() {
    let r = completep();
    // Pre-norm power counting: every activation at initialization, attention logits at N^(-1/2).
    for q in quantity_names().iter().filter(|q| q.starts_with("act.")) {
        assert_eq!(r.get(q).unwrap().verdict, Verdict::Agrees, "{q}: slope {}", slope(r, q));
    }
    assert!((slope(r, "act.attn_logits") + 0.5).abs() < 0.05);
    // The engine's gradient laws for the attention groups, at the first and at the last step.
    for q in ["grad.attn_qkv", "grad.attn_out", "grad_init.attn_qkv", "grad_init.attn_out", "grad.unembedding"] {
        let x = r.get(q).unwrap();
        assert_eq!(x.predicted.map(|p| p.value), Some(-1.0), "{q}");
        assert_eq!(x.verdict, Verdict::Agrees, "{q}: slope {}", slope(r, q));
    }
    // At initialization the router's gradient pairs random expert outputs with the backward field:
    // sqrt(N) instead of N, half a power below the engine's Θ(1) (measured about -0.51).
    assert_eq!(r.get("grad_init.router").unwrap().predicted.map(|p| p.value), Some(-0.5));
    assert_eq!(r.get("grad_init.router").unwrap().verdict, Verdict::Agrees, "slope {}", slope(r, "grad_init.router"));
    let (l0, l1) = (&r.get("loss_ce.init").unwrap().mean, &r.get("loss_ce.final").unwrap().mean);
    assert!(l0.iter().zip(l1).all(|(a, b)| b < a), "training must lower the loss: {l0:?} -> {l1:?}");
}

#[test]
fn sp_width_attention_changes_grow() {
    let r = run_coord_transformer(&setup("sp")).unwrap();
    // SP keeps Adam's learning rate fixed while the projections' fan-in grows: the attention output and
    // logits change at least like N^(1/2) (measured: about N^0.73 and N^0.54).
    for q in ["delta.attn_out", "delta.attn_logits"] {
        let x = r.get(q).unwrap();
        assert_eq!(x.predicted.map(|p| (p.value, p.lower_bound)), Some((0.5, true)), "{q}");
        assert_eq!(x.verdict, Verdict::Agrees, "{q}: slope {}", slope(&r, q));
    }
    assert!(slope(&r, "delta.attn_out") >= 0.5);
    // The same changes are Θ(1) or shrinking under moe-completep: the preset, not the task, makes them grow.
    let c = completep();
    for q in ["delta.attn_out", "delta.attn_logits"] {
        assert!(slope(&r, q) > slope(c, q) + 0.4, "{q}: sp {} vs moe-completep {}", slope(&r, q), slope(c, q));
    }
}

#[test]
fn same_seed_same_values_whatever_the_thread_count() {
    let mut s = setup("moe-completep");
    s.spec.steps = 3;
    let sizes = s.spec.base.along(Axis::Width, 64, "t").unwrap();
    let a = measure_transformer(&s, &sizes, 7).unwrap();
    assert_eq!(a, measure_transformer(&s, &sizes, 7).unwrap());
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    assert_eq!(a, one.install(|| measure_transformer(&s, &sizes, 7)).unwrap());
    assert_ne!(a, measure_transformer(&s, &sizes, 8).unwrap(), "another seed is another network");
}

#[test]
fn writes_a_transformer_labelled_result() {
    let mut s = setup("mup");
    s.spec.values = vec![32, 64];
    s.spec.seeds = 1;
    s.spec.steps = 1;
    let dir = tempfile::tempdir().unwrap();
    let (r, path) = run_and_write(&s, dir.path()).unwrap();
    assert_eq!(path.file_name().unwrap().to_str().unwrap(), "transformer_mup_adam_width.json");
    assert_eq!(result_file(&r), "transformer_mup_adam_width.json");
    let back: CoordResult = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(back.quantities.len(), quantity_names().len());
    assert!(back.get("act.attn_logits").is_some() && back.get("grad.attn_qkv").is_some());
}

#[test]
fn bad_input_names_the_field() {
    let mut s = setup("moe-completep");
    s.n_head = 5;
    let e = run_coord_transformer(&s).unwrap_err().to_string();
    assert!(e.contains("coord.n_head"), "{e}");
    let mut s = setup("moe-completep");
    s.spec.values = vec![64, 32];
    assert!(run_coord_transformer(&s).unwrap_err().to_string().contains("coord.sizes"));
    let mut s = setup("nope");
    s.spec.values = vec![32, 64];
    assert!(run_coord_transformer(&s).unwrap_err().to_string().contains("preset"));
    let mut s = setup("moe-completep");
    s.batch = 0;
    assert!(run_coord_transformer(&s).unwrap_err().to_string().contains("coord.batch"));
}
