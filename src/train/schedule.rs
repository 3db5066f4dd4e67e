//! Learning-rate schedules: a factor in (0, 1] that multiplies every group's learning rate, so the
//! per-group ratios fixed by the parameterization survive the schedule.

use serde::{Deserialize, Serialize};

/// Shape of the schedule after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Factor 1 after warmup.
    #[default]
    Constant,
    /// Half-cosine from 1 down to `final_fraction` at the last step.
    Cosine,
    /// Straight line from 1 down to `final_fraction` at the last step.
    Linear,
}

/// A learning-rate schedule over `steps` optimizer steps (steps are counted from 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Number of linear warmup steps: the factor is (step + 1) / warmup during them, so the first step
    /// already moves the weights.
    pub warmup: usize,
    /// Factor reached at the last step by the decaying schedules.
    pub final_fraction: f64,
    /// Total number of steps of the run.
    pub steps: usize,
}

impl Schedule {
    pub fn constant(steps: usize) -> Self {
        Schedule { kind: ScheduleKind::Constant, warmup: 0, final_fraction: 1.0, steps }
    }

    pub fn validate(&self) -> crate::Result<()> {
        if self.warmup > self.steps {
            return Err(crate::Error::invalid("optim.warmup", "must not exceed `steps`"));
        }
        if !(self.final_fraction.is_finite() && (0.0..=1.0).contains(&self.final_fraction)) {
            return Err(crate::Error::invalid("optim.final_lr_fraction", "must lie in [0, 1]"));
        }
        Ok(())
    }

    /// Learning-rate factor of step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup {
            return (step + 1) as f64 / self.warmup as f64;
        }
        let decay_steps = self.steps.saturating_sub(self.warmup);
        // Progress 0 at the first post-warmup step and 1 at the last step of the run.
        let progress = if decay_steps <= 1 {
            0.0
        } else {
            ((step - self.warmup) as f64 / (decay_steps - 1) as f64).min(1.0)
        };
        let floor = self.final_fraction;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Cosine => floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            ScheduleKind::Linear => floor + (1.0 - floor) * (1.0 - progress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use approx::assert_abs_diff_eq;

    #[test]
    fn constant_is_one_after_warmup() {
        let s = Schedule { kind: ScheduleKind::Constant, warmup: 4, final_fraction: 0.0, steps: 10 };
        let f: Vec<f64> = (0..10).map(|t| s.factor(t)).collect();
        assert_eq!(&f[..5], &[0.25, 0.5, 0.75, 1.0, 1.0]);
        assert!(f[5..].iter().all(|&x| x == 1.0));
    }

    #[test]
    fn cosine_hits_known_values() {
        // 2 warmup steps, then 5 decay steps with progress 0, 1/4, 1/2, 3/4, 1.
        let s = Schedule { kind: ScheduleKind::Cosine, warmup: 2, final_fraction: 0.1, steps: 7 };
        assert_abs_diff_eq!(s.factor(0), 0.5);
        assert_abs_diff_eq!(s.factor(1), 1.0);
        assert_abs_diff_eq!(s.factor(2), 1.0);
        assert_abs_diff_eq!(s.factor(3), 0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos()), epsilon = 1e-12);
        assert_abs_diff_eq!(s.factor(4), 0.55, epsilon = 1e-12);
        assert_abs_diff_eq!(s.factor(6), 0.1, epsilon = 1e-12);
    }

    #[test]
    fn linear_hits_known_values() {
        let s = Schedule { kind: ScheduleKind::Linear, warmup: 0, final_fraction: 0.0, steps: 5 };
        let f: Vec<f64> = (0..5).map(|t| s.factor(t)).collect();
        for (a, b) in f.iter().zip([1.0, 0.75, 0.5, 0.25, 0.0]) {
            assert_abs_diff_eq!(*a, b, epsilon = 1e-12);
        }
    }

    #[test]
    fn bad_schedules_are_rejected() {
        let s = Schedule { kind: ScheduleKind::Linear, warmup: 6, final_fraction: 0.0, steps: 5 };
        assert!(matches!(s.validate(), Err(crate::Error::Invalid { field, .. }) if field == "optim.warmup"));
        let s = Schedule { kind: ScheduleKind::Linear, warmup: 0, final_fraction: 1.5, steps: 5 };
        assert!(s.validate().is_err());
    }
}
