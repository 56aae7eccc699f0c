//! Data-parallel training: a process group's collectives as a trait, three groups that
//! implement it (threads in one process for tests; processes over TCP for CPU runs and for the
//! rendezvous; NCCL for GPUs), the launch settings a rank reads from its environment (torchrun's
//! variables), gradient all-reduce in buckets, and the gather of embeddings that contrastive
//! losses need across ranks.
//!
//! The gather is where data-parallel contrastive training goes silently wrong in other
//! toolkits: gathering without a gradient (each rank then trains only on its own slice of the
//! similarity matrix; Lightning Bolts #179), or labels that forget the rank's offset into the
//! gathered batch (lightly #1977). [`gather_with_grad`]'s backward pass sums the gradient of the
//! gathered tensor over ranks and returns this rank's slice: with gradients averaged over ranks,
//! the update equals one process's on the global batch (tested below against that).

use std::sync::{Arc, Barrier, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use kindling_core::attach::{attach_grad, ValueGrad};

#[cfg(feature = "nccl")]
mod nccl;
mod tcp;

#[cfg(feature = "nccl")]
pub use nccl::NcclGroup;
pub use tcp::TcpGroup;

/// The collectives data parallelism needs, as NCCL offers them, on tensors of any device.
/// Every rank calls each operation in the same order with tensors of the same shape and dtype;
/// a call returns once every rank has made it.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Element-wise sum over ranks; the same result on every rank.
    fn all_reduce_sum(&self, xs: &Tensor) -> Result<Tensor>;
    /// Every rank's `xs` concatenated along the first dimension, in rank order.
    fn all_gather(&self, xs: &Tensor) -> Result<Tensor>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum(&Tensor::zeros(1, DType::F32, &Device::Cpu)?)
            .map(|_| ())
    }
}

/// A group that moves bytes between ranks: every rank's payload, in rank order, on every rank.
/// The host-side groups (threads, TCP) implement this; [`Collective`] follows from it, with the
/// sums done on the host in rank order, so every rank gets bit-identical results.
pub trait Exchange: Send + Sync {
    /// (rank, world size).
    fn rank_world(&self) -> (usize, usize);
    fn exchange(&self, payload: &[u8]) -> Result<Vec<Vec<u8>>>;
}

/// Every rank's `xs` on the host, in rank order (each of the same length), as f64 (which holds
/// every f32, bf16 and f16 value exactly, and the trainer's f64 statistics).
fn gather_host<E: Exchange + ?Sized>(group: &E, xs: &Tensor) -> Result<Vec<Vec<f64>>> {
    let mine = xs.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
    let parts = group.exchange(&bytes)?;
    if parts.iter().any(|p| p.len() != bytes.len()) {
        candle_core::bail!(
            "collective: ranks contributed {:?} bytes (this is rank {}: {})",
            parts.iter().map(Vec::len).collect::<Vec<_>>(),
            group.rank_world().0,
            bytes.len()
        )
    }
    Ok(parts
        .iter()
        .map(|p| {
            p.chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect()
        })
        .collect())
}

impl<E: Exchange> Collective for E {
    fn rank(&self) -> usize {
        self.rank_world().0
    }

    fn world(&self) -> usize {
        self.rank_world().1
    }

    fn all_reduce_sum(&self, xs: &Tensor) -> Result<Tensor> {
        let parts = gather_host(self, xs)?;
        // Summed in f32 for f32 tensors, so that the result does not depend on the transport.
        let f32_sum = xs.dtype() != DType::F64;
        let mut sum = vec![0f64; xs.elem_count()];
        for part in &parts {
            sum.iter_mut().zip(part).for_each(|(s, v)| {
                *s = if f32_sum {
                    f64::from(*s as f32 + *v as f32)
                } else {
                    *s + v
                }
            });
        }
        Tensor::from_vec(sum, xs.shape(), &Device::Cpu)?
            .to_dtype(xs.dtype())?
            .to_device(xs.device())
    }

    fn all_gather(&self, xs: &Tensor) -> Result<Tensor> {
        let parts = gather_host(self, xs)?;
        let mut dims = xs.dims().to_vec();
        if dims.is_empty() {
            candle_core::bail!("all_gather: a scalar has no first dimension to gather along")
        }
        dims[0] *= parts.len();
        Tensor::from_vec(parts.concat(), dims, &Device::Cpu)?
            .to_dtype(xs.dtype())?
            .to_device(xs.device())
    }
}

/// `world` ranks in one process, one per thread: [`LocalGroup::new`] returns their handles.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    slots: Mutex<Vec<Vec<u8>>>,
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

    /// Runs `f` on `world` ranks in this process, one thread each, and returns their results
    /// in rank order: what a data-parallel run does across processes, in a test.
    pub fn run<R: Send>(world: usize, f: impl Fn(Arc<dyn Collective>) -> R + Sync) -> Vec<R> {
        std::thread::scope(|scope| {
            let f = &f;
            let handles: Vec<_> = LocalGroup::new(world)
                .into_iter()
                .map(|g| scope.spawn(move || f(Arc::new(g))))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a rank panicked"))
                .collect()
        })
    }
}

impl Exchange for LocalGroup {
    fn rank_world(&self) -> (usize, usize) {
        (self.rank, self.shared.world)
    }

    fn exchange(&self, payload: &[u8]) -> Result<Vec<Vec<u8>>> {
        let s = &self.shared;
        s.slots.lock().expect("group slots")[self.rank] = payload.to_vec();
        s.barrier.wait();
        let out = s.slots.lock().expect("group slots").clone();
        // Nobody writes the next call's slot before everyone has read this one.
        s.barrier.wait();
        Ok(out)
    }
}

/// Averages the parameters' gradients over ranks, `bucket` values per collective call (fewer,
/// larger calls: NCCL's per-call latency dominates small tensors; DDP's default is 25 MB).
/// Parameters without a gradient on this rank count as zero, so every rank makes the same calls.
pub fn all_reduce_mean(
    grads: &mut GradStore,
    vars: &[Var],
    comm: &dyn Collective,
    bucket: usize,
) -> Result<()> {
    let scale = 1.0 / comm.world() as f64;
    let mut start = 0;
    while start < vars.len() {
        // A bucket: consecutive parameters up to `bucket` values (at least one parameter).
        let mut end = start;
        let mut size = 0;
        while end < vars.len() && (end == start || size + vars[end].elem_count() <= bucket) {
            size += vars[end].elem_count();
            end += 1;
        }
        let parts = vars[start..end]
            .iter()
            .map(|v| match grads.get(v.as_tensor()) {
                Some(g) => g.flatten_all(),
                None => Tensor::zeros(v.elem_count(), v.dtype(), v.device()),
            })
            .collect::<Result<Vec<_>>>()?;
        let mean = (comm.all_reduce_sum(&Tensor::cat(&parts, 0)?)? * scale)?;
        let mut offset = 0;
        for v in &vars[start..end] {
            let n = v.elem_count();
            let g = mean.narrow(0, offset, n)?.reshape(v.shape())?;
            grads.insert(v.as_tensor(), g);
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
    let xs = xs.contiguous()?;
    let all = comm.all_gather(&xs.detach())?;
    attach_grad(&xs, &all, GatherGrad { comm })
}

/// The gathered tensor feeds every rank's loss, so this rank's rows get the sum over ranks of
/// those losses' gradients.
struct GatherGrad {
    comm: Arc<dyn Collective>,
}

impl ValueGrad for GatherGrad {
    fn name(&self) -> &'static str {
        "kindling-gather"
    }

    fn grad(&self, xs: &Tensor, _all: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let sum = self.comm.all_reduce_sum(&grad.contiguous()?)?;
        let n = xs.dim(0)?;
        sum.narrow(0, self.comm.rank() * n, n)
    }
}

/// Where a rank sits in a data-parallel run, from the variables torchrun sets (and
/// `kindling pretrain --gpus`/`--nproc` sets for the processes it launches): `RANK`,
/// `WORLD_SIZE`, `LOCAL_RANK` (the GPU on this node; default: `RANK`), `MASTER_ADDR`
/// (default 127.0.0.1) and `MASTER_PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// `MASTER_ADDR:MASTER_PORT`, where rank 0 listens.
    pub master: String,
}

impl DistEnv {
    /// `None` when `WORLD_SIZE` is unset (a plain single-process run).
    pub fn from_env() -> std::result::Result<Option<DistEnv>, String> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// As [`DistEnv::from_env`], reading the variables through `var`.
    pub fn from_lookup(
        var: impl Fn(&str) -> Option<String>,
    ) -> std::result::Result<Option<DistEnv>, String> {
        let Some(world) = var("WORLD_SIZE") else {
            return Ok(None);
        };
        let number = |key: &str, v: String| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| format!("environment variable {key}={v:?}: expected a whole number"))
        };
        let world = number("WORLD_SIZE", world)?;
        if world == 0 {
            return Err("environment variable WORLD_SIZE=0: expected at least 1".into());
        }
        let rank = match var("RANK") {
            Some(v) => number("RANK", v)?,
            None => {
                return Err("WORLD_SIZE is set but RANK is not (expected 0..WORLD_SIZE-1)".into())
            }
        };
        if rank >= world {
            return Err(format!(
                "environment variable RANK={rank}: expected less than WORLD_SIZE={world}"
            ));
        }
        let local_rank = match var("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", v)?,
            None => rank,
        };
        let addr = var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into());
        let port = match var("MASTER_PORT") {
            Some(v) => v.trim().parse::<u16>().map_err(|_| {
                format!("environment variable MASTER_PORT={v:?}: expected a port number")
            })?,
            None if world == 1 => 0,
            None => return Err("WORLD_SIZE > 1 needs MASTER_PORT (rank 0's port)".into()),
        };
        Ok(Some(DistEnv {
            rank,
            world,
            local_rank,
            master: format!("{addr}:{port}"),
        }))
    }

    /// Joins the group: TCP for the rendezvous (rank 0 listens at `master`); on a CUDA device in
    /// a build with NCCL, NCCL for the collectives; otherwise the TCP group itself (host copies:
    /// right for CPU runs, slow for GPUs).
    pub fn connect(
        &self,
        device: &Device,
        timeout: std::time::Duration,
    ) -> std::result::Result<Arc<dyn Collective>, String> {
        let tcp = TcpGroup::connect(&self.master, self.rank, self.world, timeout).map_err(|e| {
            format!(
                "rank {} joining the group at {}: {e}",
                self.rank, self.master
            )
        })?;
        #[cfg(feature = "nccl")]
        if device.is_cuda() {
            return NcclGroup::new(&tcp, device)
                .map(|g| Arc::new(g) as Arc<dyn Collective>)
                .map_err(|e| format!("rank {}: NCCL: {e}", self.rank));
        }
        if device.is_cuda() {
            tracing::warn!(
                "this build has no NCCL (`--features nccl`): gradients cross ranks through the \
                 host over TCP, which is slow"
            );
        }
        Ok(Arc::new(tcp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        let grads: Vec<Vec<f32>> = LocalGroup::run(world, |comm| {
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
                Gathering::NoGradient => gather_with_grad(&zb.detach(), comm.clone()).unwrap(),
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
        let results: Vec<Vec<Vec<f32>>> = LocalGroup::run(3, |comm| {
            let vars = vars.clone();

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
            all_reduce_mean(&mut grads, &vars, comm.as_ref(), 10).unwrap();
            vars.iter()
                .map(|v| {
                    let g = grads.get(v.as_tensor()).unwrap();
                    g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                })
                .collect()
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

    /// A port nobody listens on now (the OS picks it; rank 0 binds it again right after).
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    /// Three ranks as they run in three processes, over loopback TCP: each gathers and sums
    /// rows that name their rank, and every rank gets the same, rank-ordered result.
    #[test]
    fn tcp_ranks_gather_and_sum_in_rank_order() {
        let addr = format!("127.0.0.1:{}", free_port());
        let results: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..3)
                .map(|rank| {
                    let addr = addr.clone();
                    scope.spawn(move || {
                        let g = TcpGroup::connect(&addr, rank, 3, Duration::from_secs(20)).unwrap();
                        let mine = Tensor::new(&[[rank as f32, 10.0 + rank as f32]], &Device::Cpu)
                            .unwrap();
                        let all = g.all_gather(&mine).unwrap();
                        assert_eq!(all.dims(), &[3, 2]);
                        let sum = g.all_reduce_sum(&mine).unwrap();
                        g.barrier().unwrap();
                        (
                            all.flatten_all().unwrap().to_vec1().unwrap(),
                            sum.flatten_all().unwrap().to_vec1().unwrap(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (all, sum) in results {
            assert_eq!(all, vec![0.0, 10.0, 1.0, 11.0, 2.0, 12.0]);
            assert_eq!(sum, vec![3.0, 33.0]);
        }
    }

    /// A rank that goes away makes its peers' next collective fail with an error that says so,
    /// instead of waiting forever.
    #[test]
    fn a_vanished_rank_fails_the_next_collective() {
        let addr = format!("127.0.0.1:{}", free_port());
        let root = std::thread::scope(|scope| {
            let a = addr.clone();
            let root = scope.spawn(move || {
                let g = TcpGroup::connect(&a, 0, 2, Duration::from_secs(20)).unwrap();
                g.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap())
                    .map(|_| ())
            });
            let leaf = TcpGroup::connect(&addr, 1, 2, Duration::from_secs(20)).unwrap();
            drop(leaf);
            root.join().unwrap()
        });
        let err = root.unwrap_err().to_string();
        assert!(
            err.contains("rank 0 of 2") && err.contains("stopped"),
            "{err}"
        );
    }

    /// A rank started with another world size, or claiming a rank out of range, is refused by
    /// name; rank 0 waits for missing ranks only until its timeout.
    #[test]
    fn rank_zero_refuses_a_mismatched_rank_and_times_out_on_a_missing_one() {
        let addr = format!("127.0.0.1:{}", free_port());
        let err = std::thread::scope(|scope| {
            let a = addr.clone();
            let root = scope.spawn(move || TcpGroup::connect(&a, 0, 2, Duration::from_secs(20)));
            let _leaf = TcpGroup::connect(&addr, 1, 3, Duration::from_secs(20)).unwrap();
            root.join().unwrap().err().unwrap().to_string()
        });
        assert!(
            err.contains("WORLD_SIZE=3") && err.contains("with 2"),
            "{err}"
        );
        let addr = format!("127.0.0.1:{}", free_port());
        let err = TcpGroup::connect(&addr, 0, 3, Duration::from_millis(200))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("ranks [1, 2] did not connect"),
            "{err}"
        );
    }

    #[test]
    fn the_launch_environment_reads_as_torchrun_sets_it() {
        let env = |pairs: &[(&str, &str)]| {
            let map: std::collections::HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            DistEnv::from_lookup(move |k| map.get(k).cloned())
        };
        assert_eq!(env(&[]), Ok(None), "no WORLD_SIZE: a plain run");
        let full = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "29500"),
        ]);
        assert_eq!(
            full,
            Ok(Some(DistEnv {
                rank: 3,
                world: 4,
                local_rank: 1,
                master: "10.0.0.2:29500".into()
            }))
        );
        let local = env(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_PORT", "1234")]);
        assert_eq!(
            local.unwrap().unwrap().local_rank,
            1,
            "LOCAL_RANK defaults to RANK"
        );
        for (pairs, says) in [
            (
                vec![("WORLD_SIZE", "two")],
                "WORLD_SIZE=\"two\": expected a whole number",
            ),
            (vec![("WORLD_SIZE", "2")], "RANK is not"),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "2")],
                "RANK=2: expected less than WORLD_SIZE=2",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0")],
                "needs MASTER_PORT",
            ),
            (
                vec![("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "x")],
                "MASTER_PORT=\"x\": expected a port number",
            ),
        ] {
            let err = env(&pairs).unwrap_err();
            assert!(err.contains(says), "{pairs:?}: {err}");
        }
    }
}
