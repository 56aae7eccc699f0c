//! A value computed without a backward pass, made differentiable: forward, a copy of the value;
//! backward, a gradient written with candle's ops (so it runs on any device). One autograd node.
//! Kindling uses it for candle_nn's fused GPU kernels (softmax, LayerNorm: no backward of their
//! own) and for the gather of embeddings across data-parallel ranks (a collective's result, whose
//! gradient is another collective).

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// The gradient of a value with respect to the input it was computed from.
pub trait ValueGrad: Send + Sync {
    /// The autograd node's name.
    fn name(&self) -> &'static str;
    /// dL/d`input`, given `value` and dL/d`value`.
    fn grad(&self, input: &Tensor, value: &Tensor, grad: &Tensor) -> Result<Tensor>;
}

/// `value` (contiguous, computed from `input` outside candle's graph) as a tensor whose
/// backward pass is `how.grad`. No gradient flows to `value` itself.
pub fn attach_grad(
    input: &Tensor,
    value: &Tensor,
    how: impl ValueGrad + 'static,
) -> Result<Tensor> {
    input.apply_op2(&value.contiguous()?, Attach(how))
}

struct Attach<G>(G);

/// The operand holding the value, copied (a CustomOp must return new storage).
fn copy_value<S: candle_core::backend::BackendStorage>(
    name: &str,
    s: &S,
    l: &Layout,
) -> Result<(S, Shape)> {
    if !l.is_contiguous() || l.start_offset() != 0 {
        candle_core::bail!("{name}: the value must be contiguous from offset 0")
    }
    Ok((s.try_clone(l)?, l.shape().clone()))
}

impl<G: ValueGrad> CustomOp2 for Attach<G> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_value(self.0.name(), s2, l2)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_value(self.0.name(), s2, l2)
    }

    fn bwd(
        &self,
        input: &Tensor,
        value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.0.grad(input, value, grad)?), None))
    }
}

/// The gradient of a value with respect to the two inputs it was computed from.
pub trait ValueGrad2: Send + Sync {
    /// The autograd node's name.
    fn name(&self) -> &'static str;
    /// (dL/d`a`, dL/d`b`), given dL/d`value`.
    fn grad(&self, a: &Tensor, b: &Tensor, grad: &Tensor) -> Result<(Tensor, Tensor)>;
}

/// [`attach_grad`] for a value computed from two inputs: one autograd node whose backward pass
/// is `how.grad`, with a gradient for each input.
pub fn attach_grad2(
    a: &Tensor,
    b: &Tensor,
    value: &Tensor,
    how: impl ValueGrad2 + 'static,
) -> Result<Tensor> {
    a.apply_op3(b, &value.contiguous()?, Attach2(how))
}

struct Attach2<G>(G);

impl<G: ValueGrad2> candle_core::CustomOp3 for Attach2<G> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        copy_value(self.0.name(), s3, l3)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        copy_value(self.0.name(), s3, l3)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _value: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (da, db) = self.0.grad(a, b, grad)?;
        Ok((Some(da), Some(db), None))
    }
}
