// int4 prefill products in integers (the int4 format's "vnni" prefill): the activations quantized to int8 once per
// call and multiplied with the stored nibbles by AVX512-VNNI, 64 byte products an instruction.
//
// A prefill is a GEMM: every weight meets hundreds of activation rows, so what bounds it is arithmetic. int4's other
// prefills dequantize the layer to 16 bits and run oneDNN's bf16 GEMM (docs/results/kernels.md: about half the
// machine's int8 rate on AVX512-BF16 CPUs); here the weights stay 4-bit integers and the products run at the int8
// rate. Each activation row is quantized in blocks of 128 inputs (scale = max|x| / 127, q = round-half-even(x /
// scale)); per block and output the 128 products are summed exactly in int32, then scaled by the block's
// activation scale times the weight group's scale and accumulated in fp32. formats/int4.py documents this rounding.
//
// Layout. vpdpbusd sums 4 byte products into each of 16 int32 lanes; the lanes here are 16 output rows, so a
// weight register holds 4 consecutive inputs of 16 rows (a "panel", built per 128-input chunk from the stored
// rows: nibbles split, then 16 x 16 dword transposes), and the activation operand is one row's 4 inputs broadcast.
// The nibbles are used as stored (q + 8, vpdpbusd's unsigned operand); each block's sum starts at -8 * sum(x_q)
// to take the 8s off. A stored byte holds inputs 2b (low nibble) and 2b + 1 (high): a chunk's panel takes the 64
// low nibbles first, then the 64 high ones, and the activations are permuted the same way when quantized.
//
// Blocking: a task owns 64 output rows (4 registers of lanes) and walks the activation rows 6 at a time: 24 int32
// sums in registers, fp32 sums for up to kPass activation rows in a buffer (L2), each chunk's panel (8 KB, L1)
// reused by all of them.
//
// Axes: M activation rows, I in features, O out features, C chunks of 128 inputs per row.

#include "native.h"

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

using namespace native;

namespace {

constexpr int64_t kChunk = 128;   // inputs per activation block and per panel
constexpr int64_t kSteps = 32;    // vpdpbusd steps per chunk (4 inputs each)
constexpr int kMR = 6;            // activation rows per register block
constexpr int kNR = 4;            // registers of 16 output rows per block (64 rows: a task)
constexpr int64_t kCols = 16 * kNR;
constexpr int64_t kPass = 240;    // activation rows whose fp32 sums a task keeps at once (a multiple of kMR)

#ifdef __AVX512VNNI__

// x (M, I) in its stored type (W: native.h's loads, no fp32 copy of the rows) -> int8 rows in the panels' input
// order, with each block's scale and -8 * sum(q).
struct Quantized {
  int64_t C;
  std::vector<int8_t> q;       // (M, I): chunk c holds its even inputs, then its odd ones
  std::vector<float> scale;    // (M, C)
  std::vector<int32_t> bias;   // (M, C)

  template <typename W>
  Quantized(W, const typename W::T* x, int64_t M, int64_t I) : C(I / kChunk), q(M * I), scale(M * C), bias(M * C) {
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
      alignas(64) int8_t natural[kChunk];
      __m512 v[kChunk / 16];
      for (int64_t m = m0; m < m1; ++m) {
        for (int64_t c = 0; c < C; ++c) {
          const typename W::T* row = x + m * I + c * kChunk;
          __m512 mx = _mm512_setzero_ps();
          for (int64_t j = 0; j < kChunk / 16; ++j) {
            v[j] = W::load(row + 16 * j);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(v[j]));
          }
          const float amax = _mm512_reduce_max_ps(mx), s = amax / 127.0f;
          int8_t* out = q.data() + m * I + c * kChunk;
          scale[m * C + c] = s;
          if (!(amax > 0)) {  // an all-zero block (or one with a NaN): nothing to add, as native_vnni.cpp does
            std::memset(out, 0, kChunk);
            bias[m * C + c] = 0;
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
            out[b] = natural[2 * b];
            out[kChunk / 2 + b] = natural[2 * b + 1];
          }
          bias[m * C + c] = -8 * _mm512_reduce_add_epi32(sum);
        }
      }
    });
  }
};

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

// panel (kSteps, kCols) dwords <- chunk c of weight rows o0 .. o0 + 16 * nr: step s holds inputs 4s .. 4s + 3 of
// the chunk in the panels' order (the 64 low nibbles, then the 64 high ones), one row per lane.
void build_panel(const uint8_t* w, int64_t half, int64_t o0, int nr, int64_t c, int32_t* panel) {
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int nb = 0; nb < nr; ++nb) {
    __m512i lo[16], hi[16];
    for (int r = 0; r < 16; ++r) {
      const __m512i b = _mm512_loadu_si512((const void*)(w + (o0 + 16 * nb + r) * half + c * 64));
      lo[r] = _mm512_and_si512(b, nibble);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
    }
    transpose16(lo);
    transpose16(hi);
    for (int s = 0; s < 16; ++s) {
      _mm512_store_si512((void*)(panel + s * kCols + 16 * nb), lo[s]);
      _mm512_store_si512((void*)(panel + (16 + s) * kCols + 16 * nb), hi[s]);
    }
  }
}

// acc (MR rows of kCols fp32, stride kCols) += chunk c's products of activation rows m0 .. m0 + MR with the panel's
// 16 * NR rows; ws (kCols): the rows' weight scales for this chunk.
template <int MR, int NR>
void chunk_block(const Quantized& a, int64_t I, int64_t m0, int64_t c, const int32_t* panel, const float* ws,
                 float* acc) {
  __m512i sum[MR][NR];
  const int8_t* x[MR];
  for (int m = 0; m < MR; ++m) {
    const __m512i start = _mm512_set1_epi32(a.bias[(m0 + m) * a.C + c]);
    for (int n = 0; n < NR; ++n) sum[m][n] = start;
    x[m] = a.q.data() + (m0 + m) * I + c * kChunk;
  }
  for (int64_t s = 0; s < kSteps; ++s) {
    __m512i wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm512_load_si512((const void*)(panel + s * kCols + 16 * n));
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, x[m] + 4 * s, 4);  // 4 inputs of row m, broadcast
      const __m512i xb = _mm512_set1_epi32(four);
      for (int n = 0; n < NR; ++n) sum[m][n] = dpbusd(sum[m][n], wv[n], xb);
    }
  }
  for (int m = 0; m < MR; ++m) {
    const __m512 xs = _mm512_set1_ps(a.scale[(m0 + m) * a.C + c]);
    for (int n = 0; n < NR; ++n) {
      float* p = acc + m * kCols + 16 * n;
      const __m512 f = _mm512_cvtepi32_ps(sum[m][n]);
      _mm512_store_ps(p, _mm512_fmadd_ps(f, _mm512_mul_ps(xs, _mm512_load_ps(ws + 16 * n)), _mm512_load_ps(p)));
    }
  }
}

template <int NR>
void rows_block(int64_t mr, const Quantized& a, int64_t I, int64_t m0, int64_t c, const int32_t* panel,
                const float* ws, float* acc) {
  switch (mr) {
    case 6: return chunk_block<6, NR>(a, I, m0, c, panel, ws, acc);
    case 5: return chunk_block<5, NR>(a, I, m0, c, panel, ws, acc);
    case 4: return chunk_block<4, NR>(a, I, m0, c, panel, ws, acc);
    case 3: return chunk_block<3, NR>(a, I, m0, c, panel, ws, acc);
    case 2: return chunk_block<2, NR>(a, I, m0, c, panel, ws, acc);
    default: return chunk_block<1, NR>(a, I, m0, c, panel, ws, acc);
  }
}

void block(int nr, int64_t mr, const Quantized& a, int64_t I, int64_t m0, int64_t c, const int32_t* panel,
           const float* ws, float* acc) {
  switch (nr) {
    case 4: return rows_block<4>(mr, a, I, m0, c, panel, ws, acc);
    case 3: return rows_block<3>(mr, a, I, m0, c, panel, ws, acc);
    case 2: return rows_block<2>(mr, a, I, m0, c, panel, ws, acc);
    default: return rows_block<1>(mr, a, I, m0, c, panel, ws, acc);
  }
}

#endif  // __AVX512VNNI__

}  // namespace

// x (M, I) @ W^T for W in compressed-tensors' int4 layout (O, I/2) uint8 with scales (O, I / group), groups a
// multiple of 128 -> (M, O) in x's dtype.
torch::Tensor gemm_int4_vnni(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                             int64_t group) {
#ifdef __AVX512VNNI__
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == torch::kUInt8,
              "a contiguous (O, I/2) uint8 weight");
  const int64_t O = packed.size(0), I = packed.size(1) * 2, half = I / 2;
  TORCH_CHECK(O % 16 == 0, "output rows a multiple of 16");
  TORCH_CHECK(group % kChunk == 0 && I % group == 0, "groups of a multiple of 128 that divide the row");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == O && scale.size(1) == I / group, "scale (O, I / group)");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == I, "activations (M, ", I, ")");
  const auto kind = x.scalar_type();  // with_load below refuses any but bf16, fp16 and fp32
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), C = I / kChunk, per_group = group / kChunk;
  std::optional<Quantized> quantized;
  with_load(kind, "activation", [&](auto load) {
    using W = decltype(load);
    quantized.emplace(load, static_cast<const typename W::T*>(xc.data_ptr()), M, I);
  });
  const Quantized& a = *quantized;
  const auto s = scale.contiguous();
  const Scales sp(s);
  auto y = torch::empty({M, O}, kind);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  char* yp = static_cast<char*>(y.data_ptr());
  const int64_t item = y.element_size(), tiles = (O + kCols - 1) / kCols;
  // No torch op inside the parallel region: its threads do not carry the caller's inference mode.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) int32_t panel[kSteps * kCols];  // 8 KB
    alignas(64) float ws[kCols];
    std::vector<float> acc_store(kPass * kCols + 16);
    float* acc = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(acc_store.data()) + 63) & ~uintptr_t(63));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kCols;
      const int nr = (int)std::min<int64_t>(kNR, (O - o0) / 16);
      for (int64_t p0 = 0; p0 < M; p0 += kPass) {
        const int64_t rows = std::min(kPass, M - p0);
        std::fill(acc, acc + rows * kCols, 0.0f);
        for (int64_t c = 0; c < C; ++c) {
          build_panel(wp, half, o0, nr, c, panel);
          for (int64_t n = 0; n < 16 * nr; ++n) ws[n] = sp[(o0 + n) * (I / group) + c / per_group];
          for (int64_t m = 0; m < rows; m += kMR)
            block(nr, std::min<int64_t>(kMR, rows - m), a, I, p0 + m, c, panel, ws, acc + m * kCols);
        }
        for (int64_t m = 0; m < rows; ++m) {
          char* dst = yp + ((p0 + m) * O + o0) * item;
          if (kind == torch::kFloat32)
            std::memcpy(dst, acc + m * kCols, 16 * nr * sizeof(float));
          else
            round_row(kind, acc + m * kCols, dst, 16 * nr);
        }
      }
    }
  });
  return y;
#else
  TORCH_CHECK(false, "built for a CPU without AVX512-VNNI");
#endif
}
