//! The training loop through the library API: exact SGD trajectories on a linear model, minibatches,
//! clipping, schedules in the records, divergence, and `train_in_memory` on the real architectures.

use moe_dmft::data::Task;
use moe_dmft::model::{Batch, Grads, Model, ParamStore, Real, Resident, ResidentGrad, StepOutput};
use moe_dmft::param::{Group, GroupHp, Optimizer as Opt, Resolved, Sizes};
use moe_dmft::routing::LoadStats;
use moe_dmft::train::engine::{make_optimizer, run_loop, LoopSettings, Observer, Status, StepRecord, TrainData};
use moe_dmft::train::optim::Optimizer;
use moe_dmft::train::schedule::{Schedule, ScheduleKind};
use moe_dmft::train::{train_in_memory, NoObserver, TrainConfig};
use ndarray::{Array1, Array2, Ix2};
use rand_chacha::ChaCha8Rng;

/// f = w . x with w stored as a 1 x D readout; loss 0.5 * mean (f - y)^2.
struct Linear<F> {
    store: ParamStore<F>,
}

impl<F: Real> Linear<F> {
    fn new(w: &[f64]) -> Self {
        let mut store = ParamStore { params: Vec::new() };
        let w = Array2::from_shape_fn((1, w.len()), |(_, i)| F::of(w[i])).into_dyn();
        store.push("readout", Group::Readout, w);
        Linear { store }
    }

    fn w(&self) -> Array1<f64> {
        self.store.params[0].value.iter().map(|v| v.to_f64().unwrap()).collect()
    }
}

impl<F: Real> Model<F> for Linear<F> {
    fn store(&self) -> &ParamStore<F> {
        &self.store
    }
    fn store_mut(&mut self) -> &mut ParamStore<F> {
        &mut self.store
    }
    fn loss_and_grad(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> moe_dmft::Result<StepOutput<F>> {
        let Batch::Regression { x, y } = batch else { panic!("regression only") };
        let (loss, f) = self.forward(batch, rng)?;
        let err = &f - y;
        let g = err.t().dot(x) / x.nrows() as f64;
        Ok(StepOutput {
            loss,
            aux_loss: 0.0,
            grads: vec![g.mapv(F::of).into_dyn()],
            load: vec![],
            diagnostics: vec![("f_rms".into(), (f.mapv(|v| v * v).mean().unwrap()).sqrt())],
        })
    }
    fn forward(&self, batch: &Batch, _rng: &mut ChaCha8Rng) -> moe_dmft::Result<(f64, Array2<f64>)> {
        let Batch::Regression { x, y } = batch else { panic!("regression only") };
        let w = self.store.params[0].value.view().into_dimensionality::<Ix2>().unwrap().mapv(|v| v.to_f64().unwrap());
        let f = x.dot(&w.t());
        let loss = 0.5 * (&f - y).mapv(|v| v * v).mean().unwrap();
        Ok((loss, f))
    }
}

fn resolved(lr: f64, opt: Opt) -> Resolved {
    let sizes = Sizes { width: 1, depth: 1, experts: 1, active: 1, expert_hidden: 1 };
    Resolved {
        preset: "test".into(),
        optimizer: opt,
        sizes,
        base: sizes,
        residual_multiplier: 1.0,
        groups: vec![GroupHp { group: Group::Readout, init_std: 0.0, multiplier: 1.0, lr, adam_eps: Some(1e-8), weight_decay: 0.0 }],
    }
}

fn task() -> Task {
    let x = Array2::from_shape_fn((8, 3), |(i, j)| ((i * 3 + j) as f64 * 0.7).sin());
    let y = Array2::from_shape_fn((8, 1), |(i, _)| (i as f64 * 0.3).cos());
    Task { x, y }
}

fn settings(steps: usize) -> LoopSettings {
    LoopSettings {
        seed: 1,
        steps,
        schedule: Schedule::constant(steps),
        batch_size: None,
        eval_every: 0,
        grad_clip: None,
        beta1: 0.9,
        beta2: 0.999,
    }
}

#[derive(Default)]
struct Collect(Vec<StepRecord>);
impl Observer for Collect {
    fn observe(&mut self, r: &StepRecord) -> moe_dmft::Result<()> {
        self.0.push(r.clone());
        Ok(())
    }
}

#[test]
fn full_batch_sgd_follows_the_exact_gradient_descent_trajectory() {
    let t = task();
    let data = TrainData::Regression { train: t.clone(), validation: Some(t.clone()) };
    let mut model = Linear::<f64>::new(&[0.1, -0.2, 0.3]);
    let mut obs = Collect::default();
    let mut s = settings(12);
    s.eval_every = 5;
    let r = run_loop(&mut model, &resolved(0.4, Opt::Sgd), &data, &s, &mut obs).unwrap();
    assert_eq!(r.status, Status::Ok);
    assert_eq!(r.losses.len(), 13);

    let mut w = Array1::from(vec![0.1, -0.2, 0.3]);
    for (step, &loss) in r.losses.iter().enumerate() {
        let err = t.x.dot(&w) - t.y.column(0);
        assert!((loss - 0.5 * err.mapv(|v| v * v).mean().unwrap()).abs() < 1e-12, "loss at step {step}");
        if step < 12 {
            w = &w - &(t.x.t().dot(&err) * (0.4 / 8.0));
        }
    }
    let w_final_expected = w;
    assert!(model.w().abs_diff_eq(&w_final_expected, 1e-12));
    // Validation (same set here) at steps 0, 5, 10 and after the last step equals the training loss.
    let evals: Vec<usize> = r.val_losses.iter().map(|v| v.0).collect();
    assert_eq!(evals, vec![0, 5, 10, 12]);
    for (step, v) in &r.val_losses {
        assert!((v - r.losses[*step]).abs() < 1e-12);
    }
    assert_eq!(obs.0.len(), 13);
    assert!(obs.0[12].r#final && !obs.0[11].r#final);
    let g = &obs.0[3].groups["readout"];
    assert!((g.lr - 0.4).abs() < 1e-15);
    assert!(g.update > 0.0 && (g.update - 0.4 * g.grad).abs() < 1e-12, "SGD update = lr * gradient");
}

#[test]
fn minibatches_are_seeded_and_clipping_caps_the_update() {
    let t = task();
    let data = TrainData::Regression { train: t, validation: None };
    let run = |seed: u64, clip: Option<f64>| {
        let mut model = Linear::<f64>::new(&[1.0, 1.0, 1.0]);
        let mut s = settings(6);
        s.seed = seed;
        s.batch_size = Some(3);
        s.grad_clip = clip;
        let mut obs = Collect::default();
        let r = run_loop(&mut model, &resolved(0.5, Opt::Sgd), &data, &s, &mut obs).unwrap();
        (r.losses, obs.0)
    };
    let (a, _) = run(1, None);
    assert_eq!(a, run(1, None).0);
    assert_ne!(a, run(2, None).0, "the seed picks the minibatches");
    let (_, recs) = run(1, Some(0.01));
    for r in &recs[..6] {
        let g = &r.groups["readout"];
        assert!(r.grad_norm > 0.01, "the test needs gradients above the clip");
        // Clipped to global norm 0.01 over 3 entries: grad RMS 0.01/sqrt(3), update RMS lr times that.
        assert!((g.grad - 0.01 / 3f64.sqrt()).abs() < 1e-12);
        assert!((g.update - 0.5 * 0.01 / 3f64.sqrt()).abs() < 1e-12);
    }
}

#[test]
fn schedule_factor_reaches_every_group_and_adam_runs() {
    let t = task();
    let data = TrainData::Regression { train: t, validation: None };
    let mut model = Linear::<f32>::new(&[0.0, 0.0, 0.0]);
    let mut s = settings(10);
    s.schedule = Schedule { kind: ScheduleKind::Linear, warmup: 2, final_fraction: 0.0, steps: 10 };
    let mut obs = Collect::default();
    let r = run_loop(&mut model, &resolved(0.01, Opt::Adam), &data, &s, &mut obs).unwrap();
    assert_eq!(r.status, Status::Ok);
    for rec in &obs.0[..10] {
        let f = s.schedule.factor(rec.step);
        assert_eq!(rec.lr_factor, f);
        assert!((rec.groups["readout"].lr - 0.01 * f).abs() < 1e-15);
    }
    // Adam's first step moves every coordinate by about lr (times the warmup factor 1/2).
    let u = obs.0[0].groups["readout"].update;
    assert!((u - 0.005).abs() < 1e-6, "update RMS {u}");
    assert_eq!(obs.0[9].groups["readout"].update, 0.0, "the linear schedule ends at factor 0");
}

#[test]
fn non_finite_loss_stops_the_run_with_a_status() {
    let mut t = task();
    t.y[[2, 0]] = f64::NAN;
    let data = TrainData::Regression { train: t, validation: None };
    let mut model = Linear::<f64>::new(&[0.1, 0.1, 0.1]);
    let w0 = model.w();
    let r = run_loop(&mut model, &resolved(0.1, Opt::Sgd), &data, &settings(5), &mut NoObserver).unwrap();
    assert_eq!(r.status, Status::Diverged);
    assert_eq!(r.diverged_at, Some(0));
    assert_eq!(r.losses.len(), 1);
    assert_eq!(model.w(), w0, "no update is applied from a non-finite loss");
}

/// [`Linear`] as a device model would hold it: the "device" copy trains through [`Resident`] with its own
/// optimizer, and the host store the trainer sees is only brought up to date by `sync_host`.
struct OnDevice {
    device: Linear<f64>,
    host: ParamStore<f64>,
    optimizer: std::sync::Mutex<Box<dyn Optimizer<f64>>>,
    grads: Option<Grads<f64>>,
    syncs: usize,
}

impl OnDevice {
    fn new(w: &[f64], hp: &Resolved, s: &LoopSettings) -> Self {
        let device = Linear::<f64>::new(w);
        let optimizer = std::sync::Mutex::new(make_optimizer(device.store(), hp, s).unwrap());
        OnDevice { host: device.store().clone(), device, optimizer, grads: None, syncs: 0 }
    }
}

impl Model<f64> for OnDevice {
    fn store(&self) -> &ParamStore<f64> {
        &self.host
    }
    fn store_mut(&mut self) -> &mut ParamStore<f64> {
        panic!("the trainer must not edit a resident model's host store")
    }
    fn loss_and_grad(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> moe_dmft::Result<StepOutput<f64>> {
        self.device.loss_and_grad(batch, rng)
    }
    fn forward(&self, batch: &Batch, rng: &mut ChaCha8Rng) -> moe_dmft::Result<(f64, Array2<f64>)> {
        self.device.forward(batch, rng)
    }
    fn resident(&mut self) -> Option<&mut dyn Resident> {
        Some(self)
    }
}

impl Resident for OnDevice {
    fn resident_grad(&mut self, batch: &Batch, rng: &mut ChaCha8Rng) -> moe_dmft::Result<ResidentGrad> {
        let out = self.device.loss_and_grad(batch, rng)?;
        let sq = |a: &ndarray::ArrayD<f64>| a.iter().map(|v| v * v).sum::<f64>();
        let (grad_sq, param_sq) = (out.grads.iter().map(sq).collect(), self.device.store.params.iter().map(|p| sq(&p.value)).collect());
        self.grads = Some(out.grads);
        Ok(ResidentGrad { loss: out.loss, aux_loss: out.aux_loss, load: out.load, diagnostics: out.diagnostics, grad_sq, param_sq })
    }
    fn resident_update(&mut self, lr_factor: f64, grad_scale: f64, _betas: (f64, f64), _load: &[LoadStats]) -> moe_dmft::Result<Vec<f64>> {
        let mut grads = self.grads.take().expect("resident_grad before resident_update");
        grads.iter_mut().for_each(|g| g.mapv_inplace(|v| v * grad_scale));
        self.optimizer.get_mut().unwrap().step(&mut self.device.store, &grads, lr_factor)
    }
    fn sync_host(&mut self) -> moe_dmft::Result<()> {
        self.host = self.device.store.clone();
        self.syncs += 1;
        Ok(())
    }
}

#[test]
fn a_resident_model_trains_as_the_host_loop_and_syncs_its_store_once_at_the_end() {
    // The GPU backend's path: the trainer records from the sums of squares the model reports and never
    // touches host tensors until the end. Same arithmetic here, so every record must be identical.
    let t = task();
    let data = TrainData::Regression { train: t.clone(), validation: Some(t) };
    for (opt, clip) in [(Opt::Sgd, None), (Opt::Sgd, Some(0.01)), (Opt::Adam, Some(0.05))] {
        let hp = resolved(0.3, opt);
        let mut s = settings(7);
        s.eval_every = 3;
        s.grad_clip = clip;
        let (mut host_obs, mut dev_obs) = (Collect::default(), Collect::default());
        let mut host_model = Linear::<f64>::new(&[0.5, -0.4, 0.2]);
        let a = run_loop(&mut host_model, &hp, &data, &s, &mut host_obs).unwrap();
        let mut dev_model = OnDevice::new(&[0.5, -0.4, 0.2], &hp, &s);
        let b = run_loop(&mut dev_model, &hp, &data, &s, &mut dev_obs).unwrap();
        assert_eq!(a.losses, b.losses, "{opt:?} {clip:?}");
        assert_eq!(a.val_losses, b.val_losses);
        assert_eq!(host_obs.0.len(), dev_obs.0.len());
        for (x, y) in host_obs.0.iter().zip(&dev_obs.0) {
            assert_eq!((x.grad_norm, &x.groups), (y.grad_norm, &y.groups), "step {}", x.step);
        }
        assert!(clip.is_none() || host_obs.0[0].grad_norm > clip.unwrap(), "the test needs a clipped step");
        assert_eq!(dev_model.syncs, 1);
        assert_eq!(dev_model.store().params[0].value, host_model.store().params[0].value);
    }
}

fn resnet_config(threads: usize, steps: usize) -> TrainConfig {
    let text = format!(
        r#"seed = 5
threads = {threads}
steps = {steps}
precision = "f64"

[model]
arch = "resnet"
input_dim = 4

[model.sizes]
width = 32
depth = 2
experts = 8
active = 2
expert_hidden = 16

[param]
preset = "moe-completep"
optimizer = "sgd"
form = "mean-field"
lr = 0.2

[optim]
eval_every = 5

[data]
kind = "synthetic"
validation_points = 16

[data.task]
points = 16
input_dim = 4
seed = 2
"#
    );
    toml::from_str(&text).unwrap()
}

#[test]
fn train_in_memory_on_the_resnet_is_reproducible_and_learns() {
    let cfg = resnet_config(2, 15);
    let a = train_in_memory::<f64>(&cfg, &mut NoObserver).unwrap();
    let b = train_in_memory::<f64>(&cfg, &mut NoObserver).unwrap();
    assert_eq!(a.result.losses, b.result.losses);
    assert_eq!(a.result.losses.len(), 16);
    assert_eq!(a.summary.status, Status::Ok);
    assert_eq!(a.summary.final_loss, a.result.losses.last().copied());
    assert!(a.result.losses[15] < a.result.losses[0], "{:?}", a.result.losses);
    assert_eq!(a.prepared.config.param.input_dim, 4, "param.input_dim comes from the data");
    // The trained model is returned and gives the recorded final loss on the training set.
    let moe_dmft::train::engine::TrainData::Regression { train, .. } = &a.prepared.data else { unreachable!() };
    let mut rng = moe_dmft::train::engine::stream_rng(0, 9);
    let batch = Batch::Regression { x: train.x.clone(), y: train.y.clone() };
    let (loss, _) = a.model.as_model().forward(&batch, &mut rng).unwrap();
    // Tie-breaks are random only among tied logits, which the trained router no longer has.
    assert!((loss - a.result.losses[15]).abs() < 1e-9 * a.result.losses[15].max(1.0), "{loss} vs {}", a.result.losses[15]);
}

#[test]
fn train_in_memory_on_the_transformer_with_markov_tokens() {
    let text = r#"seed = 0
threads = 2
steps = 8
[model]
arch = "transformer"
vocab = 16
seq_len = 8
n_head = 2
[model.sizes]
width = 16
depth = 1
experts = 4
active = 1
expert_hidden = 16
[param]
optimizer = "adam"
lr = 0.02
[optim]
batch_size = 4
eval_every = 4
[data]
kind = "markov"
vocab_size = 16
branching = 2
length = 500
validation_windows = 4
"#;
    let cfg: TrainConfig = toml::from_str(text).unwrap();
    let r = train_in_memory::<f32>(&cfg, &mut NoObserver).unwrap();
    assert_eq!(r.summary.status, Status::Ok);
    assert_eq!(r.result.losses.len(), 9);
    assert!((r.result.losses[0] - (16f64).ln()).abs() < 0.5, "initial loss near ln(vocab): {}", r.result.losses[0]);
    assert_eq!(r.result.val_losses.iter().map(|v| v.0).collect::<Vec<_>>(), vec![0, 4, 8]);
    assert_eq!(r.summary.loss_convention, moe_dmft::train::engine::TOKEN_LOSS);
}
