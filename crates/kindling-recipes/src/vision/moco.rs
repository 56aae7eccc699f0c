//! MoCo v2 (Chen et al., 2020): queries from the online encoder and projector, keys from a
//! momentum copy of them, and a queue of past keys as the negatives: many negatives without a
//! large batch. Symmetric form (each view is the query once), as solo-learn trains it.
//!
//! The queue is a VarMap entry (so checkpoints carry it, and resume is exact) that the optimiser
//! does not touch. Keys of a step are enqueued after its update (`after_update`): writing them
//! during the step would change a tensor the backward pass still reads.
//!
//! No shuffled BatchNorm: the paper shuffles samples across GPUs so the key encoder's BatchNorm
//! cannot leak which key is the positive; with both views passed separately the leak is small,
//! and the kNN/probe numbers show whether it matters. Data parallel, every rank enqueues the
//! whole group's keys, so the queues stay equal and the loss is the global batch's.

use std::sync::Mutex;

use candle_core::{Result, Tensor, Var, D};
use candle_nn::VarBuilder;

use serde::{Deserialize, Serialize};

use super::{l2_normalize, Outputs, SslLoss};

/// `[loss]` of a MoCo recipe.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Softmax temperature of InfoNCE.
    pub temperature: f64,
    /// Negatives kept (past keys).
    pub queue_size: usize,
    /// Key-encoder momentum, raised from `ema_base` to `ema_final` on a cosine schedule.
    pub ema_base: f64,
    pub ema_final: f64,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            temperature: 0.2,
            queue_size: 4096,
            ema_base: 0.99,
            ema_final: 1.0,
        }
    }
}

impl Settings {
    pub fn check(&self) -> std::result::Result<(), (&'static str, String)> {
        super::positive("temperature", self.temperature)?;
        if self.queue_size == 0 {
            return Err(("queue_size", "must be at least 1".into()));
        }
        super::momentum(self.ema_base, self.ema_final)
    }
}

pub struct MoCo {
    pub temperature: f64,
    /// (queue_size, dim) normalised keys.
    queue: Var,
    /// The next row to overwrite (a one-element tensor, so it is checkpointed with the queue).
    ptr: Var,
    pending: Mutex<Option<Tensor>>,
}

impl MoCo {
    pub fn new(temperature: f64, queue_size: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        // Random unit vectors, as MoCo starts: the seeded init in `super::init` overwrites them.
        let queue = vb.get_with_hints(
            (queue_size, dim),
            "queue",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        let ptr = vb.get_with_hints(1, "queue_ptr", candle_nn::Init::Const(0.0))?;
        Ok(MoCo {
            temperature,
            queue: Var::from_tensor(&queue)?,
            ptr: Var::from_tensor(&ptr)?,
            pending: Mutex::new(None),
        })
    }

    /// -log softmax([q.k+, q.queue] / T)[0], averaged.
    fn contrast(&self, q: &Tensor, k: &Tensor, queue: &Tensor) -> Result<Tensor> {
        let pos = (q * k)?.sum_keepdim(1)?;
        let neg = q.matmul(&queue.t()?)?;
        let logits = (Tensor::cat(&[pos, neg], 1)? / self.temperature)?;
        candle_nn::ops::log_softmax(&logits, D::Minus1)?
            .narrow(1, 0, 1)?
            .mean_all()?
            .neg()
    }
}

impl SslLoss for MoCo {
    fn target(&self) -> bool {
        true
    }

    fn is_state(&self, name: &str) -> bool {
        name.starts_with("queue")
    }

    fn loss(&self, o: &Outputs) -> Result<Tensor> {
        let t = o.t.as_ref().expect("MoCo builds a momentum encoder");
        let q = [l2_normalize(&o.z[0])?, l2_normalize(&o.z[1])?];
        let k = [l2_normalize(&t[0])?.detach(), l2_normalize(&t[1])?.detach()];
        // A copy: the queue is rewritten after the update, while this graph may still be alive.
        let queue = self.queue.as_tensor().copy()?.detach();
        let loss =
            ((self.contrast(&q[0], &k[1], &queue)? + self.contrast(&q[1], &k[0], &queue)?)? * 0.5)?;
        if o.train {
            let keys = match &o.group {
                // Data parallel: every rank enqueues the whole group's keys, view by view as
                // one process would order them, so the ranks' queues stay equal.
                Some(g) => Tensor::cat(&[g.all_gather(&k[0])?, g.all_gather(&k[1])?], 0)?,
                None => Tensor::cat(&k, 0)?,
            };
            *self.pending.lock().expect("queue lock") = Some(keys);
        }
        Ok(loss)
    }

    fn after_update(&self) -> Result<()> {
        let Some(keys) = self.pending.lock().expect("queue lock").take() else {
            return Ok(());
        };
        let (size, _) = self.queue.dims2()?;
        let n = keys.dim(0)?.min(size);
        let ptr = self.ptr.as_tensor().to_vec1::<f32>()?[0] as usize % size;
        // Rows ptr.. then wrap to the start: rebuild the queue from three slices.
        let mut q = self.queue.as_tensor().copy()?;
        let first = n.min(size - ptr);
        q = q.slice_assign(
            &[ptr..ptr + first, 0..q.dim(1)?],
            &keys.narrow(0, 0, first)?,
        )?;
        if first < n {
            q = q.slice_assign(
                &[0..n - first, 0..q.dim(1)?],
                &keys.narrow(0, first, n - first)?,
            )?;
        }
        self.queue.set(&q)?;
        self.ptr
            .set(&Tensor::new(&[((ptr + n) % size) as f32], q.device())?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn keys_are_enqueued_after_the_update_and_the_pointer_wraps() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let moco = MoCo::new(0.2, 5, 2, vb).unwrap();
        let z = Tensor::new(&[[1f32, 0.0], [0.0, 1.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[[2f32, 0.0], [0.0, 3.0]], &Device::Cpu).unwrap();
        let o = Outputs {
            z: vec![z.clone(), z.clone()],
            p: None,
            t: Some(vec![t.clone(), t.clone()]),
            train: true,
            group: None,
        };
        let before = moco.queue.as_tensor().to_vec2::<f32>().unwrap();
        moco.loss(&o).unwrap();
        assert_eq!(
            moco.queue.as_tensor().to_vec2::<f32>().unwrap(),
            before,
            "not during the step"
        );
        moco.after_update().unwrap();
        let q = moco.queue.as_tensor().to_vec2::<f32>().unwrap();
        assert_eq!(q[0], vec![1.0, 0.0]);
        assert_eq!(q[3], vec![0.0, 1.0]);
        assert_eq!(q[4], before[4]);
        moco.loss(&o).unwrap();
        moco.after_update().unwrap();
        let q = moco.queue.as_tensor().to_vec2::<f32>().unwrap();
        assert_eq!(q[4], vec![1.0, 0.0], "fills the last row");
        assert_eq!(q[0], vec![0.0, 1.0], "then wraps to the first");
        assert_eq!(moco.ptr.as_tensor().to_vec1::<f32>().unwrap(), vec![3.0]);
        // The ptr and queue live in the VarMap: checkpoints carry them.
        let names: Vec<String> = varmap.data().lock().unwrap().keys().cloned().collect();
        assert!(names.contains(&"queue".to_string()) && names.contains(&"queue_ptr".to_string()));
    }

    /// Two ranks of 3 images against one process on the 6: the loss and gradients match (the
    /// shared harness), and after the update each rank's queue holds the whole group's keys in
    /// the order one process enqueues them.
    #[test]
    fn data_parallel_ranks_keep_the_global_batchs_queue() {
        use kindling_train::distributed::LocalGroup;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let moco = MoCo::new(0.2, 16, 4, vb).unwrap();
        super::super::group_test::assert_group_loss_is_global(&|o| moco.loss(o), (2, 3, 4));
        let start = moco.queue.as_tensor().copy().unwrap();
        let (n, d) = (3, 4);
        let z = |seed: usize, rows: usize| {
            let v: Vec<f32> = (0..rows * d)
                .map(|i| ((i * 37 + seed * 11) % 17) as f32 - 8.0)
                .collect();
            Tensor::from_vec(v, (rows, d), &Device::Cpu).unwrap()
        };
        let (t1, t2) = (z(1, 2 * n), z(2, 2 * n));
        let fresh = || {
            let m = MoCo::new(
                0.2,
                16,
                4,
                VarBuilder::from_varmap(&VarMap::new(), DType::F32, &Device::Cpu),
            )
            .unwrap();
            m.queue.set(&start).unwrap();
            m
        };
        let outputs = |t1: &Tensor, t2: &Tensor, group| Outputs {
            z: vec![t1.clone(), t2.clone()],
            p: None,
            t: Some(vec![t1.clone(), t2.clone()]),
            train: true,
            group,
        };
        let single = fresh();
        single.loss(&outputs(&t1, &t2, None)).unwrap();
        single.after_update().unwrap();
        let want = single.queue.as_tensor().to_vec2::<f32>().unwrap();
        let queues: Vec<Vec<Vec<f32>>> = LocalGroup::run(2, |g| {
            let (t1, t2, fresh, outputs) = (&t1, &t2, &fresh, &outputs);

            let r = g.rank();
            let m = fresh();
            let (a, b) = (
                t1.narrow(0, r * n, n).unwrap(),
                t2.narrow(0, r * n, n).unwrap(),
            );
            m.loss(&outputs(&a, &b, Some(g))).unwrap();
            m.after_update().unwrap();
            m.queue.as_tensor().to_vec2::<f32>().unwrap()
        });
        for (r, q) in queues.iter().enumerate() {
            assert_eq!(q, &want, "rank {r}'s queue");
        }
    }
}
