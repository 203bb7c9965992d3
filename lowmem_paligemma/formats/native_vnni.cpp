// int4 decode products in integers: the activations quantized to int8 and multiplied with AVX512-VNNI; and the two
// passes around int8's `int_mm` prefill (formats/int8.py): its activations quantized per row, its int32 product
// scaled back, each one pass over the data instead of torch's five.
//
// native.cpp's int4 kernel widens every weight to fp32 (a table lookup per 16 values) and multiplies in fp32: with
// 4 bits a weight, that arithmetic, not memory, bounds a decode step. Here the activation rows are quantized once
// per call, in blocks of 32 inputs (scale = max|x| / 127, q = round-half-even(x / scale), the Q8_0 blocks of
// llama.cpp's and OpenVINO's int4 decode), and each 64-byte run of a weight row (128 values) meets them in two
// `vpdpbusd`: 64 byte products an instruction, summed in fours into int32 lanes, exact. The nibbles are used as
// stored (q + 8, unsigned, what vpdpbusd's unsigned operand wants); the 8 * sum(x_q) that adds is taken off by
// starting each sum at -8 * sum(x_q), computed once per activation row.
//
// Rounding: the activations' int8 rounding (a relative error of at most 1/254 of each block's largest value), then
// every product and every sum within 128 inputs is exact; the blocks' sums are scaled and accumulated in fp32.
// formats/int4.py documents this as the "vnni" kernel's rounding; the chooser offers it beside the exact kernels.
//
// Axes: M activation rows, I in features, O out features, G groups per row (I / group), C chunks of 128 inputs.

#include "native.h"

#include <algorithm>
#include <cstdint>
#include <vector>

using namespace native;

namespace {

constexpr int64_t kBlock = 32;   // inputs sharing one activation scale
constexpr int64_t kChunk = 128;  // inputs per pair of vpdpbusd: 64 weight bytes, their low and high nibbles

#ifdef __AVX512VNNI__

// The activation rows, quantized and laid out the way a chunk's weight bytes meet them. For chunk c, byte b of a
// weight row's 64 holds input 128c + 2b (low nibble) and 128c + 2b + 1 (high); int32 lane k of vpdpbusd sums bytes
// 4k .. 4k + 3, so inputs 128c + 8k .. 128c + 8k + 7, all in block 4c + k / 4.
struct Activations {
  int64_t C;
  std::vector<int8_t> lo, hi;  // (M, C, 64): the even and the odd inputs of each chunk
  std::vector<int32_t> bias;   // (M, C, 16): -8 * the lane's sum of q (the nibbles' + 8, taken off)
  std::vector<float> scale;    // (M, C, 16): the lane's block scale

  Activations(const float* x, int64_t M, int64_t I)
      : C(I / kChunk), lo(M * I / 2), hi(M * I / 2), bias(M * I / 8), scale(M * I / 8) {
    alignas(64) int32_t q[kChunk];
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < C; ++c) {
        const float* v = x + m * I + c * kChunk;
        float block_scale[kChunk / kBlock];
        for (int64_t b = 0; b < kChunk / kBlock; ++b) {
          const __m512 a = _mm512_loadu_ps(v + b * kBlock), d = _mm512_loadu_ps(v + b * kBlock + 16);
          const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(d)));
          const float s = amax / 127.0f;
          block_scale[b] = s;
          if (!(amax > 0)) {
            std::fill(q + b * kBlock, q + (b + 1) * kBlock, 0);
            continue;
          }
          const __m512 sv = _mm512_set1_ps(s), lim = _mm512_set1_ps(127.0f), neg = _mm512_set1_ps(-127.0f);
          for (int h = 0; h < 2; ++h) {
            __m512 t = _mm512_roundscale_ps(_mm512_div_ps(h ? d : a, sv), _MM_FROUND_TO_NEAREST_INT);
            t = _mm512_min_ps(_mm512_max_ps(t, neg), lim);
            _mm512_store_si512((void*)(q + b * kBlock + 16 * h), _mm512_cvtps_epi32(t));
          }
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

// Output rows [o0, o1), R at a time: each chunk's R weight runs are unpacked once and meet every activation row.
template <int M, int R>
void int4_vnni_rows(const Activations& a, const uint8_t* w, const Scales& s, float* y, int64_t I, int64_t O,
                    int64_t group, int64_t o0, int64_t o1) {
  const int64_t half = I / 2, G = I / group, per_group = group / kChunk, C = a.C;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    const int next = rows_ahead<R>(o, o1);  // fetched ahead (native.h)
    const uint8_t* ahead = next ? w + (o + R * kAheadBlocks) * half : w;  // (no pointer past the weight)
    for (int64_t c = 0; c < C; ++c) {
      for (int r = 0; r < next; ++r) fetch_ahead(ahead + r * half + c * 64);
      __m512i lo[R], hi[R];
      __m512 ws[R];
      for (int r = 0; r < R; ++r) {
        const __m512i b = _mm512_loadu_si512((const void*)(w + (o + r) * half + c * 64));
        lo[r] = _mm512_and_si512(b, nibble);
        hi[r] = _mm512_and_si512(_mm512_srli_epi16(b, 4), nibble);
        ws[r] = _mm512_set1_ps(s[(o + r) * G + c / per_group]);
      }
      for (int m = 0; m < M; ++m) {
        const int64_t at = m * C + c;
        const __m512i xl = _mm512_loadu_si512((const void*)(a.lo.data() + at * 64));
        const __m512i xh = _mm512_loadu_si512((const void*)(a.hi.data() + at * 64));
        const __m512i start = _mm512_loadu_si512((const void*)(a.bias.data() + at * 16));
        const __m512 xs = _mm512_loadu_ps(a.scale.data() + at * 16);
        for (int r = 0; r < R; ++r) {
          const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo[r], xl), hi[r], xh);
          acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(xs, ws[r]), acc[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * O + o + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
  if (o < o1) int4_vnni_rows<M, 1>(a, w, s, y, I, O, group, o, o1);
}

#endif  // __AVX512VNNI__

}  // namespace

// Whether this build has the kernel (the compiler targeted a CPU with AVX512-VNNI).
bool has_vnni() {
#ifdef __AVX512VNNI__
  return true;
#else
  return false;
#endif
}

// x (..., I) @ W^T for W in compressed-tensors' int4 layout (native.cpp gemv_int4), groups a multiple of 128.
torch::Tensor gemv_int4_vnni(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                             int64_t group) {
#ifdef __AVX512VNNI__
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
      int4_vnni_rows<decltype(m)::value, decltype(r)::value>(a, wp, sp, yp, I, O, group, o0, o1);
    });
  });
  return shaped_output(x, y, O);
#else
  TORCH_CHECK(false, "built for a CPU without AVX512-VNNI");
#endif
}

// --- around int8's `int_mm` prefill (torch._int_mm does the product) ----------------------------------------------

// x (M, I) of a float dtype -> q (M, I) int8 and scale (M, 1) float32: scale = max(max|x_row|, 1e-12) / 127,
// q = round-half-even(x / scale); the same fp32 operations as int8.py's torch expression, so the same bits.
std::vector<torch::Tensor> quantize_rows_int8(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "rows (M, I)");
  const auto xf = x.to(torch::kFloat32).contiguous();
  const int64_t M = xf.size(0), I = xf.size(1), full = I / 16 * 16;
  auto q = torch::empty({M, I}, torch::kInt8);
  auto scale = torch::empty({M, 1}, torch::kFloat32);
  const float* xp = xf.data_ptr<float>();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const float* row = xp + m * I;
      __m512 mx = _mm512_setzero_ps();
      for (int64_t i = 0; i < full; i += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(row + i)));
      float amax = _mm512_reduce_max_ps(mx);
      for (int64_t i = full; i < I; ++i) amax = std::max(amax, std::fabs(row[i]));
      const float s = std::max(amax, 1e-12f) / 127.0f;
      sp[m] = s;
      const __m512 sv = _mm512_set1_ps(s);
      for (int64_t i = 0; i < full; i += 16) {
        const __m512 t = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(row + i), sv), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i*)(qp + m * I + i), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(t)));
      }
      for (int64_t i = full; i < I; ++i) qp[m * I + i] = (int8_t)std::nearbyint(row[i] / s);
    }
  });
  return {q, scale};
}

// y (M, O) int32 -> (float(y) * x_scale[m]) * w_scale[o], rounded once to `kind`: int8.py's torch expression
// (`.float().mul_(x_scale).mul_(scale.float()).to(dtype)`), the same two fp32 products in the same order.
torch::Tensor rescale_int32(const torch::Tensor& y, const torch::Tensor& x_scale, const torch::Tensor& w_scale,
                            torch::ScalarType kind) {
  TORCH_CHECK(y.dim() == 2 && y.is_contiguous() && y.scalar_type() == torch::kInt32, "a contiguous (M, O) int32 product");
  const int64_t M = y.size(0), O = y.size(1);
  const auto xs = x_scale.to(torch::kFloat32).contiguous();
  const auto ws = w_scale.to(torch::kFloat32).contiguous();
  TORCH_CHECK(xs.numel() == M && ws.numel() == O, "one scale per row and per output");
  TORCH_CHECK(kind == torch::kFloat32 || kind == torch::kBFloat16 || kind == torch::kHalf, "a float out");
  auto out = torch::empty({M, O}, kind);
  const int32_t* yp = y.data_ptr<int32_t>();
  const float* xsp = xs.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  // No torch op inside the parallel region: its threads do not carry the caller's inference mode.
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> row(kind == torch::kFloat32 ? 0 : O);
    for (int64_t m = m0; m < m1; ++m) {
      float* op = kind == torch::kFloat32 ? out.data_ptr<float>() + m * O : row.data();
      const __m512 a = _mm512_set1_ps(xsp[m]);
      int64_t o = 0;
      for (; o + 16 <= O; o += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512((const void*)(yp + m * O + o))), a);
        _mm512_storeu_ps(op + o, _mm512_mul_ps(v, _mm512_loadu_ps(wsp + o)));
      }
      for (; o < O; ++o) op[o] = ((float)yp[m * O + o] * xsp[m]) * wsp[o];
      if (kind != torch::kFloat32) round_row(kind, op, static_cast<char*>(out.data_ptr()) + m * O * out.element_size(), O);
    }
  });
  return out;
}
