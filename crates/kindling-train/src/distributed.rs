//! The pieces of data-parallel training that do not depend on the transport: a process group's
//! collectives as a trait, an in-process group (threads) that implements it for CPU runs and
//! tests, gradient all-reduce in buckets, and the gather of embeddings that contrastive losses
//! need across ranks.
//!
//! The gather is where data-parallel contrastive training goes silently wrong in other
//! toolkits: gathering without a gradient (each rank then trains only on its own slice of the
//! similarity matrix; Lightning Bolts #179), or labels that forget the rank's offset into the
//! gathered batch (lightly #1977). [`gather_with_grad`]'s backward pass sums the gradient of the
//! gathered tensor over ranks and returns this rank's slice: with gradients averaged over ranks,
//! the update equals one process's on the global batch (tested below against that).

use std::sync::{Arc, Barrier, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, Var};

/// The collectives data parallelism needs, as NCCL offers them. Every rank calls each operation
/// in the same order; a call returns once every rank has made it.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over ranks, in place; the same result on every rank.
    fn all_reduce_sum(&self, xs: &mut [f32]) -> Result<()>;
    /// Every rank's `xs` (all of the same length), concatenated in rank order.
    fn all_gather(&self, xs: &[f32]) -> Result<Vec<f32>>;
}

/// `world` ranks in one process, one per thread: [`LocalGroup::new`] returns their handles.
/// Sums run in rank order, so every rank gets bit-identical results.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    slots: Mutex<Vec<Vec<f32>>>,
    barrier: Barrier,
}

impl LocalGroup {
    pub fn new(world: usize) -> Vec<LocalGroup> {
        assert!(world > 0, "a group needs at least one rank");
        let shared = Arc::new(Shared {
            world,
            slots: Mutex::new(vec![Vec::new(); world]),
            barrier: Barrier::new(world),
        });
        (0..world)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, xs: &mut [f32]) -> Result<()> {
        let all = self.all_gather(xs)?;
        let n = xs.len();
        xs.fill(0.0);
        for part in all.chunks(n.max(1)) {
            xs.iter_mut().zip(part).for_each(|(x, v)| *x += v);
        }
        Ok(())
    }

    fn all_gather(&self, xs: &[f32]) -> Result<Vec<f32>> {
        let s = &self.shared;
        s.slots.lock().expect("group slots")[self.rank] = xs.to_vec();
        s.barrier.wait();
        let out = {
            let slots = s.slots.lock().expect("group slots");
            if slots.iter().any(|v| v.len() != xs.len()) {
                candle_core::bail!(
                    "all_gather: ranks contributed {:?} values",
                    slots.iter().map(Vec::len).collect::<Vec<_>>()
                )
            }
            slots.concat()
        };
        // Nobody writes the next call's slot before everyone has read this one.
        s.barrier.wait();
        Ok(out)
    }
}

/// Averages the parameters' gradients over ranks, `bucket` floats per collective call (fewer,
/// larger calls: NCCL's per-call latency dominates small tensors; DDP's default is 25 MB).
/// Parameters without a gradient on this rank count as zero, so every rank makes the same calls.
pub fn all_reduce_mean(
    grads: &mut GradStore,
    vars: &[Var],
    comm: &dyn Collective,
    bucket: usize,
) -> Result<()> {
    let scale = 1.0 / comm.world() as f32;
    let mut start = 0;
    while start < vars.len() {
        // A bucket: consecutive parameters up to `bucket` floats (at least one parameter).
        let mut end = start;
        let mut size = 0;
        while end < vars.len() && (end == start || size + vars[end].elem_count() <= bucket) {
            size += vars[end].elem_count();
            end += 1;
        }
        let mut flat = Vec::with_capacity(size);
        for v in &vars[start..end] {
            match grads.get(v.as_tensor()) {
                Some(g) => flat.extend(g.flatten_all()?.to_vec1::<f32>()?),
                None => flat.extend(std::iter::repeat_n(0f32, v.elem_count())),
            }
        }
        comm.all_reduce_sum(&mut flat)?;
        let mut offset = 0;
        for v in &vars[start..end] {
            let n = v.elem_count();
            let g: Vec<f32> = flat[offset..offset + n].iter().map(|x| x * scale).collect();
            grads.insert(v.as_tensor(), Tensor::from_vec(g, v.shape(), v.device())?);
            offset += n;
        }
        start = end;
    }
    Ok(())
}

/// All ranks' `xs` (n, d) stacked in rank order: (world * n, d), with a gradient to this
/// rank's rows. Rank r's rows are `r * n .. (r + 1) * n` of the result; a contrastive loss
/// whose positives are another tensor's rows must offset its labels by that.
pub fn gather_with_grad(xs: &Tensor, comm: Arc<dyn Collective>) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(Gather { comm })
}

struct Gather {
    comm: Arc<dyn Collective>,
}

impl CustomOp1 for Gather {
    fn name(&self) -> &'static str {
        "kindling-gather"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("gather: input must be contiguous".into()))?;
        let xs = &s.as_slice::<f32>()?[start..end];
        let all = self.comm.all_gather(xs)?;
        let mut dims = l.dims().to_vec();
        dims[0] *= self.comm.world();
        Ok((CpuStorage::F32(all), Shape::from(dims)))
    }

    /// The gathered tensor feeds every rank's loss: this rank's rows get the sum over ranks of
    /// those losses' gradients.
    fn bwd(&self, xs: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mut g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        self.comm.all_reduce_sum(&mut g)?;
        let n = xs.elem_count();
        let mine = g[self.comm.rank() * n..(self.comm.rank() + 1) * n].to_vec();
        Ok(Some(Tensor::from_vec(mine, xs.shape(), xs.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn random(shape: (usize, usize), seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let v: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| r.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// InfoNCE of anchors `a` (n, d) against candidates `b` (m, d): the positive of anchor i is
    /// candidate `labels[i]`; mean over anchors.
    fn info_nce(a: &Tensor, b: &Tensor, labels: &[u32]) -> Tensor {
        let logits = (a.matmul(&b.t().unwrap()).unwrap() / 0.1).unwrap();
        let labels = Tensor::new(labels, &Device::Cpu).unwrap();
        candle_nn::loss::cross_entropy(&logits, &labels).unwrap()
    }

    /// How a rank builds its loss: the correct way, or one of the two known bugs.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Gathering {
        Correct,
        NoGradient,
        LabelsWithoutRankOffset,
    }

    /// Gradient of the encoder weight for a batch of (x_a, x_b) pairs split over `world` ranks,
    /// averaged over ranks as DDP does; `world == 1` is the single process.
    fn encoder_grad(
        w: &Tensor,
        xa: &Tensor,
        xb: &Tensor,
        world: usize,
        how: Gathering,
    ) -> Vec<f32> {
        let n = xa.dim(0).unwrap() / world;
        let grads: Vec<Vec<f32>> = std::thread::scope(|scope| {
            let handles: Vec<_> = LocalGroup::new(world)
                .into_iter()
                .map(|comm| {
                    scope.spawn(move || {
                        let comm: Arc<dyn Collective> = Arc::new(comm);
                        let r = comm.rank();
                        let w = Var::from_tensor(w).unwrap();
                        let za = xa
                            .narrow(0, r * n, n)
                            .unwrap()
                            .matmul(w.as_tensor())
                            .unwrap();
                        let zb = xb
                            .narrow(0, r * n, n)
                            .unwrap()
                            .matmul(w.as_tensor())
                            .unwrap();
                        let all_b = match how {
                            Gathering::NoGradient => {
                                gather_with_grad(&zb.detach(), comm.clone()).unwrap()
                            }
                            _ => gather_with_grad(&zb, comm.clone()).unwrap(),
                        };
                        let offset = if how == Gathering::LabelsWithoutRankOffset {
                            0
                        } else {
                            r * n
                        };
                        let labels: Vec<u32> = (0..n).map(|i| (offset + i) as u32).collect();
                        let loss = info_nce(&za, &all_b, &labels);
                        let mut grads = loss.backward().unwrap();
                        all_reduce_mean(&mut grads, &[w.clone()], comm.as_ref(), 1 << 20).unwrap();
                        let g = grads.get(w.as_tensor()).unwrap();
                        g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for g in &grads[1..] {
            assert_eq!(g, &grads[0], "every rank ends with the same gradient");
        }
        grads.into_iter().next().unwrap()
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        diff / scale
    }

    /// Contrastive loss over 4 ranks of 6 pairs, with the gather and gradient average: the
    /// encoder's gradient equals one process's on all 24 pairs. The two known bugs (gathering
    /// without a gradient, labels without the rank offset) do not, so this test would catch them.
    #[test]
    fn data_parallel_contrastive_gradient_equals_the_single_process_global_batch() {
        let (w, xa, xb) = (random((8, 5), 1), random((24, 8), 2), random((24, 8), 3));
        let single = encoder_grad(&w, &xa, &xb, 1, Gathering::Correct);
        let parallel = encoder_grad(&w, &xa, &xb, 4, Gathering::Correct);
        let d = max_rel_diff(&parallel, &single);
        assert!(d < 1e-5, "4 ranks vs 1: relative difference {d}");
        for bug in [Gathering::NoGradient, Gathering::LabelsWithoutRankOffset] {
            let wrong = encoder_grad(&w, &xa, &xb, 4, bug);
            let d = max_rel_diff(&wrong, &single);
            assert!(d > 1e-2, "{bug:?} should differ, relative difference {d}");
        }
    }

    /// Buckets split parameters at their boundaries; a rank without a parameter's gradient
    /// contributes zeros; the result is the mean over ranks on every rank.
    #[test]
    fn all_reduce_mean_averages_every_parameter_over_ranks_in_buckets() {
        let vars: Vec<Var> = [(3, 4), (1, 7), (5, 5)]
            .iter()
            .map(|&s| Var::zeros(s, DType::F32, &Device::Cpu).unwrap())
            .collect();
        let results: Vec<Vec<Vec<f32>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = LocalGroup::new(3)
                .into_iter()
                .map(|comm| {
                    let vars = vars.clone();
                    scope.spawn(move || {
                        let r = comm.rank();
                        let mut grads = GradStore::default();
                        for (i, v) in vars.iter().enumerate() {
                            // Rank 2 has no gradient for parameter 1.
                            if !(r == 2 && i == 1) {
                                let g = random(v.shape().dims2().unwrap(), (10 * r + i) as u64);
                                grads.insert(v.as_tensor(), g);
                            }
                        }
                        // 10-float buckets: parameter 0 (12) alone, 1 (7) alone, 2 (25) alone.
                        all_reduce_mean(&mut grads, &vars, &comm, 10).unwrap();
                        vars.iter()
                            .map(|v| {
                                let g = grads.get(v.as_tensor()).unwrap();
                                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                            })
                            .collect()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, v) in vars.iter().enumerate() {
            let shape = v.shape().dims2().unwrap();
            let mut expected = vec![0f32; v.elem_count()];
            for r in 0..3 {
                if !(r == 2 && i == 1) {
                    let g = random(shape, (10 * r + i) as u64);
                    let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    expected.iter_mut().zip(g).for_each(|(e, x)| *e += x / 3.0);
                }
            }
            for rank in &results {
                assert!(max_rel_diff(&rank[i], &expected) < 1e-6, "parameter {i}");
            }
        }
    }
}
