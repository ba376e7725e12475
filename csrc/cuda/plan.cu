// Host side of the fused sparse decode: kernel choice, per-device configuration cache, split over T, launch
// (see plan.h).
#include "plan.h"

#include "merge.cuh"
#include "../mf_check.h"

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

namespace mustafar_cuda {

DecodeKernel parse_decode_kernel(c10::string_view name, const char* op) {
  if (name == "auto") return DecodeKernel::kAuto;
  if (name == "v4") return DecodeKernel::kV4;
  if (name == "v5") return DecodeKernel::kV5;
  if (name == "v6") return DecodeKernel::kV6;
  if (name == "v6g") return DecodeKernel::kV6g;
  if (name == "v6k") return DecodeKernel::kV6k;
  MF_CHECK_VALUE(false, op, "kernel=", name, " is not a decode kernel (expected auto, v4, v5, v6, v6g or v6k)");
  return DecodeKernel::kAuto;
}

const char* decode_kernel_name(DecodeKernel k) {
  switch (k) {
    case DecodeKernel::kV4: return "v4";
    case DecodeKernel::kV5: return "v5";
    case DecodeKernel::kV6: return "v6";
    case DecodeKernel::kV6g: return "v6g";
    case DecodeKernel::kV6k: return "v6k";
    default: return "auto";
  }
}

namespace {

template <typename F>
void dispatch_half_float(at::ScalarType s, F&& f) {
  if (s == at::kHalf) f(__half());
  else if (s == at::kBFloat16) f(__nv_bfloat16());
  else f(float());
}

// ------------------------------------------------------------------------------------- per device
using ConfigKey = std::array<int64_t, 8>;  // kernel, dtype, D, G, k_k, k_v, vec16, f8

struct DeviceState {
  int num_sms = 0;
  std::mutex mu;
  std::map<ConfigKey, DecodeConfig> configs;
};

DeviceState& device_state(int device) {
  static std::mutex mu;
  static std::vector<std::unique_ptr<DeviceState>> states;  // indexed by device
  std::lock_guard<std::mutex> g(mu);
  MF_CHECK(device >= 0, "mustafar (CUDA): bad device index ", device);
  if ((size_t)device >= states.size()) states.resize(device + 1);
  if (!states[device]) {
    auto s = std::make_unique<DeviceState>();
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    s->num_sms = n > 0 ? n : 132;
    states[device] = std::move(s);
  }
  return *states[device];
}

int r16(int64_t x) { return (int)((x + 15) / 16 * 16); }

// how a lane of v6 reads its row of k values (decode_v6.cuh): 32-bit pairs when k/2 is odd (conflict-free),
// 16-byte chunks when k % 8 == 0 and the chunk count is odd (contiguous) or a power of two (swizzled),
// 16-bit values otherwise
int v6_ld_mode(int64_t k, int& lg) {
  lg = -1;
  if (k >= 8 && k % 8 == 0) {
    const int64_t kc = k / 8;
    if (kc % 2 == 1) return (int)kRLdOct;
    if ((kc & (kc - 1)) == 0) {
      lg = 0;
      while ((1 << lg) < kc) ++lg;
      return (int)kRLdOct;
    }
  }
  if (k % 4 == 2) return (int)kRLdPair;
  return (int)kRLdAny;
}

// the configuration of `kernel` (resolved) for `pr` on the current device (occupancy queries)
DecodeConfig make_config(const DecodeProblem& pr, DecodeKernel kernel, const char* op) {
  const int64_t D = pr.D, G = pr.G, kk = pr.kk, kv = pr.kv, W = D / 64;
  const int64_t isz = pr.dtype == at::kFloat ? 4 : 2;
  DecodeConfig c{};
  c.kernel = kernel;
  const bool v6 = is_v6(kernel);
  c.GT = v6 ? (int)G : (G % 4 == 0) ? 4 : (G % 2 == 0) ? 2 : 1;  // v6: every query head of a KV head in one CTA
  c.VM = kVmAny;
  c.nwarps = kWarps;
  c.per_sm = 1;
  c.f8 = v6 && pr.f8;
  c.kt = kernel == DecodeKernel::kV6k;
  const bool v5 = kernel == DecodeKernel::kV5;
  if (v5) {
    if (kk >= 8 && kv >= 8 && kk % 8 == 0 && kv % 8 == 0 && pr.vec16) c.VM = kVmOct;
    else if (kk % 2 == 0 && kv % 2 == 0) c.VM = kVmPair;
  }
  if (v6) {
    V6Layout& p = c.v6;
    p.r_ldk = v6_ld_mode(kk, p.r_lgk);
    p.r_ldv = v6_ld_mode(kv, p.r_lgv);
    p.off_vd = r16((D + 4) * 4 * v6_slots((int)G));  // q (fp32, 1 / 4 / 8 slots per channel, zeros at D), then the warps
    p.r_off_stk = r16((D + 1) * kRLine) + (G > 1 ? 8 * kRRows * 2 : 0);  // dense V tile (+ the P table for G > 1)
    const int esz = c.f8 ? 1 : 2, slack = c.f8 ? 16 : 0;  // bytes per staged value; the e4m3 expansion's last
                                                         // 32-bit word reads up to 3 bytes past the rows
    p.r_off_stv = p.r_off_stk + r16(kRRows * kk * esz + slack);
    p.r_bufstep = p.r_off_stv + r16(kRRows * kv * esz + slack) - p.r_off_stk;  // K + V stage buffers of one tile
    p.r_wbytes = p.r_off_stk + 2 * p.r_bufstep;  // two stage buffers per warp
    p.r_off_xk = p.r_off_xv = 0;
    if (c.f8) {  // one fp16 buffer per side for the expanded tile (+ 16: the expansion's last word)
      p.r_off_xk = p.r_wbytes;
      p.r_off_xv = p.r_off_xk + r16(kRRows * kk * 2 + 16);
      p.r_wbytes = p.r_off_xv + r16(kRRows * kv * 2 + 16);
    }
    // warps per CTA: the most resident warps per SM (shared memory bounds it), fewer warps on a tie
    int best = -1;
    for (int nw = kRMaxWarps; nw >= 4; --nw) {
      const int sb = p.off_vd + nw * p.r_wbytes;
      if (sb > 227 * 1024) continue;
      int n = 0;
      dispatch_half_float(pr.dtype, [&](auto tag) {
        using scalar = decltype(tag);
        if constexpr (!std::is_same<scalar, float>::value) n = v6_blocks_per_sm<scalar>((int)D, (int)G, c.f8, c.kt, nw, sb);
      });
      if (n * nw > best) {
        best = n * nw;
        c.nwarps = nw;
        c.per_sm = std::max(1, n);
        c.smem_bytes = sb;
      }
    }
    MF_CHECK(best > 0, op, "no resident CTA for the v6 kernel (k_k=", kk, ", k_v=", kv, ")");
  } else if (v5) {
    V5Layout& p = c.v5;
    auto oct_stride = [](int64_t k) { const int64_t n = k / 8; return (int)(16 * ((n % 2 == 1) ? n : n + 1)); };
    p.kstride = c.VM == kVmOct ? oct_stride(kk) : (int)(kk * isz);
    p.vstride = c.VM == kVmOct ? oct_stride(kv) : (int)(kv * isz);
    p.off_kval = 0;
    p.off_vval = r16((int64_t)kTile * p.kstride);
    p.off_kbm = p.off_vval + r16((int64_t)kTile * p.vstride);
    p.off_vbm = p.off_kbm + (int)(kTile * W * 8);
    p.stage_bytes = p.off_vbm + (int)(kTile * W * 8);
    p.off_vd = kStages * p.stage_bytes;
    p.off_s = p.off_vd + (int)((D + 1) * kLS);
    p.off_q = p.off_s + r16((int64_t)c.GT * kTile * 4);
    const int qsz = (pr.dtype == at::kHalf && c.VM != kVmAny) ? 2 : 4;
    p.off_scr = p.off_q + r16((D + 1) * c.GT * qsz);
    c.smem_bytes = p.off_scr + (int)(D / 32 + 1) * kScrStride;
  } else {
    V4Layout& p = c.v4;
    p.off_kval = 0;
    p.off_vval = r16(kTile * kk * isz + 16);
    p.off_kbm = p.off_vval + r16(kTile * kv * isz + 16);
    p.off_vbm = p.off_kbm + (int)(kTile * W * 8);
    p.stage_bytes = p.off_vbm + (int)(kTile * W * 8);
    p.off_tab = kStages * p.stage_bytes;
    c.smem_bytes = p.off_tab + 2 * kTile * (int)(D / 32) * 8;
  }
  MF_CHECK(c.smem_bytes <= 227 * 1024, op, "shared memory per block ", c.smem_bytes,
           " B over the 227 KiB limit (k_k=", kk, ", k_v=", kv, ")");
  if (!v6) {
    dispatch_half_float(pr.dtype, [&](auto tag) {
      using scalar = decltype(tag);
      if constexpr (std::is_same<scalar, float>::value) {
        c.per_sm = v4_blocks_per_sm<scalar>((int)D, c.GT, c.smem_bytes);
      } else {
        c.per_sm = v5 ? v5_blocks_per_sm<scalar>((int)D, c.GT, c.VM, c.smem_bytes)
                      : v4_blocks_per_sm<scalar>((int)D, c.GT, c.smem_bytes);
      }
    });
  }
  return c;
}

}  // namespace

DecodeKernel resolve_decode_kernel(const DecodeProblem& pr, DecodeKernel req, const char* op) {
  const bool half_type = pr.dtype != at::kFloat;
  const bool v6_ok = v6_serves(pr.dtype, pr.G, pr.D, pr.kk, pr.kv);
  switch (req) {
    case DecodeKernel::kAuto: {
      // sparse_decode.cu sends device lengths and e4m3 values here only where v6 serves them
      const DecodeKernel v6_pick = !pr.f8 && v6_slots((int)pr.G) == 8 ? DecodeKernel::kV6k : DecodeKernel::kV6;
      if (pr.lengths || pr.f8) return v6_pick;
      if (half_type && pr.D == 64 && pr.G == 1 && std::max(pr.kk, pr.kv) <= kV5MaxKD64) return DecodeKernel::kV5;
      if (v6_ok) return v6_pick;
      return (half_type && pr.G >= 2) ? DecodeKernel::kV5 : DecodeKernel::kV4;
    }
    case DecodeKernel::kV4:
      return req;
    default:
      MF_CHECK_VALUE(half_type, op, "kernel=", decode_kernel_name(req), " cannot serve q.dtype=", pr.dtype,
                     " (v5 and the v6 family are float16 / bfloat16 kernels; v4 and auto serve float32)");
      if (req != DecodeKernel::kV5) {
        MF_CHECK_VALUE(v6_ok, op, "kernel=", decode_kernel_name(req), " needs at most 8 query heads per KV head (G=",
                       pr.G, ") and at most ", kRKMax, " stored values per row (k_k=", pr.kk, ", k_v=", pr.kv, ")");
      }
      return req;
  }
}

int device_sm_count(int device) { return device_state(device).num_sms; }

DecodePlan plan_decode(const DecodeProblem& pr, DecodeKernel requested, int device, const char* op) {
  MF_CHECK(pr.B > 0 && pr.Hkv > 0 && pr.G > 0 && pr.Tc + pr.Tw > 0, op, "nothing to plan (B=", pr.B, ", H_kv=",
           pr.Hkv, ", G=", pr.G, ", T=", pr.Tc + pr.Tw, ")");
  const DecodeKernel kernel = resolve_decode_kernel(pr, requested, op);
  DeviceState& ds = device_state(device);
  DecodePlan plan{};
  {
    const ConfigKey key{(int64_t)kernel, (int64_t)pr.dtype, pr.D, pr.G, pr.kk, pr.kv, pr.vec16 ? 1 : 0, pr.f8 ? 1 : 0};
    std::unique_lock<std::mutex> g(ds.mu);
    auto it = ds.configs.find(key);
    if (it != ds.configs.end()) {
      plan.cfg = it->second;
    } else {
      g.unlock();  // occupancy queries outside the lock (a concurrent first call computes the same)
      plan.cfg = make_config(pr, kernel, op);
      g.lock();
      ds.configs.emplace(key, plan.cfg);
    }
  }
  const DecodeConfig& c = plan.cfg;
  const bool v6 = is_v6(kernel);
  plan.nchunk = (int)(pr.G / c.GT);
  const int64_t nbh = pr.B * pr.Hkv * plan.nchunk;
  int64_t ntiles;
  if (v6) {
    // splitting units of nwarps warp tiles of 32 rows
    const int64_t nwt = (pr.Tc + kRRows - 1) / kRRows + (pr.Tw + kRRows - 1) / kRRows;
    ntiles = (nwt + c.nwarps - 1) / c.nwarps;
  } else if (kernel == DecodeKernel::kV5) {
    ntiles = (pr.Tc + kTile - 1) / kTile + (pr.Tw + kTile - 1) / kTile;
  } else {
    ntiles = (pr.Tc + pr.Tw + kTile - 1) / kTile;
  }
  // splits: whole waves of resident CTAs (flash-decoding; batch 1 fills the GPU), >= 2 tiles per split
  const int64_t cap = (int64_t)c.per_sm * ds.num_sms;
  int64_t nsplit = 1;
  {
    const int64_t max_split = std::max<int64_t>(1, std::min<int64_t>(ntiles / 2, 512));
    double best = -1.0;
    for (int64_t n = 1; n <= max_split; ++n) {
      const int64_t tps_n = (ntiles + n - 1) / n;
      const int64_t ne = (ntiles + tps_n - 1) / tps_n;
      const int64_t total = nbh * ne;
      const int64_t waves = (total + cap - 1) / cap;
      // fraction of CTA slots busy over the whole run, counting each CTA's tiles
      const double eff = (double)(nbh * ntiles) / (double)(waves * cap * tps_n);
      if (eff > best + 0.03) {
        best = eff;
        nsplit = ne;
      }
    }
  }
  const int64_t tps = (ntiles + nsplit - 1) / nsplit;
  nsplit = (ntiles + tps - 1) / tps;
  MF_CHECK(nsplit < 65536 && pr.Hkv * plan.nchunk < 65536 && pr.B < 65536, op, "grid too large");
  plan.nsplit = nsplit;
  plan.tiles_per_split = v6 ? tps * c.nwarps : tps;  // v6: in warp tiles of 32 rows
  plan.NP = v6 ? (int)nsplit : (int)nsplit * c.nwarps;  // v6 combines its warps' partials in the CTA
  plan.grid = dim3((unsigned)nsplit, (unsigned)(pr.Hkv * plan.nchunk), (unsigned)pr.B);
  return plan;
}

void launch_decode(const DecodePlan& plan, const SDParams& base, at::ScalarType dtype, int64_t D, void* out,
                   int64_t BHq, cudaStream_t stream, bool pdl) {
  const DecodeConfig& c = plan.cfg;
  SDParams sp = base;
  sp.nsplit = (int)plan.nsplit;
  sp.tiles_per_split = (int)plan.tiles_per_split;
  sp.nchunk = plan.nchunk;
  const bool v6 = is_v6(c.kernel);
  dispatch_half_float(dtype, [&](auto tag) {
    using scalar = decltype(tag);
    if constexpr (std::is_same<scalar, float>::value) {
      V4Params p{sp, c.v4};
      launch_v4<scalar>(p, (int)D, c.GT, c.smem_bytes, plan.grid, stream);
    } else {
      if (v6) {
        V6Params p{sp, c.v6};
        launch_v6<scalar>(p, (int)D, c.nwarps, c.smem_bytes, plan.grid, stream, c.kernel != DecodeKernel::kV6g, c.f8,
                          c.kt);
      } else if (c.kernel == DecodeKernel::kV5) {
        V5Params p{sp, c.v5};
        launch_v5<scalar>(p, (int)D, c.GT, c.VM, c.smem_bytes, plan.grid, stream);
      } else {
        V4Params p{sp, c.v4};
        launch_v4<scalar>(p, (int)D, c.GT, c.smem_bytes, plan.grid, stream);
      }
    }
    launch_merge<scalar>((int)D, sp.ws_o, sp.ws_ml, plan.NP, reinterpret_cast<scalar*>(out), BHq, stream, pdl);
  });
}

}  // namespace mustafar_cuda
