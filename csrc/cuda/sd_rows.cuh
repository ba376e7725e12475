#pragma once
// v6 fused sparse decode for fp16 / bf16 with one query head per KV head (MHA): the "row" kernel.
// Design, predictions and measurements: docs/kernel_notes.md (section v6).
//
// v5 (sd_scatter.cuh) already works per *stored* value, but spends ~75 warp instructions per K+V row
// pair, most of them outside the per-value work: 64-row CTA tiles with separate K and V threads, two
// __syncthreads per tile, a CTA-wide staging loop and a softmax / P.V phase shared by 4 warps over
// 16 tokens each. v6 keeps the per-value idea and removes the rest:
//
//   * every warp is independent: it owns 32-row tiles (one row = one token per lane), its own
//     cp.async stage buffer and its own dense V tile; no __syncthreads after the start;
//   * one lane does both the K row and the V row of its token, with the two bitmap walks interleaved
//     in one unrolled loop (two independent dependency chains per thread);
//   * q sits in shared memory as fp32, one private copy per lane (word c*32 + lane), so the per-value
//     gather q[channel] never has a bank conflict;
//   * the walk is 8 instructions per value: bfind (FLO) of the bit-reversed word gives the lowest
//     stored channel, bmsk + and clear it (the and sets the "word not empty" predicate), three selects
//     shift the queue of remaining words, and the slot address is one IMAD;
//   * the values of the lane's row are read from the stage buffer into registers once per tile
//     (32-bit loads when k/2 is odd, 16-byte loads of swizzled or odd-length rows when k % 8 == 0,
//     16-bit loads otherwise), so the walk indexes them statically;
//   * V values are scattered into the warp's channel-major dense tile Vd[channel][token] and
//     O^T += V^T P^T runs on tensor cores (mma.m16n8k16, A = V^T by ldmatrix, B = P^T by shuffles).
//
// A tile whose rows are not all complete top-k rows without an empty 32-bit word (arbitrary masks)
// takes a general path: per-word loops over the set bits, values read from the stage buffer by index.
// Dense window rows take a warp-cooperative path (lane l owns channels l, l+32, ...).
// Each warp writes one partial (m, l, o) and sparse_decode_merge combines them (as for v4 / v5).

#include "sd_scatter.cuh"

namespace mustafar_cuda {

constexpr int kRRows = 32;      // rows (tokens) per warp tile: one per lane
constexpr int kRLine = 80;      // bytes per channel line of a warp's dense V tile: 32 tokens + 16 B pad
constexpr int kRKMax = 64;      // most stored values per row (k_k and k_v) the kernel holds in registers
constexpr int kRMaxWarps = 6;   // warps per CTA at most, unrolled variant (the host picks 4-6 by occupancy)
constexpr int kRMaxWarpsC = 10; // ... compact variant (4-10)
enum : int { kRLdAny = 0, kRLdPair = 1, kRLdOct = 2 };  // how a lane reads its row from the stage buffer

__device__ __forceinline__ uint32_t r_bfind(uint32_t x) {  // bit index of the highest set bit; ~0u for 0
  uint32_t d;
  asm("bfind.u32 %0, %1;" : "=r"(d) : "r"(x));
  return d;
}
__device__ __forceinline__ uint32_t r_bmsk(uint32_t n) {  // (1 << n) - 1, all ones for n >= 32
  uint32_t d;
  asm("bmsk.clamp.b32 %0, %1, %2;" : "=r"(d) : "r"(0u), "r"(n));
  return d;
}

// Walk over the stored channels of one row in ascending order, for rows with exactly k stored values
// and no empty 32-bit word. Words are bit-reversed, so the highest set bit (bfind) is the lowest stored
// channel. next() returns the shared-memory address (shared state space) of the slot of the next stored
// channel, adj - bfind * S with adj = base + (32 i + 31) S for the current word i; when the word runs
// empty, three selects shift the queue of remaining words and a predicated add moves adj on (8 SASS
// instructions: FLO, IMAD, BMSK, LOP3 with the predicate, 3 SEL, IADD). Lanes without a row walk a
// synthetic complete row (r_synth_row): their slots are real but their score is masked and their
// values are zero.
template <int NW, int S>
struct RWalk {
  uint32_t w, n1, n2, n3, adj;
  __device__ __forceinline__ uint32_t next() {
    uint32_t a;
    if constexpr (NW > 2) {
      asm("{\n\t"
          ".reg .pred p;\n\t"
          ".reg .u32 pp, mk, wn;\n\t"
          "bfind.u32 pp, %1;\n\t"
          "mad.lo.u32 %0, pp, %6, %5;\n\t"
          "bmsk.clamp.b32 mk, 0, pp;\n\t"
          "and.b32 wn, %1, mk;\n\t"
          "setp.ne.u32 p, wn, 0;\n\t"
          "selp.b32 %1, wn, %2, p;\n\t"
          "selp.b32 %2, %2, %3, p;\n\t"
          "selp.b32 %3, %3, %4, p;\n\t"
          "@!p add.u32 %5, %5, %7;\n\t"
          "}"
          : "=r"(a), "+r"(w), "+r"(n1), "+r"(n2), "+r"(n3), "+r"(adj)
          : "n"(-S), "n"(32 * S));
    } else {
      asm("{\n\t"
          ".reg .pred p;\n\t"
          ".reg .u32 pp, mk, wn;\n\t"
          "bfind.u32 pp, %1;\n\t"
          "mad.lo.u32 %0, pp, %4, %3;\n\t"
          "bmsk.clamp.b32 mk, 0, pp;\n\t"
          "and.b32 wn, %1, mk;\n\t"
          "setp.ne.u32 p, wn, 0;\n\t"
          "selp.b32 %1, wn, %2, p;\n\t"
          "@!p add.u32 %3, %3, %5;\n\t"
          "}"
          : "=r"(a), "+r"(w), "+r"(n1), "+r"(adj)
          : "n"(-S), "n"(32 * S));
    }
    return a;
  }
};

template <int NW, int S>
__device__ __forceinline__ RWalk<NW, S> r_make_walk(const uint32_t (&wd)[NW], uint32_t base) {
  RWalk<NW, S> r;
  r.w = __brev(wd[0]);
  r.n1 = __brev(wd[1]);
  r.n2 = NW > 2 ? __brev(wd[NW > 2 ? 2 : 0]) : 0u;
  r.n3 = NW > 3 ? __brev(wd[NW > 3 ? 3 : 0]) : 0u;
  r.adj = base + 31u * (uint32_t)S;
  return r;
}

// A complete row with k stored values and no empty 32-bit word (k >= NW): the lowest channels of each word.
template <int NW>
__device__ __forceinline__ void r_synth_row(int k, uint32_t (&wd)[NW]) {
  int r = k;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const int n = min(32, r - (NW - 1 - i));
    wd[i] = n >= 32 ? 0xffffffffu : ((1u << max(n, 0)) - 1u);
    r -= n;
  }
}

__device__ __forceinline__ float r_lds_f32(uint32_t a) {
  float v;
  asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a));
  return v;
}
__device__ __forceinline__ void r_sts_u16(uint32_t a, uint32_t v) {
  asm volatile("st.shared.u16 [%0], %1;" ::"r"(a), "h"((unsigned short)v) : "memory");
}

template <int NW>
__device__ __forceinline__ bool r_row_ok(const uint32_t (&wd)[NW], int k) {
  int n = 0;
  bool nz = true;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    n += __popc(wd[i]);
    nz = nz && wd[i] != 0u;
  }
  return nz && n == k;
}

// value j (0 or 1) of a packed 16-bit pair as float
template <typename T>
__device__ __forceinline__ float r_half(uint32_t pair, int j) {
  if constexpr (std::is_same<T, __half>::value) {
    const __half2 h = as_h2(pair);
    return j ? __high2float(h) : __low2float(h);
  } else {
    return __uint_as_float(j ? (pair & 0xffff0000u) : (pair << 16));
  }
}

__device__ __forceinline__ void mma16816_full(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1, bool bf16) {
  if (!bf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// 16-byte chunk c of row r in a swizzled stage buffer (rows of kc = 2^lg chunks): with 8 lanes per
// 128-byte phase reading chunk c of 8 consecutive rows, every lane hits its own 4 banks.
__device__ __forceinline__ int r_swz(int r, int c, int lg) {
  if (lg < 0) return c;  // rows of an odd number of chunks: contiguous is conflict-free already
  const int s = lg >= 3 ? (r & 7) : ((r >> (3 - lg)) & ((1 << lg) - 1));
  return c ^ s;
}

// Stage the packed values of rows [t0, t0 + nc) of one side (k values per row) into this warp's buffer.
// Layout: row r at r * 2k bytes (kRLdPair / kRLdAny, and kRLdOct with lg < 0), or 16-byte chunks
// swizzled within rows of 2^lg chunks (kRLdOct). cp.async for whole 16-byte chunks; the tail of a
// partial tile (and unaligned caches, vec16 == 0) is copied with 16-bit loads and stores.
__device__ __forceinline__ void r_stage_side(char* dst, const char* src, int nc, int k, int mode, int lg, int vec16,
                                             int lane) {
  const int bytes = nc * k * 2;
  int done = 0;
  if (vec16) {
    if (mode == kRLdOct && lg >= 0) {
      const int n16 = bytes >> 4;  // whole rows (k % 8 == 0)
      for (int i = lane; i < n16; i += 32) {
        const int r = i >> lg, c = i & ((1 << lg) - 1);
        cp_async16(dst + ((r << lg) + r_swz(r, c, lg)) * 16, src + 16 * i);
      }
      done = bytes;
    } else {
      const int n16 = bytes >> 4;
      for (int i = lane; i < n16; i += 32) cp_async16(dst + 16 * i, src + 16 * i);
      done = n16 << 4;
    }
  }
  const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
  if (mode == kRLdOct && lg >= 0) {  // unaligned source: element copies into the swizzled layout
    for (int i = (done >> 1) + lane; i < (bytes >> 1); i += 32) {
      const int r = i / k, j = i - r * k;
      d16[(((r << lg) + r_swz(r, j >> 3, lg)) * 16 + (j & 7) * 2) >> 1] = s16[i];
    }
  } else {
    for (int i = (done >> 1) + lane; i < (bytes >> 1); i += 32) d16[i] = s16[i];
  }
}

// byte offset (in the stage buffer) of value j of row r
__device__ __forceinline__ uint32_t r_val_off(int r, int j, int k, int mode, int lg) {
  if (mode == kRLdOct && lg >= 0) return (uint32_t)((((r << lg) + r_swz(r, j >> 3, lg)) << 4) + (j & 7) * 2);
  return (uint32_t)((r * k + j) * 2);
}

// the lane's row (k values) from the stage buffer into 16-bit pairs v[0 .. ceil(k/2))
__device__ __forceinline__ void r_load_row(const char* smem, uint32_t st, int k, int mode, int lg, int lane,
                                           uint32_t (&v)[kRKMax / 2]) {
  const int nw = (k + 1) >> 1;
  if (mode == kRLdPair) {
    const uint32_t base = st + (uint32_t)(lane * k * 2);
#pragma unroll
    for (int g = 0; g < kRKMax / 8; ++g) {
      if (4 * g >= nw) break;
#pragma unroll
      for (int u = 0; u < 4; ++u)
        if (4 * g + u < nw) v[4 * g + u] = *reinterpret_cast<const uint32_t*>(smem + base + 4 * (4 * g + u));
    }
  } else if (mode == kRLdOct) {
    const int kc = k >> 3;
#pragma unroll
    for (int c = 0; c < kRKMax / 8; ++c) {
      if (c >= kc) break;
      const uint32_t off = lg >= 0 ? (uint32_t)((((lane << lg) + r_swz(lane, c, lg)) << 4))
                                   : (uint32_t)((lane * kc + c) << 4);
      const uint4 x = *reinterpret_cast<const uint4*>(smem + st + off);
      v[4 * c] = x.x;
      v[4 * c + 1] = x.y;
      v[4 * c + 2] = x.z;
      v[4 * c + 3] = x.w;
    }
  } else {
    const uint32_t base = st + (uint32_t)(lane * k * 2);
#pragma unroll
    for (int g = 0; g < kRKMax / 8; ++g) {
      if (4 * g >= nw) break;
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int i = 4 * g + u;
        if (i < nw) {
          const uint32_t lo = *reinterpret_cast<const uint16_t*>(smem + base + 4 * i);
          const uint32_t hi = (2 * i + 1 < k) ? *reinterpret_cast<const uint16_t*>(smem + base + 4 * i + 2) : 0u;
          v[i] = lo | (hi << 16);
        }
      }
    }
  }
}

// values 8g .. 8g+7 of the lane's row as 16-bit pairs v[0..3] (nv < 8: only the first nv are read)
__device__ __forceinline__ void r_load8(const char* smem, uint32_t st, int g, int nv, int k, int mode, int lg, int lane,
                                        uint32_t (&v)[4]) {
  if (mode == kRLdOct) {  // k % 8 == 0: whole groups only
    const int kc = k >> 3;
    const uint32_t off = lg >= 0 ? (uint32_t)(((lane << lg) + r_swz(lane, g, lg)) << 4) : (uint32_t)((lane * kc + g) << 4);
    const uint4 x = *reinterpret_cast<const uint4*>(smem + st + off);
    v[0] = x.x;
    v[1] = x.y;
    v[2] = x.z;
    v[3] = x.w;
  } else if (mode == kRLdPair) {  // k even
    const uint32_t base = st + (uint32_t)(lane * k * 2 + 16 * g);
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = (2 * u < nv) ? *reinterpret_cast<const uint32_t*>(smem + base + 4 * u) : 0u;
  } else {
    const uint32_t base = st + (uint32_t)(lane * k * 2 + 16 * g);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint32_t lo = (2 * u < nv) ? *reinterpret_cast<const uint16_t*>(smem + base + 4 * u) : 0u;
      const uint32_t hi = (2 * u + 1 < nv) ? *reinterpret_cast<const uint16_t*>(smem + base + 4 * u + 2) : 0u;
      v[u] = lo | (hi << 16);
    }
  }
}

template <typename T, int D, bool COMPACT>
__global__ void __launch_bounds__(COMPACT ? kRMaxWarpsC * 32 : kRMaxWarps * 32, COMPACT ? 1 : 2)
    sd_rows_kernel(const SDParams p) {
  constexpr int NW32 = D / 32;  // 32-bit bitmap words per row
  constexpr int W = D / 64;     // int64 bitmap words per row
  constexpr int NMT = D / 16;   // mma m-tiles (16 channels each) of O^T
  constexpr int CPL = D / 32;   // channels per lane in the dense window path (lane, lane + 32, ...)
  constexpr int QS = 128;       // bytes between channels of the lane-private q
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
  extern __shared__ __align__(16) char smem[];

  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int nwarps = (int)(blockDim.x >> 5);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int ks = p.kv_start ? max(0, p.kv_start[b]) : 0;
  const int ntc = (p.Tc + kRRows - 1) / kRRows;
  const int nall = ntc + (p.Tw + kRRows - 1) / kRRows;
  const int wt0 = split * p.tiles_per_split;
  const int wt1 = min(nall, wt0 + p.tiles_per_split);
  const int ntc_here = min(wt1, ntc);
  const int kk = p.kk, kv = p.kv;

  // ---- q (scaled by scale * log2 e) as fp32, one copy per lane: word c * 32 + lane; q[D] = 0 (dummy)
  const T* qp = reinterpret_cast<const T*>(p.q) + ((int64_t)b * p.Hkv + hk) * D;
  for (int i = tid; i < (D + 1) * 32; i += (int)blockDim.x) {
    const int c = i >> 5;
    *reinterpret_cast<float*>(smem + 4 * i) = c < D ? to_f(qp[c]) * p.qscale : 0.f;
  }
  float qw[CPL];  // the window path's channels lane + 32 j
#pragma unroll
  for (int j = 0; j < CPL; ++j) qw[j] = to_f(qp[lane + 32 * j]) * p.qscale;

  // ---- this warp's region: dense V tile (D + 1 lines; line D is the dummy), K and V stage buffers
  const uint32_t wreg = (uint32_t)(p.off_vd + warp * p.r_wbytes);
  const uint32_t vd = wreg;
  const uint32_t stk0 = wreg + (uint32_t)p.r_off_stk, stv0 = wreg + (uint32_t)p.r_off_stv;
  uint32_t stk = stk0, stv = stv0;  // the current tile's stage buffers
  // Vd and the stage buffers zeroed (stale stage data is then always finite: V rows of lanes without a row
  // are scattered with probability 0)
  for (int i = lane; i < p.r_wbytes / 16; i += 32)
    *reinterpret_cast<uint4*>(smem + wreg + 16 * i) = make_uint4(0u, 0u, 0u, 0u);
  __syncthreads();

  const SDSlice<T> sl(p, b, hk);
  auto stage = [&](int wt, uint32_t sk, uint32_t sv) {
    const int t0 = wt * kRRows;
    const int nc = min(kRRows, p.Tc - t0);
    r_stage_side(smem + sk, sl.kval + (int64_t)t0 * kk * 2, nc, kk, p.r_ldk, p.r_lgk, p.vec16, lane);
    r_stage_side(smem + sv, sl.vval + (int64_t)t0 * kv * 2, nc, kv, p.r_ldv, p.r_lgv, p.vec16, lane);
  };
  const uint32_t bufstep = COMPACT ? (uint32_t)p.r_bufstep : 0u;  // COMPACT: two stage buffers, else one
  auto load_bm = [&](int wt, uint32_t (&kw)[NW32], uint32_t (&vw)[NW32]) {
    const int t = wt * kRRows + lane;
    if (wt < ntc_here && t < p.Tc) {
      // 8-byte loads: an int64 bitmap row is only 8-byte aligned in general (strided views)
#pragma unroll
      for (int i = 0; i < W; ++i) {
        const uint2 x = *reinterpret_cast<const uint2*>(sl.kbm + (int64_t)t * W + i);
        const uint2 y = *reinterpret_cast<const uint2*>(sl.vbm + (int64_t)t * W + i);
        kw[2 * i] = x.x;
        kw[2 * i + 1] = x.y;
        vw[2 * i] = y.x;
        vw[2 * i + 1] = y.y;
      }
    } else {
#pragma unroll
      for (int i = 0; i < NW32; ++i) kw[i] = vw[i] = 0u;
    }
  };

  float m = -INFINITY, l = 0.f;
  float o[NMT][4];
#pragma unroll
  for (int n = 0; n < NMT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  // ldmatrix row address of this lane: matrix i = lane / 8 -> (channels +8 if i odd, tokens +8 if i >= 2)
  const uint32_t smem_s = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t ldm = smem_s + vd + (uint32_t)((((lane >> 3) & 1) * 8 + (lane & 7)) * kRLine + (lane >> 4) * 16);

  uint32_t kwn[NW32], vwn[NW32];  // bitmaps of the warp's next compressed tile
  uint32_t synk[NW32], synv[NW32];
  r_synth_row<NW32>(kk, synk);
  r_synth_row<NW32>(kv, synv);
  const bool kfast_ok = kk >= NW32 && kv >= NW32;  // a complete row has a value in every 32-bit word
  int wt = wt0 + warp;
  if (wt < ntc_here) stage(wt, stk, stv);
  cp_async_commit();
  load_bm(wt, kwn, vwn);

#pragma unroll 1
  for (; wt < wt1; wt += nwarps) {
    const int nxt = wt + nwarps;
    float s;
    if (wt < ntc) {
      // ================= a compressed tile: lane = row
      const int t = wt * kRRows + lane;
      const bool valid = t < p.Tc;
      uint32_t kw[NW32], vw[NW32];
#pragma unroll
      for (int i = 0; i < NW32; ++i) {
        kw[i] = kwn[i];
        vw[i] = vwn[i];
      }
      load_bm(nxt, kwn, vwn);  // prefetch
      const bool fast = kfast_ok && __all_sync(0xffffffffu, !valid || (r_row_ok<NW32>(kw, kk) && r_row_ok<NW32>(vw, kv)));
      if constexpr (COMPACT) {  // next tile into the other buffer, then wait for this one
        if (nxt < ntc_here) stage(nxt, stk == stk0 ? stk0 + bufstep : stk0, stv == stv0 ? stv0 + bufstep : stv0);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncwarp();
      float sc0 = 0.f, sc1 = 0.f;
      if (COMPACT && fast) {
        if (wt * kRRows + kRRows > p.Tc) {  // the last, partial tile: lanes without a row walk a synthetic row
#pragma unroll
          for (int i = 0; i < NW32; ++i) {
            kw[i] = valid ? kw[i] : synk[i];
            vw[i] = valid ? vw[i] : synv[i];
          }
        }
        auto wk = r_make_walk<NW32, QS>(kw, smem_s + (uint32_t)(4 * lane));
        auto wv = r_make_walk<NW32, kRLine>(vw, smem_s + vd + (uint32_t)(2 * lane));
        auto kstep = [&](const uint32_t (&x)[4], int u) {
          const float qv = r_lds_f32(wk.next());
          if (u & 1) sc1 = fmaf(qv, r_half<T>(x[u >> 1], 1), sc1);
          else sc0 = fmaf(qv, r_half<T>(x[u >> 1], 0), sc0);
        };
        auto vstep = [&](const uint32_t (&x)[4], int u) {
          r_sts_u16(wv.next(), (u & 1) ? (x[u >> 1] >> 16) : x[u >> 1]);
        };
        const int ngk = kk >> 3, ngv = kv >> 3, ng = min(ngk, ngv);
        int g = 0;
#pragma unroll 1
        for (; g < ng; ++g) {  // groups of 8 values of both sides
          uint32_t ka[4], va[4];
          r_load8(smem, stk, g, 8, kk, p.r_ldk, p.r_lgk, lane, ka);
          r_load8(smem, stv, g, 8, kv, p.r_ldv, p.r_lgv, lane, va);
#pragma unroll
          for (int u = 0; u < 8; ++u) {
            kstep(ka, u);
            vstep(va, u);
          }
        }
#pragma unroll 1
        for (int gk = g; gk < ngk; ++gk) {
          uint32_t ka[4];
          r_load8(smem, stk, gk, 8, kk, p.r_ldk, p.r_lgk, lane, ka);
#pragma unroll
          for (int u = 0; u < 8; ++u) kstep(ka, u);
        }
#pragma unroll 1
        for (int gv = g; gv < ngv; ++gv) {
          uint32_t va[4];
          r_load8(smem, stv, gv, 8, kv, p.r_ldv, p.r_lgv, lane, va);
#pragma unroll
          for (int u = 0; u < 8; ++u) vstep(va, u);
        }
        const int rk = kk & 7, rv = kv & 7;  // the last, partial groups
        if (rk) {
          uint32_t ka[4];
          r_load8(smem, stk, ngk, rk, kk, p.r_ldk, p.r_lgk, lane, ka);
#pragma unroll
          for (int u = 0; u < 7; ++u)
            if (u < rk) kstep(ka, u);
        }
        if (rv) {
          uint32_t va[4];
          r_load8(smem, stv, ngv, rv, kv, p.r_ldv, p.r_lgv, lane, va);
#pragma unroll
          for (int u = 0; u < 7; ++u)
            if (u < rv) vstep(va, u);
        }
      } else if (!COMPACT && fast) {
        uint32_t kr[kRKMax / 2], vr[kRKMax / 2];
        r_load_row(smem, stk, kk, p.r_ldk, p.r_lgk, lane, kr);
        r_load_row(smem, stv, kv, p.r_ldv, p.r_lgv, lane, vr);
        __syncwarp();
        if (nxt < ntc_here) stage(nxt, stk, stv);
        cp_async_commit();
        if (wt * kRRows + kRRows > p.Tc) {  // the last, partial tile: lanes without a row walk a synthetic row
#pragma unroll
          for (int i = 0; i < NW32; ++i) {
            kw[i] = valid ? kw[i] : synk[i];
            vw[i] = valid ? vw[i] : synv[i];
          }
#pragma unroll
          for (int i = 0; i < kRKMax / 2; ++i) vr[i] = valid ? vr[i] : 0u;  // ... and scatter zeros
        }
        auto wk = r_make_walk<NW32, QS>(kw, smem_s + (uint32_t)(4 * lane));
        auto wv = r_make_walk<NW32, kRLine>(vw, smem_s + vd + (uint32_t)(2 * lane));
        const int kmin = min(kk, kv), kmax = max(kk, kv);
        auto kstep = [&](int j) {
          const float qv = r_lds_f32(wk.next());
          if (j & 1) sc1 = fmaf(qv, r_half<T>(kr[j >> 1], 1), sc1);
          else sc0 = fmaf(qv, r_half<T>(kr[j >> 1], 0), sc0);
        };
        auto vstep = [&](int j) { r_sts_u16(wv.next(), (j & 1) ? (vr[j >> 1] >> 16) : vr[j >> 1]); };
#pragma unroll
        for (int g = 0; g < kRKMax / 8; ++g) {
          if (8 * g >= kmax) break;
          if (8 * g + 8 <= kmin) {
#pragma unroll
            for (int u = 0; u < 8; ++u) {
              kstep(8 * g + u);
              vstep(8 * g + u);
            }
          } else {
#pragma unroll
            for (int u = 0; u < 8; ++u) {
              if (8 * g + u < kk) kstep(8 * g + u);
              if (8 * g + u < kv) vstep(8 * g + u);
            }
          }
        }
      } else {
        // general path (rows with fewer than k values or an empty 32-bit word): values by index
        if (valid) {
          const int r = lane;
          int j = 0;
#pragma unroll
          for (int i = 0; i < NW32; ++i) {
            uint32_t w = kw[i];
            while (w != 0u && j < kk) {
              const int c = 32 * i + __ffs(w) - 1;
              w &= w - 1u;
              const uint32_t bits = *reinterpret_cast<const uint16_t*>(smem + stk + r_val_off(r, j, kk, p.r_ldk, p.r_lgk));
              const float qv = *reinterpret_cast<const float*>(smem + 4 * (c * 32 + lane));
              sc0 = fmaf(qv, r_half<T>(bits, 0), sc0);
              ++j;
            }
          }
          j = 0;
#pragma unroll
          for (int i = 0; i < NW32; ++i) {
            uint32_t w = vw[i];
            while (w != 0u && j < kv) {
              const int c = 32 * i + __ffs(w) - 1;
              w &= w - 1u;
              const uint16_t bits = *reinterpret_cast<const uint16_t*>(smem + stv + r_val_off(r, j, kv, p.r_ldv, p.r_lgv));
              *reinterpret_cast<uint16_t*>(smem + vd + c * kRLine + 2 * lane) = bits;
              ++j;
            }
          }
        }
        if constexpr (!COMPACT) {
          __syncwarp();
          if (nxt < ntc_here) stage(nxt, stk, stv);
          cp_async_commit();
        }
      }
      if constexpr (COMPACT) {  // the next compressed tile reads the other buffer
        stk = stk == stk0 ? stk0 + bufstep : stk0;
        stv = stv == stv0 ? stv0 + bufstep : stv0;
      }
      s = (valid && t >= ks) ? sc0 + sc1 : -INFINITY;
    } else {
      // ================= a dense window tile: lane owns channels lane + 32 j, rows one at a time
      const int w0 = (wt - ntc) * kRRows;
      const int nwin = min(kRRows, p.Tw - w0);
      float sc = 0.f;
#pragma unroll 1
      for (int rr = 0; rr < nwin; ++rr) {
        const T* kr = sl.kwin + (int64_t)(w0 + rr) * p.kwin_st;
        const uint16_t* vr = reinterpret_cast<const uint16_t*>(sl.vwin + (int64_t)(w0 + rr) * p.vwin_st);
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < CPL; ++j) part = fmaf(qw[j], to_f(kr[lane + 32 * j]), part);
#pragma unroll
        for (int off = 16; off >= 1; off >>= 1) part += __shfl_xor_sync(0xffffffffu, part, off);
        if (lane == rr) sc = part;
#pragma unroll
        for (int j = 0; j < CPL; ++j)
          *reinterpret_cast<uint16_t*>(smem + vd + (lane + 32 * j) * kRLine + 2 * rr) = vr[lane + 32 * j];
      }
      const int t = p.Tc + w0 + lane;
      s = (lane < nwin && t >= ks) ? sc : -INFINITY;
      __syncwarp();
    }

    // ================= online softmax of the tile's 32 scores (log2 domain) and O^T += V^T P^T
    float mt = s;
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
    const float mn = fmaxf(m, mt);
    float pv = 0.f;
    __syncwarp();  // every lane's V row is in Vd
    if (mn != -INFINITY) {
      if (mn > m) {  // warp-uniform: m, mt are the same in every lane
        const float alpha = exp2f(m - mn);  // 0 when m = -inf
#pragma unroll
        for (int n = 0; n < NMT; ++n) {
          o[n][0] *= alpha;
          o[n][1] *= alpha;
          o[n][2] *= alpha;
          o[n][3] *= alpha;
        }
        l *= alpha;
        m = mn;
      }
      pv = exp2f(s - m);
      l += pv;
      // B = P^T (16 tokens x 8 columns): lane holds tokens 2 (lane % 4) + {0, 1} (b0) and + 8 (b1) of
      // column lane / 4; only column 0 (the query head) is read back, the others are don't-cares.
      const int src = 2 * (lane & 3);
      uint32_t bq[2][2];
#pragma unroll
      for (int kx = 0; kx < 2; ++kx) {
        const float x0 = __shfl_sync(0xffffffffu, pv, 16 * kx + src);
        const float x1 = __shfl_sync(0xffffffffu, pv, 16 * kx + src + 1);
        const float y0 = __shfl_sync(0xffffffffu, pv, 16 * kx + src + 8);
        const float y1 = __shfl_sync(0xffffffffu, pv, 16 * kx + src + 9);
        bq[kx][0] = pack2<T>(x0, x1);
        bq[kx][1] = pack2<T>(y0, y1);
      }
#pragma unroll
      for (int n = 0; n < NMT; ++n) {
#pragma unroll
        for (int kx = 0; kx < 2; ++kx) {
          uint32_t a0, a1, a2, a3;
          ldmatrix_x4(ldm + (uint32_t)(n * 16 * kRLine + kx * 32), a0, a1, a2, a3);
          mma16816_full(o[n], a0, a1, a2, a3, bq[kx][0], bq[kx][1], kBf16);
        }
      }
    }
    __syncwarp();
    // zero the tile's 64 data bytes of every channel line (the dummy line D is never read)
#pragma unroll
    for (int e = lane; e < D * 4; e += 32)
      *reinterpret_cast<uint4*>(smem + vd + (e >> 2) * kRLine + (e & 3) * 16) = make_uint4(0u, 0u, 0u, 0u);
    __syncwarp();
  }
  cp_async_wait<0>();

  // ---- this warp's partial: O^T column 0 = lanes 4 i: channels 16 n + i (c0) and 16 n + i + 8 (c2)
  float lt = l;
#pragma unroll
  for (int off = 16; off >= 1; off >>= 1) lt += __shfl_xor_sync(0xffffffffu, lt, off);
  const int NP = p.nsplit * nwarps;
  const int64_t base = ((int64_t)b * p.Hkv + hk) * NP + split * nwarps + warp;
  if ((lane & 3) == 0) {
    float* op = p.ws_o + base * D + (lane >> 2);
#pragma unroll
    for (int n = 0; n < NMT; ++n) {
      op[16 * n] = o[n][0];
      op[16 * n + 8] = o[n][2];
    }
  }
  if (lane == 0) {
    p.ws_ml[base * 2] = m;
    p.ws_ml[base * 2 + 1] = lt;
  }
}

template <typename T, int D, bool COMPACT>
int sdr_occ_one(int nwarps, int smem_bytes) {
  auto kern = sd_rows_kernel<T, D, COMPACT>;
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, nwarps * 32, smem_bytes));
  return n;
}

template <typename T>
int sd_rows_blocks_per_sm(int D, bool compact, int nwarps, int smem_bytes);
template <typename T>
void launch_sd_rows(const SDParams& p, int D, bool compact, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream,
                    void* out, int NP, int64_t BHq);

#define MUSTAFAR_DEFINE_SDR_LAUNCHER(TYPE)                                                                       \
  template <>                                                                                                  \
  int sd_rows_blocks_per_sm<TYPE>(int D, bool compact, int nwarps, int smem_bytes) {                           \
    if (compact) return D == 64 ? sdr_occ_one<TYPE, 64, true>(nwarps, smem_bytes)                              \
                                : sdr_occ_one<TYPE, 128, true>(nwarps, smem_bytes);                            \
    return D == 64 ? sdr_occ_one<TYPE, 64, false>(nwarps, smem_bytes) : sdr_occ_one<TYPE, 128, false>(nwarps, smem_bytes); \
  }                                                                                                            \
  template <>                                                                                                  \
  void launch_sd_rows<TYPE>(const SDParams& p, int D, bool compact, int nwarps, int smem_bytes, dim3 grid,       \
                            cudaStream_t stream, void* out, int NP, int64_t BHq) {                             \
    auto go = [&](auto kern) {                                                                                 \
      if (smem_bytes > 48 * 1024)                                                                              \
        C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));   \
      kern<<<grid, nwarps * 32, smem_bytes, stream>>>(p);                                                      \
      MF_CHECK_LAUNCH();                                                                                       \
    };                                                                                                         \
    if (D == 64) {                                                                                             \
      if (compact) go(sd_rows_kernel<TYPE, 64, true>);                                                         \
      else go(sd_rows_kernel<TYPE, 64, false>);                                                                \
      sparse_decode_merge<TYPE, 64><<<(unsigned)BHq, 64, 0, stream>>>(p.ws_o, p.ws_ml, NP, (TYPE*)out);         \
    } else {                                                                                                   \
      if (compact) go(sd_rows_kernel<TYPE, 128, true>);                                                        \
      else go(sd_rows_kernel<TYPE, 128, false>);                                                               \
      sparse_decode_merge<TYPE, 128><<<(unsigned)BHq, 128, 0, stream>>>(p.ws_o, p.ws_ml, NP, (TYPE*)out);       \
    }                                                                                                          \
    MF_CHECK_LAUNCH();                                                                                         \
  }

}  // namespace mustafar_cuda
