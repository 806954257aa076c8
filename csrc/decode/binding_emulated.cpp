// binding_emulated.cpp -- `sparse_attn::sparse_decode_emulated`: the CUDA decode kernel
// (sparse_decode.cuh) compiled as host C++20 and run on CPU tensors under the shim of the CUDA
// execution model (csrc/shim/cuda_shim.h). The test tier's way to run the kernel source without a GPU.
// Every input and output tensor is registered with the shim's memory guard, so a read or write
// outside them raises instead of passing silently.
#include <torch/library.h>

#include "binding_common.h"

namespace sparse_attn {
namespace decode {
namespace {

constexpr int kEmulatedSms = 8;  // a pretend chip for the split heuristic

// The bytes a view can address: [data, data + (sum_i (size_i - 1) * stride_i + 1) * itemsize).
size_t span_bytes(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  return size_t(last + 1) * t.element_size();
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_emulated(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& kv_num,
    const c10::optional<at::Tensor>& kv_idx, const c10::optional<at::Tensor>& s2_residues, int64_t s2_local,
    int64_t s2_stride, int64_t block_size, double scale, bool own_block, int64_t num_splits) {
  DecodeCall call = prepare_decode(q, k_cache, v_cache, cache_seqlens, block_table, kv_num, kv_idx, s2_residues,
                                   s2_local, s2_stride, block_size, scale, own_block, num_splits, kEmulatedSms);
  if (empty_call(call)) return {call.out, call.lse};
  cuda_shim::MemoryGuard guard;
  const std::pair<const char*, const at::Tensor*> inputs[] = {
      {"q", &q}, {"k_cache", &k_cache}, {"v_cache", &v_cache}, {"cache_seqlens", &cache_seqlens}};
  for (const auto& [name, t] : inputs) guard.allow_read(t->data_ptr(), span_bytes(*t), name);
  const std::pair<const char*, const c10::optional<at::Tensor>*> optional_inputs[] = {
      {"block_table", &block_table}, {"kv_num", &kv_num}, {"kv_idx", &kv_idx}, {"s2_residues", &s2_residues}};
  for (const auto& [name, t] : optional_inputs)
    if (t->has_value()) guard.allow_read((*t)->data_ptr(), span_bytes(**t), name);
  for (at::Tensor* t : {&call.out, &call.lse, &call.o_part, &call.lse2_part})
    if (t->defined()) guard.allow_write(t->data_ptr(), span_bytes(*t), "output");
  const cudaError_t err = launch_decode(call.dtype, call.params, nullptr);
  TORCH_CHECK(err == cudaSuccess, "sparse_decode_emulated: launch failed");
  return {call.out, call.lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_attn, m) { m.def("sparse_decode_emulated" SPARSE_DECODE_SCHEMA_ARGS); }

TORCH_LIBRARY_IMPL(sparse_attn, CPU, m) { m.impl("sparse_decode_emulated", &sparse_decode_emulated); }

}  // namespace decode
}  // namespace sparse_attn
