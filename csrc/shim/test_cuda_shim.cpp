// Tests of the host shim of the CUDA execution model (cuda_shim.h), one per primitive the kernels
// use. Built and run by tests/test_cuda_decode.py:  test_cuda_shim <name>  (exit 0: pass), or
//   test_cuda_shim convert <in.f32> <out.bin>   (fp16 and bf16 conversions of the floats, for a
//   comparison with torch's).
#include "cuda_shim.h"

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <map>
#include <string>

namespace {

#define CHECK(cond)                                                       \
  do {                                                                    \
    if (!(cond)) {                                                        \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      return false;                                                       \
    }                                                                     \
  } while (0)

// The launch must throw a runtime_error whose message contains `what`.
template <class F>
bool throws_with(F&& f, const char* what) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()).find(what) != std::string::npos) return true;
    std::fprintf(stderr, "threw, but without \"%s\": %s\n", what, e.what());
    return false;
  }
  std::fprintf(stderr, "did not throw (expected \"%s\")\n", what);
  return false;
}

// ---- index variables ----------------------------------------------------------------------------
void k_indices(int* out) {
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned bid = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  out[bid * (blockDim.x * blockDim.y * blockDim.z) + tid] += 1 + int(bid);
}
bool test_indices() {
  const dim3 grid(3, 2, 2), block(32, 2, 2);
  std::vector<int> out(12 * 128, 0);
  cuda_shim::launch(grid, block, 0, k_indices, out.data());
  for (int i = 0; i < 12 * 128; ++i) CHECK(out[i] == 1 + i / 128);  // each (block, thread) exactly once
  return true;
}

// ---- __syncthreads + static __shared__ ----------------------------------------------------------
void k_sync(int* out) {
  __shared__ int buf[256];
  const int t = int(threadIdx.x), n = int(blockDim.x);
  int v = t * 7 + int(blockIdx.x);
  for (int round = 0; round < 8; ++round) {
    if (t % 37 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));  // a late writer
    buf[t] = v;
    __syncthreads();
    v = buf[(t + 1) % n] + 1;  // the neighbour's value: wrong without the barriers
    __syncthreads();
  }
  out[blockIdx.x * n + t] = v;
}
bool test_syncthreads() {
  std::vector<int> out(2 * 256);
  cuda_shim::launch(dim3(2), dim3(256), 0, k_sync, out.data());
  for (int b = 0; b < 2; ++b)
    for (int t = 0; t < 256; ++t) CHECK(out[b * 256 + t] == ((t + 8) % 256) * 7 + b + 8);
  return true;
}

void k_static_shared(int* out) {
  __shared__ int owner;
  if (threadIdx.x == 5) owner = int(blockIdx.x) * 10;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = owner;  // every thread of a block sees that block's value
}
bool test_static_shared() {
  std::vector<int> out(4 * 64);
  cuda_shim::launch(dim3(4), dim3(64), 0, k_static_shared, out.data());
  for (int i = 0; i < 4 * 64; ++i) CHECK(out[i] == (i / 64) * 10);
  return true;
}

// ---- dynamic shared memory ----------------------------------------------------------------------
void k_dynamic(unsigned* out, int bytes, int overflow) {
  SA_DYNAMIC_SMEM(smem);
  unsigned* w = reinterpret_cast<unsigned*>(smem);
  const int t = int(threadIdx.x);
  out[blockIdx.x * 3 + 0] = unsigned(reinterpret_cast<uintptr_t>(smem) % 128);
  __syncthreads();
  if (t == 0) out[blockIdx.x * 3 + 1] = w[bytes / 4 - 1];  // nobody wrote it in this block: poison
  __syncthreads();
  w[t] = unsigned(t) + 100u * blockIdx.x;  // previous block's values must not survive
  __syncthreads();
  if (t == 0) out[blockIdx.x * 3 + 2] = w[blockDim.x - 1];
  if (overflow && t == 0) smem[bytes + 3] = 1;  // past the end: caught by the canary
}
bool test_dynamic_smem() {
  std::vector<unsigned> out(2 * 3);
  cuda_shim::launch(dim3(2), dim3(64), 1024, k_dynamic, out.data(), 1024, 0);
  for (int b = 0; b < 2; ++b) {
    CHECK(out[b * 3 + 0] == 0);             // 128-byte aligned
    CHECK(out[b * 3 + 1] == 0xffffffffu);   // poisoned before every block
    CHECK(out[b * 3 + 2] == 63u + 100u * unsigned(b));
  }
  float nan_check;
  const unsigned poison = 0xffffffffu;
  std::memcpy(&nan_check, &poison, 4);
  CHECK(std::isnan(nan_check));
  CHECK(throws_with([&] { cuda_shim::launch(dim3(1), dim3(64), 1024, k_dynamic, out.data(), 1024, 1); },
                    "past the 1024 bytes"));
  return true;
}

// ---- warp shuffles ------------------------------------------------------------------------------
void k_shfl_xor(float* out, int width) {
  const int t = int(threadIdx.x);
  float v = float(t);
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, width);
  out[t] = v;
  out[blockDim.x + t] = __shfl_xor_sync(0xffffffffu, float(t), 16, width);  // a later group when width <= 16
}
bool test_shfl_xor() {
  for (int width : {32, 16, 8}) {
    std::vector<float> out(2 * 64);
    cuda_shim::launch(dim3(1), dim3(64), 0, k_shfl_xor, out.data(), width);
    for (int t = 0; t < 64; ++t) {
      const int g0 = t / width * width;
      CHECK(out[t] == float(width * g0 + width * (width - 1) / 2));  // the sum over the lane's group
      const int lane = t % 32, src = lane ^ 16;
      const bool later = src >= (lane / width + 1) * width;
      CHECK(out[64 + t] == float(later ? t : t - lane + src));
    }
  }
  return true;
}

void k_shfl(int* out) {
  const int t = int(threadIdx.x), lane = t % 32;
  out[0 * 64 + t] = __shfl_sync(0xffffffffu, t, 3);        // broadcast of lane 3
  out[1 * 64 + t] = __shfl_sync(0xffffffffu, t, lane + 1, 8);  // within groups of 8, modulo
  out[2 * 64 + t] = __shfl_down_sync(0xffffffffu, t, 2);
  out[3 * 64 + t] = __shfl_up_sync(0xffffffffu, t, 3, 16);
  const double d = __shfl_sync(0xffffffffu, 0.5 * t, 31);  // an 8-byte type
  out[4 * 64 + t] = int(d * 2);
}
bool test_shfl_sync() {
  std::vector<int> out(5 * 64);
  cuda_shim::launch(dim3(1), dim3(64), 0, k_shfl, out.data());
  for (int t = 0; t < 64; ++t) {
    const int w = t / 32 * 32, lane = t % 32;
    CHECK(out[t] == w + 3);
    CHECK(out[64 + t] == w + lane / 8 * 8 + (lane + 1) % 8);
    CHECK(out[128 + t] == (lane + 2 < 32 ? t + 2 : t));
    CHECK(out[192 + t] == (lane % 16 >= 3 ? t - 3 : t));
    CHECK(out[256 + t] == w + 31);
  }
  return true;
}

// ---- votes and __syncwarp -----------------------------------------------------------------------
void k_vote(unsigned* out) {
  const int t = int(threadIdx.x), lane = t % 32;
  out[0 * 64 + t] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  out[1 * 64 + t] = __any_sync(0xffffffffu, t == 40);
  out[2 * 64 + t] = __all_sync(0xffffffffu, t < 50);
  __syncwarp();
}
bool test_votes() {
  std::vector<unsigned> out(3 * 64);
  cuda_shim::launch(dim3(1), dim3(64), 0, k_vote, out.data());
  unsigned every3 = 0;
  for (int l = 0; l < 32; l += 3) every3 |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    CHECK(out[t] == every3);
    CHECK(out[64 + t] == unsigned(t >= 32));  // only warp 1 holds thread 40
    CHECK(out[128 + t] == unsigned(t < 32));  // warp 1 holds threads 50..63
  }
  return true;
}

// ---- error reporting instead of deadlock ---------------------------------------------------------
void k_divergent_sync(int* out, int whole_warp) {
  // warp 0 (or only thread 0) skips the barrier: a hang or undefined behaviour on the GPU
  if (whole_warp ? threadIdx.x >= 32 : threadIdx.x != 0) __syncthreads();
  out[threadIdx.x] = 1;
}
bool test_divergent_syncthreads() {
  std::vector<int> out(64);
  CHECK(throws_with([&] { cuda_shim::launch(dim3(3), dim3(64), 0, k_divergent_sync, out.data(), 1); },
                    "divergent __syncthreads"));
  // one lane short: its warp's lanes disagree first (the warp phase of __syncthreads)
  CHECK(throws_with([&] { cuda_shim::launch(dim3(3), dim3(64), 0, k_divergent_sync, out.data(), 0); },
                    "different warp primitives"));
  return true;
}

void k_divergent_shfl(float* out) {
  float v = 1.f;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // half the warp
  __syncthreads();
  out[threadIdx.x] = v;
}
bool test_divergent_shuffle() {
  std::vector<float> out(64);
  return throws_with([&] { cuda_shim::launch(dim3(2), dim3(64), 0, k_divergent_shfl, out.data()); },
                     "different warp primitives");
}

void k_partial_mask(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.f, 1); }
bool test_partial_mask() {
  std::vector<float> out(32);
  return throws_with([&] { cuda_shim::launch(dim3(1), dim3(32), 0, k_partial_mask, out.data()); }, "member mask");
}

// ---- __ldg / checked_store against the memory guard ---------------------------------------------
void k_guard(const float* in, float* out, int read_at, int write_at) {
  if (threadIdx.x == 0) {
    const float x = __ldg(in + read_at);
    cuda_shim::checked_store(out + write_at, x + 1.f);
  }
}
bool test_ldg_guard() {
  std::vector<float> in(16, 2.f), out(4, 0.f);
  {
    cuda_shim::MemoryGuard guard;
    guard.allow_read(in.data(), in.size() * sizeof(float), "in");
    guard.allow_write(out.data(), out.size() * sizeof(float), "out");
    cuda_shim::launch(dim3(1), dim3(32), 0, k_guard, in.data(), out.data(), 15, 3);
    CHECK(out[3] == 3.f);
    CHECK(throws_with([&] { cuda_shim::launch(dim3(1), dim3(32), 0, k_guard, in.data(), out.data(), 16, 0); },
                      "load of 4 bytes"));
    CHECK(out[0] == 1.f);  // the stray load returned 0
    CHECK(throws_with([&] { cuda_shim::launch(dim3(1), dim3(32), 0, k_guard, in.data(), out.data(), 0, 4); },
                      "store of 4 bytes"));
    CHECK(throws_with([&] { cuda_shim::launch(dim3(1), dim3(32), 0, k_guard, in.data(), in.data(), 0, 0); },
                      "store of 4 bytes"));  // a read-only region
  }
  cuda_shim::launch(dim3(1), dim3(32), 0, k_guard, in.data(), out.data(), 16 - 16, 1);  // no guard: unchecked
  CHECK(out[1] == 3.f);
  return true;
}

// load_in / store_in: the access must stay in the buffer that holds the base pointer, even when the
// address it reaches belongs to a neighbouring registered buffer.
void k_provenance(const float* a, float* out, int read_at) {
  if (threadIdx.x == 0) cuda_shim::store_in(out, 0, cuda_shim::load_in(a, read_at));
}
bool test_buffer_provenance() {
  std::vector<float> both(16, 1.f), out(1, 0.f);
  both[12] = 5.f;
  cuda_shim::MemoryGuard guard;
  guard.allow_read(both.data(), 8 * sizeof(float), "a");  // a = both[0:8], b = both[8:16]
  guard.allow_read(both.data() + 8, 8 * sizeof(float), "b");
  guard.allow_write(out.data(), sizeof(float), "out");
  cuda_shim::launch(dim3(1), dim3(32), 0, k_provenance, both.data() + 8, out.data(), 4);
  CHECK(out[0] == 5.f);
  CHECK(throws_with([&] { cuda_shim::launch(dim3(1), dim3(32), 0, k_provenance, both.data(), out.data(), 12); },
                    "outside the buffer 'a'"));
  CHECK(throws_with([&] { cuda_shim::launch(dim3(1), dim3(32), 0, k_provenance, both.data(), out.data() + 1, 0); },
                    "base pointer is in no registered buffer"));
  return true;
}

// ---- 16-bit floats, vector types, math ----------------------------------------------------------
bool test_half_bf16() {
  for (uint32_t b = 0; b < 65536; ++b) {  // every fp16 / bf16 value survives the round trip
    const __half h{uint16_t(b)};
    const float f = __half2float(h);
    if (std::isnan(f)) CHECK(std::isnan(__half2float(__float2half_rn(f))));
    else CHECK(__float2half_rn(f).__x == b);
    const float g = __bfloat162float(__nv_bfloat16{uint16_t(b)});
    if (std::isnan(g)) CHECK(std::isnan(__bfloat162float(__float2bfloat16_rn(g))));
    else CHECK(__float2bfloat16_rn(g).__x == b);
  }
  CHECK(__float2half_rn(1.f + 1.f / 2048).__x == 0x3c00);      // tie -> even (down)
  CHECK(__float2half_rn(1.f + 3.f / 2048).__x == 0x3c02);      // tie -> even (up)
  CHECK(__float2half_rn(65504.f).__x == 0x7bff);
  CHECK(__float2half_rn(65520.f).__x == 0x7c00);               // rounds to inf
  CHECK(__float2half_rn(-1e-8f).__x == 0x8000);                // underflows to -0
  CHECK(__float2half_rn(5.9604645e-8f).__x == 0x0001);         // smallest subnormal
  CHECK(__float2bfloat16_rn(1.f + 1.f / 256).__x == 0x3f80);   // tie -> even
  const float2 p = __half22float2(__floats2half2_rn(0.5f, -2.f));
  CHECK(p.x == 0.5f && p.y == -2.f);
  const float2 q = __bfloat1622float2(__floats2bfloat162_rn(3.f, -0.25f));
  CHECK(q.x == 3.f && q.y == -0.25f);
  return true;
}

bool test_vector_types() {
  CHECK(sizeof(uint4) == 16 && alignof(uint4) == 16);
  CHECK(sizeof(float4) == 16 && alignof(float4) == 16);
  CHECK(sizeof(uint2) == 8 && alignof(uint2) == 8);
  CHECK(sizeof(float2) == 8 && alignof(float2) == 8);
  CHECK(sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4);
  const uint4 u = make_uint4(1, 2, 3, 4);
  CHECK(u.x == 1 && u.w == 4);
  return true;
}

bool test_math() {  // what the online softmax relies on
  const float inf = __builtin_huge_valf();
  CHECK(exp2f(-inf) == 0.f);
  CHECK(exp2f(0.f) == 1.f);
  CHECK(fmaxf(-inf, -inf) == -inf);
  CHECK(fmaxf(-inf, 1.f) == 1.f);
  CHECK(log2f(1.f) == 0.f);
  CHECK(std::isnan(exp2f(-inf - -inf)));  // why the kernel never computes it
  return true;
}

int convert(const char* in_path, const char* out_path) {
  std::ifstream in(in_path, std::ios::binary);
  std::vector<float> xs;
  float f;
  while (in.read(reinterpret_cast<char*>(&f), 4)) xs.push_back(f);
  std::ofstream out(out_path, std::ios::binary);
  for (float x : xs) {
    const uint16_t h = __float2half_rn(x).__x, b = __float2bfloat16_rn(x).__x;
    out.write(reinterpret_cast<const char*>(&h), 2);
    out.write(reinterpret_cast<const char*>(&b), 2);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<bool()>> tests = {
      {"indices", test_indices},
      {"syncthreads", test_syncthreads},
      {"static_shared", test_static_shared},
      {"dynamic_smem", test_dynamic_smem},
      {"shfl_xor", test_shfl_xor},
      {"shfl_sync", test_shfl_sync},
      {"votes", test_votes},
      {"divergent_syncthreads", test_divergent_syncthreads},
      {"divergent_shuffle", test_divergent_shuffle},
      {"partial_mask", test_partial_mask},
      {"ldg_guard", test_ldg_guard},
      {"buffer_provenance", test_buffer_provenance},
      {"half_bf16", test_half_bf16},
      {"vector_types", test_vector_types},
      {"math", test_math},
  };
  if (argc == 4 && std::string(argv[1]) == "convert") return convert(argv[2], argv[3]);
  if (argc == 2 && std::string(argv[1]) == "list") {
    for (const auto& kv : tests) std::printf("%s\n", kv.first.c_str());
    return 0;
  }
  if (argc != 2 || !tests.count(argv[1])) {
    std::fprintf(stderr, "usage: %s list | <test> | convert <in.f32> <out.bin>\n", argv[0]);
    return 2;
  }
  try {
    return tests.at(argv[1])() ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "exception: %s\n", e.what());
    return 1;
  }
}
