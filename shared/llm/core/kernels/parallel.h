// Work shared among the CPU kernels' threads (llm.core.cpu_kernels) one item at a time.
// A served engine shares its cores with the processes that relay its tokens; a thread of a
// statically split loop that the OS preempts holds the whole step at the loop's end, while
// here the other threads take its items meanwhile (docs/benchmarks.md).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

// f(item, worker) for every item in [0, n), worker in [0, workers), workers at most
// torch's thread count. Each worker takes the items of its own contiguous share from the
// front (a stream the prefetchers follow), then the items left in the other shares from
// their backs.
template <typename F>
static void parallel_items(int64_t n, const F& f) {
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) f(i, 0);
    return;
  }
  TORCH_CHECK(n < (int64_t(1) << 32), "parallel_items: ", n, " items do not fit the shares' 32 bits");
  // Share w is the items [front, back) of bounds[w], packed as front << 32 | back.
  std::vector<std::atomic<uint64_t>> bounds(workers);
  for (int64_t w = 0; w < workers; ++w)
    bounds[w] = (uint64_t)(n * w / workers) << 32 | (uint64_t)(n * (w + 1) / workers);
  at::parallel_for(0, workers, 1, [&](int64_t me, int64_t) {
    for (int64_t k = 0; k < workers; ++k) {
      const int64_t w = (me + k) % workers;
      std::atomic<uint64_t>& b = bounds[w];
      for (uint64_t cur = b.load(std::memory_order_relaxed);;) {
        const uint64_t front = cur >> 32, back = cur & 0xffffffffu;
        if (front >= back) break;
        // Own share: the front item; another's: the back one.
        const uint64_t next = k == 0 ? (front + 1) << 32 | back : front << 32 | (back - 1);
        if (b.compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
          f(k == 0 ? (int64_t)front : (int64_t)back - 1, me);
          cur = b.load(std::memory_order_relaxed);
        }
      }
    }
  });
}
