#pragma once
// v5 fused sparse decode for fp16 / bf16 ("scatter" kernel; design and numbers in docs/kernel_notes.md).
//
// v4 (decode_v4.cuh) expands every row to D lanes and is bound by instruction issue (~88 warp
// instructions per K+V row pair). v5 spends work per *stored* value instead of per channel:
//
//   phase A  one thread per stored row (threads 0-63: K rows of the 64-row tile, 64-127: V rows).
//            The thread walks its row's bitmap (one FLO per value): when every row of the warp is a
//            complete top-k row with no empty 32-bit word, from both ends at once with the words in
//            registers (two independent chains; values 0.. and k-1.. at the same indices in all
//            lanes), else upward through a per-thread list of the nonzero words in shared memory:
//              K: gathers q at the channel and accumulates q.k (fp16: half2 FMA on value pairs, flushed
//                 to fp32 every 8 values; bf16: fp32) -> one score per row, no reductions;
//              V: scatters the value into a zeroed, channel-major dense tile Vd[channel][token].
//   phase B  all 4 warps: online softmax of the tile's scores (warp w owns tokens 16w..16w+15) and
//            O += P V on tensor cores (mma.m16n8k16, query heads padded to 16 rows, B fragments of V with
//            ldmatrix); then each warp zeroes the part of Vd it read.
//
// Splits over T, the per-warp partials and the merge kernel (merge.cuh) are the same as v4's; the 64-row
// CTA tile staging is v4's too (cta_tile.cuh).
// Value rows are staged with cp.async; how they are read depends on k (template VM):
//   kVmPair (k even): 32-bit loads of value pairs from contiguous rows (conflict-free when k/2 is odd);
//   kVmOct  (k % 8 == 0): rows copied to an odd number of 16-byte chunks, 128-bit loads (conflict-free);
//   kVmAny  (any k): 16-bit loads, fp32 math (the general path).
// Rows with fewer than k stored values (arbitrary masks) run the same loop: the exhausted walk points at
// a dummy slot (a zero q entry for K, a dummy line of Vd for V). The encoder writes zeros into unused
// value slots; the kernel relies on them being finite.

#include "common.cuh"
#include "cta_tile.cuh"

namespace mustafar_cuda {

constexpr int kLS = 144;                      // bytes per channel line of Vd: 64 tokens (128 B) + 16 B pad
constexpr int kScrStride = kWarps * 32 * 16;  // bytes between the walk-list entries of one thread
enum : int { kVmAny = 1, kVmPair = 2, kVmOct = 8 };

// v5's shared memory: the pipeline stages (Stage64Layout; value rows of kstride / vstride bytes), then the
// dense V tile, the tile's scores, q and the walk lists
struct V5Layout : Stage64Layout {
  int off_vd, off_s, off_q, off_scr;
};
struct V5Params : SDParams, V5Layout {};

// A walk yields, per call, the byte address of the slot of the row's next stored channel
// (adj + channel-in-word * STRIDE). Two directions: up (lowest channel first: values from index 0)
// and down (highest channel first: values from index k-1).
__device__ __forceinline__ uint32_t shr_clamped(uint32_t x, uint32_t n) {  // PTX shr clamps n >= 32 to 0
  uint32_t d;
  asm("shr.b32 %0, %1, %2;" : "=r"(d) : "r"(x), "r"(n));
  return d;
}
__device__ __forceinline__ uint32_t flo(uint32_t x) { return 31u - (uint32_t)__clz(x); }  // -1 for 0

// General walk (any pattern), upward: a per-thread list in shared memory of the nonzero words,
// refilled with one LDS.128 that also loads the next entry's address; an exhausted list sits on a
// sentinel (w = 0 -> channel -1) whose adj is one slot above a dummy slot.
struct ListWalk {
  uint32_t w, adj, nxt;
  const char* smem;
  template <int STRIDE>
  __device__ __forceinline__ uint32_t next() {
    if (w == 0u) {
      const uint4 e = *reinterpret_cast<const uint4*>(smem + nxt);
      w = e.x;
      adj = e.y;
      nxt = e.z;
    }
    const uint32_t wn = w & (w - 1u);
    const uint32_t a = adj + flo(w ^ wn) * (uint32_t)STRIDE;
    w = wn;
    return a;
  }
};

template <int NW, int STRIDE>
__device__ __forceinline__ ListWalk build_list_walk(const char* smem, uint32_t scr_base, const uint32_t (&wd)[NW],
                                                    bool valid, uint32_t addr_ch0, uint32_t dummy) {
  char* sm = const_cast<char*>(smem);
  uint32_t n = 0;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const uint32_t w = valid ? wd[i] : 0u;
    const uint32_t at = scr_base + n * (uint32_t)kScrStride;
    *reinterpret_cast<uint4*>(sm + at) =
        make_uint4(w, addr_ch0 + (uint32_t)(32 * i * STRIDE), at + (uint32_t)kScrStride, 0u);
    n += (w != 0u) ? 1u : 0u;
  }
  const uint32_t at = scr_base + n * (uint32_t)kScrStride;
  *reinterpret_cast<uint4*>(sm + at) = make_uint4(0u, dummy + (uint32_t)STRIDE, at, 0u);
  return ListWalk{0u, 0u, scr_base, smem};
}

// Fast walks for rows with exactly k stored values and no empty 32-bit word (per-token top-k): the
// words stay in registers and a refill is 4 predicated moves. A row is walked from both ends at once
// (k/2 values each: two independent dependency chains per thread).
template <int NW>
struct RegWalkUp {
  uint32_t w, n1, n2, n3, adj;
  template <int STRIDE>
  __device__ __forceinline__ uint32_t next() {
    const uint32_t wn = w & (w - 1u);
    const uint32_t a = adj + flo(w ^ wn) * (uint32_t)STRIDE;
    w = wn;
    if (w == 0u) {
      w = n1;
      n1 = n2;
      n2 = n3;
      adj += 32u * (uint32_t)STRIDE;
    }
    return a;
  }
};
template <int NW>
struct RegWalkDown {
  uint32_t w, n1, n2, n3, adj;
  template <int STRIDE>
  __device__ __forceinline__ uint32_t next() {
    const uint32_t c = (uint32_t)__clz(w);
    const uint32_t a = adj - c * (uint32_t)STRIDE;
    w ^= shr_clamped(0x80000000u, c);
    if (w == 0u) {
      w = n1;
      n1 = n2;
      n2 = n3;
      adj -= 32u * (uint32_t)STRIDE;
    }
    return a;
  }
};

template <int NW, int STRIDE>
__device__ __forceinline__ RegWalkUp<NW> make_walk_up(const uint32_t (&wd)[NW], uint32_t addr_ch0) {
  RegWalkUp<NW> r;
  r.w = wd[0];
  r.n1 = wd[1];
  r.n2 = NW > 2 ? wd[NW > 2 ? 2 : 0] : 0u;
  r.n3 = NW > 3 ? wd[NW > 3 ? 3 : 0] : 0u;
  r.adj = addr_ch0;
  return r;
}
template <int NW, int STRIDE>
__device__ __forceinline__ RegWalkDown<NW> make_walk_down(const uint32_t (&wd)[NW], uint32_t addr_ch0) {
  RegWalkDown<NW> r;
  r.w = wd[NW - 1];
  r.n1 = wd[NW - 2];
  r.n2 = NW > 2 ? wd[NW > 2 ? NW - 3 : 0] : 0u;
  r.n3 = NW > 3 ? wd[NW > 3 ? NW - 4 : 0] : 0u;
  r.adj = addr_ch0 + (uint32_t)((32 * (NW - 1) + 31) * STRIDE);
  return r;
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], uint32_t a0, uint32_t a2, uint32_t b0, uint32_t b1) {
  // A rows 8..15 (a1, a3) are zero: at most 8 query heads per CTA
  if constexpr (std::is_same<T, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ float bits_to_f(uint32_t bits16) {
  if constexpr (std::is_same<T, __half>::value) {
    return __half2float(__ushort_as_half((unsigned short)bits16));
  } else {
    return __uint_as_float(bits16 << 16);
  }
}

template <typename T, int D, int GT, int VM>
__global__ void __launch_bounds__(kWarps * 32, 3) sd_scatter_kernel(const V5Params p) {
  constexpr int NW32 = D / 32;
  constexpr int W = D / 64;
  constexpr bool kHalfMath = std::is_same<T, __half>::value && VM != kVmAny;
  using QT = typename std::conditional<kHalfMath, __half, float>::type;  // q in shared memory
  constexpr int QS = GT * (int)sizeof(QT);                                 // bytes per channel of q
  constexpr int NT = D / 8;                                                 // mma n-tiles of O
  extern __shared__ __align__(16) char smem[];

  const int split = blockIdx.x;
  const int hk = blockIdx.y / p.nchunk;
  const int chunk = blockIdx.y % p.nchunk;
  const int b = blockIdx.z;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  mf_pdl_launch_dependents();  // the merge kernel may launch now (it waits for this grid)
  const int hq0 = hk * p.G + chunk * GT;
  const int ks = p.kv_start ? max(0, p.kv_start[b]) : 0;
  const int ntc = (p.Tc + kTile - 1) / kTile;
  const int ntiles = ntc + (p.Tw + kTile - 1) / kTile;
  const int tile0 = split * p.tiles_per_split;
  const int nt = max(0, min(ntiles, tile0 + p.tiles_per_split) - tile0);

  // ---- q (scaled by scale*log2 e) at qs[c][g], a zero entry at c = D; Vd zeroed
  QT* qs = reinterpret_cast<QT*>(smem + p.off_q);
  {
    const T* qp = reinterpret_cast<const T*>(p.q) + ((int64_t)b * p.Hkv * p.G + hq0) * D;
    for (int i = tid; i < (D + 1) * GT; i += kWarps * 32) {
      const int c = i / GT, g = i - c * GT;
      const float x = c < D ? to_f(qp[(int64_t)g * D + c]) * p.qscale : 0.f;
      if constexpr (kHalfMath) qs[i] = __float2half_rn(x);
      else qs[i] = x;
    }
    for (int i = tid; i < D * 8; i += kWarps * 32)
      *reinterpret_cast<uint4*>(smem + p.off_vd + (i >> 3) * kLS + 16 * (i & 7)) = make_uint4(0u, 0u, 0u, 0u);
  }
  float* S_s = reinterpret_cast<float*>(smem + p.off_s);  // [GT][64] scores of the tile

  const SDSlice<T> sl(p, b, hk);

  auto issue = [&](int i) {  // compressed tiles only (window tiles are read from global memory)
    stage_tile64<W, VM == kVmOct>(sl, smem, p, tile0 + i, i % kStages);
  };
#pragma unroll 1
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < nt) issue(i);
    cp_async_commit();
  }

  // ---- per-warp online softmax state and O (lane: head h = lane/4 of the mma rows, 2 channels per n-tile)
  const int h = lane >> 2, q4 = lane & 3;
  float m = (h < GT) ? -INFINITY : 0.f, l = 0.f;
  float o[NT][4];
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  // ldmatrix row address of this lane: matrix mi = lane/8 -> (channel block mi/2, token half mi%2)
  const uint32_t vd_s = (uint32_t)__cvta_generic_to_shared(smem + p.off_vd);
  const uint32_t ldm_addr =
      vd_s + (uint32_t)((((lane >> 4) << 3) + (lane & 7)) * kLS + (2 * warp + ((lane >> 3) & 1)) * 16);

  const bool is_k = tid < kTile;
  const int tl = tid & (kTile - 1);  // the thread's row within the tile
  const uint32_t scr_base = (uint32_t)p.off_scr + (uint32_t)tid * 16u;

#pragma unroll 1
  for (int it = 0; it < nt; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < nt) issue(it + kStages - 1);
    cp_async_commit();
    const int tile = tile0 + it;
    const char* st = smem + (it % kStages) * p.stage_bytes;

    // ================= phase A: one thread per row
    if (tile < ntc) {
      const int t0 = tile * kTile;
      const int nc = min(kTile, p.Tc - t0);
      const bool valid = tl < nc && t0 + tl >= ks;
      uint32_t wd[NW32];
      {
        const uint32_t* bw = reinterpret_cast<const uint32_t*>(st + (is_k ? p.off_kbm : p.off_vbm)) + tl * NW32;
        if constexpr (NW32 == 4) {
          const uint4 x = *reinterpret_cast<const uint4*>(bw);
          wd[0] = x.x; wd[1] = x.y; wd[2] = x.z; wd[3] = x.w;
        } else {
          const uint2 x = *reinterpret_cast<const uint2*>(bw);
          wd[0] = x.x; wd[1] = x.y;
        }
      }
      // the warp takes the register walk when all its rows are complete top-k rows (masked rows too:
      // their scores are replaced by -inf and their V rows get probability 0)
      const bool fast = __all_sync(0xffffffffu, tl < nc && reg_walk_ok<NW32>(wd, is_k ? p.kk : p.kv));
      if (is_k) {
        const char* vrow = st + p.off_kval + tl * p.kstride;
        const int kk = p.kk;
        float sc[GT];
#pragma unroll
        for (int g = 0; g < GT; ++g) sc[g] = 0.f;
        if constexpr (kHalfMath) {
          // fp16: products of value pairs with the gathered q in half2, flushed to fp32 every 8 values
          constexpr int GH = GT == 1 ? 1 : GT / 2;
          __half2 acc[GH];
#pragma unroll
          for (int g = 0; g < GH; ++g) acc[g] = __float2half2_rn(0.f);
          // values (j, j+1) in v's (low, high) half at slot addresses a0, a1
          auto fma_pair = [&](uint32_t v, uint32_t a0, uint32_t a1) {
            if constexpr (GT == 1) {
              const uint32_t q0 = *reinterpret_cast<const uint16_t*>(smem + a0);
              const uint32_t q1 = *reinterpret_cast<const uint16_t*>(smem + a1);
              acc[0] = __hfma2(as_h2(v), as_h2(__byte_perm(q0, q1, 0x5410)), acc[0]);
            } else {
              const __half2 lo = as_h2(__byte_perm(v, 0u, 0x1010)), hi = as_h2(__byte_perm(v, 0u, 0x3232));
#pragma unroll
              for (int gp = 0; gp < GT / 2; ++gp) {
                acc[gp] = __hfma2(lo, as_h2(*reinterpret_cast<const uint32_t*>(smem + a0 + 4 * gp)), acc[gp]);
                acc[gp] = __hfma2(hi, as_h2(*reinterpret_cast<const uint32_t*>(smem + a1 + 4 * gp)), acc[gp]);
              }
            }
          };
          auto flush = [&]() {
#pragma unroll
            for (int gp = 0; gp < GH; ++gp) {
              const float2 f = __half22float2(acc[gp]);
              if constexpr (GT == 1) {
                sc[0] += f.x + f.y;
              } else {
                sc[2 * gp] += f.x;
                sc[2 * gp + 1] += f.y;
              }
              acc[gp] = __float2half2_rn(0.f);
            }
          };
          auto load8 = [&](int j, uint32_t (&v)[4]) {
            if constexpr (VM == kVmOct) {
              const uint4 x = *reinterpret_cast<const uint4*>(vrow + 2 * j);
              v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
            } else {
#pragma unroll
              for (int u = 0; u < 4; ++u) v[u] = *reinterpret_cast<const uint32_t*>(vrow + 2 * j + 4 * u);
            }
          };
          auto ld2 = [&](int j) { return *reinterpret_cast<const uint32_t*>(vrow + 2 * j); };
          if (fast) {
            // up: values [0, h), down: values [h, kk), h = kk / 2 (kk is even here)
            auto up = make_walk_up<NW32, QS>(wd, (uint32_t)p.off_q);
            auto dn = make_walk_down<NW32, QS>(wd, (uint32_t)p.off_q);
            const int h = kk >> 1;
            int j = 0;
#pragma unroll 1
            for (; j + 8 <= h; j += 8) {
              uint32_t va[4], vb[4];
              load8(j, va);
              load8(kk - j - 8, vb);
#pragma unroll
              for (int u = 0; u < 4; ++u) {
                const uint32_t a0 = up.template next<QS>();
                const uint32_t b1 = dn.template next<QS>();
                const uint32_t a1 = up.template next<QS>();
                const uint32_t b0 = dn.template next<QS>();
                fma_pair(va[u], a0, a1);
                fma_pair(vb[3 - u], b0, b1);
              }
              flush();
            }
#pragma unroll 1
            for (; j + 2 <= h; j += 2) {
              const uint32_t a0 = up.template next<QS>();
              const uint32_t b1 = dn.template next<QS>();
              const uint32_t a1 = up.template next<QS>();
              const uint32_t b0 = dn.template next<QS>();
              fma_pair(ld2(j), a0, a1);
              fma_pair(ld2(kk - j - 2), b0, b1);
            }
            if (h & 1) {  // the middle pair (h-1, h): one value from each walk
              const uint32_t a0 = up.template next<QS>();
              const uint32_t b1 = dn.template next<QS>();
              fma_pair(ld2(h - 1), a0, b1);
            }
            flush();
          } else {
            auto wk = build_list_walk<NW32, QS>(smem, scr_base, wd, valid, (uint32_t)p.off_q,
                                                (uint32_t)(p.off_q + D * QS));
            int j = 0;
#pragma unroll 1
            for (; j + 8 <= kk; j += 8) {
              uint32_t v[4];
              load8(j, v);
#pragma unroll
              for (int u = 0; u < 4; ++u) {
                const uint32_t a0 = wk.template next<QS>();
                const uint32_t a1 = wk.template next<QS>();
                fma_pair(v[u], a0, a1);
              }
              flush();
            }
#pragma unroll 1
            for (; j < kk; j += 2) {
              const uint32_t a0 = wk.template next<QS>();
              const uint32_t a1 = wk.template next<QS>();
              fma_pair(ld2(j), a0, a1);
            }
            flush();
          }
        } else {
          // bf16 / any k: fp32 math, one 16-bit value load per stored value
          auto one = [&](uint32_t a, int j) {
            const float vf = bits_to_f<T>(*reinterpret_cast<const uint16_t*>(vrow + 2 * j));
#pragma unroll
            for (int g = 0; g < GT; ++g) sc[g] = fmaf(vf, *reinterpret_cast<const float*>(smem + a + 4 * g), sc[g]);
          };
          if (fast) {
            auto up = make_walk_up<NW32, QS>(wd, (uint32_t)p.off_q);
            auto dn = make_walk_down<NW32, QS>(wd, (uint32_t)p.off_q);
            const int h = kk >> 1;
#pragma unroll 2
            for (int j = 0; j < h; ++j) {
              const uint32_t a = up.template next<QS>();
              const uint32_t b = dn.template next<QS>();
              one(a, j);
              one(b, kk - 1 - j);
            }
            if (kk & 1) one(up.template next<QS>(), h);
          } else {
            auto wk = build_list_walk<NW32, QS>(smem, scr_base, wd, valid, (uint32_t)p.off_q,
                                                (uint32_t)(p.off_q + D * QS));
#pragma unroll 4
            for (int j = 0; j < kk; ++j) one(wk.template next<QS>(), j);
          }
        }
#pragma unroll
        for (int g = 0; g < GT; ++g) S_s[g * kTile + tl] = valid ? sc[g] : -INFINITY;
      } else {
        const uint32_t tok = (uint32_t)p.off_vd + 2u * (uint32_t)tl;
        const char* vrow = st + p.off_vval + tl * p.vstride;
        const int kv = p.kv;
        auto st16 = [&](uint32_t a, uint32_t bits) { *reinterpret_cast<uint16_t*>(smem + a) = (uint16_t)bits; };
        auto ld16 = [&](int j) { return (uint32_t)*reinterpret_cast<const uint16_t*>(vrow + 2 * j); };
        auto ld2 = [&](int j) { return *reinterpret_cast<const uint32_t*>(vrow + 2 * j); };
        if (fast) {
          auto up = make_walk_up<NW32, kLS>(wd, tok);
          auto dn = make_walk_down<NW32, kLS>(wd, tok);
          const int h = kv >> 1;
          if constexpr (VM == kVmAny) {
#pragma unroll 2
            for (int j = 0; j < h; ++j) {
              const uint32_t a = up.template next<kLS>();
              const uint32_t b = dn.template next<kLS>();
              st16(a, ld16(j));
              st16(b, ld16(kv - 1 - j));
            }
            if (kv & 1) st16(up.template next<kLS>(), ld16(h));
          } else {
            int j = 0;
            if constexpr (VM == kVmOct) {
#pragma unroll 1
              for (; j + 8 <= h; j += 8) {
                const uint4 x = *reinterpret_cast<const uint4*>(vrow + 2 * j);
                const uint4 y = *reinterpret_cast<const uint4*>(vrow + 2 * (kv - j - 8));
                const uint32_t xa[4] = {x.x, x.y, x.z, x.w}, ya[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                  st16(up.template next<kLS>(), xa[u]);
                  st16(dn.template next<kLS>(), ya[3 - u] >> 16);
                  st16(up.template next<kLS>(), xa[u] >> 16);
                  st16(dn.template next<kLS>(), ya[3 - u]);
                }
              }
            }
#pragma unroll 2
            for (; j + 2 <= h; j += 2) {
              const uint32_t x = ld2(j), y = ld2(kv - j - 2);
              st16(up.template next<kLS>(), x);
              st16(dn.template next<kLS>(), y >> 16);
              st16(up.template next<kLS>(), x >> 16);
              st16(dn.template next<kLS>(), y);
            }
            if (h & 1) {
              const uint32_t x = ld2(h - 1);
              st16(up.template next<kLS>(), x);
              st16(dn.template next<kLS>(), x >> 16);
            }
          }
        } else {
          auto wk = build_list_walk<NW32, kLS>(smem, scr_base, wd, valid, tok, tok + (uint32_t)(D * kLS));
          if constexpr (VM == kVmAny) {
#pragma unroll 4
            for (int j = 0; j < kv; ++j) st16(wk.template next<kLS>(), ld16(j));
          } else {
#pragma unroll 4
            for (int j = 0; j < kv; j += 2) {
              const uint32_t x = ld2(j);
              st16(wk.template next<kLS>(), x);
              st16(wk.template next<kLS>(), x >> 16);
            }
          }
        }
      }
    } else {
      // dense window rows: K scores in fp32, V rows written into Vd
      const int w0 = (tile - ntc) * kTile;
      const int t = p.Tc + w0 + tl;
      const bool valid = w0 + tl < p.Tw && t >= ks;
      if (is_k) {
        float sc[GT];
#pragma unroll
        for (int g = 0; g < GT; ++g) sc[g] = 0.f;
        if (valid) {
          const T* kr = sl.kwin + (int64_t)(w0 + tl) * p.kwin_st;
#pragma unroll 4
          for (int c = 0; c < D; ++c) {
            const float kf = to_f(kr[c]);
#pragma unroll
            for (int g = 0; g < GT; ++g) sc[g] = fmaf(kf, to_f(qs[c * GT + g]), sc[g]);
          }
        }
#pragma unroll
        for (int g = 0; g < GT; ++g) S_s[g * kTile + tl] = valid ? sc[g] : -INFINITY;
      } else if (valid) {
        const uint16_t* vr = reinterpret_cast<const uint16_t*>(sl.vwin + (int64_t)(w0 + tl) * p.vwin_st);
#pragma unroll 4
        for (int c = 0; c < D; ++c) *reinterpret_cast<uint16_t*>(smem + p.off_vd + c * kLS + 2 * tl) = vr[c];
      }
    }
    __syncthreads();

    // ================= phase B: warp w, tokens 16w..16w+15 of the tile
    {
      float s[4];
      if (h < GT) {
        const float2 x = *reinterpret_cast<const float2*>(S_s + h * kTile + 16 * warp + 2 * q4);
        const float2 y = *reinterpret_cast<const float2*>(S_s + h * kTile + 16 * warp + 8 + 2 * q4);
        s[0] = x.x; s[1] = x.y; s[2] = y.x; s[3] = y.y;
      } else {
        s[0] = s[1] = s[2] = s[3] = -INFINITY;
      }
      float mx = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float mn = fmaxf(m, mx);
      const float mu = (mn == -INFINITY) ? 0.f : mn;
      const float alpha = exp2f(m - mu);
      float pr[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) pr[i] = exp2f(s[i] - mu);
      l = l * alpha + ((pr[0] + pr[1]) + (pr[2] + pr[3]));
      m = mn;
      if (__any_sync(0xffffffffu, alpha != 1.f)) {
#pragma unroll
        for (int n = 0; n < NT; ++n) {
          o[n][0] *= alpha;
          o[n][1] *= alpha;
        }
      }
      const uint32_t a0 = pack2<T>(pr[0], pr[1]);
      const uint32_t a2 = pack2<T>(pr[2], pr[3]);
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b0, b1, b2, b3;
        ldmatrix_x4(ldm_addr + (uint32_t)(np * 16 * kLS), b0, b1, b2, b3);
        mma16816<T>(o[2 * np], a0, a2, b0, b1);
        mma16816<T>(o[2 * np + 1], a0, a2, b2, b3);
      }
      __syncwarp();
      // zero what this warp read: chunks 2w, 2w+1 of every channel line
#pragma unroll
      for (int e = lane; e < 2 * D; e += 32)
        *reinterpret_cast<uint4*>(smem + p.off_vd + (e >> 1) * kLS + (2 * warp + (e & 1)) * 16) =
            make_uint4(0u, 0u, 0u, 0u);
    }
  }
  cp_async_wait<0>();

  // ---- this warp's partial (heads h < GT): O row h from the 4 lanes q4 = 0..3, l summed over them
  const int NP = p.nsplit * kWarps;
  const int pidx = split * kWarps + warp;
  float lt = l;
  lt += __shfl_xor_sync(0xffffffffu, lt, 1);
  lt += __shfl_xor_sync(0xffffffffu, lt, 2);
  if (h < GT) {
    const int64_t base = ((int64_t)b * p.Hkv * p.G + hq0 + h) * NP + pidx;
    float* op = p.ws_o + base * D + 2 * q4;
#pragma unroll
    for (int n = 0; n < NT; ++n) *reinterpret_cast<float2*>(op + 8 * n) = make_float2(o[n][0], o[n][1]);
    if (q4 == 0) {
      p.ws_ml[base * 2] = m;
      p.ws_ml[base * 2 + 1] = lt;
    }
  }
}

template <typename T, int D, int GT, int VM>
int sds_occ_one(int smem_bytes) {
  auto kern = sd_scatter_kernel<T, D, GT, VM>;
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, kWarps * 32, smem_bytes));
  return n > 0 ? n : 1;
}

template <typename T, int D, int GT, int VM>
void launch_sds_one(const V5Params& p, int smem_bytes, dim3 grid, cudaStream_t stream) {
  auto kern = sd_scatter_kernel<T, D, GT, VM>;
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kern<<<grid, kWarps * 32, smem_bytes, stream>>>(p);
  MF_CHECK_LAUNCH();
}

// run (occupancy query or launch) the instantiation for (D, GT, VM)
template <typename T, typename F>
auto sds_dispatch(int D, int GT, int VM, F&& f) {
  auto by_vm = [&](auto dc, auto gc) {
    constexpr int DD = decltype(dc)::value, GG = decltype(gc)::value;
    if (VM == kVmOct) return f(std::integral_constant<int, DD>(), std::integral_constant<int, GG>(),
                               std::integral_constant<int, kVmOct>());
    if (VM == kVmPair) return f(std::integral_constant<int, DD>(), std::integral_constant<int, GG>(),
                                std::integral_constant<int, kVmPair>());
    return f(std::integral_constant<int, DD>(), std::integral_constant<int, GG>(),
             std::integral_constant<int, kVmAny>());
  };
  auto by_gt = [&](auto dc) {
    if (GT == 4) return by_vm(dc, std::integral_constant<int, 4>());
    if (GT == 2) return by_vm(dc, std::integral_constant<int, 2>());
    return by_vm(dc, std::integral_constant<int, 1>());
  };
  if (D == 64) return by_gt(std::integral_constant<int, 64>());
  return by_gt(std::integral_constant<int, 128>());
}

template <typename T>
int v5_blocks_per_sm(int D, int GT, int VM, int smem_bytes);
template <typename T>
void launch_v5(const V5Params& p, int D, int GT, int VM, int smem_bytes, dim3 grid, cudaStream_t stream);

#define MUSTAFAR_DEFINE_V5_LAUNCHER(TYPE)                                                                    \
  template <>                                                                                               \
  int v5_blocks_per_sm<TYPE>(int D, int GT, int VM, int smem_bytes) {                               \
    return sds_dispatch<TYPE>(D, GT, VM, [&](auto dc, auto gc, auto vc) {                                   \
      return sds_occ_one<TYPE, decltype(dc)::value, decltype(gc)::value, decltype(vc)::value>(smem_bytes);  \
    });                                                                                                     \
  }                                                                                                         \
  template <>                                                                                               \
  void launch_v5<TYPE>(const V5Params& p,         int D, int GT, int VM, int smem_bytes, dim3 grid,          \
                               cudaStream_t stream) {                                                       \
    sds_dispatch<TYPE>(D, GT, VM, [&](auto dc, auto gc, auto vc) {                                          \
      launch_sds_one<TYPE, decltype(dc)::value, decltype(gc)::value, decltype(vc)::value>(p, smem_bytes,     \
                                                                                          grid, stream);    \
      return 0;                                                                                             \
    });                                                                                                     \
  }

}  // namespace mustafar_cuda
