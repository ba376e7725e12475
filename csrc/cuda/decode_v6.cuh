#pragma once
// v6 fused sparse decode for fp16 / bf16 with 1-8 query heads per KV head (1, 4 or 8 slots): the "row" kernel.
// Design, predictions and measurements: docs/kernel_notes.md (section v6).
//
// v5 (decode_v5.cuh) already works per *stored* value, but spends ~75 warp instructions per K+V row
// pair, most of them outside the per-value work: 64-row CTA tiles with separate K and V threads, two
// __syncthreads per tile, a CTA-wide staging loop and a softmax / P.V phase shared by 4 warps over
// 16 tokens each. v6 keeps the per-value idea and removes the rest:
//
//   * every warp is independent: it owns 32-row tiles (one row = one token per lane), two cp.async
//     stage buffers (the next tile lands while this one is walked) and its own dense V tile; no
//     __syncthreads after the start;
//   * one lane does both the K row and the V row of its token, each walked from both ends at once:
//     four independent dependency chains per thread (K up, K down, V up, V down);
//   * q sits in shared memory as fp32 (the per-value gather q[channel] costs ~1.24 wavefronts: at step j
//     the lanes' j-th stored channels lie close together, so they rarely share a bank);
//   * a walk step is 9 instructions with a 3-instruction dependency chain (RWalk), 8 where every row of the
//     tile lets each walk stay within three 32-bit words (r_short_ok);
//   * instantiations with k compiled in for the paper's settings at D = 128 (k = 38: 70 %, k = 64: 50 %),
//     a run-time-k one for any other k (the op's kernel="v6g" forces it);
//   * values are read from the stage buffer in groups of 8 per chain (32-bit loads when k/2 is odd,
//     16-byte loads of swizzled or odd-length rows when k % 8 == 0, 16-bit loads otherwise): small
//     loops for any k, and registers for four chains (a walk fully unrolled over k, with all values in
//     registers, fit only one chain per side and doubled the instruction-fetch stalls);
//   * V values are scattered into the warp's channel-major dense tile Vd[channel][token] and
//     O^T += V^T P^T runs on tensor cores (mma.m16n8k16, A = V^T by ldmatrix, B = P^T by shuffles, or
//     with four query heads as four of the mma's columns through a small per-warp P table).
//
// A tile whose rows are not all complete top-k rows without an empty 32-bit word (arbitrary masks)
// takes a general path: per-word loops over the set bits, values read from the stage buffer by index.
// Dense window rows take the same lane-per-row shape (a dense dot with q, the row copied into Vd).
// The warps of a CTA combine their (m, l, o) in shared memory into one partial per query head and split;
// sparse_decode_merge (merge.cuh) combines the splits' partials (as for v4 / v5, whose partials are per warp).

#include "common.cuh"

namespace mustafar_cuda {

constexpr int kRRows = 32;      // rows (tokens) per warp tile: one per lane
constexpr int kRLine = 80;      // bytes per channel line of a warp's dense V tile: 32 tokens + 16 B pad
constexpr int kRKMax = 64;      // most stored values per row (k_k and k_v): larger k go to v4 / v5
constexpr int kRMaxWarps = 12;  // warps per CTA at most (the host picks 4-12 by occupancy)
enum : int { kRLdAny = 0, kRLdPair = 1, kRLdOct = 2 };  // how a lane reads its row from the stage buffer

// v6's shared memory: q (fp32, GQ heads per channel), then one region per warp at off_vd + warp * r_wbytes
// (dense V tile + two K and V stage buffers at r_off_stk / r_off_stv, r_bufstep apart; with e4m3 values the stage
// buffers hold the bytes and one fp16 buffer per side at r_off_xk / r_off_xv the expanded tile); how K / V rows are
// read (kRLdAny / kRLdPair / kRLdOct) and log2 of the 16-byte chunks per row of a swizzled stage buffer
// (-1: contiguous rows)
struct V6Layout {
  int off_vd;
  int r_wbytes, r_off_stk, r_off_stv, r_bufstep, r_ldk, r_ldv, r_lgk, r_lgv;
  int r_off_xk, r_off_xv;  // e4m3 values: the expanded (fp16) K / V buffers of the current tile (one each)
};
struct V6Params : SDParams, V6Layout {};

// Walks over the stored channels of one row, for rows with exactly k stored values and no empty 32-bit
// word. UP = true: ascending from the lowest channel; UP = false: descending from the highest (on the
// bit-reversed words). A step clears the lowest set bit of the current word, w & (w - 1), whose and also
// sets the "word not empty" predicate; three selects shift the queue of remaining words and a predicated
// add moves adj by 32 slots. Only these (IADD, LOP3, SEL) form the dependency chain from one step to the
// next: the slot address, adj +/- bfind(w ^ (w & (w - 1))) * S with adj the slot of channel 32 i (up) or
// 32 i + 31 (down) of the current word i, is off it (bfind has a long latency; a walk that cleared the
// highest set bit with bfind + bmsk on the chain ran ~2x slower per step). 9 SASS instructions per step:
// IADD, LOP3, LOP3, FLO, IMAD, 3 SEL, IADD. Lanes without a row walk a synthetic complete row
// (r_synth_row): their slots are real, but their score is masked and their probability is 0.
//
// Q: how many words after the current one the walk may reach (NW - 1 in general). A walk over half of a
// row's values with NW = 4 reaches the far end word only when one end word holds more than half of the
// row's values; the host-independent check in the kernel (r_short_ok) lets such tiles use Q = 2: one
// select less per step.
template <int NW, int S, bool UP, int Q = NW - 1>
struct RWalk {
  uint32_t w, n1, n2, n3, adj;
  __device__ __forceinline__ uint32_t next() {
    constexpr int MS = UP ? S : -S;            // slot stride per bit index
    constexpr int WS = UP ? 32 * S : -32 * S;  // to the next word's slots
    uint32_t a;
    // the step up to the address and the predicate; %0 = address, %1 = w, then the queue, adj, MS, WS
#define MF_RWALK_STEP(ADJ, MSN)                                                                    \
  "{\n\t.reg .pred p;\n\t.reg .u32 pp, wm, wn, lb;\n\tadd.u32 wm, %1, -1;\n\tand.b32 wn, %1, wm;\n\t" \
  "xor.b32 lb, %1, wn;\n\tbfind.u32 pp, lb;\n\tmad.lo.u32 %0, pp, " MSN ", " ADJ ";\n\tsetp.ne.u32 p, wn, 0;\n\t"
    if constexpr (Q == 2) {
      asm(MF_RWALK_STEP("%4", "%5")
          "selp.b32 %1, wn, %2, p;\n\tselp.b32 %2, %2, %3, p;\n\t@!p add.u32 %4, %4, %6;\n\t}"
          : "=r"(a), "+r"(w), "+r"(n1), "+r"(n2), "+r"(adj)
          : "n"(MS), "n"(WS));
    } else if constexpr (Q >= 3) {
      asm(MF_RWALK_STEP("%5", "%6")
          "selp.b32 %1, wn, %2, p;\n\tselp.b32 %2, %2, %3, p;\n\tselp.b32 %3, %3, %4, p;\n\t"
          "@!p add.u32 %5, %5, %7;\n\t}"
          : "=r"(a), "+r"(w), "+r"(n1), "+r"(n2), "+r"(n3), "+r"(adj)
          : "n"(MS), "n"(WS));
    } else {
      asm(MF_RWALK_STEP("%3", "%4")
          "selp.b32 %1, wn, %2, p;\n\t@!p add.u32 %3, %3, %5;\n\t}"
          : "=r"(a), "+r"(w), "+r"(n1), "+r"(adj)
          : "n"(MS), "n"(WS));
    }
#undef MF_RWALK_STEP
    return a;
  }
};

template <int NW, int S, int Q = NW - 1>
__device__ __forceinline__ RWalk<NW, S, true, Q> r_walk_up(const uint32_t (&wd)[NW], uint32_t base) {
  RWalk<NW, S, true, Q> r;
  r.w = wd[0];
  r.n1 = wd[1];
  r.n2 = NW > 2 ? wd[NW > 2 ? 2 : 0] : 0u;
  r.n3 = NW > 3 ? wd[NW > 3 ? 3 : 0] : 0u;
  r.adj = base;
  return r;
}
template <int NW, int S, int Q = NW - 1>
__device__ __forceinline__ RWalk<NW, S, false, Q> r_walk_down(const uint32_t (&wd)[NW], uint32_t base) {
  RWalk<NW, S, false, Q> r;
  r.w = __brev(wd[NW - 1]);
  r.n1 = __brev(wd[NW - 2]);
  r.n2 = NW > 2 ? __brev(wd[NW > 2 ? NW - 3 : 0]) : 0u;
  r.n3 = NW > 3 ? __brev(wd[NW > 3 ? NW - 4 : 0]) : 0u;
  r.adj = base + (uint32_t)((32 * (NW - 1) + 31) * S);
  return r;
}

// A complete row with k stored values and no empty 32-bit word (k >= NW): the lowest channels of each word,
// k spread evenly over the words (so that it also passes r_short_ok).
template <int NW>
__device__ __forceinline__ void r_synth_row(int k, uint32_t (&wd)[NW]) {
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    const int n = k / NW + (i < k % NW ? 1 : 0);
    wd[i] = n >= 32 ? 0xffffffffu : ((1u << max(n, 0)) - 1u);
  }
}

// Whether the four walks of a row pair (NW = 4) stay within three words each: the upward walk (cu values
// from channel 0) never needs the top word, i.e. it holds at most cd = k - cu values, and the downward one
// never needs word 0 (at most cu values).
__device__ __forceinline__ bool r_short_ok(const uint32_t (&wd)[4], int cu, int cd) {
  return __popc(wd[0]) <= cu && __popc(wd[3]) <= cd;
}

__device__ __forceinline__ float r_lds_f32(uint32_t a) {
  float v;
  asm("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(a));
  return v;
}
// the GQ query heads' q at one channel (GQ = 1, 2, 4 or 8 consecutive fp32)
template <int GQ>
__device__ __forceinline__ void r_lds_q(uint32_t a, float (&q)[GQ]) {
  if constexpr (GQ == 8) {
    asm("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(q[0]), "=f"(q[1]), "=f"(q[2]), "=f"(q[3]) : "r"(a));
    asm("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(q[4]), "=f"(q[5]), "=f"(q[6]), "=f"(q[7]) : "r"(a + 16u));
  } else if constexpr (GQ == 4) {
    asm("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];" : "=f"(q[0]), "=f"(q[1]), "=f"(q[2]), "=f"(q[3]) : "r"(a));
  } else if constexpr (GQ == 2) {
    asm("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(q[0]), "=f"(q[1]) : "r"(a));
  } else {
    q[0] = r_lds_f32(a);
  }
}
__device__ __forceinline__ void r_sts_u16(uint32_t a, uint32_t v) {
  asm volatile("st.shared.u16 [%0], %1;" ::"r"(a), "h"((unsigned short)v) : "memory");
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
__device__ __forceinline__ void r_cp16(uint32_t dst_s, const char* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst_s), "l"(src));
}
// the same with a compile-time byte offset on both sides (folded into the instruction's addresses)
template <int OFF>
__device__ __forceinline__ void r_cp16_at(uint32_t dst_s, const char* src) {
  asm volatile("cp.async.cg.shared.global [%0+%2], [%1+%2], 16;\n" ::"r"(dst_s), "l"(src), "n"(OFF));
}
// lane's chunks lane + 32 j, j < J, of a whole tile (N16 chunks) at byte offsets d[j & 1] + 512 j (shared) and
// 16 lane + 512 j (global)
template <int N16, int J = 0>
__device__ __forceinline__ void r_cp_tile(uint32_t d_even, uint32_t d_odd, const char* s_lane, int lane) {
  if constexpr (J < (N16 + 31) / 32) {
    if (32 * (J + 1) <= N16 || lane + 32 * J < N16) r_cp16_at<512 * J>((J & 1) ? d_odd : d_even, s_lane);
    r_cp_tile<N16, J + 1>(d_even, d_odd, s_lane, lane);
  }
}
// ESZ: bytes per value (2; 1 for e4m3 rows, always staged contiguously: mode kRLdAny).
template <int KS, int ESZ = 2>  // KS > 0: k known at compile time (whole tiles take a loop of fixed trip count)
__device__ __forceinline__ void r_stage_side(char* smem, uint32_t dst, const char* src, int nc, int k, int mode, int lg,
                                             int vec16, int lane) {
  const int bytes = nc * k * ESZ;
  int done = 0;
  if constexpr (KS > 0 && (kRRows * KS * ESZ) % 16 == 0) {
    // a whole tile: N16 chunks, (N16 + 31) / 32 per lane at most, no loop; chunk lane + 32 j lands at
    // base + 512 j in the contiguous layout, and in the swizzled one with 8 chunks per row (lg = 3: 4 rows
    // per j, the swizzle r & 7 alternating with j) at base[j & 1] + 512 j
    if (vec16 && nc == kRRows && (!(mode == kRLdOct && lg >= 0) || lg == 3)) {
      constexpr int N16 = kRRows * KS * ESZ / 16;
      const uint32_t dst_s = (uint32_t)__cvta_generic_to_shared(smem) + dst;
      uint32_t d0 = dst_s + 16u * (uint32_t)lane, d1 = d0;
      if (mode == kRLdOct && lg == 3) {
        const int r = lane >> 3, c = lane & 7;
        d0 = dst_s + (uint32_t)(128 * r + 16 * (c ^ r));
        d1 = dst_s + (uint32_t)(128 * r + 16 * (c ^ r ^ 4));
      }
      r_cp_tile<N16>(d0, d1, src + 16 * lane, lane);
      return;
    }
  }
  if (vec16) {
    const int n16 = bytes >> 4;
    const uint32_t dst_s = (uint32_t)__cvta_generic_to_shared(smem) + dst;
    if (mode == kRLdOct && lg >= 0) {  // whole rows (k % 8 == 0)
      const int cm = (1 << lg) - 1;
      for (int i = lane; i < n16; i += 32) {
        const int r = i >> lg;
        r_cp16(dst_s + (uint32_t)(((r << lg) + r_swz(r, i & cm, lg)) << 4), src + 16 * i);
      }
      done = bytes;
    } else {
      const char* s = src + 16 * lane;
      uint32_t d = dst_s + 16u * (uint32_t)lane;
#pragma unroll 2
      for (int i = lane; i < n16; i += 32, s += 512, d += 512u) r_cp16(d, s);
      done = n16 << 4;
    }
  }
  if (done == bytes) return;
  if constexpr (ESZ == 1) {  // e4m3: byte copies of the rest (contiguous layout)
    for (int i = done + lane; i < bytes; i += 32) smem[dst + i] = src[i];
    return;
  }
  const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
  uint16_t* d16 = reinterpret_cast<uint16_t*>(smem + dst);
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

// values pos .. pos+7 of the lane's row (base = the row's start in the stage buffer) as 16-bit pairs v[0..3];
// only the first nv are read (the rest are 0). kRLdOct needs pos % 8 == 0, kRLdPair an even pos.
__device__ __forceinline__ void r_load8(const char* smem, uint32_t base, int pos, int nv, int mode, int lg, int lane,
                                        uint32_t (&v)[4]) {
  if (mode == kRLdOct) {
    const uint32_t off = lg >= 0 ? (uint32_t)(r_swz(lane, pos >> 3, lg) << 4) : (uint32_t)(pos << 1);
    const uint4 x = *reinterpret_cast<const uint4*>(smem + base + off);
    v[0] = x.x;
    v[1] = x.y;
    v[2] = x.z;
    v[3] = x.w;
  } else if (mode == kRLdPair) {
    const uint32_t a = base + (uint32_t)(2 * pos);
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = (2 * u < nv) ? *reinterpret_cast<const uint32_t*>(smem + a + 4 * u) : 0u;
  } else {
    const uint32_t a = base + (uint32_t)(2 * pos);
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const uint32_t lo = (2 * u < nv) ? *reinterpret_cast<const uint16_t*>(smem + a + 4 * u) : 0u;
      const uint32_t hi = (2 * u + 1 < nv) ? *reinterpret_cast<const uint16_t*>(smem + a + 4 * u + 2) : 0u;
      v[u] = lo | (hi << 16);
    }
  }
}

// start of the lane's row in a stage buffer
__device__ __forceinline__ uint32_t r_row_base(uint32_t st, int k, int mode, int lg, int lane) {
  if (mode == kRLdOct && lg >= 0) return st + (uint32_t)((lane << lg) << 4);
  return st + (uint32_t)(lane * k * 2);
}

// e4m3 rows: expand the staged bytes of rows [0, nc) (contiguous, row r at r * k, at src) into fp16 values in
// the 16-bit stage layout of (mode, lg) at dst, which the walks then read as for fp16 values. Contiguous layouts
// (kRLdPair / kRLdAny / kRLdOct with lg < 0) put value v at byte 2 v: one 32-bit load, two conversions and one
// 64-bit store per 4 values (the last word may convert up to 3 bytes past the rows: stale staged values, finite, into
// the buffer's slack). Swizzled rows (kRLdOct, lg >= 0, k % 8 == 0): one 16-byte chunk (8 values) at a time.
__device__ __forceinline__ void r_expand_e4m3(char* smem, uint32_t dst, uint32_t src, int nc, int k, int mode, int lg,
                                              int lane) {
  if (mode == kRLdOct && lg >= 0) {
    const int n8 = nc << lg, cm = (1 << lg) - 1;
    for (int i = lane; i < n8; i += 32) {
      const int r = i >> lg;
      const uint2 x = *reinterpret_cast<const uint2*>(smem + src + 8 * i);
      *reinterpret_cast<uint4*>(smem + dst + ((((r << lg) + r_swz(r, i & cm, lg))) << 4)) =
          make_uint4(e4m3x2_to_h2(x.x), e4m3x2_to_h2(x.x >> 16), e4m3x2_to_h2(x.y), e4m3x2_to_h2(x.y >> 16));
    }
  } else {
    const int nw = (nc * k + 3) >> 2;
    for (int i = lane; i < nw; i += 32) {
      const uint32_t x = *reinterpret_cast<const uint32_t*>(smem + src + 4 * i);
      *reinterpret_cast<uint2*>(smem + dst + 8 * i) = make_uint2(e4m3x2_to_h2(x), e4m3x2_to_h2(x >> 16));
    }
  }
}

// The host's choice of row layout for k values per row (plan.cu, v6_ld_mode): kRLdOct for k % 8 == 0
// with an odd (lg = -1, contiguous rows) or power-of-two (lg = log2 of the 16-byte chunks, swizzled) chunk
// count, kRLdPair for k % 4 == 2, kRLdAny otherwise.
constexpr int r_lg_of(int k) {
  if (k < 8 || k % 8 != 0 || (k / 8) % 2 == 1 || ((k / 8) & (k / 8 - 1)) != 0) return -1;
  int lg = 0;
  while ((1 << lg) < k / 8) ++lg;
  return lg;
}
constexpr int r_ld_of(int k) {
  if (k >= 8 && k % 8 == 0 && ((k / 8) % 2 == 1 || r_lg_of(k) >= 0)) return kRLdOct;
  return k % 4 == 2 ? kRLdPair : kRLdAny;
}

// LK, LV: how K / V rows are read (kRLdPair, kRLdOct) fixed at compile time, or -1: from p.r_ldk / p.r_ldv.
// KC > 0: k_k = k_v = KC known at compile time (the fast path's loops, the split of the middle values
// between the walks, staging and value addresses become constants; the host launches it only for
// p.kk == p.kv == KC), 0: read from p.
// GQ: query-head slots per KV head (1 = MHA, 4 or 8), p.G <= GQ of them real: G = 2, 3 run in 4 slots, G = 5-7
// in 8 (the spare slots get q = 0 and are not written out). q sits in shared memory channel-major with the GQ
// slots' fp32 values side by side, so a K walk step gathers all of them with one load (two for GQ = 8); the slots
// are the mma's columns (B = P^T, GQ of its 8 columns), the probabilities handed over through a small per-warp
// table.
// F8: both sides' stored values are e4m3 bytes with an fp16 scale per row (p.kscale / p.vscale): staged as bytes,
// expanded to fp16 in shared memory per tile (r_expand_e4m3), walked as fp16 values; the K scale multiplies the
// row's score, the V scale its probability in the P.V product (not in the softmax sum), which then runs in fp16
// also for bf16 models (dense window V rows converted to fp16 as they enter the dense tile).
// KT (the op's kernel "v6k", 16-bit values): the K dot products on tensor cores too. The tile's K rows are walked
// first (two chains: up and down), each step scattering its value into the warp's dense tile, Kd[channel][token]
// (the V tile's memory: one 16-bit store, as a V step does) instead of gathering the GQ slots' q (one or two 16-byte
// loads) and doing GQ FMAs; then S (32 tokens x 8 columns) = Kd^T q^T runs as 2 x D / 16 mma.m16n8k16 (A = Kd^T by
// transposed ldmatrix, B = the raw q of the group's heads, held in registers for the whole kernel; fp32
// accumulation, q's scale applied after) and goes back to lane = token through a table over the tile's first 1 KB;
// the tile is zeroed and the V rows walked into it as usual. The per-value K work no longer grows with G. (A dense K
// tile of its own per warp, keeping the four interleaved chains, was slower everywhere: ~10 KB more shared memory per
// warp cost a third of the resident warps; docs/kernel_notes.md, session 13.)
template <typename T, int D, int LK, int LV, int KC = 0, int GQ = 1, bool F8 = false, bool KT = false>
__global__ void __launch_bounds__(kRMaxWarps * 32, 1) sd_rows_kernel(const V6Params p) {
  static_assert(KC == 0 || (LK == r_ld_of(KC) && LV == r_ld_of(KC)), "KC needs its own row layout");
  static_assert(!(KT && F8), "K on tensor cores takes 16-bit values");
  static_assert(GQ == 1 || GQ == 2 || GQ == 4 || GQ == 8, "GQ: 1, 2, 4 or 8 query-head slots per KV head");
  constexpr int NW32 = D / 32;  // 32-bit bitmap words per row
  constexpr int W = D / 64;     // int64 bitmap words per row
  constexpr int NMT = D / 16;   // mma m-tiles (16 channels each) of O^T
  constexpr int QS = 4 * GQ;    // bytes between channels of q (GQ fp32 slots per channel)
  constexpr int kPOff = ((D + 1) * kRLine + 15) / 16 * 16;  // GQ > 1: the warp's P table [8 heads][32 tokens] (fp16/bf16)
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value && !F8;  // the P.V mma's type (fp16 for e4m3 V)
  using VT = typename std::conditional<F8, __half, T>::type;            // the stored values as walked
  extern __shared__ __align__(16) char smem[];

  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z;
  const int nwarps = (int)(blockDim.x >> 5);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  mf_pdl_launch_dependents();  // the merge kernel may launch now (it waits for this grid)
  const int ks = p.kv_start ? max(0, p.kv_start[b]) : 0;
  // Lengths: the host's (p.Tc compressed rows, p.Tw window rows in slots 0 .. Tw - 1), or read from device memory
  // (p.lengths = (n_c, n_w), clamped to the capacities p.Tc / p.Tw; the window a ring: row i in slot
  // (n_c + i) % p.Tw), so that one launch shape, planned for the capacities, serves every step of a CUDA graph;
  // the tiles are then shared out among the splits here, from the lengths of this call.
  int Tc = p.Tc, Tw = p.Tw;
  if (p.lengths != nullptr) {
    Tc = min(max(__ldg(p.lengths), 0), p.Tc);
    Tw = min(max(__ldg(p.lengths + 1), 0), p.Tw);
  }
  const int ntc = (Tc + kRRows - 1) / kRRows;
  const int nall = ntc + (Tw + kRRows - 1) / kRRows;
  // tiles per split in whole rounds of the CTA's warps, as the host plans them (the same split at full lengths)
  const int tps = p.lengths != nullptr ? ((nall + p.nsplit - 1) / p.nsplit + nwarps - 1) / nwarps * nwarps
                                       : p.tiles_per_split;
  const int wt0 = split * tps;
  const int wt1 = min(nall, wt0 + tps);
  const int ntc_here = min(wt1, ntc);
  const int kk = KC ? KC : p.kk, kv = KC ? KC : p.kv;
  const int ldk = LK >= 0 ? LK : p.r_ldk, ldv = LV >= 0 ? LV : p.r_ldv;
  const int lgk = KC ? r_lg_of(KC) : p.r_lgk, lgv = KC ? r_lg_of(KC) : p.r_lgv;

  // ---- this warp's region: dense V tile (D + 1 lines; line D is the dummy), two pairs of K / V stage
  // buffers. All zeroed, so stale stage data is always finite (lanes without a row scatter it with
  // probability 0).
  const uint32_t wreg = (uint32_t)(p.off_vd + warp * p.r_wbytes);
  const uint32_t vd = wreg;
  const uint32_t stk0 = wreg + (uint32_t)p.r_off_stk, stv0 = wreg + (uint32_t)p.r_off_stv;
  const uint32_t bufstep = (uint32_t)p.r_bufstep;
  for (int i = lane; i < p.r_wbytes / 16; i += 32)
    *reinterpret_cast<uint4*>(smem + wreg + 16 * i) = make_uint4(0u, 0u, 0u, 0u);
  __syncwarp();  // the zeros land before this warp's first cp.async into its stage buffers

  const SDSlice<T, F8 ? 1 : 2> sl(p, b, hk);
  auto stage = [&](int wt, uint32_t sk, uint32_t sv) {
    const int t0 = wt * kRRows;
    const int nc = min(kRRows, Tc - t0);
    if constexpr (F8) {  // the bytes, contiguous rows
      r_stage_side<KC, 1>(smem, sk, sl.kval + (int64_t)t0 * kk, nc, kk, kRLdAny, -1, p.vec16, lane);
      r_stage_side<KC, 1>(smem, sv, sl.vval + (int64_t)t0 * kv, nc, kv, kRLdAny, -1, p.vec16, lane);
    } else {
      r_stage_side<KC>(smem, sk, sl.kval + (int64_t)t0 * kk * 2, nc, kk, ldk, lgk, p.vec16, lane);
      r_stage_side<KC>(smem, sv, sl.vval + (int64_t)t0 * kv * 2, nc, kv, ldv, lgv, p.vec16, lane);
    }
  };
  // e4m3 values: the row scales of the lane's row of the next tile (1 where there is no row: finite)
  const __half* ksc = F8 ? p.kscale + b * p.ksc_sb + hk * p.ksc_sh : nullptr;
  const __half* vsc = F8 ? p.vscale + b * p.vsc_sb + hk * p.vsc_sh : nullptr;
  float kscn = 1.f, vscn = 1.f;
  auto load_bm = [&](int wt, uint32_t (&kw)[NW32], uint32_t (&vw)[NW32]) {
    const int t = wt * kRRows + lane;
    if constexpr (F8) {
      const bool has = wt < ntc_here && t < Tc;
      kscn = has ? __half2float(ksc[t]) : 1.f;
      vscn = has ? __half2float(vsc[t]) : 1.f;
    }
    if (wt < ntc_here && t < Tc) {
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

  float m[GQ], l[GQ];  // per query head (the same in every lane: warp-uniform)
#pragma unroll
  for (int g = 0; g < GQ; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
  }
  float o[NMT][4];  // O^T: channels x (query head = mma column)
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
  // per chain: full groups of 8 values from each end, the middle rest split between the two walks (all
  // of it to the upward walk for k < 16)
  const int nfk = kk >> 4, nfv = kv >> 4, nf = min(nfk, nfv);
  const int mk = kk - 16 * nfk, mv = kv - 16 * nfv;
  const int muk = nfk ? (mk + 1) >> 1 : mk, muv = nfv ? (mv + 1) >> 1 : mv;  // middle values walked upward
  const int mdk = mk - muk, mdv = mv - muv;                                    // ... and downward
  int wt = wt0 + warp;
  uint32_t stk = stk0, stv = stv0;  // the current tile's stage buffers
  if (wt < ntc_here) stage(wt, stk, stv);
  cp_async_commit();
  load_bm(wt, kwn, vwn);

  // ---- q, read while the first tile is on its way: scaled by scale * log2 e, as fp32 at byte 4 c, q[D] = 0
  // (dummy). The gather q[channel] of a walk step costs ~1.24 shared-memory wavefronts on random top-k rows
  // (the lanes' j-th stored channels lie close together), measured against 1.0 for a private copy per lane
  // that took 16 KB.
  // With GQ slots: float (c * GQ + g) holds head g's channel c (query head hk * G + g; 0 in the spare slots g >= G).
  const int G = GQ == 1 ? 1 : p.G;  // real query heads per KV head (<= GQ)
  const T* qp = reinterpret_cast<const T*>(p.q) + ((int64_t)b * p.Hkv + hk) * G * D;
  for (int i = tid; i < (D + 4) * GQ; i += (int)blockDim.x) {
    const int c = i / GQ, g = i - c * GQ;
    *reinterpret_cast<float*>(smem + 4 * i) = (c < D && g < G) ? to_f(qp[g * D + c]) * p.qscale : 0.f;
  }
  // KT: the B operand of S = Kd^T q^T, per k-step of 16 channels: head lane / 4 (0 past G), channels
  // 16 j + 2 (lane % 4) + {0, 1} (qf[j][0]) and + 8 (qf[j][1]), unscaled (exact in T)
  uint32_t qf[KT ? D / 16 : 1][2];
  const uint32_t kdt = vd;  // KT: the dense tile the K values go to (the V tile, before the V rows)
  // zero the dense tile's 64 data bytes of every channel line (the dummy line D is never read): chunk
  // (lane >> 3) & 3 of lines 8 i + (lane & 7), so the 8 lanes of a 128-byte phase hit 8 bank groups
  auto zero_vd = [&]() {
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
      *reinterpret_cast<uint4*>(smem + vd + (8 * i + (lane & 7)) * kRLine + ((lane >> 3) & 3) * 16) =
          make_uint4(0u, 0u, 0u, 0u);
  };
  if constexpr (KT) {
    const int h = lane >> 2, c0 = 2 * (lane & 3);
#pragma unroll
    for (int j = 0; j < D / 16; ++j) {
      float x[4] = {0.f, 0.f, 0.f, 0.f};
      if (h < G) {
        const T* qh = qp + h * D + 16 * j + c0;
        x[0] = to_f(qh[0]);
        x[1] = to_f(qh[1]);
        x[2] = to_f(qh[8]);
        x[3] = to_f(qh[9]);
      }
      qf[j][0] = pack2<T>(x[0], x[1]);
      qf[j][1] = pack2<T>(x[2], x[3]);
    }
  }
  __syncthreads();  // q is shared by the CTA's warps

#pragma unroll 1
  for (; wt < wt1; wt += nwarps) {
    const int nxt = wt + nwarps;
    float s[GQ];
    float vrow = 1.f;  // e4m3 V: the lane's row scale, applied to its probability in the P.V product
    if (wt < ntc) {
      // ================= a compressed tile: lane = row
      const int t = wt * kRRows + lane;
      const bool valid = t < Tc;
      uint32_t kw[NW32], vw[NW32];
#pragma unroll
      for (int i = 0; i < NW32; ++i) {
        kw[i] = kwn[i];
        vw[i] = vwn[i];
      }
      const float krow = kscn;  // e4m3 K: the lane's row scale (1 without e4m3 values)
      vrow = vscn;
      load_bm(nxt, kwn, vwn);  // prefetch
      const bool fast = kfast_ok && __all_sync(0xffffffffu, !valid || (reg_walk_ok<NW32>(kw, kk) && reg_walk_ok<NW32>(vw, kv)));
      // the next tile into the other buffers (free: every lane finished reading them last iteration), then
      // wait for this one
      if (nxt < ntc_here) stage(nxt, stk == stk0 ? stk0 + bufstep : stk0, stv == stv0 ? stv0 + bufstep : stv0);
      cp_async_commit();
      cp_async_wait<1>();
      __syncwarp();
      uint32_t ek = stk, ev = stv;  // where this tile's values are walked from
      if constexpr (F8) {  // the staged bytes -> fp16 in the 16-bit layout of (ldk, lgk) / (ldv, lgv)
        const int ncur = min(kRRows, Tc - wt * kRRows);
        ek = wreg + (uint32_t)p.r_off_xk;
        ev = wreg + (uint32_t)p.r_off_xv;
        r_expand_e4m3(smem, ek, stk, ncur, kk, ldk, lgk, lane);
        r_expand_e4m3(smem, ev, stv, ncur, kv, ldv, lgv, lane);
        __syncwarp();
      }
      float sa[GQ], sb[GQ];  // K scores of the up / down walks, per query head
#pragma unroll
      for (int g = 0; g < GQ; ++g) sa[g] = sb[g] = 0.f;
      if (fast) {
        if (wt * kRRows + kRRows > Tc) {  // the last, partial tile: lanes without a row walk a synthetic row
#pragma unroll
          for (int i = 0; i < NW32; ++i) {
            kw[i] = valid ? kw[i] : synk[i];
            vw[i] = valid ? vw[i] : synv[i];
          }
        }
        const uint32_t kb = r_row_base(ek, kk, ldk, lgk, lane);
        const uint32_t vb = r_row_base(ev, kv, ldv, lgv, lane);
        const uint32_t qb = smem_s, vdb = smem_s + vd + (uint32_t)(2 * lane);
        // the K walks' slots: q's channels (fp32 x GQ), or with KT the lane's column of the dense tile
        constexpr int KS = KT ? kRLine : QS;
        const uint32_t kbase = KT ? smem_s + kdt + (uint32_t)(2 * lane) : qb;
        // SIDE: 3 both sides' walks interleaved (four chains), 1 the K walks only, 2 the V walks only (KT)
        auto walk_tile = [&](auto q_tag, auto side_tag) {
          constexpr int Q = decltype(q_tag)::value;
          constexpr bool DK = (decltype(side_tag)::value & 1) != 0, DV = (decltype(side_tag)::value & 2) != 0;
          auto ku = r_walk_up<NW32, KS, Q>(kw, kbase);
          auto kd = r_walk_down<NW32, KS, Q>(kw, kbase);
          auto vu = r_walk_up<NW32, kRLine, Q>(vw, vdb);
          auto vdn = r_walk_down<NW32, kRLine, Q>(vw, vdb);
          // value u of a group of 8 (x: 4 packed pairs)
          auto kstep = [&](auto& wk, float (&sc)[GQ], const uint32_t (&x)[4], int u) {
            if constexpr (KT) {  // into the dense tile; S comes from the mma below
              r_sts_u16(wk.next(), (u & 1) ? (x[u >> 1] >> 16) : x[u >> 1]);
            } else {
              float qv[GQ];
              r_lds_q<GQ>(wk.next(), qv);
              const float xv = r_half<VT>(x[u >> 1], u & 1);
#pragma unroll
              for (int g = 0; g < GQ; ++g) sc[g] = fmaf(qv[g], xv, sc[g]);
            }
          };
          auto vstep = [&](auto& wv, const uint32_t (&x)[4], int u) {
            r_sts_u16(wv.next(), (u & 1) ? (x[u >> 1] >> 16) : x[u >> 1]);
          };
          int g = 0;
#pragma unroll 1
          for (; DK && DV && g < nf; ++g) {  // both sides, four chains: values 8g.. upward, kk-1-8g.. downward
            uint32_t a0[4], a1[4], b0[4], b1[4];
            r_load8(smem, kb, 8 * g, 8, ldk, lgk, lane, a0);
            r_load8(smem, kb, kk - 8 * g - 8, 8, ldk, lgk, lane, a1);
            r_load8(smem, vb, 8 * g, 8, ldv, lgv, lane, b0);
            r_load8(smem, vb, kv - 8 * g - 8, 8, ldv, lgv, lane, b1);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
              kstep(ku, sa, a0, u);
              kstep(kd, sb, a1, 7 - u);
              vstep(vu, b0, u);
              vstep(vdn, b1, 7 - u);
            }
          }
#pragma unroll 1
          for (int gk = g; DK && gk < nfk; ++gk) {
            uint32_t a0[4], a1[4];
            r_load8(smem, kb, 8 * gk, 8, ldk, lgk, lane, a0);
            r_load8(smem, kb, kk - 8 * gk - 8, 8, ldk, lgk, lane, a1);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
              kstep(ku, sa, a0, u);
              kstep(kd, sb, a1, 7 - u);
            }
          }
#pragma unroll 1
          for (int gv = g; DV && gv < nfv; ++gv) {
            uint32_t b0[4], b1[4];
            r_load8(smem, vb, 8 * gv, 8, ldv, lgv, lane, b0);
            r_load8(smem, vb, kv - 8 * gv - 8, 8, ldv, lgv, lane, b1);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
              vstep(vu, b0, u);
              vstep(vdn, b1, 7 - u);
            }
          }
          // the middle: muk values upward from 8 nfk (two windows when k < 16), mdk downward from kk - 8 nfk - 1
          if (DK && mk) {
            uint32_t a0[4], a1[4];
            r_load8(smem, kb, 8 * nfk, min(muk, 8), ldk, lgk, lane, a0);
            if (mdk) r_load8(smem, kb, kk - 8 * nfk - 8, 8, ldk, lgk, lane, a1);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
              if (u < muk) kstep(ku, sa, a0, u);
              if (u < mdk) kstep(kd, sb, a1, 7 - u);
            }
            if (muk > 8) {  // k < 16 only
              r_load8(smem, kb, 8, muk - 8, ldk, lgk, lane, a0);
#pragma unroll
              for (int u = 0; u < 7; ++u)
                if (u < muk - 8) kstep(ku, sa, a0, u);
            }
          }
          if (DV && mv) {
            uint32_t b0[4], b1[4];
            r_load8(smem, vb, 8 * nfv, min(muv, 8), ldv, lgv, lane, b0);
            if (mdv) r_load8(smem, vb, kv - 8 * nfv - 8, 8, ldv, lgv, lane, b1);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
              if (u < muv) vstep(vu, b0, u);
              if (u < mdv) vstep(vdn, b1, 7 - u);
            }
            if (muv > 8) {
              r_load8(smem, vb, 8, muv - 8, ldv, lgv, lane, b0);
#pragma unroll
              for (int u = 0; u < 7; ++u)
                if (u < muv - 8) vstep(vu, b0, u);
            }
          }
        };
        // three-word walks when every row of the tile allows them (r_short_ok), else the general queue
        bool sq = false;
        if constexpr (NW32 == 4)
          sq = __all_sync(0xffffffffu, r_short_ok(kw, 8 * nfk + muk, mdk + 8 * nfk) &&
                                           r_short_ok(vw, 8 * nfv + muv, mdv + 8 * nfv));
        auto walk = [&](auto side_tag) {
          if (sq) walk_tile(std::integral_constant<int, NW32 >= 4 ? 2 : NW32 - 1>{}, side_tag);
          else walk_tile(std::integral_constant<int, NW32 - 1>{}, side_tag);
        };
        walk(std::integral_constant<int, KT ? 1 : 3>{});  // KT: K first, through the V tile
        if constexpr (KT) {
          // S (tokens x 8 columns) = Kd^T q^T: two m-tiles of 16 tokens, D / 16 k-steps. ldmatrix.trans row address
          // of this lane: matrix i = lane / 8 -> tokens + 8 if i odd, channels + 8 if i >= 2
          __syncwarp();  // every lane's K row is in Kd
          const uint32_t kld = smem_s + kdt + (uint32_t)(((lane & 7) + ((lane >> 4) & 1) * 8) * kRLine +
                                                         ((lane >> 3) & 1) * 16);
          float c[2][4];
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            c[mt][0] = c[mt][1] = c[mt][2] = c[mt][3] = 0.f;
#pragma unroll
            for (int j = 0; j < D / 16; ++j) {
              uint32_t a0, a1, a2, a3;
              ldmatrix_x4_trans(kld + (uint32_t)(j * 16 * kRLine + mt * 32), a0, a1, a2, a3);
              mma16816_full(c[mt], a0, a1, a2, a3, qf[j][0], qf[j][1], kBf16);
            }
          }
          __syncwarp();  // Kd read: its first 1 KB becomes the score table [token][8 columns] (fp32)
          float* tab = reinterpret_cast<float*>(smem + kdt);
          const int r0 = lane >> 2, c0 = 2 * (lane & 3);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            *reinterpret_cast<float2*>(tab + (16 * mt + r0) * 8 + c0) = make_float2(c[mt][0], c[mt][1]);
            *reinterpret_cast<float2*>(tab + (16 * mt + r0 + 8) * 8 + c0) = make_float2(c[mt][2], c[mt][3]);
          }
          __syncwarp();
#pragma unroll
          for (int g = 0; g < GQ; ++g) sa[g] = tab[lane * 8 + g] * p.qscale;
          __syncwarp();
          zero_vd();
          __syncwarp();  // zeros in before the V walks scatter into the same tile
          walk(std::integral_constant<int, 2>{});
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
              const uint32_t bits = *reinterpret_cast<const uint16_t*>(smem + ek + r_val_off(r, j, kk, ldk, lgk));
              const float xv = r_half<VT>(bits, 0);
#pragma unroll
              for (int g = 0; g < GQ; ++g) sa[g] = fmaf(*reinterpret_cast<const float*>(smem + QS * c + 4 * g), xv, sa[g]);
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
              const uint16_t bits = *reinterpret_cast<const uint16_t*>(smem + ev + r_val_off(r, j, kv, ldv, lgv));
              *reinterpret_cast<uint16_t*>(smem + vd + c * kRLine + 2 * lane) = bits;
              ++j;
            }
          }
        }
      }
      // the next compressed tile reads the other buffers
      stk = stk == stk0 ? stk0 + bufstep : stk0;
      stv = stv == stv0 ? stv0 + bufstep : stv0;
#pragma unroll
      for (int g = 0; g < GQ; ++g) s[g] = (valid && t >= ks) ? (F8 ? (sa[g] + sb[g]) * krow : sa[g] + sb[g]) : -INFINITY;
    } else {
      // ================= a dense window tile: lane = row, as for a compressed tile (its K dot with q, and
      // its V row into Vd); rows are read with 32-bit loads (the host makes window rows 4-byte aligned)
      const int w0 = (wt - ntc) * kRRows;
      const int nwin = min(kRRows, Tw - w0);
      const bool valid = lane < nwin;
      float sc[GQ];
#pragma unroll
      for (int g = 0; g < GQ; ++g) sc[g] = 0.f;
      if (valid) {
        const int64_t slot = p.lengths != nullptr ? (Tc + w0 + lane) % p.Tw : w0 + lane;  // window ring
        const uint32_t* kr = reinterpret_cast<const uint32_t*>(sl.kwin + slot * p.kwin_st);
        const uint32_t* vr = reinterpret_cast<const uint32_t*>(sl.vwin + slot * p.vwin_st);
        float s0[GQ], s1[GQ];
#pragma unroll
        for (int g = 0; g < GQ; ++g) s0[g] = s1[g] = 0.f;
#pragma unroll 8
        for (int c2 = 0; c2 < D / 2; ++c2) {
          const uint32_t x = kr[c2];
          float qa[GQ], qb2[GQ];
          r_lds_q<GQ>(smem_s + (uint32_t)(QS * 2 * c2), qa);
          r_lds_q<GQ>(smem_s + (uint32_t)(QS * (2 * c2 + 1)), qb2);
#pragma unroll
          for (int g = 0; g < GQ; ++g) {
            s0[g] = fmaf(qa[g], r_half<T>(x, 0), s0[g]);
            s1[g] = fmaf(qb2[g], r_half<T>(x, 1), s1[g]);
          }
        }
#pragma unroll
        for (int g = 0; g < GQ; ++g) sc[g] = s0[g] + s1[g];
#pragma unroll 8
        for (int c2 = 0; c2 < D / 2; ++c2) {
          uint32_t x = vr[c2];
          if constexpr (F8 && std::is_same<T, __nv_bfloat16>::value) {  // the dense tile is fp16 (e4m3 V)
            const float2 f = unpack2<__nv_bfloat16>(x);
            x = pack2<__half>(f.x, f.y);
          }
          *reinterpret_cast<uint16_t*>(smem + vd + (2 * c2) * kRLine + 2 * lane) = (uint16_t)x;
          *reinterpret_cast<uint16_t*>(smem + vd + (2 * c2 + 1) * kRLine + 2 * lane) = (uint16_t)(x >> 16);
        }
      }
      const int t = Tc + w0 + lane;
#pragma unroll
      for (int g = 0; g < GQ; ++g) s[g] = (valid && t >= ks) ? sc[g] : -INFINITY;
    }

    // ================= online softmax of the tile's 32 scores per head (log2 domain) and O^T += V^T P^T
    float mn[GQ];
    bool grow = false;
#pragma unroll
    for (int g = 0; g < GQ; ++g) {
      float mt = s[g];
#pragma unroll
      for (int off = 16; off >= 1; off >>= 1) mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, off));
      mn[g] = fmaxf(m[g], mt);
      grow = grow || mn[g] > m[g];
    }
    __syncwarp();  // every lane's V row is in Vd
    if (mn[0] != -INFINITY) {  // masks are per token: every head's max is -inf or none is
      if (grow) {  // warp-uniform: m, mt are the same in every lane
        float alpha[GQ];
#pragma unroll
        for (int g = 0; g < GQ; ++g) {
          alpha[g] = exp2f(m[g] - mn[g]);  // 0 when m = -inf
          l[g] *= alpha[g];
          m[g] = mn[g];
        }
        // this lane's O^T columns (heads) 2 (lane % 4) and + 1 (columns >= GQ are unused)
        float a0 = alpha[0], a1 = alpha[GQ > 1 ? 1 : 0];
#pragma unroll
        for (int h = 1; h < GQ / 2; ++h)
          if ((lane & 3) == h) {
            a0 = alpha[2 * h];
            a1 = alpha[2 * h + 1];
          }
#pragma unroll
        for (int n = 0; n < NMT; ++n) {
          o[n][0] *= a0;
          o[n][1] *= a1;
          o[n][2] *= a0;
          o[n][3] *= a1;
        }
      }
      float pv[GQ];
#pragma unroll
      for (int g = 0; g < GQ; ++g) {
        pv[g] = exp2f(s[g] - m[g]);
        l[g] += pv[g];
        if constexpr (F8) pv[g] *= vrow;  // P.V only: O = sum_t p_t (vscale_t v8_t)
      }
      // B = P^T (16 tokens x 8 columns): lane holds tokens 2 (lane % 4) + {0, 1} (b0) and + 8 (b1) of
      // column lane / 4.
      uint32_t bq[2][2];
      if constexpr (GQ == 1) {  // by shuffles; only column 0 (the query head) is read back, the others are don't-cares
        const int src = 2 * (lane & 3);
#pragma unroll
        for (int kx = 0; kx < 2; ++kx) {
          const float x0 = __shfl_sync(0xffffffffu, pv[0], 16 * kx + src);
          const float x1 = __shfl_sync(0xffffffffu, pv[0], 16 * kx + src + 1);
          const float y0 = __shfl_sync(0xffffffffu, pv[0], 16 * kx + src + 8);
          const float y1 = __shfl_sync(0xffffffffu, pv[0], 16 * kx + src + 9);
          bq[kx][0] = pack2<VT>(x0, x1);
          bq[kx][1] = pack2<VT>(y0, y1);
        }
      } else {  // through the warp's P table [head][token]: rows GQ..7 stay zero (columns not read back)
        const uint32_t pt = smem_s + vd + (uint32_t)kPOff;
#pragma unroll
        for (int g = 0; g < GQ; ++g) r_sts_u16(pt + (uint32_t)(2 * (32 * g + lane)), pack2<VT>(pv[g], 0.f));
        __syncwarp();
        const uint32_t rd = pt + (uint32_t)(2 * (32 * (lane >> 2) + 2 * (lane & 3)));
#pragma unroll
        for (int kx = 0; kx < 2; ++kx) {
          asm volatile("ld.shared.b32 %0, [%1];" : "=r"(bq[kx][0]) : "r"(rd + 32u * kx) : "memory");
          asm volatile("ld.shared.b32 %0, [%1];" : "=r"(bq[kx][1]) : "r"(rd + 32u * kx + 16u) : "memory");
        }
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
    zero_vd();
    __syncwarp();
  }
  cp_async_wait<0>();

  // ---- the CTA's partial, one per real query head (NP = nsplit partials per head for the merge, not one per
  // warp: at batch 1 the splits are many and the merge's round trips grew with nsplit * nwarps). Each warp puts
  // its (O, m, l) into the start of its own region (its tiles are done: cp.async drained above), row stride
  // D + 4 floats so that the four heads a store instruction writes fall in different banks; then the warps'
  // partials are combined per (head, channel) with the CTA's maximum, as the merge kernel does across CTAs.
  // O^T column j (head hk * G + j) = lanes 4 i + j / 2, c0 / c1 (j even / odd): channels 16 n + i,
  // c2 / c3: channels 16 n + i + 8.
  constexpr int DS = D + 4;  // floats per head row of a warp's O in shared memory
  static_assert(GQ * DS * 4 + 2 * GQ * 4 <= (D + 1) * kRLine, "a warp's partial fits its dense V tile");
  float lt[GQ];
#pragma unroll
  for (int g = 0; g < GQ; ++g) {
    lt[g] = l[g];
#pragma unroll
    for (int off = 16; off >= 1; off >>= 1) lt[g] += __shfl_xor_sync(0xffffffffu, lt[g], off);
  }
  {
    float* po = reinterpret_cast<float*>(smem + wreg);
    const int j0 = 2 * (lane & 3), i0 = lane >> 2;
#pragma unroll
    for (int n = 0; n < NMT; ++n) {
      if (j0 < G) {
        po[j0 * DS + 16 * n + i0] = o[n][0];
        po[j0 * DS + 16 * n + i0 + 8] = o[n][2];
      }
      if (GQ > 1 && j0 + 1 < G) {
        po[(j0 + 1) * DS + 16 * n + i0] = o[n][1];
        po[(j0 + 1) * DS + 16 * n + i0 + 8] = o[n][3];
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int g = 0; g < GQ; ++g) {
        po[GQ * DS + 2 * g] = m[g];
        po[GQ * DS + 2 * g + 1] = lt[g];
      }
    }
  }
  __syncthreads();  // every warp's partial is in shared memory
  const int NP = p.nsplit;
  const int64_t hq0 = ((int64_t)b * p.Hkv + hk) * G;  // b * H_q + the group's first query head
  for (int e = tid; e < G * D; e += (int)blockDim.x) {
    const int g = e / D, c = e - g * D;
    float M = -INFINITY;
    for (int w = 0; w < nwarps; ++w)
      M = fmaxf(M, *reinterpret_cast<const float*>(smem + p.off_vd + w * p.r_wbytes + 4 * (GQ * DS + 2 * g)));
    float a = 0.f, L = 0.f;
    if (M != -INFINITY) {
      for (int w = 0; w < nwarps; ++w) {
        const float* pw = reinterpret_cast<const float*>(smem + p.off_vd + w * p.r_wbytes);
        const float mw = pw[GQ * DS + 2 * g];
        const float r = mw == -INFINITY ? 0.f : exp2f(mw - M);  // an empty warp (no rows) adds nothing
        a += r * pw[g * DS + c];
        L += r * pw[GQ * DS + 2 * g + 1];
      }
    }
    p.ws_o[((hq0 + g) * NP + split) * D + c] = a;
    if (c == 0) {
      p.ws_ml[((hq0 + g) * NP + split) * 2] = M;
      p.ws_ml[((hq0 + g) * NP + split) * 2 + 1] = L;
    }
  }
}

template <typename T, int D, int GQ, bool F8 = false, bool KT = false>
int sdr_occ_one(int nwarps, int smem_bytes) {
  auto kern = sd_rows_kernel<T, D, -1, -1, 0, GQ, F8, KT>;  // about the resources of the specialised instantiations
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, nwarps * 32, smem_bytes));
  return n;
}

// query-head slots of v6 for G query heads per KV head (1, 4 or 8; G <= 8)
constexpr int v6_slots(int G) { return G == 1 ? 1 : G <= 4 ? 4 : 8; }

// the instantiation for p: GQ query-head slots per KV head (1, 4 or 8), e4m3 values (F8) or not, k compiled in (fixed_k and k_k = k_v = 38 or
// 64 at D = 128: the paper's 70 % and 50 %), else the row layouts compiled in where common (MHA only:
// 70 %: k/2 odd; 50 %: k % 8 == 0), else everything read at run time
template <typename K>
void sdr_go(K kern, const V6Params& p, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream) {
  if (smem_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
  kern<<<grid, nwarps * 32, smem_bytes, stream>>>(p);
  MF_CHECK_LAUNCH();
}

template <typename T, int GQ, bool F8 = false>
void sdr_launch(const V6Params& p, int D, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream, bool fixed_k) {
  auto go = [&](auto kern) { sdr_go(kern, p, nwarps, smem_bytes, grid, stream); };
  const bool pp = p.r_ldk == kRLdPair && p.r_ldv == kRLdPair, oo = p.r_ldk == kRLdOct && p.r_ldv == kRLdOct;
  if constexpr (F8) {  // e4m3 values: k compiled in for 38 / 64 at D = 128, else the run-time instantiation
    if (D == 64) return go(sd_rows_kernel<T, 64, -1, -1, 0, GQ, true>);
    if (fixed_k && p.kk == 38 && p.kv == 38) return go(sd_rows_kernel<T, 128, kRLdPair, kRLdPair, 38, GQ, true>);
    if (fixed_k && p.kk == 64 && p.kv == 64) return go(sd_rows_kernel<T, 128, kRLdOct, kRLdOct, 64, GQ, true>);
    return go(sd_rows_kernel<T, 128, -1, -1, 0, GQ, true>);
  } else {
    if (D == 64) {
      if constexpr (GQ == 1) {
        if (pp) return go(sd_rows_kernel<T, 64, kRLdPair, kRLdPair>);
        if (oo) return go(sd_rows_kernel<T, 64, kRLdOct, kRLdOct>);
      }
      return go(sd_rows_kernel<T, 64, -1, -1, 0, GQ>);
    }
    if (fixed_k && p.kk == 38 && p.kv == 38) return go(sd_rows_kernel<T, 128, kRLdPair, kRLdPair, 38, GQ>);
    if (fixed_k && p.kk == 64 && p.kv == 64) return go(sd_rows_kernel<T, 128, kRLdOct, kRLdOct, 64, GQ>);
    if constexpr (GQ == 1) {
      if (pp) return go(sd_rows_kernel<T, 128, kRLdPair, kRLdPair>);
      if (oo) return go(sd_rows_kernel<T, 128, kRLdOct, kRLdOct>);
    }
    go(sd_rows_kernel<T, 128, -1, -1, 0, GQ>);
  }
}

// kernel "v6k" (KT: K on tensor cores, 16-bit values), in translation units of their own (decode_v6_k_*.cu): k compiled
// in for k_k = k_v = 38 and 64 at D = 128 with 4 or 8 query-head slots (fixed_k), else the run-time-k instantiation
template <typename T, int GQ>
void sdr_launch_kt(const V6Params& p, int D, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream, bool fixed_k) {
  auto go = [&](auto kern) { sdr_go(kern, p, nwarps, smem_bytes, grid, stream); };
  if (D == 64) return go(sd_rows_kernel<T, 64, -1, -1, 0, GQ, false, true>);
  if constexpr (GQ > 1) {
    if (fixed_k && p.kk == 38 && p.kv == 38) return go(sd_rows_kernel<T, 128, kRLdPair, kRLdPair, 38, GQ, false, true>);
    if (fixed_k && p.kk == 64 && p.kv == 64) return go(sd_rows_kernel<T, 128, kRLdOct, kRLdOct, 64, GQ, false, true>);
  }
  go(sd_rows_kernel<T, 128, -1, -1, 0, GQ, false, true>);
}
template <typename T>
int v6_blocks_per_sm_kt(int D, int G, int nwarps, int smem_bytes);
template <typename T>
void launch_v6_kt(const V6Params& p, int D, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream, bool fixed_k);

// kt: K dot products on tensor cores ("v6k") or on the CUDA cores
template <typename T>
int v6_blocks_per_sm(int D, int G, bool f8, bool kt, int nwarps, int smem_bytes);
template <typename T>
void launch_v6(const V6Params& p, int D, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream, bool fixed_k,
               bool f8, bool kt);
// the e4m3-valued instantiations, in translation units of their own (decode_v6_f8_*.cu) so that ninja builds
// them in parallel with the 16-bit ones
template <typename T>
int v6_blocks_per_sm_f8(int D, int G, int nwarps, int smem_bytes);
template <typename T>
void launch_v6_f8(const V6Params& p, int D, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream, bool fixed_k);

// occupancy and launch of v6 for one value type and query-head slots (1 / 4 / 8) picked at run time
template <typename T, int D, bool F8, bool KT = false>
int sdr_occ(int G, int nwarps, int smem_bytes) {
  const int s = v6_slots(G);
  return s == 1 ? sdr_occ_one<T, D, 1, F8, KT>(nwarps, smem_bytes)
         : s == 4 ? sdr_occ_one<T, D, 4, F8, KT>(nwarps, smem_bytes) : sdr_occ_one<T, D, 8, F8, KT>(nwarps, smem_bytes);
}
template <typename T, bool F8>
void sdr_launch_slots(const V6Params& p, int D, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream, bool fixed_k) {
  const int s = v6_slots(p.G);
  if (s == 8) sdr_launch<T, 8, F8>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);
  else if (s == 4) sdr_launch<T, 4, F8>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);
  else sdr_launch<T, 1, F8>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);
}

// 16-bit values (and the entry points, which hand e4m3 values to launch_v6_f8)
#define MUSTAFAR_DEFINE_V6_LAUNCHER(TYPE)                                                                       \
  template <>                                                                                                  \
  int v6_blocks_per_sm<TYPE>(int D, int G, bool f8, bool kt, int nwarps, int smem_bytes) {                     \
    if (f8) return v6_blocks_per_sm_f8<TYPE>(D, G, nwarps, smem_bytes);                                        \
    if (kt) return v6_blocks_per_sm_kt<TYPE>(D, G, nwarps, smem_bytes);                                        \
    return D == 64 ? sdr_occ<TYPE, 64, false>(G, nwarps, smem_bytes) : sdr_occ<TYPE, 128, false>(G, nwarps, smem_bytes); \
  }                                                                                                            \
  template <>                                                                                                  \
  void launch_v6<TYPE>(const V6Params& p, int D, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream, \
                       bool fixed_k, bool f8, bool kt) {                                                       \
    if (f8) launch_v6_f8<TYPE>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);                               \
    else if (kt) launch_v6_kt<TYPE>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);                          \
    else sdr_launch_slots<TYPE, false>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);                       \
  }

// e4m3 values on both sides
#define MUSTAFAR_DEFINE_V6_F8_LAUNCHER(TYPE)                                                                    \
  template <>                                                                                                  \
  int v6_blocks_per_sm_f8<TYPE>(int D, int G, int nwarps, int smem_bytes) {                                    \
    return D == 64 ? sdr_occ<TYPE, 64, true>(G, nwarps, smem_bytes) : sdr_occ<TYPE, 128, true>(G, nwarps, smem_bytes); \
  }                                                                                                            \
  template <>                                                                                                  \
  void launch_v6_f8<TYPE>(const V6Params& p, int D, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream, \
                          bool fixed_k) {                                                                      \
    sdr_launch_slots<TYPE, true>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);                             \
  }

// K on tensor cores (kernel "v6k"), 16-bit values
#define MUSTAFAR_DEFINE_V6_KT_LAUNCHER(TYPE)                                                                    \
  template <>                                                                                                  \
  int v6_blocks_per_sm_kt<TYPE>(int D, int G, int nwarps, int smem_bytes) {                                    \
    return D == 64 ? sdr_occ<TYPE, 64, false, true>(G, nwarps, smem_bytes)                                     \
                   : sdr_occ<TYPE, 128, false, true>(G, nwarps, smem_bytes);                                   \
  }                                                                                                            \
  template <>                                                                                                  \
  void launch_v6_kt<TYPE>(const V6Params& p, int D, int nwarps, int smem_bytes, dim3 grid, cudaStream_t stream,  \
                          bool fixed_k) {                                                                      \
    const int s = v6_slots(p.G);                                                                               \
    if (s == 8) sdr_launch_kt<TYPE, 8>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);                       \
    else if (s == 4) sdr_launch_kt<TYPE, 4>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);                  \
    else sdr_launch_kt<TYPE, 1>(p, D, nwarps, smem_bytes, grid, stream, fixed_k);                              \
  }

}  // namespace mustafar_cuda
