//! `compare`'s antithetic seed groups, streamed/resumable runs and bias-corrected gap estimator.

use moe_dmft::check::compare::{
    fit_pure_power, gap_sq, mean_field_param, run_compare, run_compare_with, train_finite_flipped, Antithetic,
    CompareResult, CompareSpec, RunStore,
};
use moe_dmft::data::make_task;
use moe_dmft::dmft::SolveConfig;
use moe_dmft::model::resnet::{MoeResNet, ResNetConfig};
use moe_dmft::model::{Batch, Model};
use moe_dmft::param::Sizes;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

/// A fast solver side: 256 expert x 64 neuron samples, 2 repeats.
fn small_solve(steps: usize) -> SolveConfig {
    SolveConfig { steps, ..SolveConfig::default() }.with_resolution(256, 64, 2)
}

#[test]
fn readout_flip_negates_the_initial_output_exactly() {
    let cfg = small_solve(3);
    let task = make_task(&cfg.task).unwrap();
    let sizes = Sizes { width: 64, depth: cfg.depth, experts: 16, active: 4, expert_hidden: 16 };
    let seed = 7;
    // The initial output of the unflipped network, with the same tie-breaking stream as train_finite.
    let hp = mean_field_param(&cfg).resolve(&sizes).unwrap();
    let mcfg = ResNetConfig {
        input_dim: cfg.task.input_dim,
        outputs: task.y.ncols(),
        sizes,
        activation: cfg.activation,
        norm: false,
        routing: cfg.routing.clone(),
    };
    let model: MoeResNet<f64> = MoeResNet::new(&mcfg, &hp, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
    let batch = Batch::Regression { x: task.x.clone(), y: task.y.clone() };
    let (_, f0) = model.forward(&batch, &mut ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x7a11))).unwrap();
    let b = task.y.nrows() as f64;
    let loss_with =
        |sign: f64| 0.5 * f0.iter().zip(task.y.iter()).map(|(f, y)| (sign * f - y).powi(2)).sum::<f64>() / b;
    assert!(f0.iter().any(|v| v.abs() > 1e-6), "the readout starts non-zero, else the flip is void");

    let plain = train_finite_flipped(&cfg, &task, &sizes, seed, (false, false)).unwrap();
    let flipped = train_finite_flipped(&cfg, &task, &sizes, seed, (true, false)).unwrap();
    let down = train_finite_flipped(&cfg, &task, &sizes, seed, (false, true)).unwrap();
    assert!((plain.loss[0] - loss_with(1.0)).abs() < 1e-12 * loss_with(1.0));
    assert!(
        (flipped.loss[0] - loss_with(-1.0)).abs() < 1e-12 * loss_with(-1.0),
        "{} vs {}",
        flipped.loss[0],
        loss_with(-1.0)
    );
    assert!(flipped.flip_readout && !flipped.flip_down && down.flip_down);
    // Different trajectories (the pair is not a copy), all finite.
    for r in [&flipped, &down] {
        assert!((r.loss[3] - plain.loss[3]).abs() > 1e-9 * plain.loss[3]);
        assert!(r.loss.iter().all(|l| l.is_finite()));
    }
}

#[test]
fn bias_corrected_gap_is_unbiased_where_the_naive_one_is_not() {
    // Synthetic group curves: a known relative bias plus seed noise 5x larger.
    let dmft = vec![1.0, 0.5, 0.25, 0.2];
    let bias = 0.01;
    let noise = 0.05;
    let groups = 8;
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let reps = 4000;
    let (mut corrected, mut naive) = (0.0, 0.0);
    for _ in 0..reps {
        let curves: Vec<Vec<f64>> = (0..groups)
            .map(|_| {
                dmft.iter()
                    .map(|d| {
                        let z: f64 = StandardNormal.sample(&mut rng);
                        d * (1.0 + bias + noise * z)
                    })
                    .collect()
            })
            .collect();
        corrected += gap_sq(&curves, &dmft, &[0.0; 4]);
        let mean_sq: f64 = (0..4)
            .map(|t| {
                let m = curves.iter().map(|c| c[t]).sum::<f64>() / groups as f64;
                ((m - dmft[t]) / dmft[t]).powi(2)
            })
            .sum::<f64>()
            / 4.0;
        naive += mean_sq;
    }
    let (corrected, naive) = (corrected / reps as f64, naive / reps as f64);
    let truth = bias * bias;
    // Naive: bias^2 + noise^2 / groups = 1e-4 + 3.1e-4.
    assert!((naive - truth - noise * noise / groups as f64).abs() < 0.1 * naive, "naive {naive}");
    assert!((corrected - truth).abs() < 0.15 * truth, "corrected {corrected} vs {truth}");
    assert!(gap_sq(&[vec![1.0; 4]], &dmft, &[0.0; 4]).is_nan(), "one group cannot subtract its noise");
}

#[test]
fn pure_power_fit_recovers_the_rate() {
    let x = [128.0, 256.0, 512.0, 1024.0];
    let y: Vec<f64> = x.iter().map(|n: &f64| 3.0 * n.powf(-2.0)).collect();
    let e: Vec<f64> = y.iter().map(|v| 0.1 * v).collect();
    let (p, b, chi2) = fit_pure_power(&x, &y, &e);
    assert!((p - 2.0).abs() < 1e-6 && (b - 3.0).abs() < 1e-4 && chi2 < 1e-10, "p {p} b {b} chi2 {chi2}");
}

#[test]
fn antithetic_groups_stream_to_disk_and_resume_to_the_same_result() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = CompareSpec::new(small_solve(4), vec![(32, 8, 8), (64, 16, 16)], 2);
    spec.antithetic = Antithetic::ReadoutDown;
    spec.seeds_per_size = Some(vec![3, 2]);
    let store = RunStore { dir: dir.path().join("runs"), resume: false };
    let first = run_compare_with(&spec, Some(&store)).unwrap();
    assert_eq!(first.sizes.iter().map(|s| (s.groups, s.runs.len())).collect::<Vec<_>>(), vec![(3, 12), (2, 8)]);
    let files = |d: &std::path::Path| {
        std::fs::read_dir(d)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
            .count()
    };
    assert_eq!(files(&store.dir), 20 + 1, "one file per run plus the manifest");
    // Without a store: the same numbers.
    // Compared as JSON: NaN fields (e.g. `control_ratio` without control variates) are never == themselves.
    let plain = run_compare(&spec).unwrap();
    assert_eq!(json(&(&first.sizes, &first.gap_rate)), json(&(&plain.sizes, &plain.gap_rate)));

    // Resume after losing a run and with one file truncated: recomputes those, reuses the rest.
    let victim = store.dir.join("N64_M16_n16_s1_mm.json");
    std::fs::remove_file(&victim).unwrap();
    std::fs::write(store.dir.join("N32_M8_n8_s0_mp.json"), "{\"seed\": 0").unwrap();
    let resumed = run_compare_with(&spec, Some(&RunStore { dir: store.dir.clone(), resume: true })).unwrap();
    assert!(victim.exists());
    assert_eq!(json(&(&first.sizes, &first.gap_rate, &first.fits)), json(&(&resumed.sizes, &resumed.gap_rate, &resumed.fits)));

    // Another solver resolution changes only the DMFT side: the runs are reused as they are.
    let mut finer = spec.clone();
    finer.solve.resolution.neuron_samples *= 2;
    let refined = run_compare_with(&finer, Some(&RunStore { dir: store.dir.clone(), resume: true })).unwrap();
    assert_eq!(
        refined.sizes.iter().map(|s| &s.runs).collect::<Vec<_>>(),
        first.sizes.iter().map(|s| &s.runs).collect::<Vec<_>>()
    );
    assert_ne!(refined.dmft.loss, first.dmft.loss);

    // Resuming with another solver config is refused, naming the field.
    let mut other = spec.clone();
    other.solve.eta0 *= 2.0;
    let err = run_compare_with(&other, Some(&RunStore { dir: store.dir.clone(), resume: true })).unwrap_err();
    assert!(err.to_string().contains("resume"), "{err}");
    assert_eq!(err.exit_code(), 2);

    // The design is stored, and a result from before groups existed still reads (old fields only).
    let json = serde_json::to_value(&first).unwrap();
    assert_eq!(json["spec"]["antithetic"], "readout+down");
    let mut old = json.clone();
    old["spec"].as_object_mut().unwrap().retain(|k, _| ["solve", "ladder", "seeds"].contains(&k.as_str()));
    old.as_object_mut().unwrap().remove("gap_rate");
    for s in old["sizes"].as_array_mut().unwrap() {
        s.as_object_mut().unwrap().retain(|k, _| {
            !["groups", "signed_gap", "signed_gap_se", "gap_sq", "gap_sq_err", "variance_ratio"].contains(&k.as_str())
        });
        for r in s["runs"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().retain(|k, _| k != "flip_readout" && k != "flip_down");
        }
    }
    let back: CompareResult = serde_json::from_value(old).unwrap();
    assert_eq!(back.spec.antithetic, Antithetic::Off);
    assert!(back.gap_rate.is_none() && back.sizes[0].gap_sq.is_nan());
}

#[test]
fn dmft_extrapolation_is_richardson_in_the_neuron_samples() {
    let solve = small_solve(3);
    let mut spec = CompareSpec::new(solve.clone(), vec![(16, 4, 4), (32, 8, 8)], 1);
    spec.dmft_extrapolate = true;
    let r = run_compare(&spec).unwrap();
    let fine = run_compare(&CompareSpec::new(solve.clone(), vec![(16, 4, 4), (32, 8, 8)], 1)).unwrap();
    let mut half = solve;
    half.resolution.neuron_samples /= 2;
    let coarse = run_compare(&CompareSpec::new(half, vec![(16, 4, 4), (32, 8, 8)], 1)).unwrap();
    assert!(r.dmft.loss_extrapolated && !fine.dmft.loss_extrapolated);
    for t in 0..r.dmft.loss.len() {
        let want = 2.0 * fine.dmft.loss[t] - coarse.dmft.loss[t];
        assert!((r.dmft.loss[t] - want).abs() < 1e-12, "step {t}: {} vs {want}", r.dmft.loss[t]);
        let (e1, e2) = (fine.dmft.loss_err.as_ref().unwrap()[t], coarse.dmft.loss_err.as_ref().unwrap()[t]);
        assert!((r.dmft.loss_err.as_ref().unwrap()[t] - (4.0 * e1 * e1 + e2 * e2).sqrt()).abs() < 1e-12);
    }
    // The finite side is untouched by the reference.
    assert_eq!(r.sizes[0].runs, fine.sizes[0].runs);
}

#[test]
fn bad_design_inputs_name_their_field() {
    let mut spec = CompareSpec::new(small_solve(2), vec![(32, 8, 8), (64, 16, 16)], 2);
    spec.seeds_per_size = Some(vec![2]);
    assert!(spec.sizes().unwrap_err().to_string().contains("seeds_per_size"));
    spec.seeds_per_size = Some(vec![2, 0]);
    assert!(spec.sizes().unwrap_err().to_string().contains("seeds_per_size"));
    let e = "both".parse::<Antithetic>().unwrap_err();
    assert!(e.to_string().contains("antithetic") && e.exit_code() == 2);
}
