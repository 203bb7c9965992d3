// int4 (and, on AVX2, int8) decode products in integers: the activations quantized to int8 and multiplied with the
// stored nibbles (bytes) in byte dot products, vpdpbusd on AVX512-VNNI, vpmaddubsw + vpmaddwd on AVX2 (the same
// int32 sums).
//
// native.cpp's int4 kernel widens every weight to fp32 (a table lookup per 16 values) and multiplies in fp32: with
// 4 bits a weight, that arithmetic, not memory, bounds a decode step (AVX2, AMD EPYC Zen 3, docs/results/kernels.md:
// 12 G weights/s, 6 GB/s of a 32 GB/s machine). Here the activation rows are quantized once per call, in blocks of
// 32 inputs (scale = max|x| / 127, q = round-half-even(x / scale), the Q8_0 blocks of llama.cpp's and OpenVINO's
// int4 decode), and each 64-byte run of a weight row (128 values) meets them in two dot products: byte products
// summed in fours into 16 int32 lanes, exact. The nibbles are used as stored (q + 8, unsigned, what both
// instructions' unsigned operand wants); the 8 * sum(x_q) that adds is taken off by starting each sum at
// -8 * sum(x_q), computed once per activation row. On AVX2, vpmaddubsw's 16-bit pair sums cannot saturate
// (2 * 15 * 127 < 2^15) and vpmaddwd by ones adds the pairs into the same int32 lanes vpdpbusd fills.
//
// Rounding: the activations' int8 rounding (a relative error of at most 1/254 of each block's largest value), then
// every product and every sum within 128 inputs is exact; the blocks' sums are scaled and accumulated in fp32.
// formats/int4.py documents this as the "vnni" / "maddubs" kernels' rounding; the chooser offers them beside the
// exact kernels.
//
// Axes: M activation rows, I in features, O out features, G groups per row (I / group), C chunks of 128 inputs.

#include "native.h"

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

using namespace native;

namespace {

constexpr int64_t kBlock = 32;   // inputs sharing one activation scale
constexpr int64_t kChunk = 128;  // inputs per pair of dot products: 64 weight bytes, their low and high nibbles

#if defined(__AVX512VNNI__) || !defined(NATIVE_AVX512)
#define NATIVE_INT4_DOT 1

// 64 bytes, or 16 int32 lanes (lane k: bytes 4k .. 4k + 3).
#ifdef NATIVE_AVX512
using B64 = __m512i;
inline B64 load64(const void* p) { return _mm512_loadu_si512(p); }
inline B64 low_nibbles(B64 b) { return _mm512_and_si512(b, _mm512_set1_epi8(0x0F)); }
inline B64 high_nibbles(B64 b) { return _mm512_and_si512(_mm512_srli_epi16(b, 4), _mm512_set1_epi8(0x0F)); }
inline B64 dot4(B64 acc, B64 u, B64 s) { return _mm512_dpbusd_epi32(acc, u, s); }  // acc + u (unsigned) . s (signed)
inline V as_floats(B64 lanes) { return _mm512_cvtepi32_ps(lanes); }
#else
struct B64 {
  __m256i lo, hi;  // bytes 0-31 (lanes 0-7), 32-63 (lanes 8-15)
};
inline B64 load64(const void* p) {
  return {_mm256_loadu_si256((const __m256i*)p), _mm256_loadu_si256((const __m256i*)p + 1)};
}
inline B64 low_nibbles(B64 b) {
  const __m256i n = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(b.lo, n), _mm256_and_si256(b.hi, n)};
}
inline B64 high_nibbles(B64 b) {
  const __m256i n = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(_mm256_srli_epi16(b.lo, 4), n), _mm256_and_si256(_mm256_srli_epi16(b.hi, 4), n)};
}
inline __m256i dot4_8(__m256i acc, __m256i u, __m256i s) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}
inline B64 dot4(B64 acc, B64 u, B64 s) { return {dot4_8(acc.lo, u.lo, s.lo), dot4_8(acc.hi, u.hi, s.hi)}; }
inline V as_floats(B64 lanes) { return {_mm256_cvtepi32_ps(lanes.lo), _mm256_cvtepi32_ps(lanes.hi)}; }
#endif

// The activation rows, quantized and laid out the way a chunk's weight bytes meet them. For chunk c, byte b of a
// weight row's 64 holds input 128c + 2b (low nibble) and 128c + 2b + 1 (high); int32 lane k of a dot product sums
// bytes 4k .. 4k + 3, so inputs 128c + 8k .. 128c + 8k + 7, all in block 4c + k / 4.
struct Activations {
  int64_t C;
  std::vector<int8_t> lo, hi;  // (M, C, 64): the even and the odd inputs of each chunk
  std::vector<int32_t> bias;   // (M, C, 16): -8 * the lane's sum of q (the nibbles' + 8, taken off)
  std::vector<float> scale;    // (M, C, 16): the lane's block scale

  Activations(const float* x, int64_t M, int64_t I)
      : C(I / kChunk), lo(M * I / 2), hi(M * I / 2), bias(M * I / 8), scale(M * I / 8) {
    alignas(64) int32_t q[kChunk];
    const V lim = vset(127.0f), neg = vset(-127.0f);
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < C; ++c) {
        const float* v = x + m * I + c * kChunk;
        float block_scale[kChunk / kBlock];
        for (int64_t b = 0; b < kChunk / kBlock; ++b) {
          const float* in = v + b * kBlock;
          const float amax = vmaxlane(vmax(vabs(vload(in)), vabs(vload(in + 16))));
          const float s = amax / 127.0f;
          block_scale[b] = s;
          if (!(amax > 0)) {
            std::fill(q + b * kBlock, q + (b + 1) * kBlock, 0);
            continue;
          }
          const Divisor div(s);
          for (int h = 0; h < 2; ++h) quantize_ints(in + 16 * h, div, neg, lim, q + b * kBlock + 16 * h);
        }
        const int64_t at = (m * C + c);
        for (int64_t b = 0; b < 64; ++b) {
          lo[at * 64 + b] = (int8_t)q[2 * b];
          hi[at * 64 + b] = (int8_t)q[2 * b + 1];
        }
        for (int64_t k = 0; k < 16; ++k) {
          int32_t sum = 0;
          for (int64_t j = 0; j < 8; ++j) sum += q[8 * k + j];
          bias[at * 16 + k] = -8 * sum;
          scale[at * 16 + k] = block_scale[k / 4];
        }
      }
    }
  }
};

#ifndef NATIVE_AVX512
// AVX2: output rows [o0, o1), R at a time (kDotRows below: one), each 64-byte run taken as its two 32-byte halves
// (int32 lanes 0-7, then 8-15). Why not the B64 loop below: on AVX2's 16 registers its two-row block held 24 values
// at once, and GCC kept the accumulators on the stack, a store and a load in every chunk's dependency chain (and an
// integer division for the group's scale): 30 G weights/s a core in cache (AMD EPYC Zen 3, by hand); here 35. A
// half's live values fit the 16 registers, and the low and high nibbles' pair sums add in 16 bits before one
// vpmaddwd (each at most 2 x 15 x 127, their sum under 2^15): the same exact int32 sums as the B64 loop.
template <int M, int R>
void int4_dot_rows(const Activations& a, const uint8_t* w, const Scales& s, float* y, int64_t I, int64_t O,
                   int64_t group, int64_t o0, int64_t o1) {
  const int64_t half = I / 2, G = I / group, per_group = group / kChunk, C = a.C;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    __m256 acc[R][M][2];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m][0] = acc[r][m][1] = _mm256_setzero_ps();
    const int next = rows_ahead<R>(o, o1);  // fetched ahead (native.h)
    const uint8_t* ahead = next ? w + (o + R * kAheadBlocks) * half : w;  // (no pointer past the weight)
    __m256 ws[R];
    for (int64_t c = 0, g = 0, in_group = 0; c < C; ++c) {
      for (int r = 0; r < next; ++r) fetch_ahead(ahead + r * half + c * 64);
      if (in_group == 0)  // a new group: its row scales (group / 128 chunks share one)
        for (int r = 0; r < R; ++r) ws[r] = _mm256_set1_ps(s[(o + r) * G + g]);
      if (++in_group == per_group) in_group = 0, ++g;
      for (int h = 0; h < 2; ++h) {
        __m256i lo[R], hi[R];
        for (int r = 0; r < R; ++r) {
          const __m256i b = _mm256_loadu_si256((const __m256i*)(w + (o + r) * half + c * 64 + 32 * h));
          lo[r] = _mm256_and_si256(b, nib);
          hi[r] = _mm256_and_si256(_mm256_srli_epi16(b, 4), nib);
        }
        for (int m = 0; m < M; ++m) {
          const int64_t at = m * C + c;
          const __m256i xl = _mm256_loadu_si256((const __m256i*)(a.lo.data() + at * 64 + 32 * h));
          const __m256i xh = _mm256_loadu_si256((const __m256i*)(a.hi.data() + at * 64 + 32 * h));
          for (int r = 0; r < R; ++r) {
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo[r], xl), _mm256_maddubs_epi16(hi[r], xh));
            const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(pairs, ones),
                                                 _mm256_loadu_si256((const __m256i*)(a.bias.data() + at * 16 + 8 * h)));
            const __m256 xs = _mm256_loadu_ps(a.scale.data() + at * 16 + 8 * h);
            acc[r][m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(xs, ws[r]), acc[r][m][h]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * O + o + r] = vsum({acc[r][m][0], acc[r][m][1]});
  }
  if (o < o1) int4_dot_rows<M, 1>(a, w, s, y, I, O, group, o, o1);
}
#else
// Output rows [o0, o1), R at a time: each chunk's R weight runs are unpacked once and meet every activation row.
template <int M, int R>
void int4_dot_rows(const Activations& a, const uint8_t* w, const Scales& s, float* y, int64_t I, int64_t O,
                   int64_t group, int64_t o0, int64_t o1) {
  const int64_t half = I / 2, G = I / group, per_group = group / kChunk, C = a.C;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    V acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = vzero();
    const int next = rows_ahead<R>(o, o1);  // fetched ahead (native.h)
    const uint8_t* ahead = next ? w + (o + R * kAheadBlocks) * half : w;  // (no pointer past the weight)
    for (int64_t c = 0; c < C; ++c) {
      for (int r = 0; r < next; ++r) fetch_ahead(ahead + r * half + c * 64);
      B64 lo[R], hi[R];
      V ws[R];
      for (int r = 0; r < R; ++r) {
        const B64 b = load64(w + (o + r) * half + c * 64);
        lo[r] = low_nibbles(b);
        hi[r] = high_nibbles(b);
        ws[r] = vset(s[(o + r) * G + c / per_group]);
      }
      for (int m = 0; m < M; ++m) {
        const int64_t at = m * C + c;
        const B64 xl = load64(a.lo.data() + at * 64), xh = load64(a.hi.data() + at * 64);
        const B64 start = load64(a.bias.data() + at * 16);
        const V xs = vload(a.scale.data() + at * 16);
        for (int r = 0; r < R; ++r) {
          const B64 sum = dot4(dot4(start, lo[r], xl), hi[r], xh);
          acc[r][m] = vfmadd(as_floats(sum), vmul(xs, ws[r]), acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * O + o + r] = vsum(acc[r][m]);
  }
  if (o < o1) int4_dot_rows<M, 1>(a, w, s, y, I, O, group, o, o1);
}
#endif  // AVX-512

#endif  // an integer dot product

#if defined(NATIVE_INT4_DOT)
// --- int8 weights: the same activation blocks against signed bytes ----------------------------------------------
// Both instructions multiply unsigned by signed bytes: |w| times x_q with w's sign moved onto it (AVX2: vpsignb,
// llama.cpp's trick for Q8_0; AVX-512, which has no vpsignb: x_q negated under the mask of w's sign bits). A zero w
// zeroes the product, as it should. AVX2's pair sums stay within 2 * 127 * 127 < 2^15; vpdpbusd sums in 32 bits.
// Exact int8 decodes widen every byte to fp32 (native.cpp): on AVX2 that kept them at ~0.7 of the memory rate, on an
// AMX Xeon at ~0.75 (20.8 G weights/s in the caches against 22.6 GB/s of DRAM, docs/results/kernels.md).
#define NATIVE_INT8_DOT 1

// x_q (M, stride) int8 in input order, rows zero-padded to a multiple of 64 inputs, and one scale per block of 32
// inputs (M, stride / 32; a padded block's scale is 0).
struct Blocks {
  int64_t stride;
  std::vector<int8_t> q;
  std::vector<float> scale;
  Blocks(const float* x, int64_t M, int64_t I)
      : stride((I + 63) / 64 * 64), q(M * stride, 0), scale(M * stride / kBlock, 0.0f) {
    alignas(64) int32_t v[kBlock];
    const V lim = vset(127.0f), neg = vset(-127.0f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < I / kBlock; ++b) {
        const float* in = x + m * I + b * kBlock;
        const float amax = vmaxlane(vmax(vabs(vload(in)), vabs(vload(in + 16))));
        const float sc = amax / 127.0f;
        scale[m * stride / kBlock + b] = sc;
        if (!(amax > 0)) continue;  // q stays 0
        const Divisor div(sc);
        for (int h = 0; h < 2; ++h) quantize_ints(in + 16 * h, div, neg, lim, v + 16 * h);
        for (int64_t k = 0; k < kBlock; ++k) q[m * stride + b * kBlock + k] = (int8_t)v[k];
      }
  }
};
#endif

#ifndef NATIVE_AVX512
// Output rows [o0, o1), R at a time; each 32-byte run of a row is one activation block: its 8 int32 lanes are
// scaled by the block's scale (fp32) and summed, then the row's sum by the row's scale.
template <int M, int R>
void int8_dot_rows(const Blocks& a, const int8_t* w, const Scales& s, float* y, int64_t I, int64_t O, int64_t o0,
                   int64_t o1) {
  const int64_t B = I / kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    __m256 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    const int next = rows_ahead<R>(o, o1);
    const int8_t* ahead = next ? w + (o + R * kAheadBlocks) * I : w;  // (no pointer past the weight)
    for (int64_t b = 0; b < B; ++b) {
      if (b % 2 == 0)
        for (int r = 0; r < next; ++r) fetch_ahead(ahead + r * I + b * kBlock);
      __m256i wv[R], wabs[R];
      for (int r = 0; r < R; ++r) {
        wv[r] = _mm256_loadu_si256((const __m256i*)(w + (o + r) * I + b * kBlock));
        wabs[r] = _mm256_abs_epi8(wv[r]);
      }
      for (int m = 0; m < M; ++m) {
        const __m256i xq = _mm256_loadu_si256((const __m256i*)(a.q.data() + m * a.stride + b * kBlock));
        const __m256 xs = _mm256_set1_ps(a.scale[m * a.stride / kBlock + b]);
        for (int r = 0; r < R; ++r) {
          const __m256i sum = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[r], _mm256_sign_epi8(xq, wv[r])), ones);
          acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), xs, acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * O + o + r] = vsum({acc[r][m], _mm256_setzero_ps()}) * s[o + r];
  }
  if (o < o1) int8_dot_rows<M, 1>(a, w, s, y, I, O, o, o1);
}
#elif defined(NATIVE_INT8_DOT)
// AVX512-VNNI: output rows [o0, o1), R at a time; each 64-byte run of a row is two activation blocks: int32 lanes
// 0-7 the first's, 8-15 the second's, each lane scaled by its block's scale (fp32) and summed, then the row's sum by
// the row's scale. In features a multiple of 32: a row's last half run is loaded masked (its lanes' scales are 0).
template <int M, int R>
void int8_dot_rows(const Blocks& a, const int8_t* w, const Scales& s, float* y, int64_t I, int64_t O, int64_t o0,
                   int64_t o1) {
  const int64_t runs = a.stride / 64;
  const __m512i zero = _mm512_setzero_si512();
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    V acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = vzero();
    const int next = rows_ahead<R>(o, o1);
    const int8_t* ahead = next ? w + (o + R * kAheadBlocks) * I : w;  // (no pointer past the weight)
    for (int64_t k = 0; k < runs; ++k) {
      for (int r = 0; r < next; ++r) fetch_ahead(ahead + r * I + k * 64);
      const __mmask64 in_row = I - k * 64 >= 64 ? ~0ULL : (1ULL << (I - k * 64)) - 1;
      __m512i wabs[R];
      __mmask64 negative[R];
      for (int r = 0; r < R; ++r) {
        const __m512i wv = _mm512_maskz_loadu_epi8(in_row, w + (o + r) * I + k * 64);
        wabs[r] = _mm512_abs_epi8(wv);
        negative[r] = _mm512_movepi8_mask(wv);
      }
      for (int m = 0; m < M; ++m) {
        const __m512i xq = _mm512_loadu_si512((const void*)(a.q.data() + m * a.stride + k * 64));
        const float* bs = a.scale.data() + m * a.stride / kBlock + 2 * k;
        const V xs = _mm512_insertf32x8(_mm512_set1_ps(bs[0]), _mm256_set1_ps(bs[1]), 1);
        for (int r = 0; r < R; ++r) {
          const __m512i sum = dpbusd(zero, wabs[r], _mm512_mask_sub_epi8(xq, negative[r], zero, xq));
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), xs, acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * O + o + r] = vsum(acc[r][m]) * s[o + r];
  }
  if (o < o1) int8_dot_rows<M, 1>(a, w, s, y, I, O, o, o1);
}
#endif  // the int8 dot products

// Output rows a block of the decodes below takes, from native.h's int4_blocking's R: on AVX2 one. Two rows side by
// side with the rows ahead fetched into L2 (fetch_ahead) streamed int4 at 20-21 GB/s and int8 at 23 from DRAM; one
// row at a time, a thread's rows are one sequential stream, which the hardware prefetcher follows: 24-26 and 25-26
// GB/s (M = 1, 16384 x 2048 layers, the two builds alternating in one process; AMD EPYC Zen 3, by hand). Each
// output's sums are the same in either blocking.
template <int R>
inline constexpr int kDotRows = kVectorRegisters == 32 ? R : 1;

}  // namespace

// Which byte dot product this build's gemv_int4_dot and gemv_int8_dot use: "vnni" (AVX512-VNNI), "maddubs" (AVX2),
// or "" (an AVX-512 CPU without VNNI: none).
std::string int8_dot() {
#ifndef NATIVE_INT4_DOT
  return "";
#elif defined(NATIVE_AVX512)
  return "vnni";
#else
  return "maddubs";
#endif
}

// x (..., I) @ W^T for W in compressed-tensors' int4 layout (native.cpp gemv_int4), groups a multiple of 128.
torch::Tensor gemv_int4_dot(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                            int64_t group) {
#ifdef NATIVE_INT4_DOT
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == torch::kUInt8,
              "a contiguous (O, I/2) uint8 weight");
  const int64_t O = packed.size(0), I = packed.size(1) * 2;
  TORCH_CHECK(group % kChunk == 0 && I % group == 0, "groups of a multiple of 128 that divide the row");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == O && scale.size(1) == I / group, "scale (O, I / group)");
  auto xr = as_f32_rows(x, I);
  const int64_t M = xr.size(0);
  const Activations a(xr.data_ptr<float>(), M, I);
  const auto s = scale.contiguous();
  const Scales sp(s);
  auto y = torch::empty({M, O}, torch::kFloat32);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, O, kGrain, [&](int64_t o0, int64_t o1) {
    int4_blocking(M, [&](auto m, auto r) {
      int4_dot_rows<decltype(m)::value, kDotRows<decltype(r)::value>>(a, wp, sp, yp, I, O, group, o0, o1);
    });
  });
  return shaped_output(x, y, O);
#else
  TORCH_CHECK(false, "built for a CPU without an integer dot product (AVX512-VNNI or AVX2)");
#endif
}

// x (..., I) @ (q (O, I) int8 * scale (O,))^T (native.cpp gemv_int8) with the activations in blocks of 32 inputs,
// I a multiple of 32 (int8_dot(): "maddubs" or "vnni").
torch::Tensor gemv_int8_dot(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
#ifdef NATIVE_INT8_DOT
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8, "a contiguous (O, I) int8 weight");
  const int64_t O = q.size(0), I = q.size(1);
  TORCH_CHECK(I % kBlock == 0, "in features a multiple of 32");
  TORCH_CHECK(scale.numel() == O, "one scale per output row");
  auto xr = as_f32_rows(x, I);
  const int64_t M = xr.size(0);
  const Blocks a(xr.data_ptr<float>(), M, I);
  const auto s = scale.reshape({O}).contiguous();
  const Scales sp(s);
  auto y = torch::empty({M, O}, torch::kFloat32);
  const int8_t* wp = q.data_ptr<int8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, O, kGrain, [&](int64_t o0, int64_t o1) {
    int4_blocking(M, [&](auto m, auto r) {
      int8_dot_rows<decltype(m)::value, kDotRows<decltype(r)::value>>(a, wp, sp, yp, I, O, o0, o1);
    });
  });
  return shaped_output(x, y, O);
#else
  TORCH_CHECK(false, "built for a CPU without an integer dot product (AVX512-VNNI or AVX2)");
#endif
}
