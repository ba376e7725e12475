// v7 host side: occupancy (cached per device and kernel), the split over T, the launch and the merge.
#include "decode_v7_launch.cuh"
#include "merge.cuh"

#include <mutex>
#include <unordered_map>

namespace mustafar_cuda {
namespace v7 {

namespace {
struct Occ {
  int per_sm = 0, sms = 0;
};
std::mutex g_mu;
std::unordered_map<uint64_t, Occ> g_occ;  // (device, kernel) -> resident CTAs per SM, SM count

template <int D>
int smem_of() { return Layout<D>::SMEM; }

Occ occupancy(KernelFn fn, int smem, int device) {
  const uint64_t key = (uint64_t)reinterpret_cast<uintptr_t>(fn) * 64u + (uint64_t)device;
  std::lock_guard<std::mutex> lk(g_mu);
  auto it = g_occ.find(key);
  if (it != g_occ.end()) return it->second;
  Occ o;
  C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(fn), cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&o.per_sm, reinterpret_cast<const void*>(fn), kWarps * 32, smem));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&o.sms, cudaDevAttrMultiProcessorCount, device));
  if (o.per_sm < 1) o.per_sm = 1;
  g_occ[key] = o;
  return o;
}
}  // namespace

Launch plan(at::ScalarType dtype, int D, bool K8, bool V8, int KC, int64_t B, int64_t Hkv, int64_t tiles_max,
            int device) {
  Launch L{};
  L.fn = dtype == at::kHalf ? pick<__half>(D, K8, V8, KC) : pick<__nv_bfloat16>(D, K8, V8, KC);
  TORCH_CHECK(L.fn != nullptr, "mustafar v7: no kernel for D=", D, " KC=", KC);
  L.smem = D == 64 ? smem_of<64>() : D == 128 ? smem_of<128>() : smem_of<256>();
  const Occ o = occupancy(L.fn, L.smem, device);
  // about two waves of resident CTAs, at least one tile per warp of every split
  const int64_t target = 2LL * o.per_sm * o.sms;
  int64_t ns = (target + B * Hkv - 1) / (B * Hkv);
  const int64_t most = std::max<int64_t>(1, (tiles_max + kWarps - 1) / kWarps);
  ns = std::max<int64_t>(1, std::min<int64_t>({ns, most, 1024}));
  L.NS = (int)ns;
  L.NP = L.NS * kWarps;
  return L;
}

void launch(const Launch& L, Params p, at::ScalarType dtype, int D, int64_t B, void* out, cudaStream_t stream,
            bool pdl) {
  p.NS = L.NS;
  p.NP = L.NP;
  dim3 grid((unsigned)L.NS, (unsigned)p.Hkv, (unsigned)B);
  L.fn<<<grid, kWarps * 32, L.smem, stream>>>(p);
  MF_CHECK_LAUNCH();
  const int64_t BHq = B * p.Hq;
  if (dtype == at::kHalf) launch_merge<__half>(D, p.ws_o, p.ws_ml, L.NP, reinterpret_cast<__half*>(out), BHq, stream, pdl);
  else launch_merge<__nv_bfloat16>(D, p.ws_o, p.ws_ml, L.NP, reinterpret_cast<__nv_bfloat16*>(out), BHq, stream, pdl);
  MF_CHECK_LAUNCH();
}

}  // namespace v7
}  // namespace mustafar_cuda
