// CPU kernel of append_decode (schema in csrc/mustafar.cpp, semantics in docs/design.md): one decode step of
// a preallocated cache layer, in place. The new token goes to ring slot n % R (n = n_c + n_w); the token
// e = n - local_window that leaves the window's most recent ones is pruned + encoded (prune_encode_topk,
// then quantize_row_fp8 for an FP8 side) into store row e; then (n_c, n_w) advance by the chunked
// schedule. The work is B*H rows: ATen copies around the prune_encode_topk kernel.
#include <ATen/ATen.h>

#include "common.h"
#include "cpu_ops.h"

#include <tuple>
#include <vector>

namespace mustafar {
namespace cpu {
namespace {

// Prune x [B, H, D] to values.size(3) entries per row, encode (and quantize where scale is given) into row e
// of bitmap [B, H, C, W], values [B, H, C, k] (and scale [B, H, C]).
void encode_row_into(const at::Tensor& x, const at::Tensor& bitmap, const at::Tensor& values,
                     const std::optional<at::Tensor>& scale, int64_t e) {
  const int64_t k = values.size(3);
  auto [bm, vals] = prune_encode_topk_cpu(x, k);  // [B, H, W], [B, H, k] in x's dtype
  bitmap.select(2, e).copy_(bm);
  if (!scale) {
    values.select(2, e).copy_(vals);
    return;
  }
  const int64_t rows = x.size(0) * x.size(1);
  auto vf = vals.to(at::kFloat).contiguous();
  auto q8 = at::empty({rows, k}, vals.options().dtype(at::kFloat8_e4m3fn));
  auto sc = at::empty({rows}, vals.options().dtype(at::kHalf));
  const float* vp = vf.const_data_ptr<float>();
  auto* qp = q8.mutable_data_ptr<c10::Float8_e4m3fn>();
  auto* sp = sc.mutable_data_ptr<at::Half>();
  for (int64_t r = 0; r < rows; ++r) sp[r] = quantize_row_fp8(vp + r * k, k, qp + r * k);
  values.select(2, e).copy_(q8.view({x.size(0), x.size(1), k}));
  scale->select(2, e).copy_(sc.view({x.size(0), x.size(1)}));
}

}  // namespace

void append_decode_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_window,
                       const at::Tensor& v_window, const at::Tensor& k_bitmap, const at::Tensor& k_values,
                       const at::Tensor& v_bitmap, const at::Tensor& v_values,
                       const std::optional<at::Tensor>& k_scale, const std::optional<at::Tensor>& v_scale,
                       const at::Tensor& lengths, int64_t local_window, int64_t chunk) {
  const char* op = "mustafar.append_decode: ";
  const int64_t L = local_window;
  MF_CHECK_VALUE(L >= 0, op, "local_window=", L, " must be >= 0");
  MF_CHECK_VALUE(chunk >= 1, op, "chunk=", chunk, " must be >= 1");
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&k, "k"}, {&v, "v"}, {&k_window, "k_window"},
                         {&v_window, "v_window"}, {&k_bitmap, "k_bitmap"}, {&k_values, "k_values"},
                         {&v_bitmap, "v_bitmap"}, {&v_values, "v_values"}}) {
    check_cpu(*t, name);
    MF_CHECK_VALUE(t->dim() == 4, op, name, " must have 4 dims, got shape ", t->sizes());
  }
  check_float(k_window, "k_window");
  const int64_t B = k_window.size(0), H = k_window.size(1), R = k_window.size(2), D = k_window.size(3);
  const int64_t W = check_head_dim(D);
  MF_CHECK_VALUE(R >= L + chunk + 1, op, "window ring of R=", R, " slots < local_window + chunk + 1 = ",
                 L + chunk + 1);
  const auto dt = k_window.scalar_type();
  const std::vector<int64_t> tok{B, H, 1, D};
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&v_window, "v_window"}, {&k, "k"}, {&v, "v"}}) {
    MF_CHECK_VALUE(t->scalar_type() == dt, op, name, ".dtype=", t->scalar_type(), " != k_window.dtype=", dt);
  }
  MF_CHECK_VALUE(v_window.sizes() == k_window.sizes(), op, "v_window shape ", v_window.sizes(),
                 " != k_window shape ", k_window.sizes());
  MF_CHECK_VALUE(k.sizes() == c10::IntArrayRef(tok) && v.sizes() == c10::IntArrayRef(tok), op, "k/v shapes ",
                 k.sizes(), " / ", v.sizes(), " must be ", c10::IntArrayRef(tok));
  MF_CHECK_VALUE(k_bitmap.scalar_type() == at::kLong && v_bitmap.scalar_type() == at::kLong, op,
                 "bitmaps must be int64, got ", k_bitmap.scalar_type(), " / ", v_bitmap.scalar_type());
  const int64_t C = k_bitmap.size(2);
  MF_CHECK_VALUE(k_bitmap.size(0) == B && k_bitmap.size(1) == H && k_bitmap.size(3) == W, op, "k_bitmap shape ",
                 k_bitmap.sizes(), " must be [", B, ", ", H, ", C, ", W, "]");
  MF_CHECK_VALUE(v_bitmap.sizes() == k_bitmap.sizes(), op, "v_bitmap shape ", v_bitmap.sizes(),
                 " != k_bitmap shape ", k_bitmap.sizes());
  for (auto [t, name] : {std::pair<const at::Tensor*, const char*>{&k_values, "k_values"}, {&v_values, "v_values"}}) {
    MF_CHECK_VALUE(t->size(0) == B && t->size(1) == H && t->size(2) == C && t->size(3) <= D, op, name, " shape ",
                   t->sizes(), " must be [", B, ", ", H, ", ", C, ", k] with k <= ", D);
  }
  const std::vector<int64_t> shape3{B, H, C};
  auto ksc = check_side(op, k_values, "k_values", k_scale, "k_scale", dt, shape3);
  auto vsc = check_side(op, v_values, "v_values", v_scale, "v_scale", dt, shape3);
  auto [nc, nw] = read_lengths(op, lengths, C, "C, the store's rows", L + chunk, "local_window + chunk");

  const int64_t n = nc + nw;
  k_window.select(2, n % R).copy_(k.select(2, 0));
  v_window.select(2, n % R).copy_(v.select(2, 0));
  const int64_t e = n - L;
  if (e >= 0 && e >= nc) {
    MF_CHECK_VALUE(e < C, op, "store row ", e, " is past the store capacity C=", C,
                   " (allocate at least the sequence length - local_window rows)");
    encode_row_into(k_window.select(2, e % R), k_bitmap, k_values, ksc, e);
    encode_row_into(v_window.select(2, e % R), v_bitmap, v_values, vsc, e);
  }
  nw += 1;
  if (nw > L + chunk) {
    nc += chunk;
    nw -= chunk;
  }
  auto a = lengths.accessor<int32_t, 1>();
  a[0] = static_cast<int32_t>(nc);
  a[1] = static_cast<int32_t>(nw);
}

}  // namespace cpu
}  // namespace mustafar
