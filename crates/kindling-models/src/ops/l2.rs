//! Unit-length rows, composed from candle ops (so autograd differentiates it): the cosine
//! similarities of every contrastive loss (SimCLR, MoCo, SimSiam, SimCSE) start here.

use candle_core::{Tensor, D};

/// Rows scaled to unit length (a 1e-12 floor under the squared norm keeps a zero row finite).
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}
