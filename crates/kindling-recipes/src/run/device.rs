//! Which device and precision a run trains on, and joining a data-parallel group.

use std::sync::Arc;

use candle_core::{DType, Device};
use kindling_train::distributed::{Collective, DistEnv};
use serde::{Deserialize, Serialize};

use crate::{RecipeError, RunOptions};

/// A recipe's `device`: `"auto"` (the best device this build supports), `"cpu"`, `"cuda"`
/// (`"cuda:N"` for GPU N) or `"metal"`. A TOML string, checked as the recipe is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSetting {
    #[default]
    Auto,
    Cpu,
    /// `"cuda"` (None: GPU 0, or a data-parallel rank's own GPU) or `"cuda:N"`.
    Cuda(Option<usize>),
    Metal,
}

impl TryFrom<String> for DeviceSetting {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "auto" => Ok(DeviceSetting::Auto),
            "cpu" => Ok(DeviceSetting::Cpu),
            "metal" => Ok(DeviceSetting::Metal),
            "cuda" => Ok(DeviceSetting::Cuda(None)),
            n => match n.strip_prefix("cuda:") {
                Some(i) => i
                    .parse::<usize>()
                    .map(|i| DeviceSetting::Cuda(Some(i)))
                    .map_err(|_| format!("`{n}`: expected \"cuda:N\" with N a GPU index")),
                None => Err(format!(
                    "`{n}` is not a device; expected \"auto\", \"cpu\", \"cuda\", \"cuda:N\" \
                     or \"metal\""
                )),
            },
        }
    }
}

impl From<DeviceSetting> for String {
    fn from(d: DeviceSetting) -> String {
        d.to_string()
    }
}

impl std::fmt::Display for DeviceSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSetting::Auto => f.write_str("auto"),
            DeviceSetting::Cpu => f.write_str("cpu"),
            DeviceSetting::Cuda(None) => f.write_str("cuda"),
            DeviceSetting::Cuda(Some(i)) => write!(f, "cuda:{i}"),
            DeviceSetting::Metal => f.write_str("metal"),
        }
    }
}

/// A recipe's `precision`: f32, or mixed precision on a GPU (f32 master weights and optimizer
/// state, low-precision compute; f16 with dynamic loss scaling). f32 on CPU: candle has no
/// bf16 gemm there, so bf16 would only be slower.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    F16,
}

/// Opens the device a recipe asks for. `Auto` takes the first CUDA GPU in a `--features cuda`
/// build (Metal in a `--features metal` one) and falls back to the CPU, with a warning, when
/// the build has GPU support but the machine has no usable GPU.
pub fn device(setting: &DeviceSetting) -> Result<Device, RecipeError> {
    let name = setting.to_string();
    let bad = |msg: String| RecipeError::Invalid {
        key: "device".into(),
        msg,
    };
    let unsupported = |feature: &str| {
        bad(format!(
            "`{name}`: this build of kindling has no GPU support (CPU only; rebuild with \
             `--features {feature}`, see README); use \"cpu\" or \"auto\""
        ))
    };
    let opened = |d: candle_core::Result<Device>| {
        d.map_err(|e| bad(format!("`{name}`: cannot open the device: {e}")))
    };
    match setting {
        DeviceSetting::Cpu => Ok(Device::Cpu),
        DeviceSetting::Auto => Ok(auto_device()),
        DeviceSetting::Metal if candle_core::utils::metal_is_available() => {
            opened(Device::new_metal(0))
        }
        DeviceSetting::Metal => Err(unsupported("metal")),
        DeviceSetting::Cuda(ordinal) => {
            if !candle_core::utils::cuda_is_available() {
                return Err(unsupported("cuda"));
            }
            opened(Device::new_cuda(ordinal.unwrap_or(0)))
        }
    }
}

/// This process's device: the recipe's, except that in a data-parallel run `"cuda"`, and
/// `"auto"` where there is a GPU, mean this rank's GPU, `cuda:LOCAL_RANK` (as torchrun users
/// expect; `kindling pretrain --gpus` names each rank's GPU itself).
pub(crate) fn rank_device(
    setting: &DeviceSetting,
    dist: Option<&DistEnv>,
) -> Result<Device, RecipeError> {
    match (dist, setting) {
        (Some(d), DeviceSetting::Cuda(None)) => device(&DeviceSetting::Cuda(Some(d.local_rank))),
        (Some(d), DeviceSetting::Auto) if candle_core::utils::cuda_is_available() => {
            device(&DeviceSetting::Cuda(Some(d.local_rank)))
        }
        _ => device(setting),
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
pub fn loss_scale(precision: Precision) -> Option<f64> {
    (precision == Precision::F16).then_some(65536.0)
}

/// The compute dtype a recipe's `precision` asks for on `device`: `None` for f32 (parameters
/// and compute alike), `Some(BF16)` for bf16 mixed precision (f32 master weights and optimizer
/// state, bf16 activations and matrix products; LayerNorm, BatchNorm, softmax and the loss in
/// f32, as PyTorch's autocast), `Some(F16)` likewise with dynamic loss scaling (see
/// [`loss_scale`]). Only f32 trains on CPU.
pub fn compute_dtype(precision: Precision, device: &Device) -> Result<Option<DType>, RecipeError> {
    let name = match precision {
        Precision::F32 => return Ok(None),
        Precision::Bf16 => "bf16",
        Precision::F16 => "f16",
    };
    if device.is_cpu() {
        return Err(RecipeError::Invalid {
            key: "precision".into(),
            msg: format!(
                "`{name}` mixed precision is for GPUs; on CPU candle has no {name} matrix \
                 multiply, so it would be slower than f32 (use precision = \"f32\")"
            ),
        });
    }
    Ok(Some(match precision {
        Precision::Bf16 => DType::BF16,
        _ => DType::F16,
    }))
}
