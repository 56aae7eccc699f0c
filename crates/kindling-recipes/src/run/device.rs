//! Which device and precision a run trains on, and joining a data-parallel group.

use std::sync::Arc;

use candle_core::{DType, Device};
use kindling_train::distributed::{Collective, DistEnv};

use crate::{RecipeError, RunOptions};

/// The device a recipe asks for. `"auto"` takes the first CUDA GPU in a `--features cuda` build
/// (Metal in a `--features metal` one) and falls back to the CPU, with a warning, when the build
/// has GPU support but the machine has no usable GPU.
pub fn device(name: &str) -> Result<Device, RecipeError> {
    let bad = |msg: String| RecipeError::Invalid {
        key: "device".into(),
        msg,
    };
    let unsupported = |n: &str, feature: &str| {
        bad(format!(
            "`{n}`: this build of kindling has no GPU support (CPU only; rebuild with \
             `--features {feature}`, see README); use \"cpu\" or \"auto\""
        ))
    };
    let opened = |n: &str, d: candle_core::Result<Device>| {
        d.map_err(|e| bad(format!("`{n}`: cannot open the device: {e}")))
    };
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(auto_device()),
        "metal" if candle_core::utils::metal_is_available() => opened(name, Device::new_metal(0)),
        "metal" => Err(unsupported(name, "metal")),
        n if n == "cuda" || n.starts_with("cuda:") => {
            let ordinal = match n.strip_prefix("cuda:") {
                None => 0,
                Some(i) => i
                    .parse::<usize>()
                    .map_err(|_| bad(format!("`{n}`: expected \"cuda:N\" with N a GPU index")))?,
            };
            if !candle_core::utils::cuda_is_available() {
                return Err(unsupported(n, "cuda"));
            }
            opened(n, Device::new_cuda(ordinal))
        }
        other => Err(bad(format!(
            "`{other}` is not a device; expected \"auto\", \"cpu\", \"cuda:N\" or \"metal\""
        ))),
    }
}

/// This process's device: the recipe's, except that in a data-parallel run `"cuda"`, and
/// `"auto"` where there is a GPU, mean this rank's GPU, `cuda:LOCAL_RANK` (as torchrun users
/// expect; `kindling pretrain --gpus` names each rank's GPU itself).
pub(crate) fn rank_device(name: &str, dist: Option<&DistEnv>) -> Result<Device, RecipeError> {
    match dist {
        Some(d)
            if name == "cuda" || (name == "auto" && candle_core::utils::cuda_is_available()) =>
        {
            device(&format!("cuda:{}", d.local_rank))
        }
        _ => device(name),
    }
}

/// Joins the data-parallel group when this process is one of its ranks (ranks wait up to ten
/// minutes for each other to start).
pub(crate) fn join_group(
    opts: &RunOptions,
    device: &Device,
) -> Result<Option<Arc<dyn Collective>>, RecipeError> {
    let Some(d) = &opts.dist else {
        return Ok(None);
    };
    if d.world > 1 {
        eprintln!(
            "data parallel: rank {} of {}, joining at {}",
            d.rank, d.world, d.master
        );
    }
    d.connect(device, std::time::Duration::from_secs(600))
        .map(Some)
        .map_err(|msg| RecipeError::Distributed { msg })
}

fn auto_device() -> Device {
    if candle_core::utils::cuda_is_available() {
        match Device::new_cuda(0) {
            Ok(d) => return d,
            Err(e) => tracing::warn!("device \"auto\": no usable CUDA GPU ({e}); using the CPU"),
        }
    }
    if candle_core::utils::metal_is_available() {
        match Device::new_metal(0) {
            Ok(d) => return d,
            Err(e) => tracing::warn!("device \"auto\": no usable Metal GPU ({e}); using the CPU"),
        }
    }
    Device::Cpu
}

/// The initial dynamic loss scale a `precision` needs: f16's range would flush small gradients
/// to zero, so its loss is scaled (2^16 to start, as PyTorch's `GradScaler`); f32 and bf16
/// (f32's range) need none.
pub fn loss_scale(precision: &str) -> Option<f64> {
    (precision == "f16").then_some(65536.0)
}

/// The compute dtype a recipe's `precision` asks for on `device`: `None` for f32 (parameters
/// and compute alike), `Some(BF16)` for bf16 mixed precision (f32 master weights and optimizer
/// state, bf16 activations and matrix products; LayerNorm, BatchNorm, softmax and the loss in
/// f32, as PyTorch's autocast), `Some(F16)` likewise with dynamic loss scaling (see
/// [`loss_scale`]). Only f32 trains on CPU.
pub fn compute_dtype(precision: &str, device: &Device) -> Result<Option<DType>, RecipeError> {
    let bad = |msg: String| RecipeError::Invalid {
        key: "precision".into(),
        msg,
    };
    match (precision, device) {
        ("f32", _) => Ok(None),
        (p @ ("bf16" | "f16"), Device::Cpu) => Err(bad(format!(
            "`{p}` mixed precision is for GPUs; on CPU candle has no {p} matrix multiply, so \
             it would be slower than f32 (use precision = \"f32\")"
        ))),
        ("bf16", _) => Ok(Some(DType::BF16)),
        ("f16", _) => Ok(Some(DType::F16)),
        (other, _) => Err(bad(format!(
            "`{other}` is not a precision; expected \"f32\", \"bf16\" or \"f16\""
        ))),
    }
}
