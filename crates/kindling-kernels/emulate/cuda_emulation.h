// Just enough of CUDA's programming model to run src/kernels.cu on the CPU: a block's threads
// are real threads (std::thread), __syncthreads is a barrier over the block, a warp's shuffle
// is an exchange through memory between two barriers over its 32 lanes, __shared__ variables
// are statics (blocks run one after another), and bf16/f16 are the formats with
// round-to-nearest-even conversions. It tests the kernels' indexing, reductions and arithmetic;
// it says nothing about the GPU's memory model or speed.
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define KINDLING_EMULATE 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct dim3_ {
  unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3_ threadIdx, blockIdx;
inline dim3_ blockDim, gridDim;

namespace emu {
inline std::vector<float> dynamic_shared;
inline std::unique_ptr<std::barrier<>> block_barrier;
struct Warp {
  std::unique_ptr<std::barrier<>> barrier;
  float values[32];
};
inline std::vector<Warp> warps;
}  // namespace emu

#define KINDLING_DYNAMIC_SHARED(name) float* name = emu::dynamic_shared.data()

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu::Warp& w = emu::warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  w.values[lane] = v;
  w.barrier->arrive_and_wait();
  const float other = w.values[lane ^ (unsigned)lane_mask];
  w.barrier->arrive_and_wait();
  return other;
}

using std::min;

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 x) {
  uint32_t u = (uint32_t)x.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fff + ((u >> 16) & 1);
  return {(uint16_t)(u >> 16)};
}
struct __half {
  _Float16 v;
};
inline float __half2float(__half x) { return (float)x.v; }
inline __half __float2half(float f) { return {(_Float16)f}; }

namespace emu {
// Runs `kernel` over grid x block threads (x only), blocks one after another.
inline void launch(unsigned grid, unsigned block, size_t shared_bytes,
                   const std::function<void()>& kernel) {
  gridDim.x = grid;
  blockDim.x = block;
  dynamic_shared.assign(shared_bytes / 4 + 1, NAN);
  block_barrier = std::make_unique<std::barrier<>>(block);
  warps.clear();
  warps.resize((block + 31) / 32);
  for (auto& w : warps) w.barrier = std::make_unique<std::barrier<>>(32);
  for (unsigned b = 0; b < grid; ++b) {
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t)
      threads.emplace_back([&, b, t] {
        blockIdx.x = b;
        threadIdx.x = t;
        kernel();
      });
    for (auto& th : threads) th.join();
  }
}
}  // namespace emu
