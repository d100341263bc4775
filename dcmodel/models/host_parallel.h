// Work split over XLA's own intra-op thread pool, for the CPU kernels (host_gemm.cc,
// host_attention.cc): no second pool of threads competes with XLA's for the cores.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <utility>
#include "xla/ffi/api/ffi.h"

namespace dcmodel {

// Runs body(worker, i) for i in [0, n) on up to `workers` threads of `pool` and this one; `worker`
// numbers the thread (0 .. workers-1), for per-thread scratch. Tasks are claimed from a counter,
// so a pool thread that starts late finds none left: waiting here is only ever for tasks already
// running. Returns when all are done.
template <typename Body>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, int64_t workers, Body body) {
  workers = std::max<int64_t>(1, std::min<int64_t>(workers, n));
  if (workers == 1) {
    for (int64_t i = 0; i < n; ++i) body(0, i);
    return;
  }
  struct Work {
    std::atomic<int64_t> next{0};
    int64_t n, done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto work = std::make_shared<Work>();
  work->n = n;
  auto drain = [work, body](int64_t worker) {
    for (int64_t i; (i = work->next.fetch_add(1)) < work->n;) {
      body(worker, i);
      std::lock_guard<std::mutex> lock(work->mu);
      if (++work->done == work->n) work->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < workers; ++t) {
    pool.Schedule([drain, t] { drain(t); });
  }
  drain(0);
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done == work->n; });
}

}  // namespace dcmodel
