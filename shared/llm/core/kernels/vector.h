// The vector type the CPU kernels (llm.core.cpu_kernels) compute with: GCC/Clang vector
// extensions at the width of the machine's registers (built with -march=native).
#pragma once

#include <cstring>

#if defined(__AVX512F__)
constexpr int VL = 16;  // floats per vector register
#else
constexpr int VL = 8;
#endif
typedef float vec __attribute__((vector_size(VL * sizeof(float))));

static inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

static inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof v); }
