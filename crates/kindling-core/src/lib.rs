//! Small pieces every Kindling crate shares.
//!
//! * [`rng`]: counter-based seeding. Every random draw in Kindling (masks, augmentations, data
//!   order, initialisation, dropout) is a pure function of `(seed, what, where)`, never of a
//!   thread's or a process's history. That is what makes masks identical on 1 or 16 threads and
//!   after a restart.
//! * [`Mode`]: train versus eval, passed explicitly to every `forward_t`.
//! * [`attach`]: a value computed without a backward pass, made differentiable.

pub mod attach;
pub mod rng;

/// Tells glibc's allocator to keep freed memory for reuse instead of returning it to the kernel.
///
/// A training step allocates and frees activation-sized buffers (megabytes each) by the hundred.
/// By default glibc serves those with fresh `mmap`s, so every step pays page faults and kernel
/// zeroing for all of them: measured at 7-10% of a bert-mini step on 2 cores. Raising the mmap
/// and trim thresholds makes them come from the heap and be reused. Costs nothing but a heap that
/// keeps its high-water mark. Call once, early in `main`; a no-op off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}

/// Memory the kernel says can be allocated without swapping (`MemAvailable` in
/// /proc/meminfo), in bytes; None where that is not known.
pub fn available_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

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
