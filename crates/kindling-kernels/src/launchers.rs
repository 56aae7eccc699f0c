#![cfg_attr(not(any(feature = "cuda", feature = "emulate")), allow(dead_code))]
//! The launchers: each takes tensors on one device, checks shapes and dtypes, allocates its
//! outputs and queues one kernel (two for the reductions) through the backend: candle's CUDA
//! stream (`backend_cuda.rs`), or the CPU emulation (`backend_emulated.rs`, for tests).

use candle_core::{bail, DType, Device, Result, Shape, Tensor};

use crate::backend::{device_of, empty, launch};
use crate::{dropout_threshold, Dropout, MAX_LAYER_NORM_WIDTH};

/// One kernel argument.
pub(crate) enum Arg<'a> {
    /// A contiguous tensor, passed as a pointer to its first element.
    T(&'a Tensor),
    /// An absent optional tensor (a null pointer).
    Null,
    U32(u32),
    U64(u64),
    F32(f32),
    /// A table of 64-bit cells in device memory (the multi-tensor kernels' chunk rows): the
    /// backend resolves each tensor cell to its pointer, uploads the table, passes its address.
    Table(&'a [Cell<'a>]),
}

/// One cell of an [`Arg::Table`].
pub(crate) enum Cell<'a> {
    Ptr(&'a Tensor),
    U64(u64),
}

/// The read-locked storage of every tensor argument, in order: held by a backend until the
/// launch is queued, so no one frees or replaces a storage in between.
pub(crate) fn locked<'a>(
    args: &'a [Arg<'a>],
) -> Vec<(candle_core::StorageRef<'a>, &'a candle_core::Layout)> {
    let mut out = Vec::new();
    for a in args {
        match a {
            Arg::T(t) => out.push(t.storage_and_layout()),
            Arg::Table(cells) => out.extend(cells.iter().filter_map(|c| match c {
                Cell::Ptr(t) => Some(t.storage_and_layout()),
                Cell::U64(_) => None,
            })),
            _ => {}
        }
    }
    out
}

/// What an argument holds once its storages are locked: a tensor's pointer, a table's words
/// (tensor cells resolved), or a scalar the backend passes as it is.
pub(crate) enum Resolved {
    Ptr(u64),
    Table(Vec<u64>),
    Scalar,
}

/// `args` resolved against `ptrs`, the pointers of [`locked`]'s storages in its order.
pub(crate) fn resolve(args: &[Arg], ptrs: &[u64]) -> Vec<Resolved> {
    let mut next = ptrs.iter().copied();
    let mut ptr = || next.next().expect("one pointer per locked tensor");
    args.iter()
        .map(|a| match a {
            Arg::T(_) => Resolved::Ptr(ptr()),
            Arg::Table(cells) => Resolved::Table(
                cells
                    .iter()
                    .map(|c| match c {
                        Cell::Ptr(_) => ptr(),
                        Cell::U64(v) => *v,
                    })
                    .collect(),
            ),
            _ => Resolved::Scalar,
        })
        .collect()
}

/// Grid and block sizes (x only) and dynamic shared memory of one launch.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LaunchConfig {
    pub grid_dim: (u32, u32, u32),
    pub block_dim: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

/// The suffix of the kernel instantiated for `dtype`.
fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        d => bail!("kindling-kernels: no kernel for {d:?}"),
    })
}

/// A grid-stride launch over n elements.
fn elementwise(n: usize) -> LaunchConfig {
    const THREADS: u32 = 256;
    let blocks = n.div_ceil(THREADS as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One warp per row, eight rows per block (the attention probabilities: rows of 128 to 512).
fn warp_per_row(rows: usize) -> LaunchConfig {
    const WARPS: usize = 8;
    LaunchConfig {
        grid_dim: (rows.div_ceil(WARPS) as u32, 1, 1),
        block_dim: (32 * WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Block size for one block per row of `cols`.
fn row_threads(cols: usize) -> u32 {
    (cols.div_ceil(4).next_multiple_of(32)).clamp(32, 1024) as u32
}

/// The dropout arguments: stream, threshold, 1 / (1 - p) rounded to `dtype` (the composed
/// path multiplies by a mask of that value).
fn dropout_args(d: Option<Dropout>, dtype: DType) -> Result<(u64, u32, f32)> {
    Ok(match d {
        None => (0, 0, 1.0),
        Some(Dropout { p, seed }) => {
            let scale = 1.0 / (1.0 - p);
            let scale = match dtype {
                DType::BF16 => half::bf16::from_f32(scale).to_f32(),
                DType::F16 => half::f16::from_f32(scale).to_f32(),
                _ => scale,
            };
            (seed, dropout_threshold(p), scale)
        }
    })
}

fn contiguous(t: &Tensor) -> Result<Tensor> {
    t.detach().contiguous()
}

fn check_same(name: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        bail!(
            "{name}: {:?} {:?} against {:?} {:?}",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        )
    }
    Ok(())
}

/// The scaled keep-mask of inverted dropout over `shape` (1 / (1 - p) kept, 0 dropped) in
/// `dtype`: the CPU's draws (`keep_at`), made on the device.
pub fn dropout_mask(shape: &Shape, dtype: DType, device: &Device, d: Dropout) -> Result<Tensor> {
    let dev = &crate::backend::from_device(device)?;
    let out = empty(shape.clone(), dtype, dev)?;
    let (seed, threshold, scale) = dropout_args(Some(d), dtype)?;
    let n = shape.elem_count();
    launch(
        dev,
        &format!("dropout_mask_{}", suffix(dtype)?),
        elementwise(n),
        &[
            Arg::T(&out),
            Arg::U64(n as u64),
            Arg::U64(seed),
            Arg::U32(threshold),
            Arg::F32(scale),
        ],
    )?;
    Ok(out)
}

/// `(pre, act)` with pre = z + bias (z: (rows, n), bias: (n)) and act = GELU(pre), the exact
/// (erf) GELU of HF's `hidden_act = "gelu"`. cuBLASLt's GELU epilogue is the tanh
/// approximation, a different function from the one the exported config names.
pub fn bias_gelu(z: &Tensor, bias: &Tensor) -> Result<(Tensor, Tensor)> {
    let (z, bias) = (contiguous(z)?, contiguous(bias)?);
    let dev = &device_of(&z)?;
    let cols = z.dim(candle_core::D::Minus1)?;
    if bias.dims() != [cols] || bias.dtype() != z.dtype() {
        bail!("bias_gelu: bias {:?} for rows of {cols}", bias.dims())
    }
    let pre = empty(z.shape().clone(), z.dtype(), dev)?;
    let act = empty(z.shape().clone(), z.dtype(), dev)?;
    let n = z.elem_count();
    launch(
        dev,
        &format!("bias_gelu_fwd_{}", suffix(z.dtype())?),
        elementwise(n),
        &[
            Arg::T(&z),
            Arg::T(&bias),
            Arg::T(&pre),
            Arg::T(&act),
            Arg::U64(n as u64),
            Arg::U32(cols as u32),
        ],
    )?;
    Ok((pre, act))
}

/// dL/dpre of [`bias_gelu`] given dL/dact.
pub fn gelu_backward(dact: &Tensor, pre: &Tensor) -> Result<Tensor> {
    let (dact, pre) = (contiguous(dact)?, contiguous(pre)?);
    check_same("gelu_backward", &dact, &pre)?;
    let dev = &device_of(&pre)?;
    let out = empty(pre.shape().clone(), pre.dtype(), dev)?;
    let n = pre.elem_count();
    launch(
        dev,
        &format!("gelu_bwd_{}", suffix(pre.dtype())?),
        elementwise(n),
        &[
            Arg::T(&dact),
            Arg::T(&pre),
            Arg::T(&out),
            Arg::U64(n as u64),
        ],
    )?;
    Ok(out)
}

/// The attention probabilities of scores (batch, heads, queries, keys): `(probs, dropped)`
/// with probs = softmax(scores * scale + mask) over keys, mask (batch, keys) additive (f32),
/// and dropped = dropout(probs) (probs itself when `dropout` is None). Softmax in f32.
pub fn attention_probs(
    scores: &Tensor,
    mask: &Tensor,
    scale: f32,
    dropout: Option<Dropout>,
) -> Result<(Tensor, Tensor)> {
    let scores = contiguous(scores)?;
    let mask = contiguous(&mask.to_dtype(DType::F32)?)?;
    let (batch, heads, queries, keys) = scores.dims4()?;
    if mask.dims() != [batch, keys] {
        bail!(
            "attention_probs: mask {:?} for scores {:?}",
            mask.dims(),
            scores.dims()
        )
    }
    let dev = &device_of(&scores)?;
    let dtype = scores.dtype();
    let probs = empty(scores.shape().clone(), dtype, dev)?;
    let dropped = match dropout {
        Some(_) => Some(empty(scores.shape().clone(), dtype, dev)?),
        None => None,
    };
    let (seed, threshold, keep_scale) = dropout_args(dropout, dtype)?;
    let rows = batch * heads * queries;
    launch(
        dev,
        &format!("attn_probs_fwd_{}", suffix(dtype)?),
        warp_per_row(rows),
        &[
            Arg::T(&scores),
            Arg::T(&mask),
            Arg::T(&probs),
            dropped.as_ref().map_or(Arg::Null, Arg::T),
            Arg::U32(rows as u32),
            Arg::U32(keys as u32),
            Arg::U32((heads * queries) as u32),
            Arg::F32(scale),
            Arg::U64(seed),
            Arg::U32(threshold),
            Arg::F32(keep_scale),
        ],
    )?;
    let dropped = dropped.unwrap_or_else(|| probs.clone());
    Ok((probs, dropped))
}

/// dL/dscores of [`attention_probs`] given dL/d(dropped), from the kept probabilities.
pub fn attention_probs_backward(
    ddropped: &Tensor,
    probs: &Tensor,
    scale: f32,
    dropout: Option<Dropout>,
) -> Result<Tensor> {
    let (ddropped, probs) = (contiguous(ddropped)?, contiguous(probs)?);
    check_same("attention_probs_backward", &ddropped, &probs)?;
    let dev = &device_of(&probs)?;
    let dtype = probs.dtype();
    let keys = probs.dim(candle_core::D::Minus1)?;
    let rows = probs.elem_count() / keys.max(1);
    let out = empty(probs.shape().clone(), dtype, dev)?;
    let (seed, threshold, keep_scale) = dropout_args(dropout, dtype)?;
    launch(
        dev,
        &format!("attn_probs_bwd_{}", suffix(dtype)?),
        warp_per_row(rows),
        &[
            Arg::T(&ddropped),
            Arg::T(&probs),
            Arg::T(&out),
            Arg::U32(rows as u32),
            Arg::U32(keys as u32),
            Arg::F32(scale),
            Arg::U64(seed),
            Arg::U32(threshold),
            Arg::F32(keep_scale),
        ],
    )?;
    Ok(out)
}

/// What the LayerNorm backward pass reads: the normalised sums and their row statistics.
#[derive(Clone)]
pub struct LayerNormSaved {
    /// dropout(z + bias) + residual, in the activations' dtype (rows, cols).
    pub sum: Tensor,
    /// Row means and reciprocal standard deviations, f32 (rows).
    pub mean: Tensor,
    pub rstd: Tensor,
    /// The rows' places in the padded layout, when unpadded (dropout draws by them).
    pub rows: Option<Tensor>,
}

/// y = LayerNorm(dropout(z + bias) + residual) * gamma + beta over the last dimension of z
/// (rows, cols); bias and residual optional. Statistics in f32. `map`: when the rows are
/// unpadded, each row's place in the padded layout (u32, one per row), by which the dropout
/// draws, so a row drops what it drops padded.
#[allow(clippy::too_many_arguments)]
pub fn add_layer_norm(
    z: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    dropout: Option<Dropout>,
    map: Option<&Tensor>,
) -> Result<(Tensor, LayerNormSaved)> {
    let z = contiguous(z)?;
    let (rows, cols) = z.dims2()?;
    let map = row_map(map, rows)?;
    if cols > MAX_LAYER_NORM_WIDTH {
        bail!("add_layer_norm: rows of {cols} exceed {MAX_LAYER_NORM_WIDTH}")
    }
    let dev = &device_of(&z)?;
    let dtype = z.dtype();
    let vector = |v: &Tensor, what: &str| -> Result<Tensor> {
        if v.dims() != [cols] || v.dtype() != dtype {
            bail!(
                "add_layer_norm: {what} {:?} {:?} for rows of {cols}",
                v.dims(),
                v.dtype()
            )
        }
        contiguous(v)
    };
    let (gamma, beta) = (vector(gamma, "gamma")?, vector(beta, "beta")?);
    let bias = bias.map(|b| vector(b, "bias")).transpose()?;
    let residual = residual.map(contiguous).transpose()?;
    if let Some(r) = &residual {
        check_same("add_layer_norm residual", r, &z)?;
    }
    // Without a bias, residual or dropout the sum is z itself.
    let writes_sum = residual.is_some() || bias.is_some() || dropout.is_some();
    let sum = match writes_sum {
        true => empty((rows, cols), dtype, dev)?,
        false => z.clone(),
    };
    let y = empty((rows, cols), dtype, dev)?;
    let mean = empty(rows, DType::F32, dev)?;
    let rstd = empty(rows, DType::F32, dev)?;
    let (seed, threshold, keep_scale) = dropout_args(dropout, dtype)?;
    launch(
        dev,
        &format!("add_ln_fwd_{}", suffix(dtype)?),
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (row_threads(cols), 1, 1),
            shared_mem_bytes: (cols * 4) as u32,
        },
        &[
            Arg::T(&z),
            bias.as_ref().map_or(Arg::Null, Arg::T),
            residual.as_ref().map_or(Arg::Null, Arg::T),
            Arg::T(&gamma),
            Arg::T(&beta),
            map.as_ref().map_or(Arg::Null, Arg::T),
            if writes_sum { Arg::T(&sum) } else { Arg::Null },
            Arg::T(&y),
            Arg::T(&mean),
            Arg::T(&rstd),
            Arg::U32(cols as u32),
            Arg::F32(eps as f32),
            Arg::U64(seed),
            Arg::U32(threshold),
            Arg::F32(keep_scale),
        ],
    )?;
    Ok((
        y,
        LayerNormSaved {
            sum,
            mean,
            rstd,
            rows: map,
        },
    ))
}

/// Gradients of [`add_layer_norm`] given dL/dy (+ `dy2`, a second gradient of y from another
/// branch, added first): (dL/dsum = dL/dresidual, dL/dz, dL/dgamma, dL/dbeta, dL/dbias), the
/// last three in f32. dL/dz is dL/dsum through the dropout.
pub struct LayerNormGrads {
    pub dsum: Tensor,
    pub dz: Tensor,
    pub dgamma: Tensor,
    pub dbeta: Tensor,
    pub dbias: Tensor,
}

/// Rows per block in the LayerNorm backward pass: enough blocks to fill a large GPU (16384
/// rows: 512 blocks), few enough partial rows to add.
const LN_BWD_ROWS: usize = 32;

pub fn add_layer_norm_backward(
    dy: &Tensor,
    dy2: Option<&Tensor>,
    saved: &LayerNormSaved,
    gamma: &Tensor,
    dropout: Option<Dropout>,
) -> Result<LayerNormGrads> {
    let dy = contiguous(dy)?;
    let sum = &saved.sum;
    check_same("add_layer_norm_backward", &dy, sum)?;
    let dy2 = dy2.map(contiguous).transpose()?;
    if let Some(d) = &dy2 {
        check_same("add_layer_norm_backward dy2", d, sum)?;
    }
    let (rows, cols) = sum.dims2()?;
    let dev = &device_of(sum)?;
    let dtype = sum.dtype();
    let gamma = contiguous(gamma)?;
    let dsum = empty((rows, cols), dtype, dev)?;
    let dz = match dropout {
        Some(_) => Some(empty((rows, cols), dtype, dev)?),
        None => None,
    };
    let blocks = rows.div_ceil(LN_BWD_ROWS).max(1);
    let partials = empty((blocks, 3 * cols), DType::F32, dev)?;
    let (seed, threshold, keep_scale) = dropout_args(dropout, dtype)?;
    launch(
        dev,
        &format!("add_ln_bwd_{}", suffix(dtype)?),
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (row_threads(cols), 1, 1),
            shared_mem_bytes: (5 * cols * 4) as u32,
        },
        &[
            Arg::T(&dy),
            dy2.as_ref().map_or(Arg::Null, Arg::T),
            Arg::T(sum),
            Arg::T(&saved.mean),
            Arg::T(&saved.rstd),
            Arg::T(&gamma),
            saved.rows.as_ref().map_or(Arg::Null, Arg::T),
            Arg::T(&dsum),
            dz.as_ref().map_or(Arg::Null, Arg::T),
            Arg::T(&partials),
            Arg::U32(rows as u32),
            Arg::U32(cols as u32),
            Arg::U32(LN_BWD_ROWS as u32),
            Arg::U64(seed),
            Arg::U32(threshold),
            Arg::F32(keep_scale),
        ],
    )?;
    let sums = column_sums(&partials)?;
    Ok(LayerNormGrads {
        dz: dz.unwrap_or_else(|| dsum.clone()),
        dsum,
        dgamma: sums.narrow(0, 0, cols)?,
        dbeta: sums.narrow(0, cols, cols)?,
        dbias: sums.narrow(0, 2 * cols, cols)?,
    })
}

/// Column sums of an f32 (parts, width) tensor, rows added in order.
pub fn column_sums(partials: &Tensor) -> Result<Tensor> {
    let partials = contiguous(partials)?;
    if partials.dtype() != DType::F32 {
        bail!("column_sums: f32 partials, got {:?}", partials.dtype())
    }
    let (parts, width) = partials.dims2()?;
    let dev = &device_of(&partials)?;
    let out = empty(width, DType::F32, dev)?;
    launch(
        dev,
        "column_sums_f32",
        LaunchConfig {
            grid_dim: (width.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::T(&partials),
            Arg::T(&out),
            Arg::U32(parts as u32),
            Arg::U32(width as u32),
        ],
    )?;
    Ok(out)
}

/// Mean cross-entropy of logits (rows, classes) against labels (rows, u32, each < classes):
/// `(loss, grad)`, loss a 0-dim f32 tensor, grad = dL/dlogits = (softmax - onehot) / rows in the
/// logits' dtype, from the same pass (the logits are read twice, never copied to f32). `grad`
/// is skipped (None) when `with_grad` is false.
pub fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    with_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (logits, labels) = (contiguous(logits)?, contiguous(labels)?);
    let (rows, classes) = logits.dims2()?;
    if labels.dims() != [rows] || labels.dtype() != DType::U32 {
        bail!(
            "cross_entropy: labels {:?} {:?} for {rows} rows",
            labels.dims(),
            labels.dtype()
        )
    }
    let dev = &device_of(&logits)?;
    let dtype = logits.dtype();
    if rows == 0 {
        // No rows: a zero loss with a zero gradient (not the NaN of a mean over nothing).
        let grad = with_grad
            .then(|| Tensor::zeros((0, classes), dtype, logits.device()))
            .transpose()?;
        return Ok((Tensor::zeros((), DType::F32, logits.device())?, grad));
    }
    let loss_rows = empty(rows, DType::F32, dev)?;
    let grad = match with_grad {
        true => Some(empty((rows, classes), dtype, dev)?),
        false => None,
    };
    let inv = 1.0 / rows as f32;
    launch(
        dev,
        &format!("cross_entropy_fwd_{}", suffix(dtype)?),
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (row_threads(classes).min(512), 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::T(&logits),
            Arg::T(&labels),
            Arg::T(&loss_rows),
            grad.as_ref().map_or(Arg::Null, Arg::T),
            Arg::U32(classes as u32),
            Arg::F32(inv),
        ],
    )?;
    let loss = empty((), DType::F32, dev)?;
    launch(
        dev,
        "scaled_sum_f32",
        LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::T(&loss_rows),
            Arg::T(&loss),
            Arg::U32(rows as u32),
            Arg::F32(inv),
        ],
    )?;
    Ok((loss, grad))
}

/// dL/dtable (vocab, cols) in f32 of a row lookup `table[ids]` given dL/drows (ids.len(), cols):
/// rows are grouped by id here on the host (the ids came from there) and each id's rows summed
/// in order by one block: no atomics (the result does not depend on scheduling) and no
/// per-column scatter (candle's index_add gives each column one thread).
pub fn embedding_grad(drows: &Tensor, ids: &[u32], vocab: usize) -> Result<Tensor> {
    let drows = contiguous(drows)?;
    let (n, cols) = drows.dims2()?;
    if ids.len() != n {
        bail!("embedding_grad: {} ids for {n} rows", ids.len())
    }
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("embedding_grad: id {bad} outside a table of {vocab}")
    }
    let dev = &device_of(&drows)?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by_key(|&k| ids[k as usize]); // stable: rows of one id stay in order
    let (mut unique, mut starts) = (Vec::new(), Vec::new());
    for (k, &row) in order.iter().enumerate() {
        let id = ids[row as usize];
        if unique.last() != Some(&id) {
            unique.push(id);
            starts.push(k as u32);
        }
    }
    starts.push(n as u32);
    let out = Tensor::zeros((vocab, cols), DType::F32, drows.device())?;
    if unique.is_empty() {
        return Ok(out);
    }
    let blocks = unique.len();
    let (order, starts, unique) = (
        Tensor::new(order.as_slice(), drows.device())?,
        Tensor::new(starts.as_slice(), drows.device())?,
        Tensor::new(unique.as_slice(), drows.device())?,
    );
    launch(
        dev,
        &format!("embedding_grad_{}", suffix(drows.dtype())?),
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (row_threads(cols).min(256), 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::T(&drows),
            Arg::T(&order),
            Arg::T(&starts),
            Arg::T(&unique),
            Arg::T(&out),
            Arg::U32(cols as u32),
        ],
    )?;
    Ok(out)
}

/// A row map checked: u32, one place per row, contiguous.
fn row_map(map: Option<&Tensor>, rows: usize) -> Result<Option<Tensor>> {
    let Some(m) = map else { return Ok(None) };
    if m.dims() != [rows] || m.dtype() != DType::U32 {
        bail!("row map {:?} {:?} for {rows} rows", m.dims(), m.dtype())
    }
    Ok(Some(contiguous(m)?))
}

/// A (batch, heads, seq, head_dim) output: zeroed when only some places are written (unpadded
/// rows), else left for the kernel to fill.
fn heads_out(like: &Tensor, shape: (usize, usize, usize, usize), partial: bool) -> Result<Tensor> {
    match partial {
        true => Tensor::zeros(shape, like.dtype(), like.device()),
        false => empty(shape, like.dtype(), &device_of(like)?),
    }
}

/// The (seq, heads, head_dim) launch arguments of the head moves.
fn head_args<'a>(n: usize, seq: usize, heads: usize, head_dim: usize) -> [Arg<'a>; 4] {
    [
        Arg::U64(n as u64),
        Arg::U32(seq as u32),
        Arg::U32(heads as u32),
        Arg::U32(head_dim as u32),
    ]
}

/// q, k, v (batch, heads, seq, head_dim) from z (rows, 3 * hidden) = x [Wq; Wk; Wv]^T and the
/// three biases concatenated (3 * hidden): the bias add and the head split in one pass. Rows
/// are batch * seq, or fewer, unpadded, with `map` giving their places (the others zero).
pub fn qkv_split(
    z: &Tensor,
    bias: &Tensor,
    (batch, seq, heads): (usize, usize, usize),
    map: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (z, bias) = (contiguous(z)?, contiguous(bias)?);
    let (rows, width) = z.dims2()?;
    let map = row_map(map, rows)?;
    let full = map.is_none();
    if (full && rows != batch * seq) || width % (3 * heads) != 0 || bias.dims() != [width] {
        bail!(
            "qkv_split: z {:?}, bias {:?} for {batch} x {seq}, {heads} heads",
            z.dims(),
            bias.dims()
        )
    }
    let head_dim = width / 3 / heads;
    let dev = &device_of(&z)?;
    let shape = (batch, heads, seq, head_dim);
    let (q, k, v) = (
        heads_out(&z, shape, !full)?,
        heads_out(&z, shape, !full)?,
        heads_out(&z, shape, !full)?,
    );
    let n = z.elem_count();
    let mut args = vec![
        Arg::T(&z),
        Arg::T(&bias),
        map.as_ref().map_or(Arg::Null, Arg::T),
        Arg::T(&q),
        Arg::T(&k),
        Arg::T(&v),
    ];
    args.extend(head_args(n, seq, heads, head_dim));
    launch(
        dev,
        &format!("qkv_split_{}", suffix(z.dtype())?),
        elementwise(n),
        &args,
    )?;
    Ok((q, k, v))
}

/// The inverse of [`qkv_split`]'s layout move: dz (rows, 3 * hidden) from dq, dk, dv, at the
/// places `map` gives (all batch * seq without one).
pub fn qkv_merge(dq: &Tensor, dk: &Tensor, dv: &Tensor, map: Option<&Tensor>) -> Result<Tensor> {
    let (dq, dk, dv) = (contiguous(dq)?, contiguous(dk)?, contiguous(dv)?);
    check_same("qkv_merge", &dq, &dk)?;
    check_same("qkv_merge", &dq, &dv)?;
    let (batch, heads, seq, head_dim) = dq.dims4()?;
    let rows = map.map_or(Ok(batch * seq), |m| m.dim(0))?;
    let map = row_map(map, rows)?;
    let dev = &device_of(&dq)?;
    let dtype = dq.dtype();
    let dz = empty((rows, 3 * heads * head_dim), dtype, dev)?;
    let n = dz.elem_count();
    let mut args = vec![
        Arg::T(&dq),
        Arg::T(&dk),
        Arg::T(&dv),
        map.as_ref().map_or(Arg::Null, Arg::T),
        Arg::T(&dz),
    ];
    args.extend(head_args(n, seq, heads, head_dim));
    launch(
        dev,
        &format!("qkv_merge_{}", suffix(dtype)?),
        elementwise(n),
        &args,
    )?;
    Ok(dz)
}

/// The attention context (batch, heads, seq, head_dim) as rows (rows, hidden), heads merged:
/// every place, or those `map` gives (unpadded rows).
pub fn heads_to_rows(ctx: &Tensor, map: Option<&Tensor>) -> Result<Tensor> {
    let ctx = contiguous(ctx)?;
    let (batch, heads, seq, head_dim) = ctx.dims4()?;
    let rows = map.map_or(Ok(batch * seq), |m| m.dim(0))?;
    let map = row_map(map, rows)?;
    let dev = &device_of(&ctx)?;
    let out = empty((rows, heads * head_dim), ctx.dtype(), dev)?;
    let n = out.elem_count();
    let mut args = vec![
        Arg::T(&ctx),
        Arg::T(&out),
        map.as_ref().map_or(Arg::Null, Arg::T),
    ];
    args.extend(head_args(n, seq, heads, head_dim));
    launch(
        dev,
        &format!("heads_to_rows_{}", suffix(ctx.dtype())?),
        elementwise(n),
        &args,
    )?;
    Ok(out)
}

/// The inverse of [`heads_to_rows`]: rows (rows, hidden) into (batch, heads, seq, head_dim),
/// places without a row zero.
pub fn rows_to_heads(
    x: &Tensor,
    (batch, seq, heads): (usize, usize, usize),
    map: Option<&Tensor>,
) -> Result<Tensor> {
    let x = contiguous(x)?;
    let (rows, hidden) = x.dims2()?;
    let map = row_map(map, rows)?;
    if (map.is_none() && rows != batch * seq) || hidden % heads != 0 {
        bail!(
            "rows_to_heads: {:?} for {batch} x {seq}, {heads} heads",
            x.dims()
        )
    }
    let head_dim = hidden / heads;
    let out = heads_out(&x, (batch, heads, seq, head_dim), map.is_some())?;
    let n = x.elem_count();
    let mut args = vec![
        Arg::T(&out),
        Arg::T(&x),
        map.as_ref().map_or(Arg::Null, Arg::T),
    ];
    args.extend(head_args(n, seq, heads, head_dim));
    launch(
        &device_of(&x)?,
        &format!("rows_to_heads_{}", suffix(x.dtype())?),
        elementwise(n),
        &args,
    )?;
    Ok(out)
}

/// AdamW's hyperparameters for one update of one tensor.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub lr: f32,
    /// 1 - lr * weight_decay (1 without decay).
    pub decay: f32,
    /// Bias corrections 1 - beta^t.
    pub bc1: f32,
    pub bc2: f32,
    pub eps: f32,
}

/// One AdamW update in place, one pass: m, v and theta (all f32, contiguous, same shape,
/// owned by the optimiser) from the gradient g.
pub fn adamw_step(theta: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, h: AdamWStep) -> Result<()> {
    for t in [m, v, g] {
        check_same("adamw_step", theta, t)?;
    }
    if theta.dtype() != DType::F32
        || !theta.is_contiguous()
        || !m.is_contiguous()
        || !v.is_contiguous()
    {
        bail!("adamw_step: contiguous f32 parameters and moments")
    }
    let g = contiguous(g)?;
    let dev = &device_of(theta)?;
    let n = theta.elem_count();
    launch(
        dev,
        "adamw_f32",
        elementwise(n),
        &[
            Arg::T(theta),
            Arg::T(m),
            Arg::T(v),
            Arg::T(&g),
            Arg::U64(n as u64),
            Arg::F32(h.beta1),
            Arg::F32(1.0 - h.beta1),
            Arg::F32(h.beta2),
            Arg::F32(1.0 - h.beta2),
            Arg::F32(h.lr),
            Arg::F32(h.decay),
            Arg::F32(h.bc1),
            Arg::F32(h.bc2),
            Arg::F32(h.eps),
        ],
    )
}

/// Elements per chunk of the multi-tensor kernels: one block each.
const CHUNK: usize = 65_536;

/// Each tensor's chunks: (tensor index, element offset, length).
fn chunks(lens: &[usize]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (t, &n) in lens.iter().enumerate() {
        for start in (0..n).step_by(CHUNK) {
            out.push((t, start, (n - start).min(CHUNK)));
        }
    }
    out
}

/// The sum of the squares of every element of `tensors` (f32, contiguous, one device): one
/// launch over all of them, chunk sums added on the host in f64. The gradient norm's reduction:
/// per tensor it was four ops and an allocation each (9.5 ms for BERT-base's 202 on an H200).
pub fn sum_of_squares(tensors: &[&Tensor]) -> Result<f64> {
    let Some(first) = tensors.first() else {
        return Ok(0.0);
    };
    let dev = &device_of(first)?;
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        if t.dtype() != DType::F32
            || !t.is_contiguous()
            || t.device().location() != first.device().location()
        {
            bail!("sum_of_squares: contiguous f32 tensors on one device")
        }
        views.push(t.flatten_all()?);
    }
    let parts = chunks(&views.iter().map(|t| t.elem_count()).collect::<Vec<_>>());
    if parts.is_empty() {
        return Ok(0.0);
    }
    let pieces: Vec<Tensor> = parts
        .iter()
        .map(|&(t, start, n)| views[t].narrow(0, start, n))
        .collect::<Result<_>>()?;
    let cells: Vec<Cell> = pieces
        .iter()
        .zip(&parts)
        .flat_map(|(p, &(_, _, n))| [Cell::Ptr(p), Cell::U64(n as u64)])
        .collect();
    let partials = empty(parts.len(), DType::F32, dev)?;
    launch(
        dev,
        "sum_squares_multi_f32",
        LaunchConfig {
            grid_dim: (parts.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[Arg::Table(&cells), Arg::T(&partials)],
    )?;
    Ok(partials.to_vec1::<f32>()?.iter().map(|&v| v as f64).sum())
}

/// One tensor of an [`adamw_multi`] update: parameters, moments, gradient (f32, contiguous,
/// one shape), its learning rate and decay factor (1 - lr * weight_decay, or 1).
pub struct AdamWSlot<'a> {
    pub theta: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub g: &'a Tensor,
    pub lr: f32,
    pub decay: f32,
}

/// AdamW on many tensors in one launch ([`adamw_step`]'s arithmetic; `h.lr` and `h.decay` are
/// unused, each slot has its own). In place.
pub fn adamw_multi(slots: &[AdamWSlot], h: AdamWStep) -> Result<()> {
    let Some(first) = slots.first() else {
        return Ok(());
    };
    let dev = &device_of(first.theta)?;
    let mut views = Vec::with_capacity(slots.len());
    for s in slots {
        for t in [s.m, s.v, s.g] {
            check_same("adamw_multi", s.theta, t)?;
        }
        let all = [s.theta, s.m, s.v, s.g];
        if s.theta.dtype() != DType::F32 || all.iter().any(|t| !t.is_contiguous()) {
            bail!("adamw_multi: contiguous f32 parameters, moments and gradients")
        }
        views.push(
            all.map(|t| t.flatten_all())
                .into_iter()
                .collect::<Result<Vec<_>>>()?,
        );
    }
    let parts = chunks(&views.iter().map(|v| v[0].elem_count()).collect::<Vec<_>>());
    if parts.is_empty() {
        return Ok(());
    }
    let pieces: Vec<[Tensor; 4]> = parts
        .iter()
        .map(|&(t, start, n)| {
            let v = &views[t];
            Ok([
                v[0].narrow(0, start, n)?,
                v[1].narrow(0, start, n)?,
                v[2].narrow(0, start, n)?,
                v[3].narrow(0, start, n)?,
            ])
        })
        .collect::<Result<_>>()?;
    let cells: Vec<Cell> = pieces
        .iter()
        .zip(&parts)
        .flat_map(|(p, &(t, _, n))| {
            let bits = (slots[t].lr.to_bits() as u64) | ((slots[t].decay.to_bits() as u64) << 32);
            [
                Cell::Ptr(&p[0]),
                Cell::Ptr(&p[1]),
                Cell::Ptr(&p[2]),
                Cell::Ptr(&p[3]),
                Cell::U64(n as u64),
                Cell::U64(bits),
            ]
        })
        .collect();
    launch(
        dev,
        "adamw_multi_f32",
        LaunchConfig {
            grid_dim: (parts.len() as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        },
        &[
            Arg::Table(&cells),
            Arg::F32(h.beta1),
            Arg::F32(1.0 - h.beta1),
            Arg::F32(h.beta2),
            Arg::F32(1.0 - h.beta2),
            Arg::F32(h.bc1),
            Arg::F32(h.bc2),
            Arg::F32(h.eps),
        ],
    )
}
