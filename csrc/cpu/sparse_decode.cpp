// CPU kernel of sparse_decode (schema in csrc/mustafar.cpp): flash-decoding over [compressed n_c ;
// dense window n_w], every (batch, KV head) pair's T range split into chunks for the threads, the chunks
// merged with the max / sum rescaling; rows expanded to fp32 (AVX2 permute where available). FP8 values
// (either side) go through a 256-entry e4m3 -> float table times the row's scale. With lengths = (n_c,
// n_w) the window is a ring: window row i is slot (n_c + i) % R.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace mustafar {
namespace cpu {
namespace {

// ------------------------------------------------------------------------- sparse decode
// Dense dot of two float rows; 8 independent partial sums (vectorises without -ffast-math).
inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t i = 0; i < n; i += 8) {
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// Expand one compressed row into a dense float row (unstored channels 0).
template <typename scalar_t>
inline void expand_row_scalar(float* __restrict out, const int64_t* __restrict bits,
                              const scalar_t* __restrict vals, int64_t w, int64_t k) {
  std::memset(out, 0, sizeof(float) * w * kBits);
  int64_t n = 0;
  for (int64_t wi = 0; wi < w; ++wi) {
    uint64_t m = static_cast<uint64_t>(bits[wi]);
    float* o = out + wi * kBits;
    while (m && n < k) {
      o[__builtin_ctzll(m)] = to_f(vals[n++]);
      m &= m - 1;
    }
  }
}

#if defined(__AVX2__)
// perm[b][i] = slot (among the set bits of byte b) of channel i, for a permutevar8x32 gather.
struct ExpandTable {
  alignas(32) int32_t perm[256][8];
  ExpandTable() {
    for (int b = 0; b < 256; ++b) {
      int n = 0;
      for (int i = 0; i < 8; ++i) perm[b][i] = ((b >> i) & 1) ? n++ : 0;
    }
  }
};
const ExpandTable kExpand;

// values of one row -> float scratch (k valid entries, then >= 8 zeros for over-reads)
template <typename scalar_t>
inline void load_vals(float* __restrict dst, const scalar_t* __restrict src, int64_t k) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + 8 <= k; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    for (; i + 8 <= k; i += 8)
      _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    for (; i + 8 <= k; i += 8) {
      __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
      _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
    }
  }
  for (; i < k; ++i) dst[i] = to_f(src[i]);
  _mm256_storeu_ps(dst + k, _mm256_setzero_ps());
}

// dense[64w + 8j + i] = vals[slot] if bit set else 0, eight channels per step, branch-free.
inline void expand_f32(float* __restrict out, const int64_t* __restrict bits, const float* __restrict vf,
                       int64_t w, int64_t k) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i zero = _mm256_setzero_si256();
  int64_t n = 0;
  for (int64_t wi = 0; wi < w; ++wi) {
    const uint64_t m = static_cast<uint64_t>(bits[wi]);
    for (int by = 0; by < 8; ++by) {
      const uint32_t b = static_cast<uint32_t>(m >> (8 * by)) & 0xffu;
      const int64_t base = std::min(n, k);  // a corrupt bitmap (popcount > k) reads zeros, not OOB
      const __m256 v = _mm256_loadu_ps(vf + base);
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.perm[b]));
      const __m256i on = _mm256_cmpgt_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(b)), sel), zero);
      const __m256 e = _mm256_and_ps(_mm256_permutevar8x32_ps(v, perm), _mm256_castsi256_ps(on));
      _mm256_storeu_ps(out + wi * kBits + 8 * by, e);
      n += __builtin_popcount(b);
    }
  }
}
#endif

// FP8 values of one row -> float scratch (k valid entries, then 8 zeros for over-reads), then expanded.
inline void expand_row_fp8(float* __restrict out, const int64_t* __restrict bits, const uint8_t* __restrict vals,
                           float s, int64_t w, int64_t k, float* __restrict scratch) {
  for (int64_t i = 0; i < k; ++i) scratch[i] = kFp8.v[vals[i]] * s;
  for (int i = 0; i < 8; ++i) scratch[k + i] = 0.f;
#if defined(__AVX2__)
  expand_f32(out, bits, scratch, w, k);
#else
  expand_row_scalar(out, bits, scratch, w, k);
#endif
}

// scratch: >= k + 8 floats
template <typename scalar_t>
inline void expand_row(float* __restrict out, const int64_t* __restrict bits, const scalar_t* __restrict vals,
                       int64_t w, int64_t k, float* __restrict scratch) {
#if defined(__AVX2__)
  load_vals(scratch, vals, k);
  expand_f32(out, bits, scratch, w, k);
#else
  (void)scratch;
  expand_row_scalar(out, bits, vals, w, k);
#endif
}

template <typename scalar_t>
inline void convert_row(float* __restrict out, const scalar_t* __restrict in, int64_t d) {
  for (int64_t i = 0; i < d; ++i) out[i] = to_f(in[i]);
}

struct Seq {  // strided [B, H_kv, T, C] view with rows (T stride C, last dim contiguous)
  const void* ptr;
  int64_t sb, sh, C;
};

template <typename scalar_t>
inline const scalar_t* row_ptr(const Seq& s, int64_t b, int64_t h, int64_t t) {
  return static_cast<const scalar_t*>(s.ptr) + b * s.sb + h * s.sh + t * s.C;
}

// One side's compressed rows: bitmap, values (the dense dtype or FP8) and, for FP8, the float16 scales
// (a strided [B, H_kv, T_c] view; scale of row t at st * t).
struct Side {
  Seq bits, vals;
  int64_t k;
  const at::Half* scale;  // nullptr: values in the dense dtype
  int64_t ssb, ssh, sst;
};

template <typename scalar_t>
inline void expand_side(float* __restrict out, const Side& sd, int64_t b, int64_t h, int64_t t, int64_t w,
                        float* __restrict scratch) {
  const int64_t* bits = row_ptr<int64_t>(sd.bits, b, h, t);
  if (sd.scale != nullptr) {
    const float s = to_f(sd.scale[b * sd.ssb + h * sd.ssh + t * sd.sst]);
    expand_row_fp8(out, bits, row_ptr<uint8_t>(sd.vals, b, h, t), s, w, sd.k, scratch);
  } else {
    expand_row(out, bits, row_ptr<scalar_t>(sd.vals, b, h, t), w, sd.k, scratch);
  }
}

}  // namespace

at::Tensor sparse_decode_cpu(const at::Tensor& q_in, const at::Tensor& k_bitmap_in, const at::Tensor& k_values_in,
                             const at::Tensor& v_bitmap_in, const at::Tensor& v_values_in,
                             const at::Tensor& k_window_in, const at::Tensor& v_window_in,
                             const std::optional<at::Tensor>& kv_start_in, double scale,
                             const std::optional<at::Tensor>& k_scale_in, const std::optional<at::Tensor>& v_scale_in,
                             const std::optional<at::Tensor>& lengths_in, c10::string_view kernel, bool pdl) {
  const char* op = "mustafar.sparse_decode: ";
  (void)pdl;  // the merge of the chunks is a loop here: nothing to launch
  MF_CHECK_VALUE(kernel == "auto", op, "kernel=", kernel,
                 " is a CUDA decode kernel name: they apply to CUDA tensors (the CPU kernel takes kernel=auto)");
  check_cpu(q_in, "q");
  check_cpu(k_bitmap_in, "k_bitmap");
  check_cpu(k_values_in, "k_values");
  check_cpu(v_bitmap_in, "v_bitmap");
  check_cpu(v_values_in, "v_values");
  check_cpu(k_window_in, "k_window");
  check_cpu(v_window_in, "v_window");
  check_float(q_in, "q");
  MF_CHECK_VALUE(q_in.dim() == 3, op, "q must be [B, H_q, D], got ", q_in.sizes());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t W = check_head_dim(D);
  MF_CHECK_VALUE(k_bitmap_in.dim() == 4 && v_bitmap_in.dim() == 4, op, "bitmaps must be [B, H_kv, T_c, W]");
  MF_CHECK_VALUE(k_bitmap_in.scalar_type() == at::kLong && v_bitmap_in.scalar_type() == at::kLong, op,
                    "bitmaps must be int64, got ", k_bitmap_in.scalar_type(), " / ", v_bitmap_in.scalar_type());
  const int64_t Hkv = k_bitmap_in.size(1), Tc = k_bitmap_in.size(2);
  MF_CHECK_VALUE(k_bitmap_in.size(0) == B && k_bitmap_in.size(3) == W, op, "k_bitmap shape ",
                    k_bitmap_in.sizes(), " does not match q ", q_in.sizes());
  MF_CHECK_VALUE(v_bitmap_in.sizes() == k_bitmap_in.sizes(), op, "v_bitmap shape ", v_bitmap_in.sizes(),
                    " != k_bitmap shape ", k_bitmap_in.sizes());
  MF_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, op, "H_q=", Hq, " is not a multiple of H_kv=", Hkv);
  const int64_t G = Hq / Hkv;
  for (const at::Tensor* t : {&k_window_in, &v_window_in}) {
    MF_CHECK_VALUE(t->scalar_type() == q_in.scalar_type(), op, "window dtype ", t->scalar_type(),
                      " != q.dtype ", q_in.scalar_type());
  }
  for (const at::Tensor* t : {&k_values_in, &v_values_in, &k_window_in, &v_window_in}) {
    MF_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) == Hkv, op, "K/V tensor shape ",
                      t->sizes(), " must be [", B, ", ", Hkv, ", T, C]");
  }
  const std::vector<int64_t> shape3{B, Hkv, Tc};
  auto ksc = check_side(op, k_values_in, "k_values", k_scale_in, "k_scale", q_in.scalar_type(), shape3);
  auto vsc = check_side(op, v_values_in, "v_values", v_scale_in, "v_scale", q_in.scalar_type(), shape3);
  MF_CHECK_VALUE(k_values_in.size(2) == Tc && v_values_in.size(2) == Tc, op,
                    "values T dim must equal the bitmaps' T_c=", Tc);
  const int64_t kk = k_values_in.size(3), kv = v_values_in.size(3);
  MF_CHECK_VALUE(kk <= D && kv <= D, op, "values last dim (", kk, ", ", kv, ") > D=", D);
  MF_CHECK_VALUE(k_window_in.size(3) == D && v_window_in.sizes() == k_window_in.sizes(), op,
                    "windows must both be [B, H_kv, T_w, D], got ", k_window_in.sizes(), " / ",
                    v_window_in.sizes());
  const int64_t R = k_window_in.size(2);
  // visible rows: compressed [0, nc), window rows i < nw at ring slot (w0 + i) mod R
  int64_t nc = Tc, nw = R, w0 = 0;
  if (lengths_in.has_value() && lengths_in->defined()) {
    std::tie(nc, nw) = read_lengths(op, *lengths_in, Tc, "T_c, the store's rows", R, "R, the window's slots");
    w0 = R > 0 ? nc % R : 0;
  }
  const int64_t T = nc + nw;

  std::vector<int64_t> start(B, 0);
  if (kv_start_in.has_value() && kv_start_in->defined()) {
    const auto& ks = *kv_start_in;
    check_cpu(ks, "kv_start");
    MF_CHECK_VALUE(ks.scalar_type() == at::kInt || ks.scalar_type() == at::kLong, op,
                      "kv_start.dtype=", ks.scalar_type(), " (expected int32)");
    MF_CHECK_VALUE(ks.dim() == 1 && ks.size(0) == B, op, "kv_start shape ", ks.sizes(), " != [", B, "]");
    auto ks64 = ks.to(at::kLong).contiguous();
    const int64_t* p = ks64.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) start[b] = std::max<int64_t>(0, p[b]);
  }

  auto kb = rows_ok(k_bitmap_in), vb = rows_ok(v_bitmap_in);
  auto kvals = rows_ok(k_values_in), vvals = rows_ok(v_values_in);
  auto kw = rows_ok(k_window_in), vw = rows_ok(v_window_in);
  auto scale_rows = [](const std::optional<at::Tensor>& t) {  // T dim stride 1 (leading dims any)
    return !t ? at::Tensor() : (t->size(2) <= 1 || t->stride(2) == 1) ? *t : t->contiguous();
  };
  const at::Tensor ks = scale_rows(ksc), vs = scale_rows(vsc);
  // q * scale in fp32: [B, H_q, D]
  auto qf = (q_in.to(at::kFloat) * scale).contiguous();
  auto out = at::empty({B, Hq, D}, q_in.options().memory_format(at::MemoryFormat::Contiguous));

  // Split every (b, kv head) pair's T range into chunks so that there are enough tasks for all
  // threads (flash-decoding); chunks are merged with the usual max/sum rescaling.
  const int64_t P = B * Hkv;
  const int64_t nthreads = std::max<int64_t>(1, at::get_num_threads());
  int64_t chunks = 1;
  if (P < 4 * nthreads && T > 0) {
    chunks = (4 * nthreads + P - 1) / P;
    chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, (T + 255) / 256));
  }
  const int64_t cs = T > 0 ? (T + chunks - 1) / chunks : 0;
  // partials per (pair, chunk): m[G], l[G], acc[G*D]
  const int64_t pstride = G * (D + 2);
  std::vector<float> part(static_cast<size_t>(P * chunks * pstride));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_in.scalar_type(), "mustafar_sparse_decode", [&] {
    auto side = [&](const at::Tensor& bits, const at::Tensor& vals, int64_t k, const at::Tensor& sc) {
      return Side{Seq{bits.const_data_ptr(), bits.stride(0), bits.stride(1), W},
                  Seq{vals.const_data_ptr(), vals.stride(0), vals.stride(1), k}, k,
                  sc.defined() ? sc.const_data_ptr<at::Half>() : nullptr, sc.defined() ? sc.stride(0) : 0,
                  sc.defined() ? sc.stride(1) : 0, 1};
    };
    const Side sk = side(kb, kvals, kk, ks), sv = side(vb, vvals, kv, vs);
    const Seq skw{kw.const_data_ptr(), kw.stride(0), kw.stride(1), D};
    const Seq svw{vw.const_data_ptr(), vw.stride(0), vw.stride(1), D};
    const float* qp = qf.const_data_ptr<float>();
    auto slot = [&](int64_t t) {  // window position t >= nc -> ring slot
      const int64_t i = w0 + (t - nc);
      return i >= R ? i - R : i;
    };

    at::parallel_for(0, P * chunks, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(static_cast<size_t>(G * std::max<int64_t>(cs, 1)));
      std::vector<float> row(static_cast<size_t>(D));
      std::vector<float> vbuf(static_cast<size_t>(D + 16));
      for (int64_t task = i0; task < i1; ++task) {
        const int64_t pair = task / chunks, c = task % chunks;
        const int64_t b = pair / Hkv, h = pair % Hkv;
        float* m = part.data() + task * pstride;
        float* l = m + G;
        float* acc = l + G;
        std::fill(m, m + G, -std::numeric_limits<float>::infinity());
        std::fill(l, l + G, 0.f);
        std::fill(acc, acc + G * D, 0.f);
        const int64_t t0 = std::max(c * cs, start[b]);
        const int64_t t1 = std::min(T, (c + 1) * cs);
        if (t0 >= t1) continue;
        const int64_t n = t1 - t0;
        const float* qg = qp + (b * Hq + h * G) * D;  // [G, D]

        // pass 1: scores[g][t] = (q_g * scale) . K_t
        for (int64_t t = t0; t < t1; ++t) {
          if (t < nc) {
            expand_side<scalar_t>(row.data(), sk, b, h, t, W, vbuf.data());
          } else {
            convert_row(row.data(), row_ptr<scalar_t>(skw, b, h, slot(t)), D);
          }
          for (int64_t g = 0; g < G; ++g) scores[g * n + (t - t0)] = dot(qg + g * D, row.data(), D);
        }
        // softmax numerators with the chunk max
        for (int64_t g = 0; g < G; ++g) {
          float* s = scores.data() + g * n;
          float mx = -std::numeric_limits<float>::infinity();
          for (int64_t i = 0; i < n; ++i) mx = std::max(mx, s[i]);
          float sum = 0.f;
          for (int64_t i = 0; i < n; ++i) {
            s[i] = std::exp(s[i] - mx);
            sum += s[i];
          }
          m[g] = mx;
          l[g] = sum;
        }
        // pass 2: acc[g] += p[g][t] * V_t
        for (int64_t t = t0; t < t1; ++t) {
          if (t < nc) {
            expand_side<scalar_t>(row.data(), sv, b, h, t, W, vbuf.data());
          } else {
            convert_row(row.data(), row_ptr<scalar_t>(svw, b, h, slot(t)), D);
          }
          for (int64_t g = 0; g < G; ++g) axpy(acc + g * D, scores[g * n + (t - t0)], row.data(), D);
        }
      }
    });

    // merge the chunks of every (pair, g)
    scalar_t* op_out = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
      std::vector<float> o(static_cast<size_t>(D));
      for (int64_t pair = p0; pair < p1; ++pair) {
        const int64_t b = pair / Hkv, h = pair % Hkv;
        for (int64_t g = 0; g < G; ++g) {
          // a chunk is empty iff it saw no unmasked token (m = -inf and l = 0); NaN propagates
          float M = -std::numeric_limits<float>::infinity();
          bool any = false;
          for (int64_t c = 0; c < chunks; ++c) {
            const float* pm = part.data() + (pair * chunks + c) * pstride;
            if (pm[g] == -std::numeric_limits<float>::infinity() && pm[G + g] == 0.f) continue;
            any = true;
            M = std::isnan(pm[g]) ? pm[g] : std::max(M, pm[g]);
          }
          std::fill(o.begin(), o.end(), 0.f);
          float L = 0.f;
          for (int64_t c = 0; any && c < chunks; ++c) {
            const float* pm = part.data() + (pair * chunks + c) * pstride;
            if (pm[g] == -std::numeric_limits<float>::infinity() && pm[G + g] == 0.f) continue;
            const float f = std::exp(pm[g] - M);
            L += pm[G + g] * f;
            axpy(o.data(), f, pm + 2 * G + g * D, D);
          }
          scalar_t* dst = op_out + (b * Hq + h * G + g) * D;
          if (any) {
            const float inv = 1.f / L;
            for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<scalar_t>(o[i] * inv);
          } else {
            for (int64_t i = 0; i < D; ++i) dst[i] = scalar_t(0);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace cpu
}  // namespace mustafar
