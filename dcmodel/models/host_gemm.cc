// C = op(A) op(B) for row-major float32 A, B on the CPU (dcmodel/models/host_kernels.py builds it):
// the transposes are BLAS flags, never copies. OpenBLAS runs single-threaded; the product is split
// in row (or column) blocks over XLA's own intra-op thread pool (host_parallel.h).
#include <algorithm>
#include <cstdint>
#include "cblas.h"
#include "host_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

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
  dcmodel::ParallelFor(pool, chunks, chunks, [=](int64_t, int64_t i) {
    const int64_t lo = extent * i / chunks, hi = extent * (i + 1) / chunks;
    const float* ca = pa;
    const float* cb = pb;
    float* cc = pc;
    int64_t mm = m, nn = n;
    if (split_m) { ca += trans_a ? lo : lo * lda; cc += lo * n; mm = hi - lo; }
    else { cb += trans_b ? lo * ldb : lo; cc += lo; nn = hi - lo; }
    scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                      mm, nn, k, 1.0f, ca, lda, cb, ldb, 0.0f, cc, n);
  });
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

// Called once when the library is loaded (host_kernels.py): every kernel parallelizes over XLA's pool.
extern "C" void HostKernelsSingleThreadedBlas() { scipy_openblas_set_num_threads(1); }
