// One decode step's attention on the CPU, fp32 (llm.core.cpu_kernels): the query rows
// of a KV head's group attend over that head's cached keys and values, read once for all.
// A step streams the whole cache and does little arithmetic per key, so it is bound by
// memory bandwidth once the arithmetic keeps up: for head dims of 64 and 128 the queries'
// accumulators stay in vector registers (the values' pass over a block of queries), and
// the softmax's exponentials are computed a vector at a time.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"
#include "vector.h"

namespace llm_attention {

#if defined(__AVX512F__)
constexpr int ACCS = 24;  // vector accumulators the values' pass keeps in registers
#else
constexpr int ACCS = 12;
#endif
typedef int ivec __attribute__((vector_size(VL * sizeof(int))));

constexpr float NINF = -std::numeric_limits<float>::infinity();

static inline float hsum(vec v) {
  float s = 0.f;
  for (int i = 0; i < VL; ++i) s += v[i];
  return s;
}

// exp(x) for x <= 0 (a score minus its row's maximum), -inf giving 0: 2^n * e^g with
// n = round(x / ln 2), |g| <= ln(2) / 2, e^g by its Taylor series to degree 6 (relative
// error below 2e-7).
static inline vec exp_nonpositive(vec x) {
  const vec lo = vec{} - 87.f;
  const vec xc = x < lo ? lo : x;
  const vec t = xc * 1.44269504f;
  const ivec n = __builtin_convertvector(t - 0.5f, ivec);  // t <= 0: truncation rounds
  const vec g = (t - __builtin_convertvector(n, vec)) * 0.693147181f;
  vec p = g * (1.f / 720) + 1.f / 120;
  p = p * g + 1.f / 24;
  p = p * g + 1.f / 6;
  p = p * g + 0.5f;
  p = p * g + 1.f;
  p = p * g + 1.f;
  const vec scale = (vec)((n + 127) << 23);
  const vec e = p * scale;
  return x == vec{} + NINF ? vec{} : e;
}

struct Head {
  const float* q;  // (G, Dk)
  const float* k;  // L rows, stride kl
  const float* v;  // L rows, stride vl
  const bool* m;   // L, stride ml
  float* o;        // (G, Dv)
  int64_t G, L, Dk, Dv, kl, vl, ml;
};

// scores (G, L): scale * q.k, -inf where masked. DK: the head dim, or 0 for any.
template <int DK>
static void scores(const Head& h, float scale, float* s) {
  const int64_t Dk = DK ? DK : h.Dk;
  for (int64_t l = 0; l < h.L; ++l) {
    const float* kr = h.k + l * h.kl;
    if (!h.m[l * h.ml]) {
      for (int64_t j = 0; j < h.G; ++j) s[j * h.L + l] = NINF;
      continue;
    }
    for (int64_t j = 0; j < h.G; ++j) {
      const float* qr = h.q + j * Dk;
      float acc;
      if constexpr (DK != 0) {
        vec a = load(qr) * load(kr);
        for (int c = 1; c < DK / VL; ++c) a += load(qr + c * VL) * load(kr + c * VL);
        acc = hsum(a);
      } else {
        acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int64_t d = 0; d < Dk; ++d) acc += qr[d] * kr[d];
      }
      s[j * h.L + l] = acc * scale;
    }
  }
}

// Each row of s becomes exp(s - max); returns 1 / the row's sum in inv (0 when every key
// is masked).
static void softmax_rows(float* s, int64_t G, int64_t L, float* inv) {
  for (int64_t j = 0; j < G; ++j) {
    float* r = s + j * L;
    float top = NINF;
    for (int64_t l = 0; l < L; ++l) top = std::max(top, r[l]);
    if (top == NINF) {
      std::fill(r, r + L, 0.f);
      inv[j] = 0.f;
      continue;
    }
    vec sum = vec{};
    int64_t l = 0;
    for (; l + VL <= L; l += VL) {
      const vec e = exp_nonpositive(load(r + l) - top);
      store(r + l, e);
      sum += e;
    }
    float total = hsum(sum);
    for (; l < L; ++l) {
      r[l] = r[l] == NINF ? 0.f : std::exp(r[l] - top);
      total += r[l];
    }
    inv[j] = 1.f / total;
  }
}

// o[j] = inv[j] * sum_l p[j, l] v[l] for Q query rows (from j0): with DV the head dim, the
// Q x DV/VL accumulators stay in registers over one pass of the values.
template <int DV, int Q>
static void values_block(const Head& h, const float* p, const float* inv, int64_t j0) {
  constexpr int NC = DV / VL;
  vec acc[Q][NC];
  for (int j = 0; j < Q; ++j)
    for (int c = 0; c < NC; ++c) acc[j][c] = vec{};
  for (int64_t l = 0; l < h.L; ++l) {
    if (!h.m[l * h.ml]) continue;
    const float* vr = h.v + l * h.vl;
    vec vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = load(vr + c * VL);
    for (int j = 0; j < Q; ++j) {
      const vec w = vec{} + p[(j0 + j) * h.L + l];
      for (int c = 0; c < NC; ++c) acc[j][c] += w * vv[c];
    }
  }
  for (int j = 0; j < Q; ++j)
    for (int c = 0; c < NC; ++c) store(h.o + (j0 + j) * DV + c * VL, acc[j][c] * inv[j0 + j]);
}

template <int DV>
static void values(const Head& h, const float* p, const float* inv) {
  constexpr int QB = std::max(1, std::min(8, ACCS / (DV / VL)));  // query rows a pass
  int64_t j = 0;
  for (; j + QB <= h.G; j += QB) values_block<DV, QB>(h, p, inv, j);
  switch (h.G - j) {  // the rest, fewer than QB (at most 7)
    case 1: values_block<DV, 1>(h, p, inv, j); break;
    case 2: if constexpr (QB > 2) values_block<DV, 2>(h, p, inv, j); break;
    case 3: if constexpr (QB > 3) values_block<DV, 3>(h, p, inv, j); break;
    case 4: if constexpr (QB > 4) values_block<DV, 4>(h, p, inv, j); break;
    case 5: if constexpr (QB > 5) values_block<DV, 5>(h, p, inv, j); break;
    case 6: if constexpr (QB > 6) values_block<DV, 6>(h, p, inv, j); break;
    case 7: if constexpr (QB > 7) values_block<DV, 7>(h, p, inv, j); break;
    default: break;
  }
}

static void values_any(const Head& h, const float* p, const float* inv) {
  for (int64_t j = 0; j < h.G; ++j) std::fill(h.o + j * h.Dv, h.o + (j + 1) * h.Dv, 0.f);
  for (int64_t l = 0; l < h.L; ++l) {
    if (!h.m[l * h.ml]) continue;
    const float* vr = h.v + l * h.vl;
    for (int64_t j = 0; j < h.G; ++j) {
      const float w = p[j * h.L + l];
      float* o = h.o + j * h.Dv;
#pragma omp simd
      for (int64_t d = 0; d < h.Dv; ++d) o[d] += w * vr[d];
    }
  }
  for (int64_t j = 0; j < h.G; ++j)
    for (int64_t d = 0; d < h.Dv; ++d) h.o[j * h.Dv + d] *= inv[j];
}

}  // namespace llm_attention

// q (B, H, G, Dk); k (B, H, L, Dk), v (B, H, L, Dv), unit stride in the last dim;
// mask (B, L) bool, true = attend. Returns (B, H, G, Dv).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor mask, double scale) {
  using namespace llm_attention;
  TORCH_CHECK(q.dtype() == torch::kFloat && k.dtype() == torch::kFloat && v.dtype() == torch::kFloat,
              "decode_attention: float32 only");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: k, v need unit last stride");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), Dk = q.size(3);
  const int64_t L = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && k.size(1) == H && v.size(1) == H &&
                  k.size(3) == Dk && v.size(2) == L && mask.size(0) == B && mask.size(1) == L,
              "decode_attention: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              " and mask ", mask.sizes(), " do not match");
  const auto qc = q.contiguous();
  auto out = torch::empty({B, H, G, Dv}, q.options());
  const float* qp = qc.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  auto score = Dk == 64 ? scores<64> : Dk == 128 ? scores<128> : scores<0>;
  auto value = Dv == 64 ? values<64> : Dv == 128 ? values<128> : values_any;
  std::vector<std::vector<float>> scratch(at::get_num_threads());  // one per worker (parallel.h)
  parallel_items(B * H, [&](int64_t bh, int64_t worker) {
    std::vector<float>& buffer = scratch[worker];  // the scores (G, L), then 1 / sums (G)
    buffer.resize(G * (L + 1));
    float* s = buffer.data();
    float* inv = s + G * L;
    const int64_t b = bh / H, h = bh % H;
    const Head head{qp + bh * G * Dk, kp + b * k.stride(0) + h * k.stride(1),
                    vp + b * v.stride(0) + h * v.stride(1), mp + b * mask.stride(0),
                    op + bh * G * Dv, G, L, Dk, Dv, k.stride(2), v.stride(2), mask.stride(1)};
    score(head, sc, s);
    softmax_rows(s, G, L, inv);
    value(head, s, inv);
  });
  return out;
}
