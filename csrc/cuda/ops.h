#pragma once
// The CUDA host functions of the mustafar ops (registered in ops.cu; schemas in csrc/mustafar.cpp).
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace mustafar_cuda {

// ops.cu
std::tuple<at::Tensor, at::Tensor> encode_bitmap_cuda(const at::Tensor& x, const at::Tensor& mask, int64_t k);
std::tuple<at::Tensor, at::Tensor> prune_encode_topk_cuda(const at::Tensor& x, int64_t k);
at::Tensor decode_bitmap_cuda(const at::Tensor& bitmap, const at::Tensor& values, int64_t head_dim);

// sparse_decode.cu: input checks, then plan_decode + launch_decode (plan.h)
at::Tensor sparse_decode_cuda(const at::Tensor& q, const at::Tensor& k_bitmap, const at::Tensor& k_values,
                              const at::Tensor& v_bitmap, const at::Tensor& v_values, const at::Tensor& k_window,
                              const at::Tensor& v_window, const std::optional<at::Tensor>& kv_start, double scale,
                              const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                              const std::optional<at::Tensor>& lengths, c10::string_view kernel, bool pdl);

// append.cu: one decode step of a preallocated cache layer (ring window + store, lengths on the device)
void append_decode_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_window,
                        const at::Tensor& v_window, const at::Tensor& k_bitmap, const at::Tensor& k_values,
                        const at::Tensor& v_bitmap, const at::Tensor& v_values,
                        const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                        const at::Tensor& lengths, int64_t local_window, int64_t chunk);

}  // namespace mustafar_cuda
