#pragma once
// The CPU kernels of the mustafar ops (registered in csrc/mustafar.cpp; the schemas are there too).
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace mustafar {
namespace cpu {

// csrc/cpu/encode.cpp
std::tuple<at::Tensor, at::Tensor> encode_bitmap_cpu(const at::Tensor& x, const at::Tensor& mask, int64_t k);
at::Tensor decode_bitmap_cpu(const at::Tensor& bitmap, const at::Tensor& values, int64_t head_dim);
std::tuple<at::Tensor, at::Tensor> prune_encode_topk_cpu(const at::Tensor& x, int64_t k);

// csrc/cpu/sparse_decode.cpp. kernel: only "auto" (the CUDA kernel names apply to CUDA tensors); pdl: ignored.
at::Tensor sparse_decode_cpu(const at::Tensor& q, const at::Tensor& k_bitmap, const at::Tensor& k_values,
                             const at::Tensor& v_bitmap, const at::Tensor& v_values, const at::Tensor& k_window,
                             const at::Tensor& v_window, const std::optional<at::Tensor>& kv_start, double scale,
                             const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                             const std::optional<at::Tensor>& lengths, c10::string_view kernel, bool pdl);

// csrc/cpu/append_decode.cpp: one decode step of a preallocated cache layer, in place.
void append_decode_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_window,
                       const at::Tensor& v_window, const at::Tensor& k_bitmap, const at::Tensor& k_values,
                       const at::Tensor& v_bitmap, const at::Tensor& v_values,
                       const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                       const at::Tensor& lengths, int64_t local_window, int64_t chunk);

}  // namespace cpu
}  // namespace mustafar
