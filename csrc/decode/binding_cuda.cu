// binding_cuda.cu -- `sparse_attn::sparse_decode_cuda`: the decode kernel (sparse_decode.cuh) on CUDA
// tensors, launched on the current stream. No host synchronisation; the split count comes from the
// shapes and the SM count, so the call is CUDA-graph capturable.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "binding_common.h"

namespace sparse_attn {
namespace decode {
namespace {

std::tuple<at::Tensor, at::Tensor> sparse_decode_cuda(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const c10::optional<at::Tensor>& block_table, const c10::optional<at::Tensor>& kv_num,
    const c10::optional<at::Tensor>& kv_idx, const c10::optional<at::Tensor>& s2_residues, int64_t s2_local,
    int64_t s2_stride, int64_t block_size, double scale, bool own_block, int64_t num_splits) {
  TORCH_CHECK(q.is_cuda(), "sparse_decode_cuda: q must be a CUDA tensor");
  const c10::cuda::CUDAGuard device_guard(q.device());
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, q.device().index()));
  DecodeCall call = prepare_decode(q, k_cache, v_cache, cache_seqlens, block_table, kv_num, kv_idx, s2_residues,
                                   s2_local, s2_stride, block_size, scale, own_block, num_splits, num_sms);
  if (empty_call(call)) return {call.out, call.lse};
  const cudaError_t err = launch_decode(call.dtype, call.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "sparse_decode_cuda: launch failed: ", cudaGetErrorString(err));
  return {call.out, call.lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparse_attn, m) { m.def("sparse_decode_cuda" SPARSE_DECODE_SCHEMA_ARGS); }

TORCH_LIBRARY_IMPL(sparse_attn, CUDA, m) { m.impl("sparse_decode_cuda", &sparse_decode_cuda); }

}  // namespace decode
}  // namespace sparse_attn
