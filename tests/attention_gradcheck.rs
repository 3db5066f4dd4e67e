//! Causal attention: gradients against central finite differences (f64), causality, and agreement
//! across thread counts.

use moe_dmft::model::attention::{attention_backward, attention_forward, AttentionConfig, AttentionWeights};
use ndarray::{Array, Array2, Array3};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn randn<D: ndarray::Dimension, Sh: ndarray::ShapeBuilder<Dim = D>>(
    shape: Sh,
    std: f64,
    rng: &mut ChaCha8Rng,
) -> Array<f64, D> {
    Array::from_shape_simple_fn(shape, || {
        let z: f64 = StandardNormal.sample(rng);
        std * z
    })
}

struct Setup {
    cfg: AttentionConfig,
    qkv: Array2<f64>,
    out: Array2<f64>,
    x: Array3<f64>,
    probe: Array3<f64>,
}

fn setup(seed: u64) -> Setup {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (b, t, n) = (2, 5, 6);
    Setup {
        cfg: AttentionConfig {
            n_head: 2,
            logit_multiplier: 2.5,
        },
        qkv: randn((3 * n, n), 0.8, &mut rng),
        out: randn((n, n), 0.5, &mut rng),
        x: randn((b, t, n), 1.0, &mut rng),
        probe: randn((b, t, n), 1.0, &mut rng),
    }
}

fn weights<'a>(qkv: &'a Array2<f64>, out: &'a Array2<f64>) -> AttentionWeights<'a, f64> {
    AttentionWeights {
        qkv: qkv.view(),
        out: out.view(),
        qkv_multiplier: 0.7,
        out_multiplier: 1.3,
    }
}

fn objective(s: &Setup, qkv: &Array2<f64>, out: &Array2<f64>, x: &Array3<f64>) -> f64 {
    let (y, _) = attention_forward(&weights(qkv, out), &s.cfg, x.view());
    (&y * &s.probe).sum()
}

fn rel_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / a.abs().max(b.abs()).max(1e-6)
}

#[test]
fn attention_gradients_match_central_differences() {
    let s = setup(3);
    let w = weights(&s.qkv, &s.out);
    let (_, cache) = attention_forward(&w, &s.cfg, s.x.view());
    let (dx, grads) = attention_backward(&w, &s.cfg, &cache, s.probe.view());
    let h = 1e-5;
    let mut worst = [0.0f64; 3];
    for (idx, g) in grads.qkv.indexed_iter() {
        let (mut p, mut m) = (s.qkv.clone(), s.qkv.clone());
        p[idx] += h;
        m[idx] -= h;
        let fd = (objective(&s, &p, &s.out, &s.x) - objective(&s, &m, &s.out, &s.x)) / (2.0 * h);
        worst[0] = worst[0].max(rel_err(fd, *g));
    }
    for (idx, g) in grads.out.indexed_iter() {
        let (mut p, mut m) = (s.out.clone(), s.out.clone());
        p[idx] += h;
        m[idx] -= h;
        let fd = (objective(&s, &s.qkv, &p, &s.x) - objective(&s, &s.qkv, &m, &s.x)) / (2.0 * h);
        worst[1] = worst[1].max(rel_err(fd, *g));
    }
    for (idx, g) in dx.indexed_iter() {
        let (mut p, mut m) = (s.x.clone(), s.x.clone());
        p[idx] += h;
        m[idx] -= h;
        let fd = (objective(&s, &s.qkv, &s.out, &p) - objective(&s, &s.qkv, &s.out, &m)) / (2.0 * h);
        worst[2] = worst[2].max(rel_err(fd, *g));
    }
    assert!(
        worst.iter().all(|&e| e < 1e-6),
        "max relative errors (attn_qkv, attn_out, input) = {worst:?}"
    );
}

#[test]
fn future_tokens_do_not_change_past_outputs() {
    let s = setup(5);
    let w = weights(&s.qkv, &s.out);
    let (y, _) = attention_forward(&w, &s.cfg, s.x.view());
    let mut x2 = s.x.clone();
    let last = x2.dim().1 - 1;
    x2.slice_mut(ndarray::s![.., last, ..]).mapv_inplace(|v| v + 3.0);
    let (y2, _) = attention_forward(&w, &s.cfg, x2.view());
    let past = ndarray::s![.., ..last, ..];
    assert_eq!(y.slice(past), y2.slice(past));
    assert!(
        (&y.slice(ndarray::s![.., last, ..]) - &y2.slice(ndarray::s![.., last, ..]))
            .iter()
            .any(|d| d.abs() > 1e-3)
    );
}

#[test]
fn first_token_attends_only_to_itself() {
    // With one visible key the probabilities are exactly 1, so the first output is out(v_0).
    let s = setup(9);
    let w = weights(&s.qkv, &s.out);
    let (y, _) = attention_forward(&w, &s.cfg, s.x.view());
    let n = s.x.dim().2;
    let x0 = s.x.slice(ndarray::s![0, 0, ..]);
    let v0: ndarray::Array1<f64> = s.qkv.slice(ndarray::s![2 * n.., ..]).dot(&x0) * 0.7;
    let expected: ndarray::Array1<f64> = s.out.dot(&v0) * 1.3;
    for (a, b) in y.slice(ndarray::s![0, 0, ..]).iter().zip(expected.iter()) {
        assert!((a - b).abs() < 1e-12);
    }
}

#[test]
fn thread_count_does_not_change_results_beyond_rounding() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (b, t, n) = (4, 16, 32);
    let cfg = AttentionConfig {
        n_head: 4,
        logit_multiplier: 1.0,
    };
    let qkv = randn((3 * n, n), 0.2, &mut rng);
    let out = randn((n, n), 0.2, &mut rng);
    let x = randn((b, t, n), 1.0, &mut rng);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let w = weights(&qkv, &out);
            let (y, cache) = attention_forward(&w, &cfg, x.view());
            let (dx, g) = attention_backward(&w, &cfg, &cache, y.view());
            (y, dx, g.qkv)
        })
    };
    let (y1, dx1, g1) = run(1);
    let (y2, dx2, g2) = run(2);
    let (y2b, dx2b, g2b) = run(2);
    assert_eq!(
        (&y2, &dx2, &g2),
        (&y2b, &dx2b, &g2b),
        "same thread count must give identical results"
    );
    for (a, b) in y1
        .iter()
        .chain(dx1.iter())
        .chain(g1.iter())
        .zip(y2.iter().chain(dx2.iter()).chain(g2.iter()))
    {
        assert!((a - b).abs() <= 1e-12 * (1.0 + a.abs()));
    }
}
