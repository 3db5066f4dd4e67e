//! The Adam-epsilon exponents against measurement: the RMS of each group's gradient entries in the
//! MoE-ResNet at init, under the standard-form Adam MoE-CompleteP table, along each axis. Fitted log-log
//! slopes must match the engine's `adam_eps` exponents within 0.15 for the groups whose gradient at init
//! already has its feature-learning scaling (the router is excluded: at init, with a zero router, its
//! gradient is the smaller init-random part; see docs/theory.md §Parameterization).

use moe_dmft::model::resnet::{MoeResNet, ResNetConfig};
use moe_dmft::model::{Activation, Batch, Model};
use moe_dmft::param::{Axis, Group, Optimizer, ParamConfig, Sizes};
use moe_dmft::routing::RoutingConfig;
use ndarray::Array2;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

const GROUPS: [Group; 4] = [Group::Embedding, Group::ExpertUp, Group::ExpertDown, Group::Readout];

/// Mean over seeds of the RMS of each group's gradient entries at init.
fn grad_rms(sizes: Sizes, base: Sizes) -> Vec<f64> {
    let cfg = ParamConfig { optimizer: Optimizer::Adam, base: Some(base), ..ParamConfig::default() };
    let hp = cfg.resolve(&sizes).unwrap();
    let net_cfg = ResNetConfig {
        input_dim: 8,
        outputs: 1,
        sizes,
        activation: Activation::Relu,
        norm: false,
        routing: RoutingConfig::default(),
    };
    let seeds = 4;
    let mut acc = vec![0.0; GROUPS.len()];
    for seed in 0..seeds {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let x = Array2::from_shape_fn((16, 8), |_| StandardNormal.sample(&mut rng));
        let y = Array2::from_shape_fn((16, 1), |_| StandardNormal.sample(&mut rng));
        let net = MoeResNet::<f64>::new(&net_cfg, &hp, &mut rng).unwrap();
        let out = net.loss_and_grad(&Batch::Regression { x, y }, &mut rng).unwrap();
        for (i, g) in GROUPS.iter().enumerate() {
            let (mut sum, mut count) = (0.0, 0usize);
            for (p, grad) in net.store().params.iter().zip(&out.grads) {
                if p.group == *g {
                    sum += grad.iter().map(|v| v * v).sum::<f64>();
                    count += grad.len();
                }
            }
            acc[i] += (sum / count as f64).sqrt() / seeds as f64;
        }
    }
    acc
}

fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let lx: Vec<f64> = xs.iter().map(|v| v.ln()).collect();
    let ly: Vec<f64> = ys.iter().map(|v| v.ln()).collect();
    let (mx, my) = (lx.iter().sum::<f64>() / lx.len() as f64, ly.iter().sum::<f64>() / ly.len() as f64);
    let cov: f64 = lx.iter().zip(&ly).map(|(a, b)| (a - mx) * (b - my)).sum();
    let var: f64 = lx.iter().map(|a| (a - mx) * (a - mx)).sum();
    cov / var
}

fn check_axis(axis: Axis, ladder: &[Sizes]) {
    let base = ladder[0];
    let table = ParamConfig { optimizer: Optimizer::Adam, base: Some(base), ..ParamConfig::default() }
        .resolve_table(&base)
        .unwrap();
    let factors: Vec<f64> = ladder
        .iter()
        .map(|s| match axis {
            Axis::Width => s.width as f64 / base.width as f64,
            Axis::Depth => s.depth as f64 / base.depth as f64,
            Axis::Experts => s.experts as f64 / base.experts as f64,
            Axis::ExpertHidden => s.expert_hidden as f64 / base.expert_hidden as f64,
        })
        .collect();
    let rms: Vec<Vec<f64>> = ladder.iter().map(|s| grad_rms(*s, base)).collect();
    for (i, g) in GROUPS.iter().enumerate() {
        let ys: Vec<f64> = rms.iter().map(|r| r[i]).collect();
        let measured = slope(&factors, &ys);
        let predicted = table.row(g.name()).unwrap().exponents.get(axis).adam_eps.unwrap();
        eprintln!("{} {}: measured grad-RMS slope {measured:+.3}, engine adam_eps exponent {predicted:+.2}", axis.name(), g.name());
        assert!((measured - predicted).abs() < 0.15, "{} {}: measured {measured} vs predicted {predicted}", axis.name(), g.name());
    }
}

fn sizes(width: usize, expert_hidden: usize) -> Sizes {
    Sizes { width, depth: 1, experts: 8, active: 2, expert_hidden }
}

#[test]
fn grad_rms_along_width_matches_eps_exponents() {
    check_axis(Axis::Width, &[sizes(64, 32), sizes(128, 64), sizes(256, 128), sizes(512, 256)]);
}

#[test]
fn grad_rms_along_expert_hidden_matches_eps_exponents() {
    check_axis(Axis::ExpertHidden, &[sizes(64, 16), sizes(64, 32), sizes(64, 64), sizes(64, 128), sizes(64, 256)]);
}

#[test]
fn grad_rms_along_experts_matches_eps_exponents() {
    let s = |experts: usize, active: usize| Sizes { width: 64, depth: 1, experts, active, expert_hidden: 32 };
    check_axis(Axis::Experts, &[s(8, 2), s(16, 4), s(32, 8), s(64, 16)]);
}

#[test]
fn grad_rms_along_depth_matches_eps_exponents() {
    let s = |depth: usize| Sizes { width: 64, depth, experts: 8, active: 2, expert_hidden: 32 };
    check_axis(Axis::Depth, &[s(1), s(2), s(4), s(8)]);
}
