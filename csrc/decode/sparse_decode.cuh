// sparse_decode.cuh -- block-sparse decode attention (flash-decoding) over a contiguous or paged KV
// cache. Torch-free: compiles with nvcc, and as host C++20 against csrc/shim/cuda_shim.h.
//
// Semantics: the shared decode spec (sparse_attn.decode.reference_decode is the oracle). Query row i
// of sequence b sits at p = L - Sq + i (L = cache_seqlens[b] clamped to the cache), sees key j iff
// 0 <= j <= p and key block c = j / bs is kept: dense; a list (kv_idx[b, h, :kv_num]) plus, when
// own_block, the row's own block p / bs; or S2 (p/bs - c < local or c % stride == residue[h], a
// negative residue meaning a dense head).
//
// Work decomposition.
//   * One CTA (128 threads) per (split, KV head x row chunk, sequence). Its rows are up to kRows of
//     the G*Sq rows of the GQA group (query head h*G + g, position i; row = g*Sq + i), so a K/V tile is
//     read once for the whole group. Larger groups take several row chunks (grid.y).
//   * Each (sequence, KV head) walks a VIRTUAL list of kept key blocks, never materialised: dense ->
//     0..p_max/bs; list -> the list entries, then the own block(s) not already in the list; S2 -> the
//     strided blocks left of the local window, then the window (closed form). Entries are cut into
//     units of min(bs, 32) keys and packed into tiles of kTileN = 32 key slots (two 16-key blocks
//     share a tile). The tiles are split evenly over grid.x = num_splits CTAs (flash-decoding); the
//     count comes from shapes only, so the launch is graph-capturable. num_splits > 1 writes fp32
//     partials (out, log2-sum-exp) and decode_merge_kernel combines them by log-sum-exp.
//   * Per tile: 128-bit loads of K and V for the NEXT tile are issued into registers before the math
//     on the current tile (register double buffering); the tile sits in shared memory (K rows padded
//     by 16 bytes so that lanes reading different keys hit different banks). S = Q K^T: warp w owns
//     rows 4w..4w+3, lane n owns key slot n; the online softmax reduces each row across the warp with
//     shuffles; P goes through shared memory to the P.V step, where thread t owns 8 consecutive
//     output columns (one 128-bit vector of V) of D/64 rows. fp32 everywhere after the loads.
//   * Masks are per row inside the tile (causal position, and the row's own block / S2 window: rows
//     of one CTA can sit in two different key blocks when Sq > 1).
// Safety: whatever the metadata, reads stay inside the buffers: L is clamped to the cache, kv_num to
// [0, N], list ids outside [0, p_max/bs] are skipped, page ids clamped to [0, P); keys at or past L are
// never loaded (their tile slots are zero), so NaN in unused cache memory cannot leak in.
#pragma once

#include <algorithm>

#include "portable.cuh"

namespace sparse_attn {
namespace decode {

// Launch shape. Chosen on paper (no GPU was at hand to tune on): 4 warps, kTileN = 32 ties one key
// slot to one lane in S = Q K^T, kRows = 16 covers G*Sq of the common GQA groups in one CTA.
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kRows = 16;                      // query rows (of the G*Sq of a group) per CTA
constexpr int kRowsPerWarp = kRows / kWarps;   // rows of S each warp computes
constexpr int kTileN = 32;                     // key slots per tile: one per lane in S = Q K^T
constexpr int kVec = 8;                        // 16-bit elements per 128-bit load
constexpr int kMaxSplits = 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

enum Mode : int { kDense = 0, kList = 1, kS2 = 2 };
enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// Everything a launch needs; element strides (not bytes). Built by the bindings from tensors.
struct DecodeParams {
  const void* q;
  const void* k;
  const void* v;
  const int* seqlens;      // [B]
  const int* block_table;  // [B, max_pages] or null (contiguous cache)
  const int* kv_num;       // [B, Hkv] or null
  const int* kv_idx;       // [B, Hkv, N] or null
  const int* s2_residues;  // [Hkv] or null
  void* out;               // [B, Hq, Sq, D] contiguous, q's dtype
  float* lse;              // [B, Hq, Sq] natural log
  float* o_part;           // [num_splits, B*Hq*Sq, D] when num_splits > 1, else null
  float* lse2_part;        // [num_splits, B*Hq*Sq], log2 units
  int64_t q_sb, q_sh, q_ss;
  int64_t k_s0, k_s1, k_s2;  // contiguous: (b, h, token); paged: (page, slot, h)
  int64_t v_s0, v_s1, v_s2;
  int64_t seqlens_s, bt_sb, bt_sp, num_sb, num_sh, idx_sb, idx_sh, idx_st, res_sh;
  int B, Hq, Hkv, G, Sq, head_dim;
  int s_cap;      // tokens one sequence's cache can hold
  int page_size;  // 0: contiguous cache
  int num_pages;
  int n_list;     // N, the list capacity
  int block_size, s2_local, s2_stride, own_block, mode;
  int num_splits, row_chunks;
  int vec_ok;        // q, k, v pointers and strides allow 128-bit loads
  float scale_log2;  // softmax scale * log2(e)
};

// ------------------------------------------------------------------------------------------------
// The virtual list of kept key blocks of one (sequence, KV head)
// ------------------------------------------------------------------------------------------------
struct Walk {
  int L;             // keys in the cache (clamped)
  int pb_lo, pb_hi;  // key blocks of the first visible row and of the last row
  int n_blocks;      // entries of the virtual list
  int n_list;        // list mode: list entries (kv_num clamped to [0, N])
  int residue;       // S2: this head's residue (-1: dense); dense mode: -1
  int count_s;       // S2: strided blocks left of the window
  int w0;            // S2: first block of the union of the rows' windows
  int unit;          // keys per unit: min(bs, kTileN)
  int units_per_block, units_per_tile, n_units, n_tiles;
};

__device__ __forceinline__ Walk make_walk(const DecodeParams& p, int b, int h) {
  Walk w{};
  const int bs = p.block_size;
  w.residue = -1;
  w.unit = imin(bs, kTileN);
  w.units_per_block = bs / w.unit;
  w.units_per_tile = kTileN / w.unit;
  w.L = iclamp(load_global(p.seqlens, b * p.seqlens_s), 0, p.s_cap);
  if (w.L == 0) return w;
  w.pb_lo = imax(w.L - p.Sq, 0) / bs;
  w.pb_hi = (w.L - 1) / bs;
  if (p.mode == kList) {
    w.n_list = iclamp(load_global(p.kv_num, b * p.num_sb + h * p.num_sh), 0, p.n_list);
    w.n_blocks = w.n_list + (p.own_block ? w.pb_hi - w.pb_lo + 1 : 0);
  } else {
    if (p.mode == kS2) w.residue = load_global(p.s2_residues, h * p.res_sh);
    if (w.residue >= 0) {
      w.w0 = imax(0, w.pb_lo - p.s2_local + 1);
      w.count_s = (w.residue < p.s2_stride && w.w0 > w.residue) ? (w.w0 - 1 - w.residue) / p.s2_stride + 1 : 0;
    } else {
      w.residue = -1;  // a dense head walks every block, as dense mode does
    }
    w.n_blocks = w.count_s + w.pb_hi - w.w0 + 1;
  }
  w.n_units = w.n_blocks * w.units_per_block;
  w.n_tiles = (w.n_units + w.units_per_tile - 1) / w.units_per_tile;
  return w;
}

// Is c among the list's entries [0, n)? (ascending: binary search; reads stay inside [0, n))
__device__ __forceinline__ bool list_contains(const int* idx, int64_t row, int64_t st, int n, int c) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    const int x = load_global(idx, row + mid * st);
    if (x == c) return true;
    if (x < c) lo = mid + 1; else hi = mid;
  }
  return false;
}

// Key block of virtual entry t, or -1 when the entry is empty (an id outside [0, pb_hi], a repeat,
// an own block already listed). own: the block is kept only for the rows that sit in it.
__device__ __forceinline__ int entry_block(const DecodeParams& p, const Walk& w, int64_t row, int t, int& own) {
  own = 0;
  if (p.mode == kList) {
    if (t < w.n_list) {
      const int c = load_global(p.kv_idx, row + t * p.idx_st);
      if (c < 0 || c > w.pb_hi) return -1;  // pb_hi < ceil(s_cap / bs): also drops out-of-range ids
      if (t > 0 && load_global(p.kv_idx, row + (t - 1) * p.idx_st) == c) return -1;
      return c;
    }
    const int c = w.pb_lo + (t - w.n_list);
    if (list_contains(p.kv_idx, row, p.idx_st, w.n_list, c)) return -1;
    own = 1;
    return c;
  }
  return t < w.count_s ? w.residue + t * p.s2_stride : w.w0 + (t - w.count_s);
}

// Key slot n of a tile: (j << 1) | own, or -1 for an empty slot (also every j >= L: never loaded).
__device__ __forceinline__ int slot_key(const DecodeParams& p, const Walk& w, int64_t row, int tile, int n) {
  const int u = tile * w.units_per_tile + n / w.unit;
  if (u >= w.n_units) return -1;
  int own;
  const int c = entry_block(p, w, row, u / w.units_per_block, own);
  if (c < 0) return -1;
  const int j = c * p.block_size + (u % w.units_per_block) * w.unit + n % w.unit;
  return j < w.L ? (j << 1) | own : -1;
}

// Does the row at position row_p (-1: no row / sees nothing) see the key of slot `key`?
__device__ __forceinline__ bool visible(const DecodeParams& p, const Walk& w, int row_p, int key) {
  if (key < 0 || row_p < 0) return false;
  const int j = key >> 1;
  if (j > row_p) return false;
  const int c = j / p.block_size, rb = row_p / p.block_size;
  if (p.mode == kList) return !(key & 1) || c == rb;
  if (w.residue < 0) return true;
  return rb - c < p.s2_local || c % p.s2_stride == w.residue;
}

// ------------------------------------------------------------------------------------------------
// Element types: 8 values per 128-bit vector, fp32 math
// ------------------------------------------------------------------------------------------------
template <class T> struct Elem;
template <> struct Elem<__half> {
  static __device__ __forceinline__ float2 to_float2(uint32_t u) { return __half22float2(bitcast<__half2>(u)); }
  static __device__ __forceinline__ uint32_t from_float2(float a, float b) {
    return bitcast<uint32_t>(__floats2half2_rn(a, b));
  }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float2 to_float2(uint32_t u) {
    return __bfloat1622float2(bitcast<__nv_bfloat162>(u));
  }
  static __device__ __forceinline__ uint32_t from_float2(float a, float b) {
    return bitcast<uint32_t>(__floats2bfloat162_rn(a, b));
  }
};

template <class T>
__device__ __forceinline__ void unpack8(const uint4& v, float (&f)[kVec]) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = Elem<T>::to_float2(w[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <class T>
__device__ __forceinline__ uint4 pack8(const float (&f)[kVec]) {
  return make_uint4(Elem<T>::from_float2(f[0], f[1]), Elem<T>::from_float2(f[2], f[3]),
                    Elem<T>::from_float2(f[4], f[5]), Elem<T>::from_float2(f[6], f[7]));
}

// base[off .. off + 8) from global memory: one 128-bit load when vec_ok (base 16-byte aligned and
// off a multiple of 8), else eight 16-bit loads.
template <class T>
__device__ __forceinline__ uint4 load8(const T* base, int64_t off, bool vec_ok) {
  if (vec_ok) return load_global(reinterpret_cast<const uint4*>(base), off / kVec);
  const unsigned short* s = reinterpret_cast<const unsigned short*>(base);
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = uint32_t(load_global(s, off + 2 * i)) | (uint32_t(load_global(s, off + 2 * i + 1)) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// K and V of this thread's LOADS slots of `tile` (zeros for empty slots) into registers.
template <class T, int D, int LOADS>
__device__ __forceinline__ void load_tile(const DecodeParams& p, const Walk& w, int64_t list_row, int b, int h,
                                          int tile, uint4 (&kreg)[LOADS], uint4 (&vreg)[LOADS], int (&key)[LOADS]) {
  constexpr int DV = D / kVec, NRG = kThreads / DV;
  const int col = (threadIdx.x % DV) * kVec;
  const T* kbase = static_cast<const T*>(p.k);
  const T* vbase = static_cast<const T*>(p.v);
#pragma unroll
  for (int i = 0; i < LOADS; ++i) {
    key[i] = slot_key(p, w, list_row, tile, threadIdx.x / DV + i * NRG);
    kreg[i] = vreg[i] = make_uint4(0u, 0u, 0u, 0u);
    if (key[i] < 0) continue;
    const int j = key[i] >> 1;
    int64_t ko, vo;
    if (p.page_size) {
      const int page =
          iclamp(load_global(p.block_table, b * p.bt_sb + (j / p.page_size) * p.bt_sp), 0, p.num_pages - 1);
      const int slot = j % p.page_size;
      ko = page * p.k_s0 + slot * p.k_s1 + h * p.k_s2;
      vo = page * p.v_s0 + slot * p.v_s1 + h * p.v_s2;
    } else {
      ko = b * p.k_s0 + h * p.k_s1 + j * p.k_s2;
      vo = b * p.v_s0 + h * p.v_s1 + j * p.v_s2;
    }
    kreg[i] = load8(kbase, ko + col, p.vec_ok);
    vreg[i] = load8(vbase, vo + col, p.vec_ok);
  }
}

template <class T, int D>
struct SplitSmem {
  static constexpr int kKStride = D + kVec;     // padded K row (elements)
  static constexpr int kPStride = kTileN + 1;   // padded P row (floats)
  static constexpr size_t q_off = 0;                                        // float [kRows][D]
  static constexpr size_t p_off = q_off + sizeof(float) * kRows * D;       // float [kRows][kPStride]
  static constexpr size_t k_off = p_off + sizeof(float) * kRows * kPStride;  // T [kTileN][kKStride]
  static constexpr size_t v_off = k_off + 2 * kTileN * kKStride;           // T [kTileN][D]
  static constexpr size_t bytes = v_off + 2 * kTileN * D;
  static_assert(p_off % 16 == 0 && k_off % 16 == 0 && v_off % 16 == 0, "128-bit aligned shared tiles");
};

// ------------------------------------------------------------------------------------------------
// Split kernel: one (split, KV head x row chunk, sequence) per CTA
// ------------------------------------------------------------------------------------------------
// CTAs per SM the register allocation aims for (ptxas otherwise trades a few spills for occupancy).
template <int D> constexpr int kMinBlocksPerSm = D <= 64 ? 4 : (D <= 128 ? 3 : 2);

template <class T, int D>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm<D>) decode_split_kernel(const DecodeParams p) {
  static_assert(D == 64 || D == 128 || D == 256, "head dims 64, 128, 256");
  static_assert(sizeof(T) == 2, "16-bit element types");
  constexpr int DV = D / kVec;                   // 128-bit vectors per row: 8, 16, 32
  constexpr int NRG = kThreads / DV;             // P.V row groups: 16, 8, 4
  constexpr int RPT = kRows / NRG;               // P.V rows per thread: 1, 2, 4
  constexpr int LOADS = kTileN * DV / kThreads;  // K (and V) vectors per thread per tile: 2, 4, 8
  using S = SplitSmem<T, D>;
  static_assert(kTileN * DV % kThreads == 0 && kRows % NRG == 0, "tile shape");

  SA_DYNAMIC_SMEM(smem);
  float* q_s = reinterpret_cast<float*>(smem + S::q_off);  // Q * scale * log2(e)
  float* p_s = reinterpret_cast<float*>(smem + S::p_off);  // P of the current tile
  T* k_s = reinterpret_cast<T*>(smem + S::k_off);
  T* v_s = reinterpret_cast<T*>(smem + S::v_off);
  __shared__ float alpha_s[kRows], m_s[kRows], l_s[kRows];
  __shared__ int row_p_s[kRows];  // a row's position p, or -1: no such row / it sees nothing
  __shared__ int key_s[kTileN];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x, h = blockIdx.y % p.Hkv, row0 = (blockIdx.y / p.Hkv) * kRows, b = blockIdx.z;
  const int nrows = imin(kRows, p.G * p.Sq - row0);
  const Walk w = make_walk(p, b, h);
  const int64_t list_row = b * p.idx_sb + h * p.idx_sh;  // offset of this (sequence, head)'s kv_idx row
  const int per_split = (w.n_tiles + p.num_splits - 1) / p.num_splits;
  const int t_begin = split * per_split, t_end = imin(w.n_tiles, t_begin + per_split);

  if (tid < kRows) {
    const int rp = tid < nrows ? w.L - p.Sq + (row0 + tid) % p.Sq : -1;
    row_p_s[tid] = rp >= 0 ? rp : -1;
  }
  const T* qbase = static_cast<const T*>(p.q);
  for (int i = tid; i < kRows * DV; i += kThreads) {
    const int r = i / DV, col = (i % DV) * kVec;
    float f[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    if (r < nrows) {
      const int gr = row0 + r, hq = h * p.G + gr / p.Sq, qi = gr % p.Sq;
      unpack8<T>(load8(qbase, b * p.q_sb + hq * p.q_sh + qi * p.q_ss + col, p.vec_ok), f);
    }
    float4* dst = reinterpret_cast<float4*>(q_s + r * D + col);
    dst[0] = make_float4(f[0] * p.scale_log2, f[1] * p.scale_log2, f[2] * p.scale_log2, f[3] * p.scale_log2);
    dst[1] = make_float4(f[4] * p.scale_log2, f[5] * p.scale_log2, f[6] * p.scale_log2, f[7] * p.scale_log2);
  }

  uint4 kreg[LOADS], vreg[LOADS];
  int kkey[LOADS];
  if (t_begin < t_end) load_tile<T, D, LOADS>(p, w, list_row, b, h, t_begin, kreg, vreg, kkey);

  const int r0 = warp * kRowsPerWarp;  // this warp's rows of S
  float m_run[kRowsPerWarp], l_run[kRowsPerWarp];
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) { m_run[k] = kNegInf; l_run[k] = 0.f; }
  const int col = (tid % DV) * kVec;   // P.V: this thread's 8 output columns ...
  const int prow = (tid / DV) * RPT;   // ... of rows prow .. prow + RPT - 1
  float acc[RPT][kVec];
#pragma unroll
  for (int k = 0; k < RPT; ++k)
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[k][e] = 0.f;

  __syncthreads();  // q_s, row_p_s
  int row_p[kRowsPerWarp];
  bool warp_live = false;
#pragma unroll
  for (int k = 0; k < kRowsPerWarp; ++k) { row_p[k] = row_p_s[r0 + k]; warp_live |= row_p[k] >= 0; }
  bool live[RPT];
#pragma unroll
  for (int k = 0; k < RPT; ++k) live[k] = row_p_s[prow + k] >= 0;

  for (int tile = t_begin; tile < t_end; ++tile) {
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const int n = tid / DV + i * NRG;
      *reinterpret_cast<uint4*>(k_s + n * S::kKStride + col) = kreg[i];
      *reinterpret_cast<uint4*>(v_s + n * D + col) = vreg[i];
      if (col == 0) key_s[n] = kkey[i];
    }
    __syncthreads();
    if (tile + 1 < t_end) load_tile<T, D, LOADS>(p, w, list_row, b, h, tile + 1, kreg, vreg, kkey);

    if (warp_live) {  // S = Q K^T (4 rows x this lane's key), then the online softmax of each row
      float s[kRowsPerWarp] = {};
      const T* krow = k_s + lane * S::kKStride;
#pragma unroll 4
      for (int dv = 0; dv < DV; ++dv) {
        float kf[kVec];
        unpack8<T>(*reinterpret_cast<const uint4*>(krow + dv * kVec), kf);
#pragma unroll
        for (int k = 0; k < kRowsPerWarp; ++k) {
          const float4* qv = reinterpret_cast<const float4*>(q_s + (r0 + k) * D + dv * kVec);
          const float4 a = qv[0], c = qv[1];
          s[k] += a.x * kf[0] + a.y * kf[1] + a.z * kf[2] + a.w * kf[3] + c.x * kf[4] + c.y * kf[5] + c.z * kf[6] +
                  c.w * kf[7];
        }
      }
      const int key = key_s[lane];
#pragma unroll
      for (int k = 0; k < kRowsPerWarp; ++k) {
        const float sk = visible(p, w, row_p[k], key) ? s[k] : kNegInf;
        const float m_new = fmaxf(m_run[k], warp_max(sk));
        const bool none = m_new == kNegInf;  // nothing visible yet: keep alpha 1, avoid inf - inf
        const float alpha = none ? 1.f : exp2f(m_run[k] - m_new);
        const float pk = none ? 0.f : exp2f(sk - m_new);
        l_run[k] = l_run[k] * alpha + warp_sum(pk);
        m_run[k] = m_new;
        p_s[(r0 + k) * S::kPStride + lane] = pk;
        if (lane == 0) alpha_s[r0 + k] = alpha;
      }
    }
    __syncthreads();

#pragma unroll
    for (int k = 0; k < RPT; ++k) {  // O = alpha * O + P V
      if (!live[k]) continue;
      const float a = alpha_s[prow + k];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[k][e] *= a;
    }
#pragma unroll 4
    for (int n = 0; n < kTileN; ++n) {
      float vf[kVec];
      unpack8<T>(*reinterpret_cast<const uint4*>(v_s + n * D + col), vf);
#pragma unroll
      for (int k = 0; k < RPT; ++k) {
        if (!live[k]) continue;
        const float pn = p_s[(prow + k) * S::kPStride + n];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[k][e] += pn * vf[e];
      }
    }
    __syncthreads();
  }

  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < kRowsPerWarp; ++k) { m_s[r0 + k] = m_run[k]; l_s[r0 + k] = l_run[k]; }
  }
  __syncthreads();
  const int rows_total = p.B * p.Hq * p.Sq;
#pragma unroll
  for (int k = 0; k < RPT; ++k) {
    const int r = prow + k;
    if (r >= nrows) continue;
    const int gr = row0 + r;
    const int orow = (b * p.Hq + h * p.G + gr / p.Sq) * p.Sq + gr % p.Sq;
    const float l = l_s[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
    const float lse2 = l > 0.f ? m_s[r] + log2f(l) : kNegInf;
    float o[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) o[e] = acc[k][e] * inv;
    if (p.o_part) {
      float4* dst = reinterpret_cast<float4*>(p.o_part);
      const int64_t at = ((int64_t(split) * rows_total + orow) * D + col) / 4;
      store_global(dst, at, make_float4(o[0], o[1], o[2], o[3]));
      store_global(dst, at + 1, make_float4(o[4], o[5], o[6], o[7]));
      if (col == 0) store_global(p.lse2_part, int64_t(split) * rows_total + orow, lse2);
    } else {
      store_global(static_cast<uint4*>(p.out), (int64_t(orow) * D + col) / kVec, pack8<T>(o));
      if (col == 0) store_global(p.lse, orow, l > 0.f ? lse2 * kLn2 : kNegInf);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Merge kernel: out = sum_s 2^(lse2_s - lse2) o_s, lse2 = log2 sum_s 2^lse2_s (per row, fp32)
// ------------------------------------------------------------------------------------------------
template <class T, int D>
__global__ void __launch_bounds__(kThreads) decode_merge_kernel(const DecodeParams p) {
  constexpr int TPR = D / 4;            // threads per row, 4 columns each
  constexpr int RPC = kThreads / TPR;   // rows per CTA
  const int rows = p.B * p.Hq * p.Sq;
  const int row = blockIdx.x * RPC + threadIdx.x / TPR, col = (threadIdx.x % TPR) * 4;
  if (row >= rows) return;
  float m = kNegInf;
  for (int s = 0; s < p.num_splits; ++s) m = fmaxf(m, load_global<float>(p.lse2_part, int64_t(s) * rows + row));
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float sum = 0.f;
  if (m != kNegInf) {
    for (int s = 0; s < p.num_splits; ++s) {
      const float l = load_global<float>(p.lse2_part, int64_t(s) * rows + row);
      if (l == kNegInf) continue;  // an empty split: its (zero) partial adds nothing
      const float wgt = exp2f(l - m);
      const float4 o =
          load_global(reinterpret_cast<const float4*>(p.o_part), ((int64_t(s) * rows + row) * D + col) / 4);
      acc.x += wgt * o.x; acc.y += wgt * o.y; acc.z += wgt * o.z; acc.w += wgt * o.w;
      sum += wgt;
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  const uint2 packed = make_uint2(Elem<T>::from_float2(acc.x * inv, acc.y * inv),
                                  Elem<T>::from_float2(acc.z * inv, acc.w * inv));
  store_global(static_cast<uint2*>(p.out), (int64_t(row) * D + col) / 4, packed);
  if (col == 0) store_global(p.lse, row, sum > 0.f ? (m + log2f(sum)) * kLn2 : kNegInf);
}

// ------------------------------------------------------------------------------------------------
// Host side: split count from shapes, launch
// ------------------------------------------------------------------------------------------------
// Upper bound of a (sequence, KV head)'s tiles, from shapes only (no device reads). S2 counts the
// strided heads; a dense S2 head (residue -1) has more tiles and simply takes longer per split.
inline int max_tiles_bound(const DecodeParams& p) {
  const int bs = p.block_size, unit = imin(bs, kTileN);
  const int nblk = (p.s_cap + bs - 1) / bs, own = (p.Sq - 1) / bs + 2;
  int64_t kept = nblk;
  if (p.mode == kList) kept = int64_t(p.n_list) + (p.own_block ? own : 0);
  if (p.mode == kS2) kept = imin(nblk, p.s2_local + own + (nblk + p.s2_stride - 1) / p.s2_stride);
  const int64_t units = kept * (bs / unit);
  return int((units + kTileN / unit - 1) / (kTileN / unit));
}

// Splits per (sequence, KV head): enough CTAs for ~2 waves on `num_sms` SMs, each split keeping
// at least 2 tiles (so the merge stays cheap), at most kMaxSplits.
inline int choose_num_splits(const DecodeParams& p, int num_sms) {
  const int64_t ctas = int64_t(p.B) * p.Hkv * p.row_chunks;
  const int tiles = max_tiles_bound(p);
  if (ctas <= 0 || tiles < 4) return 1;
  const int64_t want = (2 * int64_t(num_sms) + ctas - 1) / ctas;
  return int(std::max<int64_t>(1, std::min<int64_t>({want, tiles / 2, kMaxSplits})));
}

template <class T, int D>
inline cudaError_t launch_decode_typed(const DecodeParams& p, cudaStream_t stream) {
  const size_t smem = SplitSmem<T, D>::bytes;
  auto split_kernel = decode_split_kernel<T, D>;
#if !SA_EMULATED
  if (smem > 48 * 1024) {  // above the default dynamic shared-memory limit: opt in
    const cudaError_t e = cudaFuncSetAttribute(split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
#endif
  SA_LAUNCH(split_kernel, dim3(p.num_splits, p.Hkv * p.row_chunks, p.B), dim3(kThreads), smem, stream, p);
  if (p.num_splits > 1) {
    constexpr int rows_per_cta = kThreads / (D / 4);
    const int rows = p.B * p.Hq * p.Sq;
    auto merge_kernel = decode_merge_kernel<T, D>;
    SA_LAUNCH(merge_kernel, dim3((rows + rows_per_cta - 1) / rows_per_cta), dim3(kThreads), 0, stream, p);
  }
#if SA_EMULATED
  (void)stream;
  return cudaSuccess;
#else
  return cudaGetLastError();
#endif
}

// The one entry point the bindings call.
inline cudaError_t launch_decode(DType dtype, const DecodeParams& p, cudaStream_t stream) {
  const bool bf = dtype == DType::kBFloat16;
  switch (p.head_dim) {
    case 64: return bf ? launch_decode_typed<__nv_bfloat16, 64>(p, stream) : launch_decode_typed<__half, 64>(p, stream);
    case 128:
      return bf ? launch_decode_typed<__nv_bfloat16, 128>(p, stream) : launch_decode_typed<__half, 128>(p, stream);
    case 256:
      return bf ? launch_decode_typed<__nv_bfloat16, 256>(p, stream) : launch_decode_typed<__half, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace decode
}  // namespace sparse_attn
