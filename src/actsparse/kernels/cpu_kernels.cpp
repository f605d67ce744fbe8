// CPU kernels for decode (batch 1-8): a plain C ABI, called through ctypes by cpu_ops.py.
//
// Weights are float32, bfloat16 or float16 (dtype code 0 / 1 / 2); activations, scales, biases,
// thresholds and outputs are float32, and every product is accumulated in float32.
//
// input_sparse: y[b,:] = bias + sum over kept rows k of x_kept[b,k] * wt[k,:], with wt = W.T
// stored input-major, so a kept input channel is one contiguous row (llama.cpp-style axpy over
// the kept rows only; dropped rows are never read). The kept rows are the union over the batch.
// Without a threshold every row is kept: the dense product over the same input-major weights.
// The output is accumulated in column tiles that stay in L1 while the kept rows' segments stream
// through, four rows at a time; threads split the columns, so no reduction is needed.
//
// output_sparse_rows: m[b,j] = a_kept[b,j] * dot(x[b,:], w[j,:]) for the rows j some token keeps
// (a CATS / ProSparse `up` projection with w output-major); the other rows are never read.
// dense_rows: y[b,j] = bias[j] + dot(x[b,:], w[j,:]) for every row (nn.Linear's layout, e.g. the
// tied lm_head). Threads split the rows.
//
// Vector code: AVX-512 (bf16 widened by a 16-bit shift, fp16 by vcvtph2ps), AVX2 + F16C, or
// scalar, picked at run time (__builtin_cpu_supports) among the paths this build compiled in; the
// library is compiled per machine with -march=native (cpu_ops.py), so a path is compiled in
// exactly when the build machine has it, and actsparse_cpu_set_isa can force a lower one (tests).
// AVX-512 BF16's vdpbf16ps is not used: it would round the activations to bf16, and the kernels
// are bound by memory bandwidth, which the shift-widening already saturates.
//
// Threads: a small persistent pool (std::thread); its workers spin briefly between calls (decode
// calls come every few microseconds) and then sleep. A call with threads=N uses the caller plus
// N-1 workers.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace {

enum Dtype : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// ---------------------------------------------------------------- ISA selection

int detected_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return kAvx512;
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
#endif
#endif
  return kScalar;
}

std::atomic<int> g_isa{-1};

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = detected_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

// ---------------------------------------------------------------- scalar conversions

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400));
    u = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct F32 { using T = float; static float get(const float* p) { return *p; } };
struct BF16 { using T = uint16_t; static float get(const uint16_t* p) { return bf16_to_f32(*p); } };
struct F16 { using T = uint16_t; static float get(const uint16_t* p) { return f16_to_f32(*p); } };

// ---------------------------------------------------------------- vector loads: 16 / 8 weights as fp32

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ACTSPARSE_HAVE_AVX512 1
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
template <class D> inline __m512 load16w(const uint16_t* p);
template <> inline __m512 load16w<BF16>(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
template <> inline __m512 load16w<F16>(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <class D> inline __m512 load16w(const uint16_t* p, __mmask16 m);
template <> inline __m512 load16w<BF16>(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
template <> inline __m512 load16w<F16>(const uint16_t* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
template <class D> inline __m512 wload(const typename D::T* p) {
  if constexpr (std::is_same_v<D, F32>) return load16(p); else return load16w<D>(p);
}
template <class D> inline __m512 wload(const typename D::T* p, __mmask16 m) {
  if constexpr (std::is_same_v<D, F32>) return load16(p, m); else return load16w<D>(p, m);
}
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ACTSPARSE_HAVE_AVX2 1
template <class D> inline __m256 wload8(const typename D::T* p) {
  if constexpr (std::is_same_v<D, F32>) {
    return _mm256_loadu_ps(p);
  } else if constexpr (std::is_same_v<D, BF16>) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  } else {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
}
#endif

// ---------------------------------------------------------------- thread pool

// Runs fn(chunk) for chunk < n_chunks on up to n threads (the caller and n-1 pooled workers).
// Threads claim chunks from a shared counter, so a worker the OS has descheduled (the machine is
// shared) delays a call by at most the chunk it holds: the others take the rest. The counter
// carries the call's generation in its high half, so a late worker can never claim a chunk of a
// newer call under an older one's job.
class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      wake_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }

  void run(int n, int64_t n_chunks, const std::function<void(int64_t)>& fn) {
    if (n <= 1 || n_chunks <= 1) {
      for (int64_t c = 0; c < n_chunks; ++c) fn(c);
      return;
    }
    std::lock_guard<std::mutex> serial(call_mutex_);  // one parallel call at a time
    while (static_cast<int>(workers_.size()) < n - 1) {
      const int id = static_cast<int>(workers_.size()) + 1;
      workers_.emplace_back([this, id] { loop(id); });
    }
    job_ = &fn;
    n_chunks_ = n_chunks;
    active_ = n;
    done_.store(0, std::memory_order_relaxed);
    ++generation_;
    ticket_.store(generation_ << 32, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      wake_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work(ticket_.load(std::memory_order_acquire));
    for (int spin = 0; done_.load(std::memory_order_acquire) != n_chunks; ++spin) {
      if (spin < 4096) pause(); else std::this_thread::yield();
    }
  }

 private:
  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#else
    std::this_thread::yield();
#endif
  }

  // Claims and runs chunks of the call whose ticket is `t` until none is left.
  void work(uint64_t t) {
    const uint64_t gen = t >> 32;
    const auto* job = job_.load(std::memory_order_relaxed);
    const int64_t n = n_chunks_.load(std::memory_order_relaxed);
    for (;;) {
      if ((t >> 32) != gen || static_cast<int64_t>(t & 0xffffffffu) >= n) return;
      if (ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        (*job)(static_cast<int64_t>(t & 0xffffffffu));
        done_.fetch_add(1, std::memory_order_release);
        t = ticket_.load(std::memory_order_acquire);
      }
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t w = wake_.load(std::memory_order_acquire);
      for (int spin = 0; w == seen && spin < kSpins; ++spin) {
        pause();
        w = wake_.load(std::memory_order_acquire);
      }
      if (w == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        cv_.wait(lock, [&] { return wake_.load(std::memory_order_acquire) != seen; });
        w = wake_.load(std::memory_order_acquire);
      }
      seen = w;
      if (stop_) return;
      const uint64_t t = ticket_.load(std::memory_order_acquire);
      if (id < active_.load(std::memory_order_relaxed)) work(t);
    }
  }

  static constexpr int kSpins = 1 << 14;  // ~0.5 ms of pause before sleeping
  std::vector<std::thread> workers_;
  std::atomic<uint64_t> wake_{0}, ticket_{0};
  std::atomic<int64_t> done_{0};
  uint64_t generation_ = 0;
  std::atomic<const std::function<void(int64_t)>*> job_{nullptr};
  std::atomic<int64_t> n_chunks_{0};
  std::atomic<int> active_{0};
  bool stop_ = false;
  std::mutex mutex_, call_mutex_;
  std::condition_variable cv_;
};

Pool& pool() {
  static Pool p;
  return p;
}

int resolve_threads(int threads) {
  if (threads > 0) return threads;
  const unsigned hw = std::thread::hardware_concurrency();
  return hw ? static_cast<int>(hw) : 1;
}

// Chunks of `total` items for `threads` threads: one per thread would leave a descheduled thread's
// share to wait; many small ones cut the contiguous runs the prefetcher streams. At least `min_items`
// items a chunk, at most 8 chunks a thread.
int64_t chunks_for(int64_t total, int threads, int64_t min_items) {
  if (threads <= 1) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(total / min_items, 8 * threads));
}

// [begin, end) of part `i` of `n` over `total` items, in whole multiples of `align`.
inline void split(int64_t total, int64_t i, int64_t n, int64_t align, int64_t& begin, int64_t& end) {
  const int64_t units = (total + align - 1) / align;
  begin = std::min(total, units * i / n * align);
  end = std::min(total, units * (i + 1) / n * align);
}

// ---------------------------------------------------------------- input-sparse (axpy over kept rows)

inline bool keep(float score, float t, bool complement) { return complement ? score <= t : score > t; }

// Kept rows (union over the batch) and the kept inputs, row by row: xk[j * B + b]. With no
// threshold every row is kept.
int64_t compact(const float* x, int64_t B, int64_t K, const float* scale, const float* threshold, bool complement,
                std::vector<int32_t>& rows, std::vector<float>& xk) {
  rows.resize(K);
  xk.resize(K * B);
  int64_t n = 0;
  if (!threshold) {
    for (int64_t k = 0; k < K; ++k) {
      rows[k] = static_cast<int32_t>(k);
      for (int64_t b = 0; b < B; ++b) xk[k * B + b] = x[b * K + k];
    }
    return K;
  }
  const float t = *threshold;
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

// acc[b * ld + c] += sum_j xk[j * B + b] * wt[rows[j], c0 + c] for c < len.
template <class D>
void axpy_scalar(const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows, int64_t B,
                 int64_t c0, int64_t len, float* acc, int64_t ld) {
  for (int64_t j = 0; j < n_rows; ++j) {
    const typename D::T* w = wt + rows[j] * N + c0;
    for (int64_t b = 0; b < B; ++b) {
      const float xv = xk[j * B + b];
      if (xv == 0.0f) continue;
      float* a = acc + b * ld;
      for (int64_t c = 0; c < len; ++c) a[c] += xv * D::get(w + c);
    }
  }
}

#ifdef ACTSPARSE_HAVE_AVX512
template <class D>
void axpy_avx512(const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows, int64_t B,
                 int64_t c0, int64_t len, float* acc, int64_t ld) {
  const int64_t full = len & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - full)) - 1);
  int64_t j = 0;
  for (; j + 4 <= n_rows; j += 4) {
    const typename D::T* w0 = wt + rows[j] * N + c0;
    const typename D::T* w1 = wt + rows[j + 1] * N + c0;
    const typename D::T* w2 = wt + rows[j + 2] * N + c0;
    const typename D::T* w3 = wt + rows[j + 3] * N + c0;
    if (j + 8 <= n_rows) {  // the next group's first lines; the hardware prefetcher follows on
      _mm_prefetch(reinterpret_cast<const char*>(wt + rows[j + 4] * N + c0), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wt + rows[j + 5] * N + c0), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wt + rows[j + 6] * N + c0), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wt + rows[j + 7] * N + c0), _MM_HINT_T0);
    }
    for (int64_t b = 0; b < B; ++b) {
      const __m512 x0 = _mm512_set1_ps(xk[j * B + b]), x1 = _mm512_set1_ps(xk[(j + 1) * B + b]);
      const __m512 x2 = _mm512_set1_ps(xk[(j + 2) * B + b]), x3 = _mm512_set1_ps(xk[(j + 3) * B + b]);
      float* a = acc + b * ld;
      int64_t c = 0;
      for (; c < full; c += 16) {
        __m512 s = _mm512_loadu_ps(a + c);
        s = _mm512_fmadd_ps(x0, wload<D>(w0 + c), s);
        s = _mm512_fmadd_ps(x1, wload<D>(w1 + c), s);
        s = _mm512_fmadd_ps(x2, wload<D>(w2 + c), s);
        s = _mm512_fmadd_ps(x3, wload<D>(w3 + c), s);
        _mm512_storeu_ps(a + c, s);
      }
      if (tail) {
        __m512 s = _mm512_maskz_loadu_ps(tail, a + c);
        s = _mm512_fmadd_ps(x0, wload<D>(w0 + c, tail), s);
        s = _mm512_fmadd_ps(x1, wload<D>(w1 + c, tail), s);
        s = _mm512_fmadd_ps(x2, wload<D>(w2 + c, tail), s);
        s = _mm512_fmadd_ps(x3, wload<D>(w3 + c, tail), s);
        _mm512_mask_storeu_ps(a + c, tail, s);
      }
    }
  }
  for (; j < n_rows; ++j) {
    const typename D::T* w0 = wt + rows[j] * N + c0;
    for (int64_t b = 0; b < B; ++b) {
      const __m512 x0 = _mm512_set1_ps(xk[j * B + b]);
      float* a = acc + b * ld;
      int64_t c = 0;
      for (; c < full; c += 16) _mm512_storeu_ps(a + c, _mm512_fmadd_ps(x0, wload<D>(w0 + c), _mm512_loadu_ps(a + c)));
      if (tail) _mm512_mask_storeu_ps(a + c, tail, _mm512_fmadd_ps(x0, wload<D>(w0 + c, tail), _mm512_maskz_loadu_ps(tail, a + c)));
    }
  }
}
#endif

#ifdef ACTSPARSE_HAVE_AVX2
template <class D>
void axpy_avx2(const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows, int64_t B,
               int64_t c0, int64_t len, float* acc, int64_t ld) {
  const int64_t full = len & ~int64_t(7);
  int64_t j = 0;
  for (; j + 4 <= n_rows; j += 4) {
    const typename D::T* w0 = wt + rows[j] * N + c0;
    const typename D::T* w1 = wt + rows[j + 1] * N + c0;
    const typename D::T* w2 = wt + rows[j + 2] * N + c0;
    const typename D::T* w3 = wt + rows[j + 3] * N + c0;
    for (int64_t b = 0; b < B; ++b) {
      const float s0 = xk[j * B + b], s1 = xk[(j + 1) * B + b], s2 = xk[(j + 2) * B + b], s3 = xk[(j + 3) * B + b];
      const __m256 x0 = _mm256_set1_ps(s0), x1 = _mm256_set1_ps(s1), x2 = _mm256_set1_ps(s2), x3 = _mm256_set1_ps(s3);
      float* a = acc + b * ld;
      int64_t c = 0;
      for (; c < full; c += 8) {
        __m256 s = _mm256_loadu_ps(a + c);
        s = _mm256_fmadd_ps(x0, wload8<D>(w0 + c), s);
        s = _mm256_fmadd_ps(x1, wload8<D>(w1 + c), s);
        s = _mm256_fmadd_ps(x2, wload8<D>(w2 + c), s);
        s = _mm256_fmadd_ps(x3, wload8<D>(w3 + c), s);
        _mm256_storeu_ps(a + c, s);
      }
      for (; c < len; ++c) a[c] += s0 * D::get(w0 + c) + s1 * D::get(w1 + c) + s2 * D::get(w2 + c) + s3 * D::get(w3 + c);
    }
  }
  axpy_scalar<D>(wt, N, rows + j, xk + j * B, n_rows - j, B, c0, len, acc, ld);
}
#endif

template <class D>
void axpy(int isa, const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows, int64_t B,
          int64_t c0, int64_t len, float* acc, int64_t ld) {
#ifdef ACTSPARSE_HAVE_AVX512
  if (isa >= kAvx512) return axpy_avx512<D>(wt, N, rows, xk, n_rows, B, c0, len, acc, ld);
#endif
#ifdef ACTSPARSE_HAVE_AVX2
  if (isa >= kAvx2) return axpy_avx2<D>(wt, N, rows, xk, n_rows, B, c0, len, acc, ld);
#endif
  axpy_scalar<D>(wt, N, rows, xk, n_rows, B, c0, len, acc, ld);
}

// Output columns [c_begin, c_end) of input_sparse, in tiles whose accumulators (B x tile floats)
// stay within 16 KB of L1.
template <class D>
void input_sparse_columns(int isa, const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows,
                          int64_t B, const float* bias, float* y, int64_t c_begin, int64_t c_end) {
  const int64_t tile = std::max<int64_t>(64, (4096 / B) & ~int64_t(15));
  static thread_local std::vector<float> acc_buffer;
  acc_buffer.resize(B * tile);
  float* acc = acc_buffer.data();
  for (int64_t c0 = c_begin; c0 < c_end; c0 += tile) {
    const int64_t len = std::min(tile, c_end - c0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t c = 0; c < len; ++c) acc[b * tile + c] = bias ? bias[c0 + c] : 0.0f;
    axpy<D>(isa, wt, N, rows, xk, n_rows, B, c0, len, acc, tile);
    for (int64_t b = 0; b < B; ++b) std::memcpy(y + b * N + c0, acc + b * tile, len * sizeof(float));
  }
}

template <class D>
void input_sparse(const float* x, int64_t B, int64_t K, const float* scale, const float* threshold, bool complement,
                  const void* wt, int64_t N, const float* bias, float* y, int threads) {
  static thread_local std::vector<int32_t> rows;
  static thread_local std::vector<float> xk;
  const int64_t n_rows = compact(x, B, K, scale, threshold, complement, rows, xk);
  const int isa = current_isa();
  const auto* w = static_cast<const typename D::T*>(wt);
  const int n = resolve_threads(threads);
  const int64_t chunks = chunks_for(N, n, 256);
  const int32_t* r = rows.data();
  const float* xkp = xk.data();
  pool().run(n, chunks, [&](int64_t i) {
    int64_t begin, end;
    split(N, i, chunks, 16, begin, end);
    if (begin < end) input_sparse_columns<D>(isa, w, N, r, xkp, n_rows, B, bias, y, begin, end);
  });
}

// ---------------------------------------------------------------- dot products over output-major rows

template <class D>
float dot_scalar(const typename D::T* w, const float* x, int64_t n) {
  float s = 0.0f;
  for (int64_t d = 0; d < n; ++d) s += x[d] * D::get(w + d);
  return s;
}

// out[b] = dot(w, x + b * D) for b < B.
template <class D>
void dot_batch(int isa, const typename D::T* w, const float* x, int64_t B, int64_t Dn, float* out) {
#ifdef ACTSPARSE_HAVE_AVX512
  if (isa >= kAvx512) {
    const int64_t full = Dn & ~int64_t(15);
    const __mmask16 tail = static_cast<__mmask16>((1u << (Dn - full)) - 1);
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * Dn;
      __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
      int64_t d = 0;
      for (; d + 32 <= full; d += 32) {
        s0 = _mm512_fmadd_ps(wload<D>(w + d), _mm512_loadu_ps(xb + d), s0);
        s1 = _mm512_fmadd_ps(wload<D>(w + d + 16), _mm512_loadu_ps(xb + d + 16), s1);
      }
      for (; d < full; d += 16) s0 = _mm512_fmadd_ps(wload<D>(w + d), _mm512_loadu_ps(xb + d), s0);
      if (tail) s1 = _mm512_fmadd_ps(wload<D>(w + d, tail), _mm512_maskz_loadu_ps(tail, xb + d), s1);
      out[b] = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
    }
    return;
  }
#endif
#ifdef ACTSPARSE_HAVE_AVX2
  if (isa >= kAvx2) {
    const int64_t full = Dn & ~int64_t(7);
    for (int64_t b = 0; b < B; ++b) {
      const float* xb = x + b * Dn;
      __m256 s = _mm256_setzero_ps();
      int64_t d = 0;
      for (; d < full; d += 8) s = _mm256_fmadd_ps(wload8<D>(w + d), _mm256_loadu_ps(xb + d), s);
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_movehdup_ps(h));
      out[b] = _mm_cvtss_f32(h) + dot_scalar<D>(w + d, xb + d, Dn - d);
    }
    return;
  }
#endif
  for (int64_t b = 0; b < B; ++b) out[b] = dot_scalar<D>(w, x + b * Dn, Dn);
}

// B == 1, four rows at a time (four independent FMA chains, the AVX-512 path only).
template <class D>
bool dot_rows4(int isa, const typename D::T* w, const int32_t* rows, int64_t count, const float* x, int64_t Dn, float* out) {
#ifdef ACTSPARSE_HAVE_AVX512
  if (isa < kAvx512) return false;
  const int64_t full = Dn & ~int64_t(15);
  const __mmask16 tail = static_cast<__mmask16>((1u << (Dn - full)) - 1);
  for (int64_t i = 0; i < count; i += 4) {
    const typename D::T* w0 = w + (rows ? rows[i] : i) * Dn;
    const typename D::T* w1 = w + (rows ? rows[i + 1] : i + 1) * Dn;
    const typename D::T* w2 = w + (rows ? rows[i + 2] : i + 2) * Dn;
    const typename D::T* w3 = w + (rows ? rows[i + 3] : i + 3) * Dn;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d < full; d += 16) {
      const __m512 xv = _mm512_loadu_ps(x + d);
      s0 = _mm512_fmadd_ps(wload<D>(w0 + d), xv, s0);
      s1 = _mm512_fmadd_ps(wload<D>(w1 + d), xv, s1);
      s2 = _mm512_fmadd_ps(wload<D>(w2 + d), xv, s2);
      s3 = _mm512_fmadd_ps(wload<D>(w3 + d), xv, s3);
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + d);
      s0 = _mm512_fmadd_ps(wload<D>(w0 + d, tail), xv, s0);
      s1 = _mm512_fmadd_ps(wload<D>(w1 + d, tail), xv, s1);
      s2 = _mm512_fmadd_ps(wload<D>(w2 + d, tail), xv, s2);
      s3 = _mm512_fmadd_ps(wload<D>(w3 + d, tail), xv, s3);
    }
    out[i] = _mm512_reduce_add_ps(s0);
    out[i + 1] = _mm512_reduce_add_ps(s1);
    out[i + 2] = _mm512_reduce_add_ps(s2);
    out[i + 3] = _mm512_reduce_add_ps(s3);
  }
  return true;
#else
  (void)isa; (void)w; (void)rows; (void)count; (void)x; (void)Dn; (void)out;
  return false;
#endif
}

template <class D>
void output_sparse_rows(const float* x, const float* a, int64_t B, int64_t J, int64_t Dn, const float* threshold,
                        const void* wv, float* m, int threads) {
  static thread_local std::vector<int32_t> rows;
  const float t = *threshold;
  rows.resize(J);
  int64_t n_rows = 0;
  for (int64_t j = 0; j < J; ++j) {
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      any |= std::fabs(a[b * J + j]) > t;
      m[b * J + j] = 0.0f;
    }
    if (any) rows[n_rows++] = static_cast<int32_t>(j);
  }
  const int isa = current_isa();
  const auto* w = static_cast<const typename D::T*>(wv);
  const int32_t* r = rows.data();
  const int n = resolve_threads(threads);
  const int64_t chunks = chunks_for(n_rows, n, 64);
  pool().run(n, chunks, [&](int64_t i) {
    int64_t begin, end;
    split(n_rows, i, chunks, 4, begin, end);
    std::vector<float> dots(B);
    int64_t k = begin;
    if (B == 1) {
      const int64_t stop = begin + ((end - begin) & ~int64_t(3));
      float out[64];
      while (k < stop) {
        const int64_t count = std::min<int64_t>(64, stop - k);
        if (!dot_rows4<D>(isa, w, r + k, count, x, Dn, out)) break;
        for (int64_t q = 0; q < count; ++q) {
          const int64_t j = r[k + q];
          m[j] = std::fabs(a[j]) > t ? a[j] * out[q] : 0.0f;
        }
        k += count;
      }
    }
    for (; k < end; ++k) {
      const int64_t j = r[k];
      dot_batch<D>(isa, w + j * Dn, x, B, Dn, dots.data());
      for (int64_t b = 0; b < B; ++b) {
        const float aj = a[b * J + j];
        m[b * J + j] = std::fabs(aj) > t ? aj * dots[b] : 0.0f;
      }
    }
  });
}

template <class D>
void dense_rows(const float* x, int64_t B, int64_t Dn, const void* wv, int64_t J, const float* bias, float* y, int threads) {
  const int isa = current_isa();
  const auto* w = static_cast<const typename D::T*>(wv);
  const int n = resolve_threads(threads);
  const int64_t chunks = chunks_for(J, n, 64);
  pool().run(n, chunks, [&](int64_t i) {
    int64_t begin, end;
    split(J, i, chunks, 4, begin, end);
    int64_t j = begin;
    if (B == 1) {
      const int64_t quads = (end - begin) & ~int64_t(3);
      if (dot_rows4<D>(isa, w + begin * Dn, nullptr, quads, x, Dn, y + begin)) j += quads;
    }
    std::vector<float> dots(B);
    for (; j < end; ++j) {
      dot_batch<D>(isa, w + j * Dn, x, B, Dn, dots.data());
      for (int64_t b = 0; b < B; ++b) y[b * J + j] = dots[b];
    }
    if (bias)
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = begin; c < end; ++c) y[b * J + c] += bias[c];
  });
}

template <template <class> class Fn, class... Args>
int by_dtype(int dtype, Args... args) {
  switch (dtype) {
    case kF32: Fn<F32>::run(args...); return 0;
    case kBF16: Fn<BF16>::run(args...); return 0;
    case kF16: Fn<F16>::run(args...); return 0;
    default: return -1;
  }
}

template <class D> struct InputSparseFn { template <class... A> static void run(A... a) { input_sparse<D>(a...); } };
template <class D> struct OutputSparseRowsFn { template <class... A> static void run(A... a) { output_sparse_rows<D>(a...); } };
template <class D> struct DenseRowsFn { template <class... A> static void run(A... a) { dense_rows<D>(a...); } };

}  // namespace

extern "C" {

// The vector path the kernels run: 0 scalar, 1 AVX2 (+FMA, F16C), 2 AVX-512 (F, BW, VL).
int actsparse_cpu_isa(void) { return current_isa(); }

// Run path `isa` (0/1/2) from now on, or the best one again with -1. Returns the path that will
// run, or -1 (nothing changed) when this build or this CPU lacks `isa`.
int actsparse_cpu_set_isa(int isa) {
  const int best = detected_isa();
  if (isa < 0) isa = best;
  if (isa > best) return -1;
  g_isa.store(isa, std::memory_order_relaxed);
  return isa;
}

// input_sparse over `wt` [K, N] (input-major) of dtype `wt_dtype` (0 f32, 1 bf16, 2 f16), with
// `threads` threads (0: one per hardware thread). threshold NULL: dense (every row kept). Returns
// 0, or -1 for an unknown dtype.
int actsparse_input_sparse_ex(const float* x, int64_t B, int64_t K, const float* scale, const float* threshold,
                              int complement, const void* wt, int wt_dtype, int64_t N, const float* bias, float* y,
                              int threads) {
  return by_dtype<InputSparseFn>(wt_dtype, x, B, K, scale, threshold, complement != 0, wt, N, bias, y, threads);
}

// output_sparse_rows over `w` [J, D] (output-major) of dtype `w_dtype`; see above.
int actsparse_output_sparse_rows_ex(const float* x, const float* a, int64_t B, int64_t J, int64_t D,
                                    const float* threshold, const void* w, int w_dtype, float* m, int threads) {
  return by_dtype<OutputSparseRowsFn>(w_dtype, x, a, B, J, D, threshold, w, m, threads);
}

// y[b, j] = bias[j] + dot(x[b, :], w[j, :]): the dense product over `w` [J, D] (nn.Linear's
// layout) of dtype `w_dtype`; bias may be NULL.
int actsparse_dense_rows(const float* x, int64_t B, int64_t D, const void* w, int w_dtype, int64_t J, const float* bias,
                         float* y, int threads) {
  return by_dtype<DenseRowsFn>(w_dtype, x, B, D, w, J, bias, y, threads);
}

}  // extern "C"
