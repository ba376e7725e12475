// Python binding of the prototype decode kernels (scripts/kernel_proto.py).
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include "proto_params.h"

bool proto_launch_gq_f16(const proto::Params&, int, int, int, cudaStream_t);
bool proto_launch_gq_bf16(const proto::Params&, int, int, int, cudaStream_t);
bool proto_launch_tc_f16(const proto::Params&, int, int, int, cudaStream_t);
bool proto_launch_tc_bf16(const proto::Params&, int, int, int, cudaStream_t);
bool proto_launch_tc_fp8(const proto::Params&, int, int, int, cudaStream_t);
void proto_merge(const float*, void*, int, int, int, bool, cudaStream_t);

// mode: 0 = gq (q gather K side), 1 = tc (tensor cores both sides); fp8: values e4m3 + fp16 scales
torch::Tensor decode(torch::Tensor q, torch::Tensor kbm, torch::Tensor kval, torch::Tensor vbm, torch::Tensor vval,
                     c10::optional<torch::Tensor> ksc, c10::optional<torch::Tensor> vsc, int64_t T, int64_t K,
                     double scale, int64_t mode, int64_t NS, torch::Tensor ws) {
  const int B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = kbm.size(1), Tcap = kbm.size(2);
  const int G = Hq / Hkv;
  TORCH_CHECK(Tcap % 32 == 0 && G <= 8 && Hq % Hkv == 0);
  TORCH_CHECK(kbm.is_contiguous() && vbm.is_contiguous() && q.is_contiguous());
  const bool fp8 = ksc.has_value();
  proto::Params p{};
  p.q = q.data_ptr();
  p.kbm = (const uint32_t*)kbm.data_ptr(); p.vbm = (const uint32_t*)vbm.data_ptr();
  p.kval = (const uint8_t*)kval.data_ptr(); p.vval = (const uint8_t*)vval.data_ptr();
  p.ksc = fp8 ? ksc->data_ptr() : nullptr; p.vsc = fp8 ? vsc->data_ptr() : nullptr;
  p.ws = ws.data_ptr<float>();
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.G = G; p.T = T; p.Tcap = Tcap; p.NS = NS;
  const int NT = Tcap / 32;
  p.tps = (NT + NS - 1) / NS;
  p.qscale = (float)(scale * 1.4426950408889634);
  TORCH_CHECK(ws.numel() >= (int64_t)B * Hq * NS * 4 * (D + 2));
  auto st = c10::cuda::getCurrentCUDAStream().stream();
  const bool bf = q.scalar_type() == at::kBFloat16;
  const int GQ = G == 1 ? 1 : (G <= 4 ? 4 : 8);
  bool ok;
  if (mode == 0) ok = bf ? proto_launch_gq_bf16(p, D, K, GQ, st) : proto_launch_gq_f16(p, D, K, GQ, st);
  else ok = fp8 ? proto_launch_tc_fp8(p, D, K, 8, st) : (bf ? proto_launch_tc_bf16(p, D, K, 8, st) : proto_launch_tc_f16(p, D, K, 8, st));
  TORCH_CHECK(ok, "no instantiation for D=", D, " K=", K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  auto out = torch::empty_like(q);
  proto_merge(p.ws, out.data_ptr(), B * Hq, NS * 4, D, bf, st);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("decode", &decode); }
