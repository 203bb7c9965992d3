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

// How each stored weight type becomes 16 fp32 values (a type, not a function pointer: the loads inline).
struct BF16 {
  using T = uint16_t;
  static constexpr int kRows1 = 4;
  static __m512 load(const T* p) {  // bf16 is the top half of an fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static __m512 load_masked(const T* p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
};
struct F16 {
  using T = uint16_t;
  static constexpr int kRows1 = 4;
  static __m512 load(const T* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static __m512 load_masked(const T* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
};
struct F32 {
  using T = float;
  static constexpr int kRows1 = 4;
  static __m512 load(const T* p) { return _mm512_loadu_ps(p); }
  static __m512 load_masked(const T* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
};
struct I8 {
  using T = int8_t;
  static constexpr int kRows1 = 8;  // a byte per weight: more rows in flight to keep the loads coming
  static __m512 load(const T* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }
  static __m512 load_masked(const T* p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
  }
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
    CASE(1, 4) CASE(2, 4) CASE(3, 3) CASE(4, 2) CASE(5, 2) CASE(6, 2) CASE(7, 1) CASE(8, 1)
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
    const __m512i lsb = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF), nan = _mm512_set1_epi32(0x7FC0);
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(src + i);
      const __m512i u = _mm512_castps_si512(v);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), lsb))), 16);
      r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), nan);
      _mm256_storeu_si256((__m256i*)(d + i), _mm512_cvtepi32_epi16(r));
    }
    for (; i < n; ++i) d[i] = at::BFloat16(src[i]);
  } else if (kind == torch::kHalf) {
    auto* d = static_cast<at::Half*>(dst);
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256((__m256i*)(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
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
  const int64_t full = I / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (I - full)) - 1);
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    const int next = rows_ahead<R>(o, o1);  // fetched ahead, kAheadBlocks blocks on
    const typename W::T* ahead = next ? w + (o + R * kAheadBlocks) * I : w;  // (no pointer past the weight)
    for (int64_t i = 0; i < full; i += 16) {
      __m512 xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_ps(x + m * I + i);
      if ((i * (int64_t)sizeof(typename W::T)) % 64 == 0)
        for (int r = 0; r < next; ++r) fetch_ahead(ahead + r * I + i);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = W::load(w + (o + r) * I + i);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
      }
    }
    if (full < I) {
      for (int r = 0; r < R; ++r) {
        const __m512 wv = W::load_masked(w + (o + r) * I + full, tail);
        for (int m = 0; m < M; ++m)
          acc[r][m] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + m * I + full), acc[r][m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * O + o + r] = _mm512_reduce_add_ps(acc[r][m]);
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
    CASE(1, W::kRows1) CASE(2, 4) CASE(3, 4) CASE(4, 4) CASE(5, 4) CASE(6, 3) CASE(7, 3) CASE(8, 2)
    CASE(9, 2) CASE(10, 2) CASE(11, 2) CASE(12, 2) CASE(13, 1) CASE(14, 1) CASE(15, 1) CASE(16, 1)
#undef CASE
  }
  TORCH_CHECK(false, "1 to ", kMaxRows, " activation rows");
}

}  // namespace native
