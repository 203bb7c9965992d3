// Decode-step products at the memory wall, and the dequantizations a prefill feeds its GEMM with.
//
// A decode step multiplies a few rows of activations (one per sequence, M <= 16) by every weight once, so its
// speed is the rate the weights stream from DRAM. These kernels read each weight once in its stored format
// (bf16, fp16, fp32; int8 with one scale per output row; int4 in compressed-tensors' nibble order with one scale
// per group of the row), convert it in registers, and multiply-accumulate in fp32 against all M activation rows,
// over output rows split between torch's threads. Written on native.h's 16-lane vectors (AVX-512F/BW, or AVX2 with
// FMA and F16C); built for the running machine by formats/native.py, which offers them only where the CPU has one.
//
// Rounding: every product is exact in fp32 (a bf16/fp16 weight, or q * x with q small) and sums accumulate in
// fp32, as the reference kernels do; only the order of the sums differs. int8 and int4 apply their scales to the
// fp32 sums (per row; per group of the row), which is the format's definition (w = q * scale).
//
// Axes: M activation rows, I in features, O out features, G groups per row (I / group).

#include "native.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

using namespace native;  // native.h: the loads, dense_rows / dense_any, Scales, kMaxRows, kGrain

namespace {

// int4 rows [o0, o1), R at a time sharing each activation load: per group and row a 16-entry table of
// (q - 8) * scale indexed by each nibble (one permute per 16 values instead of a conversion, a subtraction and a
// product), multiplied into the even / odd activations.
template <int M, int R>
void int4_rows(const float* even, const float* odd, const uint8_t* w, const Scales& s, float* y, int64_t I, int64_t O,
               int64_t group, int64_t o0, int64_t o1) {
  const int64_t half = I / 2, G = I / group, ghalf = group / 2;
  alignas(64) static constexpr float kLevels[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
  const V levels = vload(kLevels);
  int64_t o = o0;
  for (; o + R <= o1; o += R) {
    V acc[R][M], acc2[R][M];  // two chains per output: the even and the odd values
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = acc2[r][m] = vzero();
    // The next block's rows, into L1 (not native.h's fetch_ahead into L2): this kernel's table lookups keep it
    // short of the memory rate, and with fetch_ahead it streamed 11-12 GB/s in two kernel runs against 17-23 with
    // this (bench/kernels.py, AMD Zen 4; a noisy VM, so not a finding either way: the code it had stayed).
    const int next = rows_ahead<R>(o, o1, 1);
    const uint8_t* ahead = next ? w + (o + R) * half : w;  // (no pointer past the weight)
    for (int64_t g = 0; g < G; ++g) {
      V table[R];
      for (int r = 0; r < R; ++r) table[r] = vmul(levels, vset(s[(o + r) * G + g]));
      for (int64_t j = g * ghalf; j < (g + 1) * ghalf; j += 16) {  // 16 bytes of a row: 32 values
        V xe[M], xo[M];
        for (int m = 0; m < M; ++m) {
          xe[m] = vload(even + m * half + j);
          xo[m] = vload(odd + m * half + j);
        }
        if (j % 64 == 0)
          for (int r = 0; r < next; ++r) _mm_prefetch((const char*)(ahead + r * half + j), _MM_HINT_T0);
        for (int r = 0; r < R; ++r) {
          V lo, hi;
          nibbles(w + (o + r) * half + j, table[r], lo, hi);
          for (int m = 0; m < M; ++m) {
            acc[r][m] = vfmadd(lo, xe[m], acc[r][m]);
            acc2[r][m] = vfmadd(hi, xo[m], acc2[r][m]);
          }
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) y[m * O + o + r] = vsum(vadd(acc[r][m], acc2[r][m]));
  }
  if (o < o1) int4_rows<M, 1>(even, odd, w, s, y, I, O, group, o, o1);
}

}  // namespace

// x (..., I) @ w (O, I)^T for a bf16, fp16 or fp32 weight; x of any float dtype; the result in x's dtype.
torch::Tensor gemv_dense(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(), "a contiguous (O, I) CPU weight");
  const int64_t O = w.size(0), I = w.size(1);
  auto xr = as_f32_rows(x, I);
  const int64_t M = xr.size(0);
  auto y = torch::empty({M, O}, torch::kFloat32);
  const float* xp = xr.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  with_load(w.scalar_type(), "weight", [&](auto load) {
    using W = decltype(load);
    const auto* wp = static_cast<const typename W::T*>(w.data_ptr());
    at::parallel_for(0, O, kGrain, [&](int64_t o0, int64_t o1) { dense_any<W>(xp, wp, yp, M, I, O, o0, o1); });
  });
  return shaped_output(x, y, O);
}

// x (..., I) @ (q (O, I) int8 * scale (O,))^T: the scale applied to each row's fp32 sum.
torch::Tensor gemv_int8(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8, "a contiguous (O, I) int8 weight");
  const int64_t O = q.size(0), I = q.size(1);
  TORCH_CHECK(scale.numel() == O, "one scale per output row");
  auto xr = as_f32_rows(x, I);
  const int64_t M = xr.size(0);
  const auto s = scale.reshape({O}).contiguous();
  const Scales sp(s);
  auto y = torch::empty({M, O}, torch::kFloat32);
  const float* xp = xr.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, O, kGrain, [&](int64_t o0, int64_t o1) {
    dense_any<I8>(xp, q.data_ptr<int8_t>(), yp, M, I, O, o0, o1);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t o = o0; o < o1; ++o) yp[m * O + o] *= sp[o];
  });
  return shaped_output(x, y, O);
}

// x (..., I) @ W^T with W in compressed-tensors' int4 layout: packed (O, I/2) uint8, byte j of a row holding
// value 2j in its low nibble and 2j+1 in its high one, each stored as q + 8 (q in [-8, 7]); scale (O, I/group).
// The activations are split into even and odd columns once, so a byte's two nibbles meet their activations without
// a shuffle; each group's fp32 sum is multiplied by its scale.
torch::Tensor gemv_int4(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale, int64_t group) {
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.scalar_type() == torch::kUInt8,
              "a contiguous (O, I/2) uint8 weight");
  const int64_t O = packed.size(0), I = packed.size(1) * 2;
  TORCH_CHECK(group % 32 == 0 && I % group == 0, "groups of a multiple of 32 that divide the row");
  const int64_t G = I / group;
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == O && scale.size(1) == G, "scale (O, I / group)");
  auto xr = as_f32_rows(x, I);
  const int64_t M = xr.size(0);
  auto even = xr.index({torch::indexing::Slice(), torch::indexing::Slice(0, torch::indexing::None, 2)}).contiguous();
  auto odd = xr.index({torch::indexing::Slice(), torch::indexing::Slice(1, torch::indexing::None, 2)}).contiguous();
  const auto s = scale.contiguous();
  const Scales sp(s);
  auto y = torch::empty({M, O}, torch::kFloat32);
  const float* ep = even.data_ptr<float>();
  const float* op = odd.data_ptr<float>();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, O, kGrain, [&](int64_t o0, int64_t o1) {
    int4_blocking(M, [&](auto m, auto r) {
      int4_rows<decltype(m)::value, decltype(r)::value>(ep, op, wp, sp, yp, I, O, group, o0, o1);
    });
  });
  return shaped_output(x, y, O);
}

// The int4 layout above dequantized into `out` (O, I) of a float dtype (a prefill's GEMM reads it): w = q * scale,
// computed in fp32 and rounded once to out's dtype. The same nibble table as the product; even and odd values
// interleaved back into row order with two permutes.
void dequantize_int4(const torch::Tensor& packed, const torch::Tensor& scale, int64_t group, torch::Tensor& out) {
  const int64_t O = packed.size(0), I = packed.size(1) * 2, G = I / group, half = I / 2, ghalf = group / 2;
  TORCH_CHECK(group % 32 == 0 && I % group == 0, "groups of a multiple of 32 that divide the row");
  TORCH_CHECK(out.is_contiguous() && out.size(0) == O && out.size(1) == I, "out (O, I) contiguous");
  const auto kind = out.scalar_type();
  TORCH_CHECK(kind == torch::kFloat32 || kind == torch::kBFloat16 || kind == torch::kHalf, "a float out");
  const auto s = scale.contiguous();
  const Scales sp(s);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  // float32 out (the "upcast" prefill's GEMM input) is written straight to its rows with non-temporal stores: the
  // layer's float32 copy is far larger than the caches, so reading its lines in before overwriting them (what a
  // plain store does) would only double the traffic. 16-bit outs go through one fp32 row.
  float* const direct = kind == torch::kFloat32 ? out.data_ptr<float>() : nullptr;
  const bool stream = direct != nullptr && reinterpret_cast<uintptr_t>(direct) % 64 == 0 && I % 16 == 0;
  at::parallel_for(0, O, kGrain, [&](int64_t o0, int64_t o1) {
    alignas(64) static constexpr float kLevels[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};
    const V levels = vload(kLevels);
    std::vector<float> buffer(direct != nullptr ? 0 : I);
    for (int64_t o = o0; o < o1; ++o) {
      float* const row = direct != nullptr ? direct + o * I : buffer.data();
      for (int64_t g = 0; g < G; ++g) {
        const V table = vmul(levels, vset(sp[o * G + g]));
        for (int64_t j = g * ghalf; j < (g + 1) * ghalf; j += 16) {  // 16 bytes: values 2j .. 2j + 31
          V lo, hi;
          nibbles(wp + o * half + j, table, lo, hi);
          store_interleaved(row + 2 * j, lo, hi, stream);
        }
      }
      if (direct == nullptr) round_row(kind, row, static_cast<char*>(out.data_ptr()) + o * I * out.element_size(), I);
    }
    if (stream) _mm_sfence();  // the streamed lines are visible before the GEMM reads them
  });
}

// The "upcast" prefill's other half (formats/dense.py): a 16-bit weight widened to float32 (exact), streamed to
// `out` with non-temporal stores, as dequantize_int4 does, for the same reason.
void widen_float32(const torch::Tensor& w, torch::Tensor& out) {
  TORCH_CHECK(w.is_contiguous() && w.device().is_cpu(), "a contiguous CPU weight");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kFloat32 && out.sizes() == w.sizes(),
              "out: float32, contiguous, the weight's shape");
  const auto kind = w.scalar_type();
  TORCH_CHECK(kind == torch::kBFloat16 || kind == torch::kHalf, "a bf16 or fp16 weight");
  const int64_t n = w.numel(), blocks = n / 16;
  const auto* src = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* dst = out.data_ptr<float>();
  const bool stream = reinterpret_cast<uintptr_t>(dst) % 64 == 0;
  at::parallel_for(0, blocks, 4096, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const V v = kind == torch::kBFloat16 ? BF16::load(src + 16 * b) : F16::load(src + 16 * b);
      if (stream) {
        vstream(dst + 16 * b, v);
      } else {
        vstore(dst + 16 * b, v);
      }
    }
    if (stream) _mm_sfence();
  });
  if (const int64_t tail = n - 16 * blocks) {  // the last n % 16 values
    const V v = kind == torch::kBFloat16 ? BF16::load_masked(src + 16 * blocks, tail)
                                         : F16::load_masked(src + 16 * blocks, tail);
    vstore(dst + 16 * blocks, v, tail);
  }
}

// int8's "upcast" prefill (formats/int8.py): q (O, I) int8 times its row's scale into `out` (O, I) float32, each
// product exact, streamed as widen_float32's.
void dequantize_int8_float32(const torch::Tensor& q, const torch::Tensor& scale, torch::Tensor& out) {
  TORCH_CHECK(q.dim() == 2 && q.is_contiguous() && q.scalar_type() == torch::kInt8, "a contiguous (O, I) int8 weight");
  const int64_t O = q.size(0), I = q.size(1), full = I / 16 * 16;
  TORCH_CHECK(scale.numel() == O, "one scale per output row");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == torch::kFloat32 && out.sizes() == q.sizes(),
              "out: float32, contiguous, the weight's shape");
  const auto s = scale.reshape({O}).contiguous();
  const Scales sp(s);
  const int8_t* qp = q.data_ptr<int8_t>();
  float* dst = out.data_ptr<float>();
  const bool stream = reinterpret_cast<uintptr_t>(dst) % 64 == 0 && I % 16 == 0;
  at::parallel_for(0, O, kGrain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const V sv = vset(sp[o]);
      const int8_t* row = qp + o * I;
      float* d = dst + o * I;
      for (int64_t i = 0; i < full; i += 16) {
        if (stream) {
          vstream(d + i, vmul(I8::load(row + i), sv));
        } else {
          vstore(d + i, vmul(I8::load(row + i), sv));
        }
      }
      if (full < I) vstore(d + full, vmul(I8::load_masked(row + full, I - full), sv), I - full);
    }
    if (stream) _mm_sfence();
  });
}

// --- quantizing while a checkpoint streams (formats/int8.py, int4.py: the same rule, to the bit) --------------

namespace {

// A float32 scale -> the nearest value of `kind` at or above it (0 -> 1), as float32 (base.round_scale_up).
float round_scale_up(float s, torch::ScalarType kind) {
  if (!(s > 0)) return 1.0f;
  if (kind == torch::kFloat32) return s;
  if (kind == torch::kBFloat16) {
    at::BFloat16 r(s);
    if ((float)r < s) r.x += 1;  // positive floats order like their bit patterns: one step up
    return (float)r;
  }
  at::Half r(s);
  if ((float)r < s) r.x += 1;
  return (float)r;
}

// The largest magnitude of n values (n % 16 == 0); two running maxima, since one max waits for the last.
float absmax(const float* v, int64_t n) {
  V a = vzero(), b = vzero();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a = vmax(a, vabs(vload(v + i)));
    b = vmax(b, vabs(vload(v + i + 16)));
  }
  if (i < n) a = vmax(a, vabs(vload(v + i)));
  return vmaxlane(vmax(a, b));
}

// A row's first n values (n % 16 == 0) as float32 (what `w.float()` gives) into out; returns their largest magnitude,
// taken on the way (one pass over the row instead of two: the two were half of a quantizing load's arithmetic).
float widen(const torch::Tensor& w, int64_t row, int64_t n, float* out) {
  const int64_t I = w.size(1);
  if (w.scalar_type() == torch::kFloat32) {
    std::copy(w.data_ptr<float>() + row * I, w.data_ptr<float>() + row * I + n, out);
    return absmax(out, n);
  }
  const auto* p = reinterpret_cast<const uint16_t*>(w.data_ptr()) + row * I;
  const bool bf16 = w.scalar_type() == torch::kBFloat16;
  const auto load = [&](int64_t i) { return bf16 ? widen_bf16(p + i) : widen_f16(p + i); };
  V a = vzero(), b = vzero();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const V x = load(i), y = load(i + 16);
    vstore(out + i, x);
    vstore(out + i + 16, y);
    a = vmax(a, vabs(x));
    b = vmax(b, vabs(y));
  }
  if (i < n) {
    const V x = load(i);
    vstore(out + i, x);
    a = vmax(a, vabs(x));
  }
  return vmaxlane(vmax(a, b));
}

}  // namespace

// w (n, I) float rows -> q (n, I) int8, scale (n,) float32 holding values of `kind`: scale = max|w| / 127 rounded
// up to `kind`, q = round(w / scale) in [-127, 127]. I a multiple of 16. `out`: q written there (a loading model's
// own rows: no new memory and no copy after).
std::vector<torch::Tensor> quantize_int8(const torch::Tensor& w, torch::ScalarType kind,
                                         const std::optional<torch::Tensor>& out) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) % 16 == 0, "contiguous (n, I) rows, I % 16 == 0");
  const int64_t n = w.size(0), I = w.size(1);
  TORCH_CHECK(!out || (out->scalar_type() == torch::kInt8 && out->is_contiguous() && out->dim() == 2 &&
                       out->size(0) == n && out->size(1) == I), "out: contiguous (n, I) int8");
  auto q = out ? *out : torch::empty({n, I}, torch::kInt8);
  auto scale = torch::empty({n}, torch::kFloat32);
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(I);
    const V lo = vset(-127), hi = vset(127);
    for (int64_t r = r0; r < r1; ++r) {
      const float s = round_scale_up(widen(w, r, I, row.data()) / 127.0f, kind);
      sp[r] = s;
      const Divisor div(s);
      for (int64_t i = 0; i < I; i += 16) quantize_bytes(row.data() + i, div, lo, hi, qp + r * I + i);
    }
  });
  return {q, scale};
}

// w (n, I) float rows -> compressed-tensors' int4 bytes (n, I/2) uint8 (value 2j low nibble, 2j+1 high, q + 8)
// and scale (n, I/group) float32 holding values of `kind`: per group scale = max|w| / 7.5 rounded up,
// q = round(w / scale) in [-8, 7]. `out`: the bytes written there (a loading layer's own rows).
std::vector<torch::Tensor> quantize_int4(const torch::Tensor& w, torch::ScalarType kind, int64_t group,
                                         const std::optional<torch::Tensor>& out) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && group % 32 == 0 && w.size(1) % group == 0,
              "contiguous (n, I) rows in groups of a multiple of 32");
  const int64_t n = w.size(0), I = w.size(1), G = I / group;
  TORCH_CHECK(!out || (out->scalar_type() == torch::kUInt8 && out->is_contiguous() && out->dim() == 2 &&
                       out->size(0) == n && out->size(1) == I / 2), "out: contiguous (n, I / 2) uint8");
  auto packed = out ? *out : torch::empty({n, I / 2}, torch::kUInt8);
  auto scale = torch::empty({n, G}, torch::kFloat32);
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> row(I);
    const V lo = vset(-8), hi = vset(7);
    for (int64_t r = r0; r < r1; ++r) {
      widen(w, r, I, row.data());
      for (int64_t g = 0; g < G; ++g) {
        const float* v = row.data() + g * group;
        const float s = round_scale_up(absmax(v, group) / 7.5f, kind);
        sp[r * G + g] = s;
        const Divisor div(s);
        uint8_t* bytes = pp + r * (I / 2) + g * group / 2;
        for (int64_t i = 0; i < group; i += 32) quantize_nibbles(v + i, div, lo, hi, bytes + i / 2);
      }
    }
  });
  return {packed, scale};
}

// Bytes/s ceiling: the sum of a large int64 buffer, read once by every thread's share (what decode is bound by).
double read_bytes(const torch::Tensor& buf) {
  const int64_t n = buf.numel() / 8 / 8 * 8;
  const int64_t* p = (const int64_t*)buf.data_ptr();
  std::vector<int64_t> sums(at::get_num_threads() * 8, 0);
  at::parallel_for(0, n / 8, 1 << 16, [&](int64_t b0, int64_t b1) {
    Acc64 acc = zero64();
    for (int64_t b = b0; b < b1; ++b) acc = read64(p + b * 8, acc);
    sums[at::get_thread_num() * 8] += sum64(acc);
  });
  int64_t total = 0;
  for (auto s : sums) total += s;
  return (double)total;
}

// native_attention.cpp
torch::Tensor attention_scores(const torch::Tensor& q, const torch::Tensor& k);
torch::Tensor attention_values(const torch::Tensor& w, const torch::Tensor& v);
// native_decode.cpp
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps);
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin);
torch::Tensor gelu_tanh_mul_(torch::Tensor gate, const torch::Tensor& up);
torch::Tensor argmax_rows(const torch::Tensor& x);
// native_dot.cpp
std::string int8_dot();
torch::Tensor gemv_int4_dot(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale, int64_t group);
torch::Tensor gemv_int8_dot(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& scale);
// native_dot_gemm.cpp
torch::Tensor gemm_int4_dot(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale, int64_t group);
torch::Tensor gemm_int8_dot(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& w_scale);
#ifdef NATIVE_AVX512
// native_vnni.cpp
bool has_vnni();
std::vector<torch::Tensor> quantize_rows_int8(const torch::Tensor& x);
torch::Tensor rescale_int32(const torch::Tensor& y, const torch::Tensor& x_scale, const torch::Tensor& w_scale,
                            torch::ScalarType kind);
// native_vnni_gemm.cpp
torch::Tensor gemm_int4_vnni(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale, int64_t group);
torch::Tensor gemm_int8_vnni(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& w_scale);
// native_amx_gemm.cpp
bool has_amx();
torch::Tensor gemm_int4_amx(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale, int64_t group);
torch::Tensor gemm_int8_amx(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& w_scale);
#else
bool has_vnni() { return false; }  // native_vnni*.cpp and native_amx_gemm.cpp are built on AVX-512 only (native.py)
bool has_amx() { return false; }
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv_dense", &gemv_dense);
  m.def("gemv_int8", &gemv_int8);
  m.def("gemv_int4", &gemv_int4);
  m.def("dequantize_int4", &dequantize_int4);
  m.def("widen_float32", &widen_float32);
  m.def("dequantize_int8_float32", &dequantize_int8_float32);
  m.def("quantize_int8", &quantize_int8, py::arg("w"), py::arg("kind"), py::arg("out") = py::none());
  m.def("quantize_int4", &quantize_int4, py::arg("w"), py::arg("kind"), py::arg("group"), py::arg("out") = py::none());
  m.def("read_bytes", &read_bytes);
  m.def("attention_scores", &attention_scores);
  m.def("attention_values", &attention_values);
  m.def("rms_norm", &rms_norm);
  m.def("rope", &rope);
  m.def("gelu_tanh_mul_", &gelu_tanh_mul_);
  m.def("argmax_rows", &argmax_rows);
  m.def("int8_dot", &int8_dot);
  m.def("gemv_int4_dot", &gemv_int4_dot);
  m.def("gemv_int8_dot", &gemv_int8_dot);
  m.def("gemm_int4_dot", &gemm_int4_dot);
  m.def("gemm_int8_dot", &gemm_int8_dot);
  m.def("has_vnni", &has_vnni);
  m.def("has_amx", &has_amx);
#ifdef NATIVE_AVX512
  m.def("quantize_rows_int8", &quantize_rows_int8);
  m.def("rescale_int32", &rescale_int32);
  m.def("gemm_int4_vnni", &gemm_int4_vnni);
  m.def("gemm_int8_vnni", &gemm_int8_vnni);
  m.def("gemm_int4_amx", &gemm_int4_amx);
  m.def("gemm_int8_amx", &gemm_int8_amx);
#endif
}
