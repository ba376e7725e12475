// Torch binding of the position-walk prototypes (csrc/proto/position_walk.cu) for the timed comparison of
// scripts/position_walk_bench.py: one op that launches a walk by name. Built on demand by that script with
// torch.utils.cpp_extension.load (never part of the mustafar extension).
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "position_walk.cu"

namespace {

template <typename F>
void launch_fn(F fn, int D, at::Tensor pos, at::Tensor vals, at::Tensor out, int64_t ntiles, int64_t blocks,
               int64_t threads, int64_t tiles_data, int64_t check) {
  const int smem = (int)(threads / 32) * (D + 1) * proto::kLine;
  if (smem > 48 * 1024) TORCH_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess);
  fn<<<(unsigned)blocks, (unsigned)threads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint32_t*>(pos.data_ptr()), reinterpret_cast<const uint32_t*>(vals.data_ptr()),
      out.data_ptr<float>(), (int)ntiles, (int)tiles_data, (int)check);
  TORCH_CHECK(cudaGetLastError() == cudaSuccess, "position walk launch failed");
}

}  // namespace

// kind: "bitmap", "gap" or "index"; (D, S) one of the instantiations of position_walk.cu; ntiles tiles walked,
// tile t reading the rows of tile t % tiles_data; check: sum the rows into out (else the walk and scatter alone)
void walk(const std::string& kind, int64_t D, int64_t S, at::Tensor pos, at::Tensor vals, at::Tensor out,
          int64_t ntiles, int64_t tiles_data, int64_t blocks, int64_t threads, int64_t check) {
  TORCH_CHECK(pos.is_cuda() && vals.is_cuda() && out.is_cuda() && out.scalar_type() == at::kFloat, "CUDA tensors");
  TORCH_CHECK(out.numel() >= blocks * threads, "out needs blocks * threads floats");
  TORCH_CHECK(tiles_data >= 1 && pos.numel() >= 32 * tiles_data && vals.numel() >= 32 * tiles_data,
              "pos / vals (word-major tiles) need the words of 32 * tiles_data rows");
#define PW_CASE(K, NAME, DD, SS)                                          \
  if (kind == NAME && D == DD && S == SS) {                               \
    launch_fn(proto::K<DD, SS>, DD, pos, vals, out, ntiles, blocks, threads, tiles_data, check); \
    return;                                                               \
  }
  PW_CASE(bitmap_walk, "bitmap", 128, 38) PW_CASE(bitmap_walk, "bitmap", 128, 64)
  PW_CASE(bitmap_walk, "bitmap", 64, 19) PW_CASE(bitmap_walk, "bitmap", 64, 32)
  PW_CASE(gap_walk, "gap", 128, 43) PW_CASE(gap_walk, "gap", 128, 68)
  PW_CASE(gap_walk, "gap", 64, 21) PW_CASE(gap_walk, "gap", 64, 34)
  PW_CASE(index_walk, "index", 128, 38) PW_CASE(index_walk, "index", 128, 64)
  PW_CASE(index_walk, "index", 64, 19) PW_CASE(index_walk, "index", 64, 32)
#undef PW_CASE
  TORCH_CHECK(false, "no position walk instantiated for kind=", kind, ", D=", D, ", S=", S);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("walk", &walk, "launch one position-walk prototype"); }
