// Prefill products in integers on AVX2 (the int4 and int8 formats' "maddubs" prefills): native_vnni_gemm.cpp's two
// GEMMs, the same activations, the same exact int32 sums and the same fp32 steps after them, so the same bits, on
// CPUs without AVX-512 (AMD Zen 3 and older, Intel's client cores: most laptops).
//
// Why: on such a CPU oneDNN's bf16 GEMM runs at a sixth of its fp32 rate and its int8 GEMM slower still
// (docs/results/kernels.md), so every prefill there widens its weights to fp32 ("upcast") and runs at the fp32 FMA
// rate: 16 products a cycle a core. Two byte-product instructions a cycle do 32 (vpmaddwd: 16-bit pairs) or 64
// (vpmaddubsw: byte pairs), exactly, in integers.
// - int4 (vpmaddubsw): the stored nibbles (0..15, unsigned) times int8 activations (-127..127): each 16-bit pair
//   sum is at most 2 * 15 * 127 = 3810, so 8 steps' pair sums add in 16 bits (30480 < 2^15) before vpmaddwd by
//   ones widens them into the int32 lanes vpdpbusd would have filled. Activations quantized in blocks of 128
//   (one per chunk), each block's sum starting at -8 * sum(x_q), scaled by the block's and the group's scales.
// - int8 (vpmaddwd): int8 x int8 byte products would overflow vpmaddubsw's 16-bit pair sums (2 * 255 * 127), so
//   weights and activations are widened to int16 (the weights once per panel, the activations once per call) and
//   vpmaddwd sums each pair of products into an int32 lane. Rows quantized as quantize_rows_int8 does, the whole
//   row's sums in int32, then (float(sum) * x_scale) * w_scale: `int_mm`'s bits.
//
// Layout, as native_vnni_gemm.cpp's: the 8 int32 lanes of a register are 8 output rows, a register of a panel holds
// one "step" of inputs of those rows (int4: 4 nibbles; int8: 2 int16 values) built per chunk by 8 x 8 dword
// transposes, and the activation operand is one row's step broadcast. A task owns 64 output rows; the register block
// is 6 activation rows x 16 output rows (AVX2 has 16 registers: 12 sums, 2 weights, 1 activation).
//
// Axes: M activation rows, I in features, O out features, C chunks per row (int4: 128 inputs; int8: 64, the last
// zero-padded where I is not a multiple of 64).

#include "native.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

using namespace native;

namespace {

constexpr int64_t kSteps = 32;    // register steps per chunk (int4: 4 inputs each, 128; int8: 2 each, 64)
constexpr int64_t kChunk4 = 128;  // int4: inputs per chunk, per activation block (native_vnni_gemm.cpp's kChunk)
constexpr int64_t kChunk8 = 64;   // int8: inputs per chunk
constexpr int kWiden = 8;         // int4: steps summed in 16 bits before widening (8 * 2 * 15 * 127 < 2^15)
constexpr int kMR = 6;            // activation rows per register block
constexpr int64_t kCols = 64;     // output rows per task (4 blocks of 16: 2 registers)
constexpr int64_t kPass = 522;    // activation rows a task's sums cover at once (a multiple of kMR; 130 KB, L2)

// The activations as the kernel reads them, chunk by chunk (a chunk's rows side by side: the register blocks walk
// them; row-major, rows 16-32 KB apart hit the same few L1 sets), and the scales and starts of the sums.
constexpr int64_t kChunkBytes = 128;  // a chunk of one row: int4, 128 int8 values; int8, 64 int16 values
struct Acts {
  int64_t M = 0, C = 0;
  std::vector<uint8_t> q;      // (C, M, 128 bytes): int4, int8 values permuted per chunk (below); int8, int16
  const uint8_t* at(int64_t m, int64_t c) const { return q.data() + (c * M + m) * kChunkBytes; }
  uint8_t* at(int64_t m, int64_t c) { return q.data() + (c * M + m) * kChunkBytes; }
  std::vector<float> scale;    // int4: (M, C) block scales; int8: (M) row scales
  std::vector<int32_t> bias;   // int4: (M, C) -8 * the block's sum of q; int8: none
};

// Row m of x (I values of W's stored type) as fp32 in buf (padded with zeros to buf's length).
template <typename W>
void widen_row(const typename W::T* row, int64_t I, std::vector<float>& buf) {
  const int64_t full = I / 16 * 16;
  for (int64_t i = 0; i < full; i += 16) vstore(buf.data() + i, W::load(row + i));
  if (full < I) vstore(buf.data() + full, W::load_masked(row + full, I - full));
  std::fill(buf.begin() + I, buf.end(), 0.0f);
}

// int4: each chunk of 128 inputs quantized as a block (scale = max|x| / 127, q = round-half-even(x / scale); an
// all-zero block or one holding a NaN gives q = 0 and no bias), stored with the chunk's even inputs first, then its
// odd ones: the order of the panel's steps (a stored byte holds inputs 2b and 2b + 1: low nibbles, then high).
template <typename W>
Acts int4_acts(const typename W::T* x, int64_t M, int64_t I) {
  Acts a;
  a.M = M;
  a.C = I / kChunk4;
  a.q.resize(M * I);
  a.scale.resize(M * a.C);
  a.bias.resize(M * a.C);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(I);
    alignas(32) int32_t q[kChunk4];
    for (int64_t m = m0; m < m1; ++m) {
      widen_row<W>(x + m * I, I, buf);
      for (int64_t c = 0; c < a.C; ++c) {
        const float* v = buf.data() + c * kChunk4;
        V mx = vzero();
        for (int64_t j = 0; j < kChunk4; j += 16) mx = vmax(mx, vabs(vload(v + j)));
        const float amax = vmaxlane(mx), s = amax / 127.0f;
        uint8_t* out = a.at(m, c);
        a.scale[m * a.C + c] = s;
        int32_t sum = 0;
        if (amax > 0) {
          const Divisor div(s);
          for (int64_t j = 0; j < kChunk4; j += 16) quantize_ints(v + j, div, vset(-127.0f), vset(127.0f), q + j);
          for (int64_t j = 0; j < kChunk4; ++j) sum += q[j];
        } else {
          std::fill(q, q + kChunk4, 0);
        }
        for (int64_t b = 0; b < kChunk4 / 2; ++b) {
          out[b] = (uint8_t)(int8_t)q[2 * b];
          out[kChunk4 / 2 + b] = (uint8_t)(int8_t)q[2 * b + 1];
        }
        a.bias[m * a.C + c] = -8 * sum;
      }
    }
  });
  return a;
}

// int8: each row quantized as quantize_rows_int8 does (scale = max(max|x_row|, 1e-12) / 127, q = round-half-even(x /
// scale): the same fp32 operations, so the same bits) and stored as int16, padded to whole chunks with q = 0.
template <typename W>
Acts int8_acts(const typename W::T* x, int64_t M, int64_t I) {
  Acts a;
  a.M = M;
  a.C = (I + kChunk8 - 1) / kChunk8;
  a.q.resize(M * a.C * kChunkBytes);
  a.scale.resize(M);
  at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
    std::vector<float> buf(a.C * kChunk8);
    std::vector<int32_t> q(a.C * kChunk8);
    for (int64_t m = m0; m < m1; ++m) {
      widen_row<W>(x + m * I, I, buf);
      V mx = vzero();
      for (size_t i = 0; i < buf.size(); i += 16) mx = vmax(mx, vabs(vload(buf.data() + i)));  // zeros past I
      const float s = std::max(vmaxlane(mx), 1e-12f) / 127.0f;
      a.scale[m] = s;
      const Divisor div(s);
      for (size_t i = 0; i < buf.size(); i += 16)
        quantize_ints(buf.data() + i, div, vset(-127.0f), vset(127.0f), q.data() + i);
      for (int64_t c = 0; c < a.C; ++c) {
        int16_t* out = reinterpret_cast<int16_t*>(a.at(m, c));
        for (int64_t i = 0; i < kChunk8; ++i) out[i] = (int16_t)q[c * kChunk8 + i];
      }
    }
  });
  return a;
}

// r[j] <- column j of the 8 x 8 dwords r (lane i of the result: row i's dword j).
inline void transpose8(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);      // a0 b0 a1 b1 | a4 b4 a5 b5
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);  // a2 b2 a3 b3 | a6 b6 a7 b7
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);          // a0 b0 c0 d0 | a4 b4 c4 d4
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);      // column 1 | 5
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);  // column 2 | 6
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);  // column 3 | 7
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    r[j + 4] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

// A layer's weights as the kernel reads them: `w` (O, row_bytes) bytes, I inputs a row.
struct Weights {
  const uint8_t* w;
  int64_t row_bytes, I;
};

// panel (kSteps, kCols) dwords <- chunk c of weight rows o0 .. o0 + rows, one row per lane. int4: steps 0-15 the
// 64 stored bytes' low nibbles, 16-31 their high ones; int8: the chunk's 64 bytes widened to int16, 2 a step (bytes
// past I zero).
template <bool kInt8>
void build_panel(const Weights& wt, int64_t o0, int64_t rows, int64_t c, int32_t* panel) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const int64_t left = wt.I - c * kChunk8;  // int8: this chunk's inputs in the row (the last may be short)
  for (int64_t g = 0; g < rows; g += 8) {
    __m256i part[4][8];  // 4 registers of 8 steps, for 8 rows
    for (int r = 0; r < 8; ++r) {
      const uint8_t* row = wt.w + (o0 + g + r) * wt.row_bytes;
      if constexpr (kInt8) {
        alignas(32) int8_t tail[kChunk8] = {};
        const int8_t* src = reinterpret_cast<const int8_t*>(row + c * kChunk8);
        if (left < kChunk8) src = static_cast<const int8_t*>(std::memcpy(tail, src, left));
        for (int k = 0; k < 4; ++k)
          part[k][r] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(src + 16 * k)));
      } else {
        const __m256i b0 = _mm256_loadu_si256((const __m256i*)(row + c * 64));
        const __m256i b1 = _mm256_loadu_si256((const __m256i*)(row + c * 64 + 32));
        part[0][r] = _mm256_and_si256(b0, nibble);
        part[1][r] = _mm256_and_si256(b1, nibble);
        part[2][r] = _mm256_and_si256(_mm256_srli_epi16(b0, 4), nibble);
        part[3][r] = _mm256_and_si256(_mm256_srli_epi16(b1, 4), nibble);
      }
    }
    for (int k = 0; k < 4; ++k) {
      transpose8(part[k]);
      for (int j = 0; j < 8; ++j) _mm256_store_si256((__m256i*)(panel + (8 * k + j) * kCols + g), part[k][j]);
    }
  }
}

// The inner steps as inline assembly, in program order (volatile): from intrinsics GCC hoisted all six rows'
// broadcasts ahead of the products, ran out of AVX2's 16 registers and kept a third of the sums on the stack (a load
// and a store per product, about half the rate).
inline __m256i broadcast4(const uint8_t* x) {  // one step of a row (4 bytes) in every lane
  __m256i v;
  asm volatile("vpbroadcastd %[x], %[v]" : [v] "=x"(v) : [x] "m"(*reinterpret_cast<const int32_t*>(x)));
  return v;
}
// int4: p + the 16-bit pair sums of w's unsigned bytes times x's signed ones (vpmaddubsw, then vpaddw).
inline __m256i maddubs_add(__m256i p, __m256i w, __m256i x) {
  __m256i t;
  asm volatile("vpmaddubsw %[x], %[w], %[t]\n\tvpaddw %[t], %[p], %[p]"
               : [p] "+x"(p), [t] "=&x"(t) : [w] "x"(w), [x] "x"(x));
  return p;
}
// int8: s + the int32 pair sums of w's int16 values times x's (vpmaddwd, then vpaddd).
inline __m256i madd_add(__m256i s, __m256i w, __m256i x) {
  __m256i t;
  asm volatile("vpmaddwd %[w], %[x], %[t]\n\tvpaddd %[t], %[s], %[s]"
               : [s] "+x"(s), [t] "=&x"(t) : [w] "x"(w), [x] "x"(x));
  return s;
}

// int4: chunk c's products of activation rows m0 .. m0 + MR with the panel's output rows n0 .. n0 + 16, each sum
// scaled by its block's and its group's scales (ws) and added to acc (MR rows of kCols fp32, native_vnni_gemm.cpp's
// order: (x_scale * w_scale) first, then one fused multiply-add).
template <int MR>
void int4_block(const Acts& a, int64_t m0, int64_t c, const int32_t* panel, int64_t n0, const float* ws, float* acc) {
  __m256i sum[MR][2];
  const uint8_t* x[MR];
  for (int m = 0; m < MR; ++m) {
    sum[m][0] = sum[m][1] = _mm256_set1_epi32(a.bias[(m0 + m) * a.C + c]);
    x[m] = a.at(m0 + m, c);
  }
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t s0 = 0; s0 < kSteps; s0 += kWiden) {
    __m256i pairs[MR][2];
    for (int m = 0; m < MR; ++m) pairs[m][0] = pairs[m][1] = _mm256_setzero_si256();
    for (int64_t s = s0; s < s0 + kWiden; ++s) {
      const __m256i w0 = _mm256_load_si256((const __m256i*)(panel + s * kCols + n0));
      const __m256i w1 = _mm256_load_si256((const __m256i*)(panel + s * kCols + n0 + 8));
      for (int m = 0; m < MR; ++m) {
        const __m256i xb = broadcast4(x[m] + 4 * s);
        pairs[m][0] = maddubs_add(pairs[m][0], w0, xb);
        pairs[m][1] = maddubs_add(pairs[m][1], w1, xb);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < 2; ++n) sum[m][n] = _mm256_add_epi32(sum[m][n], _mm256_madd_epi16(pairs[m][n], ones));
  }
  for (int m = 0; m < MR; ++m) {
    const __m256 xs = _mm256_set1_ps(a.scale[(m0 + m) * a.C + c]);
    for (int n = 0; n < 2; ++n) {
      float* p = acc + m * kCols + n0 + 8 * n;
      const __m256 scales = _mm256_mul_ps(xs, _mm256_load_ps(ws + n0 + 8 * n));
      _mm256_store_ps(p, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[m][n]), scales, _mm256_load_ps(p)));
    }
  }
}

// int8: chunk c's int32 sums of activation rows m0 .. m0 + MR with the panel's output rows n0 .. n0 + 16, added to
// acc (MR rows of kCols int32).
template <int MR>
void int8_block(const Acts& a, int64_t m0, int64_t c, const int32_t* panel, int64_t n0, int32_t* acc) {
  __m256i sum[MR][2];
  const uint8_t* x[MR];
  for (int m = 0; m < MR; ++m) {
    sum[m][0] = sum[m][1] = _mm256_setzero_si256();
    x[m] = a.at(m0 + m, c);
  }
  for (int64_t s = 0; s < kSteps; ++s) {
    const __m256i w0 = _mm256_load_si256((const __m256i*)(panel + s * kCols + n0));
    const __m256i w1 = _mm256_load_si256((const __m256i*)(panel + s * kCols + n0 + 8));
    for (int m = 0; m < MR; ++m) {
      const __m256i xb = broadcast4(x[m] + 4 * s);  // inputs 2s and 2s + 1, int16
      sum[m][0] = madd_add(sum[m][0], w0, xb);
      sum[m][1] = madd_add(sum[m][1], w1, xb);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < 2; ++n) {
      __m256i* p = (__m256i*)(acc + m * kCols + n0 + 8 * n);
      _mm256_store_si256(p, _mm256_add_epi32(_mm256_load_si256(p), sum[m][n]));
    }
}

// The block for a run-time mr (1..6): MR known at compile time inside, so the sums stay in registers.
template <bool kInt8>
void block(int64_t mr, const Acts& a, int64_t m0, int64_t c, const int32_t* panel, int64_t n0, const float* ws,
           void* acc) {
  auto run = [&](auto rows) {
    constexpr int MR = decltype(rows)::value;
    if constexpr (kInt8)
      int8_block<MR>(a, m0, c, panel, n0, static_cast<int32_t*>(acc));
    else
      int4_block<MR>(a, m0, c, panel, n0, ws, static_cast<float*>(acc));
  };
  switch (mr) {
    case 6: return run(std::integral_constant<int, 6>{});
    case 5: return run(std::integral_constant<int, 5>{});
    case 4: return run(std::integral_constant<int, 4>{});
    case 3: return run(std::integral_constant<int, 3>{});
    case 2: return run(std::integral_constant<int, 2>{});
    default: return run(std::integral_constant<int, 1>{});
  }
}

// y (M, O) in `kind` = the activations a times the weights (group_scale(o, c): int4, row o's scale for chunk c;
// int8, its row scale). Tasks of 64 output rows; a task walks the activation rows kPass at a time.
template <bool kInt8, typename GroupScale>
torch::Tensor gemm(const Acts& a, const Weights& wt, int64_t M, int64_t O, torch::ScalarType kind,
                   GroupScale group_scale) {
  auto y = torch::empty({M, O}, kind);
  char* yp = static_cast<char*>(y.data_ptr());
  const int64_t item = y.element_size(), tiles = (O + kCols - 1) / kCols;
  // No torch op inside the parallel region: its threads do not carry the caller's inference mode.
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    alignas(32) int32_t panel[kSteps * kCols];  // 8 KB
    alignas(32) float ws[kCols];
    alignas(32) float out[kCols];
    std::vector<int32_t> store(kPass * kCols + 8);  // fp32 or int32 sums, 32-byte aligned below
    void* acc = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(store.data()) + 31) & ~uintptr_t(31));
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t o0 = t * kCols, cols = std::min(kCols, O - o0);  // a multiple of 16
      for (int64_t p0 = 0; p0 < M; p0 += kPass) {
        const int64_t rows = std::min(kPass, M - p0);
        std::memset(acc, 0, rows * kCols * 4);  // 0 is 0.0f and 0
        for (int64_t c = 0; c < a.C; ++c) {
          build_panel<kInt8>(wt, o0, cols, c, panel);
          if (!kInt8)
            for (int64_t n = 0; n < cols; ++n) ws[n] = group_scale(o0 + n, c);
          for (int64_t m = 0; m < rows; m += kMR)
            for (int64_t n0 = 0; n0 < cols; n0 += 16)
              block<kInt8>(std::min<int64_t>(kMR, rows - m), a, p0 + m, c, panel, n0, ws,
                           static_cast<int32_t*>(acc) + m * kCols);
        }
        if (kInt8)
          for (int64_t n = 0; n < cols; ++n) ws[n] = group_scale(o0 + n, 0);
        for (int64_t m = 0; m < rows; ++m) {
          char* dst = yp + ((p0 + m) * O + o0) * item;
          const float* f = static_cast<const float*>(acc) + m * kCols;
          if (kInt8) {  // rescale_int32's two fp32 products, in its order
            const int32_t* sums = static_cast<const int32_t*>(acc) + m * kCols;
            const __m256 xs = _mm256_set1_ps(a.scale[p0 + m]);
            for (int64_t n = 0; n < cols; n += 8) {
              const __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_load_si256((const __m256i*)(sums + n))), xs);
              _mm256_store_ps(out + n, _mm256_mul_ps(v, _mm256_load_ps(ws + n)));
            }
            f = out;
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

}  // namespace

// x (M, I) @ W^T for W in compressed-tensors' int4 layout (O, I/2) uint8 with scales (O, I / group), groups a
// multiple of 128 -> (M, O) in x's dtype: gemm_int4_vnni's bits.
torch::Tensor gemm_int4_dot(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                            int64_t group) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == torch::kUInt8,
              "a contiguous (O, I/2) uint8 weight");
  const int64_t O = packed.size(0), I = packed.size(1) * 2;
  TORCH_CHECK(O % 16 == 0, "output rows a multiple of 16");
  TORCH_CHECK(group % kChunk4 == 0 && I % group == 0, "groups of a multiple of 128 that divide the row");
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == O && scale.size(1) == I / group, "scale (O, I / group)");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == I, "activations (M, ", I, ")");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), per_group = group / kChunk4, G = I / group;
  std::optional<Acts> a;
  with_load(x.scalar_type(), "activation", [&](auto load) {
    using W = decltype(load);
    a.emplace(int4_acts<W>(static_cast<const typename W::T*>(xc.data_ptr()), M, I));
  });
  const auto s = scale.contiguous();
  const Scales sp(s);
  return gemm<false>(*a, Weights{packed.data_ptr<uint8_t>(), I / 2, I}, M, O, x.scalar_type(),
                     [&](int64_t o, int64_t c) { return sp[o * G + c / per_group]; });
}

// int8's `int_mm` prefill in one call: x (M, I) of a float dtype, W (O, I) int8 with w_scale (O) or (O, 1) ->
// (float(q(x) @ W^T) * x_scale) * w_scale in x's dtype: gemm_int8_vnni's (and int_mm's) bits.
torch::Tensor gemm_int8_dot(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& w_scale) {
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
    a.emplace(int8_acts<W>(static_cast<const typename W::T*>(xc.data_ptr()), M, I));
  });
  const auto ws = w_scale.to(torch::kFloat32).contiguous();
  const float* wsp = ws.data_ptr<float>();
  return gemm<true>(*a, Weights{reinterpret_cast<const uint8_t*>(q.data_ptr<int8_t>()), I, I}, M, O,
                    x.scalar_type(), [&](int64_t o, int64_t) { return wsp[o]; });
}
