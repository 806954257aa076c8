// cuda_shim.h -- a host (C++20) emulation of the CUDA execution model, so that the SAME kernel
// source that nvcc compiles also compiles with g++/clang and runs on a CPU in the test tier.
//
// WHAT IT EMULATES
//   * Launch: `cuda_shim::launch(grid, block, dyn_smem_bytes, kernel, args...)` runs every block of
//     the grid one after another (blockIdx.x fastest, then y, then z). A block is
//     blockDim.x*y*z std::threads (one OS thread per CUDA thread; created once per launch and reused
//     for every block). threadIdx / blockIdx / blockDim / gridDim are thread_local variables.
//     warpSize is 32; warp w holds the linear thread ids 32w .. 32w+31, lane = id % 32.
//   * __syncthreads(): a std::barrier over the block. Every arrival carries a tag (the source line),
//     and the barrier's completion step checks that all threads arrived from the SAME call site (or
//     all from the block end): a __syncthreads reached by only part of the block, or from different
//     sites, is reported as an error instead of deadlocking (see "divergence" below).
//   * Warp primitives: __shfl_sync, __shfl_xor_sync, __shfl_up_sync, __shfl_down_sync (any
//     trivially copyable type up to 8 bytes, `width` 1..32), __ballot_sync, __any_sync, __all_sync,
//     __syncwarp, __activemask. Each goes through a per-warp exchange buffer (double-buffered, so one
//     per-warp std::barrier per primitive suffices) and checks that all 32 lanes took part from the
//     same call site with a full mask.
//   * __shared__: expands to `static`. Blocks run one at a time and launches are serialised by a
//     process-wide mutex, so a function-local static array is exactly "one copy per running block".
//     Dynamic shared memory (`SA_DYNAMIC_SMEM(name)` in the portable kernel headers, `extern
//     __shared__` on the GPU) is a per-launch buffer of the requested size, 128-byte aligned, filled
//     with 0xFF bytes (NaN as fp32/fp16/bf16) before every block so that reading a value no thread of
//     this block wrote shows up as NaN, followed by a canary checked after every block (a write past
//     the requested size is reported).
//   * Global memory: plain host pointers. When a `cuda_shim::MemoryGuard` is active, every `__ldg`
//     and `cuda_shim::checked_store` is checked against the registered regions (stores: writable
//     ones), and `cuda_shim::load_in(base, offset)` / `store_in` (what the portable kernels' load_global
//     / store_global compile to) must stay inside the very buffer that holds `base`, so an overrun
//     into a neighbouring tensor is caught too. An access outside is reported and not performed (a
//     load returns zero bytes). This is how the tests check "never read outside the buffers".
//   * Types and intrinsics: dim3, uint2/uint4/int4/float2/float4 (with CUDA's alignment),
//     __half/__half2 and __nv_bfloat16/__nv_bfloat162 with round-to-nearest-even conversions
//     (__float2half(_rn), __half2float, __half22float2, __floats2half2_rn and the bf16 equivalents),
//     __ldg, exp2f/log2f/expf/logf/fmaxf (from <cmath>), __launch_bounds__/__forceinline__/__align__
//     as no-ops or their C++ equivalents.
//   * Errors (a divergent barrier, a partial-mask shuffle, an out-of-region access, a shared-memory
//     overflow) are collected during the launch and thrown as one std::runtime_error when the launch
//     returns. After a barrier mismatch the launch is marked broken: all remaining barriers release
//     immediately so the launch terminates instead of hanging.
//
// WHAT IT CANNOT CATCH / DOES NOT EMULATE
//   * Timing, occupancy, register pressure, spills, bank conflicts, coalescing: nothing about speed.
//   * The memory model: std::threads do run concurrently, so a missing __syncthreads MAY show up as
//     a wrong result, but there is no race detector; data races on shared or global memory between
//     two barriers are not reported, and the host's (x86) memory ordering is stronger than the GPU's.
//   * Independent thread scheduling inside a warp: lanes are not lock-stepped between primitives, and
//     warp-divergent shuffles/votes (a mask other than 0xffffffff, or lanes at different call sites)
//     are rejected rather than emulated. Blocks must be a multiple of 32 threads (no partial warps).
//   * Accesses through raw pointers to global memory (other than __ldg / checked_store) and all
//     shared-memory accesses except the canary past the dynamic buffer are unchecked.
//   * Atomics, cooperative groups, clusters, async copies (cp.async / TMA), tensor-core instructions
//     (mma/wgmma), textures, streams/events (the stream argument is ignored; launches are synchronous),
//     device-side printf formatting differences, fast-math intrinsics' reduced precision (exp2f here
//     is the exact libm function, ex2.approx on the GPU is within 2 ulp).
//   * Launch limits are not enforced: grid.y/z > 65535, shared memory over the chip's opt-in limit,
//     registers (__launch_bounds__ is ignored); the nvcc compile tier checks what it can of these.
//   * A thread stuck in an infinite loop still hangs the launch.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

// ------------------------------------------------------------------------------------------------
// Qualifiers
// ------------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static
#define SA_DYNAMIC_SMEM(name) unsigned char* name = ::cuda_shim::dynamic_shared_memory()

// ------------------------------------------------------------------------------------------------
// Built-in vector types and index variables
// ------------------------------------------------------------------------------------------------
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated launch error"; }

// ------------------------------------------------------------------------------------------------
// 16-bit floating-point types (storage + round-to-nearest-even conversions)
// ------------------------------------------------------------------------------------------------
struct __half { unsigned short __x; };
struct __half2 { __half x, y; };
struct __nv_bfloat16 { unsigned short __x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4, "16-bit types");

namespace cuda_shim {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE binary16 -> binary32 (exact).
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return bits_f32(sign | f32_bits(mag));
  }
  if (exp == 31) return bits_f32(sign | 0x7f800000u | (mant << 13) | (mant ? 0x400000u : 0u));
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// binary32 -> binary16, round to nearest, ties to even (what __float2half_rn does).
inline uint16_t float_to_half_bits(float f) {
  uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return uint16_t(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u));  // NaN / inf
  if (x >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (x < 0x38800000u) {  // below the smallest normal: the add rounds to a multiple of 2^-24 (RNE)
    const float t = bits_f32(x) + 0.5f;
    return uint16_t(sign | (f32_bits(t) - 0x3f000000u));
  }
  x += 0xc8000fffu + ((x >> 13) & 1u);  // rebias the exponent by -112 and round the mantissa (RNE)
  return uint16_t(sign | (x >> 13));
}

inline float bf16_bits_to_float(uint16_t b) { return bits_f32(uint32_t(b) << 16); }

inline uint16_t float_to_bf16_bits(float f) {
  uint32_t x = f32_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return uint16_t(x >> 16);
}

}  // namespace cuda_shim

inline float __half2float(__half h) { return cuda_shim::half_bits_to_float(h.__x); }
inline __half __float2half_rn(float f) { return __half{cuda_shim::float_to_half_bits(f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }

inline float __bfloat162float(__nv_bfloat16 h) { return cuda_shim::bf16_bits_to_float(h.__x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16{cuda_shim::float_to_bf16_bits(f)}; }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return float2{__bfloat162float(h.x), __bfloat162float(h.y)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
  return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }

// ------------------------------------------------------------------------------------------------
// Launch state
// ------------------------------------------------------------------------------------------------
namespace cuda_shim {

constexpr int kBlockEndTag = -1;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kCanaryBytes = 64;
constexpr unsigned char kSmemPoison = 0xff, kCanary = 0xa5;

struct LaunchState;

// Runs once per barrier phase, after every participant arrived and before any is released.
struct PhaseCheck {
  LaunchState* st;
  int warp;  // -1: the block barrier
  void operator()() noexcept;
};

struct WarpCtx {
  std::barrier<PhaseCheck> bar;
  uint64_t slot[2][32] = {};
  int tag[32] = {};
  unsigned mask[32] = {};
  WarpCtx(LaunchState* st, int w) : bar(32, PhaseCheck{st, w}) {}
};

struct MemoryRegion {
  uintptr_t lo, hi;  // [lo, hi)
  bool writable;
  std::string name;
};

struct LaunchState {
  dim3 grid, block;
  int nthreads;
  size_t smem_bytes;
  std::unique_ptr<unsigned char[]> smem_storage;
  unsigned char* smem = nullptr;
  std::barrier<PhaseCheck> block_bar;
  std::vector<std::unique_ptr<WarpCtx>> warps;
  std::vector<int> block_tag;
  std::atomic<bool> broken{false};
  std::atomic<int> n_errors{0};
  std::mutex err_mu;
  std::string errors;
  dim3 current_block{0, 0, 0};  // written only by a phase check (all threads parked)

  LaunchState(dim3 g, dim3 b, size_t smem_bytes_)
      : grid(g), block(b), nthreads(int(b.x * b.y * b.z)), smem_bytes(smem_bytes_),
        block_bar(std::ptrdiff_t(b.x * b.y * b.z), PhaseCheck{this, -1}), block_tag(nthreads, 0) {
    smem_storage.reset(new unsigned char[smem_bytes + kCanaryBytes + 128]);
    smem = smem_storage.get() + (128 - reinterpret_cast<uintptr_t>(smem_storage.get()) % 128) % 128;
    reset_smem();
    for (int w = 0; w < nthreads / 32; ++w) warps.emplace_back(new WarpCtx(this, w));
  }
  void reset_smem() {
    std::memset(smem, kSmemPoison, smem_bytes);
    std::memset(smem + smem_bytes, kCanary, kCanaryBytes);
  }
  void fail(const std::string& msg) {
    const int n = n_errors.fetch_add(1);
    if (n >= 8) return;  // keep the first few
    std::lock_guard<std::mutex> lock(err_mu);
    errors += msg + "\n";
  }
};

inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}
inline const std::vector<MemoryRegion>*& active_regions() {
  static const std::vector<MemoryRegion>* regions = nullptr;
  return regions;
}

inline thread_local LaunchState* tl_state = nullptr;
inline thread_local int tl_tid = 0, tl_lane = 0, tl_warp = 0;
inline thread_local unsigned tl_parity = 0;
inline thread_local bool tl_block_dropped = false, tl_warp_dropped = false;

inline std::string where() {
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread %d", blockIdx.x, blockIdx.y, blockIdx.z, tl_tid);
  return buf;
}

// Called from inside a kernel: records an error (the launch throws when it returns).
inline void report(const std::string& msg) {
  if (tl_state) tl_state->fail(where() + ": " + msg);
  else throw std::runtime_error(msg);
}

inline void PhaseCheck::operator()() noexcept {
  if (st->broken.load()) return;
  char buf[256];
  if (warp < 0) {
    const int t0 = st->block_tag[0];
    for (int t = 1; t < st->nthreads; ++t)
      if (st->block_tag[t] != t0) {
        std::snprintf(buf, sizeof buf,
                      "block (%u,%u,%u): divergent __syncthreads: thread 0 arrived from %s %d, thread %d from %s %d",
                      st->current_block.x, st->current_block.y, st->current_block.z,
                      t0 == kBlockEndTag ? "the block end" : "line", t0, t,
                      st->block_tag[t] == kBlockEndTag ? "the block end" : "line", st->block_tag[t]);
        st->fail(buf);
        st->broken = true;
        return;
      }
    if (t0 == kBlockEndTag) {  // the block is finished: check the canary, poison for the next block
      for (size_t i = 0; i < kCanaryBytes; ++i)
        if (st->smem[st->smem_bytes + i] != kCanary) {
          std::snprintf(buf, sizeof buf, "block (%u,%u,%u): write past the %zu bytes of dynamic shared memory",
                        st->current_block.x, st->current_block.y, st->current_block.z, st->smem_bytes);
          st->fail(buf);
          break;
        }
      st->reset_smem();
      // advance the block index the next phase reports (blocks run in x, y, z order)
      dim3& b = st->current_block;
      if (++b.x == st->grid.x) { b.x = 0; if (++b.y == st->grid.y) { b.y = 0; ++b.z; } }
    }
    return;
  }
  WarpCtx& w = *st->warps[warp];
  for (int l = 0; l < 32; ++l) {
    if (w.tag[l] != w.tag[0]) {
      std::snprintf(buf, sizeof buf,
                    "block (%u,%u,%u) warp %d: lanes 0 and %d reached different warp primitives (tags %d / %d): "
                    "warp-divergent shuffles, votes or barriers are not emulated",
                    st->current_block.x, st->current_block.y, st->current_block.z, warp, l, w.tag[0], w.tag[l]);
      st->fail(buf);
      st->broken = true;
      return;
    }
    if (w.mask[l] != kFullMask) {
      std::snprintf(buf, sizeof buf, "block (%u,%u,%u) warp %d lane %d: member mask 0x%08x: only full-warp "
                    "(0xffffffff) shuffles/votes are emulated",
                    st->current_block.x, st->current_block.y, st->current_block.z, warp, l, w.mask[l]);
      st->fail(buf);
      st->broken = true;
      return;
    }
  }
}

// Tags: 4 * source line + kind, so two primitives on one line are still told apart.
enum TagKind { kShuffle = 0, kVote = 1, kSyncWarp = 2, kSyncThreads = 3 };
inline int make_tag(int line, TagKind kind) { return line * 4 + int(kind); }

inline void warp_arrive(int tag, unsigned mask) {
  LaunchState* st = tl_state;
  WarpCtx& w = *st->warps[tl_warp];
  if (st->broken.load()) {
    if (!tl_warp_dropped) { tl_warp_dropped = true; w.bar.arrive_and_drop(); }
    return;
  }
  w.tag[tl_lane] = tag;
  w.mask[tl_lane] = mask;
  w.bar.arrive_and_wait();
}

inline void block_arrive(int tag) {
  LaunchState* st = tl_state;
  if (st->broken.load()) {
    if (!tl_block_dropped) { tl_block_dropped = true; st->block_bar.arrive_and_drop(); }
    return;
  }
  st->block_tag[tl_tid] = tag;
  st->block_bar.arrive_and_wait();
}

inline void sync_threads(int line) {
  if (!tl_state) return;
  warp_arrive(make_tag(line, kSyncThreads), kFullMask);  // a warp half inside a shuffle is caught here
  block_arrive(make_tag(line, kSyncThreads));
}

inline void sync_warp(int line, unsigned mask) {
  if (tl_state) warp_arrive(make_tag(line, kSyncWarp), mask);
}

// Every lane publishes `v`, then reads lane `src_of(lane)`'s value.
template <class T, class SrcOf>
inline T exchange(int line, unsigned mask, T v, SrcOf src_of) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of a type larger than 8 bytes");
  LaunchState* st = tl_state;
  if (!st) throw std::runtime_error("warp shuffle outside a cuda_shim::launch");
  WarpCtx& w = *st->warps[tl_warp];
  const unsigned par = tl_parity;
  tl_parity ^= 1u;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  w.slot[par][tl_lane] = bits;
  warp_arrive(make_tag(line, kShuffle), mask);
  const int src = src_of(tl_lane);
  T out;
  std::memcpy(&out, &w.slot[par][src], sizeof(T));
  return out;
}

template <class T>
inline T shfl(int line, unsigned mask, T v, int src_lane, int width = 32) {
  return exchange(line, mask, v, [=](int lane) { return (lane & ~(width - 1)) + (src_lane & (width - 1)); });
}
template <class T>
inline T shfl_xor(int line, unsigned mask, T v, int lane_mask, int width = 32) {
  return exchange(line, mask, v, [=](int lane) {
    const int src = lane ^ lane_mask;  // a lane of a later group of `width` reads its own value
    return (src > 31 || src >= (lane / width + 1) * width) ? lane : src;
  });
}
template <class T>
inline T shfl_down(int line, unsigned mask, T v, unsigned delta, int width = 32) {
  return exchange(line, mask, v,
                  [=](int lane) { return (lane % width) + int(delta) >= width ? lane : lane + int(delta); });
}
template <class T>
inline T shfl_up(int line, unsigned mask, T v, unsigned delta, int width = 32) {
  return exchange(line, mask, v, [=](int lane) { return (lane % width) < int(delta) ? lane : lane - int(delta); });
}

inline unsigned ballot(int line, unsigned mask, int pred) {
  LaunchState* st = tl_state;
  if (!st) throw std::runtime_error("warp vote outside a cuda_shim::launch");
  WarpCtx& w = *st->warps[tl_warp];
  const unsigned par = tl_parity;
  tl_parity ^= 1u;
  w.slot[par][tl_lane] = pred ? 1u : 0u;
  warp_arrive(make_tag(line, kVote), mask);
  unsigned out = 0;
  for (int l = 0; l < 32; ++l) out |= unsigned(w.slot[par][l] != 0) << l;
  return out;
}

inline unsigned char* dynamic_shared_memory() {
  if (!tl_state) throw std::runtime_error("dynamic shared memory outside a cuda_shim::launch");
  return tl_state->smem;
}

// ------------------------------------------------------------------------------------------------
// Global-memory guard
// ------------------------------------------------------------------------------------------------
// While a MemoryGuard is alive (construct it before the launch, on the launching thread), __ldg and
// checked_store only touch memory inside its regions.
class MemoryGuard {
 public:
  MemoryGuard() : prev_(active_regions()) { active_regions() = &regions_; }
  ~MemoryGuard() { active_regions() = prev_; }
  MemoryGuard(const MemoryGuard&) = delete;
  MemoryGuard& operator=(const MemoryGuard&) = delete;
  void allow_read(const void* p, size_t bytes, std::string name) { add(p, bytes, false, std::move(name)); }
  void allow_write(void* p, size_t bytes, std::string name) { add(p, bytes, true, std::move(name)); }

 private:
  void add(const void* p, size_t bytes, bool writable, std::string name) {
    if (p && bytes) regions_.push_back({reinterpret_cast<uintptr_t>(p), reinterpret_cast<uintptr_t>(p) + bytes,
                                        writable, std::move(name)});
  }
  std::vector<MemoryRegion> regions_;
  const std::vector<MemoryRegion>* prev_;
};

inline std::string describe(const void* p, size_t bytes, bool write) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "%s of %zu bytes at %p", write ? "store" : "load", bytes, p);
  return buf;
}

// Is [p, p + bytes) inside some registered region (a writable one for a store)?
inline bool access_ok(const void* p, size_t bytes, bool write) {
  const std::vector<MemoryRegion>* regions = active_regions();
  if (!regions) return true;
  const uintptr_t lo = reinterpret_cast<uintptr_t>(p), hi = lo + bytes;
  for (const MemoryRegion& r : *regions)
    if (lo >= r.lo && hi <= r.hi && (r.writable || !write)) return true;
  report(describe(p, bytes, write) + " outside every registered buffer");
  return false;
}

// Stricter: [p, p + bytes) must lie inside the region that holds `base`, the buffer the kernel
// indexes from (so an overrun into a neighbouring buffer is caught too).
inline bool access_ok_in(const void* base, const void* p, size_t bytes, bool write) {
  const std::vector<MemoryRegion>* regions = active_regions();
  if (!regions) return true;
  const uintptr_t b = reinterpret_cast<uintptr_t>(base), lo = reinterpret_cast<uintptr_t>(p), hi = lo + bytes;
  for (const MemoryRegion& r : *regions) {
    if (b < r.lo || b >= r.hi) continue;
    if (lo >= r.lo && hi <= r.hi && (r.writable || !write)) return true;
    report(describe(p, bytes, write) + " outside the buffer '" + r.name + "' it indexes (" +
           std::to_string(r.hi - r.lo) + " bytes" + (r.writable || !write ? ")" : ", read-only)"));
    return false;
  }
  report(describe(p, bytes, write) + ": its base pointer is in no registered buffer");
  return false;
}

template <class T>
inline void checked_store(T* p, const T& v) {
  if (access_ok(p, sizeof(T), true)) *p = v;
}

// Loads / stores that name their buffer: base[offset], checked against base's region.
template <class T>
inline T load_in(const T* base, int64_t offset) {
  if (!access_ok_in(base, base + offset, sizeof(T), false)) return T{};
  return base[offset];
}
template <class T>
inline void store_in(T* base, int64_t offset, const T& v) {
  if (access_ok_in(base, base + offset, sizeof(T), true)) base[offset] = v;
}

// ------------------------------------------------------------------------------------------------
// Launch
// ------------------------------------------------------------------------------------------------
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t dyn_smem_bytes, Kernel kernel, Args... args) {
  const long nthreads = long(block.x) * block.y * block.z;
  if (nthreads <= 0 || nthreads > 1024 || nthreads % 32 != 0)
    throw std::runtime_error("cuda_shim::launch: the block must have 32..1024 threads, a multiple of 32 (got " +
                             std::to_string(nthreads) + ")");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("cuda_shim::launch: empty grid");
  std::lock_guard<std::mutex> serial(launch_mutex());  // __shared__ arrays are process-wide statics
  LaunchState st(grid, block, dyn_smem_bytes);
  std::vector<std::thread> threads;
  threads.reserve(size_t(nthreads));
  for (int tid = 0; tid < nthreads; ++tid) {
    threads.emplace_back([&st, tid, grid, block, kernel, args...]() {
      tl_state = &st;
      tl_tid = tid;
      tl_lane = tid % 32;
      tl_warp = tid / 32;
      tl_parity = 0;
      tl_block_dropped = tl_warp_dropped = false;
      threadIdx = dim3(unsigned(tid) % block.x, unsigned(tid) / block.x % block.y, unsigned(tid) / (block.x * block.y));
      blockDim = block;
      gridDim = grid;
      for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
          for (unsigned x = 0; x < grid.x && !st.broken.load(); ++x) {
            blockIdx = dim3(x, y, z);
            kernel(args...);
            warp_arrive(kBlockEndTag, kFullMask);
            block_arrive(kBlockEndTag);
          }
      if (st.broken.load()) {  // release anyone still parked on a barrier this thread will not reach
        if (!tl_warp_dropped) st.warps[tl_warp]->bar.arrive_and_drop();
        if (!tl_block_dropped) st.block_bar.arrive_and_drop();
      }
      tl_state = nullptr;
    });
  }
  for (std::thread& t : threads) t.join();
  if (st.n_errors.load()) {
    std::string msg = "cuda_shim: " + std::to_string(st.n_errors.load()) + " error(s) in the emulated launch:\n" +
                      st.errors;
    throw std::runtime_error(msg);
  }
}

}  // namespace cuda_shim

// ------------------------------------------------------------------------------------------------
// Device intrinsics as the kernel spells them
// ------------------------------------------------------------------------------------------------
#define __syncthreads() ::cuda_shim::sync_threads(__LINE__)
#define __syncwarp(...) ::cuda_shim::sync_warp(__LINE__, ::cuda_shim::mask_or_full(__VA_ARGS__))
#define __shfl_sync(...) ::cuda_shim::shfl(__LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::cuda_shim::shfl_xor(__LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::cuda_shim::shfl_down(__LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::cuda_shim::shfl_up(__LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::cuda_shim::ballot(__LINE__, (mask), (pred))
#define __any_sync(mask, pred) (::cuda_shim::ballot(__LINE__, (mask), (pred)) != 0u)
#define __all_sync(mask, pred) (::cuda_shim::ballot(__LINE__, (mask), (pred)) == 0xffffffffu)

namespace cuda_shim {
inline unsigned mask_or_full() { return kFullMask; }
inline unsigned mask_or_full(unsigned m) { return m; }
}  // namespace cuda_shim

inline unsigned __activemask() { return 0xffffffffu; }

// Read-only global load (checked against the active MemoryGuard; zero bytes when outside it).
template <class T>
inline T __ldg(const T* p) {
  if (!cuda_shim::access_ok(p, sizeof(T), false)) return T{};
  return *p;
}
