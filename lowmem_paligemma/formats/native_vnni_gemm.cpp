// The integer prefills on AVX512-VNNI (the int4 and int8 formats' "vnni" prefills): 64 byte products an
// instruction, the activations' rows broadcast against a panel's lanes. native_igemm.h has the activations, the
// panels and the loops around this file's Block; native_amx_gemm.cpp runs the same loops on AMX tiles.

#include "native_igemm.h"

#include <cstdint>
#include <cstring>

using namespace igemm;

namespace {

#ifdef __AVX512VNNI__

// Chunk c's products of activation rows m0 .. m0 + MR with the panel's 16 * NR rows, added to acc (MR rows of
// kCols, stride kCols): int4 scales each sum by its block's and its group's scales (ws, kCols) into fp32; int8 adds
// the int32 sums.
template <bool kInt8, int MR, int NR>
void chunk_block(const Acts& a, int64_t m0, int64_t c, const int32_t* panel, const __m512i* corr, const float* ws,
                 void* acc) {
  __m512i sum[MR][NR];
  const uint8_t* x[MR];
  for (int m = 0; m < MR; ++m) {
    for (int n = 0; n < NR; ++n) sum[m][n] = kInt8 ? corr[n] : _mm512_set1_epi32(a.bias[(m0 + m) * a.C + c]);
    x[m] = a.q.data() + (m0 + m) * a.stride + c * kChunk;
  }
  for (int64_t s = 0; s < kSteps; ++s) {
    __m512i wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm512_load_si512((const void*)(panel + s * kCols + 16 * n));
    for (int m = 0; m < MR; ++m) {
      int32_t four;
      std::memcpy(&four, x[m] + 4 * s, 4);  // 4 inputs of row m, broadcast
      const __m512i xb = _mm512_set1_epi32(four);
      for (int n = 0; n < NR; ++n) sum[m][n] = kInt8 ? dpbusd(sum[m][n], xb, wv[n]) : dpbusd(sum[m][n], wv[n], xb);
    }
  }
  for (int m = 0; m < MR; ++m) {
    if constexpr (kInt8) {
      int32_t* p = static_cast<int32_t*>(acc) + m * kCols;
      for (int n = 0; n < NR; ++n) {
        const __m512i old = _mm512_load_si512((const void*)(p + 16 * n));
        _mm512_store_si512((void*)(p + 16 * n), _mm512_add_epi32(old, sum[m][n]));
      }
    } else {
      float* p = static_cast<float*>(acc) + m * kCols;
      const __m512 xs = _mm512_set1_ps(a.scale[(m0 + m) * a.C + c]);
      for (int n = 0; n < NR; ++n) {
        const __m512 f = _mm512_cvtepi32_ps(sum[m][n]), scales = _mm512_mul_ps(xs, _mm512_load_ps(ws + 16 * n));
        _mm512_store_ps(p + 16 * n, _mm512_fmadd_ps(f, scales, _mm512_load_ps(p + 16 * n)));
      }
    }
  }
}

// chunk_block for run-time mr (1..6) and nr (1..4): both compile-time inside, so the sums stay in registers.
template <bool kInt8>
struct VnniBlock {
  static constexpr int64_t kRows = 6;
  static constexpr int64_t kChunks = 1;
  static constexpr bool kCorrected = kInt8;  // int8: the activations made unsigned, each chunk's 128s taken off
  static void prepare(Acts&) {}
  void flush() const {}
  void operator()(int nr, int64_t mr, const Acts& a, int64_t m0, int64_t c, int64_t /* run: 1 */,
                  const int32_t* panel, const __m512i* corr, const float* ws, void* acc) const {
    auto rows = [&](auto n) {
      constexpr int NR = decltype(n)::value;
      switch (mr) {
        case 6: return chunk_block<kInt8, 6, NR>(a, m0, c, panel, corr, ws, acc);
        case 5: return chunk_block<kInt8, 5, NR>(a, m0, c, panel, corr, ws, acc);
        case 4: return chunk_block<kInt8, 4, NR>(a, m0, c, panel, corr, ws, acc);
        case 3: return chunk_block<kInt8, 3, NR>(a, m0, c, panel, corr, ws, acc);
        case 2: return chunk_block<kInt8, 2, NR>(a, m0, c, panel, corr, ws, acc);
        default: return chunk_block<kInt8, 1, NR>(a, m0, c, panel, corr, ws, acc);
      }
    };
    switch (nr) {
      case 4: return rows(std::integral_constant<int, 4>{});
      case 3: return rows(std::integral_constant<int, 3>{});
      case 2: return rows(std::integral_constant<int, 2>{});
      default: return rows(std::integral_constant<int, 1>{});
    }
  }
};

#endif  // __AVX512VNNI__

}  // namespace

// x (M, I) @ W^T for W in compressed-tensors' int4 layout (O, I/2) uint8 with scales (O, I / group), groups a
// multiple of 128 -> (M, O) in x's dtype.
torch::Tensor gemm_int4_vnni(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                             int64_t group) {
#ifdef __AVX512VNNI__
  return int4_gemm<VnniBlock<false>>(x, packed, scale, group);
#else
  TORCH_CHECK(false, "built for a CPU without AVX512-VNNI");
#endif
}

// int8's `int_mm` prefill in one call: the bits of quantize_rows_int8, torch._int_mm and rescale_int32
// (native_igemm.h `int8_gemm`).
torch::Tensor gemm_int8_vnni(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& w_scale) {
#ifdef __AVX512VNNI__
  return int8_gemm<VnniBlock<true>, false>(x, q, w_scale);
#else
  TORCH_CHECK(false, "built for a CPU without AVX512-VNNI");
#endif
}
