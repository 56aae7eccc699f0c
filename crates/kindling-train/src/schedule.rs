//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay
//! (HF `get_linear_schedule_with_warmup` / `get_cosine_schedule_with_warmup`), or
//! warmup-stable-decay (`wsd`: the peak rate held, then a linear decay over the last
//! `decay_fraction` of the steps; Hu et al., 2024, MiniCPM). A short run that must escape the
//! unigram plateau of masked LM needs its peak rate for long; `wsd` keeps it. The `wsd` decay is
//! linear or `1-sqrt` (Hägele et al., 2024: the rate falls fast, then spends long near zero;
//! it beat the linear cooldown of the same length in their runs).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Constant,
    #[default]
    Linear,
    Cosine,
    Wsd,
}

/// The shape of the `wsd` decay: the rate factor as the decay goes from start (x = 0) to end (1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum DecayShape {
    /// `1 - x`.
    #[default]
    #[serde(rename = "linear")]
    Linear,
    /// `1 - sqrt(x)`.
    #[serde(rename = "1-sqrt")]
    OneMinusSqrt,
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
    /// `wsd` only: the fraction of all steps spent decaying at the end.
    pub decay_fraction: f64,
    /// `wsd` only: `"linear"` or `"1-sqrt"`.
    pub decay_shape: DecayShape,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            kind: ScheduleKind::Linear,
            warmup_steps: 0,
            min_lr_ratio: 0.0,
            decay_fraction: 0.2,
            decay_shape: DecayShape::Linear,
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
            ScheduleKind::Wsd => {
                let decay = (self.decay_fraction.clamp(0.0, 1.0) * total as f64).max(1.0);
                let left = (total.saturating_sub(step)) as f64;
                let x = 1.0 - (left / decay).min(1.0);
                let factor = match self.decay_shape {
                    DecayShape::Linear => 1.0 - x,
                    DecayShape::OneMinusSqrt => 1.0 - x.sqrt(),
                };
                floor + (peak - floor) * factor
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
            ..Default::default()
        };
        assert!((s.lr(0, 110, 1.0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9, 110, 1.0) - 1.0).abs() < 1e-12);
        assert!((s.lr(10, 110, 1.0) - 1.0).abs() < 1e-12);
        assert!((s.lr(60, 110, 1.0) - 0.55).abs() < 1e-12);
        assert!((s.lr(110, 110, 1.0) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn wsd_holds_the_peak_then_decays_linearly_over_the_last_fraction() {
        let s = Schedule {
            kind: ScheduleKind::Wsd,
            warmup_steps: 10,
            decay_fraction: 0.25,
            ..Default::default()
        };
        assert!((s.lr(4, 100, 1.0) - 0.5).abs() < 1e-12);
        assert_eq!(s.lr(10, 100, 1.0), 1.0);
        assert_eq!(s.lr(75, 100, 1.0), 1.0);
        assert!((s.lr(90, 100, 1.0) - 0.4).abs() < 1e-12);
        assert_eq!(s.lr(100, 100, 1.0), 0.0);
    }

    #[test]
    fn wsd_one_minus_sqrt_falls_fast_then_lingers_near_the_floor() {
        let s = Schedule {
            kind: ScheduleKind::Wsd,
            decay_fraction: 0.5,
            decay_shape: DecayShape::OneMinusSqrt,
            ..Default::default()
        };
        assert_eq!(s.lr(50, 100, 1.0), 1.0);
        // A quarter of the way into the decay the rate is already halved (linear: 0.75).
        assert!((s.lr(125, 200, 1.0) - 0.5).abs() < 1e-12);
        assert!((s.lr(75, 100, 1.0) - (1.0 - 0.5f64.sqrt())).abs() < 1e-12);
        assert!((s.lr(96, 100, 1.0) - (1.0 - 0.92f64.sqrt())).abs() < 1e-12);
        assert_eq!(s.lr(100, 100, 1.0), 0.0);
    }

    #[test]
    fn schedule_parses_from_recipe_toml() {
        let s: Schedule =
            toml::from_str("kind = \"wsd\"\ndecay_fraction = 0.5\ndecay_shape = \"1-sqrt\"")
                .unwrap();
        assert_eq!(s.decay_shape, DecayShape::OneMinusSqrt);
        assert!(toml::from_str::<Schedule>("decay_shape = \"cosine\"").is_err());
    }

    #[test]
    fn linear_decays_to_zero_by_default() {
        let s = Schedule::default();
        assert_eq!(s.lr(0, 100, 2.0), 2.0);
        assert!((s.lr(50, 100, 2.0) - 1.0).abs() < 1e-12);
        assert_eq!(s.lr(100, 100, 2.0), 0.0);
    }
}
