// sparse_decode (CUDA): input checks, the tensors (contiguity, slack, workspace, output), then the kernel:
// v7 (decode_v7.cuh, decode_v7_launch.cuh) for fp16 / bf16, every G, D in {64, 128, 256}, fp8 values and
// device-side lengths; the older v4 / v5 / v6 (plan.h) by name, and v4 for float32. merge.cuh merges.
#include "ops.h"
#include "plan.h"
#include "decode_v7_launch.cuh"

#include "../mf_check.h"

namespace mustafar_cuda {

static void check_cuda_tensor(const at::Tensor& t, const char* name) {
  MF_CHECK(t.defined(), "mustafar (CUDA): ", name, " is undefined");
  MF_CHECK(t.is_cuda(), "mustafar (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
}

// rows must have a contiguous last dim and T stride == C; leading dims may be strided
static at::Tensor rows_ok(const at::Tensor& t) {
  const int64_t C = t.size(3);
  const bool ok = (t.stride(3) == 1 || t.size(3) <= 1) && (t.stride(2) == C || t.size(2) <= 1);
  return ok ? t : t.contiguous();
}


// A value tensor v7 reads with 16-byte aligned loads up to 15 bytes before a row and 15 after: give it >= 32 readable
// bytes after its last element and a 16-byte aligned storage start (a copy otherwise; the cache allocates the
// slack itself).
static at::Tensor with_slack(const at::Tensor& t) {
  if (t.numel() == 0) return t;
  const int64_t isz = t.element_size();
  int64_t last = 0;
  for (int d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const int64_t end = (t.storage_offset() + last + 1) * isz;
  const int64_t have = (int64_t)t.storage().nbytes();
  const bool base16 = reinterpret_cast<uintptr_t>(t.storage().data()) % 16 == 0;
  if (have - end >= 32 && base16) return t;
  at::Tensor buf = at::empty({t.numel() * isz + 32}, t.options().dtype(at::kByte));
  at::Tensor out = buf.narrow(0, 0, t.numel() * isz).view(t.scalar_type()).view(t.sizes());
  out.copy_(t);
  return out;
}

at::Tensor sparse_decode_cuda(const at::Tensor& q_in, const at::Tensor& k_bitmap_in, const at::Tensor& k_values_in,
                              const at::Tensor& v_bitmap_in, const at::Tensor& v_values_in,
                              const at::Tensor& k_window_in, const at::Tensor& v_window_in,
                              const std::optional<at::Tensor>& kv_start_in, double scale,
                              const std::optional<at::Tensor>& k_scale_in, const std::optional<at::Tensor>& v_scale_in,
                              const std::optional<at::Tensor>& lengths_in, c10::string_view kernel, bool pdl) {
  const char* op = "mustafar.sparse_decode (CUDA): ";
  const bool named_v7 = kernel == "v7" || kernel == "v7g";
  const DecodeKernel requested = named_v7 ? DecodeKernel::kAuto : parse_decode_kernel(kernel, op);
  check_cuda_tensor(q_in, "q");
  check_cuda_tensor(k_bitmap_in, "k_bitmap");
  check_cuda_tensor(k_values_in, "k_values");
  check_cuda_tensor(v_bitmap_in, "v_bitmap");
  check_cuda_tensor(v_values_in, "v_values");
  check_cuda_tensor(k_window_in, "k_window");
  check_cuda_tensor(v_window_in, "v_window");
  const auto dt = q_in.scalar_type();
  MF_CHECK_VALUE(dt == at::kHalf || dt == at::kBFloat16 || dt == at::kFloat, "mustafar (CUDA): q.dtype=", dt,
                 " (expected float16, bfloat16 or float32)");
  MF_CHECK_VALUE(q_in.dim() == 3, op, "q must be [B, H_q, D], got ", q_in.sizes());
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  MF_CHECK_VALUE(D == 64 || D == 128 || D == 256, op, "head_dim D=", D, " must be 64, 128 or 256");
  const int64_t W = D / 64;
  MF_CHECK_VALUE(k_bitmap_in.dim() == 4 && v_bitmap_in.dim() == 4, op, "bitmaps must be [B, H_kv, T_c, W]");
  MF_CHECK_VALUE(k_bitmap_in.scalar_type() == at::kLong && v_bitmap_in.scalar_type() == at::kLong, op,
                 "bitmaps must be int64");
  const int64_t Hkv = k_bitmap_in.size(1), Tc = k_bitmap_in.size(2);
  MF_CHECK_VALUE(k_bitmap_in.size(0) == B && k_bitmap_in.size(3) == W, op, "k_bitmap shape ", k_bitmap_in.sizes(),
                 " does not match q ", q_in.sizes());
  MF_CHECK_VALUE(v_bitmap_in.sizes() == k_bitmap_in.sizes(), op, "v_bitmap shape ", v_bitmap_in.sizes(),
                 " != k_bitmap shape ", k_bitmap_in.sizes());
  MF_CHECK_VALUE(Hkv > 0 && Hq % Hkv == 0, op, "H_q=", Hq, " is not a multiple of H_kv=", Hkv);
  const int64_t G = Hq / Hkv;
  const bool K8 = k_values_in.scalar_type() == at::kFloat8_e4m3fn, V8 = v_values_in.scalar_type() == at::kFloat8_e4m3fn;
  const bool has_len = lengths_in.has_value() && lengths_in->defined();
  for (const at::Tensor* t : {&k_values_in, &v_values_in, &k_window_in, &v_window_in}) {
    const bool f8 = t->scalar_type() == at::kFloat8_e4m3fn && (t == &k_values_in || t == &v_values_in);
    MF_CHECK_VALUE(f8 || t->scalar_type() == dt, op, "K/V dtype ", t->scalar_type(), " != q.dtype ", dt);
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
  MF_CHECK_VALUE(Tc + Tw < (1LL << 30), op, "sequence too long: ", Tc + Tw);
  MF_CHECK_VALUE(K8 == (k_scale_in.has_value() && k_scale_in->defined()), op, "k_scale must be given iff k_values is float8_e4m3fn");
  MF_CHECK_VALUE(V8 == (v_scale_in.has_value() && v_scale_in->defined()), op, "v_scale must be given iff v_values is float8_e4m3fn");
  // "auto": v6 wherever it serves (plan.h: fp16 / bf16 model, G <= 8, D 64 / 128, k <= 64, 16-bit values or e4m3 on
  // both sides, host or device lengths); v7 for what v6 does not serve among fp8 values, device lengths, D = 256
  // and an odd G (3, 5, 7 with k > 64: v5 walks such a row once per query head); otherwise the rest of plan.cu's
  // rule (v5 / v4). Named "v6" / "v6g" take device lengths and e4m3 values on both sides too, "v6k" device lengths.
  const bool v6_ok = v6_serves(dt, G, D, kk, kv) && K8 == V8;
  const bool is_auto = requested == DecodeKernel::kAuto;
  const bool named_v6 = is_v6(requested);
  const bool odd_g = G > 1 && G % 2 == 1;
  const bool want_v7 = named_v7 || (is_auto && !v6_ok && (K8 || V8 || has_len || D == 256 || odd_g));
  const bool use_v7 = want_v7 && dt != at::kFloat;
  const bool v6_16 = requested == DecodeKernel::kV6k;  // 16-bit values only
  const bool v6_f8 = ((named_v6 && !v6_16) || (is_auto && v6_ok)) && K8 && V8;
  MF_CHECK_VALUE(use_v7 || ((v6_f8 || (!K8 && !V8)) && (!has_len || named_v6 || (is_auto && v6_ok))), op,
                 "kernel=", kernel, " with dtype ", dt, K8 ? " and e4m3 K values" : "", V8 ? " and e4m3 V values" : "",
                 ": fp8 values need kernel 'auto', 'v7' or 'v7g' (or 'v6' / 'v6g' with e4m3 on both sides), device "
                 "lengths 'auto', 'v7', 'v7g' or the v6 family, and both a float16 / bfloat16 model");
  c10::cuda::CUDAGuard guard(q_in.device());

  at::Tensor ks;
  if (kv_start_in.has_value() && kv_start_in->defined()) {
    check_cuda_tensor(*kv_start_in, "kv_start");
    MF_CHECK_VALUE(kv_start_in->dim() == 1 && kv_start_in->size(0) == B, op, "kv_start shape ", kv_start_in->sizes(),
                   " != [", B, "]");
    MF_CHECK_VALUE(kv_start_in->scalar_type() == at::kInt || kv_start_in->scalar_type() == at::kLong, op,
                   "kv_start.dtype=", kv_start_in->scalar_type(), " (expected int32)");
    ks = kv_start_in->to(at::kInt).contiguous();
  }
  at::Tensor len;
  if (has_len) {
    check_cuda_tensor(*lengths_in, "lengths");
    MF_CHECK_VALUE(lengths_in->scalar_type() == at::kInt && lengths_in->numel() == 2, op,
                   "lengths must be int32 [2] (n_c, n_w)");
    MF_CHECK_VALUE(Tw >= 1, op, "lengths given but the window ring has no rows");
    len = lengths_in->contiguous();
  }
  auto q = q_in.contiguous();
  auto kb = rows_ok(k_bitmap_in), vb = rows_ok(v_bitmap_in);
  auto kvals = rows_ok(k_values_in), vvals = rows_ok(v_values_in);
  auto win_ok = [&](const at::Tensor& t) {
    if (t.stride(3) != 1 && t.size(3) > 1) return false;
    if (t.element_size() >= 4 || t.numel() == 0) return true;
    bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
    for (int d = 0; d < 3; ++d) ok = ok && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
    return ok;
  };
  auto kw = win_ok(k_window_in) ? k_window_in : k_window_in.contiguous();
  auto vw = win_ok(v_window_in) ? v_window_in : v_window_in.contiguous();

  const bool poison = poison_outputs();
  at::Tensor out = poison ? at::full({B, Hq, D}, std::numeric_limits<float>::quiet_NaN(), q.options())
                          : at::empty({B, Hq, D}, q.options());
  if (B == 0 || Hq == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();

  // fp16 row scales of e4m3 values [B, H_kv, T_c], rows contiguous
  auto row_scales = [&](const at::Tensor& t, const char* name) {
    MF_CHECK_VALUE(t.scalar_type() == at::kHalf && t.dim() == 3 && t.size(0) == B && t.size(1) == Hkv &&
                       t.size(2) == Tc, op, name, " must be float16 [B, H_kv, T_c], got ", t.sizes());
    check_cuda_tensor(t, name);
    return t.stride(2) == 1 ? t : t.contiguous();
  };
  const at::Tensor k_sc = K8 ? row_scales(*k_scale_in, "k_scale") : at::Tensor();
  const at::Tensor v_sc = V8 ? row_scales(*v_scale_in, "v_scale") : at::Tensor();

  if (use_v7) {
    kvals = with_slack(kvals);
    vvals = with_slack(vvals);
    const int KC = (kernel != "v7g" && !K8 && !V8 && kk == kv && v7::compiled_k((int)D, (int)kk)) ? (int)kk : 0;
    const int64_t tiles_max = (Tc + 31) / 32 + (Tw + 31) / 32;
    if (tiles_max == 0) {
      out.zero_();
      return out;
    }
    const v7::Launch L = v7::plan(dt, (int)D, K8, V8, KC, B, Hkv, tiles_max, q.device().index());
    at::Tensor ws_o = poison ? at::full({B, Hq, L.NP, D}, std::numeric_limits<float>::quiet_NaN(), q.options().dtype(at::kFloat))
                             : at::empty({B, Hq, L.NP, D}, q.options().dtype(at::kFloat));
    at::Tensor ws_ml = at::empty({B, Hq, L.NP, 2}, q.options().dtype(at::kFloat));
    v7::Params p{};
    p.q = q.data_ptr();
    p.kbm = reinterpret_cast<const uint32_t*>(kb.data_ptr());
    p.vbm = reinterpret_cast<const uint32_t*>(vb.data_ptr());
    p.kval = reinterpret_cast<const uint8_t*>(kvals.data_ptr());
    p.vval = reinterpret_cast<const uint8_t*>(vvals.data_ptr());
    p.ksc = K8 ? reinterpret_cast<const __half*>(k_sc.data_ptr()) : nullptr;
    p.vsc = V8 ? reinterpret_cast<const __half*>(v_sc.data_ptr()) : nullptr;
    p.kwin = reinterpret_cast<const uint8_t*>(kw.data_ptr());
    p.vwin = reinterpret_cast<const uint8_t*>(vw.data_ptr());
    p.lengths = has_len ? len.data_ptr<int>() : nullptr;
    p.kv_start = ks.defined() ? ks.data_ptr<int>() : nullptr;
    p.ws_o = ws_o.data_ptr<float>();
    p.ws_ml = ws_ml.data_ptr<float>();
    p.kbm_sb = kb.stride(0); p.kbm_sh = kb.stride(1); p.vbm_sb = vb.stride(0); p.vbm_sh = vb.stride(1);
    p.kval_sb = kvals.stride(0); p.kval_sh = kvals.stride(1); p.vval_sb = vvals.stride(0); p.vval_sh = vvals.stride(1);
    if (K8) { p.ksc_sb = k_sc.stride(0); p.ksc_sh = k_sc.stride(1); }
    if (V8) { p.vsc_sb = v_sc.stride(0); p.vsc_sh = v_sc.stride(1); }
    p.kwin_sb = kw.stride(0); p.kwin_sh = kw.stride(1); p.vwin_sb = vw.stride(0); p.vwin_sh = vw.stride(1);
    p.Hq = (int)Hq; p.Hkv = (int)Hkv; p.G = (int)G; p.C = (int)Tc; p.R = (int)Tw;
    p.kk = (int)kk; p.kv = (int)kv;
    p.n_c_host = (int)Tc; p.n_w_host = (int)Tw;
    p.qscale = (float)(scale * 1.4426950408889634);
    v7::launch(L, p, dt, (int)D, B, out.data_ptr(), stream, pdl);
    return out;
  }

  MF_CHECK_VALUE(D == 64 || D == 128, op, "kernel=", kernel, ": head_dim D=", D, " needs kernel 'auto' / 'v7' (64, 128 here)");
  const int64_t T = Tc + Tw;
  auto al16 = [&](const at::Tensor& t) {
    const int64_t isz = t.element_size();
    return (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0) && ((t.stride(0) * isz) % 16 == 0 || t.size(0) <= 1) &&
           ((t.stride(1) * isz) % 16 == 0 || t.size(1) <= 1);
  };
  const bool vec16 = (kvals.numel() == 0 || al16(kvals)) && (vvals.numel() == 0 || al16(vvals));
  const DecodeProblem pr{dt, B, Hkv, G, D, Tc, Tw, kk, kv, vec16, v6_f8, has_len};
  resolve_decode_kernel(pr, requested, op);  // a named kernel that cannot serve the problem raises, T = 0 or not
  if (T == 0) {
    out.zero_();
    return out;
  }
  const DecodePlan plan = plan_decode(pr, requested, q.device().index(), op);
  const int NP = plan.NP;
  at::Tensor ws_o = poison ? at::full({B, Hq, NP, D}, std::numeric_limits<float>::quiet_NaN(), q.options().dtype(at::kFloat))
                           : at::empty({B, Hq, NP, D}, q.options().dtype(at::kFloat));
  at::Tensor ws_ml = at::empty({B, Hq, NP, 2}, q.options().dtype(at::kFloat));

  SDParams p{};
  p.q = q.data_ptr();
  p.kbm = kb.data_ptr<int64_t>();
  p.vbm = vb.data_ptr<int64_t>();
  p.kval = kvals.data_ptr();
  p.vval = vvals.data_ptr();
  p.kwin = kw.data_ptr();
  p.vwin = vw.data_ptr();
  p.kv_start = ks.defined() ? ks.data_ptr<int>() : nullptr;
  p.lengths = has_len ? len.data_ptr<int>() : nullptr;  // v6 only: the capacities Tc / Tw below bound them
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
  if (v6_f8) {
    p.kscale = reinterpret_cast<const __half*>(k_sc.data_ptr());
    p.vscale = reinterpret_cast<const __half*>(v_sc.data_ptr());
    p.ksc_sb = k_sc.stride(0); p.ksc_sh = k_sc.stride(1); p.vsc_sb = v_sc.stride(0); p.vsc_sh = v_sc.stride(1);
  }
  p.vec16 = vec16 ? 1 : 0;
  p.qscale = (float)(scale * 1.4426950408889634);
  launch_decode(plan, p, dt, D, out.data_ptr(), B * Hq, stream, pdl);
  return out;
}

}  // namespace mustafar_cuda
