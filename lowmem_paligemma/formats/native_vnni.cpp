// The two passes around int8's `int_mm` prefill (formats/int8.py): its activations quantized per row, its int32
// product scaled back, each one pass over the data instead of torch's five; and has_vnni(). AVX-512 builds only.
#include "native.h"

#include <algorithm>
#include <cstdint>
#include <vector>

using namespace native;

// Whether this build has the integer prefills of native_vnni_gemm.cpp and the passes below (the compiler targeted
// a CPU with AVX512-VNNI).
bool has_vnni() {
#ifdef __AVX512VNNI__
  return true;
#else
  return false;
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
