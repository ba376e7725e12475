// mustafar: the one binding file.
//
//   * TORCH_LIBRARY(mustafar, m): the op schemas (the contract in docs/design.md).
//   * TORCH_LIBRARY_IMPL(mustafar, CPU, m): the CPU kernels, in csrc/cpu/ (encode.cpp: encode_bitmap,
//     decode_bitmap, prune_encode_topk; sparse_decode.cpp: sparse_decode; append_decode.cpp: append_decode).
//   * The CUDA kernels live in csrc/cuda/ and register with TORCH_LIBRARY_IMPL(mustafar, CUDA, m) in
//     csrc/cuda/ops.cu.
//
// Format (docs/design.md): bitmap int64 [..., T, W] (W = D/64; bit j of word w <=> channel 64w+j
// stored), values [..., T, k] (stored values in ascending channel order, padding slots are 0), in the
// dense dtype or float8_e4m3fn with a float16 scale [..., T] per token vector (stored value =
// float(q8) * float(scale); rule: mustafar.format.quantize_fp8).
//
// sparse_decode's lengths (int32 [2] = (n_c, n_w), optional, never read on the host on CUDA): compressed
// rows [0, n_c) are attended and the window is a ring of R = k_window.size(2) slots, window row i in slot
// (n_c + i) % R. append_decode is one decode step writing that layout (semantics in docs/design.md).
//
// sparse_decode's variant argument (the Python wrapper's kernel=; not named "kernel" in the schema because
// inductor's FallbackKernel.create takes a parameter of that name) picks the CUDA decode kernel: "auto" (v7),
// "v7", "v7g" (v7 with k at run time), "v4", "v5", "v6", "v6g" or "v6k"; a name that cannot serve raises ValueError. pdl: launch
// the CUDA merge kernel as a programmatic dependent of the decode kernel (Hopper). The CPU kernel takes
// "auto" only and ignores pdl.

#include <torch/library.h>

#include "cpu/cpu_ops.h"

TORCH_LIBRARY(mustafar, m) {
  m.def("encode_bitmap(Tensor x, Tensor mask, int k) -> (Tensor bitmap, Tensor values)");
  m.def("decode_bitmap(Tensor bitmap, Tensor values, int head_dim) -> Tensor");
  m.def("prune_encode_topk(Tensor x, int k) -> (Tensor bitmap, Tensor values)");
  m.def(
      "sparse_decode(Tensor q, Tensor k_bitmap, Tensor k_values, Tensor v_bitmap, Tensor v_values, "
      "Tensor k_window, Tensor v_window, Tensor? kv_start, float scale, Tensor? k_scale=None, "
      "Tensor? v_scale=None, Tensor? lengths=None, str variant=\"auto\", bool pdl=True) -> Tensor");
  m.def(
      "append_decode(Tensor k, Tensor v, Tensor(a!) k_window, Tensor(b!) v_window, Tensor(c!) k_bitmap, "
      "Tensor(d!) k_values, Tensor(e!) v_bitmap, Tensor(f!) v_values, Tensor(g!)? k_scale, Tensor(h!)? v_scale, "
      "Tensor(i!) lengths, int local_window, int chunk) -> ()");
}

TORCH_LIBRARY_IMPL(mustafar, CPU, m) {
  m.impl("encode_bitmap", &mustafar::cpu::encode_bitmap_cpu);
  m.impl("decode_bitmap", &mustafar::cpu::decode_bitmap_cpu);
  m.impl("prune_encode_topk", &mustafar::cpu::prune_encode_topk_cpu);
  m.impl("sparse_decode", &mustafar::cpu::sparse_decode_cpu);
  m.impl("append_decode", &mustafar::cpu::append_decode_cpu);
}
