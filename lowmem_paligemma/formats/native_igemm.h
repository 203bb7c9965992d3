// What the integer prefills (native_vnni_gemm.cpp on AVX512-VNNI, native_amx_gemm.cpp on AMX) share: the
// activations quantized to int8 once per call, the weights rearranged into panels a chunk of 128 inputs at a time,
// and the GEMM's loops around a Block that multiplies a few activation rows with a panel. AVX-512 builds only.
//
// A prefill is a GEMM: every weight meets hundreds of activation rows, so arithmetic bounds it. int4's other
// prefills dequantize the layer to 16 bits for oneDNN's bf16 GEMM (about half the int8 rate on AVX512-BF16 CPUs,
// docs/results/kernels.md); int8's `int_mm` is oneDNN's int8 GEMM, which in a whole model ran at about half the
// rate it reaches on one layer timed again and again. Here each weight is read once per pass over the activations.
// - int4: each activation row quantized in blocks of 128 inputs (scale = max|x| / 127, q = round-half-even(x /
//   scale)); per block and output the 128 products are summed exactly in int32, then scaled by the block's
//   activation scale times the weight group's scale and accumulated in fp32 (formats/int4.py documents it).
// - int8: the rows quantized as int8.py's `int_mm` prefill does (one scale a row: native_vnni.cpp
//   `quantize_rows_int8`, here fused with the copy the kernel reads), the whole row's products summed in int32,
//   then (float(sum) * x_scale) * w_scale: the same bits as `int_mm` and `rescale_int32`.
//
// Layout. vpdpbusd sums 4 byte products (unsigned x signed) into each of 16 int32 lanes; the lanes here are 16
// output rows, so a weight register holds 4 consecutive inputs of 16 rows (a "panel", built per 128-input chunk
// from the stored rows by 16 x 16 dword transposes), and the activation operand is one row's 4 inputs broadcast.
// - int4: the nibbles are the unsigned operand as stored (q + 8); each block's sum starts at -8 * sum(x_q). A
//   stored byte holds inputs 2b (low nibble) and 2b + 1 (high): a chunk's panel takes the 64 low nibbles first,
//   then the 64 high ones, and the activations are permuted the same way when quantized.
// - int8: the weights are the signed operand; the activations are made unsigned (q + 128, an exclusive or of the
//   top bit), and each chunk's sum starts at -128 * the sum of its weights (computed from the panel).
//
// Blocking: a task owns 64 output rows (4 x 16 lanes of the panel) and keeps fp32 (int4) or int32 (int8) sums for
// up to kPass activation rows in a buffer (L2); each chunk's panel (8 KB, L1) is reused by all of them, which its
// Block takes a few at a time (VnniBlock: 6 rows, 24 int32 sums in registers; AmxBlock: 16 rows in tiles).
//
// Axes: M activation rows, I in features, O out features, C chunks of 128 inputs per row (int8: the last one
// zero-padded where I is not a multiple of 128).

#pragma once

#include "native.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace igemm {

using namespace native;

constexpr int64_t kChunk = 128;   // inputs per activation block and per panel
constexpr int64_t kSteps = 32;    // vpdpbusd steps per chunk (4 inputs each)
constexpr int kNR = 4;            // registers of 16 output rows per block (64 rows: a task)
constexpr int64_t kCols = 16 * kNR;
constexpr int64_t kRowPad = 16;   // activation rows are allocated (zero) to a multiple of this: an AMX tile's rows
constexpr int64_t kPass = 528;    // activation rows a task's sums cover at once (a multiple of every Block's rows and
                                  // of kRowPad; 135 KB, L2): each pass reads the weights again, and a 224-px prompt
                                  // (261 rows) is one pass

inline int64_t padded_rows(int64_t m) { return (m + kRowPad - 1) / kRowPad * kRowPad; }

#ifdef __AVX512VNNI__

// The activations as the kernel reads them: `stride` bytes a row (C chunks), and the scales and starts of the sums.
struct Acts {
  int64_t C = 0, stride = 0;
  std::vector<uint8_t> q;      // (M, stride): int4: int8 values, permuted as above; int8: q + 128
  std::vector<float> scale;    // int4: (M, C) block scales; int8: (M) row scales
  std::vector<int32_t> bias;   // int4: (M, C) -8 * the block's sum of q; int8: none
};

// int4's activations: x (M, I) in its stored type (W: native.h's loads, no fp32 copy of the rows), I % 128 == 0.
// Rows past M up to a multiple of kRowPad are zero (an AMX tile reads 16 rows).
template <typename W>
Acts int4_acts(const typename W::T* x, int64_t M, int64_t I) {
  Acts a;
  a.C = I / kChunk;
  a.stride = I;
  a.q.resize(padded_rows(M) * I);
  a.scale.resize(M * a.C);
  a.bias.resize(M * a.C);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    alignas(64) int8_t natural[kChunk];
    __m512 v[kChunk / 16];
    for (int64_t m = m0; m < m1; ++m) {
      for (int64_t c = 0; c < a.C; ++c) {
        const typename W::T* row = x + m * I + c * kChunk;
        __m512 mx = _mm512_setzero_ps();
        for (int64_t j = 0; j < kChunk / 16; ++j) {
          v[j] = W::load(row + 16 * j);
          mx = _mm512_max_ps(mx, _mm512_abs_ps(v[j]));
        }
        const float amax = _mm512_reduce_max_ps(mx), s = amax / 127.0f;
        uint8_t* out = a.q.data() + m * I + c * kChunk;
        a.scale[m * a.C + c] = s;
        if (!(amax > 0)) {  // an all-zero block (or one with a NaN): nothing to add, as native_vnni.cpp does
          std::memset(out, 0, kChunk);
          a.bias[m * a.C + c] = 0;
          continue;
        }
        const __m512 sv = _mm512_set1_ps(s);
        __m512i sum = _mm512_setzero_si512();
        for (int64_t j = 0; j < kChunk / 16; ++j) {
          const __m512 t = _mm512_roundscale_ps(_mm512_div_ps(v[j], sv), _MM_FROUND_TO_NEAREST_INT);
          const __m512i qi = _mm512_cvtps_epi32(t);  // |x / s| <= 127: no clamp needed
          sum = _mm512_add_epi32(sum, qi);
          _mm_store_si128((__m128i*)(natural + 16 * j), _mm512_cvtepi32_epi8(qi));
        }
        for (int64_t b = 0; b < kChunk / 2; ++b) {
          out[b] = (uint8_t)natural[2 * b];
          out[kChunk / 2 + b] = (uint8_t)natural[2 * b + 1];
        }
        a.bias[m * a.C + c] = -8 * _mm512_reduce_add_epi32(sum);
      }
    }
  });
  return a;
}

// int8's activations: x (M, I) in its stored type quantized per row as quantize_rows_int8 does (scale =
// max(max|x_row|, 1e-12) / 127, q = round-half-even(x / scale): the same fp32 operations, so the same bits), made
// unsigned (q + 128: the top bit flipped; kSigned: left as q) and padded to whole chunks with q = 0, in one pass over
// the rows; rows past M up to a multiple of kRowPad are zero.
template <typename W, bool kSigned = false>
Acts int8_acts(const typename W::T* x, int64_t M, int64_t I) {
  Acts a;
  a.C = (I + kChunk - 1) / kChunk;
  a.stride = a.C * kChunk;
  a.q.resize(padded_rows(M) * a.stride);
  a.scale.resize(M);
  const int64_t full = I / 16 * 16, tail = I - full;  // the last tail values, loaded masked
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    const __m128i top = _mm_set1_epi8(kSigned ? 0 : (char)0x80);
    for (int64_t m = m0; m < m1; ++m) {
      const typename W::T* row = x + m * I;
      __m512 mx = _mm512_setzero_ps();
      for (int64_t i = 0; i < full; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(W::load(row + i)));
      if (full < I) mx = _mm512_max_ps(mx, _mm512_abs_ps(W::load_masked(row + full, tail)));
      const float s = std::max(_mm512_reduce_max_ps(mx), 1e-12f) / 127.0f;
      a.scale[m] = s;
      const __m512 sv = _mm512_set1_ps(s);
      uint8_t* out = a.q.data() + m * a.stride;
      for (int64_t i = 0; i < a.stride; i += 16) {
        const __m512 v = i < full ? W::load(row + i) : i == full && full < I ? W::load_masked(row + i, tail)
                                                                               : _mm512_setzero_ps();
        const __m512 t = _mm512_roundscale_ps(_mm512_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT);
        const __m128i b = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t));
        _mm_storeu_si128((__m128i*)(out + i), _mm_xor_si128(b, top));
      }
    }
  });
  return a;
}

// r[j] <- column j of the 16 x 16 dwords r (lane i of the result: row i's dword j).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// A layer's weights as the kernel reads them: `w` (O, row_bytes) bytes, I inputs a row.
struct Weights {
  const uint8_t* w;
  int64_t row_bytes, I;
};

// panel (kSteps, kCols) dwords <- chunk c of weight rows o0 .. o0 + 16 * nr, one row per lane: step s holds the
// chunk's inputs 4s .. 4s + 3 (int4: in the panels' order, the 64 low nibbles, then the 64 high ones; int8: bytes
// past I are zero). int8 also sets corr[nb] = -128 * each lane's sum of the chunk's weights (corr null: not wanted).
template <bool kInt8>
void build_panel(const Weights& wt, int64_t o0, int nr, int64_t c, int32_t* panel, __m512i* corr) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const int64_t left = wt.I - c * kChunk;  // int8: inputs of this chunk in the row (the last may be short)
  const __mmask64 first = left >= 64 ? ~0ULL : (1ULL << left) - 1;
  const __mmask64 second = left >= 128 ? ~0ULL : left <= 64 ? 0 : (1ULL << (left - 64)) - 1;
  for (int nb = 0; nb < nr; ++nb) {
    __m512i lo[16], hi[16];
    for (int r = 0; r < 16; ++r) {
      const uint8_t* row = wt.w + (o0 + 16 * nb + r) * wt.row_bytes;
      if constexpr (kInt8) {
        lo[r] = _mm512_maskz_loadu_epi8(first, row + c * kChunk);
        hi[r] = _mm512_maskz_loadu_epi8(second, row + c * kChunk + 64);
      } else {
        const __m512i b = _mm512_loadu_si512((const void*)(row + c * 64));
        lo[r] = _mm512_and_si512(b, nibble);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
      }
    }
    transpose16(lo);
    transpose16(hi);
    __m512i sum = _mm512_setzero_si512();
    const __m512i ones = _mm512_set1_epi8(1);
    for (int s = 0; s < 16; ++s) {
      _mm512_store_si512((void*)(panel + s * kCols + 16 * nb), lo[s]);
      _mm512_store_si512((void*)(panel + (16 + s) * kCols + 16 * nb), hi[s]);
      if (kInt8 && corr) sum = dpbusd(dpbusd(sum, ones, lo[s]), ones, hi[s]);
    }
    if (kInt8 && corr) corr[nb] = _mm512_mullo_epi32(sum, _mm512_set1_epi32(-128));
  }
}

// y (M, O) in `kind` = the activations a times the weights, kInt8 or int4 (group_scale(o, c): row o's scale for
// chunk c; int8: its row scale). Tasks of 64 output rows; a task walks the activation rows kPass at a time, and its
// Block (one per thread: VnniBlock, AmxBlock) multiplies Block::kRows of them with a run of up to Block::kChunks
// chunks' panels (int8 only: int4's sums are scaled chunk by chunk), then is flushed before the next run.
// Block::prepare(acts) may rearrange the activations' bytes for its loads once, before the loops.
template <bool kInt8, typename Block, typename GroupScale>
torch::Tensor gemm(const Acts& a, const Weights& wt, int64_t M, int64_t O, torch::ScalarType kind,
                   GroupScale group_scale) {
  static_assert(kInt8 || Block::kChunks == 1, "int4 scales each chunk's sums");
  auto y = torch::empty({M, O}, kind);
  char* yp = static_cast<char*>(y.data_ptr());
  const int64_t item = y.element_size(), tiles = (O + kCols - 1) / kCols;
  // No torch op inside the parallel region: its threads do not carry the caller's inference mode.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> panels(Block::kChunks * kSteps * kCols + 16);  // 8 KB a chunk, 64-byte aligned below
    int32_t* panel = reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(panels.data()) + 63) & ~uintptr_t(63));
    alignas(64) float ws[kCols];
    __m512i corr[kNR];
    std::vector<float> out(kCols);
    Block block;
    std::vector<int32_t> store(kPass * kCols + 16);  // fp32 or int32 sums, 64-byte aligned below
    void* acc = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(store.data()) + 63) & ~uintptr_t(63));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kCols;
      const int nr = (int)std::min<int64_t>(kNR, (O - o0) / 16), cols = 16 * nr;
      for (int64_t p0 = 0; p0 < M; p0 += kPass) {
        const int64_t rows = std::min(kPass, M - p0);
        std::memset(acc, 0, padded_rows(rows) * kCols * 4);  // 0 is 0.0f and 0
        for (int64_t c = 0; c < a.C; c += Block::kChunks) {
          const int64_t run = std::min<int64_t>(Block::kChunks, a.C - c);
          for (int64_t j = 0; j < run; ++j)  // corr: the last chunk's (VnniBlock's runs are one chunk)
            build_panel<kInt8>(wt, o0, nr, c + j, panel + j * kSteps * kCols, Block::kCorrected ? corr : nullptr);
          if (!kInt8)
            for (int n = 0; n < cols; ++n) ws[n] = group_scale(o0 + n, c);
          for (int64_t m = 0; m < rows; m += Block::kRows)
            block(nr, std::min<int64_t>(Block::kRows, rows - m), a, p0 + m, c, run, panel, corr, ws,
                  static_cast<int32_t*>(acc) + m * kCols);
          block.flush();
        }
        if (kInt8)
          for (int n = 0; n < cols; ++n) ws[n] = group_scale(o0 + n, 0);
        for (int64_t m = 0; m < rows; ++m) {
          char* dst = yp + ((p0 + m) * O + o0) * item;
          const void* row = static_cast<int32_t*>(acc) + m * kCols;
          const float* f = static_cast<const float*>(row);
          if (kInt8) {  // rescale_int32's two fp32 products, in its order
            const int32_t* sums = static_cast<const int32_t*>(row);
            const __m512 xs = _mm512_set1_ps(a.scale[p0 + m]);
            for (int n = 0; n < cols; n += 16) {
              const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void*)(sums + n))), xs);
              _mm512_storeu_ps(out.data() + n, _mm512_mul_ps(v, _mm512_load_ps(ws + n)));
            }
            f = out.data();
          }
          if (kind == torch::kFloat32)
            std::memcpy(dst, f, cols * sizeof(float));
          else
            round_row(kind, f, dst, cols);
        }
      }
    }
  });
  return y;
}

// x (M, I) @ W^T for W in compressed-tensors' int4 layout (O, I/2) uint8 with scales (O, I / group), groups a
// multiple of 128 -> (M, O) in x's dtype, the products by Block.
template <typename Block>
torch::Tensor int4_gemm(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                        int64_t group) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == torch::kUInt8,
              "a contiguous (O, I/2) uint8 weight");
  const int64_t O = packed.size(0), I = packed.size(1) * 2;
  TORCH_CHECK(O % 16 == 0, "output rows a multiple of 16");
  TORCH_CHECK(group % kChunk == 0 && I % group == 0, "groups of a multiple of 128 that divide the row");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == O && scale.size(1) == I / group, "scale (O, I / group)");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == I, "activations (M, ", I, ")");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), per_group = group / kChunk, G = I / group;
  std::optional<Acts> a;
  with_load(x.scalar_type(), "activation", [&](auto load) {
    using W = decltype(load);
    a.emplace(int4_acts<W>(static_cast<const typename W::T*>(xc.data_ptr()), M, I));
  });
  Block::prepare(*a);
  const auto s = scale.contiguous();
  const Scales sp(s);
  return gemm<false, Block>(*a, Weights{packed.data_ptr<uint8_t>(), I / 2, I}, M, O, x.scalar_type(),
                     [&](int64_t o, int64_t c) { return sp[o * G + c / per_group]; });
}

// x (M, I) of a float dtype, W (O, I) int8 with w_scale (O) or (O, 1) -> (float(q(x) @ W^T) * x_scale) * w_scale in
// x's dtype, q(x) and x_scale as quantize_rows_int8 computes them, the products by Block (kSigned: the activations
// left signed for it).
template <typename Block, bool kSigned>
torch::Tensor int8_gemm(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& w_scale) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8, "a contiguous (O, I) int8 weight");
  const int64_t O = q.size(0), I = q.size(1);
  TORCH_CHECK(O % 16 == 0, "output rows a multiple of 16");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == I, "activations (M, ", I, ")");
  TORCH_CHECK(w_scale.numel() == O, "one scale per output");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0);
  std::optional<Acts> a;
  with_load(x.scalar_type(), "activation", [&](auto load) {
    using W = decltype(load);
    a.emplace(int8_acts<W, kSigned>(static_cast<const typename W::T*>(xc.data_ptr()), M, I));
  });
  Block::prepare(*a);
  const auto ws = w_scale.to(torch::kFloat32).contiguous();
  const float* wsp = ws.data_ptr<float>();
  return gemm<true, Block>(*a, Weights{reinterpret_cast<const uint8_t*>(q.data_ptr<int8_t>()), I, I}, M, O,
                    x.scalar_type(), [&](int64_t o, int64_t) { return wsp[o]; });
}

#endif  // __AVX512VNNI__

}  // namespace igemm
