// The integer prefills on AMX (the int4 and int8 formats' "amx" prefills): Intel's tile unit multiplies a 16 x 64
// byte tile of activations with a 64 x 16 byte tile of weights into 16 x 16 int32 sums in one instruction (16,384
// byte products, against vpdpbusd's 64). The activations, the panels and the loops around the Block are
// native_vnni_gemm.cpp's (native_igemm.h), so the sums are the same integers and the results the same bits.
//
// Tiles. A panel (kSteps, kCols) dwords is already the B operand's layout: a tile row holds 4 consecutive inputs of
// 16 output rows, so 16 panel steps (64 inputs) of 16 output rows are one B tile (stride kCols dwords). The A tile
// is 16 activation rows of the same 64 inputs, 1 KB in a row once `tile_rows` has rearranged them. A Block owns 16
// activation rows against the panel's 64 output rows: 4 C tiles (0-3), A in 4 and 7 (a chunk's two halves), B in 5
// and 6 in turn.
// - int4: A signed (q), B unsigned (the stored nibbles, q + 8): tdpbsud; each chunk's sums leave the tiles for
//   their block and group scales, with vpdpbusd's start (-8 * sum(x_q)) added, in VnniBlock's fp32 order, one call
//   late so that those vector steps run while the tile unit multiplies.
// - int8: A signed (the activations are left as q), B signed (the weights): tdpbssd, whose sums need no start; the
//   int32 sums stay in the C tiles through a run of 16 chunks (2048 inputs: a whole row of most layers).
//
// Linux hands a process the tile registers' state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM); has_amx() asks
// once and says whether it was granted. Each thread loads the tile configuration when its Block is made and
// releases it when done.

#include "native_igemm.h"

#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>

using namespace igemm;

namespace {

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__)
#define NATIVE_AMX 1

constexpr long kReqXcompPerm = 0x1023;  // arch_prctl: ask for an extended state component (asm/prctl.h)
constexpr long kXtiledata = 18;         // the AMX tile data component

// The tile configuration (palette 1): every tile used is 16 rows of 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

constexpr int64_t kRowBytes = kCols * 4;  // a panel's and the sums' row: 64 dwords

// This thread's tiles: 8 of 16 rows x 64 bytes (C 0-3, A 4 and 7, B 5 and 6).
inline void configure() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
}

// The activations rearranged so that each A tile (16 rows x 64 inputs) is 1 KB in a row: tile (b, k) holds rows
// 16b .. 16b + 15, inputs 64k .. 64k + 63, at (b * K + k) KB, K = stride / 64. Read in place, a tile's 16 rows lay
// 2 KB or more apart, all in the same two L1 sets; by hand, the tile loads were then the largest cost of the block.
void tile_rows(Acts& a) {
  const int64_t rows = a.q.size() / a.stride, K = a.stride / 64;  // rows: a multiple of 16 (kRowPad)
  std::vector<uint8_t> tiled(a.q.size());
  at::parallel_for(0, rows / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < 16; ++r)
          std::memcpy(tiled.data() + ((b * K + k) * 16 + r) * 64, a.q.data() + (16 * b + r) * a.stride + 64 * k, 64);
  });
  a.q.swap(tiled);
}

// A tile of activation rows m0 .. m0 + 15 (m0 a multiple of 16), inputs 64k .. 64k + 63, in tile_rows' order.
inline const uint8_t* a_tile(const Acts& a, int64_t m0, int64_t k) {
  return a.q.data() + ((m0 / 16) * (a.stride / 64) + k) * 1024;
}

// Tile numbers are immediates: the per-tile steps below are spelt out for the panel's 4 groups of 16 output rows.
#define AMX_EACH(STEP) STEP(0) STEP(1) STEP(2) STEP(3)

// One chunk's products into C tiles 0 .. nr - 1: A (tile x, 16 rows x 128 inputs: two 1 KB tiles, in 4 and 7)
// times the chunk's panel p (B, in 5 and 6 in turn). kSigned: int8's weights (tdpbssd); else int4's unsigned
// nibbles (tdpbsud).
template <bool kSigned>
inline void chunk_products(int nr, const uint8_t* x, const int32_t* p) {
  _tile_loadd(4, x, 64);
  _tile_loadd(7, x + 1024, 64);
  // A in 4: steps 0-15 (inputs 0-63); A in 7: steps 16-31
#define AMX_DP(n, half, at, bt)                                   \
  if (nr > n) {                                                   \
    _tile_loadd(bt, p + (half) * 16 * kCols + 16 * n, kRowBytes); \
    if constexpr (kSigned)                                        \
      _tile_dpbssd(n, at, bt);                                    \
    else                                                          \
      _tile_dpbsud(n, at, bt);                                    \
  }
  AMX_DP(0, 0, 4, 5) AMX_DP(1, 0, 4, 6) AMX_DP(2, 0, 4, 5) AMX_DP(3, 0, 4, 6)
  AMX_DP(0, 1, 7, 5) AMX_DP(1, 1, 7, 6) AMX_DP(2, 1, 7, 5) AMX_DP(3, 1, 7, 6)
#undef AMX_DP
}

// C tiles 0 .. nr - 1 to sums (16 rows of kCols int32, the tiles side by side).
inline void store_sums(int nr, int32_t* sums) {
#define AMX_STORE(n) \
  if (nr > n) _tile_stored(n, sums + 16 * n, kRowBytes);
  AMX_EACH(AMX_STORE)
#undef AMX_STORE
}

// int8: 16 activation rows against a run of up to kChunks chunks (128 KB of panels, in L2), the int32 sums staying
// in the C tiles through the run: loading and storing them costs more than a chunk's products (by hand on a Xeon
// with AMX: a chunk's 8 products ~50 ns, ~140 ns with the C tiles loaded and stored around them).
struct AmxInt8Block {
  static constexpr int64_t kRows = 16;
  static constexpr int64_t kChunks = 16;
  static constexpr bool kCorrected = false;  // signed activations
  static void prepare(Acts& a) { tile_rows(a); }

  AmxInt8Block() { configure(); }
  ~AmxInt8Block() { _tile_release(); }
  AmxInt8Block(const AmxInt8Block&) = delete;
  AmxInt8Block& operator=(const AmxInt8Block&) = delete;
  void flush() {}

  void operator()(int nr, int64_t, const Acts& a, int64_t m0, int64_t c, int64_t run, const int32_t* panel,
                  const __m512i*, const float*, void* acc) {
    int32_t* sums = static_cast<int32_t*>(acc);
#define AMX_START(n) \
  if (nr > n) {      \
    if (c == 0)      \
      _tile_zero(n); \
    else             \
      _tile_loadd(n, sums + 16 * n, kRowBytes); \
  }
    AMX_EACH(AMX_START)
#undef AMX_START
    for (int64_t j = 0; j < run; ++j)
      chunk_products<true>(nr, a_tile(a, m0, 2 * (c + j)), panel + j * kSteps * kCols);
    store_sums(nr, sums);
  }
};

// int4: 16 activation rows against one chunk; its sums leave the tiles for the fp32 steps (VnniBlock's), which run
// one call late, on the other of two buffers, while the tile unit works on the next call's products.
struct AmxInt4Block {
  static constexpr int64_t kRows = 16;
  static constexpr int64_t kChunks = 1;
  static constexpr bool kCorrected = false;
  static void prepare(Acts& a) { tile_rows(a); }

  AmxInt4Block() { configure(); }
  ~AmxInt4Block() { _tile_release(); }
  AmxInt4Block(const AmxInt4Block&) = delete;
  AmxInt4Block& operator=(const AmxInt4Block&) = delete;

  void operator()(int nr, int64_t mr, const Acts& a, int64_t m0, int64_t c, int64_t, const int32_t* panel,
                  const __m512i*, const float* ws, void* acc) {
#define AMX_ZERO(n) \
  if (nr > n) _tile_zero(n);
    AMX_EACH(AMX_ZERO)
#undef AMX_ZERO
    chunk_products<false>(nr, a_tile(a, m0, 2 * c), panel);
    flush();  // the previous call's fp32 steps, while the products above run
    store_sums(nr, buffer_[next_]);
    pending_ = Pending{&a, ws, static_cast<float*>(acc), m0, mr, c, nr, next_};
    next_ ^= 1;
  }

  // The fp32 steps of the call waiting for them: (sum + start) to fp32, times (block scale * group scale), added.
  void flush() {
    if (pending_.a == nullptr) return;
    const Pending& p = pending_;
    const int32_t* sums = buffer_[p.buffer];
    for (int64_t m = 0; m < p.mr; ++m) {
      float* row = p.acc + m * kCols;
      const __m512i start = _mm512_set1_epi32(p.a->bias[(p.m0 + m) * p.a->C + p.c]);
      const __m512 xs = _mm512_set1_ps(p.a->scale[(p.m0 + m) * p.a->C + p.c]);
      for (int n = 0; n < p.nr; ++n) {
        const __m512i s = _mm512_add_epi32(start, _mm512_load_si512((const void*)(sums + m * kCols + 16 * n)));
        const __m512 f = _mm512_cvtepi32_ps(s), scales = _mm512_mul_ps(xs, _mm512_load_ps(p.ws + 16 * n));
        _mm512_store_ps(row + 16 * n, _mm512_fmadd_ps(f, scales, _mm512_load_ps(row + 16 * n)));
      }
    }
    pending_.a = nullptr;
  }

 private:
  struct Pending {
    const Acts* a = nullptr;  // none waiting
    const float* ws;
    float* acc;
    int64_t m0, mr, c;
    int nr, buffer;
  };
  alignas(64) int32_t buffer_[2][kRows * kCols];
  Pending pending_;
  int next_ = 0;
};

#undef AMX_EACH

bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  return ok;
}

#endif  // NATIVE_AMX

}  // namespace

// Whether this build has the AMX prefills and Linux lets this process use the tiles.
bool has_amx() {
#ifdef NATIVE_AMX
  return amx_permitted();
#else
  return false;
#endif
}

// As gemm_int4_vnni (the same bits), on AMX tiles.
torch::Tensor gemm_int4_amx(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
                            int64_t group) {
#ifdef NATIVE_AMX
  TORCH_CHECK(amx_permitted(), "this process may not use AMX tiles");
  return int4_gemm<AmxInt4Block>(x, packed, scale, group);
#else
  TORCH_CHECK(false, "built for a CPU without AMX");
#endif
}

// As gemm_int8_vnni (the same bits), on AMX tiles.
torch::Tensor gemm_int8_amx(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& w_scale) {
#ifdef NATIVE_AMX
  TORCH_CHECK(amx_permitted(), "this process may not use AMX tiles");
  return int8_gemm<AmxInt8Block, true>(x, q, w_scale);
#else
  TORCH_CHECK(false, "built for a CPU without AMX");
#endif
}
