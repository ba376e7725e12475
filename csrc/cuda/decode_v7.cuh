#pragma once
// v7: the fused decode kernel for every configuration the cache accepts (issue #15): G = H_q / H_kv in
// 1..8, D in {64, 128, 256}, any k (runtime; or compiled in for the hot (D, k) pairs), fp16 / bf16 models,
// fp16 / bf16 / e4m3 stored values per side (+ one fp16 scale per token vector), lengths read from device
// memory (CUDA graphs: one launch shape for every step) and the dense window as a ring buffer.
//
// Work split: one warp owns a 32-token tile at a time, one lane per token (row); the 4 warps of a CTA are
// independent (no __syncthreads after the prologue). A tile is either compressed (rows [32 i, 32 i + 32) of
// the store) or dense (window rows). For a compressed tile each lane loads its K and V rows (bitmap words and
// the values of both sides, every load of a row issued before the first is used: one memory round trip per
// row, the warp's next tile prefetched into L2 meanwhile) straight into registers and *scatters* them into a
// per-warp dense tile in shared memory with a fixed-step walk over the set bits (the walk of v6 / the
// prototypes: k steps for every lane, a queue of the remaining 32-bit words, so the loop is the same for
// all lanes and values are indexed statically); a window tile is copied densely. Then both products run on
// tensor cores with the query heads as the N = 8 columns of mma.m16n8k16 (S^T = K Q^T, O^T += V^T P^T), so
// G = 8 costs what G = 1 costs; online softmax per head; per-warp partials (m, l, o) merged by merge.cuh.
//
// FP8 values: converted pairwise to fp16 on the scatter (the dense tile of an fp8 side is fp16, also for
// bf16 models: e4m3 is exact in fp16; q is converted to fp16 for an fp8 K side); the K scale multiplies the
// token's score, the V scale its probability in P^T.
//
// Rows whose bitmap the fast walk cannot take (popcount != k, or an empty 32-bit word) send the whole tile
// to a per-lane generic walk (values re-read one by one); rows past the visible length or before kv_start
// are masked (score -inf, probability 0); lanes past the tile's last row read that row again (finite data).
//
// Memory contract: value buffers are read with aligned 16-byte loads, up to 15 bytes before a row and up to 15 bytes
// past its end (sparse_decode.cu with_slack: the op copies a value tensor with less than 32 readable bytes after it
// or a storage start that is not 16-byte aligned).
#include "common.cuh"

namespace mustafar_cuda {
namespace v7 {

constexpr int kWarps = 4;

struct Params {
  const void* q;                       // [B, Hq, D] contiguous (model dtype)
  const uint32_t* kbm;                 // int64 bitmap words as u32 pairs; rows contiguous (2W u32)
  const uint32_t* vbm;
  const uint8_t* kval;                 // stored values, ES bytes each, rows contiguous (kk values)
  const uint8_t* vval;
  const __half* ksc;                   // [.., C] fp16 per token vector (fp8 sides) or null
  const __half* vsc;
  const uint8_t* kwin;                 // window ring [.., R, D] (model dtype), rows contiguous
  const uint8_t* vwin;
  const int* lengths;                  // device (n_c, n_w) or null (then n_c_host / n_w_host, ring base 0)
  const int* kv_start;                 // [B] or null
  float* ws_o;                         // [B, Hq, NP, D]
  float* ws_ml;                        // [B, Hq, NP, 2]
  // strides over (b, h) in elements of each tensor (int64 words for the bitmaps)
  int64_t kbm_sb, kbm_sh, vbm_sb, vbm_sh, kval_sb, kval_sh, vval_sb, vval_sh;
  int64_t ksc_sb, ksc_sh, vsc_sb, vsc_sh, kwin_sb, kwin_sh, vwin_sb, vwin_sh;
  int Hq, Hkv, G, C, R, kk, kv;       // C: store rows (capacity), R: window ring rows
  int n_c_host, n_w_host;
  int NS, NP;
  float qscale;                        // softmax scale * log2(e)
};

template <int D>
struct Layout {
  static constexpr int NW32 = D / 32;        // 32-bit bitmap words per row
  static constexpr int TRS = (D + 8) * 2;     // dense tile row stride (bytes): conflict-free ldmatrix
  static constexpr int TILE = 32 * TRS;
  static constexpr int PTS = 80;             // P^T table row stride (bytes): 32 halves + 16 B pad
  static constexpr int WBYTES = 2 * TILE + 8 * PTS;
  static constexpr int SMEM = kWarps * WBYTES;
};

__device__ __forceinline__ uint32_t v7_bfind(uint32_t x) { uint32_t r; asm("bfind.u32 %0, %1;" : "=r"(r) : "r"(x)); return r; }
__device__ __forceinline__ void v7_sts16(uint32_t a, uint32_t v) { asm volatile("st.shared.u16 [%0], %1;" ::"r"(a), "h"((unsigned short)v) : "memory"); }
__device__ __forceinline__ void v7_sts32(uint32_t a, uint32_t v) { asm volatile("st.shared.u32 [%0], %1;" ::"r"(a), "r"(v) : "memory"); }
__device__ __forceinline__ void v7_sts128(uint32_t a, uint32_t x, uint32_t y, uint32_t z, uint32_t w) {
  asm volatile("st.shared.v4.u32 [%0], {%1,%2,%3,%4};" ::"r"(a), "r"(x), "r"(y), "r"(z), "r"(w) : "memory");
}
__device__ __forceinline__ void v7_prefetch_l2(const void* g) { asm volatile("prefetch.global.L2 [%0];" ::"l"(g)); }
__device__ __forceinline__ uint32_t v7_lds32(uint32_t a) { uint32_t v; asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a) : "memory"); return v; }
__device__ __forceinline__ void v7_ldsm_x4(uint32_t a, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
__device__ __forceinline__ void v7_ldsm_x4_t(uint32_t a, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];" : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a) : "memory");
}
template <typename T16>
__device__ __forceinline__ void v7_mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<T16, __half>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]) : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}
template <typename T16>
__device__ __forceinline__ float v7_u16f(uint32_t u) {
  if constexpr (std::is_same<T16, __half>::value) return __half2float(__ushort_as_half((unsigned short)u));
  else return __uint_as_float(u << 16);
}
template <typename T16>
__device__ __forceinline__ uint32_t v7_f16bits(float x) {
  if constexpr (std::is_same<T16, __half>::value) return __half_as_ushort(__float2half_rn(x));
  else return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

// Fixed-step walk over the set bits of NW words (ascending channel). next() returns the shared-memory address
// row + 2 * channel of the next stored value; the queue shift (NW - 1 selects) keeps the loop identical for
// every lane. Needs every word nonzero and exactly as many steps as set bits (checked before: walk_ok).
template <int NW>
struct Walk {
  uint32_t w, n[NW > 1 ? NW - 1 : 1], adj;
  __device__ __forceinline__ void init(const uint32_t (&wd)[NW], uint32_t row) {
    w = wd[0];
#pragma unroll
    for (int i = 0; i + 1 < NW; ++i) n[i] = wd[i + 1];
    adj = row;
  }
  __device__ __forceinline__ uint32_t next() {
    const uint32_t wn = w & (w - 1u);
    const uint32_t a = adj + 2u * v7_bfind(w ^ wn);
    const bool p = wn != 0u;
    w = p ? wn : n[0];
#pragma unroll
    for (int i = 0; i + 1 < NW - 1; ++i) n[i] = p ? n[i] : n[i + 1];
    adj = p ? adj : adj + 64u;
    return a;
  }
};

template <int NW>
__device__ __forceinline__ bool walk_ok(const uint32_t (&wd)[NW], int k) {
  int n = 0;
  bool nz = true;
#pragma unroll
  for (int i = 0; i < NW; ++i) { n += __popc(wd[i]); nz = nz && wd[i] != 0u; }
  return nz && n == k;
}

template <int NW>
__device__ __forceinline__ void load_words(const uint32_t* g, uint32_t (&wd)[NW]) {
  if constexpr (NW % 4 == 0) {
#pragma unroll
    for (int i = 0; i < NW / 4; ++i) {
      const uint4 a = __ldg(reinterpret_cast<const uint4*>(g) + i);
      wd[4 * i] = a.x; wd[4 * i + 1] = a.y; wd[4 * i + 2] = a.z; wd[4 * i + 3] = a.w;
    }
  } else {
    const uint2 a = __ldg(reinterpret_cast<const uint2*>(g));
    wd[0] = a.x; wd[1] = a.y;
  }
}

// Stored values are read in groups of up to GV values per row: every word of a group is loaded before the first
// of them is used (one memory round trip per group; a row of k <= GV values is one group, and K and V groups are
// in flight together). GV: 48 values at D = 128 (the paper's 70 % in one trip, 50 % in two; a group holds up to
// 3 words of lead-in before its first value: registers), 32 at D = 64 (50 % and sparser in one trip) and at
// D = 256 (two or three trips).
template <int D>
struct Group {
  static constexpr int GV = D == 128 ? 48 : 32;
};
template <int D, int ES>
struct GroupWords {
  static constexpr int N = Group<D>::GV * ES / 4 + 1;  // + 1: the row may start mid-word
};

// The words holding n values (n <= GV; n <= 0: none) of ES bytes at byte address `row` (r[i] = the 32-bit word at
// (row & ~3) + 4 i), read with 16-byte aligned loads and realigned to the row's first word with two selects per
// word. 16-byte loads, not 4-byte ones: timed on an H100 (results/kernel_h100.json, the 48-shape quick profile),
// they were as fast or faster on every shape (1.0-1.6x at 50 %: fewer load instructions and L1 wavefronts; the
// L2 traffic was the same: kernel_notes.md, session 10). Reads start up to 15 bytes before the row (inside the
// tensor's 16-byte aligned storage) and end at most 15 bytes after its last value (the slack contract).
template <int NWD, int ES>
__device__ __forceinline__ void load_row(const uint8_t* row, int n, uint32_t (&r)[NWD]) {
  constexpr int NC = (NWD + 6) / 4;  // 16-byte chunks: NWD words + up to 3 words of offset
  const uintptr_t a = reinterpret_cast<uintptr_t>(row);
  const uint4* g = reinterpret_cast<const uint4*>(a & ~(uintptr_t)15);
  const uint32_t q = (uint32_t)(a >> 2) & 3u;  // the row's first word within its 16 bytes
  const int nbytes = n > 0 ? (int)(a & 15u) + n * ES : 0;
  uint32_t w[4 * NC];
#pragma unroll
  for (int c = 0; c < NC; ++c) {
    uint4 x = make_uint4(0u, 0u, 0u, 0u);
    if (16 * c < nbytes) x = __ldg(g + c);
    w[4 * c] = x.x; w[4 * c + 1] = x.y; w[4 * c + 2] = x.z; w[4 * c + 3] = x.w;
  }
  uint32_t x1[NWD + 2];  // shifted by q & 1
#pragma unroll
  for (int j = 0; j < NWD + 2; ++j) x1[j] = (q & 1u) ? w[j + 1] : w[j];
#pragma unroll
  for (int i = 0; i < NWD; ++i) r[i] = (q & 2u) ? x1[i + 2] : x1[i];
}

// Scatter n (<= GV) loaded values through the walk: four values (two 16-bit pairs) per step of the outer loop;
// fp16 / bf16 values are funnel-shifted out of the loaded words, e4m3 pairs converted to fp16.
template <int NW, int ES, int NWD, int GV>
__device__ __forceinline__ void scatter_group(Walk<NW>& wk, const uint32_t (&r)[NWD], uint32_t sh, int n) {
  const uint32_t s8 = 8u * sh;
#pragma unroll
  for (int j = 0; j < GV / 4; ++j) {
    if (4 * j >= n) break;
    uint32_t p0, p1;
    if constexpr (ES == 2) {
      p0 = __funnelshift_r(r[2 * j], r[2 * j + 1], s8);
      p1 = __funnelshift_r(r[2 * j + 1], r[2 * j + 2], s8);
    } else {
      const uint32_t a = __funnelshift_r(r[j], r[j + 1], s8);
      p0 = e4m3x2_to_h2(a);
      p1 = e4m3x2_to_h2(a >> 16);
    }
    if (4 * j + 4 <= n) {
      v7_sts16(wk.next(), p0);
      v7_sts16(wk.next(), p0 >> 16);
      v7_sts16(wk.next(), p1);
      v7_sts16(wk.next(), p1 >> 16);
    } else {
      v7_sts16(wk.next(), p0);
      if (4 * j + 1 < n) v7_sts16(wk.next(), p0 >> 16);
      if (4 * j + 2 < n) v7_sts16(wk.next(), p1);
    }
  }
}

// Generic per-lane walk (any bitmap): the first min(popcount, k) set bits, values read one by one.
template <int NW, int ES>
__device__ __forceinline__ void scatter_generic(const uint32_t (&wd)[NW], const uint8_t* vrow, int k, uint32_t trow) {
  int j = 0;
#pragma unroll
  for (int i = 0; i < NW; ++i) {  // unrolled: the words stay in registers
    uint32_t w = wd[i];
#pragma unroll 1
    while (w != 0u && j < k) {
      const uint32_t wn = w & (w - 1u);
      uint32_t u;
      if constexpr (ES == 2) u = reinterpret_cast<const unsigned short*>(vrow)[j];
      else u = e4m3x2_to_h2(vrow[j]) & 0xffffu;
      v7_sts16(trow + 2u * (32u * i + v7_bfind(w ^ wn)), u);
      w = wn;
      ++j;
    }
  }
}

// Copy one dense window row (model dtype TM) into a tile row of type TT.
template <int D, typename TM, typename TT>
__device__ __forceinline__ void copy_dense_row(const uint8_t* g, uint32_t trow) {
  const uint4* s = reinterpret_cast<const uint4*>(g);
#pragma unroll
  for (int c = 0; c < D * 2 / 16; ++c) {
    uint4 x = __ldg(s + c);
    if constexpr (!std::is_same<TM, TT>::value) {  // bf16 window -> fp16 tile (fp8 side of a bf16 model)
      uint32_t* u = reinterpret_cast<uint32_t*>(&x);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float lo = __uint_as_float(u[i] << 16), hi = __uint_as_float(u[i] & 0xffff0000u);
        __half2 h = __floats2half2_rn(lo, hi);
        u[i] = *reinterpret_cast<uint32_t*>(&h);
      }
    }
    v7_sts128(trow + 16 * c, x.x, x.y, x.z, x.w);
  }
}

template <int D>
__device__ __forceinline__ void zero_row(uint32_t trow) {
#pragma unroll
  for (int c = 0; c < D * 2 / 16; ++c) v7_sts128(trow + 16 * c, 0u, 0u, 0u, 0u);
}

template <int D, typename TM, bool K8, bool V8, int KC>
__global__ void __launch_bounds__(kWarps * 32) decode_kernel(const Params p) {
  using L = Layout<D>;
  using TK = typename std::conditional<K8, __half, TM>::type;  // dense tile types
  using TV = typename std::conditional<V8, __half, TM>::type;
  constexpr int NW = L::NW32;
  constexpr int KES = K8 ? 1 : 2, VES = V8 ? 1 : 2;
  extern __shared__ __align__(16) uint8_t smem[];
  mf_pdl_launch_dependents();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const uint32_t wbase = (uint32_t)__cvta_generic_to_shared(smem) + warp * L::WBYTES;
  const uint32_t ktile = wbase, vtile = wbase + L::TILE, ptab = wbase + 2 * L::TILE;
  const TM* q = reinterpret_cast<const TM*>(p.q) + ((int64_t)b * p.Hq + (int64_t)hk * p.G) * D;

  // Q^T as the mma's B fragments (8 columns = heads; heads >= G are 0), in the K tile's type
  uint32_t qb[D / 16][2];
  {
    const int h = lane >> 2;
#pragma unroll
    for (int kb = 0; kb < D / 16; ++kb) {
      const int c0 = kb * 16 + 2 * (lane & 3);
      float x0 = 0.f, x1 = 0.f, x2 = 0.f, x3 = 0.f;
      if (h < p.G) {
        const unsigned short* qq = reinterpret_cast<const unsigned short*>(q) + h * D;
        x0 = v7_u16f<TM>(qq[c0]) * p.qscale; x1 = v7_u16f<TM>(qq[c0 + 1]) * p.qscale;
        x2 = v7_u16f<TM>(qq[c0 + 8]) * p.qscale; x3 = v7_u16f<TM>(qq[c0 + 9]) * p.qscale;
      }
      qb[kb][0] = pack2<TK>(x0, x1); qb[kb][1] = pack2<TK>(x2, x3);
    }
  }
  for (int i = lane; i < 8 * L::PTS / 4; i += 32) v7_sts32(ptab + 4 * i, 0u);

  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  float o[D / 16][4];
#pragma unroll
  for (int i = 0; i < D / 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;

  int n_c, n_w;
  if (p.lengths != nullptr) {  // clamped to the capacities (bad lengths give a wrong answer, never a fault)
    n_c = min(max(__ldg(p.lengths), 0), p.C);
    n_w = min(max(__ldg(p.lengths + 1), 0), p.R);
  } else {
    n_c = p.n_c_host;
    n_w = p.n_w_host;
  }
  const int base = p.lengths != nullptr ? n_c % p.R : 0;  // ring slot of window row 0
  const int kvs = p.kv_start != nullptr ? __ldg(p.kv_start + b) : 0;
  const int NTc = (n_c + 31) >> 5, NT = NTc + ((n_w + 31) >> 5);
  const int tps = (NT + p.NS - 1) / p.NS;
  const int t_beg = split * tps, t_end = min(NT, t_beg + tps);
  const uint32_t krow = ktile + lane * L::TRS, vrow = vtile + lane * L::TRS;
  __syncwarp();

  for (int ti = t_beg + warp; ti < t_end; ti += kWarps) {
    const bool comp = ti < NTc;
    const int r0 = comp ? ti * 32 : (ti - NTc) * 32;      // first row (store row / window row)
    const int nrows = min(32, (comp ? n_c : n_w) - r0);
    const int r = r0 + min(lane, nrows - 1);               // the row this lane reads (clamped)
    const int pos = (comp ? 0 : n_c) + r0 + lane;           // absolute position of the lane's token
    const bool valid = lane < nrows && pos >= kvs;
    {  // the warp's next compressed tile into L2 now, so that its loads wait on L2 rather than on DRAM
      const int tn = ti + kWarps;
      if (tn < t_end && tn < NTc) {
        const int rn = min(tn * 32 + lane, n_c - 1);
        v7_prefetch_l2(p.kbm + 2 * ((int64_t)b * p.kbm_sb + (int64_t)hk * p.kbm_sh + (int64_t)rn * (D / 64)));
        v7_prefetch_l2(p.vbm + 2 * ((int64_t)b * p.vbm_sb + (int64_t)hk * p.vbm_sh + (int64_t)rn * (D / 64)));
        const uint8_t* kn = p.kval + ((int64_t)b * p.kval_sb + (int64_t)hk * p.kval_sh + (int64_t)rn * p.kk) * KES;
        const uint8_t* vn = p.vval + ((int64_t)b * p.vval_sb + (int64_t)hk * p.vval_sh + (int64_t)rn * p.kv) * VES;
        v7_prefetch_l2(kn);
        v7_prefetch_l2(kn + max(p.kk * KES - 1, 0));
        v7_prefetch_l2(vn);
        v7_prefetch_l2(vn + max(p.kv * VES - 1, 0));
      }
    }
    float ks = 1.f, vs = 1.f;
    if (comp) {
      const int64_t bk = (int64_t)b * p.kbm_sb + (int64_t)hk * p.kbm_sh + (int64_t)r * (D / 64);
      const int64_t bv = (int64_t)b * p.vbm_sb + (int64_t)hk * p.vbm_sh + (int64_t)r * (D / 64);
      uint32_t kw[NW], vw[NW];
      load_words<NW>(p.kbm + 2 * bk, kw);
      load_words<NW>(p.vbm + 2 * bv, vw);
      const uint8_t* kg = p.kval + ((int64_t)b * p.kval_sb + (int64_t)hk * p.kval_sh + (int64_t)r * p.kk) * KES;
      const uint8_t* vg = p.vval + ((int64_t)b * p.vval_sb + (int64_t)hk * p.vval_sh + (int64_t)r * p.kv) * VES;
      if constexpr (K8) ks = __half2float(p.ksc[(int64_t)b * p.ksc_sb + (int64_t)hk * p.ksc_sh + r]);
      if constexpr (V8) vs = __half2float(p.vsc[(int64_t)b * p.vsc_sb + (int64_t)hk * p.vsc_sh + r]);
      // issue every load of the row's first group (both sides) before any of it is used
      constexpr int GV = Group<D>::GV, NWK = GroupWords<D, KES>::N, NWV = GroupWords<D, VES>::N;
      const int kk = KC > 0 ? KC : p.kk, kv = KC > 0 ? KC : p.kv;
      // byte offset of a row in its word: the same for every group (GV * ES % 4 == 0)
      const uint32_t shk = (uint32_t)(reinterpret_cast<uintptr_t>(kg) & 3u), shv = (uint32_t)(reinterpret_cast<uintptr_t>(vg) & 3u);
      uint32_t rk[NWK], rv[NWV];
      load_row<NWK, KES>(kg, min(GV, kk), rk);
      load_row<NWV, VES>(vg, min(GV, kv), rv);
      zero_row<D>(krow);
      zero_row<D>(vrow);
      const bool ok = walk_ok<NW>(kw, kk) && walk_ok<NW>(vw, kv);
      if (__all_sync(0xffffffffu, ok)) {
        Walk<NW> wkk, wkv;
        wkk.init(kw, krow);
        wkv.init(vw, vrow);
        const int kmax = max(kk, kv);
#pragma unroll(KC > 0 ? 4 : 1)
        for (int g0 = 0; g0 < kmax; g0 += GV) {
          if (g0 > 0) {  // later groups (k > GV)
            load_row<NWK, KES>(kg + g0 * KES, min(GV, kk - g0), rk);
            load_row<NWV, VES>(vg + g0 * VES, min(GV, kv - g0), rv);
          }
          scatter_group<NW, KES, NWK, GV>(wkk, rk, shk, min(GV, kk - g0));
          scatter_group<NW, VES, NWV, GV>(wkv, rv, shv, min(GV, kv - g0));
        }
      } else {
        scatter_generic<NW, KES>(kw, kg, p.kk, krow);
        scatter_generic<NW, VES>(vw, vg, p.kv, vrow);
      }
    } else {
      const int slot = (base + r) % p.R;
      copy_dense_row<D, TM, TK>(p.kwin + ((int64_t)b * p.kwin_sb + (int64_t)hk * p.kwin_sh + (int64_t)slot * D) * 2, krow);
      copy_dense_row<D, TM, TV>(p.vwin + ((int64_t)b * p.vwin_sb + (int64_t)hk * p.vwin_sh + (int64_t)slot * D) * 2, vrow);
    }
    __syncwarp();
    // ---- S^T = K Q^T: st[mt][.]: token mt*16 + lane/4 (+8), heads 2(lane%4) + {0,1}
    float st[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      st[mt][0] = st[mt][1] = st[mt][2] = st[mt][3] = 0.f;
#pragma unroll
      for (int kb = 0; kb < D / 16; ++kb) {
        uint32_t a[4];
        const int tok = mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, ch = kb * 16 + (lane >> 4) * 8;
        v7_ldsm_x4(ktile + tok * L::TRS + ch * 2, a);
        v7_mma<TK>(st[mt], a, qb[kb][0], qb[kb][1]);
      }
    }
    // per token (i: token lane/4 + 8 i): mask and scales, from the token's lane
    float tsc[4], tvs[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = (lane >> 2) + 8 * i;
      const float a = __shfl_sync(0xffffffffu, valid ? ks : 0.f, tok);
      tvs[i] = V8 ? __shfl_sync(0xffffffffu, vs, tok) : 1.f;
      tsc[i] = a;  // 0: masked token
    }
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float s[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float x = st[i >> 1][(i & 1) * 2 + e];
        s[i] = tsc[i] != 0.f ? x * tsc[i] : -INFINITY;
      }
      float mx = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
      const float mn = fmaxf(m_run[e], mx);
      const float al = mn == -INFINITY ? 1.f : exp2f(m_run[e] - mn);
      float ls = 0.f;
      const int h = 2 * (lane & 3) + e;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float pr = s[i] == -INFINITY ? 0.f : exp2f(s[i] - mn);
        ls += pr;
        v7_sts16(ptab + h * L::PTS + 2 * ((lane >> 2) + 8 * i), v7_f16bits<TV>(pr * tvs[i]));
      }
      l_run[e] = l_run[e] * al + ls;
      m_run[e] = mn;
#pragma unroll
      for (int i2 = 0; i2 < D / 16; ++i2) { o[i2][e] *= al; o[i2][2 + e] *= al; }
    }
    __syncwarp();
    // ---- O^T += V^T P^T
    uint32_t pb[2][2];
#pragma unroll
    for (int k2 = 0; k2 < 2; ++k2) {
      const uint32_t a = ptab + (lane >> 2) * L::PTS + 2 * (k2 * 16 + 2 * (lane & 3));
      pb[k2][0] = v7_lds32(a); pb[k2][1] = v7_lds32(a + 16);
    }
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
#pragma unroll
      for (int k2 = 0; k2 < 2; ++k2) {
        uint32_t a[4];
        const int tok = k2 * 16 + ((lane >> 4) & 1) * 8 + (lane & 7), ch = mt * 16 + ((lane >> 3) & 1) * 8;
        v7_ldsm_x4_t(vtile + tok * L::TRS + ch * 2, a);
        v7_mma<TV>(o[mt], a, pb[k2][0], pb[k2][1]);
      }
    __syncwarp();
  }
  // ---- partials: O^T[ch = mt*16 + lane/4 (+8)][head = 2(lane%4) + {0,1}]
  const int part = split * kWarps + warp;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int h = 2 * (lane & 3) + e;
    float ll = l_run[e];
    ll += __shfl_xor_sync(0xffffffffu, ll, 4);
    ll += __shfl_xor_sync(0xffffffffu, ll, 8);
    ll += __shfl_xor_sync(0xffffffffu, ll, 16);
    if (h < p.G) {
      const int64_t bq = (int64_t)b * p.Hq + (int64_t)hk * p.G + h;
      float* w = p.ws_o + (bq * p.NP + part) * D;
      if (lane < 4) {
        p.ws_ml[(bq * p.NP + part) * 2] = ll > 0.f ? m_run[e] : -INFINITY;
        p.ws_ml[(bq * p.NP + part) * 2 + 1] = ll;
      }
#pragma unroll
      for (int mt = 0; mt < D / 16; ++mt) { w[mt * 16 + (lane >> 2)] = o[mt][e]; w[mt * 16 + 8 + (lane >> 2)] = o[mt][2 + e]; }
    }
  }
}

}  // namespace v7
}  // namespace mustafar_cuda
