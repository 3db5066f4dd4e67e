//! Data: seeded synthetic teacher tasks (Gaussian inputs; single-index and random-MoE teachers) and
//! character-level text (the Shakespeare corpus of SPEC §8) with a train/validation split.
//!
//! CONTRACT: [`Task`], [`TaskConfig`] and [`make_task`] are shared by `train`, `dmft` and `check`.

pub mod text;

use ndarray::{Array1, Array2, ArrayView1};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::model::Activation;

/// A regression task: inputs `x` (P x D) and targets `y` (P x outputs).
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub x: Array2<f64>,
    pub y: Array2<f64>,
}

/// The function that labels the Gaussian inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Teacher {
    /// y = activation(beta . x / sqrt(D)) with beta ~ N(0, I).
    SingleIndex { activation: Activation },
    /// A random MoE block on the inputs: logits `r = R x / sqrt(D)` (R ~ N(0, I)), the `active` experts
    /// with the largest logits, softmax gates renormalized over them, and expert outputs
    /// `z_e = v_e . activation(U_e x / sqrt(D)) / sqrt(hidden)` (U_e, v_e ~ N(0, I)); `y = sum_e g_e z_e`.
    RandomMoe { experts: usize, active: usize, hidden: usize, activation: Activation },
}

impl Default for Teacher {
    fn default() -> Self {
        Teacher::SingleIndex { activation: Activation::Tanh }
    }
}

/// A seeded synthetic task: `points` Gaussian inputs in `input_dim` dimensions labelled by a teacher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    pub points: usize,
    pub input_dim: usize,
    pub teacher: Teacher,
    /// Standard deviation of Gaussian label noise.
    pub noise: f64,
    pub seed: u64,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig { points: 16, input_dim: 8, teacher: Teacher::default(), noise: 0.0, seed: 0 }
    }
}

impl TaskConfig {
    pub fn validate(&self) -> crate::Result<()> {
        if self.points == 0 {
            return Err(crate::Error::invalid("task.points", "must be at least 1"));
        }
        if self.input_dim == 0 {
            return Err(crate::Error::invalid("task.input_dim", "must be at least 1"));
        }
        if !(self.noise.is_finite() && self.noise >= 0.0) {
            return Err(crate::Error::invalid("task.noise", "must be finite and non-negative"));
        }
        if let Teacher::RandomMoe { experts, active, hidden, .. } = self.teacher {
            if experts == 0 {
                return Err(crate::Error::invalid("task.teacher.experts", "must be at least 1"));
            }
            if active == 0 || active > experts {
                return Err(crate::Error::invalid("task.teacher.active", "must lie in 1..=experts"));
            }
            if hidden == 0 {
                return Err(crate::Error::invalid("task.teacher.hidden", "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// A teacher with its random parameters drawn: it labels any input.
enum DrawnTeacher {
    SingleIndex { beta: Array1<f64>, activation: Activation },
    RandomMoe { router: Array2<f64>, up: Vec<Array2<f64>>, down: Vec<Array1<f64>>, active: usize, activation: Activation },
}

impl DrawnTeacher {
    fn draw(teacher: &Teacher, d: usize, rng: &mut ChaCha8Rng) -> Self {
        let mut gauss = |shape: (usize, usize)| Array2::from_shape_simple_fn(shape, || StandardNormal.sample(&mut *rng));
        match *teacher {
            Teacher::SingleIndex { activation } => {
                DrawnTeacher::SingleIndex { beta: gauss((1, d)).into_shape_with_order(d).expect("1 x d"), activation }
            }
            Teacher::RandomMoe { experts, active, hidden, activation } => {
                let router = gauss((experts, d));
                let up = (0..experts).map(|_| gauss((hidden, d))).collect();
                let down = (0..experts).map(|_| gauss((1, hidden)).into_shape_with_order(hidden).expect("1 x n")).collect();
                DrawnTeacher::RandomMoe { router, up, down, active, activation }
            }
        }
    }

    fn label(&self, x: ArrayView1<f64>) -> f64 {
        let scale = 1.0 / (x.len() as f64).sqrt();
        match self {
            DrawnTeacher::SingleIndex { beta, activation } => activation.apply(beta.dot(&x) * scale),
            DrawnTeacher::RandomMoe { router, up, down, active, activation } => {
                let logits = router.dot(&x) * scale;
                let mut order: Vec<usize> = (0..logits.len()).collect();
                // Gaussian logits never tie, so the order (and the task) is the same on every machine.
                order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
                let chosen = &order[..*active];
                let top = logits[chosen[0]];
                let weights: Vec<f64> = chosen.iter().map(|&e| (logits[e] - top).exp()).collect();
                let total: f64 = weights.iter().sum();
                chosen
                    .iter()
                    .zip(&weights)
                    .map(|(&e, w)| {
                        let hidden = up[e].dot(&x).mapv(|u| activation.apply(u * scale));
                        w / total * down[e].dot(&hidden) / (hidden.len() as f64).sqrt()
                    })
                    .sum()
            }
        }
    }

    fn label_all(&self, x: &Array2<f64>) -> Array2<f64> {
        Array2::from_shape_fn((x.nrows(), 1), |(mu, _)| self.label(x.row(mu)))
    }
}

/// Generates the task; the same config gives the same task on every machine.
pub fn make_task(cfg: &TaskConfig) -> crate::Result<Task> {
    Ok(make_task_with_validation(cfg, 0)?.0)
}

/// Generates the task of [`make_task`] (identical: same seed, same draws) together with `validation_points`
/// fresh inputs labelled by the same teacher and the same noise level, drawn from a separate random
/// stream so that adding a validation set never changes the training set.
pub fn make_task_with_validation(cfg: &TaskConfig, validation_points: usize) -> crate::Result<(Task, Task)> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (p, d) = (cfg.points, cfg.input_dim);
    let x = Array2::from_shape_simple_fn((p, d), || StandardNormal.sample(&mut rng));
    let teacher = DrawnTeacher::draw(&cfg.teacher, d, &mut rng);
    let y = teacher.label_all(&x);
    let noise: Array2<f64> = Array2::from_shape_simple_fn(y.raw_dim(), || StandardNormal.sample(&mut rng));
    let train = Task { x, y: y + noise * cfg.noise };

    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    rng.set_stream(1);
    let x = Array2::from_shape_simple_fn((validation_points, d), || StandardNormal.sample(&mut rng));
    let y = teacher.label_all(&x);
    let noise: Array2<f64> = Array2::from_shape_simple_fn(y.raw_dim(), || StandardNormal.sample(&mut rng));
    Ok((train, Task { x, y: y + noise * cfg.noise }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The single-index task as the first version of `make_task` generated it, written out, so that
    /// refactoring the generator cannot silently change tasks others have recorded results on.
    fn single_index_reference(cfg: &TaskConfig) -> Task {
        let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let (p, d) = (cfg.points, cfg.input_dim);
        let x = Array2::from_shape_simple_fn((p, d), || StandardNormal.sample(&mut rng));
        let beta: Vec<f64> = (0..d).map(|_| StandardNormal.sample(&mut rng)).collect();
        let y = Array2::from_shape_fn((p, 1), |(mu, _)| {
            let z: f64 = (0..d).map(|i| beta[i] * x[[mu, i]]).sum::<f64>() / (d as f64).sqrt();
            z.tanh()
        });
        let noise: Array2<f64> = Array2::from_shape_simple_fn(y.raw_dim(), || StandardNormal.sample(&mut rng));
        Task { x, y: y + noise * cfg.noise }
    }

    #[test]
    fn single_index_task_is_unchanged_and_validation_leaves_it_alone() {
        let cfg = TaskConfig { points: 12, input_dim: 5, noise: 0.1, seed: 7, ..Default::default() };
        let reference = single_index_reference(&cfg);
        let task = make_task(&cfg).unwrap();
        assert!(task.x.abs_diff_eq(&reference.x, 1e-15) && task.y.abs_diff_eq(&reference.y, 1e-12));
        let (train, val) = make_task_with_validation(&cfg, 9).unwrap();
        assert_eq!(train, task);
        assert_eq!(val.x.dim(), (9, 5));
        assert_eq!(val.y.dim(), (9, 1));
        assert!(val.x.row(0) != task.x.row(0), "validation inputs must be fresh draws");
    }

    #[test]
    fn random_moe_teacher_is_seeded_and_uses_its_experts() {
        let teacher = Teacher::RandomMoe { experts: 8, active: 2, hidden: 16, activation: Activation::Relu };
        let cfg = TaskConfig { points: 64, input_dim: 6, teacher, noise: 0.0, seed: 3 };
        let a = make_task(&cfg).unwrap();
        assert_eq!(a, make_task(&cfg).unwrap());
        let b = make_task(&TaskConfig { seed: 4, ..cfg.clone() }).unwrap();
        assert!(a.y != b.y);
        // Labels are O(1): nonzero spread, no blow-up with the 1/sqrt fan-in scalings.
        let mean = a.y.mean().unwrap();
        let sd = a.y.mapv(|v| (v - mean).powi(2)).mean().unwrap().sqrt();
        assert!(sd > 0.05 && sd < 5.0, "label std {sd}");
        // Hand computation with the draws in their documented order: x, router, up_e, down_e.
        let (p, d, m, n) = (5, 3, 3, 4);
        let two = TaskConfig {
            points: p,
            input_dim: d,
            teacher: Teacher::RandomMoe { experts: m, active: 2, hidden: n, activation: Activation::Tanh },
            noise: 0.0,
            seed: 11,
        };
        let t = make_task(&two).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut g = |r: usize, c: usize| Array2::<f64>::from_shape_simple_fn((r, c), || StandardNormal.sample(&mut rng));
        let x = g(p, d);
        let router = g(m, d);
        let up: Vec<Array2<f64>> = (0..m).map(|_| g(n, d)).collect();
        let down: Vec<Array2<f64>> = (0..m).map(|_| g(1, n)).collect();
        let s = 1.0 / (d as f64).sqrt();
        for mu in 0..p {
            let r: Vec<f64> = (0..m).map(|e| router.row(e).dot(&x.row(mu)) * s).collect();
            let mut idx: Vec<usize> = (0..m).collect();
            idx.sort_by(|&a, &b| r[b].partial_cmp(&r[a]).unwrap());
            let (e1, e2) = (idx[0], idx[1]);
            let z = |e: usize| {
                let h = up[e].dot(&x.row(mu)).mapv(|u| (u * s).tanh());
                down[e].row(0).dot(&h) / (n as f64).sqrt()
            };
            let g1 = 1.0 / (1.0 + (r[e2] - r[e1]).exp());
            let expected = g1 * z(e1) + (1.0 - g1) * z(e2);
            assert!((t.y[[mu, 0]] - expected).abs() < 1e-12, "sample {mu}: {} vs {expected}", t.y[[mu, 0]]);
        }
    }

    #[test]
    fn bad_teachers_name_the_field() {
        let bad = |teacher| TaskConfig { teacher, ..Default::default() }.validate().unwrap_err().to_string();
        let act = Activation::Relu;
        assert!(bad(Teacher::RandomMoe { experts: 4, active: 5, hidden: 2, activation: act }).contains("task.teacher.active"));
        assert!(bad(Teacher::RandomMoe { experts: 0, active: 0, hidden: 2, activation: act }).contains("task.teacher.experts"));
        assert!(bad(Teacher::RandomMoe { experts: 4, active: 1, hidden: 0, activation: act }).contains("task.teacher.hidden"));
    }
}
