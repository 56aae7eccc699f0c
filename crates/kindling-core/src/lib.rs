//! Small pieces every Kindling crate shares.
//!
//! * [`rng`]: counter-based seeding. Every random draw in Kindling (masks, augmentations, data
//!   order, initialisation, dropout) is a pure function of `(seed, what, where)`, never of a
//!   thread's or a process's history. That is what makes masks identical on 1 or 16 threads and
//!   after a restart.
//! * [`Mode`]: train versus eval, passed explicitly to every `forward_t`.

pub mod rng;

/// Whether a forward pass trains (dropout on, drawn from `seed`) or evaluates (dropout off).
///
/// The seed travels with the mode so that a training step is a pure function of its inputs:
/// the trainer derives it from `(run seed, step, micro-batch)`, which keeps resume exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Eval,
    Train { seed: u64 },
}

impl Mode {
    pub fn is_train(&self) -> bool {
        matches!(self, Mode::Train { .. })
    }
}
