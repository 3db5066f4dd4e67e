//! Synthetic tasks through the public API: the validation set is labelled by the same teacher as the
//! training set, and tasks are reproducible from their config alone.

use moe_dmft::data::{make_task, make_task_with_validation, TaskConfig, Teacher};
use moe_dmft::model::Activation;
use ndarray::Array1;
use ndarray_linalg::LeastSquaresSvd;

#[test]
fn validation_labels_come_from_the_training_teacher() {
    // Noise-free tanh single-index teacher: atanh(y) = beta . x / sqrt(D) is linear in x, so beta recovered
    // from the training set must predict the validation labels exactly.
    let cfg = TaskConfig {
        points: 40,
        input_dim: 5,
        teacher: Teacher::SingleIndex { activation: Activation::Tanh },
        noise: 0.0,
        seed: 21,
    };
    let (train, val) = make_task_with_validation(&cfg, 25).unwrap();
    let z: Array1<f64> = train.y.column(0).mapv(f64::atanh);
    let fit = train.x.least_squares(&z).unwrap();
    let residual = (train.x.dot(&fit.solution) - &z).mapv(f64::abs).fold(0.0f64, |a, &b| a.max(b));
    assert!(residual < 1e-8, "training labels are not a tanh of a linear function: {residual}");
    let predicted = val.x.dot(&fit.solution).mapv(f64::tanh);
    let gap = (&predicted - &val.y.column(0)).mapv(f64::abs).fold(0.0f64, |a, &b| a.max(b));
    assert!(gap < 1e-8, "validation labels come from another teacher: max gap {gap}");

    // Another seed is another teacher: the fitted direction no longer predicts its labels.
    let other = make_task(&TaskConfig { seed: 22, ..cfg.clone() }).unwrap();
    let gap = (&other.x.dot(&fit.solution).mapv(f64::tanh) - &other.y.column(0)).mapv(f64::abs).fold(0.0f64, |a, &b| a.max(b));
    assert!(gap > 1e-2);
}

#[test]
fn random_moe_task_depends_only_on_its_config() {
    let teacher = Teacher::RandomMoe { experts: 16, active: 4, hidden: 8, activation: Activation::Gelu };
    let cfg = TaskConfig { points: 32, input_dim: 6, teacher, noise: 0.05, seed: 9 };
    let a = make_task(&cfg).unwrap();
    let b = make_task(&cfg.clone()).unwrap();
    assert_eq!(a, b);
    let (train, val) = make_task_with_validation(&cfg, 10).unwrap();
    assert_eq!(train, a, "a validation set does not change the training set");
    assert_eq!(val.x.dim(), (10, 6));
    // The teacher is a nonlinear function: labels are not explained by a linear fit of the inputs.
    let y: Array1<f64> = a.y.column(0).to_owned();
    let fit = a.x.least_squares(&y).unwrap();
    let resid: f64 = (a.x.dot(&fit.solution) - &y).mapv(|v| v * v).sum();
    let total: f64 = y.mapv(|v| v * v).sum();
    assert!(resid > 0.05 * total, "random-MoE labels look linear: {resid} of {total}");
}
