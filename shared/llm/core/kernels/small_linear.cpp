// Linear layers of a decode step on the CPU, fp32 (llm.core.cpu_kernels): y = x W^T + b for
// a few rows of x. Such a product reads every weight once and does little arithmetic with
// each, so it is bound by memory bandwidth up to about 8 rows and by the FMA units above.
// The weights are packed once into groups of GW outputs, (N / GW, K, GW): a group is one
// contiguous stream, and each of its vectors meets every row of x in registers.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "parallel.h"
#include "vector.h"

#if defined(__AVX512F__)
#define LLM_ROWS 8
#else
#define LLM_ROWS 4
#endif
constexpr int NV = 2;         // vectors of outputs per group
constexpr int GW = VL * NV;   // outputs per packed group

int64_t small_linear_group() { return GW; }

// W (N, K) -> (N / GW, K, GW).
torch::Tensor pack_linear_weight(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.dtype() == torch::kFloat, "pack_linear_weight: a (N, K) float32 weight, not ",
              w.sizes(), " ", w.dtype());
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % GW == 0, "pack_linear_weight: N (", N, ") must be a multiple of ", GW);
  return w.contiguous().view({N / GW, GW, K}).transpose(1, 2).contiguous();
}

// R rows of x against one packed group: R x GW outputs. With few rows, U sets of
// accumulators over interleaved inputs keep enough FMAs in flight to hide their latency.
template <int R>
static void tile(const float* x, int64_t ldx, const float* w, int64_t K, float* y, int64_t ldy,
                 const float* bias) {
  constexpr int U = R * NV >= 8 ? 1 : (8 + R * NV - 1) / (R * NV);
  vec acc[U][R][NV];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < R; ++m)
      for (int j = 0; j < NV; ++j) acc[u][m][j] = vec{};
  int64_t k = 0;
  for (; k + U <= K; k += U) {
    for (int u = 0; u < U; ++u) {
      vec wv[NV];
      for (int j = 0; j < NV; ++j) wv[j] = load(w + (k + u) * GW + j * VL);
      for (int m = 0; m < R; ++m) {
        const vec xb = vec{} + x[m * ldx + k + u];
        for (int j = 0; j < NV; ++j) acc[u][m][j] += xb * wv[j];
      }
    }
  }
  for (; k < K; ++k) {
    vec wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load(w + k * GW + j * VL);
    for (int m = 0; m < R; ++m) {
      const vec xb = vec{} + x[m * ldx + k];
      for (int j = 0; j < NV; ++j) acc[0][m][j] += xb * wv[j];
    }
  }
  for (int m = 0; m < R; ++m)
    for (int j = 0; j < NV; ++j) {
      vec s = bias ? load(bias + j * VL) : vec{};
      for (int u = 0; u < U; ++u) s += acc[u][m][j];
      store(y + m * ldy + j * VL, s);
    }
}

typedef void (*tile_fn)(const float*, int64_t, const float*, int64_t, float*, int64_t, const float*);
static constexpr tile_fn TILES[] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>
#if LLM_ROWS == 8
                                    , tile<5>, tile<6>, tile<7>, tile<8>
#endif
};

// x (..., K) float32; packed from pack_linear_weight; bias (N,) or none. Any number of rows
// (LLM_ROWS at a time), though past a few dozen a GEMM library's blocking wins.
torch::Tensor small_linear(const torch::Tensor& x, const torch::Tensor& packed,
                           const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat && packed.dtype() == torch::kFloat && packed.dim() == 3 &&
                  packed.size(2) == GW,
              "small_linear: float32 x and a weight from pack_linear_weight, not ", x.sizes(), " ",
              x.dtype(), " and ", packed.sizes());
  const int64_t K = packed.size(1), N = packed.size(0) * GW;
  TORCH_CHECK(x.size(-1) == K, "small_linear: x ", x.sizes(), " does not match the weight's ", K, " inputs");
  TORCH_CHECK(!bias.has_value() || (bias->dtype() == torch::kFloat && bias->numel() == N),
              "small_linear: the bias must be (", N, ",) float32");
  const auto xc = x.reshape({-1, K}).contiguous();
  const auto pc = packed.contiguous();
  const auto bc = bias.has_value() ? bias->contiguous() : torch::Tensor();
  const int64_t M = xc.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty({M, N}, x.options());
  const float* xp = xc.data_ptr<float>();
  const float* wp = pc.data_ptr<float>();
  const float* bp = bc.defined() ? bc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  parallel_items(N / GW, [&](int64_t g, int64_t) {
    const float* w = wp + g * K * GW;
    for (int64_t m0 = 0; m0 < M; m0 += LLM_ROWS) {
      const int64_t r = std::min<int64_t>(LLM_ROWS, M - m0);
      TILES[r](xp + m0 * K, K, w, K, yp + m0 * N + g * GW, N, bp ? bp + g * GW : nullptr);
    }
  });
  return y.view(sizes);
}

// A C++ op: a compiled graph calls it through the dispatcher without the GIL.
TORCH_LIBRARY_FRAGMENT(llm, m) {
  m.def("small_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(llm, CPU, m) { m.impl("small_linear", &small_linear); }
