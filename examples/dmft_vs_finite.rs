//! DMFT vs finite MoE-ResNets on the same task: the mean-field SGD instance of SPEC §4 (zero router,
//! random tie-breaking) trained by full-batch GD at growing (N, M, n) with kappa fixed, against the DMFT
//! solution. Prints final losses (mean +- standard error over seeds) and the relative trajectory gap.
//!
//! cargo run --release --example dmft_vs_finite -- [--depth L] [--steps T] [--seeds S]
//!     [--sizes 128x32x32,256x64x64,512x128x128] [--tie random|index] [--activation relu|tanh|gelu|linear]
//!     [--prototypes Z] [--capacity C] [--gate softmax|sigmoid] [--bias-rate u] [--curves]

use moe_dmft::data::{make_task, TaskConfig};
use moe_dmft::check::compare::mean_field_param;
use moe_dmft::dmft::{self, SolveConfig};
use moe_dmft::model::resnet::{MoeResNet, ResNetConfig};
use moe_dmft::model::{Activation, Batch, Model};
use moe_dmft::param::Sizes;
use moe_dmft::routing::{Gate, RoutingConfig, TieBreak};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn finite_curve(
    sizes: Sizes,
    act: Activation,
    routing: &RoutingConfig,
    task: &moe_dmft::data::Task,
    steps: usize,
    seed: u64,
) -> moe_dmft::Result<(Vec<f64>, f64, f64)> {
    // The engine's mean-field SGD instance (SPEC §4), as `compare` uses it; eta0 = 0.2, gamma0 = 1.
    let solve = SolveConfig { task: TaskConfig { input_dim: task.x.ncols(), ..TaskConfig::default() }, ..SolveConfig::default() };
    let hp = mean_field_param(&solve).resolve(&sizes)?;
    let cfg = ResNetConfig {
        input_dim: task.x.ncols(),
        outputs: task.y.ncols(),
        sizes,
        activation: act,
        norm: false,
        routing: routing.clone(),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model: MoeResNet<f32> = MoeResNet::new(&cfg, &hp, &mut rng)?;
    let batch = Batch::Regression {
        x: task.x.clone(),
        y: task.y.clone(),
    };
    let mut losses = Vec::with_capacity(steps + 1);
    for _ in 0..steps {
        let out = model.loss_and_grad(&batch, &mut rng)?;
        losses.push(out.loss);
        for (p, g) in model.store_mut().params.iter_mut().zip(&out.grads) {
            let lr = hp.get(p.group).lr as f32;
            p.value.scaled_add(-lr, g);
        }
        model.after_step(&out.load);
    }
    let last = model.loss_and_grad(&batch, &mut rng)?;
    losses.push(last.loss);
    let (cv, dropped) = last
        .load
        .first()
        .map_or((f64::NAN, f64::NAN), |l| (l.cv, l.dropped));
    Ok((losses, cv, dropped))
}

fn main() -> moe_dmft::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let depth: usize = get("--depth").map_or(1, |v| v.parse().expect("--depth"));
    let steps: usize = get("--steps").map_or(20, |v| v.parse().expect("--steps"));
    let seeds: u64 = get("--seeds").map_or(3, |v| v.parse().expect("--seeds"));
    let tie = match get("--tie").as_deref() {
        Some("index") => TieBreak::Index,
        _ => TieBreak::Random,
    };
    let act = match get("--activation").as_deref() {
        Some("tanh") => Activation::Tanh,
        Some("gelu") => Activation::Gelu,
        Some("linear") => Activation::Linear,
        _ => Activation::Relu,
    };
    let sizes: Vec<(usize, usize, usize)> = get("--sizes")
        .unwrap_or_else(|| "128x32x32,256x64x64,512x128x128".into())
        .split(',')
        .map(|s| {
            let v: Vec<usize> = s
                .split('x')
                .map(|x| x.parse().expect("--sizes NxMxn"))
                .collect();
            (v[0], v[1], v[2])
        })
        .collect();
    let routing = RoutingConfig {
        tie_break: tie,
        prototypes: get("--prototypes").map_or(1, |v| v.parse().expect("--prototypes")),
        capacity_factor: get("--capacity").map(|v| v.parse().expect("--capacity")),
        gate: if get("--gate").as_deref() == Some("sigmoid") {
            Gate::Sigmoid
        } else {
            Gate::Softmax
        },
        bias_update_rate: get("--bias-rate").map_or(0.0, |v| v.parse().expect("--bias-rate")),
        ..RoutingConfig::default()
    };
    let task_cfg = TaskConfig::default();
    let task = make_task(&task_cfg)?;
    let cfg = SolveConfig {
        task: task_cfg,
        activation: act,
        depth,
        steps,
        routing: routing.clone(),
        ..SolveConfig::default()
    }
    .with_resolution(1024, 128, 4);
    let sol = dmft::solve(&cfg, &task, None)?;
    let (dl, de) = sol.final_loss();
    let d = &sol.dropped;
    println!(
        "DMFT load cv at steps 0 / T: {:.3} / {:.3}; dropped fraction at T: {:.3}",
        sol.load_cv[[0, 0]],
        sol.load_cv[[steps, 0]],
        d[[steps, 0]]
    );
    println!(
        "DMFT (1024 experts x 128 neurons x 4 repeats, {:.1} s): final loss {dl:.5} +- {:.5}",
        sol.wall_s,
        de.unwrap_or(f64::NAN)
    );
    println!(
        "{:>16} {:>10} {:>9} {:>9} {:>10}",
        "N x M x n", "final", "+-", "gap", "traj gap"
    );
    for (n, m, h) in sizes {
        let k = m / 4;
        let s = Sizes {
            width: n,
            depth,
            experts: m,
            active: k,
            expert_hidden: h,
        };
        let start = std::time::Instant::now();
        let runs: Vec<(Vec<f64>, f64, f64)> = (0..seeds)
            .map(|seed| finite_curve(s, act, &routing, &task, steps, seed))
            .collect::<Result<_, _>>()?;
        let cv = runs.iter().map(|r| r.1).sum::<f64>() / runs.len() as f64;
        let dropped = runs.iter().map(|r| r.2).sum::<f64>() / runs.len() as f64;
        let curves: Vec<Vec<f64>> = runs.into_iter().map(|r| r.0).collect();
        let fin: Vec<f64> = curves.iter().map(|c| c[steps]).collect();
        let mean = fin.iter().sum::<f64>() / fin.len() as f64;
        let se = if fin.len() > 1 {
            (fin.iter().map(|v| (v - mean).powi(2)).sum::<f64>()
                / (fin.len() - 1) as f64
                / fin.len() as f64)
                .sqrt()
        } else {
            f64::NAN
        };
        // Relative trajectory gap: max over steps of |mean finite loss - DMFT loss| / DMFT loss.
        let traj = (0..=steps)
            .map(|t| {
                let f = curves.iter().map(|c| c[t]).sum::<f64>() / curves.len() as f64;
                (f - sol.loss[t]).abs() / sol.loss[t]
            })
            .fold(0.0, f64::max);
        println!(
            "{:>16} {mean:>10.5} {se:>9.5} {:>8.2}% {:>9.2}%   load cv {cv:.3} dropped {dropped:.3} ({:.1} s)",
            format!("{n}x{m}x{h}"),
            100.0 * (mean - dl) / dl,
            100.0 * traj,
            start.elapsed().as_secs_f64()
        );
        if args.iter().any(|a| a == "--curves") {
            for t in 0..=steps {
                let f = curves.iter().map(|c| c[t]).sum::<f64>() / curves.len() as f64;
                println!("    step {t:>3}: finite {f:.5}  dmft {:.5}", sol.loss[t]);
            }
        }
    }
    Ok(())
}
