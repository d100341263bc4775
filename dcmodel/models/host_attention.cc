// Fused softmax self-attention on the CPU, forward and backward (dcmodel/models/host_attention.py
// calls it; host_kernels.py builds it). q (batch, length, heads, head_dim) and k, v (batch, length,
// kv_heads, head_dim) are read where they lie, each head a strided view, so no head-major copy is
// ever written. One task per (row, kv head) on XLA's intra-op pool (host_parallel.h): its query
// heads, in blocks of kRows query rows against only the keys a causal mask lets them see. A block's
// scores live in a per-thread kRows x length scratch (the keys are not tiled: it grows with the
// length). The products are single-threaded OpenBLAS calls with the heads' strides as leading
// dimensions; the softmax is a few vectorized passes over each row of the block.
// Masked: a query attends to key j when j <= i (causal) and its segment id equals the key's.
// With rotary tables, q and k are rotated (RoPE) as they are read, and their gradients rotated
// back as they are written: no rotated copy of either exists outside the kernel.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include "cblas.h"
#include "host_parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 32;   // query rows per block: a causal block skips the keys after its last row

// exp(x) for x <= 0 to ~1 ulp (Cephes' polynomial), 0 below -87 (and for -inf, a masked score);
// branch-free, so the loops that call it vectorize.
inline float ExpNonPositive(float in) {
  const float x = in < -87.0f ? -87.0f : in;
  const float t = x * 1.44269504f + 12582912.0f;   // round(x / ln 2) by the float adder
  const float n = t - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return in < -87.0f ? 0.0f : y * scale;
}

// op-reduction of x[0, n) in 8 independent lanes: float adds and maxes are not associative, so
// the compiler vectorizes a reduction only when its order is written out like this.
template <typename Op>
inline float Reduce(const float* x, int64_t n, float init, Op op) {
  float lane[8];
  for (float& l : lane) l = init;
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lane[l] = op(lane[l], x[j + l]);
  for (; j < n; ++j) lane[0] = op(lane[0], x[j]);
  float r = init;
  for (float l : lane) r = op(r, l);
  return r;
}

inline float Max(float a, float b) { return a > b ? a : b; }
inline float Add(float a, float b) { return a + b; }

struct Shape {
  int64_t batch, length, heads, kv_heads, dim;
  float scale;
  bool causal;
  int64_t ld_q() const { return heads * dim; }
  int64_t ld_k() const { return kv_heads * dim; }
  // How many keys query rows [lo, hi) may see: all, or (causal) those up to the last row.
  int64_t keys(int64_t hi) const { return causal ? hi : length; }
};

ffi::Error CheckShapes(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::F32>& v,
                       ffi::Buffer<ffi::S32>& seg, ffi::Buffer<ffi::F32>& sin, ffi::Buffer<ffi::F32>& cos,
                       bool rotary, Shape* s) {
  auto dq = q.dimensions(), dk = k.dimensions(), dv = v.dimensions(), ds = seg.dimensions();
  if (dq.size() != 4 || dk.size() != 4 || dv.size() != 4 || ds.size() != 2)
    return ffi::Error::InvalidArgument("host_attention takes 4-D q, k, v and 2-D segment ids");
  s->batch = dq[0], s->length = dq[1], s->heads = dq[2], s->dim = dq[3], s->kv_heads = dk[2];
  for (int i = 0; i < 4; ++i)
    if (dk[i] != dv[i] || (i != 2 && dk[i] != dq[i]))
      return ffi::Error::InvalidArgument("host_attention: q, k, v shapes differ beyond the heads");
  if (s->kv_heads == 0 || s->heads % s->kv_heads)
    return ffi::Error::InvalidArgument("host_attention: heads are not a multiple of kv heads");
  if (ds[0] != s->batch || ds[1] != s->length)
    return ffi::Error::InvalidArgument("host_attention: segment ids are not (batch, length)");
  if (rotary) {
    auto dsin = sin.dimensions(), dcos = cos.dimensions();
    if (s->dim % 2 || dsin.size() != 3 || dcos.size() != 3 || dsin[0] != s->batch || dsin[1] != s->length ||
        dsin[2] != s->dim / 2 || dcos[0] != dsin[0] || dcos[1] != dsin[1] || dcos[2] != dsin[2])
      return ffi::Error::InvalidArgument("host_attention: rotary tables are not (batch, length, head_dim / 2)");
  }
  return ffi::Error::Success();
}

// p[i, j] for rows [lo, lo + rows) against keys [0, n), in place over the scores s (row stride n):
// exp(scale * s - lse) where allowed, else 0. With `lse` null (forward), the rows' own
// log-sum-exp, written to `out_lse`.
void Softmax(const Shape& sh, float* s, int64_t lo, int64_t rows, int64_t n, const int32_t* seg,
             const float* lse, float* out_lse) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * n;
    const int64_t q = lo + i;
    const int64_t end = sh.causal ? q + 1 : n;   // keys past the diagonal are never read
    const int32_t id = seg[q];
    const float scale = sh.scale;
    if (lse == nullptr) {
      for (int64_t j = 0; j < end; ++j) row[j] = seg[j] == id ? row[j] * scale : -INFINITY;
      const float m = Reduce(row, end, -INFINITY, Max);   // finite: a query always sees itself
      for (int64_t j = 0; j < end; ++j) row[j] = ExpNonPositive(row[j] - m);
      const float sum = Reduce(row, end, 0.0f, Add), inv = 1.0f / sum;
      for (int64_t j = 0; j < end; ++j) row[j] *= inv;
      out_lse[q] = m + std::log(sum);
    } else {
      const float shift = lse[q];
      for (int64_t j = 0; j < end; ++j) row[j] = seg[j] == id ? ExpNonPositive(row[j] * scale - shift) : 0.0f;
    }
    std::fill(row + end, row + n, 0.0f);
  }
}

// Rotary embedding (rotate-half layout: dimension c pairs with c + D/2) of `rows` rows of x (row
// stride ld) by the tables' rows sin, cos (D/2 each, one per x row), into y (row stride ld_y). The
// inverse rotation (its transpose) carries gradients back.
void Rotate(const float* x, int64_t ld, int64_t rows, int64_t D, const float* sin, const float* cos, bool inverse,
            float* y, int64_t ld_y) {
  const int64_t half = D / 2;
  const float sign = inverse ? -1.0f : 1.0f;
  for (int64_t i = 0; i < rows; ++i) {
    const float *a = x + i * ld, *b = a + half, *sn = sin + i * half, *cs = cos + i * half;
    float *ya = y + i * ld_y, *yb = ya + half;
    for (int64_t c = 0; c < half; ++c) {
      const float s = sign * sn[c];
      ya[c] = a[c] * cs[c] - b[c] * s;
      yb[c] = b[c] * cs[c] + a[c] * s;
    }
  }
}

// A head's rows as the products read them: where they lie (row stride ld), or rotated into
// `scratch` (row stride D) when there are rotary tables.
struct Rows {
  const float* data;
  int64_t ld;
};

Rows Rotated(const float* x, int64_t ld, int64_t rows, int64_t D, const float* sin, const float* cos,
             float* scratch) {
  if (sin == nullptr) return {x, ld};
  Rotate(x, ld, rows, D, sin, cos, false, scratch, D);
  return {scratch, D};
}

}  // namespace

static ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> sin,
                          ffi::Buffer<ffi::F32> cos, ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse,
                          float scale, bool causal, bool rotary) {
  Shape sh;
  if (auto e = CheckShapes(q, k, v, seg, sin, cos, rotary, &sh); e.failure()) return e;
  sh.scale = scale, sh.causal = causal;
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const float *psin = rotary ? sin.typed_data() : nullptr, *pcos = rotary ? cos.typed_data() : nullptr;
  const int32_t* ps = seg.typed_data();
  float *po = o->typed_data(), *pl = lse->typed_data();
  const int64_t group = sh.heads / sh.kv_heads, T = sh.length, D = sh.dim, half = D / 2;
  const int64_t workers = pool.num_threads();
  std::vector<std::vector<float>> scratch(std::max<int64_t>(workers, 1));
  dcmodel::ParallelFor(pool, sh.batch * sh.kv_heads, workers, [&](int64_t w, int64_t task) {
    std::vector<float>& buf = scratch[w];
    buf.resize(kRows * T + T * D + kRows * D);
    float *s = buf.data(), *kr = s + kRows * T, *qr = kr + T * D;
    const int64_t b = task / sh.kv_heads, g = task % sh.kv_heads;
    const float *sinb = psin ? psin + b * T * half : nullptr, *cosb = pcos ? pcos + b * T * half : nullptr;
    const Rows ks = Rotated(pk + (b * T * sh.kv_heads + g) * D, sh.ld_k(), T, D, sinb, cosb, kr);
    const float* vb = pv + (b * T * sh.kv_heads + g) * D;
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      for (int64_t lo = 0; lo < T; lo += kRows) {
        const int64_t rows = std::min(kRows, T - lo), n = sh.keys(lo + rows);
        const Rows qs = Rotated(pq + ((b * T + lo) * sh.heads + h) * D, sh.ld_q(), rows, D,
                                sinb ? sinb + lo * half : nullptr, cosb ? cosb + lo * half : nullptr, qr);
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, D, 1.0f, qs.data, qs.ld, ks.data, ks.ld,
                          0.0f, s, n);
        Softmax(sh, s, lo, rows, n, ps + b * T, nullptr, pl + (b * sh.heads + h) * T);
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, D, n, 1.0f, s, n, vb,
                          sh.ld_k(), 0.0f, po + ((b * T + lo) * sh.heads + h) * D, sh.ld_q());
      }
    }
  });
  return ffi::Error::Success();
}

// dq, dk, dv from the forward's o and log-sum-exp: with P the probabilities and dO the output's
// gradient, dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o)), dQ = scale dS K, dK = scale dS^T Q
// (Q and K rotated when there are rotary tables, their gradients rotated back).
static ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> sin,
                           ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                           ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                           ffi::ResultBuffer<ffi::F32> dv, float scale, bool causal, bool rotary) {
  Shape sh;
  if (auto e = CheckShapes(q, k, v, seg, sin, cos, rotary, &sh); e.failure()) return e;
  sh.scale = scale, sh.causal = causal;
  const float *pq = q.typed_data(), *pk = k.typed_data(), *pv = v.typed_data();
  const float *psin = rotary ? sin.typed_data() : nullptr, *pcos = rotary ? cos.typed_data() : nullptr;
  const float *po = o.typed_data(), *pl = lse.typed_data(), *pdo = dout.typed_data();
  const int32_t* ps = seg.typed_data();
  float *pdq = dq->typed_data(), *pdk = dk->typed_data(), *pdv = dv->typed_data();
  const int64_t group = sh.heads / sh.kv_heads, T = sh.length, D = sh.dim, half = D / 2;
  const int64_t workers = pool.num_threads();
  std::vector<std::vector<float>> scratch(std::max<int64_t>(workers, 1));
  dcmodel::ParallelFor(pool, sh.batch * sh.kv_heads, workers, [&](int64_t w, int64_t task) {
    std::vector<float>& buf = scratch[w];
    buf.resize(2 * kRows * T + kRows + D + 2 * T * D + 2 * kRows * D);
    float *p = buf.data(), *dp = p + kRows * T, *delta = dp + kRows * T, *prod = delta + kRows;
    float *kr = prod + D, *dkr = kr + T * D, *qr = dkr + T * D, *dqr = qr + kRows * D;
    const int64_t b = task / sh.kv_heads, g = task % sh.kv_heads;
    const float *sinb = psin ? psin + b * T * half : nullptr, *cosb = pcos ? pcos + b * T * half : nullptr;
    const int64_t kv_at = (b * T * sh.kv_heads + g) * D;
    const Rows ks = Rotated(pk + kv_at, sh.ld_k(), T, D, sinb, cosb, kr);
    const float* vb = pv + kv_at;
    // dK gathers over this kv head's query heads and rows: in place, or rotated in dkr and turned back at the end.
    const Rows dks = rotary ? Rows{dkr, D} : Rows{pdk + kv_at, sh.ld_k()};
    float* dkw = const_cast<float*>(dks.data);
    float* dvb = pdv + kv_at;
    for (int64_t t = 0; t < T; ++t) {
      std::fill_n(dkw + t * dks.ld, D, 0.0f);
      std::fill_n(dvb + t * sh.ld_k(), D, 0.0f);
    }
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      for (int64_t lo = 0; lo < T; lo += kRows) {
        const int64_t rows = std::min(kRows, T - lo), n = sh.keys(lo + rows);
        const int64_t at = ((b * T + lo) * sh.heads + h) * D;
        const float *ob = po + at, *dob = pdo + at;
        const float *sinr = sinb ? sinb + lo * half : nullptr, *cosr = cosb ? cosb + lo * half : nullptr;
        const Rows qs = Rotated(pq + at, sh.ld_q(), rows, D, sinr, cosr, qr);
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, D, 1.0f, qs.data, qs.ld, ks.data, ks.ld,
                          0.0f, p, n);
        Softmax(sh, p, lo, rows, n, ps + b * T, pl + (b * sh.heads + h) * T, nullptr);
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, D, rows, 1.0f, p, n, dob, sh.ld_q(), 1.0f,
                          dvb, sh.ld_k());
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, n, D, 1.0f, dob, sh.ld_q(), vb,
                          sh.ld_k(), 0.0f, dp, n);
        for (int64_t i = 0; i < rows; ++i) {
          const float *dor = dob + i * sh.ld_q(), *orow = ob + i * sh.ld_q();
          for (int64_t c = 0; c < D; ++c) prod[c] = dor[c] * orow[c];
          delta[i] = Reduce(prod, D, 0.0f, Add);
        }
        for (int64_t i = 0; i < rows; ++i) {
          float* ds = dp + i * n;
          const float* pr = p + i * n;
          for (int64_t j = 0; j < n; ++j) ds[j] = pr[j] * (ds[j] - delta[i]) * scale;
        }
        // dQ straight into its place, or (rotary) into dqr and turned back into its place
        float* dqw = rotary ? dqr : pdq + at;
        const int64_t ld_dq = rotary ? D : sh.ld_q();
        scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, D, n, 1.0f, dp, n, ks.data, ks.ld, 0.0f,
                          dqw, ld_dq);
        if (rotary) Rotate(dqr, D, rows, D, sinr, cosr, true, pdq + at, sh.ld_q());
        scipy_cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, D, rows, 1.0f, dp, n, qs.data, qs.ld, 1.0f,
                          dkw, dks.ld);
      }
    }
    if (rotary) Rotate(dkr, D, T, D, sinb, cosb, true, pdk + kv_at, sh.ld_k());
  });
  return ffi::Error::Success();
}

// Both passes take q, k, v, the segment ids and the rotary tables (sin, cos) first.
static auto BindInputs() {
  using F32 = ffi::Buffer<ffi::F32>;
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<ffi::Buffer<ffi::S32>>()
      .Arg<F32>().Arg<F32>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(HostAttentionForward, Forward,
                              BindInputs()
                                  .Ret<ffi::Buffer<ffi::F32>>()      // o
                                  .Ret<ffi::Buffer<ffi::F32>>()      // log-sum-exp
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("rotary"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(HostAttentionBackward, Backward,
                              BindInputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()      // o
                                  .Arg<ffi::Buffer<ffi::F32>>()      // log-sum-exp
                                  .Arg<ffi::Buffer<ffi::F32>>()      // dO
                                  .Ret<ffi::Buffer<ffi::F32>>()      // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()      // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()      // dv
                                  .Attr<float>("scale")
                                  .Attr<bool>("causal")
                                  .Attr<bool>("rotary"));
