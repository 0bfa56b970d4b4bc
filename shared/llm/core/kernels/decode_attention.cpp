// One decode step's attention on the CPU, fp32 (llm.core.cpu_kernels): the query rows
// of a KV head's group attend over that head's cached keys and values, read once for all.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

// q (B, H, G, Dk); k (B, H, L, Dk), v (B, H, L, Dv), unit stride in the last dim;
// mask (B, L) bool, true = attend. Returns (B, H, G, Dv).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               torch::Tensor mask, double scale) {
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
  const int64_t kb = k.stride(0), kh = k.stride(1), kl = k.stride(2);
  const int64_t vb = v.stride(0), vh = v.stride(1), vl = v.stride(2);
  const int64_t mb = mask.stride(0), ml = mask.stride(1);
  const float sc = static_cast<float>(scale);
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * L);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const float* Q = qp + bh * G * Dk;
      const float* K = kp + b * kb + h * kh;
      const float* V = vp + b * vb + h * vh;
      const bool* M = mp + b * mb;
      float* O = op + bh * G * Dv;
      // Scores: one pass over the keys, every query of the group per key.
      for (int64_t l = 0; l < L; ++l) {
        const float* kr = K + l * kl;
        const bool keep = M[l * ml];
        for (int64_t j = 0; j < G; ++j) {
          const float* qr = Q + j * Dk;
          float acc = 0.f;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < Dk; ++d) acc += qr[d] * kr[d];
          scores[j * L + l] = keep ? acc * sc : ninf;
        }
      }
      // Softmax per query row; a row with every key masked attends to nothing.
      for (int64_t j = 0; j < G; ++j) {
        float* s = scores.data() + j * L;
        float top = ninf;
        for (int64_t l = 0; l < L; ++l) top = std::max(top, s[l]);
        float* o = O + j * Dv;
        std::fill(o, o + Dv, 0.f);
        if (top == ninf) {
          std::fill(s, s + L, 0.f);
          continue;
        }
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) s[l] = expf(s[l] - top);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t l = 0; l < L; ++l) sum += s[l];
        const float inv = 1.f / sum;
#pragma omp simd
        for (int64_t l = 0; l < L; ++l) s[l] *= inv;
      }
      // Values: one pass, every query's weighted sum per value row.
      for (int64_t l = 0; l < L; ++l) {
        if (!M[l * ml]) continue;
        const float* vr = V + l * vl;
        for (int64_t j = 0; j < G; ++j) {
          const float p = scores[j * L + l];
          float* o = O + j * Dv;
#pragma omp simd
          for (int64_t d = 0; d < Dv; ++d) o[d] += p * vr[d];
        }
      }
    }
  });
  return out;
}
