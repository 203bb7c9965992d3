// What native.cpp's decode products, native_attention.cpp's decode attention and native_vnni.cpp's integer products
// share: the loads that widen each stored type to 16 fp32 values, the product of a few fp32 activation rows with
// rows of such values, and a layer's scales read as stored.
//
// Axes: M activation rows, I in features, O out features.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace native {

inline constexpr int64_t kMaxRows = 16;  // decode: one token per sequence, at most this many sequences
inline constexpr int64_t kGrain = 16;    // output rows per task: enough to hide the task start, small enough to balance

// --- 16 fp32 lanes, on AVX-512 (one register) or AVX2 (two) ------------------------------------------------------
// Every kernel below and in native.cpp / native_attention.cpp / native_decode.cpp is written on `V` and these few
// functions, so the same loops run on CPUs with AVX-512 and on those with AVX2 only (AMD Zen 3 and older, Intel's
// client cores since Alder Lake: most laptops). On AVX-512 each is the one instruction it names; native_vnni*.cpp
// are AVX-512 only. `n` arguments: the first n lanes (0..16), the others 0 (loads) or untouched (stores).
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define NATIVE_AVX512 1
inline constexpr int kVectorRegisters = 32;
using V = __m512;
inline __mmask16 first(int64_t n) { return (__mmask16)((1u << std::clamp<int64_t>(n, 0, 16)) - 1); }
inline V vzero() { return _mm512_setzero_ps(); }
inline V vset(float a) { return _mm512_set1_ps(a); }
inline V vload(const float* p) { return _mm512_loadu_ps(p); }
inline V vload(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first(n), p); }
inline void vstore(float* p, V v) { _mm512_storeu_ps(p, v); }
inline void vstore(float* p, V v, int64_t n) { _mm512_mask_storeu_ps(p, first(n), v); }
inline void vstream(float* p, V v) { _mm512_stream_ps(p, v); }  // p 64-byte aligned
inline V vadd(V a, V b) { return _mm512_add_ps(a, b); }
inline V vsub(V a, V b) { return _mm512_sub_ps(a, b); }
inline bool vany_gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ) != 0; }  // a lane with a > b
inline bool vany_nan(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) != 0; }
inline int vfirst_eq(V a, V b) {  // the first lane with a == b, or -1
  const unsigned m = _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ);
  return m ? __builtin_ctz(m) : -1;
}
inline V vmul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V vdiv(V a, V b) { return _mm512_div_ps(a, b); }
inline V vmin(V a, V b) { return _mm512_min_ps(a, b); }
inline V vmax(V a, V b) { return _mm512_max_ps(a, b); }
inline V vfmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }    // a * b + c, one rounding
inline V vfnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b, one rounding
inline V vneg(V a) { return _mm512_xor_ps(a, _mm512_set1_ps(-0.0f)); }
inline V vabs(V a) { return _mm512_abs_ps(a); }
inline V vround(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }  // to even
inline V vscale2(V p, V n) { return _mm512_scalef_ps(p, n); }  // p * 2^n, n integral, rounded once
inline float vsum(V a) { return _mm512_reduce_add_ps(a); }
inline float vmaxlane(V a) { return _mm512_reduce_max_ps(a); }
// v rounded to bf16 (round to nearest even, a NaN stays a quiet NaN) and widened back, as fp32 bits.
inline V vround_bf16(V v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_and_si512(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)),
                               _mm512_set1_epi32((int)0xFFFF0000));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(r);
}
inline V vround_f16(V v) { return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT)); }
// 16 stored 16-bit / 8-bit values -> V.
inline V widen_bf16(const uint16_t* p) {  // bf16 is the top half of an fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline V widen_bf16(const uint16_t* p, int64_t n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first(n), p)), 16));
}
inline V widen_f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
inline V widen_f16(const uint16_t* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), p)); }
inline V widen_i8(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
inline V widen_i8(const int8_t* p, int64_t n) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(first(n), p)));
}
// 16 packed bytes (32 int4 values) -> the values of their low nibbles and of their high nibbles looked up in
// `table` (16 entries): lo[k] = table[b[k] & 15], hi[k] = table[b[k] >> 4].
inline void nibbles(const uint8_t* p, V table, V& lo, V& hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  lo = _mm512_permutexvar_ps(b, table);  // vpermps reads the index's low 4 bits
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}
// 32 values lo[0], hi[0], lo[1], hi[1], ... stored at p (streamed where `stream`: p 64-byte aligned).
inline void store_interleaved(float* p, V lo, V hi, bool stream) {
  const __m512i first8 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second8 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const V a = _mm512_permutex2var_ps(lo, first8, hi), c = _mm512_permutex2var_ps(lo, second8, hi);
  if (stream) {
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + 16, c);
  } else {
    _mm512_storeu_ps(p, a);
    _mm512_storeu_ps(p + 16, c);
  }
}
// 16 int32s (already rounded and clamped to [-128, 127]) stored as int32s / as int8s.
inline void store_ints(int32_t* out, V q) { _mm512_storeu_si512((void*)out, _mm512_cvtps_epi32(q)); }
inline void store_bytes(int8_t* out, V q) { _mm_storeu_si128((__m128i*)out, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q))); }
// 32 values in [-8, 7] (a: the first 16) as int4's 16 bytes: value 2k + 8 in byte k's low nibble, 2k + 1 + 8 in its
// high nibble (int4.py's `pack_int4`).
inline void store_nibbles(uint8_t* out, V a, V b) {
  const __m512i eight = _mm512_set1_epi32(8);
  const __m128i x = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(a), eight));
  const __m128i y = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(b), eight));
  const __m256i u = _mm256_inserti128_si256(_mm256_castsi128_si256(x), y, 1);  // 16 pairs, each one uint16
  const __m256i w = _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi16(0x000F)),
                                    _mm256_and_si256(_mm256_srli_epi16(u, 4), _mm256_set1_epi16(0x00F0)));
  _mm_storeu_si128((__m128i*)out, _mm256_cvtepi16_epi8(w));
}
// 16 values rounded to bf16 (as vround_bf16) or fp16 and stored as 16-bit values at p.
inline void store_bf16(uint16_t* p, V v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(vround_bf16(v)), 16)));
}
inline void store_f16(uint16_t* p, V v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// The sum of 64 bytes read as 8 int64s (native.cpp's read rate).
inline __m512i read64(const int64_t* p, __m512i acc) { return _mm512_add_epi64(acc, _mm512_loadu_si512((const void*)p)); }
inline int64_t sum64(__m512i acc) { return _mm512_reduce_add_epi64(acc); }
using Acc64 = __m512i;
inline Acc64 zero64() { return _mm512_setzero_si512(); }
#else
inline constexpr int kVectorRegisters = 16;
struct V {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
inline __m256i first8(int64_t n) {  // all ones in lanes < n (n may be <= 0 or >= 8)
  return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)std::clamp<int64_t>(n, 0, 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V vset(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline V vload(const float* p, int64_t n) {
  return {_mm256_maskload_ps(p, first8(n)), _mm256_maskload_ps(p + 8, first8(n - 8))};
}
inline void vstore(float* p, V v) {
  _mm256_storeu_ps(p, v.lo);
  _mm256_storeu_ps(p + 8, v.hi);
}
inline void vstore(float* p, V v, int64_t n) {
  _mm256_maskstore_ps(p, first8(n), v.lo);
  _mm256_maskstore_ps(p + 8, first8(n - 8), v.hi);
}
inline void vstream(float* p, V v) {  // p 32-byte aligned
  _mm256_stream_ps(p, v.lo);
  _mm256_stream_ps(p + 8, v.hi);
}
#define NATIVE_V2(name, op) \
  inline V name(V a, V b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
NATIVE_V2(vadd, _mm256_add_ps)
NATIVE_V2(vsub, _mm256_sub_ps)
NATIVE_V2(vmul, _mm256_mul_ps)
NATIVE_V2(vdiv, _mm256_div_ps)
NATIVE_V2(vmin, _mm256_min_ps)
NATIVE_V2(vmax, _mm256_max_ps)
#undef NATIVE_V2
inline V vfmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V vfnmadd(V a, V b, V c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline V vneg(V a) {
  const __m256 s = _mm256_set1_ps(-0.0f);
  return {_mm256_xor_ps(a.lo, s), _mm256_xor_ps(a.hi, s)};
}
inline V vabs(V a) {
  const __m256 s = _mm256_set1_ps(-0.0f);
  return {_mm256_andnot_ps(s, a.lo), _mm256_andnot_ps(s, a.hi)};
}
inline V vround(V a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
// p * 2^n as p * 2^(n >> 1) * 2^(n - (n >> 1)): each factor a normal float for |n| <= 250, the first product exact,
// the second rounded once (to an infinity or a subnormal where scalef would give the same).
inline __m256 scale2_8(__m256 p, __m256 n) {
  const __m256i k = _mm256_cvtps_epi32(n), h = _mm256_srai_epi32(k, 1);
  const auto pow2 = [](__m256i e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23)); };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(h)), pow2(_mm256_sub_epi32(k, h)));
}
inline V vscale2(V p, V n) { return {scale2_8(p.lo, n.lo), scale2_8(p.hi, n.hi)}; }
inline float vsum(V a) {
  const __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
inline float vmaxlane(V a) {
  const __m256 s = _mm256_max_ps(a.lo, a.hi);
  __m128 t = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  t = _mm_max_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
}
inline __m256 round_bf16_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)),
                                     _mm256_set1_epi32((int)0xFFFF0000));
  return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)),
                          _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
inline V vround_bf16(V v) { return {round_bf16_8(v.lo), round_bf16_8(v.hi)}; }
inline V vround_f16(V v) {
  return {_mm256_cvtph_ps(_mm256_cvtps_ph(v.lo, _MM_FROUND_TO_NEAREST_INT)),
          _mm256_cvtph_ps(_mm256_cvtps_ph(v.hi, _MM_FROUND_TO_NEAREST_INT))};
}
// A tail's n stored values copied into 16 zeroed ones (AVX2 has no masked 8- or 16-bit loads; tails are rare). The
// masked widens below take the plain load for n >= 16: the copy cost ~20 ns a call, and rope's and gelu's loops
// call them for every 16 values.
template <typename T>
struct Padded {
  alignas(32) T v[16] = {};
  Padded(const T* p, int64_t n) { std::copy(p, p + std::clamp<int64_t>(n, 0, 16), v); }
};
inline __m256 bf16_8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline V widen_bf16(const uint16_t* p) {
  return {bf16_8(_mm_loadu_si128((const __m128i*)p)), bf16_8(_mm_loadu_si128((const __m128i*)(p + 8)))};
}
inline V widen_bf16(const uint16_t* p, int64_t n) { return n >= 16 ? widen_bf16(p) : widen_bf16(Padded<uint16_t>(p, n).v); }
inline V widen_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 8)))};
}
inline V widen_f16(const uint16_t* p, int64_t n) { return n >= 16 ? widen_f16(p) : widen_f16(Padded<uint16_t>(p, n).v); }
inline V widen_i8(const int8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))))};
}
inline V widen_i8(const int8_t* p, int64_t n) { return n >= 16 ? widen_i8(p) : widen_i8(Padded<int8_t>(p, n).v); }
// table[idx & 15] for 8 int32 indices: vpermps reads 3 bits, so each half of the table is looked up and bit 3 (moved
// to the sign) picks between them.
inline __m256 lookup8(__m256i idx, __m256 t_lo, __m256 t_hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx), _mm256_permutevar8x32_ps(t_hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
inline void nibbles(const uint8_t* p, V table, V& lo, V& hi) {
  const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8)));
  lo = {lookup8(b0, table.lo, table.hi), lookup8(b1, table.lo, table.hi)};
  hi = {lookup8(_mm256_srli_epi32(b0, 4), table.lo, table.hi), lookup8(_mm256_srli_epi32(b1, 4), table.lo, table.hi)};
}
inline void store_interleaved(float* p, V lo, V hi, bool stream) {
  const __m256 halves[2][2] = {{lo.lo, hi.lo}, {lo.hi, hi.hi}};
  for (int k = 0; k < 2; ++k) {
    const __m256 a = _mm256_unpacklo_ps(halves[k][0], halves[k][1]);  // l0 h0 l1 h1 | l4 h4 l5 h5
    const __m256 b = _mm256_unpackhi_ps(halves[k][0], halves[k][1]);  // l2 h2 l3 h3 | l6 h6 l7 h7
    const __m256 x = _mm256_permute2f128_ps(a, b, 0x20), y = _mm256_permute2f128_ps(a, b, 0x31);
    if (stream) {
      _mm256_stream_ps(p + 16 * k, x);
      _mm256_stream_ps(p + 16 * k + 8, y);
    } else {
      _mm256_storeu_ps(p + 16 * k, x);
      _mm256_storeu_ps(p + 16 * k + 8, y);
    }
  }
}
inline bool vany_gt(V a, V b) {
  return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(a.lo, b.lo, _CMP_GT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GT_OQ))) != 0;
}
inline bool vany_nan(V a) {
  return _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(a.lo, a.lo, _CMP_UNORD_Q), _mm256_cmp_ps(a.hi, a.hi, _CMP_UNORD_Q))) != 0;
}
inline int vfirst_eq(V a, V b) {
  const unsigned m = _mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, _CMP_EQ_OQ)) |
                     (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, _CMP_EQ_OQ)) << 8;
  return m ? __builtin_ctz(m) : -1;
}
inline void store_ints(int32_t* out, V q) {
  _mm256_storeu_si256((__m256i*)out, _mm256_cvtps_epi32(q.lo));
  _mm256_storeu_si256((__m256i*)(out + 8), _mm256_cvtps_epi32(q.hi));
}
inline void store_bytes(int8_t* out, V q) {
  // packs saturate, exact here; packs_epi32 interleaves the 128-bit lanes, the permute puts them back in order
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_cvtps_epi32(q.lo), _mm256_cvtps_epi32(q.hi)), 0xD8);
  _mm_storeu_si128((__m128i*)out, _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}
inline void store_nibbles(uint8_t* out, V a, V b) {
  const __m256i eight = _mm256_set1_epi32(8);
  const auto words = [&](V v) {  // 16 int16s in order
    return _mm256_permute4x64_epi64(_mm256_packs_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(v.lo), eight),
                                                       _mm256_add_epi32(_mm256_cvtps_epi32(v.hi), eight)), 0xD8);
  };
  const __m256i u = _mm256_permute4x64_epi64(_mm256_packus_epi16(words(a), words(b)), 0xD8);  // 32 bytes in order
  const __m256i w = _mm256_or_si256(_mm256_and_si256(u, _mm256_set1_epi16(0x000F)),
                                    _mm256_and_si256(_mm256_srli_epi16(u, 4), _mm256_set1_epi16(0x00F0)));
  const __m256i b8 = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);  // the 16 low bytes in order
  _mm_storeu_si128((__m128i*)out, _mm256_castsi256_si128(b8));
}
inline void store_top_halves(uint16_t* p, __m256i a, __m256i b) {  // the high 16 bits of 16 int32s, in order
  const __m256i w = _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16));
  _mm256_storeu_si256((__m256i*)p, _mm256_permute4x64_epi64(w, 0xD8));
}
inline void store_bf16(uint16_t* p, V v) {
  const V r = vround_bf16(v);
  store_top_halves(p, _mm256_castps_si256(r.lo), _mm256_castps_si256(r.hi));
}
inline void store_f16(uint16_t* p, V v) {
  _mm_storeu_si128((__m128i*)p, _mm256_cvtps_ph(v.lo, _MM_FROUND_TO_NEAREST_INT));
  _mm_storeu_si128((__m128i*)(p + 8), _mm256_cvtps_ph(v.hi, _MM_FROUND_TO_NEAREST_INT));
}
struct Acc64 {
  __m256i a, b;
};
inline Acc64 zero64() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline Acc64 read64(const int64_t* p, Acc64 acc) {
  return {_mm256_add_epi64(acc.a, _mm256_loadu_si256((const __m256i*)p)),
          _mm256_add_epi64(acc.b, _mm256_loadu_si256((const __m256i*)(p + 4)))};
}
inline int64_t sum64(Acc64 acc) {
  alignas(32) int64_t t[4];
  _mm256_store_si256((__m256i*)t, _mm256_add_epi64(acc.a, acc.b));
  return t[0] + t[1] + t[2] + t[3];
}
#endif

// --- round(x / s) to an integer in [lo, hi], with IEEE division's result ----------------------------------------
// Quantizing divides every value by its row's (group's, block's) scale: torch's rule, which fixes the bits. A
// division costs ~4x a product (the most of a quantizing load), so the quotient is taken as x * (1 / s) first. That
// product's relative error is under 2^-23 (1 / s and the product each round once), so for |x / s| <= 128 it lies
// within 2^-16 of the true quotient, and rounds to the same integer unless the quotient is that close to a tie
// (k + 0.5: exact ties do occur, e.g. between bf16 values). A vector with a lane within 2^-12 of a tie is divided
// instead. Beyond 128 the two integers may differ by one, and both clamp to the same bound (|lo|, |hi| <= 128).
// With s or 1 / s not a normal float (zero, subnormal, infinite, NaN) every vector divides.
struct Divisor {
  V s, r;
  bool fast;
  explicit Divisor(float scale)
      : s(vset(scale)), r(vset(1.0f / scale)), fast(std::isnormal(scale) && std::isnormal(1.0f / scale)) {}
};
inline V rounded_quotient(V x, const Divisor& d) {
  if (d.fast) {
    const V y = vmul(x, d.r), q = vround(y);
    if (!vany_gt(vabs(vsub(y, q)), vset(0.5f - 1.0f / 4096))) return q;  // y - q is exact (Sterbenz)
  }
  return vround(vdiv(x, d.s));
}
// round(v[k] / s) clamped to [lo, hi] as 16 int32s at out; quantize_bytes: as 16 int8s (lo, hi in [-128, 127]).
inline void quantize_ints(const float* v, const Divisor& d, V lo, V hi, int32_t* out) {
  store_ints(out, vmin(vmax(rounded_quotient(vload(v), d), lo), hi));
}
inline void quantize_bytes(const float* v, const Divisor& d, V lo, V hi, int8_t* out) {
  store_bytes(out, vmin(vmax(rounded_quotient(vload(v), d), lo), hi));
}
// 32 values as int4's 16 bytes (store_nibbles), lo = -8, hi = 7.
inline void quantize_nibbles(const float* v, const Divisor& d, V lo, V hi, uint8_t* out) {
  store_nibbles(out, vmin(vmax(rounded_quotient(vload(v), d), lo), hi), vmin(vmax(rounded_quotient(vload(v + 16), d), lo), hi));
}

// How each stored weight type becomes 16 fp32 values (a type, not a function pointer: the loads inline).
struct BF16 {
  using T = uint16_t;
  static constexpr int kRows1 = 4;
  static V load(const T* p) { return widen_bf16(p); }
  static V load_masked(const T* p, int64_t n) { return widen_bf16(p, n); }
};
struct F16 {
  using T = uint16_t;
  static constexpr int kRows1 = 4;
  static V load(const T* p) { return widen_f16(p); }
  static V load_masked(const T* p, int64_t n) { return widen_f16(p, n); }
};
struct F32 {
  using T = float;
  static constexpr int kRows1 = 4;
  static V load(const T* p) { return vload(p); }
  static V load_masked(const T* p, int64_t n) { return vload(p, n); }
};
struct I8 {
  using T = int8_t;
  // a byte per weight: more rows in flight to keep the loads coming (AVX2: as many as its 16 registers hold)
  static constexpr int kRows1 = kVectorRegisters == 32 ? 8 : 4;
  static V load(const T* p) { return widen_i8(p); }
  static V load_masked(const T* p, int64_t n) { return widen_i8(p, n); }
};

#ifdef __AVX512VNNI__
// acc + a's unsigned bytes times b's signed bytes, summed in fours into 16 int32 lanes (vpdpbusd), as inline
// assembly: GCC 12 copies the accumulators around every _mm512_dpbusd_epi32 of a register-blocked loop, and a
// 6 x 4 block of them ran at half the rate (by hand on AMD EPYC: 3.3 against 6.6 instructions a nanosecond).
inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
#endif

// A layer's scales as stored (float32, bf16 or fp16), read one at a time: converting them to a float32 copy on every
// call cost 8 ms of a PaliGemma-3B int4 decode step (36 such copies, one of 257216 x 16).
struct Scales {
  const void* p;
  torch::ScalarType kind;
  explicit Scales(const torch::Tensor& s) : p(s.data_ptr()), kind(s.scalar_type()) {
    TORCH_CHECK(s.is_contiguous() && (kind == torch::kFloat32 || kind == torch::kBFloat16 || kind == torch::kHalf),
                "contiguous float32, bf16 or fp16 scales");
  }
  float operator[](int64_t i) const {
    if (kind == torch::kFloat32) return static_cast<const float*>(p)[i];
    if (kind == torch::kBFloat16) return static_cast<float>(static_cast<const at::BFloat16*>(p)[i]);
    return static_cast<float>(static_cast<const at::Half*>(p)[i]);
  }
};

// f(W{}) with W the load (above) for a tensor of type `kind`, bf16, fp16 or fp32: the one dispatch of every kernel
// that reads such a tensor in its stored type.
template <typename F>
void with_load(torch::ScalarType kind, const char* what, F&& f) {
  TORCH_CHECK(kind == torch::kBFloat16 || kind == torch::kHalf || kind == torch::kFloat32, "a bf16, fp16 or fp32 ",
              what);
  if (kind == torch::kBFloat16) return f(BF16{});
  if (kind == torch::kHalf) return f(F16{});
  f(F32{});
}

// The int4 kernels' register blocking: f(M, R) as std::integral_constants, R output rows at a time for M (1..16)
// activation rows (both known at compile time, so that the accumulators stay in registers).
template <typename F>
void int4_blocking(int64_t M, F&& f) {
  switch (M) {
#define CASE(m, r) \
  case m:          \
    return f(std::integral_constant<int, m>{}, std::integral_constant<int, r>{});
#ifdef NATIVE_AVX512
    CASE(1, 4) CASE(2, 4) CASE(3, 3) CASE(4, 2) CASE(5, 2) CASE(6, 2) CASE(7, 1) CASE(8, 1)
#else  // each V two registers: half the rows
    CASE(1, 2) CASE(2, 1) CASE(3, 1) CASE(4, 1) CASE(5, 1) CASE(6, 1) CASE(7, 1) CASE(8, 1)
#endif
    CASE(9, 1) CASE(10, 1) CASE(11, 1) CASE(12, 1) CASE(13, 1) CASE(14, 1) CASE(15, 1) CASE(16, 1)
#undef CASE
  }
  TORCH_CHECK(false, "1 to ", kMaxRows, " activation rows");
}

// n fp32 values rounded once to `kind` at dst (bf16 or fp16; an fp32 destination is written in place by callers):
// round to nearest even, as at::BFloat16 / at::Half do (the scalar loop finishes the tail; a NaN stays a NaN), 16
// at a time: a scalar conversion per value cost a prefill's output more than its writing.
inline void round_row(torch::ScalarType kind, const float* src, void* dst, int64_t n) {
  int64_t i = 0;
  if (kind == torch::kBFloat16) {
    auto* d = static_cast<at::BFloat16*>(dst);
    for (; i + 16 <= n; i += 16) store_bf16(reinterpret_cast<uint16_t*>(d + i), vload(src + i));
    for (; i < n; ++i) d[i] = at::BFloat16(src[i]);
  } else if (kind == torch::kHalf) {
    auto* d = static_cast<at::Half*>(dst);
    for (; i + 16 <= n; i += 16) store_f16(reinterpret_cast<uint16_t*>(d + i), vload(src + i));
    for (; i < n; ++i) d[i] = at::Half(src[i]);
  }
}

// Activations as fp32, (M, I) contiguous.
inline torch::Tensor as_f32_rows(const torch::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.size(-1) == in_features, "activations have ", x.size(-1), " features, the weight ", in_features);
  auto rows = x.reshape({-1, in_features}).to(torch::kFloat32).contiguous();
  TORCH_CHECK(rows.size(0) >= 1 && rows.size(0) <= kMaxRows, "a decode kernel takes 1 to ", kMaxRows, " rows");
  return rows;
}

inline torch::Tensor shaped_output(const torch::Tensor& x, const torch::Tensor& y32, int64_t out_features) {
  auto sizes = x.sizes().vec();
  sizes.back() = out_features;
  return y32.to(x.scalar_type()).view(sizes);
}

// The decode kernels read R weight rows side by side: R short streams (a row of PaliGemma's MLP is 1-4 KB), too
// short for the hardware prefetcher to run ahead of. So while a block of R rows is multiplied, the rows of the block
// kAheadBlocks further on are fetched, into L2 (_MM_HINT_T1): a fetch into L1 holds one of L1's few miss buffers
// until its line arrives, which capped two cores at ~60-80 % of the DRAM rate (AMD EPYC Zen 4, layers streamed from
// DRAM, by hand: int4 `vnni` 0.6 -> 0.8-0.9 of a plain read, int8 0.73 -> 0.93, bf16 0.8 -> 0.95). The dense, int8
// and int4 `vnni` decodes; not native.cpp's int4 lookup kernel (its comment says why).
inline constexpr int kAheadBlocks = 2;

// How many rows of the block `blocks` ahead of row o exist in [o, o1) (none for one row at a time: one stream,
// which the hardware prefetcher follows).
template <int R>
inline int rows_ahead(int64_t o, int64_t o1, int blocks = kAheadBlocks) {
  return R == 1 ? 0 : (int)std::clamp<int64_t>(o1 - o - R * blocks, 0, R);
}

inline void fetch_ahead(const void* p) { _mm_prefetch((const char*)p, _MM_HINT_T1); }

// y[m, o] = sum_i x[m, i] * W[o, i] for the output rows [o0, o1), W read by `load` 16 values at a time. R output
// rows at once (their weights stream side by side, each activation load serves all R), M activation rows, both
// known at compile time so that the R * M accumulators stay in registers.
template <int M, int R, typename W>
void dense_rows(const float* x, const typename W::T* w, float* y, int64_t I, int64_t O, int64_t o0, int64_t o1) {
  const int64_t full = I / 16 * 16, tail = I - full;
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    V acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = vzero();
    const int next = rows_ahead<R>(o, o1);  // fetched ahead, kAheadBlocks blocks on
    const typename W::T* ahead = next ? w + (o + R * kAheadBlocks) * I : w;  // (no pointer past the weight)
    for (int64_t i = 0; i < full; i += 16) {
      V xv[M];
      for (int m = 0; m < M; ++m) xv[m] = vload(x + m * I + i);
      if ((i * (int64_t)sizeof(typename W::T)) % 64 == 0)
        for (int r = 0; r < next; ++r) fetch_ahead(ahead + r * I + i);
      for (int r = 0; r < R; ++r) {
        const V wv = W::load(w + (o + r) * I + i);
        for (int m = 0; m < M; ++m) acc[r][m] = vfmadd(wv, xv[m], acc[r][m]);
      }
    }
    if (tail) {
      for (int r = 0; r < R; ++r) {
        const V wv = W::load_masked(w + (o + r) * I + full, tail);
        for (int m = 0; m < M; ++m) acc[r][m] = vfmadd(wv, vload(x + m * I + full, tail), acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * O + o + r] = vsum(acc[r][m]);
  }
  if (o < o1) dense_rows<M, 1, W>(x, w, y, I, O, o, o1);  // the last rows one at a time
}

// The kernel for a run-time M (1..16): registers for R * M accumulators, R as large as they allow (<= 4).
template <typename W>
void dense_any(const float* x, const typename W::T* w, float* y, int64_t M, int64_t I, int64_t O, int64_t o0,
               int64_t o1) {
  switch (M) {
#define CASE(m, r) \
  case m:          \
    return dense_rows<m, r, W>(x, w, y, I, O, o0, o1);
#ifdef NATIVE_AVX512
    CASE(1, W::kRows1) CASE(2, 4) CASE(3, 4) CASE(4, 4) CASE(5, 4) CASE(6, 3) CASE(7, 3) CASE(8, 2)
    CASE(9, 2) CASE(10, 2) CASE(11, 2) CASE(12, 2) CASE(13, 1) CASE(14, 1) CASE(15, 1) CASE(16, 1)
#else  // each V two registers: half the rows
    CASE(1, W::kRows1) CASE(2, 2) CASE(3, 2) CASE(4, 1) CASE(5, 1) CASE(6, 1) CASE(7, 1) CASE(8, 1)
    CASE(9, 1) CASE(10, 1) CASE(11, 1) CASE(12, 1) CASE(13, 1) CASE(14, 1) CASE(15, 1) CASE(16, 1)
#endif
#undef CASE
  }
  TORCH_CHECK(false, "1 to ", kMaxRows, " activation rows");
}

}  // namespace native
