// Torch binding of the gap-code decode prototype (csrc/proto/gap_decode.cuh) for scripts/gap_decode_bench.py: one
// op, decode + the extension's merge kernel (csrc/cuda/merge.cuh). Built on demand with torch.utils.cpp_extension.load
// (never part of the mustafar extension).
#include <torch/extension.h>

#include "../cuda/merge.cuh"
#include "gap_decode.cuh"

// the instantiations (dtype, D, S, GQ, e4m3 values): S = slots(D, k, 4) for 50 / 60 / 70 / 80 % (D = 128: k 64 /
// 51 / 38 / 26; D = 64: k 32 / 26 / 19 / 13), fp16 with 1, 4 and 8 query-head slots; bf16 at 70 / 50 % with 4 and 8;
// e4m3 values (fp16 models) at 70 / 50 % (D = 128) and 70 % (D = 64) with 1 and 4 slots (+ 8 at D = 128, 70 %)
#define GD_GQ(TT, DD, SS) GD_CASE(TT, DD, SS, 1, false) GD_CASE(TT, DD, SS, 4, false) GD_CASE(TT, DD, SS, 8, false)
#define GD_INSTANCES                                                                                          \
  GD_GQ(__half, 128, 68) GD_GQ(__half, 128, 56) GD_GQ(__half, 128, 44) GD_GQ(__half, 128, 32)                  \
  GD_GQ(__half, 64, 36) GD_GQ(__half, 64, 28) GD_GQ(__half, 64, 24) GD_GQ(__half, 64, 16)                      \
  GD_CASE(__nv_bfloat16, 128, 44, 4, false) GD_CASE(__nv_bfloat16, 128, 44, 8, false)                          \
  GD_CASE(__nv_bfloat16, 128, 68, 4, false) GD_CASE(__nv_bfloat16, 128, 68, 8, false)                          \
  GD_CASE(__half, 128, 44, 1, true) GD_CASE(__half, 128, 44, 4, true) GD_CASE(__half, 128, 44, 8, true)        \
  GD_CASE(__half, 128, 68, 1, true) GD_CASE(__half, 128, 68, 4, true)                                          \
  GD_CASE(__half, 64, 24, 1, true) GD_CASE(__half, 64, 24, 4, true)

namespace {

using gap_proto::GapParams;

template <typename T, int D, int S, int GQ, bool F8>
void go(GapParams& p, int nwarps, int64_t nsplit_req, cudaStream_t stream) {
  auto kern = gap_proto::gap_decode_kernel<T, D, S, GQ, F8>;
  const int smem = nwarps * p.wbytes;
  cudaFuncAttributes fa{};
  TORCH_CHECK(cudaFuncGetAttributes(&fa, kern) == cudaSuccess && nwarps * 32 <= fa.maxThreadsPerBlock,
              "gap decode: nwarps=", nwarps, " over the kernel's ", fa.maxThreadsPerBlock / 32, " warps");
  TORCH_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) == cudaSuccess,
              "gap decode: ", smem, " bytes of shared memory refused");
  int dev = 0, sms = 0, occ = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  TORCH_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, kern, nwarps * 32, smem) == cudaSuccess && occ > 0,
              "gap decode: no CTA of ", nwarps, " warps fits an SM");
  // splits: enough CTAs for two waves of the GPU (or the request), each a whole number of rounds of the warps
  const int64_t bh = (int64_t)p.B * p.Hkv;
  int64_t ns = nsplit_req > 0 ? nsplit_req : (2LL * sms * occ + bh - 1) / bh;
  const int64_t rounds = (p.ntile + nwarps - 1) / nwarps;
  ns = std::max<int64_t>(1, std::min<int64_t>(ns, rounds));
  p.tiles_per_split = (int)(((rounds + ns - 1) / ns) * nwarps);
  p.nsplit = (int)((p.ntile + p.tiles_per_split - 1) / p.tiles_per_split);
  if (p.nsplit < 1) p.nsplit = 1;
  dim3 grid((unsigned)p.nsplit, (unsigned)p.Hkv, (unsigned)p.B);
  kern<<<grid, nwarps * 32, smem, stream>>>(p);
  MF_CHECK_LAUNCH();
}

}  // namespace

// q [B, Hq, D]; kcode / vcode int32 [B, Hkv, ntile, NC, 32]; kval / vval [B, Hkv, ntile, S/4, 32, 4] (q's dtype,
// or float8_e4m3fn on both sides with float16 kscale / vscale [B, Hkv, ntile, 32]; else both empty); Tc tokens;
// kv_start int32 [B] or empty; returns [B, Hq, D] and the number of splits used
std::tuple<at::Tensor, int64_t> gap_decode(at::Tensor q, at::Tensor kcode, at::Tensor kval, at::Tensor vcode,
                                           at::Tensor vval, at::Tensor kscale, at::Tensor vscale, int64_t Tc,
                                           at::Tensor kv_start, double scale, int64_t nwarps, int64_t nsplit) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.is_contiguous(), "q: contiguous CUDA [B, Hq, D]");
  const bool f8 = kval.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK(vval.scalar_type() == kval.scalar_type() && (f8 || kval.scalar_type() == q.scalar_type()),
              "values in q's dtype or float8_e4m3fn, the same on both sides; got ", kval.scalar_type(), " / ",
              vval.scalar_type());
  TORCH_CHECK(!f8 || q.scalar_type() == at::kHalf, "e4m3 values: float16 models only (the prototype's tiles are fp16)");
  TORCH_CHECK(f8 == (kscale.numel() > 0) && f8 == (vscale.numel() > 0), "scales given iff the values are e4m3");
  TORCH_CHECK(kcode.scalar_type() == at::kInt && vcode.scalar_type() == at::kInt, "codes int32");
  for (auto* x : {&kcode, &kval, &vcode, &vval}) TORCH_CHECK(x->is_cuda() && x->is_contiguous(), "contiguous CUDA");
  TORCH_CHECK(kcode.dim() == 5 && kval.dim() == 6 && kcode.sizes() == vcode.sizes() && kval.sizes() == vval.sizes(),
              "codes [B, Hkv, ntile, NC, 32], values [B, Hkv, ntile, S/4, 32, 4]");
  TORCH_CHECK(nwarps >= 1 && nwarps <= 16, "nwarps in 1..16, got ", nwarps);
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = kcode.size(1), ntile = kcode.size(2);
  const int64_t S = kval.size(3) * 4;
  if (f8) {
    for (auto* x : {&kscale, &vscale})
      TORCH_CHECK(x->is_cuda() && x->is_contiguous() && x->scalar_type() == at::kHalf && x->dim() == 4 &&
                      x->size(0) == q.size(0) && x->size(1) == kcode.size(1) && x->size(2) == kcode.size(2) &&
                      x->size(3) == 32,
                  "scales: contiguous CUDA float16 [B, Hkv, ntile, 32]");
  }
  TORCH_CHECK(kcode.size(0) == B && Hq % Hkv == 0 && kval.size(2) == ntile && kcode.size(3) == (S + 7) / 8,
              "shapes disagree");
  TORCH_CHECK(Tc >= 0 && Tc <= ntile * 32, "Tc=", Tc, " outside the ", ntile * 32, " tokens of the tiles");
  const int64_t G = Hq / Hkv;
  TORCH_CHECK(G >= 1 && G <= 8, "G = H_q / H_kv in 1..8, got ", G);
  auto out = at::empty_like(q);
  const int64_t NPmax = std::max<int64_t>(1, (ntile + nwarps - 1) / nwarps);
  auto ws_o = at::empty({B, Hq, NPmax, D}, q.options().dtype(at::kFloat));
  auto ws_ml = at::empty({B, Hq, NPmax, 2}, q.options().dtype(at::kFloat));
  GapParams p{};
  p.q = q.data_ptr();
  p.kcode = reinterpret_cast<const uint32_t*>(kcode.data_ptr());
  p.vcode = reinterpret_cast<const uint32_t*>(vcode.data_ptr());
  p.kval = kval.data_ptr();
  p.vval = vval.data_ptr();
  p.kscale = f8 ? reinterpret_cast<const __half*>(kscale.data_ptr()) : nullptr;
  p.vscale = f8 ? reinterpret_cast<const __half*>(vscale.data_ptr()) : nullptr;
  p.kv_start = kv_start.numel() ? kv_start.data_ptr<int>() : nullptr;
  p.ws_o = ws_o.data_ptr<float>();
  p.ws_ml = ws_ml.data_ptr<float>();
  p.B = (int)B, p.Hkv = (int)Hkv, p.G = (int)G, p.Tc = (int)Tc, p.ntile = (int)ntile;
  p.qscale = (float)(scale * 1.4426950408889634);
  const int tile = (int)(D * gap_proto::kLine), tb = (int)(32 * S * (f8 ? 1 : 2));
  p.off_pt = tile;
  p.off_st = tile + 512;
  p.wbytes = p.off_st + 4 * tb;
  const c10::cuda::CUDAGuard guard(q.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int gq = G == 1 ? 1 : G <= 4 ? 4 : 8;
  const bool bf = q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf || q.scalar_type() == at::kHalf, "fp16 or bf16");
  bool done = false;
#define GD_CASE(TT, DD, SS, GG, FF)                                                                           \
  if (!done && (std::is_same<TT, __nv_bfloat16>::value == bf) && D == DD && S == SS && gq == GG && f8 == FF) { \
    go<TT, DD, SS, GG, FF>(p, (int)nwarps, nsplit, stream);                                                   \
    done = true;                                                                                              \
  }
  GD_INSTANCES
#undef GD_CASE
  TORCH_CHECK(done, "no gap decode instantiated for D=", D, ", S=", S, ", G=", G, " (slots ", gq, "), ",
              q.scalar_type(), f8 ? " with e4m3 values" : "");
  const int64_t NP = p.nsplit;
  TORCH_CHECK(NP <= NPmax, "splits ", NP, " over the workspace's ", NPmax);
  if (bf) mustafar_cuda::launch_merge<__nv_bfloat16>((int)D, p.ws_o, p.ws_ml, (int)NP,
                                                     reinterpret_cast<__nv_bfloat16*>(out.data_ptr()), B * Hq, stream, true);
  else mustafar_cuda::launch_merge<__half>((int)D, p.ws_o, p.ws_ml, (int)NP, reinterpret_cast<__half*>(out.data_ptr()),
                                           B * Hq, stream, true);
  return {out, NP};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("gap_decode", &gap_decode, "gap-code decode prototype (+ merge)"); }
