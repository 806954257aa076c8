// portable.cuh -- the few spellings that differ between nvcc and the host shim (csrc/shim/cuda_shim.h),
// so that the kernels in this folder are one source for both. No torch here.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define SA_EMULATED 0
#else
#include "../shim/cuda_shim.h"
#define SA_EMULATED 1
#endif

namespace sparse_attn {

// Same-size reinterpretation without aliasing UB (compiles to a register move on the GPU).
template <class To, class From>
__host__ __device__ __forceinline__ To bitcast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bitcast between types of different sizes");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

__host__ __device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__host__ __device__ __forceinline__ int iclamp(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Global memory as base[offset]: a read-only-path load / a store. Under the shim the access is
// checked to stay inside the tensor that holds `base` (csrc/shim/cuda_shim.h, MemoryGuard).
template <class T>
__device__ __forceinline__ T load_global(const T* base, int64_t offset) {
#if SA_EMULATED
  return cuda_shim::load_in(base, offset);
#else
  return __ldg(base + offset);
#endif
}

template <class T>
__device__ __forceinline__ void store_global(T* base, int64_t offset, const T& v) {
#if SA_EMULATED
  cuda_shim::store_in(base, offset, v);
#else
  base[offset] = v;
#endif
}

// Launch `kernel` on `grid` x `block` with `smem` bytes of dynamic shared memory.
#if SA_EMULATED
#define SA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::cuda_shim::launch((grid), (block), (smem), kernel, __VA_ARGS__)
#else
#define SA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

}  // namespace sparse_attn
