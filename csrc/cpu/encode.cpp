// CPU kernels of encode_bitmap, decode_bitmap and prune_encode_topk (schemas in csrc/mustafar.cpp,
// format in docs/design.md): one row (token vector) per iteration of an at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "common.h"
#include "cpu_ops.h"

#include <algorithm>
#include <atomic>
#include <vector>

namespace mustafar {
namespace cpu {

// ------------------------------------------------------------------------------- encode
std::tuple<at::Tensor, at::Tensor> encode_bitmap_cpu(const at::Tensor& x_in, const at::Tensor& mask_in,
                                                     int64_t k) {
  check_cpu(x_in, "x");
  check_cpu(mask_in, "mask");
  check_float(x_in, "x");
  MF_CHECK_VALUE(x_in.dim() >= 1, "mustafar.encode_bitmap: x must have rank >= 1");
  MF_CHECK_VALUE(mask_in.scalar_type() == at::kBool, "mustafar.encode_bitmap: mask.dtype=",
                    mask_in.scalar_type(), " (expected bool)");
  MF_CHECK_VALUE(mask_in.sizes() == x_in.sizes(), "mustafar.encode_bitmap: mask shape ",
                    mask_in.sizes(), " != x shape ", x_in.sizes());
  const int64_t d = x_in.size(-1);
  const int64_t w = check_head_dim(d);
  MF_CHECK_VALUE(k >= 0 && k <= d, "mustafar.encode_bitmap: k=", k, " out of range [0, ", d, "]");

  auto x = x_in.contiguous();
  auto mask = mask_in.contiguous();
  const int64_t rows = x.numel() / d;
  std::vector<int64_t> bshape(x.sizes().begin(), x.sizes().end());
  std::vector<int64_t> vshape = bshape;
  bshape.back() = w;
  vshape.back() = k;
  auto bitmap = at::empty(bshape, x.options().dtype(at::kLong));
  auto values = at::empty(vshape, x.options());
  std::atomic<int64_t> bad_row{-1};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mustafar_encode_bitmap", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const bool* mp = mask.const_data_ptr<bool>();
    int64_t* bp = bitmap.mutable_data_ptr<int64_t>();
    scalar_t* vp = values.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * d;
        const bool* mr = mp + r * d;
        scalar_t* vr = vp + r * k;
        int64_t n = 0;
        for (int64_t wi = 0; wi < w; ++wi) {
          uint64_t bits = 0;
          for (int64_t j = 0; j < kBits; ++j) {
            const int64_t c = wi * kBits + j;
            if (mr[c]) {
              bits |= uint64_t{1} << j;
              if (n < k) vr[n] = xr[c];
              ++n;
            }
          }
          bp[r * w + wi] = static_cast<int64_t>(bits);
        }
        if (n > k) {
          bad_row.store(r);
          n = k;
        }
        for (int64_t i = n; i < k; ++i) vr[i] = scalar_t(0);
      }
    });
  });
  MF_CHECK_VALUE(bad_row.load() < 0, "mustafar.encode_bitmap: mask row ", bad_row.load(),
                    " keeps more than k=", k, " entries");
  return {bitmap, values};
}

// ------------------------------------------------------------------------------- decode
at::Tensor decode_bitmap_cpu(const at::Tensor& bitmap_in, const at::Tensor& values_in, int64_t head_dim) {
  check_cpu(bitmap_in, "bitmap");
  check_cpu(values_in, "values");
  check_float(values_in, "values");
  MF_CHECK_VALUE(bitmap_in.scalar_type() == at::kLong, "mustafar.decode_bitmap: bitmap.dtype=",
                    bitmap_in.scalar_type(), " (expected int64)");
  const int64_t w = check_head_dim(head_dim);
  MF_CHECK_VALUE(bitmap_in.dim() >= 1 && bitmap_in.size(-1) == w, "mustafar.decode_bitmap: bitmap shape ",
                    bitmap_in.sizes(), " last dim must be head_dim/64 = ", w);
  MF_CHECK_VALUE(values_in.dim() == bitmap_in.dim() &&
                        values_in.sizes().slice(0, values_in.dim() - 1) ==
                            bitmap_in.sizes().slice(0, bitmap_in.dim() - 1),
                    "mustafar.decode_bitmap: values shape ", values_in.sizes(), " and bitmap shape ",
                    bitmap_in.sizes(), " differ in the leading dims");
  const int64_t k = values_in.size(-1);
  MF_CHECK_VALUE(k <= head_dim, "mustafar.decode_bitmap: values last dim k=", k, " > head_dim=", head_dim);
  auto bitmap = bitmap_in.contiguous();
  auto values = values_in.contiguous();
  const int64_t rows = bitmap.numel() / w;
  std::vector<int64_t> oshape(values.sizes().begin(), values.sizes().end());
  oshape.back() = head_dim;
  auto out = at::empty(oshape, values.options());
  std::atomic<int64_t> bad_row{-1};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "mustafar_decode_bitmap", [&] {
    const int64_t* bp = bitmap.const_data_ptr<int64_t>();
    const scalar_t* vp = values.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* orow = op + r * head_dim;
        const scalar_t* vr = vp + r * k;
        std::fill(orow, orow + head_dim, scalar_t(0));
        int64_t n = 0;
        for (int64_t wi = 0; wi < w; ++wi) {
          uint64_t bits = static_cast<uint64_t>(bp[r * w + wi]);
          while (bits) {
            const int j = __builtin_ctzll(bits);
            bits &= bits - 1;
            if (n < k) orow[wi * kBits + j] = vr[n];
            ++n;
          }
        }
        if (n > k) bad_row.store(r);
      }
    });
  });
  MF_CHECK_VALUE(bad_row.load() < 0, "mustafar.decode_bitmap: bitmap row ", bad_row.load(),
                    " has more set bits than values slots k=", k);
  return out;
}

// ------------------------------------------------------------------- fused top-k + encode
std::tuple<at::Tensor, at::Tensor> prune_encode_topk_cpu(const at::Tensor& x_in, int64_t k) {
  check_cpu(x_in, "x");
  check_float(x_in, "x");
  MF_CHECK_VALUE(x_in.dim() >= 1, "mustafar.prune_encode_topk: x must have rank >= 1");
  const int64_t d = x_in.size(-1);
  const int64_t w = check_head_dim(d);
  MF_CHECK_VALUE(k >= 0 && k <= d, "mustafar.prune_encode_topk: k=", k, " out of range [0, ", d, "]");
  auto x = x_in.contiguous();
  const int64_t rows = x.numel() / d;
  std::vector<int64_t> bshape(x.sizes().begin(), x.sizes().end());
  std::vector<int64_t> vshape = bshape;
  bshape.back() = w;
  vshape.back() = k;
  auto bitmap = at::empty(bshape, x.options().dtype(at::kLong));
  auto values = at::empty(vshape, x.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mustafar_prune_encode_topk", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    int64_t* bp = bitmap.mutable_data_ptr<int64_t>();
    scalar_t* vp = values.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      // mags[c] = |x_c| as ordered int bits (NaN largest). The k-th largest magnitude `thr` is found
      // by a branch-free bitwise binary search (31 vectorised counting passes over the row); all
      // entries above thr are kept, and of those equal to thr the highest channels are kept (= the
      // lower channel is pruned first).
      std::vector<int32_t> mags(d);
      std::vector<uint8_t> keep(d);
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* xr = xp + r * d;
        int64_t* br = bp + r * w;
        scalar_t* vr = vp + r * k;
        for (int64_t c = 0; c < d; ++c) mags[c] = static_cast<int32_t>(mag_bits(to_f(xr[c])));
        int32_t thr = 0;
        if (k > 0) {
          for (int bit = 30; bit >= 0; --bit) {
            const int32_t cand = thr | (int32_t{1} << bit);
            int32_t cnt = 0;
            const int32_t* mp = mags.data();
            for (int64_t c = 0; c < d; ++c) cnt += mp[c] >= cand;
            if (cnt >= k) thr = cand;
          }
        }
        int64_t above = 0;
        for (int64_t c = 0; c < d; ++c) {
          keep[c] = k > 0 && mags[c] > thr;
          above += keep[c];
        }
        for (int64_t c = d - 1, need = k - above; c >= 0 && need > 0; --c) {
          if (mags[c] == thr) {
            keep[c] = 1;
            --need;
          }
        }
        int64_t n = 0;
        for (int64_t wi = 0; wi < w; ++wi) {
          uint64_t bits = 0;
          for (int64_t j = 0; j < kBits; ++j) {
            const int64_t c = wi * kBits + j;
            if (keep[c]) {
              bits |= uint64_t{1} << j;
              vr[n++] = xr[c];
            }
          }
          br[wi] = static_cast<int64_t>(bits);
        }
      }
    });
  });
  return {bitmap, values};
}

}  // namespace cpu
}  // namespace mustafar
