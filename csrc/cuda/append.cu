// append_decode (CUDA): one decode step of a preallocated, compileable cache layer (schema and semantics in
// csrc/mustafar.cpp / docs/design.md). Two launches, both with a fixed shape so a CUDA graph can hold them:
//
//   append_rows_kernel  one warp per (b, h): the new token into ring slot n % R; the token that leaves the
//                       L most recent ones (position e = n - L, if e >= max(0, n_c)) pruned to its k largest
//                       magnitudes (the tie rule of prune_encode_topk: of equal magnitudes the lower channel
//                       is pruned first, NaN is the largest) and encoded into store row e, quantized to e4m3
//                       with the row's fp16 scale where the side is fp8;
//   append_lengths_kernel  one thread: (n_c, n_w) -> the schedule's next state.
//
// Lengths are read on the device only: the host never synchronises.
#include "common.cuh"
#include "ops.h"

#include "../mf_check.h"

#include <cuda_fp8.h>

namespace mustafar_cuda {

namespace {

struct AppendParams {
  const uint8_t* k;  // [B, H, 1, D] (strides below)
  const uint8_t* v;
  uint8_t* kwin;  // [B, H, R, D]
  uint8_t* vwin;
  uint32_t* kbm;  // [B, H, C, W] int64 words as u32 pairs
  uint32_t* vbm;
  uint8_t* kval;  // [B, H, C, kk] (ES bytes)
  uint8_t* vval;
  __half* ksc;  // [B, H, C] or null
  __half* vsc;
  int* lengths;
  int64_t k_sb, k_sh, v_sb, v_sh, kwin_sb, kwin_sh, vwin_sb, vwin_sh;
  int64_t kbm_sb, kbm_sh, vbm_sb, vbm_sh, kval_sb, kval_sh, vval_sb, vval_sh, ksc_sb, ksc_sh, vsc_sb, vsc_sh;
  int H, R, C, kk, kv, L, chunk;
};

template <typename T>
__device__ __forceinline__ float ld_f(const uint8_t* base, int64_t i) {
  return to_f(reinterpret_cast<const T*>(base)[i]);
}

// Prune one row held by the warp (lane l holds channels l + 32 j, j < NJ) to its k largest magnitudes and
// encode it: bitmap words to bm, values (ES = 2: model dtype T; ES = 1: e4m3 with the fp16 scale *sc).
template <typename T, int NJ, bool F8>
__device__ void encode_row(const float (&x)[NJ], int k, uint32_t* bm, uint8_t* val, __half* sc) {
  const int lane = threadIdx.x & 31;
  uint64_t key[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    uint32_t mag = __float_as_uint(x[j]) & 0x7fffffffu;  // NaN above inf: the largest magnitude
    key[j] = ((uint64_t)mag << 8) | (uint64_t)(lane + 32 * j);  // ties: the higher channel is kept
  }
  // the k-th largest key (keys are distinct): the largest t with #{key >= t} >= k
  uint64_t t = 0;
  if (k > 0) {
#pragma unroll 1
    for (int bit = 38; bit >= 0; --bit) {
      const uint64_t c = t | (1ull << bit);
      int n = 0;
#pragma unroll
      for (int j = 0; j < NJ; ++j) n += key[j] >= c ? 1 : 0;
      n = __reduce_add_sync(0xffffffffu, n);
      if (n >= k) t = c;
    }
  }
  uint32_t words[NJ];
  bool keep[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    keep[j] = k > 0 && key[j] >= t;
    words[j] = __ballot_sync(0xffffffffu, keep[j]);
  }
  if (lane < NJ) {
    uint32_t w = 0;
#pragma unroll
    for (int j = 0; j < NJ; ++j) w = lane == j ? words[j] : w;
    bm[lane] = w;
  }
  float s = 1.f;
  if constexpr (F8) {
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < NJ; ++j) amax = keep[j] ? fmaxf(amax, fabsf(x[j])) : amax;
#pragma unroll
    for (int off = 16; off; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    __half hs = __float2half_rn(amax / 448.f);
    if (__half2float(hs) == 0.f) hs = __float2half_rn(1.f);
    s = __half2float(hs);
    if (lane == 0) *sc = hs;
  }
  int before = 0;
  const uint32_t lt = (1u << lane) - 1u;
#pragma unroll
  for (int j = 0; j < NJ; ++j) {
    if (keep[j]) {
      const int rank = before + __popc(words[j] & lt);
      if constexpr (F8) {
        const float y = fminf(448.f, fmaxf(-448.f, x[j] / s));
        val[rank] = (uint8_t)__nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3);
      } else {
        reinterpret_cast<T*>(val)[rank] = from_f<T>(x[j]);
      }
    }
    before += __popc(words[j]);
  }
  // slots past the kept values (k == D rows have none) stay as they are: exactly k are written when the row
  // has k kept entries, which top-k guarantees
}

template <typename T, int D, bool K8, bool V8>
__global__ void __launch_bounds__(128) append_rows_kernel(const AppendParams p, int64_t BH) {
  constexpr int NJ = D / 32;
  const int64_t bh = (int64_t)blockIdx.x * 4 + (threadIdx.x >> 5);
  if (bh >= BH) return;
  const int lane = threadIdx.x & 31;
  const int64_t b = bh / p.H, h = bh % p.H;
  const int n_c = __ldg(p.lengths), n_w = __ldg(p.lengths + 1);
  const int n = n_c + n_w;
  const int slot = n % p.R;
  const T* kn = reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh;
  const T* vn = reinterpret_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh;
  T* kw = reinterpret_cast<T*>(p.kwin) + b * p.kwin_sb + h * p.kwin_sh;
  T* vw = reinterpret_cast<T*>(p.vwin) + b * p.vwin_sb + h * p.vwin_sh;
  for (int c = lane; c < D; c += 32) {
    kw[(int64_t)slot * D + c] = kn[c];
    vw[(int64_t)slot * D + c] = vn[c];
  }
  const int e = n - p.L;
  if (e < 0 || e < n_c || e >= p.C) return;  // e >= C: past the store (the cache checks capacity first)
  // the leaving token: the new one itself when L == 0, else its ring slot (written by an earlier step)
  const T* ks = e == n ? kn : kw + (int64_t)(e % p.R) * D;
  const T* vs = e == n ? vn : vw + (int64_t)(e % p.R) * D;
  float xk[NJ], xv[NJ];
#pragma unroll
  for (int j = 0; j < NJ; ++j) { xk[j] = to_f(ks[lane + 32 * j]); xv[j] = to_f(vs[lane + 32 * j]); }
  encode_row<T, NJ, K8>(xk, p.kk, p.kbm + 2 * (b * p.kbm_sb + h * p.kbm_sh + (int64_t)e * (D / 64)),
                        p.kval + (b * p.kval_sb + h * p.kval_sh + (int64_t)e * p.kk) * (K8 ? 1 : sizeof(T)),
                        K8 ? p.ksc + b * p.ksc_sb + h * p.ksc_sh + e : nullptr);
  encode_row<T, NJ, V8>(xv, p.kv, p.vbm + 2 * (b * p.vbm_sb + h * p.vbm_sh + (int64_t)e * (D / 64)),
                        p.vval + (b * p.vval_sb + h * p.vval_sh + (int64_t)e * p.kv) * (V8 ? 1 : sizeof(T)),
                        V8 ? p.vsc + b * p.vsc_sb + h * p.vsc_sh + e : nullptr);
}

__global__ void append_lengths_kernel(int* lengths, int L, int chunk) {
  int n_c = lengths[0], n_w = lengths[1] + 1;
  if (n_w > L + chunk) {
    n_c += chunk;
    n_w -= chunk;
  }
  lengths[0] = n_c;
  lengths[1] = n_w;
}

template <typename T, int D>
void launch_rows(const AppendParams& p, int64_t BH, bool K8, bool V8, cudaStream_t s) {
  const unsigned grid = (unsigned)((BH + 3) / 4);
  if (K8 && V8) append_rows_kernel<T, D, true, true><<<grid, 128, 0, s>>>(p, BH);
  else if (K8) append_rows_kernel<T, D, true, false><<<grid, 128, 0, s>>>(p, BH);
  else if (V8) append_rows_kernel<T, D, false, true><<<grid, 128, 0, s>>>(p, BH);
  else append_rows_kernel<T, D, false, false><<<grid, 128, 0, s>>>(p, BH);
  MF_CHECK_LAUNCH();
}

template <typename T>
void launch_rows_d(const AppendParams& p, int64_t BH, int D, bool K8, bool V8, cudaStream_t s) {
  if (D == 64) launch_rows<T, 64>(p, BH, K8, V8, s);
  else if (D == 128) launch_rows<T, 128>(p, BH, K8, V8, s);
  else launch_rows<T, 256>(p, BH, K8, V8, s);
}

}  // namespace

void append_decode_cuda(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_window,
                        const at::Tensor& v_window, const at::Tensor& k_bitmap, const at::Tensor& k_values,
                        const at::Tensor& v_bitmap, const at::Tensor& v_values,
                        const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                        const at::Tensor& lengths, int64_t local_window, int64_t chunk) {
  const char* op = "mustafar.append_decode (CUDA): ";
  for (const at::Tensor* t : {&k, &v, &k_window, &v_window, &k_bitmap, &k_values, &v_bitmap, &v_values, &lengths})
    MF_CHECK_VALUE(t->is_cuda(), op, "every tensor must be on the GPU, got one on ", t->device());
  const auto dt = k.scalar_type();
  MF_CHECK_VALUE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, op, "dtype ", dt,
                 " (expected float16, bfloat16 or float32)");
  MF_CHECK_VALUE(k.dim() == 4 && k.size(2) == 1 && v.sizes() == k.sizes(), op, "k, v must be [B, H, 1, D], got ",
                 k.sizes(), " / ", v.sizes());
  const int64_t B = k.size(0), H = k.size(1), D = k.size(3);
  MF_CHECK_VALUE(D == 64 || D == 128 || D == 256, op, "head_dim D=", D, " must be 64, 128 or 256");
  MF_CHECK_VALUE(k_window.dim() == 4 && k_window.size(0) == B && k_window.size(1) == H && k_window.size(3) == D &&
                     v_window.sizes() == k_window.sizes(),
                 op, "windows must be [", B, ", ", H, ", R, ", D, "], got ", k_window.sizes(), " / ", v_window.sizes());
  const int64_t R = k_window.size(2);
  MF_CHECK_VALUE(local_window >= 0 && chunk >= 1 && R >= local_window + chunk + 1, op, "ring of R=", R,
                 " rows cannot hold local_window=", local_window, " + chunk=", chunk, " + 1 rows");
  MF_CHECK_VALUE(k_bitmap.dim() == 4 && k_bitmap.scalar_type() == at::kLong && k_bitmap.size(0) == B &&
                     k_bitmap.size(1) == H && k_bitmap.size(3) == D / 64 && v_bitmap.sizes() == k_bitmap.sizes(),
                 op, "bitmaps must be int64 [B, H, C, D/64]");
  const int64_t C = k_bitmap.size(2);
  const bool K8 = k_values.scalar_type() == at::kFloat8_e4m3fn, V8 = v_values.scalar_type() == at::kFloat8_e4m3fn;
  MF_CHECK_VALUE(K8 || k_values.scalar_type() == dt, op, "k_values.dtype ", k_values.scalar_type());
  MF_CHECK_VALUE(V8 || v_values.scalar_type() == dt, op, "v_values.dtype ", v_values.scalar_type());
  MF_CHECK_VALUE(!(K8 || V8) || dt != at::kFloat, op, "fp8 values need a float16 / bfloat16 model");
  for (const at::Tensor* t : {&k_values, &v_values})
    MF_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) == H && t->size(2) == C && t->size(3) <= D, op,
                   "values must be [B, H, C, k], got ", t->sizes());
  MF_CHECK_VALUE(K8 == (k_scale.has_value() && k_scale->defined()), op, "k_scale must be given iff k_values is fp8");
  MF_CHECK_VALUE(V8 == (v_scale.has_value() && v_scale->defined()), op, "v_scale must be given iff v_values is fp8");
  MF_CHECK_VALUE(lengths.scalar_type() == at::kInt && lengths.numel() == 2 && lengths.is_contiguous(), op,
                 "lengths must be a contiguous int32 tensor [2]");
  auto rows = [&](const at::Tensor& t, const char* name) {
    MF_CHECK_VALUE(t.stride(t.dim() - 1) == 1 && (t.dim() < 3 || t.stride(2) == (t.dim() == 4 ? t.size(3) : 1)), op,
                   name, " must have contiguous rows");
  };
  rows(k_window, "k_window"); rows(v_window, "v_window"); rows(k_bitmap, "k_bitmap"); rows(v_bitmap, "v_bitmap");
  rows(k_values, "k_values"); rows(v_values, "v_values");
  MF_CHECK_VALUE(k.stride(3) == 1 && v.stride(3) == 1, op, "k, v must have a contiguous last dim");
  c10::cuda::CUDAGuard guard(k.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AppendParams p{};
  p.k = (const uint8_t*)k.data_ptr(); p.v = (const uint8_t*)v.data_ptr();
  p.kwin = (uint8_t*)k_window.data_ptr(); p.vwin = (uint8_t*)v_window.data_ptr();
  p.kbm = (uint32_t*)k_bitmap.data_ptr(); p.vbm = (uint32_t*)v_bitmap.data_ptr();
  p.kval = (uint8_t*)k_values.data_ptr(); p.vval = (uint8_t*)v_values.data_ptr();
  p.ksc = K8 ? (__half*)k_scale->data_ptr() : nullptr; p.vsc = V8 ? (__half*)v_scale->data_ptr() : nullptr;
  if (K8) { MF_CHECK_VALUE(k_scale->scalar_type() == at::kHalf && k_scale->dim() == 3 && k_scale->stride(2) == 1, op, "k_scale must be float16 [B, H, C]"); p.ksc_sb = k_scale->stride(0); p.ksc_sh = k_scale->stride(1); }
  if (V8) { MF_CHECK_VALUE(v_scale->scalar_type() == at::kHalf && v_scale->dim() == 3 && v_scale->stride(2) == 1, op, "v_scale must be float16 [B, H, C]"); p.vsc_sb = v_scale->stride(0); p.vsc_sh = v_scale->stride(1); }
  p.lengths = lengths.data_ptr<int>();
  p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.v_sb = v.stride(0); p.v_sh = v.stride(1);
  p.kwin_sb = k_window.stride(0); p.kwin_sh = k_window.stride(1); p.vwin_sb = v_window.stride(0); p.vwin_sh = v_window.stride(1);
  p.kbm_sb = k_bitmap.stride(0); p.kbm_sh = k_bitmap.stride(1); p.vbm_sb = v_bitmap.stride(0); p.vbm_sh = v_bitmap.stride(1);
  p.kval_sb = k_values.stride(0); p.kval_sh = k_values.stride(1); p.vval_sb = v_values.stride(0); p.vval_sh = v_values.stride(1);
  p.H = (int)H; p.R = (int)R; p.C = (int)C; p.kk = (int)k_values.size(3); p.kv = (int)v_values.size(3);
  p.L = (int)local_window; p.chunk = (int)chunk;
  const int64_t BH = B * H;
  if (BH > 0) {
    if (dt == at::kHalf) launch_rows_d<__half>(p, BH, (int)D, K8, V8, stream);
    else if (dt == at::kBFloat16) launch_rows_d<__nv_bfloat16>(p, BH, (int)D, K8, V8, stream);
    else launch_rows_d<float>(p, BH, (int)D, false, false, stream);
  }
  append_lengths_kernel<<<1, 1, 0, stream>>>(lengths.data_ptr<int>(), (int)local_window, (int)chunk);
  MF_CHECK_LAUNCH();
}

}  // namespace mustafar_cuda
