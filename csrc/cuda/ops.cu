// CUDA ops of `mustafar` other than the fused decode: encode_bitmap / prune_encode_topk / decode_bitmap
// (kernels and host wrappers), and the CUDA registration of every op (sparse_decode: sparse_decode.cu).
#include "common.cuh"
#include "ops.h"
#include "../mf_check.h"

#include <torch/library.h>

namespace mustafar_cuda {

// ------------------------------------------------------------------------------------------------
// prune_encode_topk / encode_bitmap: one warp per token vector, lane owns channels e*32 + lane
// ------------------------------------------------------------------------------------------------
// |x| of a 16-bit value as a 15-bit integer key in the order of |x| (NaN: one key above inf)
__device__ __forceinline__ uint32_t mag16(__half x) {
  const uint32_t b = __half_as_ushort(x) & 0x7fffu;
  return b > 0x7c00u ? 0x7e00u : b;
}
__device__ __forceinline__ uint32_t mag16(__nv_bfloat16 x) {
  const uint32_t b = __bfloat16_as_ushort(x) & 0x7fffu;
  return b > 0x7f80u ? 0x7fc0u : b;
}

// The k-th largest of the warp's keys (NE per lane, keys below 2^BITS, 1 <= k <= 32 NE): the largest thr with
// count(key >= thr) >= k, found bit by bit from the top: per bit each lane counts its own keys, one warp
// reduction (redux.sync, sm_80+) sums them (NE compares and one reduction per bit, not NE ballots + popcounts).
template <int BITS, typename K, int NE>
__device__ __forceinline__ K kth_largest(const K (&key)[NE], int k) {
  K thr = 0;
#pragma unroll 1
  for (int bit = BITS - 1; bit >= 0; --bit) {
    const K cand = thr | ((K)1 << bit);
    unsigned own = 0;
#pragma unroll
    for (int e = 0; e < NE; ++e) own += key[e] >= cand ? 1u : 0u;
    if ((int)__reduce_add_sync(0xffffffffu, own) >= k) thr = cand;
  }
  return thr;
}

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
    // Keep the k largest |x| (NaN, canonicalised, above inf); of equal magnitudes the higher channel is kept
    // (the lower channel is pruned first). Ranks of the float path = ranks of the 16-bit path: the 16-bit
    // formats convert to float monotonically.
    if (k <= 0 || k >= D) {
#pragma unroll
      for (int e = 0; e < NE; ++e) keep[e] = k > 0;
    } else if constexpr (sizeof(T) == 2) {
      // 16-bit values: magnitude keys of 15 bits; the k-th largest magnitude by a 15-step bitwise search,
      // then the ties at it resolved by channel with one ballot per channel block (no search over channels)
      uint32_t mag[NE];
#pragma unroll
      for (int e = 0; e < NE; ++e) mag[e] = mag16(xv[e]);
      const uint32_t thr = kth_largest<15>(mag, k);
      int need = k;  // k - #(mag > thr): how many of the ties are kept
#pragma unroll
      for (int e = 0; e < NE; ++e) need -= __popc(__ballot_sync(0xffffffffu, mag[e] > thr));
      const uint32_t above = lane == 31 ? 0u : (0xffffffffu << (lane + 1));  // lanes of higher channels
#pragma unroll
      for (int e = NE - 1; e >= 0; --e) {
        const uint32_t tie = __ballot_sync(0xffffffffu, mag[e] == thr);
        keep[e] = mag[e] > thr || (mag[e] == thr && __popc(tie & above) < need);
        need -= __popc(tie);
      }
    } else {
      // float values: key = |x| bits << 8 | channel (unique), the k-th largest key by a 40-step search
      uint64_t key[NE];
#pragma unroll
      for (int e = 0; e < NE; ++e) {
        float f = to_f(xv[e]);
        uint32_t mb = isnan(f) ? 0x7fc00000u : (__float_as_uint(f) & 0x7fffffffu);
        key[e] = ((uint64_t)mb << 8) | (uint64_t)(e * 32 + lane);
      }
      const uint64_t thr = kth_largest<40>(key, k);
#pragma unroll
      for (int e = 0; e < NE; ++e) keep[e] = key[e] >= thr;
    }
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

}  // namespace mustafar_cuda

TORCH_LIBRARY_IMPL(mustafar, CUDA, m) {
  m.impl("encode_bitmap", &mustafar_cuda::encode_bitmap_cuda);
  m.impl("decode_bitmap", &mustafar_cuda::decode_bitmap_cuda);
  m.impl("prune_encode_topk", &mustafar_cuda::prune_encode_topk_cuda);
  m.impl("sparse_decode", &mustafar_cuda::sparse_decode_cuda);
  m.impl("append_decode", &mustafar_cuda::append_decode_cuda);
}

