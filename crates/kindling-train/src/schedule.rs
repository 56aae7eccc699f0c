//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay
//! (HF `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup`).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// `[train.schedule]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Steps of linear warmup from 0 to the peak rate.
    pub warmup_steps: u64,
    /// The rate decays to `min_lr_ratio * lr` (0: to zero, as HF does).
    pub min_lr_ratio: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            kind: ScheduleKind::Linear,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
        }
    }
}

impl Schedule {
    /// The rate for the update at `step` (0-based) of `total` steps, peaking at `peak`.
    pub fn lr(&self, step: u64, total: u64, peak: f64) -> f64 {
        if step < self.warmup_steps {
            return peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay_steps = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        let floor = peak * self.min_lr_ratio;
        match self.kind {
            ScheduleKind::Constant => peak,
            ScheduleKind::Linear => floor + (peak - floor) * (1.0 - progress),
            ScheduleKind::Cosine => {
                floor + (peak - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_rises_linearly_then_cosine_decays_to_the_floor() {
        let s = Schedule {
            kind: ScheduleKind::Cosine,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
        };
        assert!((s.lr(0, 110, 1.0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9, 110, 1.0) - 1.0).abs() < 1e-12);
        assert!((s.lr(10, 110, 1.0) - 1.0).abs() < 1e-12);
        assert!((s.lr(60, 110, 1.0) - 0.55).abs() < 1e-12);
        assert!((s.lr(110, 110, 1.0) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn linear_decays_to_zero_by_default() {
        let s = Schedule::default();
        assert_eq!(s.lr(0, 100, 2.0), 2.0);
        assert!((s.lr(50, 100, 2.0) - 1.0).abs() < 1e-12);
        assert_eq!(s.lr(100, 100, 2.0), 0.0);
    }
}
