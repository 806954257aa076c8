// binding_common.h -- torch tensors -> DecodeParams, shared by binding_cuda.cu and
// binding_emulated.cpp. Checks only what keeps the kernel's memory accesses well defined (ranks,
// dtypes, sizes that agree, unit last strides); argument policy lives in sparse_attn/decode.py.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <limits>

#include "sparse_decode.cuh"

namespace sparse_attn {
namespace decode {

// The op schema both bindings register (the kernel-facing launcher signature of the spec, plus an
// optional split count: 0 chooses it from the shapes).
#define SPARSE_DECODE_SCHEMA_ARGS                                                                        \
  "(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, Tensor? kv_num, " \
  "Tensor? kv_idx, Tensor? s2_residues, int s2_local, int s2_stride, int block_size, float scale, "        \
  "bool own_block, int num_splits=0) -> (Tensor, Tensor)"

struct DecodeCall {
  DecodeParams params{};
  DType dtype = DType::kHalf;
  at::Tensor out, lse, o_part, lse2_part;
};

inline bool aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16) return false;
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && t.stride(d) % kVec) return false;
  return true;
}

inline void check_int32(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

// Validates, allocates out/lse (and the split partials) on q's device, fills the parameters.
// num_splits <= 0: choose from the shapes for a chip of `num_sms` SMs.
inline DecodeCall prepare_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& seqlens, const c10::optional<at::Tensor>& block_table,
                                 const c10::optional<at::Tensor>& kv_num, const c10::optional<at::Tensor>& kv_idx,
                                 const c10::optional<at::Tensor>& s2_residues, int64_t s2_local, int64_t s2_stride,
                                 int64_t block_size, double scale, bool own_block, int64_t num_splits, int num_sms) {
  TORCH_CHECK(q.dim() == 4, "q must be [B, Hq, Sq, D], got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16 for this kernel, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k_cache and v_cache must have q's dtype");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(),
              "k_cache and v_cache must be 4-D with the same shape, got ", k.sizes(), " and ", v.sizes());
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(3) == 1, "q, k_cache, v_cache need a unit last stride");
  const int64_t B = q.size(0), Hq = q.size(1), Sq = q.size(2), D = q.size(3);
  TORCH_CHECK(D == 64 || D == 128 || D == 256, "head dim must be 64, 128 or 256, got ", D);
  TORCH_CHECK(k.size(3) == D, "k_cache head dim ", k.size(3), " != q's ", D);
  TORCH_CHECK(block_size == 16 || block_size == 32 || block_size == 64 || block_size == 128,
              "block_size must be 16, 32, 64 or 128, got ", block_size);
  check_int32(seqlens, "cache_seqlens", 1);
  TORCH_CHECK(seqlens.size(0) == B, "cache_seqlens must have B = ", B, " entries");

  DecodeCall call;
  DecodeParams& p = call.params;
  const bool paged = block_table.has_value();
  int64_t Hkv, s_cap;
  if (paged) {
    const at::Tensor& bt = *block_table;
    check_int32(bt, "block_table", 2);
    TORCH_CHECK(bt.size(0) == B, "block_table must be [B, max_pages]");
    TORCH_CHECK(k.size(0) >= 1 && k.size(1) >= 1, "the page pool must hold at least one page of at least one slot");
    Hkv = k.size(2);
    s_cap = bt.size(1) * k.size(1);
    p.block_table = bt.data_ptr<int>();
    p.bt_sb = bt.stride(0);
    p.bt_sp = bt.stride(1);
    p.page_size = int(k.size(1));
    p.num_pages = int(k.size(0));
    p.k_s0 = k.stride(0); p.k_s1 = k.stride(1); p.k_s2 = k.stride(2);
    p.v_s0 = v.stride(0); p.v_s1 = v.stride(1); p.v_s2 = v.stride(2);
  } else {
    TORCH_CHECK(k.size(0) == B, "a contiguous k_cache must be [B, Hkv, S_max, D]");
    Hkv = k.size(1);
    s_cap = k.size(2);
    p.k_s0 = k.stride(0); p.k_s1 = k.stride(1); p.k_s2 = k.stride(2);
    p.v_s0 = v.stride(0); p.v_s1 = v.stride(1); p.v_s2 = v.stride(2);
  }
  TORCH_CHECK(Hkv >= 1 && Hq % Hkv == 0, "Hq = ", Hq, " must be a multiple of Hkv = ", Hkv);
  TORCH_CHECK(s_cap < (int64_t(1) << 30), "the cache holds ", s_cap, " tokens per sequence; at most 2^30 supported");

  TORCH_CHECK(kv_num.has_value() == kv_idx.has_value(), "kv_num and kv_idx go together");
  TORCH_CHECK(!(kv_num.has_value() && s2_residues.has_value()), "a block list and S2 are exclusive");
  p.mode = kDense;
  if (kv_num.has_value()) {
    check_int32(*kv_num, "kv_num", 2);
    check_int32(*kv_idx, "kv_idx", 3);
    TORCH_CHECK(kv_num->size(0) == B && kv_num->size(1) == Hkv, "kv_num must be [B, Hkv]");
    TORCH_CHECK(kv_idx->size(0) == B && kv_idx->size(1) == Hkv, "kv_idx must be [B, Hkv, N]");
    p.mode = kList;
    p.kv_num = kv_num->data_ptr<int>();
    p.kv_idx = kv_idx->data_ptr<int>();
    p.num_sb = kv_num->stride(0); p.num_sh = kv_num->stride(1);
    p.idx_sb = kv_idx->stride(0); p.idx_sh = kv_idx->stride(1); p.idx_st = kv_idx->stride(2);
    TORCH_CHECK(kv_idx->size(2) < (int64_t(1) << 26), "kv_idx is too long (N >= 2^26)");
    p.n_list = int(kv_idx->size(2));
  } else if (s2_residues.has_value()) {
    check_int32(*s2_residues, "s2_residues", 1);
    TORCH_CHECK(s2_residues->size(0) == Hkv, "s2_residues must have Hkv = ", Hkv, " entries");
    TORCH_CHECK(s2_local >= 1 && s2_stride >= 1 && s2_local < (1 << 30) && s2_stride < (1 << 30),
                "s2_local and s2_stride must be >= 1");
    p.mode = kS2;
    p.s2_residues = s2_residues->data_ptr<int>();
    p.res_sh = s2_residues->stride(0);
  }
  for (const at::Tensor* t : {&k, &v, &seqlens})
    TORCH_CHECK(t->device() == q.device(), "all tensors must be on q's device");
  for (const auto* t : {&block_table, &kv_num, &kv_idx, &s2_residues})
    if (t->has_value()) TORCH_CHECK((*t)->device() == q.device(), "all tensors must be on q's device");

  const int64_t G = Hq / Hkv, row_chunks = (G * Sq + kRows - 1) / kRows;
  TORCH_CHECK(B * Hq * Sq < (int64_t(1) << 31) && B <= 65535 && Hkv * row_chunks <= 65535,
              "too many sequences / heads / query rows for one launch");
  call.dtype = q.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kHalf;
  call.out = at::empty({B, Hq, Sq, D}, q.options());
  call.lse = at::empty({B, Hq, Sq}, q.options().dtype(at::kFloat));

  p.q = q.data_ptr(); p.k = k.data_ptr(); p.v = v.data_ptr();
  p.seqlens = seqlens.data_ptr<int>();
  p.seqlens_s = seqlens.stride(0);
  p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_ss = q.stride(2);
  p.B = int(B); p.Hq = int(Hq); p.Hkv = int(Hkv); p.G = int(G); p.Sq = int(Sq); p.head_dim = int(D);
  p.s_cap = int(s_cap);
  p.block_size = int(block_size);
  p.s2_local = int(s2_local);
  p.s2_stride = int(s2_stride);
  p.own_block = own_block ? 1 : 0;
  p.row_chunks = int(row_chunks);
  p.vec_ok = aligned16(q) && aligned16(k) && aligned16(v);
  p.scale_log2 = float(scale) * kLog2e;
  p.out = call.out.data_ptr();
  p.lse = call.lse.data_ptr<float>();
  p.num_splits = int(num_splits > 0 ? std::min<int64_t>(num_splits, kMaxSplits) : choose_num_splits(p, num_sms));
  if (p.num_splits > 1) {
    call.o_part = at::empty({p.num_splits, B * Hq * Sq, D}, q.options().dtype(at::kFloat));
    call.lse2_part = at::empty({p.num_splits, B * Hq * Sq}, q.options().dtype(at::kFloat));
    p.o_part = call.o_part.data_ptr<float>();
    p.lse2_part = call.lse2_part.data_ptr<float>();
  }
  return call;
}

// Nothing to launch: no rows (B, Hq or Sq is 0).
inline bool empty_call(const DecodeCall& c) { return c.params.B == 0 || c.params.Hq == 0 || c.params.Sq == 0; }

}  // namespace decode
}  // namespace sparse_attn
