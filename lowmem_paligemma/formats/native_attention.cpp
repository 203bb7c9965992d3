// A decode step's attention products, read in place from the KV cache (model/gemma.py, Gemma 2's soft-capped path).
//
// One new query per sequence: each kv head's G query heads are G rows (the GQA fold) against that head's S cached
// keys, then the G rows of attention weights against its S values. torch would copy the cache's view first (its
// heads lie max_len rows apart) and, for a bf16 / fp16 cache on a CPU without AVX512-BF16, run oneDNN's emulated
// 16-bit bmm, ~2 GFLOP/s on these shapes; here the keys and values stream once in their stored type (native.h's
// loads), products are exact in fp32 and sums accumulate in fp32, as in the 16-bit bmm: only the order of the sums
// differs. The caller rounds the fp32 results to the model's dtype, where the bmm would have rounded them.
//
// Axes: P (sequence, kv head) pairs, G query rows per pair, S keys, H head dim.

#include "native.h"

#include <algorithm>
#include <cstdint>

using namespace native;

namespace {

// (B, K, S, H) cache view -> its base pointer and the stride between pairs; each pair's S x H block must be dense.
struct PairBlocks {
  const void* base;
  int64_t kv_heads, batch_stride, head_stride;
};

PairBlocks pair_blocks(const torch::Tensor& kv, const char* what) {
  TORCH_CHECK(kv.dim() == 4 && kv.device().is_cpu(), what, ": a (B, K, S, H) CPU tensor");
  TORCH_CHECK(kv.stride(3) == 1 && (kv.size(2) <= 1 || kv.stride(2) == kv.size(3)), what,
              ": each head's S x H block dense (a view of the cache along S)");
  return {kv.data_ptr(), kv.size(1), kv.stride(0), kv.stride(1)};
}

// Element offset of pair p's block.
inline int64_t pair_offset(const PairBlocks& b, int64_t p) {
  return (p / b.kv_heads) * b.batch_stride + (p % b.kv_heads) * b.head_stride;
}

// Rows of w and 16-column blocks of y at a time in values_block: 4 x 4 V accumulators fill half of AVX-512's
// registers; on AVX2 (two registers a V) 4 x 2.
inline constexpr int kValueRows = 4, kValueBlocks = kVectorRegisters == 32 ? 4 : 2, kValueCols = 16 * kValueBlocks;

// y (G, H) = w (G, S) @ v (S, H) for one pair, output columns [c0, c1): up to kValueCols columns and kValueRows rows
// of w at a time, each value row loaded once per kValueRows rows.
template <typename W>
void values_block(const float* w, const typename W::T* v, float* y, int64_t G, int64_t S, int64_t H, int64_t c0,
                  int64_t c1) {
  for (int64_t g0 = 0; g0 < G; g0 += kValueRows) {
    const int rows = (int)std::min<int64_t>(kValueRows, G - g0);
    for (int64_t c = c0; c < c1; c += kValueCols) {
      int64_t left[kValueBlocks];  // columns of each block inside [c, c1)
      for (int j = 0; j < kValueBlocks; ++j) left[j] = std::clamp<int64_t>(c1 - c - 16 * j, 0, 16);
      V acc[kValueRows][kValueBlocks];
      for (int r = 0; r < kValueRows; ++r)
        for (int j = 0; j < kValueBlocks; ++j) acc[r][j] = vzero();
      for (int64_t s = 0; s < S; ++s) {
        V vv[kValueBlocks];
        for (int j = 0; j < kValueBlocks; ++j) vv[j] = W::load_masked(v + s * H + c + 16 * j, left[j]);
        for (int r = 0; r < rows; ++r) {
          const V ws = vset(w[(g0 + r) * S + s]);
          for (int j = 0; j < kValueBlocks; ++j) acc[r][j] = vfmadd(ws, vv[j], acc[r][j]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < kValueBlocks; ++j) vstore(y + (g0 + r) * H + c + 16 * j, acc[r][j], left[j]);
    }
  }
}

}  // namespace

// q (B, K, G, H) of any float dtype against k (B, K, S, H), a bf16 / fp16 / fp32 view of the cache ->
// scores (B, K, G, S) in fp32: q . k for every query row and key.
torch::Tensor attention_scores(const torch::Tensor& q, const torch::Tensor& k) {
  const auto blocks = pair_blocks(k, "k");
  TORCH_CHECK(q.dim() == 4 && q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3),
              "q (B, K, G, H) against k (B, K, S, H)");
  const int64_t P = q.size(0) * q.size(1), G = q.size(2), S = k.size(2), H = q.size(3);
  TORCH_CHECK(G >= 1 && G <= kMaxRows, "1 to ", kMaxRows, " query rows per kv head");
  auto qf = q.to(torch::kFloat32).contiguous();
  auto y = torch::empty({q.size(0), q.size(1), G, S}, torch::kFloat32);
  const float* qp = qf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t per = std::max<int64_t>(S, 1);
  // Tasks over (pair, key) rows, each pair's keys a dense_rows product: G activation rows against S weight rows.
  with_load(k.scalar_type(), "cache", [&](auto load) {
    using W = decltype(load);
    at::parallel_for(0, P * per, kGrain, [&](int64_t r0, int64_t r1) {
      for (int64_t p = r0 / per; p * per < r1 && p < P; ++p) {
        const int64_t s0 = std::max(r0 - p * per, (int64_t)0), s1 = std::min(r1 - p * per, S);
        if (s0 >= s1) continue;
        const auto* keys = static_cast<const typename W::T*>(blocks.base) + pair_offset(blocks, p);
        dense_any<W>(qp + p * G * H, keys, yp + p * G * S, G, H, S, s0, s1);
      }
    });
  });
  return y;
}

// w (B, K, G, S) of any float dtype (the attention weights) times v (B, K, S, H), a view of the cache like k ->
// (B, K, G, H) in fp32.
torch::Tensor attention_values(const torch::Tensor& w, const torch::Tensor& v) {
  const auto blocks = pair_blocks(v, "v");
  TORCH_CHECK(w.dim() == 4 && w.size(0) == v.size(0) && w.size(1) == v.size(1) && w.size(3) == v.size(2),
              "w (B, K, G, S) against v (B, K, S, H)");
  const int64_t P = w.size(0) * w.size(1), G = w.size(2), S = v.size(2), H = v.size(3);
  auto wf = w.to(torch::kFloat32).contiguous();
  auto y = torch::empty({w.size(0), w.size(1), G, H}, torch::kFloat32);
  const float* wp = wf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t chunks = (H + kValueCols - 1) / kValueCols;  // tasks over (pair, kValueCols output columns)
  with_load(v.scalar_type(), "cache", [&](auto load) {
    using W = decltype(load);
    at::parallel_for(0, P * chunks, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t p = t / chunks, c0 = (t % chunks) * kValueCols, c1 = std::min(c0 + kValueCols, H);
        const auto* values = static_cast<const typename W::T*>(blocks.base) + pair_offset(blocks, p);
        values_block<W>(wp + p * G * S, values, yp + p * G * H, G, S, H, c0, c1);
      }
    });
  });
  return y;
}
