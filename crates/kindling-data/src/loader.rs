//! Batches of masked blocks, in a seeded order per epoch, built in parallel ahead of the trainer.

use std::collections::VecDeque;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use kindling_core::rng::{self, domain};

use crate::masking::Masker;
use crate::packing::Blocks;

/// Where the data stream stands: the epoch, and how many blocks of its shuffled order were
/// consumed. Saving it (a few bytes) is all a resume needs: no batches are replayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: u64,
}

/// A batch of masked blocks, flat and tensor-free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlmBatch {
    pub batch_size: usize,
    pub seq_len: usize,
    /// (batch_size * seq_len) corrupted input ids.
    pub input_ids: Vec<u32>,
    /// Flat positions `b * seq_len + t` that carry a label, ascending.
    pub positions: Vec<u32>,
    /// The original ids at `positions`.
    pub labels: Vec<u32>,
    /// The cursor after this batch: resume from here to continue with the next one.
    pub cursor_after: Cursor,
}

impl MlmBatch {
    pub fn n_tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }

    /// Masks the given blocks (by index into `blocks`) as seen in `epoch` into one batch, in
    /// order, on the calling thread: the loader builds several batches at once in parallel.
    fn build(
        blocks: &dyn Blocks,
        masker: &Masker,
        indices: &[u32],
        epoch: u64,
        cursor_after: Cursor,
    ) -> Self {
        let t = blocks.seq_len();
        let mut out = masker.empty_output(indices.len() * t);
        let (mut ids, mut flags) = (vec![0u32; t], vec![0u8; t]);
        for &i in indices {
            blocks.read_block(i as usize, &mut ids, &mut flags);
            masker.mask_into(&ids, &flags, epoch, i as u64, &mut out);
        }
        MlmBatch {
            batch_size: indices.len(),
            seq_len: t,
            input_ids: out.input_ids,
            positions: out.positions,
            labels: out.labels,
            cursor_after,
        }
    }
}

/// Training batches masked per parallel round (at least; one per thread where there are more),
/// a batch per rayon task. One round per batch of 32 would wake the thread pool for ~60 us of
/// masking, and the wake-up costs about as much: the two-thread loader was slower than one
/// thread. Masks depend only on (seed, epoch, block), so building ahead changes nothing in what
/// the batches hold.
const BATCHES_PER_ROUND: usize = 8;

/// A seeded permutation of `0..n` computed one index at a time, in O(1) memory: a 4-round Feistel
/// network over the smallest even-bit domain holding `n`, with cycle-walking back into `0..n`
/// (Black and Rogaway, 2002). Streaming corpora use it instead of a shuffled index table, which
/// costs 4 bytes per block (700 MB for a 100 GB corpus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyedPermutation {
    n: u64,
    half_bits: u32,
    key: u64,
}

impl KeyedPermutation {
    pub fn new(n: u64, key: u64) -> Self {
        let bits = (64 - n.saturating_sub(1).leading_zeros()).max(2);
        KeyedPermutation {
            n,
            half_bits: bits.div_ceil(2),
            key,
        }
    }

    /// The image of `i` (`i < n`).
    pub fn apply(&self, i: u64) -> u64 {
        debug_assert!(i < self.n);
        let mask = (1u64 << self.half_bits) - 1;
        let mut x = i;
        loop {
            let (mut l, mut r) = (x >> self.half_bits, x & mask);
            for round in 0..4u64 {
                let f = rng::mix64(self.key ^ round.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ r) & mask;
                (l, r) = (r, l ^ f);
            }
            x = (l << self.half_bits) | r;
            // The domain is under 4n, so this takes under 4 rounds on average.
            if x < self.n {
                return x;
            }
        }
    }
}

/// The visiting order of one epoch.
enum Order {
    /// A shuffled table of block indices (in-memory corpora).
    Table(Vec<u32>),
    /// Computed per position (streamed corpora).
    Keyed(KeyedPermutation),
}

impl Order {
    fn len(&self) -> usize {
        match self {
            Order::Table(t) => t.len(),
            Order::Keyed(p) => p.n as usize,
        }
    }
    fn at(&self, k: usize) -> u32 {
        match self {
            Order::Table(t) => t[k],
            Order::Keyed(p) => p.apply(k as u64) as u32,
        }
    }
}

/// An endless stream of training batches: each epoch visits every block once in a seeded
/// order (the incomplete last batch of an epoch is dropped, as `drop_last` does).
pub struct MlmLoader {
    blocks: Arc<dyn Blocks>,
    masker: Arc<Masker>,
    batch_size: usize,
    seed: u64,
    cursor: Cursor,
    order: Order,
    keyed: bool,
    /// Batches built ahead of `cursor`, and the cursor after the last of them; `order` is the
    /// permutation of `made.epoch`.
    ahead: VecDeque<MlmBatch>,
    made: Cursor,
}

impl MlmLoader {
    /// Starts at `cursor` (the default cursor for a fresh run). Panics if there are fewer
    /// blocks than one batch: the recipe checks that first.
    pub fn new(
        blocks: Arc<dyn Blocks>,
        masker: Arc<Masker>,
        batch_size: usize,
        seed: u64,
        cursor: Cursor,
    ) -> Self {
        assert!(
            batch_size > 0 && blocks.len() >= batch_size,
            "fewer blocks than one batch"
        );
        let mut loader = MlmLoader {
            blocks,
            masker,
            batch_size,
            seed,
            cursor,
            order: Order::Table(Vec::new()),
            keyed: false,
            ahead: VecDeque::new(),
            made: cursor,
        };
        loader.order = loader.order_of(cursor.epoch);
        loader
    }

    /// Visits the blocks in a [`KeyedPermutation`] order instead of a shuffled table: memory
    /// independent of the number of blocks (for corpora streamed from token shards).
    pub fn with_keyed_order(mut self) -> Self {
        self.keyed = true;
        self.order = self.order_of(self.made.epoch);
        self
    }

    fn order_of(&self, epoch: u64) -> Order {
        if self.keyed {
            let key = rng::derive_seed(&[domain::DATA_ORDER, self.seed, epoch]);
            return Order::Keyed(KeyedPermutation::new(self.blocks.len() as u64, key));
        }
        let mut order: Vec<u32> = (0..self.blocks.len() as u32).collect();
        order.shuffle(&mut rng::rng(&[domain::DATA_ORDER, self.seed, epoch]));
        Order::Table(order)
    }

    /// The permutation of block indices for `epoch`, as a table.
    pub fn epoch_order(&self, epoch: u64) -> Vec<u32> {
        match self.order_of(epoch) {
            Order::Table(t) => t,
            Order::Keyed(p) => (0..p.n).map(|i| p.apply(i) as u32).collect(),
        }
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.blocks.len() / self.batch_size
    }

    /// The number of blocks an epoch visits.
    pub fn blocks_len(&self) -> usize {
        self.blocks.len()
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Continues from `cursor` (a resumed run): the batches after it are exactly those a run
    /// straight through would see.
    pub fn seek(&mut self, cursor: Cursor) {
        self.cursor = cursor;
        self.made = cursor;
        self.ahead.clear();
        self.order = self.order_of(cursor.epoch);
    }
}

impl MlmLoader {
    /// Builds the next [`BATCHES_PER_ROUND`] batches (or one per thread), in parallel, a batch
    /// per task.
    fn build_round(&mut self) {
        let round = BATCHES_PER_ROUND.max(rayon::current_num_threads());
        let mut plans = Vec::with_capacity(round);
        for _ in 0..round {
            if self.made.position as usize + self.batch_size > self.order.len() {
                self.made = Cursor {
                    epoch: self.made.epoch + 1,
                    position: 0,
                };
                self.order = self.order_of(self.made.epoch);
            }
            let start = self.made.position as usize;
            let indices: Vec<u32> = (start..start + self.batch_size)
                .map(|k| self.order.at(k))
                .collect();
            let epoch = self.made.epoch;
            self.made = Cursor {
                epoch,
                position: (start + self.batch_size) as u64,
            };
            plans.push((indices, epoch, self.made));
        }
        let (blocks, masker) = (self.blocks.as_ref(), self.masker.as_ref());
        let built: Vec<MlmBatch> = plans
            .par_iter()
            .map(|(indices, epoch, after)| MlmBatch::build(blocks, masker, indices, *epoch, *after))
            .collect();
        self.ahead.extend(built);
    }
}

impl Iterator for MlmLoader {
    type Item = MlmBatch;

    fn next(&mut self) -> Option<MlmBatch> {
        if self.ahead.is_empty() {
            self.build_round();
        }
        let batch = self.ahead.pop_front()?;
        self.cursor = batch.cursor_after;
        Some(batch)
    }
}

/// The fixed evaluation batches: blocks in order, masks drawn once from a reserved epoch, so
/// every evaluation of a run scores the same positions.
pub fn eval_batches(blocks: &dyn Blocks, masker: &Masker, batch_size: usize) -> Vec<MlmBatch> {
    eval_batches_up_to(blocks, masker, batch_size, 0)
}

/// The first `max_batches` of [`eval_batches`] (0: all), without building the rest: a held-out
/// split streamed from shards can hold millions of blocks.
pub fn eval_batches_up_to(
    blocks: &dyn Blocks,
    masker: &Masker,
    batch_size: usize,
    max_batches: usize,
) -> Vec<MlmBatch> {
    const EVAL_EPOCH: u64 = u64::MAX;
    let n = match max_batches {
        0 => blocks.len(),
        m => blocks.len().min(m * batch_size.max(1)),
    };
    let indices: Vec<u32> = (0..n as u32).collect();
    indices
        .par_chunks(batch_size.max(1))
        .map(|c| MlmBatch::build(blocks, masker, c, EVAL_EPOCH, Cursor::default()))
        .collect()
}

/// Runs an iterator on a background thread, keeping up to `depth` items ready, so batch
/// building overlaps the training step. Dropping the `Prefetch` stops the thread.
pub struct Prefetch<T> {
    rx: Option<Receiver<T>>,
    handle: Option<JoinHandle<()>>,
}

impl<T: Send + 'static> Prefetch<T> {
    pub fn new<I>(iter: I, depth: usize) -> Self
    where
        I: Iterator<Item = T> + Send + 'static,
    {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("kindling-prefetch".into())
            .spawn(move || {
                for item in iter {
                    if tx.send(item).is_err() {
                        break; // consumer gone
                    }
                }
            })
            .expect("spawning the prefetch thread");
        Prefetch {
            rx: Some(rx),
            handle: Some(handle),
        }
    }
}

impl<T> Iterator for Prefetch<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl<T> Drop for Prefetch<T> {
    fn drop(&mut self) {
        // Close the channel first so a producer blocked on a full queue wakes up and exits.
        drop(self.rx.take());
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every index appears exactly once, for any size; the order is the key's; different keys
    /// (epochs) give different orders; and it is not the identity.
    #[test]
    fn keyed_permutation_is_a_seeded_bijection() {
        for n in [1u64, 2, 3, 7, 64, 1000, 4097, 100_003] {
            let p = KeyedPermutation::new(n, 42);
            let mut seen = vec![false; n as usize];
            for i in 0..n {
                let j = p.apply(i);
                assert!(j < n && !seen[j as usize], "n {n}: {i} -> {j}");
                seen[j as usize] = true;
            }
            assert_eq!(p.apply(n - 1), KeyedPermutation::new(n, 42).apply(n - 1));
        }
        let (a, b) = (
            KeyedPermutation::new(1000, 1),
            KeyedPermutation::new(1000, 2),
        );
        let moved = (0..1000).filter(|&i| a.apply(i) != i).count();
        let differ = (0..1000).filter(|&i| a.apply(i) != b.apply(i)).count();
        assert!(moved > 900 && differ > 900, "{moved} {differ}");
    }
}
