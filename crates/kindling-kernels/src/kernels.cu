// Kindling's CUDA kernels: the memory-bound work of a BERT training step, each kernel one pass
// over its rows. Every kernel is instantiated for f32, bf16 and f16 storage (suffixes _f32,
// _bf16, _f16) and computes in f32 inside. Rounding to the storage type happens where candle's
// composed ops round (after the bias add, after the dropout product, after the residual add), so
// the composed ops stay a close reference in bf16 too.
//
// Dropout draws are keep_at(seed, flat index): the SplitMix64 stream of
// crates/kindling-models/src/ops/dropout.rs, bit for bit, so a GPU run drops the elements the CPU
// run drops and the backward passes recompute masks instead of reading stored ones.
//
// Sums are taken in a fixed order (warp shuffles in a fixed pattern, per-block partials added in
// block order): the same inputs give the same bits, run after run.

#ifndef KINDLING_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
// A block's dynamic shared memory (the launch's shared_mem_bytes), as floats.
#define KINDLING_DYNAMIC_SHARED(name) extern __shared__ float name[]
#endif

typedef __nv_bfloat16 bf16;
typedef __half f16;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(f16 x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ f16 from_f<f16>(float x) { return __float2half(x); }

// x rounded to T and back: where the composed ops hold a value in T.
template <typename T> __device__ __forceinline__ float round_to(float x) {
  return to_f(from_f<T>(x));
}

// ---- dropout: the CPU's counter-based stream ----

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Whether element i of stream `seed` is kept; threshold = round(p * 65536) (0: no dropout).
__device__ __forceinline__ bool keep_at(uint64_t seed, uint64_t i, uint32_t threshold) {
  if (threshold == 0) return true;
  uint64_t word = mix64(seed ^ ((i >> 2) * 0xD1B54A32D192ED03ull));
  return (uint32_t)((word >> ((i & 3) * 16)) & 0xffff) >= threshold;
}

// Row r's place in the padded (batch, seq) layout: rows[r] for unpadded rows, r without a map.
__device__ __forceinline__ uint64_t padded_row(const uint32_t* rows, uint64_t r) {
  return rows ? rows[r] : r;
}

// ---- reductions ----

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum (or max) over the block; blockDim.x a multiple of 32. Every thread gets the result.
template <bool MAX> __device__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read by an earlier call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? scratch[lane] : (MAX ? -INFINITY : 0.f);
    w = MAX ? warp_max(w) : warp_sum(w);
    if (lane == 0) scratch[32] = w;
  }
  __syncthreads();
  return scratch[32];
}

// ---- dropout mask (the composed path's mask, the CPU's draws) ----

template <typename T>
__device__ void dropout_mask(T* out, uint64_t n, uint64_t seed, uint32_t threshold, float scale) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x)
    out[i] = from_f<T>(keep_at(seed, i, threshold) ? scale : 0.f);
}

// ---- bias + exact GELU ----

// pre = z + bias (rounded to T, as candle's broadcast_add), act = gelu_erf(pre).
template <typename T>
__device__ void bias_gelu_fwd(const T* z, const T* bias, T* pre, T* act, uint64_t n,
                              uint32_t cols) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    float x = round_to<T>(to_f(z[i]) + to_f(bias[i % cols]));
    pre[i] = from_f<T>(x);
    act[i] = from_f<T>(0.5f * x * (1.f + erff(x * 0.70710678118654752f)));
  }
}

// dpre = dact * (Phi(x) + x phi(x)), x = pre.
template <typename T>
__device__ void gelu_bwd(const T* dact, const T* pre, T* dpre, uint64_t n) {
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    float x = to_f(pre[i]);
    float cdf = 0.5f * (1.f + erff(x * 0.70710678118654752f));
    float pdf = 0.39894228040143268f * expf(-0.5f * x * x);
    dpre[i] = from_f<T>(to_f(dact[i]) * (cdf + x * pdf));
  }
}

// ---- attention probabilities: scale, padding mask, softmax, dropout; one warp per row ----

// scores (rows, cols), rows = batch * heads * queries; mask (batch, cols) additive, f32;
// rows_per_batch = heads * queries. probs = softmax(scores * scale + mask) in T; dropped =
// probs * keep / (1 - p) (null when there is no dropout). keep_scale: 1 / (1 - p) rounded to T.
template <typename T>
__device__ void attn_probs_fwd(const T* scores, const float* mask, T* probs, T* dropped,
                               uint32_t rows, uint32_t cols, uint32_t rows_per_batch, float scale,
                               uint64_t seed, uint32_t threshold, float keep_scale) {
  const uint32_t row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const uint32_t lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* s = scores + (uint64_t)row * cols;
  const float* m = mask + (uint64_t)(row / rows_per_batch) * cols;
  float mx = -INFINITY;
  for (uint32_t j = lane; j < cols; j += 32) mx = fmaxf(mx, to_f(s[j]) * scale + m[j]);
  mx = warp_max(mx);
  float sum = 0.f;
  for (uint32_t j = lane; j < cols; j += 32) sum += expf(to_f(s[j]) * scale + m[j] - mx);
  const float inv = 1.f / warp_sum(sum);
  for (uint32_t j = lane; j < cols; j += 32) {
    const uint64_t i = (uint64_t)row * cols + j;
    const T p = from_f<T>(expf(to_f(s[j]) * scale + m[j] - mx) * inv);
    probs[i] = p;
    if (dropped) dropped[i] = from_f<T>(keep_at(seed, i, threshold) ? to_f(p) * keep_scale : 0.f);
  }
}

// dscores = scale * P * (dP - sum(dP * P)), dP = d(dropped) * keep / (1 - p).
template <typename T>
__device__ void attn_probs_bwd(const T* ddropped, const T* probs, T* dscores, uint32_t rows,
                               uint32_t cols, float scale, uint64_t seed, uint32_t threshold,
                               float keep_scale) {
  const uint32_t row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  const uint32_t lane = threadIdx.x & 31;
  if (row >= rows) return;
  const uint64_t at = (uint64_t)row * cols;
  float dot = 0.f;
  for (uint32_t j = lane; j < cols; j += 32) {
    const uint64_t i = at + j;
    const float dp = keep_at(seed, i, threshold) ? to_f(ddropped[i]) * keep_scale : 0.f;
    dot += dp * to_f(probs[i]);
  }
  dot = warp_sum(dot);
  for (uint32_t j = lane; j < cols; j += 32) {
    const uint64_t i = at + j;
    const float dp = keep_at(seed, i, threshold) ? to_f(ddropped[i]) * keep_scale : 0.f;
    dscores[i] = from_f<T>(scale * to_f(probs[i]) * (dp - dot));
  }
}

// ---- LayerNorm of (dropout(z + bias) + residual); one block per row ----

// sum = round(dropout(round(z + bias)) + residual), y = (sum - mean) * rstd * gamma + beta.
// bias and residual may be null. Shared memory: cols floats (the row of sums).
template <typename T>
__device__ void add_ln_fwd(const T* z, const T* bias, const T* residual, const T* gamma,
                           const T* beta, const uint32_t* rows, T* sum_out, T* y, float* mean_out,
                           float* rstd_out, uint32_t cols, float eps, uint64_t seed,
                           uint32_t threshold, float keep_scale) {
  KINDLING_DYNAMIC_SHARED(row_buf);
  __shared__ float scratch[33];
  const uint64_t at = (uint64_t)blockIdx.x * cols;
  // Dropout draws by the row's place in the padded layout, so unpadding changes no mask.
  const uint64_t draw = padded_row(rows, blockIdx.x) * cols;
  float local = 0.f;
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
    float a = to_f(z[at + j]);
    if (bias) a = round_to<T>(a + to_f(bias[j]));
    if (threshold) a = keep_at(seed, draw + j, threshold) ? round_to<T>(a * keep_scale) : 0.f;
    const float s = residual ? round_to<T>(a + to_f(residual[at + j])) : a;
    row_buf[j] = s;
    if (sum_out) sum_out[at + j] = from_f<T>(s);
    local += s;
  }
  const float mean = block_reduce<false>(local, scratch) / cols;
  float var = 0.f;
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float d = row_buf[j] - mean;
    var += d * d;
  }
  const float rstd = 1.f / sqrtf(block_reduce<false>(var, scratch) / cols + eps);
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x)
    y[at + j] = from_f<T>((row_buf[j] - mean) * rstd * to_f(gamma[j]) + to_f(beta[j]));
  if (threadIdx.x == 0) {
    mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

// The backward pass of add_ln_fwd over rows_per_block rows per block. g = dy (+ dy2: a second
// gradient of y, from a residual branch; may be null). Writes dsum (dL/dsum = dL/dresidual) and
// dz (dL/dz = dsum through the dropout; null when the caller needs only dsum), and per block the
// partial column sums [3][cols]: dgamma = sum g * xhat, dbeta = sum g, dbias = sum dz, which
// column_sums adds in block order. Shared memory: 5 * cols floats.
template <typename T>
__device__ void add_ln_bwd(const T* dy, const T* dy2, const T* sum, const float* mean,
                           const float* rstd, const T* gamma, const uint32_t* row_map, T* dsum,
                           T* dz, float* partials,
                           uint32_t rows, uint32_t cols, uint32_t rows_per_block, uint64_t seed,
                           uint32_t threshold, float keep_scale) {
  KINDLING_DYNAMIC_SHARED(buf);
  __shared__ float scratch[33];
  float* dn = buf;
  float* xh = buf + cols;
  float* acc_gamma = buf + 2 * cols;
  float* acc_beta = buf + 3 * cols;
  float* acc_bias = buf + 4 * cols;
  // Every column j is only ever touched by thread j % blockDim.x: no races, no syncs on buf.
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x)
    acc_gamma[j] = acc_beta[j] = acc_bias[j] = 0.f;
  const uint32_t first = blockIdx.x * rows_per_block;
  const uint32_t last = min(rows, first + rows_per_block);
  for (uint32_t r = first; r < last; ++r) {
    const uint64_t at = (uint64_t)r * cols;
    const float mu = mean[r], rs = rstd[r];
    float c1 = 0.f, c2 = 0.f;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
      float g = to_f(dy[at + j]);
      if (dy2) g = round_to<T>(g + to_f(dy2[at + j]));
      const float x = (to_f(sum[at + j]) - mu) * rs;
      const float d = g * to_f(gamma[j]);
      dn[j] = d;
      xh[j] = x;
      acc_gamma[j] += g * x;
      acc_beta[j] += g;
      c1 += d;
      c2 += d * x;
    }
    c1 = block_reduce<false>(c1, scratch) / cols;
    c2 = block_reduce<false>(c2, scratch) / cols;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float ds = round_to<T>(rs * (dn[j] - c1 - xh[j] * c2));
      dsum[at + j] = from_f<T>(ds);
      const float d = !threshold                            ? ds
                      : keep_at(seed, padded_row(row_map, r) * cols + j, threshold)
                          ? round_to<T>(ds * keep_scale)
                                                         : 0.f;
      if (dz) dz[at + j] = from_f<T>(d);
      acc_bias[j] += d;
    }
  }
  float* part = partials + (uint64_t)blockIdx.x * 3 * cols;
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
    part[j] = acc_gamma[j];
    part[cols + j] = acc_beta[j];
    part[2 * cols + j] = acc_bias[j];
  }
}

// out[j] = sum over p of partials[p * width + j], p in order.
extern "C" __global__ void column_sums_f32(const float* partials, float* out, uint32_t parts,
                                           uint32_t width) {
  const uint32_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= width) return;
  float acc = 0.f;
  for (uint32_t p = 0; p < parts; ++p) acc += partials[(uint64_t)p * width + j];
  out[j] = acc;
}

// ---- cross-entropy over rows, with its gradient in the same pass; one block per row ----

// loss_rows[r] = logsumexp(x_r) - x_r[label]; grad = (softmax(x_r) - onehot) * grad_scale.
template <typename T>
__device__ void cross_entropy_fwd(const T* logits, const uint32_t* labels, float* loss_rows,
                                  T* grad, uint32_t cols, float grad_scale) {
  __shared__ float scratch[33];
  const uint64_t at = (uint64_t)blockIdx.x * cols;
  const T* x = logits + at;
  float mx = -INFINITY;
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) mx = fmaxf(mx, to_f(x[j]));
  mx = block_reduce<true>(mx, scratch);
  float sum = 0.f;
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) sum += expf(to_f(x[j]) - mx);
  sum = block_reduce<false>(sum, scratch);
  const uint32_t label = labels[blockIdx.x];
  if (threadIdx.x == 0) loss_rows[blockIdx.x] = mx + logf(sum) - to_f(x[label]);
  if (grad) {
    const float inv = 1.f / sum;
    for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x)
      grad[at + j] =
          from_f<T>((expf(to_f(x[j]) - mx) * inv - (j == label ? 1.f : 0.f)) * grad_scale);
  }
}

// out[0] = scale * sum(values), one block, in a fixed order.
extern "C" __global__ void scaled_sum_f32(const float* values, float* out, uint32_t n,
                                          float scale) {
  __shared__ float scratch[33];
  float acc = 0.f;
  for (uint32_t i = threadIdx.x; i < n; i += blockDim.x) acc += values[i];
  acc = block_reduce<false>(acc, scratch);
  if (threadIdx.x == 0) out[0] = acc * scale;
}

// ---- embedding gradient: rows grouped by id on the host, summed in order; no atomics ----

// Block u sums the rows order[starts[u]..starts[u+1]] of dy into row ids[u] of out (f32).
template <typename T>
__device__ void embedding_grad(const T* dy, const uint32_t* order, const uint32_t* starts,
                               const uint32_t* ids, float* out, uint32_t cols) {
  const uint32_t u = blockIdx.x;
  const uint32_t begin = starts[u], end = starts[u + 1];
  float* o = out + (uint64_t)ids[u] * cols;
  for (uint32_t j = threadIdx.x; j < cols; j += blockDim.x) {
    float acc = 0.f;
    for (uint32_t k = begin; k < end; ++k) acc += to_f(dy[(uint64_t)order[k] * cols + j]);
    o[j] = acc;
  }
}

// ---- the fused q, k, v projection: bias and the split into heads in one pass ----
//
// Rows may be unpadded: `rows` (null: the identity) gives each row of z its place b * seq + s
// in the padded (batch, seq) layout, whose other places the caller has zeroed.

// Where column c (< hidden) of row r goes in a (batch, heads, seq, head_dim) tensor.
__device__ __forceinline__ uint64_t head_place(const uint32_t* rows, uint64_t r, uint32_t c,
                                               uint32_t seq, uint32_t heads, uint32_t head_dim) {
  const uint64_t row = padded_row(rows, r), b = row / seq, s = row % seq;
  return ((b * heads + c / head_dim) * seq + s) * head_dim + c % head_dim;
}

// z (n, 3 * hidden) = x [Wq; Wk; Wv]^T; q, k, v (batch, heads, seq, head_dim) = the three
// column blocks plus their bias, heads split out.
template <typename T>
__device__ void qkv_split(const T* z, const T* bias, const uint32_t* rows, T* q, T* k, T* v,
                          uint64_t n, uint32_t seq, uint32_t heads, uint32_t head_dim) {
  const uint32_t hidden = heads * head_dim;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    const uint32_t c = i % (3 * hidden), which = c / hidden;
    T* out = which == 0 ? q : which == 1 ? k : v;
    out[head_place(rows, i / (3 * hidden), c % hidden, seq, heads, head_dim)] =
        from_f<T>(to_f(z[i]) + to_f(bias[c]));
  }
}

// The inverse layout move for the backward pass: dz (n, 3 * hidden) from dq, dk, dv.
template <typename T>
__device__ void qkv_merge(const T* dq, const T* dk, const T* dv, const uint32_t* rows, T* dz,
                          uint64_t n, uint32_t seq, uint32_t heads, uint32_t head_dim) {
  const uint32_t hidden = heads * head_dim;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    const uint32_t c = i % (3 * hidden), which = c / hidden;
    const T* src = which == 0 ? dq : which == 1 ? dk : dv;
    dz[i] = src[head_place(rows, i / (3 * hidden), c % hidden, seq, heads, head_dim)];
  }
}

// The attention context (batch, heads, seq, head_dim) as rows (n, hidden), heads merged
// (to_rows), or rows back into heads (from_rows: the backward pass; other places zeroed).
template <typename T>
__device__ void heads_rows(const T* heads_t, T* rows_t, const uint32_t* rows, uint64_t n,
                           uint32_t seq, uint32_t heads, uint32_t head_dim, bool to_rows) {
  const uint32_t hidden = heads * head_dim;
  for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n;
       i += (uint64_t)blockDim.x * gridDim.x) {
    const uint64_t at = head_place(rows, i / hidden, i % hidden, seq, heads, head_dim);
    if (to_rows)
      rows_t[i] = heads_t[at];
    else
      const_cast<T*>(heads_t)[at] = rows_t[i];
  }
}

// ---- AdamW, one pass per parameter tensor (f32 master weights and moments) ----

// m = b1 m + c1 g; v = b2 v + c2 g^2; theta = decay theta - lr (m / bc1) / (sqrt(v / bc2) + eps),
// over elements first, first + step, ... < n.
__device__ __forceinline__ void adamw_span(float* theta, float* m, float* v, const float* g,
                                           uint64_t n, uint64_t first, uint64_t step, float b1,
                                           float c1, float b2, float c2, float lr, float decay,
                                           float bc1, float bc2, float eps) {
  for (uint64_t i = first; i < n; i += step) {
    const float gi = g[i];
    const float mi = b1 * m[i] + c1 * gi;
    const float vi = b2 * v[i] + c2 * (gi * gi);
    m[i] = mi;
    v[i] = vi;
    theta[i] = decay * theta[i] - lr * ((mi / bc1) / (sqrtf(vi / bc2) + eps));
  }
}

extern "C" __global__ void adamw_f32(float* theta, float* m, float* v, const float* g, uint64_t n,
                                     float b1, float c1, float b2, float c2, float lr, float decay,
                                     float bc1, float bc2, float eps) {
  adamw_span(theta, m, v, g, n, blockIdx.x * (uint64_t)blockDim.x + threadIdx.x,
             (uint64_t)blockDim.x * gridDim.x, b1, c1, b2, c2, lr, decay, bc1, bc2, eps);
}

// ---- multi-tensor passes: one launch over many tensors, a table of chunks ----
//
// The host cuts every tensor into chunks of at most 65,536 elements and writes one table row
// per chunk; block c takes row c. The table is one upload per call instead of a launch per
// tensor (BERT-base has 202 parameter tensors).

// Row c = (pointer, length): partials[c] = the chunk's sum of squares (f32 within a chunk; the
// host adds the chunks in f64).
extern "C" __global__ void sum_squares_multi_f32(const uint64_t* table, float* partials) {
  __shared__ float scratch[33];
  const float* x = reinterpret_cast<const float*>(table[2 * blockIdx.x]);
  const uint64_t n = table[2 * blockIdx.x + 1];
  float acc = 0.f;
  for (uint64_t i = threadIdx.x; i < n; i += blockDim.x) acc += x[i] * x[i];
  acc = block_reduce<false>(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// Row c = (theta, m, v, g, length, lr and decay as two f32 bits): adamw_f32 on the chunk.
extern "C" __global__ void adamw_multi_f32(const uint64_t* table, float b1, float c1, float b2,
                                           float c2, float bc1, float bc2, float eps) {
  const uint64_t* row = table + 6 * (uint64_t)blockIdx.x;
  float* theta = reinterpret_cast<float*>(row[0]);
  float* m = reinterpret_cast<float*>(row[1]);
  float* v = reinterpret_cast<float*>(row[2]);
  const float* g = reinterpret_cast<const float*>(row[3]);
  const uint64_t n = row[4];
  const uint32_t lr_bits = (uint32_t)(row[5] & 0xffffffffu), decay_bits = (uint32_t)(row[5] >> 32);
  float lr, decay;
  memcpy(&lr, &lr_bits, 4);
  memcpy(&decay, &decay_bits, 4);
  adamw_span(theta, m, v, g, n, threadIdx.x, blockDim.x, b1, c1, b2, c2, lr, decay, bc1, bc2, eps);
}

// ---- extern "C" entry points, one per storage type ----

#define KINDLING_FOR_TYPES(X) X(float, f32) X(bf16, bf16) X(f16, f16)

#define KINDLING_ENTRIES(T, S)                                                                   \
  extern "C" __global__ void dropout_mask_##S(T* out, uint64_t n, uint64_t seed,                 \
                                              uint32_t threshold, float scale) {                 \
    dropout_mask<T>(out, n, seed, threshold, scale);                                             \
  }                                                                                              \
  extern "C" __global__ void bias_gelu_fwd_##S(const T* z, const T* bias, T* pre, T* act,        \
                                               uint64_t n, uint32_t cols) {                      \
    bias_gelu_fwd<T>(z, bias, pre, act, n, cols);                                                \
  }                                                                                              \
  extern "C" __global__ void gelu_bwd_##S(const T* dact, const T* pre, T* dpre, uint64_t n) {    \
    gelu_bwd<T>(dact, pre, dpre, n);                                                             \
  }                                                                                              \
  extern "C" __global__ void attn_probs_fwd_##S(                                                 \
      const T* scores, const float* mask, T* probs, T* dropped, uint32_t rows, uint32_t cols,    \
      uint32_t rows_per_batch, float scale, uint64_t seed, uint32_t threshold,                   \
      float keep_scale) {                                                                        \
    attn_probs_fwd<T>(scores, mask, probs, dropped, rows, cols, rows_per_batch, scale, seed,     \
                      threshold, keep_scale);                                                    \
  }                                                                                              \
  extern "C" __global__ void attn_probs_bwd_##S(const T* ddropped, const T* probs, T* dscores,   \
                                                uint32_t rows, uint32_t cols, float scale,       \
                                                uint64_t seed, uint32_t threshold,               \
                                                float keep_scale) {                              \
    attn_probs_bwd<T>(ddropped, probs, dscores, rows, cols, scale, seed, threshold, keep_scale); \
  }                                                                                              \
  extern "C" __global__ void add_ln_fwd_##S(                                                     \
      const T* z, const T* bias, const T* residual, const T* gamma, const T* beta,               \
      const uint32_t* rows, T* sum_out, T* y, float* mean_out, float* rstd_out, uint32_t cols,   \
      float eps, uint64_t seed, uint32_t threshold, float keep_scale) {                          \
    add_ln_fwd<T>(z, bias, residual, gamma, beta, rows, sum_out, y, mean_out, rstd_out, cols,    \
                  eps, seed, threshold, keep_scale);                                             \
  }                                                                                              \
  extern "C" __global__ void add_ln_bwd_##S(                                                     \
      const T* dy, const T* dy2, const T* sum, const float* mean, const float* rstd,             \
      const T* gamma, const uint32_t* row_map, T* dsum, T* dz, float* partials, uint32_t rows,   \
      uint32_t cols, uint32_t rows_per_block, uint64_t seed, uint32_t threshold,                 \
      float keep_scale) {                                                                        \
    add_ln_bwd<T>(dy, dy2, sum, mean, rstd, gamma, row_map, dsum, dz, partials, rows, cols,      \
                  rows_per_block, seed, threshold, keep_scale);                                  \
  }                                                                                              \
  extern "C" __global__ void cross_entropy_fwd_##S(const T* logits, const uint32_t* labels,      \
                                                   float* loss_rows, T* grad, uint32_t cols,     \
                                                   float grad_scale) {                           \
    cross_entropy_fwd<T>(logits, labels, loss_rows, grad, cols, grad_scale);                     \
  }                                                                                              \
  extern "C" __global__ void embedding_grad_##S(const T* dy, const uint32_t* order,              \
                                                const uint32_t* starts, const uint32_t* ids,     \
                                                float* out, uint32_t cols) {                     \
    embedding_grad<T>(dy, order, starts, ids, out, cols);                                        \
  }                                                                                              \
  extern "C" __global__ void qkv_split_##S(const T* z, const T* bias, const uint32_t* rows,     \
                                           T* q, T* k, T* v, uint64_t n, uint32_t seq,           \
                                           uint32_t heads, uint32_t head_dim) {                  \
    qkv_split<T>(z, bias, rows, q, k, v, n, seq, heads, head_dim);                               \
  }                                                                                              \
  extern "C" __global__ void qkv_merge_##S(const T* dq, const T* dk, const T* dv,                \
                                           const uint32_t* rows, T* dz, uint64_t n, uint32_t seq, \
                                           uint32_t heads, uint32_t head_dim) {                  \
    qkv_merge<T>(dq, dk, dv, rows, dz, n, seq, heads, head_dim);                                 \
  }                                                                                              \
  extern "C" __global__ void heads_to_rows_##S(const T* heads_t, T* rows_t, const uint32_t* rows, \
                                               uint64_t n, uint32_t seq, uint32_t heads,         \
                                               uint32_t head_dim) {                              \
    heads_rows<T>(heads_t, rows_t, rows, n, seq, heads, head_dim, true);                         \
  }                                                                                              \
  extern "C" __global__ void rows_to_heads_##S(T* heads_t, const T* rows_t, const uint32_t* rows, \
                                               uint64_t n, uint32_t seq, uint32_t heads,         \
                                               uint32_t head_dim) {                              \
    heads_rows<T>(heads_t, const_cast<T*>(rows_t), rows, n, seq, heads, head_dim, false);        \
  }

KINDLING_FOR_TYPES(KINDLING_ENTRIES)
