// A decode step's work besides its products (model/gemma.py calls these for one position per sequence): the
// RMSNorm, the rotary embedding and the MLP's gelu(gate) * up, each one call instead of torch's 3 to 10 small ops;
// and greedy decoding's argmax over the logits (model/sampling.py).
//
// Why: a decode step of a 4-bit PaliGemma-3B reads its weights in ~45 ms, and torch spent ~3 ms more on these
// (by hand, AMD EPYC Zen 4, 2 threads: an RMSNorm of 2048 values 28 us, a rotary 14 us, gelu * up of 16384 values
// 40 us; 37, 36 and 18 of them a step; PaliGemma 2's 105 norms a step) — per-op dispatch, not arithmetic.
//
// Rounding, against the torch expressions in gemma.py (each op rounds to the model's dtype where torch's does):
// - rope: the same three roundings (x * cos, rotate_half(x) * sin, their sum): the same bits in every dtype (the
//   build passes -ffp-contract=off, so no product and sum are fused into one rounding);
// - rms_norm: the same fp32 operations after the sum of squares, whose order differs (16 lanes, then across);
// - gelu_tanh_mul_: gelu's tanh form computed as x / (1 + exp(-2 * inner)), the same function without the
//   cancellation in torch's 1 + tanh(inner) (for x < -2 torch's fp32 value loses up to all its digits; this one
//   keeps fp32's), then rounded to the dtype and multiplied by up, as torch's gelu_ then mul_ do. In 16 bits ~7 % of
//   torch's values then differ from these by one unit; these are within one unit of the correctly rounded gelu
//   times up, and ~1 % of them one unit off it (by hand, bf16, x ~ N(0, 9)).
// tests/formats/test_native.py bounds each against its reference.
//
// Axes: R rows (sequences), D hidden, N heads, H head dim, I mlp width.

#include "native.h"

#include <cmath>
#include <cstdint>
#include <vector>

using namespace native;

namespace {

// v rounded to `kind` and widened back (what a 16-bit tensor holds after torch's op), 16 lanes at a time.
inline V rounded(torch::ScalarType kind, V v) {
  if (kind == torch::kBFloat16) return vround_bf16(v);
  if (kind == torch::kHalf) return vround_f16(v);
  return v;
}

// e^t: t = n ln2 + r, |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7 (relative error < 1e-8, under fp32's
// half ulp), times 2^n; inf above 88.7 and e^-87 below -87 (the caller's 1 / (1 + e^t) is 0 or 1 there; t is
// clamped to [-87, 100] so that no infinity enters the reduction and makes a NaN).
inline V exp_ps(V t) {
  t = vmin(vmax(t, vset(-87.0f)), vset(100.0f));
  const V n = vround(vmul(t, vset(1.44269504088896341f)));
  V r = vfnmadd(n, vset(0.693145751953125f), t);  // ln2 split: exact n * hi
  r = vfnmadd(n, vset(1.428606765330187e-06f), r);
  V p = vset(1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = vfmadd(p, r, vset(c));
  return vscale2(p, n);
}

}  // namespace

// x (R, 1, D) or (R, D) in bf16 / fp16 / fp32, weight (D) stored as an offset from 1 -> (x / rms(x)) * (1 + w),
// in fp32, rounded once to x's dtype: gemma.RMSNorm.
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  const auto xc = x.contiguous();
  const int64_t D = xc.size(-1), R = xc.numel() / std::max<int64_t>(D, 1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "weight (", D, ")");
  auto out = torch::empty_like(xc);
  std::vector<float> gain(D), h(D);  // 1 + w, as torch's `1.0 + self.weight.float()`; a row in fp32
  const int64_t full = D / 16 * 16, tail = D - full;
  const auto wc = weight.contiguous();
  // Widened here, not by weight.to(float32): a new tensor each call cost ~5 us, 105 norms a PaliGemma 2 step.
  with_load(wc.scalar_type(), "weight", [&](auto load) {
    using L = decltype(load);
    const auto* wp = static_cast<const typename L::T*>(wc.data_ptr());
    for (int64_t i = 0; i < full; i += 16) vstore(gain.data() + i, vadd(vset(1.0f), L::load(wp + i)));
    if (tail) vstore(gain.data() + full, vadd(vset(1.0f), L::load_masked(wp + full, tail)), tail);
  });
  with_load(xc.scalar_type(), "x", [&](auto load) {
    using L = decltype(load);
    for (int64_t r = 0; r < R; ++r) {
      const auto* src = static_cast<const typename L::T*>(xc.data_ptr()) + r * D;
      V acc = vzero();
      for (int64_t i = 0; i < full; i += 16) {
        const V v = L::load(src + i);
        vstore(h.data() + i, v);
        acc = vfmadd(v, v, acc);
      }
      if (tail) {
        const V v = L::load_masked(src + full, tail);
        vstore(h.data() + full, v, tail);
        acc = vfmadd(v, v, acc);
      }
      const float mean = vsum(acc) / (float)D;
      const V inv = vset(1.0f / std::sqrt(mean + (float)eps));  // torch's rsqrt: 1 / sqrt
      for (int64_t i = 0; i < D; i += 16) {
        const int64_t m = std::min<int64_t>(16, D - i);
        vstore(h.data() + i, vmul(vmul(vload(h.data() + i, m), inv), vload(gain.data() + i, m)), m);
      }
      if (xc.scalar_type() == torch::kFloat32)
        std::copy(h.begin(), h.end(), out.data_ptr<float>() + r * D);
      else
        round_row(xc.scalar_type(), h.data(), static_cast<typename L::T*>(out.data_ptr()) + r * D, D);
    }
  });
  return out.view(x.sizes());
}

// x (B, N, 1, H), a view with H dense (a projection's heads), cos and sin (B, 1, 1, H) in x's dtype ->
// x * cos + rotate_half(x) * sin as a new (B, N, 1, H) tensor: gemma.apply_rope, to the bit.
torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.size(2) == 1 && x.stride(3) == 1 && x.size(3) % 2 == 0, "x (B, N, 1, H), H even");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 4 && cos.size(0) == x.size(0) && cos.size(3) == x.size(3) &&
                  cos.size(1) == 1 && cos.size(2) == 1 && cos.stride(3) == 1 && sin.stride(3) == 1,
              "cos, sin (B, 1, 1, H)");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(), "tables in x's dtype");
  const int64_t B = x.size(0), N = x.size(1), H = x.size(3), half = H / 2;
  auto out = torch::empty({B, N, 1, H}, x.options());
  const auto kind = x.scalar_type();
  with_load(kind, "x", [&](auto load) {
    using L = decltype(load);
    using T = typename L::T;
    std::vector<float> row(H);
    for (int64_t b = 0; b < B; ++b) {
      const T* c = static_cast<const T*>(cos.data_ptr()) + b * cos.stride(0);
      const T* s = static_cast<const T*>(sin.data_ptr()) + b * sin.stride(0);
      for (int64_t n = 0; n < N; ++n) {
        const T* v = static_cast<const T*>(x.data_ptr()) + b * x.stride(0) + n * x.stride(1);
        for (int64_t j = 0; j < half; j += 16) {
          const int64_t m = std::min<int64_t>(16, half - j);
          const V x1 = L::load_masked(v + j, m), x2 = L::load_masked(v + half + j, m);
          // first half: x1 * cos - x2 * sin; second: x2 * cos + x1 * sin (rotate_half is (-x2, x1)), each
          // product and the sum rounded to the dtype
          const V c1 = L::load_masked(c + j, m), c2 = L::load_masked(c + half + j, m);
          const V s1 = L::load_masked(s + j, m), s2 = L::load_masked(s + half + j, m);
          const V neg_x2 = vneg(x2);  // torch negates first: exact
          const V lo = vadd(rounded(kind, vmul(x1, c1)), rounded(kind, vmul(neg_x2, s1)));
          const V hi = vadd(rounded(kind, vmul(x2, c2)), rounded(kind, vmul(x1, s2)));
          vstore(row.data() + j, lo, m);
          vstore(row.data() + half + j, hi, m);
        }
        T* dst = static_cast<T*>(out.data_ptr()) + (b * N + n) * H;
        if (kind == torch::kFloat32)
          std::copy(row.begin(), row.end(), reinterpret_cast<float*>(dst));
        else
          round_row(kind, row.data(), dst, H);
      }
    }
  });
  return out;
}

// gate := gelu_tanh(gate) * up, both (..., I) contiguous in one dtype; gelu rounded to the dtype before the product
// (torch's gelu_ then mul_). Returns gate.
torch::Tensor gelu_tanh_mul_(torch::Tensor gate, const torch::Tensor& up) {
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && gate.sizes() == up.sizes() && gate.device().is_cpu(),
              "gate and up: contiguous CPU tensors of one shape");
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "gate and up in one dtype");
  const int64_t n = gate.numel();
  const auto kind = gate.scalar_type();
  constexpr int64_t kPiece = 4096;  // values per task
  with_load(kind, "gate", [&](auto load) {
    using L = decltype(load);
    using T = typename L::T;
    T* g = static_cast<T*>(gate.data_ptr());
    const T* u = static_cast<const T*>(up.data_ptr());
    at::parallel_for(0, (n + kPiece - 1) / kPiece, 1, [&](int64_t p0, int64_t p1) {
      alignas(64) float row[kPiece];
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i0 = p * kPiece, len = std::min(kPiece, n - i0);
        for (int64_t j = 0; j < len; j += 16) {
          const int64_t m = std::min<int64_t>(16, len - j);
          const V x = L::load_masked(g + i0 + j, m);
          // gelu_tanh(x) = 0.5 x (1 + tanh(inner)) = x / (1 + e^(-2 inner)), inner = sqrt(2/pi) (x + 0.044715 x^3)
          const V cube = vmul(vmul(x, x), x);
          const V inner = vmul(vset(0.7978845608028654f), vadd(x, vmul(vset(0.044715f), cube)));
          const V e = exp_ps(vmul(inner, vset(-2.0f)));
          const V gelu = rounded(kind, vdiv(x, vadd(vset(1.0f), e)));
          vstore(row + j, vmul(gelu, L::load_masked(u + i0 + j, m)), m);
        }
        if (kind == torch::kFloat32)
          std::copy(row, row + len, reinterpret_cast<float*>(g + i0));
        else
          round_row(kind, row, g + i0, len);
      }
    });
  });
  return gate;
}

namespace {

// The first index of the largest of n values (a NaN counts as the largest: torch.argmax's rule), in two passes of
// 16 lanes over values the logits' product has just written (in the caches): the maximum, then its first place.
template <typename W>
int64_t argmax_row(const typename W::T* x, int64_t n) {
  const int64_t full = n / 16 * 16;
  V best = vset(-INFINITY);
  bool nan = false;
  for (int64_t i = 0; i < full; i += 16) {
    const V v = W::load(x + i);
    nan = nan || vany_nan(v);
    best = vmax(best, v);
  }
  float m = vmaxlane(best);
  const auto at = [&](int64_t i) {  // one value, widened as the vectors are
    float one[16];
    vstore(one, W::load_masked(x + i, 1));
    return one[0];
  };
  for (int64_t i = full; i < n; ++i) {
    const float v = at(i);
    nan = nan || std::isnan(v);
    m = std::max(m, v);
  }
  if (nan)  // rare: the first NaN is the answer
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(at(i))) return i;
  const V mv = vset(m);
  for (int64_t i = 0; i < full; i += 16)
    if (const int k = vfirst_eq(W::load(x + i), mv); k >= 0) return i + k;
  for (int64_t i = full; i < n; ++i)
    if (at(i) == m) return i;
  return 0;  // n == 0 aside, unreachable: m is one of the values (or -inf, which the scans find)
}

}  // namespace

// (B, V) logits -> (B,) int64: each row's torch.argmax (the lower index on ties). torch's reduction ran one row at
// ~1 G values/s (0.35-0.97 ms a step over PaliGemma's 257,216 logits, by hand on the AMX Xeon), ~1 % of an int4 step.
torch::Tensor argmax_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "contiguous (B, V) logits");
  const int64_t B = x.size(0), n = x.size(1);
  TORCH_CHECK(n > 0, "an empty vocabulary has no argmax");
  auto out = torch::empty({B}, torch::kInt64);
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    const void* row = static_cast<const char*>(x.data_ptr()) + b * n * x.element_size();
    if (x.scalar_type() == torch::kBFloat16) {
      op[b] = argmax_row<BF16>(static_cast<const BF16::T*>(row), n);
    } else if (x.scalar_type() == torch::kHalf) {
      op[b] = argmax_row<F16>(static_cast<const F16::T*>(row), n);
    } else {
      TORCH_CHECK(x.scalar_type() == torch::kFloat32, "bfloat16, float16 or float32 logits");
      op[b] = argmax_row<F32>(static_cast<const F32::T*>(row), n);
    }
  }
  return out;
}
