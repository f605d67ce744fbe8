// CPU kernels for sparse decode (float32), called through ctypes by cpu_ops.py.
//
// input_sparse: y[b,:] = bias + sum over kept rows k of x_kept[b,k] * wt[k,:], with wt = W.T
// stored input-major, so a kept input channel is one contiguous row (llama.cpp-style axpy over
// the kept rows only). The kept rows are the union over the batch; the output is accumulated in
// column tiles that stay in L1 while the kept rows' segments stream through, four rows at a time.
//
// output_sparse_rows: m[b,j] = a_kept[b,j] * dot(x[b,:], w[j,:]) for the rows j some token keeps
// (a CATS / ProSparse `up` projection with w output-major); the other rows are never read.
//
// One thread: on the 2-core machine this was measured on, a two-thread OpenMP version stalled
// about 11 ms per call whenever torch's own thread pool had just run (KERNELS_NOTES.md), and one
// thread already streams faster than torch's two-thread dense matvec.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kTile = 1024;  // output columns accumulated per pass (4 KB per token)

inline bool keep(float score, float t, bool complement) { return complement ? score <= t : score > t; }

// Kept rows (union over the batch) and the per-token kept inputs, row by row: xk[j * B + b].
int64_t compact(const float* x, int64_t B, int64_t K, const float* scale, float t, bool complement,
                std::vector<int32_t>& rows, std::vector<float>& xk) {
  rows.resize(K);
  xk.resize(K * B);
  int64_t n = 0;
  for (int64_t k = 0; k < K; ++k) {
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      float v = x[b * K + k];
      float score = scale ? std::fabs(v) * scale[k] : std::fabs(v);
      bool kb = keep(score, t, complement);
      xk[n * B + b] = kb ? v : 0.0f;
      any |= kb;
    }
    if (any) rows[n++] = static_cast<int32_t>(k);
  }
  return n;
}

void axpy_rows(const float* __restrict wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows,
               int64_t B, int64_t c0, int64_t c1, float* __restrict acc) {
  const int64_t len = c1 - c0;
  int64_t j = 0;
  for (; j + 4 <= n_rows; j += 4) {
    const float* __restrict w0 = wt + rows[j] * N + c0;
    const float* __restrict w1 = wt + rows[j + 1] * N + c0;
    const float* __restrict w2 = wt + rows[j + 2] * N + c0;
    const float* __restrict w3 = wt + rows[j + 3] * N + c0;
    for (int64_t b = 0; b < B; ++b) {
      const float x0 = xk[j * B + b], x1 = xk[(j + 1) * B + b], x2 = xk[(j + 2) * B + b], x3 = xk[(j + 3) * B + b];
      float* __restrict a = acc + b * kTile;
#pragma omp simd
      for (int64_t c = 0; c < len; ++c) a[c] += x0 * w0[c] + x1 * w1[c] + x2 * w2[c] + x3 * w3[c];
    }
  }
  for (; j < n_rows; ++j) {
    const float* __restrict w0 = wt + rows[j] * N + c0;
    for (int64_t b = 0; b < B; ++b) {
      const float x0 = xk[j * B + b];
      float* __restrict a = acc + b * kTile;
#pragma omp simd
      for (int64_t c = 0; c < len; ++c) a[c] += x0 * w0[c];
    }
  }
}

}  // namespace

extern "C" {

void actsparse_input_sparse(const float* x, int64_t B, int64_t K, const float* scale, const float* threshold,
                            int complement, const float* wt, int64_t N, const float* bias, float* y) {
  static thread_local std::vector<int32_t> rows;
  static thread_local std::vector<float> xk, acc;
  const int64_t n_rows = compact(x, B, K, scale, *threshold, complement != 0, rows, xk);
  acc.resize(static_cast<size_t>(B * kTile));
  for (int64_t c0 = 0; c0 < N; c0 += kTile) {
    const int64_t c1 = std::min<int64_t>(N, c0 + kTile);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = c0; c < c1; ++c) acc[b * kTile + (c - c0)] = bias ? bias[c] : 0.0f;
    axpy_rows(wt, N, rows.data(), xk.data(), n_rows, B, c0, c1, acc.data());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = c0; c < c1; ++c) y[b * N + c] = acc[b * kTile + (c - c0)];
  }
}

void actsparse_output_sparse_rows(const float* x, const float* a, int64_t B, int64_t J, int64_t D,
                                  const float* threshold, const float* w, float* m) {
  static thread_local std::vector<int32_t> rows;
  const float t = *threshold;
  rows.resize(J);
  int64_t n_rows = 0;
  for (int64_t j = 0; j < J; ++j) {
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      const bool kb = std::fabs(a[b * J + j]) > t;
      m[b * J + j] = 0.0f;
      any |= kb;
    }
    if (any) rows[n_rows++] = static_cast<int32_t>(j);
  }
  for (int64_t i = 0; i < n_rows; ++i) {
    const int64_t j = rows[i];
    const float* __restrict wj = w + j * D;
    for (int64_t b = 0; b < B; ++b) {
      const float aj = a[b * J + j];
      if (!(std::fabs(aj) > t)) continue;
      const float* __restrict xb = x + b * D;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += xb[d] * wj[d];
      m[b * J + j] = aj * dot;
    }
  }
}

}  // extern "C"
