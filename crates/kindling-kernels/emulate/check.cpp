// src/kernels.cu run under cuda_emulation.h against reference loops in double, with the launch
// shapes src/cuda.rs uses. Gradients are checked against central differences of the reference
// forward functions, not against a second copy of the backward formulas.
//
//   check              every kernel in f32 and bf16; prints one line per check, exits 1 on a failure
//   check keep SEED P N   the dropout mask kernel's keep bits (0/1 per line), for the Rust test
//                         to compare with kindling_models::ops::keep_at
#include "cuda_emulation.h"
#include "../src/kernels.cu"

#include <cstdio>
#include <random>
#include <string>

static int failures = 0;

static void report(const char* what, const char* type, double err, double tol) {
  const bool ok = err <= tol;
  std::printf("%-28s %-5s max error %.3e (tolerance %.1e) %s\n", what, type, err, tol,
              ok ? "ok" : "FAIL");
  if (!ok) ++failures;
}

// Relative-to-scale error: |a - b| / max(1, |b|), the largest over the elements.
static double max_err(const std::vector<double>& got, const std::vector<double>& want) {
  double e = 0;
  for (size_t i = 0; i < want.size(); ++i)
    e = std::max(e, std::abs(got[i] - want[i]) / std::max(1.0, std::abs(want[i])));
  return e;
}

template <typename T> static std::vector<T> to_t(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_f<T>((float)v[i]);
  return out;
}
template <typename T> static std::vector<double> to_d(const std::vector<T>& v) {
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = to_f(v[i]);
  return out;
}
// The values a T tensor actually holds (inputs rounded once, so the reference sees them too).
template <typename T> static std::vector<double> held(const std::vector<double>& v) {
  return to_d(to_t<T>(v));
}

static std::mt19937_64 rng(7);
static std::vector<double> randn(size_t n, double scale = 1.0) {
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

static unsigned row_threads(unsigned cols) {
  unsigned t = ((cols + 3) / 4 + 31) / 32 * 32;
  return std::clamp(t, 32u, 1024u);
}

// The host-side dropout scale as src/cuda.rs passes it: 1 / (1 - p) rounded to T.
template <typename T> static float keep_scale(float p) { return round_to<T>(1.f / (1.f - p)); }

static double gelu(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }

// Central difference of f over each coordinate of x.
static std::vector<double> numeric_grad(std::vector<double> x,
                                        const std::function<double(const std::vector<double>&)>& f,
                                        double h = 1e-5) {
  std::vector<double> g(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double fp = f(x);
    x[i] = x0 - h;
    const double fm = f(x);
    x[i] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

template <typename T> static void check_gelu(const char* type, double tol) {
  const unsigned rows = 7, cols = 45, n = rows * cols;
  auto z = held<T>(randn(n, 2.0)), b = held<T>(randn(cols));
  std::vector<T> zt = to_t<T>(z), bt = to_t<T>(b), pre(n), act(n), dpre(n);
  emu::launch((n + 255) / 256, 256, 0, [&] {
    bias_gelu_fwd<T>(zt.data(), bt.data(), pre.data(), act.data(), n, cols);
  });
  std::vector<double> want_pre(n), want_act(n);
  for (unsigned i = 0; i < n; ++i) {
    want_pre[i] = z[i] + b[i % cols];
    want_act[i] = gelu(want_pre[i]);
  }
  report("bias_gelu_fwd pre", type, max_err(to_d(pre), want_pre), tol);
  report("bias_gelu_fwd act", type, max_err(to_d(act), want_act), tol);
  auto w = held<T>(randn(n));
  std::vector<T> wt = to_t<T>(w);
  emu::launch((n + 255) / 256, 256, 0,
              [&] { gelu_bwd<T>(wt.data(), pre.data(), dpre.data(), n); });
  auto x = to_d(pre);
  std::vector<double> want(n);
  for (unsigned i = 0; i < n; ++i)
    want[i] = w[i] * (gelu(x[i] + 1e-5) - gelu(x[i] - 1e-5)) / 2e-5;
  report("gelu_bwd", type, max_err(to_d(dpre), want), tol * 10);
}

// The reference attention probabilities (batch, heads, q, k) and their dropout.
struct AttnShape {
  unsigned batch = 2, heads = 3, q = 5, k = 37;
  unsigned rows() const { return batch * heads * q; }
  unsigned n() const { return rows() * k; }
};

static std::vector<double> ref_probs(const AttnShape& s, const std::vector<double>& scores,
                                     const std::vector<double>& mask, double scale) {
  std::vector<double> p(s.n());
  for (unsigned r = 0; r < s.rows(); ++r) {
    const unsigned b = r / (s.heads * s.q);
    double mx = -1e300, sum = 0;
    for (unsigned j = 0; j < s.k; ++j) mx = std::max(mx, scores[r * s.k + j] * scale + mask[b * s.k + j]);
    for (unsigned j = 0; j < s.k; ++j) sum += std::exp(scores[r * s.k + j] * scale + mask[b * s.k + j] - mx);
    for (unsigned j = 0; j < s.k; ++j)
      p[r * s.k + j] = std::exp(scores[r * s.k + j] * scale + mask[b * s.k + j] - mx) / sum;
  }
  return p;
}

template <typename T> static void check_attention(const char* type, double tol) {
  AttnShape s;
  const unsigned n = s.n();
  const float scale = 0.125f, p = 0.25f;
  const uint64_t seed = 0x5eed;
  const uint32_t thr = (uint32_t)std::lround(p * 65536.0);
  const float ks = keep_scale<T>(p);
  auto scores = held<T>(randn(n, 3.0));
  std::vector<double> mask(s.batch * s.k, 0.0);
  for (unsigned j = 30; j < s.k; ++j) mask[1 * s.k + j] = -10000.0;  // padding in batch 1
  std::vector<float> maskf(mask.begin(), mask.end());
  std::vector<T> st = to_t<T>(scores), probs(n), dropped(n), dscores(n);
  const unsigned warps = 8;
  emu::launch((s.rows() + warps - 1) / warps, 32 * warps, 0, [&] {
    attn_probs_fwd<T>(st.data(), maskf.data(), probs.data(), dropped.data(), s.rows(), s.k,
                      s.heads * s.q, scale, seed, thr, ks);
  });
  auto want = ref_probs(s, scores, mask, scale);
  std::vector<double> want_dropped(n);
  for (unsigned i = 0; i < n; ++i)
    want_dropped[i] = keep_at(seed, i, thr) ? want[i] * ks : 0.0;
  report("attn_probs_fwd probs", type, max_err(to_d(probs), want), tol);
  report("attn_probs_fwd dropped", type, max_err(to_d(dropped), want_dropped), tol);

  auto w = held<T>(randn(n));
  std::vector<T> wt = to_t<T>(w);
  emu::launch((s.rows() + warps - 1) / warps, 32 * warps, 0, [&] {
    attn_probs_bwd<T>(wt.data(), probs.data(), dscores.data(), s.rows(), s.k, scale, seed, thr, ks);
  });
  auto loss = [&](const std::vector<double>& x) {
    auto pr = ref_probs(s, x, mask, scale);
    double l = 0;
    for (unsigned i = 0; i < n; ++i) l += w[i] * (keep_at(seed, i, thr) ? pr[i] * ks : 0.0);
    return l;
  };
  report("attn_probs_bwd", type, max_err(to_d(dscores), numeric_grad(scores, loss)), tol);
}

template <typename T> static void check_layer_norm(const char* type, double tol) {
  const unsigned rows = 36, cols = 130, n = rows * cols;  // 2 backward blocks of 32 rows, 2 warps
  const float p = 0.1f, eps = 1e-12f;
  const uint64_t seed = 99;
  const uint32_t thr = (uint32_t)std::lround(p * 65536.0);
  const float ks = keep_scale<T>(p);
  auto z = held<T>(randn(n)), res = held<T>(randn(n)), bias = held<T>(randn(cols, 0.1));
  auto gamma = held<T>(randn(cols, 0.3)), beta = held<T>(randn(cols, 0.3));
  for (auto& g : gamma) g = round_to<T>((float)(g + 1.0));
  auto zt = to_t<T>(z), rt = to_t<T>(res), bt = to_t<T>(bias), gt = to_t<T>(gamma),
       et = to_t<T>(beta);
  std::vector<T> sum(n), y(n);
  std::vector<float> mean(rows), rstd(rows);
  emu::launch(rows, row_threads(cols), cols * 4, [&] {
    add_ln_fwd<T>(zt.data(), bt.data(), rt.data(), gt.data(), et.data(), nullptr, sum.data(), y.data(),
                  mean.data(), rstd.data(), cols, eps, seed, thr, ks);
  });
  // The reference in double, as a function of every input (for the differences below).
  auto forward = [&](const std::vector<double>& z_, const std::vector<double>& r_,
                     const std::vector<double>& b_, const std::vector<double>& g_,
                     const std::vector<double>& e_) {
    std::vector<double> out(n);
    for (unsigned r = 0; r < rows; ++r) {
      std::vector<double> s(cols);
      double mu = 0, var = 0;
      for (unsigned j = 0; j < cols; ++j) {
        const unsigned i = r * cols + j;
        s[j] = (keep_at(seed, i, thr) ? (z_[i] + b_[j]) * ks : 0.0) + r_[i];
        mu += s[j] / cols;
      }
      for (unsigned j = 0; j < cols; ++j) var += (s[j] - mu) * (s[j] - mu) / cols;
      for (unsigned j = 0; j < cols; ++j)
        out[r * cols + j] = (s[j] - mu) / std::sqrt(var + eps) * g_[j] + e_[j];
    }
    return out;
  };
  report("add_ln_fwd y", type, max_err(to_d(y), forward(z, res, bias, gamma, beta)), tol);

  // L = sum (dy + dy2) * y.
  auto dy = held<T>(randn(n)), dy2 = held<T>(randn(n));
  auto dyt = to_t<T>(dy), dy2t = to_t<T>(dy2);
  std::vector<T> dsum(n), dz(n);
  const unsigned per = 32, blocks = (rows + per - 1) / per;
  std::vector<float> partials(blocks * 3 * cols), sums(3 * cols);
  emu::launch(blocks, row_threads(cols), 5 * cols * 4, [&] {
    add_ln_bwd<T>(dyt.data(), dy2t.data(), sum.data(), mean.data(), rstd.data(), gt.data(), nullptr,
                  dsum.data(), dz.data(), partials.data(), rows, cols, per, seed, thr, ks);
  });
  emu::launch((3 * cols + 255) / 256, 256, 0,
              [&] { column_sums_f32(partials.data(), sums.data(), blocks, 3 * cols); });
  auto loss = [&](const std::vector<double>& out) {
    double l = 0;
    for (unsigned i = 0; i < n; ++i) l += (dy[i] + dy2[i]) * out[i];
    return l;
  };
  auto dres = numeric_grad(res, [&](auto& x) { return loss(forward(z, x, bias, gamma, beta)); });
  auto dzw = numeric_grad(z, [&](auto& x) { return loss(forward(x, res, bias, gamma, beta)); });
  auto dg = numeric_grad(gamma, [&](auto& x) { return loss(forward(z, res, bias, x, beta)); });
  auto de = numeric_grad(beta, [&](auto& x) { return loss(forward(z, res, bias, gamma, x)); });
  auto db = numeric_grad(bias, [&](auto& x) { return loss(forward(z, res, x, gamma, beta)); });
  std::vector<double> s(sums.begin(), sums.end());
  report("add_ln_bwd dsum (residual)", type, max_err(to_d(dsum), dres), tol * 10);
  report("add_ln_bwd dz", type, max_err(to_d(dz), dzw), tol * 10);
  report("add_ln_bwd dgamma", type, max_err({s.begin(), s.begin() + cols}, dg), tol * 10);
  report("add_ln_bwd dbeta", type, max_err({s.begin() + cols, s.begin() + 2 * cols}, de), tol * 10);
  report("add_ln_bwd dbias", type, max_err({s.begin() + 2 * cols, s.end()}, db), tol * 10);
}

template <typename T> static void check_cross_entropy(const char* type, double tol) {
  const unsigned rows = 6, classes = 3001;
  auto x = held<T>(randn(rows * classes, 2.0));
  std::vector<uint32_t> labels = {0, 17, 3000, 512, 17, 2999};
  auto xt = to_t<T>(x);
  std::vector<float> loss_rows(rows), loss(1);
  std::vector<T> grad(rows * classes);
  const float inv = 1.f / rows;
  emu::launch(rows, std::min(row_threads(classes), 512u), 0, [&] {
    cross_entropy_fwd<T>(xt.data(), labels.data(), loss_rows.data(), grad.data(), classes, inv);
  });
  emu::launch(1, 1024, 0, [&] { scaled_sum_f32(loss_rows.data(), loss.data(), rows, inv); });
  auto mean_loss = [&](const std::vector<double>& v) {
    double total = 0;
    for (unsigned r = 0; r < rows; ++r) {
      double mx = -1e300, sum = 0;
      for (unsigned j = 0; j < classes; ++j) mx = std::max(mx, v[r * classes + j]);
      for (unsigned j = 0; j < classes; ++j) sum += std::exp(v[r * classes + j] - mx);
      total += mx + std::log(sum) - v[r * classes + labels[r]];
    }
    return total / rows;
  };
  report("cross_entropy loss", type, max_err({loss[0]}, {mean_loss(x)}), 1e-5);
  // The gradient of 6 x 3001 logits by differences: every 37th logit, plus the labels'.
  std::vector<double> got, want;
  for (unsigned i = 0; i < rows * classes; ++i) {
    if (i % 37 != 0 && labels[i / classes] != i % classes) continue;
    auto v = x;
    v[i] += 1e-4;
    const double fp = mean_loss(v);
    v[i] -= 2e-4;
    got.push_back(to_f(grad[i]));
    want.push_back((fp - mean_loss(v)) / 2e-4);
  }
  report("cross_entropy grad", type, max_err(got, want), tol * 1e-1);
}

template <typename T> static void check_embedding_grad(const char* type, double tol) {
  const unsigned cols = 70, vocab = 11;
  std::vector<uint32_t> ids = {3, 7, 3, 0, 10, 3, 7, 2};
  const unsigned n = ids.size();
  auto dy = held<T>(randn(n * cols));
  auto dyt = to_t<T>(dy);
  // The host side of src/cuda.rs: rows grouped by id, stable.
  std::vector<uint32_t> order(n), unique, starts;
  for (unsigned k = 0; k < n; ++k) order[k] = k;
  std::stable_sort(order.begin(), order.end(), [&](auto a, auto b) { return ids[a] < ids[b]; });
  for (unsigned k = 0; k < n; ++k)
    if (unique.empty() || unique.back() != ids[order[k]]) {
      unique.push_back(ids[order[k]]);
      starts.push_back(k);
    }
  starts.push_back(n);
  std::vector<float> out(vocab * cols, 0.f);
  emu::launch(unique.size(), std::min(row_threads(cols), 256u), 0, [&] {
    embedding_grad<T>(dyt.data(), order.data(), starts.data(), unique.data(), out.data(), cols);
  });
  std::vector<double> want(vocab * cols, 0.0);
  for (unsigned k = 0; k < n; ++k)
    for (unsigned j = 0; j < cols; ++j) want[ids[k] * cols + j] += dy[k * cols + j];
  report("embedding_grad", type, max_err({out.begin(), out.end()}, want), tol);
}

// The q/k/v split and merge and the context's head moves, padded (no row map) and unpadded
// (batch 0 holds 3 of its 5 tokens: rows map to places 0, 1, 2, 5, ..., 9).
template <typename T> static void check_qkv(const char* type) {
  const unsigned batch = 2, seq = 5, heads = 3, d = 4, hidden = heads * d;
  for (bool unpadded : {false, true}) {
    std::vector<uint32_t> map;
    for (unsigned p = 0; p < batch * seq; ++p)
      if (!unpadded || p % seq < 3 || p >= seq) map.push_back(p);
    const unsigned rows = map.size(), n = rows * 3 * hidden, padded = batch * heads * seq * d;
    const uint32_t* rm = unpadded ? map.data() : nullptr;
    auto z = held<T>(randn(n)), bias = held<T>(randn(3 * hidden));
    auto zt = to_t<T>(z), bt = to_t<T>(bias);
    std::vector<T> q(padded, from_f<T>(0.f)), k(q), v(q), back(n);
    emu::launch((n + 255) / 256, 256, 0, [&] {
      qkv_split<T>(zt.data(), bt.data(), rm, q.data(), k.data(), v.data(), n, seq, heads, d);
    });
    double err = 0;
    std::vector<double> want_q(padded, 0.0), want_k(padded, 0.0), want_v(padded, 0.0);
    std::vector<double>* wants[3] = {&want_q, &want_k, &want_v};
    for (unsigned r = 0; r < rows; ++r) {
      const unsigned b = map[r] / seq, s = map[r] % seq;
      for (unsigned which = 0; which < 3; ++which)
        for (unsigned h = 0; h < heads; ++h)
          for (unsigned e = 0; e < d; ++e) {
            const unsigned col = which * hidden + h * d + e;
            (*wants[which])[((b * heads + h) * seq + s) * d + e] =
                round_to<T>((float)(z[r * 3 * hidden + col] + bias[col]));
          }
    }
    err = std::max({max_err(to_d(q), want_q), max_err(to_d(k), want_k), max_err(to_d(v), want_v)});
    const char* split = unpadded ? "qkv_split (unpadded rows)" : "qkv_split";
    report(split, type, err, 0.0);
    emu::launch((n + 255) / 256, 256, 0, [&] {
      qkv_merge<T>(q.data(), k.data(), v.data(), rm, back.data(), n, seq, heads, d);
    });
    err = 0;
    for (unsigned i = 0; i < n; ++i)
      err = std::max(err, std::abs(to_f(back[i]) - (double)round_to<T>((float)(z[i] + bias[i % (3 * hidden)]))));
    report(unpadded ? "qkv_merge (unpadded rows)" : "qkv_merge (inverse of split)", type, err, 0.0);
    // The context: q as (batch, heads, seq, d) to rows (rows, hidden) and back.
    std::vector<T> ctx_rows(rows * hidden), again(padded, from_f<T>(0.f));
    const unsigned m = rows * hidden;
    emu::launch((m + 255) / 256, 256, 0, [&] {
      heads_rows<T>(q.data(), ctx_rows.data(), rm, m, seq, heads, d, true);
    });
    err = 0;
    for (unsigned r = 0; r < rows; ++r)
      for (unsigned c = 0; c < hidden; ++c)
        err = std::max(err, std::abs(to_f(ctx_rows[r * hidden + c]) - (double)round_to<T>((float)(z[r * 3 * hidden + c] + bias[c]))));
    report(unpadded ? "heads_to_rows (unpadded rows)" : "heads_to_rows", type, err, 0.0);
    emu::launch((m + 255) / 256, 256, 0, [&] {
      heads_rows<T>(again.data(), ctx_rows.data(), rm, m, seq, heads, d, false);
    });
    report(unpadded ? "rows_to_heads (unpadded rows)" : "rows_to_heads", type,
           max_err(to_d(again), want_q), 0.0);
  }
}

static void check_adamw() {
  const unsigned n = 1000;
  auto theta = randn(n), m = randn(n, 0.1), v = randn(n, 0.1), g = randn(n);
  for (auto& x : v) x = x * x;
  std::vector<float> tf(theta.begin(), theta.end()), mf(m.begin(), m.end()),
      vf(v.begin(), v.end()), gf(g.begin(), g.end());
  const float b1 = 0.9f, b2 = 0.999f, lr = 1e-3f, decay = 1 - 1e-3f * 0.01f, bc1 = 1 - 0.9f * 0.9f,
              bc2 = 1 - 0.999f * 0.999f, eps = 1e-8f;
  emu::launch(4, 256, 0, [&] {
    adamw_f32(tf.data(), mf.data(), vf.data(), gf.data(), n, b1, 1 - b1, b2, 1 - b2, lr, decay, bc1,
              bc2, eps);
  });
  std::vector<double> want_t(n), want_m(n), want_v(n);
  for (unsigned i = 0; i < n; ++i) {
    want_m[i] = b1 * m[i] + (1 - b1) * g[i];
    want_v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
    want_t[i] = decay * theta[i] - lr * (want_m[i] / bc1) / (std::sqrt(want_v[i] / bc2) + eps);
  }
  report("adamw m", "f32", max_err({mf.begin(), mf.end()}, want_m), 1e-6);
  report("adamw v", "f32", max_err({vf.begin(), vf.end()}, want_v), 1e-6);
  report("adamw theta", "f32", max_err({tf.begin(), tf.end()}, want_t), 1e-6);
}

int main(int argc, char** argv) {
  if (argc == 5 && std::string(argv[1]) == "keep") {
    const uint64_t seed = std::stoull(argv[2]);
    const float p = std::stof(argv[3]);
    const uint64_t n = std::stoull(argv[4]);
    std::vector<float> mask(n);
    const uint32_t thr = (uint32_t)std::lround(p * 65536.0);
    emu::launch(3, 256, 0, [&] { dropout_mask<float>(mask.data(), n, seed, thr, 2.f); });
    for (float m : mask) std::printf("%d\n", m != 0.f);
    return 0;
  }
  check_gelu<float>("f32", 1e-6);
  check_gelu<bf16>("bf16", 1e-2);
  check_attention<float>("f32", 1e-5);
  check_attention<bf16>("bf16", 2e-2);
  check_layer_norm<float>("f32", 1e-5);
  check_layer_norm<bf16>("bf16", 2e-2);
  check_cross_entropy<float>("f32", 1e-4);
  check_cross_entropy<bf16>("bf16", 1e-1);
  check_embedding_grad<float>("f32", 1e-6);
  check_embedding_grad<bf16>("bf16", 1e-6);
  check_qkv<float>("f32");
  check_qkv<bf16>("bf16");
  check_adamw();
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
