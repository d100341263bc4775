// C = op(A) op(B) for row-major float32 A, B on the CPU (dcmodel/models/host_gemm.py builds it):
// the transposes are BLAS flags, never copies. OpenBLAS runs single-threaded; the product is split
// in row (or column) blocks over XLA's own intra-op thread pool, so no second pool of threads
// competes with XLA's for the cores.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {
struct Work {
  std::atomic<int64_t> next{0};
  int64_t chunks, done = 0;
  std::mutex mu;
  std::condition_variable cv;
};
}

static ffi::Error Gemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
                       ffi::ResultBuffer<ffi::F32> c, bool trans_a, bool trans_b) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != 2 || db.size() != 2) return ffi::Error::InvalidArgument("host_gemm takes 2-D operands");
  const int64_t m = trans_a ? da[1] : da[0], k = trans_a ? da[0] : da[1];
  const int64_t kb = trans_b ? db[1] : db[0], n = trans_b ? db[0] : db[1];
  if (k != kb) return ffi::Error::InvalidArgument("host_gemm: contracting dimensions differ");
  const float *pa = a.typed_data(), *pb = b.typed_data();
  float* pc = c->typed_data();
  const int64_t lda = da[1], ldb = db[1];
  const bool split_m = m >= n;
  const int64_t extent = split_m ? m : n;
  // Blocks of at least 64 rows or columns: below that, packing the shared operand costs more than
  // a second core gains.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), extent / 64));
  auto run = [=](int64_t i) {
    const int64_t lo = extent * i / chunks, hi = extent * (i + 1) / chunks;
    const float* ca = pa;
    const float* cb = pb;
    float* cc = pc;
    int64_t mm = m, nn = n;
    if (split_m) { ca += trans_a ? lo : lo * lda; cc += lo * n; mm = hi - lo; }
    else { cb += trans_b ? lo * ldb : lo; cc += lo; nn = hi - lo; }
    scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                      mm, nn, k, 1.0f, ca, lda, cb, ldb, 0.0f, cc, n);
  };
  if (chunks == 1) { run(0); return ffi::Error::Success(); }
  // Chunks are claimed from a counter, by the pool's threads and by this one: a task that starts
  // late finds none left, so waiting here is only ever for chunks already running.
  auto work = std::make_shared<Work>();
  work->chunks = chunks;
  auto drain = [work, run] {
    for (int64_t i; (i = work->next.fetch_add(1)) < work->chunks;) {
      run(i);
      std::lock_guard<std::mutex> lock(work->mu);
      if (++work->done == work->chunks) work->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < chunks; ++t) { auto task = drain; pool.Schedule(std::move(task)); }
  drain();
  std::unique_lock<std::mutex> lock(work->mu);
  work->cv.wait(lock, [&] { return work->done == work->chunks; });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HostGemm, Gemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));

// Called once when the library is loaded (host_gemm.py).
extern "C" void HostGemmSingleThreaded() { scipy_openblas_set_num_threads(1); }
