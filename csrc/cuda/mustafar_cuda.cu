// CUDA ops of `mustafar`: host wrappers, encode/decode kernels and the CUDA registration.
// The fused decode kernel is in mustafar_cuda.cuh, instantiated per dtype in sparse_decode_*.cu.
#include "mustafar_cuda.cuh"
#include "sd_scatter.cuh"
#include "sd_rows.cuh"
#include "../mf_check.h"

#include <array>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

#include <torch/library.h>

namespace mustafar_cuda {

// ------------------------------------------------------------------------------------------------
// prune_encode_topk / encode_bitmap: one warp per token vector, lane owns channels e*32 + lane
// ------------------------------------------------------------------------------------------------
template <typename T, int D, bool TOPK>
__global__ void __launch_bounds__(256) encode_kernel(const T* __restrict__ x, const bool* __restrict__ mask,
                                                     int64_t rows, int k, int64_t* __restrict__ bitmap,
                                                     T* __restrict__ values, int* __restrict__ err) {
  constexpr int NE = D / 32;
  constexpr int W = D / 64;
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  const T* xr = x + row * D;
  T xv[NE];
  bool keep[NE];
#pragma unroll
  for (int e = 0; e < NE; ++e) xv[e] = xr[e * 32 + lane];
  if (TOPK) {
    // key = |x| bits (NaN canonical = largest) << 8 | channel: unique; keep the k largest keys,
    // so of equal magnitudes the higher channel is kept (lower channel pruned first).
    uint64_t key[NE];
#pragma unroll
    for (int e = 0; e < NE; ++e) {
      float f = to_f(xv[e]);
      uint32_t mb = isnan(f) ? 0x7fc00000u : (__float_as_uint(f) & 0x7fffffffu);
      key[e] = ((uint64_t)mb << 8) | (uint64_t)(e * 32 + lane);
    }
    uint64_t thr = 0;
    if (k <= 0) {
      thr = ~0ull;  // keep nothing
    } else if (k < D) {
      // largest thr with count(key >= thr) >= k == the k-th largest key
#pragma unroll 1
      for (int bit = 39; bit >= 0; --bit) {
        const uint64_t cand = thr | (1ull << bit);
        int cnt = 0;
#pragma unroll
        for (int e = 0; e < NE; ++e) cnt += __popc(__ballot_sync(0xffffffffu, key[e] >= cand));
        if (cnt >= k) thr = cand;
      }
    }
#pragma unroll
    for (int e = 0; e < NE; ++e) keep[e] = key[e] >= thr;
  } else {
    const bool* mr = mask + row * D;
#pragma unroll
    for (int e = 0; e < NE; ++e) keep[e] = mr[e * 32 + lane];
  }
  uint32_t bal[NE];
  int total = 0;
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    bal[e] = __ballot_sync(0xffffffffu, keep[e]);
    total += __popc(bal[e]);
  }
  if (!TOPK && total > k) {
    if (lane == 0) atomicExch(err, 1);
    return;
  }
  if (lane < W) {
    uint64_t word = 0;
#pragma unroll
    for (int w = 0; w < W; ++w)
      if (w == lane) word = (uint64_t)bal[2 * w] | ((uint64_t)bal[2 * w + 1] << 32);
    bitmap[row * W + lane] = (int64_t)word;
  }
  T* vr = values + row * (int64_t)k;
  const uint32_t lt = (1u << lane) - 1u;
  int base = 0;
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    if (keep[e]) vr[base + __popc(bal[e] & lt)] = xv[e];
    base += __popc(bal[e]);
  }
  for (int i = total + lane; i < k; i += 32) vr[i] = from_f<T>(0.f);
}

template <typename T, int D>
__global__ void __launch_bounds__(256) decode_kernel(const int64_t* __restrict__ bitmap, const T* __restrict__ values,
                                                     int64_t rows, int k, T* __restrict__ out) {
  constexpr int NE = D / 32;
  constexpr int W = D / 64;
  const int lane = threadIdx.x & 31;
  const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;
  uint32_t words[2 * W];
#pragma unroll
  for (int w = 0; w < W; ++w) {
    const uint64_t b = (uint64_t)bitmap[row * W + w];
    words[2 * w] = (uint32_t)b;
    words[2 * w + 1] = (uint32_t)(b >> 32);
  }
  const T* vr = values + row * (int64_t)k;
  const uint32_t lt = (1u << lane) - 1u;
  int base = 0;
#pragma unroll
  for (int e = 0; e < NE; ++e) {
    const bool bit = (words[e] >> lane) & 1u;
    const int pos = base + __popc(words[e] & lt);
    T v = from_f<T>(0.f);
    if (bit && pos < k) v = vr[pos];
    out[row * D + e * 32 + lane] = v;
    base += __popc(words[e]);
  }
}

// ------------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------------
static void check_cuda_tensor(const at::Tensor& t, const char* name) {
  MF_CHECK(t.defined(), "mustafar (CUDA): ", name, " is undefined");
  MF_CHECK(t.is_cuda(), "mustafar (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
}

static void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  MF_CHECK_VALUE(s == at::kHalf || s == at::kBFloat16 || s == at::kFloat, "mustafar (CUDA): ", name,
                    ".dtype=", s, " (expected float16, bfloat16 or float32)");
}

static int64_t head_dim_words(int64_t D, const char* op) {
  MF_CHECK_VALUE(D == 64 || D == 128 || D == 256, op, "head_dim D=", D, " must be 64, 128 or 256");
  return D / 64;
}

template <typename F>
static void dispatch_float(at::ScalarType s, F&& f) {
  if (s == at::kHalf) {
    f(__half());
  } else if (s == at::kBFloat16) {
    f(__nv_bfloat16());
  } else {
    f(float());
  }
}

template <typename F>
static void dispatch_d(int64_t D, F&& f) {
  if (D == 64) {
    f(std::integral_constant<int, 64>());
  } else if (D == 128) {
    f(std::integral_constant<int, 128>());
  } else {
    f(std::integral_constant<int, 256>());
  }
}

static std::tuple<at::Tensor, at::Tensor> encode_impl(const at::Tensor& x_in, const at::Tensor* mask_in, int64_t k,
                                                      const char* op) {
  check_cuda_tensor(x_in, "x");
  check_float_dtype(x_in, "x");
  MF_CHECK_VALUE(x_in.dim() >= 1, op, "x must have a last dim");
  const int64_t D = x_in.size(-1);
  const int64_t W = head_dim_words(D, op);
  MF_CHECK_VALUE(k >= 0 && k <= D, op, "k=", k, " out of range [0, ", D, "]");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.contiguous();
  at::Tensor mask;
  if (mask_in) {
    check_cuda_tensor(*mask_in, "mask");
    MF_CHECK_VALUE(mask_in->sizes() == x_in.sizes(), op, "mask shape ", mask_in->sizes(), " != x shape ",
                      x_in.sizes());
    mask = mask_in->to(at::kBool).contiguous();
  }
  const int64_t rows = x.numel() / D;
  auto bshape = x.sizes().vec();
  bshape.back() = W;
  auto vshape = x.sizes().vec();
  vshape.back() = k;
  const bool poison = poison_outputs();
  at::Tensor bitmap = poison ? at::full(bshape, -1, x.options().dtype(at::kLong))
                             : at::empty(bshape, x.options().dtype(at::kLong));
  at::Tensor values = poison ? at::full(vshape, std::numeric_limits<float>::quiet_NaN(), x.options())
                             : at::empty(vshape, x.options());
  if (rows == 0) return {bitmap, values};
  at::Tensor err;
  if (mask_in) err = at::zeros({1}, x.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int threads = 256;
  const int64_t blocks = (rows + 7) / 8;
  MF_CHECK(blocks < (1LL << 31), op, "too many rows: ", rows);
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_d(D, [&](auto dc) {
      constexpr int DD = decltype(dc)::value;
      const T* xp = reinterpret_cast<const T*>(x.data_ptr());
      T* vp = reinterpret_cast<T*>(values.data_ptr());
      if (mask_in) {
        encode_kernel<T, DD, false><<<(unsigned)blocks, threads, 0, stream>>>(
            xp, mask.data_ptr<bool>(), rows, (int)k, bitmap.data_ptr<int64_t>(), vp, err.data_ptr<int>());
      } else {
        encode_kernel<T, DD, true><<<(unsigned)blocks, threads, 0, stream>>>(
            xp, nullptr, rows, (int)k, bitmap.data_ptr<int64_t>(), vp, nullptr);
      }
      MF_CHECK_LAUNCH();
    });
  });
  if (mask_in) {
    MF_CHECK(err.item<int>() == 0, op, "mask keeps more than k=", k, " entries in some row");
  }
  return {bitmap, values};
}

std::tuple<at::Tensor, at::Tensor> encode_bitmap_cuda(const at::Tensor& x, const at::Tensor& mask, int64_t k) {
  return encode_impl(x, &mask, k, "mustafar.encode_bitmap (CUDA): ");
}

std::tuple<at::Tensor, at::Tensor> prune_encode_topk_cuda(const at::Tensor& x, int64_t k) {
  return encode_impl(x, nullptr, k, "mustafar.prune_encode_topk (CUDA): ");
}

at::Tensor decode_bitmap_cuda(const at::Tensor& bitmap_in, const at::Tensor& values_in, int64_t head_dim) {
  const char* op = "mustafar.decode_bitmap (CUDA): ";
  check_cuda_tensor(bitmap_in, "bitmap");
  check_cuda_tensor(values_in, "values");
  check_float_dtype(values_in, "values");
  MF_CHECK_VALUE(bitmap_in.scalar_type() == at::kLong, op, "bitmap.dtype=", bitmap_in.scalar_type(),
                    " (expected int64)");
  const int64_t D = head_dim;
  const int64_t W = head_dim_words(D, op);
  MF_CHECK_VALUE(bitmap_in.dim() >= 1 && bitmap_in.size(-1) == W, op, "bitmap last dim ",
                    bitmap_in.dim() ? bitmap_in.size(-1) : -1, " != head_dim/64 = ", W);
  MF_CHECK_VALUE(values_in.dim() == bitmap_in.dim() &&
                        values_in.sizes().slice(0, values_in.dim() - 1) ==
                            bitmap_in.sizes().slice(0, bitmap_in.dim() - 1),
                    op, "values shape ", values_in.sizes(), " does not match bitmap shape ", bitmap_in.sizes());
  const int64_t k = values_in.size(-1);
  MF_CHECK_VALUE(k <= D, op, "values last dim k=", k, " > head_dim=", D);
  c10::cuda::CUDAGuard guard(values_in.device());
  auto bm = bitmap_in.contiguous();
  auto vals = values_in.contiguous();
  auto oshape = bm.sizes().vec();
  oshape.back() = D;
  at::Tensor out = poison_outputs() ? at::full(oshape, std::numeric_limits<float>::quiet_NaN(), vals.options())
                                    : at::empty(oshape, vals.options());
  const int64_t rows = bm.numel() / W;
  if (rows == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (rows + 7) / 8;
  dispatch_float(vals.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    dispatch_d(D, [&](auto dc) {
      constexpr int DD = decltype(dc)::value;
      decode_kernel<T, DD><<<(unsigned)blocks, 256, 0, stream>>>(
          bm.data_ptr<int64_t>(), reinterpret_cast<const T*>(vals.data_ptr()), rows, (int)k,
          reinterpret_cast<T*>(out.data_ptr()));
      MF_CHECK_LAUNCH();
    });
  });
  return out;
}

// rows must have a contiguous last dim and T stride == C; leading dims may be strided
static at::Tensor rows_ok(const at::Tensor& t) {
  const int64_t C = t.size(3);
  const bool ok = (t.stride(3) == 1 || t.size(3) <= 1) && (t.stride(2) == C || t.size(2) <= 1);
  return ok ? t : t.contiguous();
}

static int g_num_sms = 0;

// Resident CTAs per SM of one decode kernel configuration (kernel family, dtype, D, warps or query heads per
// CTA, value mode, shared memory bytes) on the current device. The occupancy query costs microseconds and
// the v6 choice of warps per CTA asks for up to nine of them per call; the answer never changes, so it is
// cached.
template <typename F>
static int occupancy_cached(std::array<int64_t, 6> key, F&& query) {
  static std::mutex mu;
  static std::map<std::pair<int, std::array<int64_t, 6>>, int> cache;
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const auto k = std::make_pair(dev, key);
  {
    std::lock_guard<std::mutex> g(mu);
    const auto it = cache.find(k);
    if (it != cache.end()) return it->second;
  }
  const int n = query();
  std::lock_guard<std::mutex> g(mu);
  cache[k] = n;
  return n;
}

at::Tensor sparse_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_bitmap_in, const at::Tensor& k_values_in,
                              const at::Tensor& v_bitmap_in, const at::Tensor& v_values_in,
                              const at::Tensor& k_window_in, const at::Tensor& v_window_in,
                              const std::optional<at::Tensor>& kv_start_in, double scale) {
  const char* op = "mustafar.sparse_decode (CUDA): ";
  check_cuda_tensor(q_in, "q");
  check_cuda_tensor(k_bitmap_in, "k_bitmap");
  check_cuda_tensor(k_values_in, "k_values");
  check_cuda_tensor(v_bitmap_in, "v_bitmap");
  check_cuda_tensor(v_values_in, "v_values");
  check_cuda_tensor(k_window_in, "k_window");
  check_cuda_tensor(v_window_in, "v_window");
  check_float_dtype(q_in, "q");
  MF_CHECK_VALUE(q_in.dim() == 3, op, "q must be [B, H_q, D], got ", q_in.sizes());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t W = head_dim_words(D, op);
  MF_CHECK_VALUE(D == 64 || D == 128, op, "head_dim D=", D, " not supported by the CUDA decode kernel (64, 128)");
  MF_CHECK_VALUE(k_bitmap_in.dim() == 4 && v_bitmap_in.dim() == 4, op, "bitmaps must be [B, H_kv, T_c, W]");
  MF_CHECK_VALUE(k_bitmap_in.scalar_type() == at::kLong && v_bitmap_in.scalar_type() == at::kLong, op,
                    "bitmaps must be int64");
  const int64_t Hkv = k_bitmap_in.size(1), Tc = k_bitmap_in.size(2);
  MF_CHECK_VALUE(k_bitmap_in.size(0) == B && k_bitmap_in.size(3) == W, op, "k_bitmap shape ",
                    k_bitmap_in.sizes(), " does not match q ", q_in.sizes());
  MF_CHECK_VALUE(v_bitmap_in.sizes() == k_bitmap_in.sizes(), op, "v_bitmap shape ", v_bitmap_in.sizes(),
                    " != k_bitmap shape ", k_bitmap_in.sizes());
  MF_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, op, "H_q=", Hq, " is not a multiple of H_kv=", Hkv);
  const int64_t G = Hq / Hkv;
  for (const at::Tensor* t : {&k_values_in, &v_values_in, &k_window_in, &v_window_in}) {
    MF_CHECK_VALUE(t->scalar_type() == q_in.scalar_type(), op, "K/V dtype ", t->scalar_type(), " != q.dtype ",
                      q_in.scalar_type());
    MF_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) == Hkv, op, "K/V tensor shape ", t->sizes(),
                      " must be [", B, ", ", Hkv, ", T, C]");
  }
  MF_CHECK_VALUE(k_values_in.size(2) == Tc && v_values_in.size(2) == Tc, op,
                    "values T dim must equal the bitmaps' T_c=", Tc);
  const int64_t kk = k_values_in.size(3), kv = v_values_in.size(3);
  MF_CHECK_VALUE(kk <= D && kv <= D, op, "values last dim (", kk, ", ", kv, ") > D=", D);
  MF_CHECK_VALUE(k_window_in.size(3) == D && v_window_in.sizes() == k_window_in.sizes(), op,
                    "windows must both be [B, H_kv, T_w, D], got ", k_window_in.sizes(), " / ", v_window_in.sizes());
  const int64_t Tw = k_window_in.size(2);
  const int64_t T = Tc + Tw;
  MF_CHECK_VALUE(T < (1LL << 30), op, "sequence too long: ", T);
  c10::cuda::CUDAGuard guard(q_in.device());

  at::Tensor ks;
  if (kv_start_in.has_value() && kv_start_in->defined()) {
    check_cuda_tensor(*kv_start_in, "kv_start");
    MF_CHECK_VALUE(kv_start_in->dim() == 1 && kv_start_in->size(0) == B, op, "kv_start shape ",
                      kv_start_in->sizes(), " != [", B, "]");
    MF_CHECK_VALUE(kv_start_in->scalar_type() == at::kInt || kv_start_in->scalar_type() == at::kLong, op,
                      "kv_start.dtype=", kv_start_in->scalar_type(), " (expected int32)");
    ks = kv_start_in->to(at::kInt).contiguous();
  }
  auto q = q_in.contiguous();
  auto kb = rows_ok(k_bitmap_in), vb = rows_ok(v_bitmap_in);
  auto kvals = rows_ok(k_values_in), vvals = rows_ok(v_values_in);
  // windows: unit channel stride and (for 16-bit types) rows 4-byte aligned, else a contiguous copy
  auto win_ok = [&](const at::Tensor& t) {
    if (t.stride(3) != 1 && t.size(3) > 1) return false;
    if (t.element_size() >= 4 || t.numel() == 0) return true;
    bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 4 == 0;
    for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 2 == 0);
    return ok;
  };
  auto kw = win_ok(k_window_in) ? k_window_in : k_window_in.contiguous();
  auto vw = win_ok(v_window_in) ? v_window_in : v_window_in.contiguous();

  const bool poison = poison_outputs();
  at::Tensor out = poison ? at::full({B, Hq, D}, std::numeric_limits<float>::quiet_NaN(), q.options())
                          : at::empty({B, Hq, D}, q.options());
  if (B == 0 || Hq == 0) return out;
  if (T == 0) {
    out.zero_();
    return out;
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (g_num_sms == 0) {
    int dev = 0, n = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    g_num_sms = n > 0 ? n : 132;
  }

  const int GT = (G % 4 == 0) ? 4 : (G % 2 == 0) ? 2 : 1;
  const int nchunk = (int)(G / GT);
  const int64_t nbh = B * Hkv * nchunk;
  const int64_t isz = q.element_size();
  auto r16 = [](int64_t x) { return (int)((x + 15) / 16 * 16); };
  auto al16 = [&](const at::Tensor& t) {
    return (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) && ((t.stride(0) * isz) % 16 == 0 || t.size(0) <= 1) &&
           ((t.stride(1) * isz) % 16 == 0 || t.size(1) <= 1);
  };
  const int vec16 = (kvals.numel() == 0 || al16(kvals)) && (vvals.numel() == 0 || al16(vvals)) ? 1 : 0;

  // Kernel choice (MUSTAFAR_CUDA_DECODE): "auto" (default) takes v6 (sd_rows.cuh) for fp16/bf16 with one
  // or four query heads per KV head (MHA, or GQA with G = 4 as in Llama-3-8B) and at most 64 stored values
  // per row, v5 (sd_scatter.cuh) for other fp16/bf16 GQA, and v4 (mustafar_cuda.cuh) otherwise (fp32, or
  // k > 64); results/kernel_h200.json times all of them side by side. "v4" / "v5" / "v6" force one
  // (v5 and v6 have no fp32 path: fp32 always runs v4; v6 refuses configurations it does not cover).
  // v6 has instantiations with k compiled in for k_k = k_v = 38 and 64 at D = 128 (70 % and 50 %);
  // "v6g" forces v6's run-time-k instantiation everywhere (to test and time one against the other).
  const char* sel_env = std::getenv("MUSTAFAR_CUDA_DECODE");
  const std::string sel = (sel_env && sel_env[0]) ? std::string(sel_env) : std::string("auto");
  MF_CHECK_VALUE(sel == "auto" || sel == "v4" || sel == "v5" || sel == "v6" || sel == "v6g", op,
                 "MUSTAFAR_CUDA_DECODE=", sel, " (expected auto, v4, v5, v6 or v6g)");
  const bool half_type = q.scalar_type() != at::kFloat;
  const bool v6_ok = half_type && (G == 1 || G == 4) && kk <= kRKMax && kv <= kRKMax;
  if ((sel == "v6" || sel == "v6g") && half_type) {
    MF_CHECK_VALUE(v6_ok, op, "MUSTAFAR_CUDA_DECODE=", sel, " needs 1 or 4 query heads per KV head (G=", G,
                   ") and at most ", kRKMax, " stored values per row (k_k=", kk, ", k_v=", kv, ")");
  }
  const bool v6 = v6_ok && (sel == "v6" || sel == "v6g" || sel == "auto");
  const bool v6_fixed_k = sel != "v6g";
  const bool v5 = !v6 && half_type && (sel == "v5" || (sel == "auto" && G >= 2));
  int VM = kVmAny;
  if (v5) {
    if (kk >= 8 && kv >= 8 && kk % 8 == 0 && kv % 8 == 0 && vec16) VM = kVmOct;
    else if (kk % 2 == 0 && kv % 2 == 0) VM = kVmPair;
  }

  SDParams p{};
  int smem_bytes = 0;
  int64_t ntiles = 0;
  int nwarps = kWarps;  // warps per CTA
  int per_sm = 1;
  if (v6) {
    // how a lane reads its row of k values (sd_rows.cuh): 32-bit pairs when k/2 is odd (conflict-free),
    // 16-byte chunks when k % 8 == 0 and the chunk count is odd (contiguous) or a power of two
    // (swizzled), 16-bit values otherwise
    auto ld_mode = [&](int64_t k, int& lg) {
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
    };
    p.r_ldk = ld_mode(kk, p.r_lgk);
    p.r_ldv = ld_mode(kv, p.r_lgv);
    p.off_vd = (int)r16((D + 4) * 4 * G);  // q (fp32, G heads per channel, zeros at D), then one region per warp
    p.r_off_stk = r16((D + 1) * kRLine) + (G > 1 ? 8 * kRRows * 2 : 0);  // dense V tile (+ the P table for G > 1)
    p.r_off_stv = p.r_off_stk + r16(kRRows * kk * 2);
    p.r_bufstep = p.r_off_stv + r16(kRRows * kv * 2) - p.r_off_stk;  // K + V stage buffers of one tile
    p.r_wbytes = p.r_off_stk + 2 * p.r_bufstep;  // two stage buffers per warp
    // warps per CTA: the most resident warps per SM (shared memory bounds it), fewer warps on a tie
    int best = -1;
    for (int nw = kRMaxWarps; nw >= 4; --nw) {
      const int sb = p.off_vd + nw * p.r_wbytes;
      if (sb > 227 * 1024) continue;
      const int n = occupancy_cached({6, (int64_t)q.scalar_type(), D, nw, 0, sb}, [&] {
        int r = 0;
        dispatch_float(q.scalar_type(), [&](auto tag) {
          using scalar = decltype(tag);
          if constexpr (!std::is_same<scalar, float>::value) r = sd_rows_blocks_per_sm<scalar>((int)D, nw, sb);
        });
        return r;
      });
      if (n * nw > best) {
        best = n * nw;
        nwarps = nw;
        per_sm = std::max(1, n);
        smem_bytes = sb;
      }
    }
    MF_CHECK(best > 0, op, "no resident CTA for the v6 kernel (k_k=", kk, ", k_v=", kv, ")");
    // splitting units of nwarps warp tiles of 32 rows
    const int64_t nwt = (Tc + kRRows - 1) / kRRows + (Tw + kRRows - 1) / kRRows;
    ntiles = (nwt + nwarps - 1) / nwarps;
  } else if (v5) {
    auto oct_stride = [](int64_t k) { const int64_t c = k / 8; return (int)(16 * ((c % 2 == 1) ? c : c + 1)); };
    p.kstride = VM == kVmOct ? oct_stride(kk) : (int)(kk * isz);
    p.vstride = VM == kVmOct ? oct_stride(kv) : (int)(kv * isz);
    p.off_kval = 0;
    p.off_vval = r16((int64_t)kTile * p.kstride);
    p.off_kbm = p.off_vval + r16((int64_t)kTile * p.vstride);
    p.off_vbm = p.off_kbm + (int)(kTile * W * 8);
    p.stage_bytes = p.off_vbm + (int)(kTile * W * 8);
    p.off_vd = kStages * p.stage_bytes;
    p.off_s = p.off_vd + (int)((D + 1) * kLS);
    p.off_q = p.off_s + r16((int64_t)GT * kTile * 4);
    const int qsz = (q.scalar_type() == at::kHalf && VM != kVmAny) ? 2 : 4;
    p.off_scr = p.off_q + r16((D + 1) * GT * qsz);
    smem_bytes = p.off_scr + (int)(D / 32 + 1) * kScrStride;
    ntiles = (Tc + kTile - 1) / kTile + (Tw + kTile - 1) / kTile;
  } else {
    p.off_kval = 0;
    p.off_vval = r16(kTile * kk * isz + 16);
    p.off_kbm = p.off_vval + r16(kTile * kv * isz + 16);
    p.off_vbm = p.off_kbm + (int)(kTile * W * 8);
    p.stage_bytes = p.off_vbm + (int)(kTile * W * 8);
    p.off_tab = kStages * p.stage_bytes;
    smem_bytes = p.off_tab + 2 * kTile * (int)(D / 32) * 8;
    ntiles = (T + kTile - 1) / kTile;
  }
  MF_CHECK(smem_bytes <= 227 * 1024, op, "shared memory per block ", smem_bytes, " B over the 227 KiB limit (k_k=", kk,
           ", k_v=", kv, ")");
  // splits: whole waves of resident CTAs (flash-decoding; batch 1 fills the GPU), >= 2 tiles per split
  if (!v6) {
    per_sm = occupancy_cached({v5 ? 5 : 4, (int64_t)q.scalar_type(), D, GT, v5 ? VM : 0, smem_bytes}, [&] {
      int r = 0;
      dispatch_float(q.scalar_type(), [&](auto tag) {
        using scalar = decltype(tag);
        if constexpr (std::is_same<scalar, float>::value) {
          r = sparse_decode_blocks_per_sm<scalar>((int)D, GT, smem_bytes);
        } else {
          r = v5 ? sd_scatter_blocks_per_sm<scalar>((int)D, GT, VM, smem_bytes)
                 : sparse_decode_blocks_per_sm<scalar>((int)D, GT, smem_bytes);
        }
      });
      return r;
    });
  }
  const int64_t cap = (int64_t)per_sm * g_num_sms;
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
  MF_CHECK(nsplit < 65536 && Hkv * nchunk < 65536 && B < 65536, op, "grid too large");
  const int NP = (int)nsplit * nwarps;

  p.q = q.data_ptr();
  p.kbm = kb.data_ptr<int64_t>();
  p.vbm = vb.data_ptr<int64_t>();
  p.kval = kvals.data_ptr();
  p.vval = vvals.data_ptr();
  p.kwin = kw.data_ptr();
  p.vwin = vw.data_ptr();
  p.kv_start = ks.defined() ? ks.data_ptr<int>() : nullptr;
  at::Tensor ws_o = poison ? at::full({B, Hq, NP, D}, std::numeric_limits<float>::quiet_NaN(), q.options().dtype(at::kFloat))
                           : at::empty({B, Hq, NP, D}, q.options().dtype(at::kFloat));
  at::Tensor ws_ml = at::empty({B, Hq, NP, 2}, q.options().dtype(at::kFloat));
  p.ws_o = ws_o.data_ptr<float>();
  p.ws_ml = ws_ml.data_ptr<float>();
  p.B = (int)B;
  p.Hkv = (int)Hkv;
  p.G = (int)G;
  p.Tc = (int)Tc;
  p.Tw = (int)Tw;
  p.kk = (int)kk;
  p.kv = (int)kv;
  p.kbm_sb = kb.stride(0);
  p.kbm_sh = kb.stride(1);
  p.vbm_sb = vb.stride(0);
  p.vbm_sh = vb.stride(1);
  p.kval_sb = kvals.stride(0);
  p.kval_sh = kvals.stride(1);
  p.vval_sb = vvals.stride(0);
  p.vval_sh = vvals.stride(1);
  p.kwin_sb = kw.stride(0);
  p.kwin_sh = kw.stride(1);
  p.kwin_st = kw.stride(2);
  p.vwin_sb = vw.stride(0);
  p.vwin_sh = vw.stride(1);
  p.vwin_st = vw.stride(2);
  p.nsplit = (int)nsplit;
  p.tiles_per_split = (int)(v6 ? tps * nwarps : tps);  // v6: in warp tiles of 32 rows
  p.nchunk = nchunk;
  p.vec16 = vec16;
  p.qscale = (float)(scale * 1.4426950408889634);

  dim3 grid((unsigned)nsplit, (unsigned)(Hkv * nchunk), (unsigned)B);
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using scalar = decltype(tag);
    if constexpr (std::is_same<scalar, float>::value) {
      launch_sparse_decode<scalar>(p, (int)D, GT, smem_bytes, grid, stream);
    } else {
      if (v6) launch_sd_rows<scalar>(p, (int)D, nwarps, smem_bytes, grid, stream, v6_fixed_k);
      else if (v5) launch_sd_scatter<scalar>(p, (int)D, GT, VM, smem_bytes, grid, stream);
      else launch_sparse_decode<scalar>(p, (int)D, GT, smem_bytes, grid, stream);
    }
    launch_merge<scalar>((int)D, p.ws_o, p.ws_ml, NP, reinterpret_cast<scalar*>(out.data_ptr()), B * Hq, stream);
  });
  return out;
}

}  // namespace mustafar_cuda

TORCH_LIBRARY_IMPL(mustafar, CUDA, m) {
  m.impl("encode_bitmap", &mustafar_cuda::encode_bitmap_cuda);
  m.impl("decode_bitmap", &mustafar_cuda::decode_bitmap_cuda);
  m.impl("prune_encode_topk", &mustafar_cuda::prune_encode_topk_cuda);
  m.impl("sparse_decode", &mustafar_cuda::sparse_decode_cuda);
}
