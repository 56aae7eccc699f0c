//! Neither `cuda` nor `emulate`: the launchers exist (so code calling them compiles) and say
//! why they cannot run.

use candle_core::{bail, DType, Device, Result, Shape, Tensor};

use crate::launchers::{Arg, LaunchConfig};

pub(crate) struct Dev;

pub(crate) fn from_device(_: &Device) -> Result<Dev> {
    bail!("kindling-kernels was built without the `cuda` feature")
}

pub(crate) fn device_of(t: &Tensor) -> Result<Dev> {
    from_device(t.device())
}

pub(crate) fn launch(_: &Dev, name: &str, _: LaunchConfig, _: &[Arg]) -> Result<()> {
    bail!("{name}: kindling-kernels was built without the `cuda` feature")
}

pub(crate) fn empty(_: impl Into<Shape>, _: DType, _: &Dev) -> Result<Tensor> {
    bail!("kindling-kernels was built without the `cuda` feature")
}
