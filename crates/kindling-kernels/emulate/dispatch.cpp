// The emulated kernels behind one C entry point for Rust (src/backend_emulated.rs): the kernel
// named `name`, its arguments as cuLaunchKernel takes them (an array of pointers to each value).
#include "cuda_emulation.h"
#include "../src/kernels.cu"

#include <map>
#include <mutex>
#include <string>
#include <utility>

template <typename... A, size_t... I>
static void call_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
  f(*static_cast<A*>(args[I])...);
}
template <typename... A> static void call(void (*f)(A...), void** args) {
  call_with(f, args, std::index_sequence_for<A...>{});
}

#define KINDLING_ENTRY(name) {#name, [](void** a) { call(name, a); }},
#define KINDLING_TYPED(T, S)                                                                 \
  KINDLING_ENTRY(dropout_mask_##S) KINDLING_ENTRY(bias_gelu_fwd_##S) KINDLING_ENTRY(gelu_bwd_##S) \
  KINDLING_ENTRY(attn_probs_fwd_##S) KINDLING_ENTRY(attn_probs_bwd_##S)                       \
  KINDLING_ENTRY(add_ln_fwd_##S) KINDLING_ENTRY(add_ln_bwd_##S)                               \
  KINDLING_ENTRY(cross_entropy_fwd_##S) KINDLING_ENTRY(embedding_grad_##S)                    \
  KINDLING_ENTRY(qkv_split_##S) KINDLING_ENTRY(qkv_merge_##S)                               \
  KINDLING_ENTRY(heads_to_rows_##S) KINDLING_ENTRY(rows_to_heads_##S)

static const std::map<std::string, void (*)(void**)> kernels = {
    KINDLING_ENTRY(column_sums_f32) KINDLING_ENTRY(scaled_sum_f32) KINDLING_ENTRY(adamw_f32)
        KINDLING_ENTRY(sum_squares_multi_f32) KINDLING_ENTRY(adamw_multi_f32)
        KINDLING_FOR_TYPES(KINDLING_TYPED)};

extern "C" int kindling_emulated_launch(const char* name, unsigned grid, unsigned block,
                                        unsigned shared_bytes, void** args) {
  // The emulation's block state is global: one launch at a time (tests run in threads).
  static std::mutex one_at_a_time;
  std::lock_guard<std::mutex> lock(one_at_a_time);
  auto it = kernels.find(name);
  if (it == kernels.end()) return 1;
  auto f = it->second;
  emu::launch(grid, block, shared_bytes, [&] { f(args); });
  return 0;
}
