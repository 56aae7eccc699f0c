//! NCCL collectives on CUDA tensors (through cudarc, which candle's `nccl` feature enables).
//! Rank 0 makes the NCCL id and the TCP group carries it to the others, as torchrun's store
//! does; after that every collective is one NCCL call on the device's stream, queued like any
//! other kernel.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda::CudaStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use super::{Collective, Exchange, TcpGroup};

pub struct NcclGroup {
    device: Device,
    rank: usize,
    world: usize,
    comm: Arc<Mutex<CommCell>>,
}

/// cudarc's `Comm` holds a raw `ncclComm_t`, so it is neither Send nor Sync. NCCL allows a
/// communicator to be used from any thread as long as calls on it do not overlap; the mutex
/// around it guarantees that.
struct CommCell(Comm);
unsafe impl Send for CommCell {}

impl NcclGroup {
    /// Every rank calls this with the same TCP group; `device` is this rank's GPU.
    pub fn new(tcp: &TcpGroup, device: &Device) -> Result<NcclGroup> {
        let cuda = device.as_cuda_device()?;
        let id = if tcp.rank_world().0 == 0 {
            Some(
                Id::new()
                    .map_err(|e| candle_core::Error::Msg(format!("ncclGetUniqueId: {e:?}")))?,
            )
        } else {
            None
        };
        let mine: Vec<u8> = id.map_or_else(Vec::new, |id| {
            id.internal().iter().map(|&c| c as u8).collect()
        });
        let all = tcp.exchange(&mine)?;
        let bytes: [std::ffi::c_char; 128] = all[0]
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|_| candle_core::Error::Msg("rank 0 sent a malformed NCCL id".into()))?;
        let (rank, world) = tcp.rank_world();
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, Id::uninit(bytes))
            .map_err(|e| candle_core::Error::Msg(format!("ncclCommInitRank: {e:?}")))?;
        Ok(NcclGroup {
            device: device.clone(),
            rank,
            world,
            comm: Arc::new(Mutex::new(CommCell(comm))),
        })
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        xs.apply_op1_no_bwd(&Nccl {
            comm: self.comm.clone(),
            gather: None,
        })
    }

    fn all_gather(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = xs.contiguous()?;
        xs.apply_op1_no_bwd(&Nccl {
            comm: self.comm.clone(),
            gather: Some(self.world),
        })
    }

    fn barrier(&self) -> Result<()> {
        // Reading the sum back waits for the call, which completes once every rank made it.
        let x = Tensor::zeros(1, DType::F32, &self.device)?;
        self.all_reduce_sum(&x)?.to_vec1::<f32>().map(|_| ())
    }
}

/// One NCCL call as a candle op on CUDA storage: all-reduce (sum), or all-gather along the
/// first dimension when `gather` holds the world size.
struct Nccl {
    comm: Arc<Mutex<CommCell>>,
    gather: Option<usize>,
}

impl CustomOp1 for Nccl {
    fn name(&self) -> &'static str {
        "kindling-nccl"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need CUDA tensors")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        // A contiguous view may start inside its storage (a narrowed batch): send that range.
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("nccl: the input must be contiguous".into()))?;
        let n = l.shape().elem_count();
        let mut dims = l.dims().to_vec();
        let out_len = match self.gather {
            Some(world) => {
                dims[0] *= world;
                n * world
            }
            None => n,
        };
        let comm = self.comm.lock().expect("nccl comm");
        let dev = s.device().clone();
        let err = |e: &dyn std::fmt::Debug| candle_core::Error::Msg(format!("nccl: {e:?}"));
        macro_rules! call {
            ($t:ty) => {{
                let src = s.as_cuda_slice::<$t>()?.slice(start..end);
                let mut dst = unsafe { dev.alloc::<$t>(out_len)? };
                match self.gather {
                    Some(_) => comm.0.all_gather(&src, &mut dst).map_err(|e| err(&e))?,
                    None => comm
                        .0
                        .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                        .map_err(|e| err(&e))?,
                };
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::F32 => call!(f32),
            DType::F64 => call!(f64),
            DType::BF16 => call!(half::bf16),
            DType::F16 => call!(half::f16),
            d => candle_core::bail!("nccl: collectives on {d:?} tensors are not supported"),
        };
        Ok((out, Shape::from(dims)))
    }
}
