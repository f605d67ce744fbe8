// CPU kernels for decode (batch 1-8): a plain C ABI (cpu_kernels.h) with no torch headers, which
// cpu_torch_ops.cpp registers as the CPU kernels of the actsparse:: ops.
//
// Weights are float32, bfloat16 or float16 (dtype code 0 / 1 / 2); so are activations and outputs
// (the model's dtype: widened to fp32 on entry, rounded once on exit); scales, biases and
// thresholds are float32, and every product is accumulated in float32.
//
// input_sparse: y[b,:] = bias + sum over kept rows k of x_kept[b,k] * wt[k,:], with wt = W.T
// stored input-major, so a kept input channel is one contiguous row (llama.cpp-style axpy over
// the kept rows only; dropped rows are never read). The kept rows are the union over the batch.
// Without a threshold every row is kept: the dense product over the same input-major weights.
// The output is accumulated in column tiles that stay in L1 while the kept rows' segments stream
// through, eight rows at a time; threads split the kept rows (whole rows stream best), each into
// its own partial sum that the caller adds up (or the columns, where too few rows are kept).
//
// output_sparse_rows: m[b,j] = a_kept[b,j] * dot(x[b,:], w[j,:]) for the rows j some token keeps
// (a CATS / ProSparse `up` projection with w output-major); the other rows are never read.
// dense_rows: y[b,j] = bias[j] + dot(x[b,:], w[j,:]) for every row (nn.Linear's layout, e.g. the
// tied lm_head). Threads split the rows.
// decode_attention: a decode step's attention over a static KV cache, reading only the keys and
// values the mask keeps (see its definition).
//
// Vector code: AVX-512 or AVX2 + F16C (one template over the vector width; bf16 widened by a
// 16-bit shift and a mask, even and odd values apart, fp16 by vcvtph2ps), or
// scalar, picked at run time (__builtin_cpu_supports) among the paths this build compiled in; the
// library is compiled per machine with -march=native (cpu_ops.py), so a path is compiled in
// exactly when the build machine has it, and actsparse_cpu_set_isa can force a lower one (tests).
// AVX-512 BF16's vdpbf16ps is not used: it would round the activations to bf16, and the kernels
// are bound by memory bandwidth, which the shift-widening already saturates: what made them so
// was software prefetch into L2 of the rows ahead (a row segment is a stream of a few dozen
// lines, too short for the hardware prefetcher), which took the bf16 kernels from ~50% of a
// plain streaming read's bandwidth to ~95%.
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
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "cpu_kernels.h"

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
std::atomic<int> g_threads{1};

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

// ---------------------------------------------------------------- vector paths: blocks of 2 x lanes weights
//
// A vector path reads weights in blocks of W = 2 * lanes values, widened to two fp32 vectors
// (`pair`). fp32 and fp16 blocks come out in order (the first `lanes` values, then the rest);
// a bf16 block is one W-value load split by 32-bit lane into its even and its odd values (bf16 to
// fp32 is a 16-bit shift of the low half, a mask of the high half: two simple ops per 32 bytes,
// no cross-lane widening), so it comes out as (even values, odd values). Whatever meets a block
// in the same order: activations are laid out the same way once per call (`to_block_order`), and
// output accumulators stay in block order until they are written out.

template <class D> constexpr bool kSplit = std::is_same_v<D, BF16>;

// Where value i of a block sits in block order.
template <class D, int L>
inline int64_t block_pos(int64_t i) {
  if constexpr (kSplit<D>) return (i & 1) * L + (i >> 1); else return i;
}

// e^(x - n ln2) for n = round(x / ln2), so that e^x is this times 2^n: Cephes' expf polynomial,
// ~1 ulp; ln2 is split in two so that x - n ln2 keeps fp32 precision.
template <class V>
inline typename V::vec exp_poly(typename V::vec x, typename V::vec n) {
  using vec = typename V::vec;
  vec r = V::fma(n, V::set1(-0.693359375f), x);
  r = V::fma(n, V::set1(2.12194440e-4f), r);
  vec p = V::set1(1.9875691500e-4f);
  p = V::fma(p, r, V::set1(1.3981999507e-3f));
  p = V::fma(p, r, V::set1(8.3334519073e-3f));
  p = V::fma(p, r, V::set1(4.1665795894e-2f));
  p = V::fma(p, r, V::set1(1.6666665459e-1f));
  p = V::fma(p, r, V::set1(5.0000001201e-1f));
  return V::fma(V::mul(p, r), r, V::add(r, V::set1(1.0f)));
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define ACTSPARSE_HAVE_AVX512 1
struct V512 {
  using vec = __m512;
  static constexpr int lanes = 16;
  static vec zero() { return _mm512_setzero_ps(); }
  static vec set1(float v) { return _mm512_set1_ps(v); }
  static vec load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, vec v) { _mm512_storeu_ps(p, v); }
  static vec fma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
  static vec mul(vec a, vec b) { return _mm512_mul_ps(a, b); }
  static float sum(vec a, vec b) { return _mm512_reduce_add_ps(_mm512_add_ps(a, b)); }
  static float sum(vec a) { return _mm512_reduce_add_ps(a); }
  static vec add(vec a, vec b) { return _mm512_add_ps(a, b); }
  static vec max(vec a, vec b) { return _mm512_max_ps(a, b); }
  static vec div(vec a, vec b) { return _mm512_div_ps(a, b); }
  static vec abs(vec a) { return _mm512_abs_ps(a); }
  static vec where_nonnegative(vec g, vec a, vec b) {  // a where g >= 0, else b
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, zero(), _CMP_GE_OQ), b, a);
  }
  static float max(vec a) { return _mm512_reduce_max_ps(a); }
  // e^x for x <= 0 (see exp_poly); 0 below -87, where e^x leaves the normal floats.
  static vec exp_nonpositive(vec x) {
    const __mmask16 under = _mm512_cmp_ps_mask(x, set1(-87.0f), _CMP_LT_OQ);
    x = _mm512_max_ps(x, set1(-87.0f));
    const vec n = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(exp_poly<V512>(x, n), n));
  }
  template <class D> static void pair(const typename D::T* p, vec& lo, vec& hi) {
    if constexpr (std::is_same_v<D, F32>) {
      lo = _mm512_loadu_ps(p);
      hi = _mm512_loadu_ps(p + 16);
    } else if constexpr (std::is_same_v<D, BF16>) {
      const __m512i v = _mm512_loadu_si512(p);
      lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
    } else {
      lo = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      hi = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
    }
  }
};
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define ACTSPARSE_HAVE_AVX2 1
struct V256 {
  using vec = __m256;
  static constexpr int lanes = 8;
  static vec zero() { return _mm256_setzero_ps(); }
  static vec set1(float v) { return _mm256_set1_ps(v); }
  static vec load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, vec v) { _mm256_storeu_ps(p, v); }
  static vec fma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
  static vec mul(vec a, vec b) { return _mm256_mul_ps(a, b); }
  static float sum(vec a, vec b) {
    const __m256 s = _mm256_add_ps(a, b);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
  static float sum(vec a) { return sum(a, zero()); }
  static vec add(vec a, vec b) { return _mm256_add_ps(a, b); }
  static vec max(vec a, vec b) { return _mm256_max_ps(a, b); }
  static vec div(vec a, vec b) { return _mm256_div_ps(a, b); }
  static vec abs(vec a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static vec where_nonnegative(vec g, vec a, vec b) {
    return _mm256_blendv_ps(a, b, _mm256_cmp_ps(g, zero(), _CMP_LT_OQ));
  }
  static float max(vec a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  }
  static vec exp_nonpositive(vec x) {
    const vec under = _mm256_cmp_ps(x, set1(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(x, set1(-87.0f));
    const vec n = _mm256_round_ps(_mm256_mul_ps(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(under, _mm256_mul_ps(exp_poly<V256>(x, n), _mm256_castsi256_ps(pow2n)));
  }
  template <class D> static void pair(const typename D::T* p, vec& lo, vec& hi) {
    if constexpr (std::is_same_v<D, F32>) {
      lo = _mm256_loadu_ps(p);
      hi = _mm256_loadu_ps(p + 8);
    } else if constexpr (std::is_same_v<D, BF16>) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    } else {
      lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    }
  }
};
#endif

// The cache lines of the block at p, into L2: a prefetch into L1 would evict the lines being
// read (half the bandwidth of the L2 hint here).
template <class V, class D>
inline void prefetch_block(const typename D::T* p) {
  constexpr int64_t bytes = 2 * V::lanes * sizeof(typename D::T);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + o, _MM_HINT_T1);
}

// The first `n` (< W) values of a block, the rest zero.
template <class V, class D>
inline void pair_tail(const typename D::T* p, int64_t n, typename V::vec& lo, typename V::vec& hi) {
  typename D::T buf[2 * V::lanes] = {};
  std::memcpy(buf, p, n * sizeof(typename D::T));
  V::template pair<D>(buf, lo, hi);
}

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
// items a chunk, at most 8 chunks a thread, a whole number of chunks a thread where there are at
// least as many chunks as threads (3 chunks on 2 threads would take 2 chunks' time).
int64_t chunks_for(int64_t total, int threads, int64_t min_items) {
  if (threads <= 1) return 1;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(total / min_items, 8 * threads));
  return chunks < threads ? chunks : chunks / threads * threads;
}

// [begin, end) of part `i` of `n` over `total` items, in whole multiples of `align`.
inline void split(int64_t total, int64_t i, int64_t n, int64_t align, int64_t& begin, int64_t& end) {
  const int64_t units = (total + align - 1) / align;
  begin = std::min(total, units * i / n * align);
  end = std::min(total, units * (i + 1) / n * align);
}

// ---------------------------------------------------------------- input-sparse (axpy over kept rows)

#ifdef ACTSPARSE_HAVE_AVX512
// compact for one token: sixteen scores a compare, the kept rows and values packed by a register
// compress (vpcompressd to memory is microcoded on some CPUs); writes up to 16 entries past the
// last kept one.
int64_t compact_one_avx512(const float* x, int64_t K, const float* scale, float t, int32_t* rows, float* xk) {
  const __m512 tv = _mm512_set1_ps(t);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 valid = K - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(valid, x + k);
    __m512 score = _mm512_abs_ps(v);
    if (scale) score = _mm512_mul_ps(score, _mm512_maskz_loadu_ps(valid, scale + k));
    const __mmask16 kept = valid & _mm512_cmp_ps_mask(score, tv, _CMP_GT_OQ);
    const __m512i index = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(k)), iota);
    _mm512_storeu_si512(rows + n, _mm512_maskz_compress_epi32(kept, index));
    _mm512_storeu_ps(xk + n, _mm512_maskz_compress_ps(kept, v));
    n += __builtin_popcount(kept);
  }
  return n;
}
#endif

// Kept rows (union over the batch) and the kept inputs, row by row: xk[j * B + b]. With no
// threshold every row is kept.
int64_t compact(int isa, const float* x, int64_t B, int64_t K, const float* scale, const float* threshold,
                std::vector<int32_t>& rows_buffer, std::vector<float>& xk_buffer) {
  rows_buffer.resize(K + 16);  // room for compact_one_avx512's overrun
  xk_buffer.resize(K * B + 16);
  int32_t* rows = rows_buffer.data();
  float* xk = xk_buffer.data();
  if (!threshold) {
    for (int64_t k = 0; k < K; ++k) {
      rows[k] = static_cast<int32_t>(k);
      for (int64_t b = 0; b < B; ++b) xk[k * B + b] = x[b * K + k];
    }
    return K;
  }
  const float t = *threshold;
#ifdef ACTSPARSE_HAVE_AVX512
  if (B == 1 && isa >= kAvx512) return compact_one_avx512(x, K, scale, t, rows, xk);
#endif
  int64_t n = 0;
  for (int64_t k = 0; k < K; ++k) {  // branch-free: a kept row is written and then counted
    bool any = false;
    for (int64_t b = 0; b < B; ++b) {
      const float v = x[b * K + k];
      const float score = scale ? std::fabs(v) * scale[k] : std::fabs(v);
      const bool kb = score > t;
      xk[n * B + b] = kb ? v : 0.0f;
      any |= kb;
    }
    rows[n] = static_cast<int32_t>(k);
    n += any;
  }
  return n;
}

// acc[b * ld + c] += sum_j xk[j * B + b] * wt[rows[j], c0 + c] for c < len (natural order).
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

// R kept rows j.. of the vector axpy: acc (block order) += x * their segments [c0, c0 + len).
template <class V, class D, int R>
inline void axpy_rows(const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t j,
                      int64_t n_rows, int64_t B, int64_t c0, int64_t len, float* acc, int64_t ld) {
  using vec = typename V::vec;
  constexpr int L = V::lanes, W = 2 * L;
  const typename D::T *w[R], *next[R];
  // The segments of the next R rows are prefetched block by block alongside: each row's segment
  // is a short stream (a few dozen lines) that the hardware prefetcher barely ramps up on.
  const bool more = j + 2 * R <= n_rows;
  for (int r = 0; r < R; ++r) {
    w[r] = wt + rows[j + r] * N + c0;
    next[r] = more ? wt + rows[j + R + r] * N + c0 : w[r];
  }
  const int64_t full = len / W * W;
  for (int64_t b = 0; b < B; ++b) {
    vec x[R];
    for (int r = 0; r < R; ++r) x[r] = V::set1(xk[(j + r) * B + b]);
    float* a = acc + b * ld;
    int64_t c = 0;
    for (; c < full; c += W) {
      vec s0 = V::load(a + c), s1 = V::load(a + c + L), lo, hi;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        if (b == 0) prefetch_block<V, D>(next[r] + c);
        V::template pair<D>(w[r] + c, lo, hi);
        s0 = V::fma(x[r], lo, s0);
        s1 = V::fma(x[r], hi, s1);
      }
      V::store(a + c, s0);
      V::store(a + c + L, s1);
    }
    if (c < len) {
      vec s0 = V::load(a + c), s1 = V::load(a + c + L), lo, hi;
      for (int r = 0; r < R; ++r) {
        pair_tail<V, D>(w[r] + c, len - c, lo, hi);
        s0 = V::fma(x[r], lo, s0);
        s1 = V::fma(x[r], hi, s1);
      }
      V::store(a + c, s0);
      V::store(a + c + L, s1);
    }
  }
}

// The vector axpy: acc in block order, len rounded up to whole blocks of room; eight rows a
// trip over the accumulators (one load and store of them per eight rows' FMAs).
template <class V, class D>
void axpy_vec(const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows, int64_t B,
              int64_t c0, int64_t len, float* acc, int64_t ld) {
  int64_t j = 0;
  for (; j + 8 <= n_rows; j += 8) axpy_rows<V, D, 8>(wt, N, rows, xk, j, n_rows, B, c0, len, acc, ld);
  for (; j + 4 <= n_rows; j += 4) axpy_rows<V, D, 4>(wt, N, rows, xk, j, n_rows, B, c0, len, acc, ld);
  for (; j < n_rows; ++j) axpy_rows<V, D, 1>(wt, N, rows, xk, j, n_rows, B, c0, len, acc, ld);
}

// Output columns [c_begin, c_end) of input_sparse over vector path V, in tiles whose
// accumulators (B x tile floats, block order) stay within 16 KB of L1.
template <class V, class D>
void input_sparse_columns_vec(const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows,
                              int64_t B, const float* bias, float* y, int64_t c_begin, int64_t c_end) {
  constexpr int L = V::lanes, W = 2 * L;
  const int64_t tile = std::max<int64_t>(2 * W, (4096 / B) / W * W);
  static thread_local std::vector<float> acc_buffer;
  acc_buffer.resize(B * tile);
  float* acc = acc_buffer.data();
  for (int64_t c0 = c_begin; c0 < c_end; c0 += tile) {
    const int64_t len = std::min(tile, c_end - c0);
    std::fill(acc, acc + B * tile, 0.0f);
    axpy_vec<V, D>(wt, N, rows, xk, n_rows, B, c0, len, acc, tile);
    for (int64_t b = 0; b < B; ++b) {
      const float* a = acc + b * tile;
      float* out = y + b * N + c0;
      for (int64_t c = 0; c < len; ++c) out[c] = a[c / W * W + block_pos<D, L>(c % W)] + (bias ? bias[c0 + c] : 0.0f);
    }
  }
}

template <class D>
void input_sparse_columns_scalar(const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows,
                                 int64_t B, const float* bias, float* y, int64_t c_begin, int64_t c_end) {
  const int64_t len = c_end - c_begin;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < len; ++c) y[b * N + c_begin + c] = bias ? bias[c_begin + c] : 0.0f;
  axpy_scalar<D>(wt, N, rows, xk, n_rows, B, c_begin, len, y + c_begin, N);
}

template <class D>
void input_sparse_columns(int isa, const typename D::T* wt, int64_t N, const int32_t* rows, const float* xk, int64_t n_rows,
                          int64_t B, const float* bias, float* y, int64_t c_begin, int64_t c_end) {
#ifdef ACTSPARSE_HAVE_AVX512
  if (isa >= kAvx512) return input_sparse_columns_vec<V512, D>(wt, N, rows, xk, n_rows, B, bias, y, c_begin, c_end);
#endif
#ifdef ACTSPARSE_HAVE_AVX2
  if (isa >= kAvx2) return input_sparse_columns_vec<V256, D>(wt, N, rows, xk, n_rows, B, bias, y, c_begin, c_end);
#endif
  input_sparse_columns_scalar<D>(wt, N, rows, xk, n_rows, B, bias, y, c_begin, c_end);
}

template <class D>
void input_sparse(const float* x, int64_t B, int64_t K, const float* scale, const float* threshold, const void* wt,
                  int64_t N, const float* bias, float* y, int threads) {
  static thread_local std::vector<int32_t> rows;
  static thread_local std::vector<float> xk;
  const int isa = current_isa();
  const int64_t n_rows = compact(isa, x, B, K, scale, threshold, rows, xk);
  const auto* w = static_cast<const typename D::T*>(wt);
  const int n = resolve_threads(threads);
  const int32_t* r = rows.data();
  const float* xkp = xk.data();
  if (n > 1 && n_rows >= 16 * n) {
    // Threads split the kept rows, each summing whole rows (the longest contiguous streams, and
    // equal shares) into its own [B, N] partial sum; the caller adds the partials up.
    static thread_local std::vector<float> partial;
    partial.resize(n * B * N);
    float* p = partial.data();
    pool().run(n, n, [&](int64_t i) {
      int64_t begin, end;
      split(n_rows, i, n, 8, begin, end);
      input_sparse_columns<D>(isa, w, N, r + begin, xkp + begin * B, end - begin, B, nullptr, p + i * B * N, 0, N);
    });
    for (int64_t e = 0; e < B * N; ++e) {
      float sum = bias ? bias[e % N] : 0.0f;
      for (int t = 0; t < n; ++t) sum += p[t * B * N + e];
      y[e] = sum;
    }
    return;
  }
  const int64_t chunks = chunks_for(N, n, 256);
  pool().run(n, chunks, [&](int64_t i) {
    int64_t begin, end;
    split(N, i, chunks, 32, begin, end);
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

// dot(xs, w[r]) for R rows at once over vector path V; xs in block order, zero-padded to whole
// blocks. Two accumulators a row: 2R independent FMA chains.
template <class V, class D, int R, bool Prefetch = true>
inline void dots_vec(const typename D::T* const* w, const typename D::T* const* next, const float* xs, int64_t K,
                     float* out) {
  using vec = typename V::vec;
  constexpr int L = V::lanes, W = 2 * L;
  const int64_t full = K / W * W;
  vec s0[R], s1[R];
  for (int r = 0; r < R; ++r) s0[r] = s1[r] = V::zero();
  int64_t d = 0;
  for (; d < full; d += W) {
    const vec x0 = V::load(xs + d), x1 = V::load(xs + d + L);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      vec lo, hi;
      if constexpr (Prefetch) prefetch_block<V, D>(next[r] + d);
      V::template pair<D>(w[r] + d, lo, hi);
      s0[r] = V::fma(lo, x0, s0[r]);
      s1[r] = V::fma(hi, x1, s1[r]);
    }
  }
  if (d < K) {
    const vec x0 = V::load(xs + d), x1 = V::load(xs + d + L);
    for (int r = 0; r < R; ++r) {
      vec lo, hi;
      pair_tail<V, D>(w[r] + d, K - d, lo, hi);
      s0[r] = V::fma(lo, x0, s0[r]);
      s1[r] = V::fma(hi, x1, s1[r]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = V::sum(s0[r], s1[r]);
}

// x [B, K] in block order for vector path `isa` (zero-padded to whole blocks: row stride
// `padded`), or as it is for the scalar path.
template <class D>
const float* to_block_order(int isa, const float* x, int64_t B, int64_t K, int64_t& stride) {
  stride = K;
  if (isa == kScalar) return x;
  const int W = isa >= kAvx512 ? 32 : 16, L = W / 2;
  static thread_local std::vector<float> buffer;
  stride = (K + W - 1) / W * W;
  buffer.assign(B * stride, 0.0f);
  float* xs = buffer.data();  // (a thread_local costs a call per use)
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < K; ++d)
      xs[b * stride + d / W * W + (L == 16 ? block_pos<D, 16>(d % W) : block_pos<D, 8>(d % W))] = x[b * K + d];
  return xs;
}

// Rows are read four at a time, and the rows two groups ahead prefetched alongside (a group's
// four rows are four short streams the hardware prefetcher barely ramps up on).
constexpr int64_t kDotRows = 4, kDotAhead = 8;

// dot(x[b], w[rows[q]]) for q < count (count <= 4) into out[q * B + b]; rows ahead[0..n_ahead)
// (n_ahead <= 4) are prefetched alongside.
template <class D>
void dots(int isa, const typename D::T* w, const int32_t* rows, int64_t count, const int32_t* ahead_rows,
          int64_t n_ahead, const float* xs, int64_t stride, int64_t B, int64_t K, float* out) {
  const typename D::T *p[4], *next[4];
  for (int64_t q = 0; q < count; ++q) p[q] = w + static_cast<int64_t>(rows[q]) * K;
  for (int64_t q = 0; q < 4; ++q) next[q] = q < n_ahead ? w + static_cast<int64_t>(ahead_rows[q]) * K : p[0];
  float d4[4];
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = xs + b * stride;
    const typename D::T* const* ahead = b == 0 ? next : p;  // later tokens find the rows in L1
#ifdef ACTSPARSE_HAVE_AVX512
    if (isa >= kAvx512) {
      if (count == 4) dots_vec<V512, D, 4>(p, ahead, xb, K, d4);
      else for (int64_t q = 0; q < count; ++q) dots_vec<V512, D, 1>(p + q, p + q, xb, K, d4 + q);
      for (int64_t q = 0; q < count; ++q) out[q * B + b] = d4[q];
      continue;
    }
#endif
#ifdef ACTSPARSE_HAVE_AVX2
    if (isa >= kAvx2) {
      if (count == 4) dots_vec<V256, D, 4>(p, ahead, xb, K, d4);
      else for (int64_t q = 0; q < count; ++q) dots_vec<V256, D, 1>(p + q, p + q, xb, K, d4 + q);
      for (int64_t q = 0; q < count; ++q) out[q * B + b] = d4[q];
      continue;
    }
#endif
    for (int64_t q = 0; q < count; ++q) out[q * B + b] = dot_scalar<D>(p[q], xb, K);
  }
}

// dot(x[b], row) for every token b into out[b], with no software prefetch (see dense_rows).
template <class D>
void dots_one_row(int isa, const typename D::T* row, const float* xs, int64_t stride, int64_t B, int64_t K, float* out) {
  for (int64_t b = 0; b < B; ++b) {
#ifdef ACTSPARSE_HAVE_AVX512
    if (isa >= kAvx512) {
      dots_vec<V512, D, 1, false>(&row, &row, xs + b * stride, K, out + b);
      continue;
    }
#endif
#ifdef ACTSPARSE_HAVE_AVX2
    if (isa >= kAvx2) {
      dots_vec<V256, D, 1, false>(&row, &row, xs + b * stride, K, out + b);
      continue;
    }
#endif
    out[b] = dot_scalar<D>(row, xs + b * stride, K);
  }
}

template <class D>
void output_sparse_rows(const float* x, const float* a, int64_t B, int64_t J, int64_t Dn, const float* threshold,
                        const void* wv, float* m, int threads) {
  static thread_local std::vector<int32_t> rows_buffer;
  const float t = *threshold;
  rows_buffer.resize(J);
  int32_t* rows = rows_buffer.data();  // (a thread_local costs a call per use)
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
  int64_t stride;
  const float* xs = to_block_order<D>(isa, x, B, Dn, stride);
  const auto* w = static_cast<const typename D::T*>(wv);
  const int32_t* r = rows;
  const int n = resolve_threads(threads);
  const int64_t chunks = chunks_for(n_rows, n, 64);
  pool().run(n, chunks, [&](int64_t i) {
    int64_t begin, end;
    split(n_rows, i, chunks, 4, begin, end);
    float out[32];
    for (int64_t k = begin; k < end; k += kDotRows) {
      const int64_t count = std::min(kDotRows, end - k);
      const int64_t n_ahead = std::clamp<int64_t>(end - k - kDotAhead, 0, kDotRows);
      dots<D>(isa, w, r + k, count, r + k + kDotAhead, n_ahead, xs, stride, B, Dn, out);
      for (int64_t q = 0; q < count; ++q) {
        const int64_t j = r[k + q];
        for (int64_t b = 0; b < B; ++b) {
          const float aj = a[b * J + j];
          m[b * J + j] = std::fabs(aj) > t ? aj * out[q * B + b] : 0.0f;
        }
      }
    }
  });
}

template <class D>
void dense_rows(const float* x, int64_t B, int64_t Dn, const void* wv, int64_t J, const float* bias, float* y, int threads) {
  const int isa = current_isa();
  int64_t stride;
  const float* xs = to_block_order<D>(isa, x, B, Dn, stride);
  const auto* w = static_cast<const typename D::T*>(wv);
  const int n = resolve_threads(threads);
  const int64_t chunks = chunks_for(J, n, 64);
  pool().run(n, chunks, [&](int64_t i) {
    int64_t begin, end;
    split(J, i, chunks, 4, begin, end);
    float out[32];
    if constexpr (std::is_same_v<D, F32>) {
      // fp32 rows read one after another are one sequential stream, which the hardware
      // prefetcher follows at ~95% of a plain streaming read; four rows at a time with software
      // prefetch (the 16-bit path below, ~95% there) reach only ~75% in fp32.
      for (int64_t j = begin; j < end; ++j) {
        dots_one_row<D>(isa, w + j * Dn, xs, stride, B, Dn, out);
        for (int64_t b = 0; b < B; ++b) y[b * J + j] = out[b] + (bias ? bias[j] : 0.0f);
      }
      return;
    }
    for (int64_t j = begin; j < end; j += kDotRows) {
      int32_t rows[kDotRows], ahead[kDotRows];
      for (int64_t q = 0; q < kDotRows; ++q) {
        rows[q] = static_cast<int32_t>(j + q);
        ahead[q] = static_cast<int32_t>(j + kDotAhead + q);
      }
      const int64_t count = std::min(kDotRows, end - j);
      const int64_t n_ahead = std::clamp<int64_t>(end - j - kDotAhead, 0, kDotRows);
      dots<D>(isa, w, rows, count, ahead, n_ahead, xs, stride, B, Dn, out);
      for (int64_t q = 0; q < count; ++q)
        for (int64_t b = 0; b < B; ++b) y[b * J + j + q] = out[q * B + b] + (bias ? bias[j + q] : 0.0f);
    }
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

// y [B, N] (fp32) += z [B, R] (fp32) times b^T, b [N, R] (dtype D) row-major: the low-rank term of
// R-Sparse. In C++ rather than ATen's addmm, which took transposes, dtype conversions and a
// rounding of its own around each of ~200 calls a SmolLM2 step.
template <class D>
void add_lowrank(float* y, const float* z, const void* b, int64_t B, int64_t N, int64_t R) {
  const auto* w = static_cast<const typename D::T*>(b);
  for (int64_t t = 0; t < B; ++t) {
    const float* zt = z + t * R;
    float* yt = y + t * N;
    for (int64_t n = 0; n < N; ++n) {
      const typename D::T* row = w + n * R;
      float acc = 0.0f;
      for (int64_t r = 0; r < R; ++r) acc += zt[r] * D::get(row + r);
      yt[n] += acc;
    }
  }
}
template <class D> struct AddLowrankFn { template <class... A> static void run(A... a) { add_lowrank<D>(a...); } };

// ---------------------------------------------------------------- decode attention
//
// out[b, i, h, :] = sum over attended l of p[l] * v[b, h / G, l, :], p = softmax over l of
// cap(scale * dot(q[b, h, i, :], k[b, h / G, l, :])) + add[l] (G = Hq / Hkv query heads per KV head,
// cap(s) = softcap * tanh(s / softcap) when softcap > 0). Keys a boolean mask drops are never read,
// so a static cache costs only its filled positions; a query with nothing to attend gets zeros.
// q is [B, Hq, Q, D], k and v [B, Hkv, L, D], contiguous; mask element (b, h, i, l) sits at
// b * ms[0] + h * ms[1] + i * ms[2] + l * ms[3] (0 strides where it broadcasts); `out` [B, Q, Hq, D].
// Threads split the (b, h, i) rows.
enum MaskKind : int { kNoMask = 0, kBoolMask = 1, kAddMask = 2 };

// One query row of decode_attention: its scores, softmax and weighted sum of values.
struct AttentionRow {
  const void* mask;
  int mask_kind;
  int64_t m_offset, m_stride, L, Dh;
  float scale, softcap;
  bool attended(int64_t l) const {
    return mask_kind != kBoolMask || static_cast<const bool*>(mask)[m_offset + l * m_stride];
  }
  float add(int64_t l) const {
    return mask_kind == kAddMask ? static_cast<const float*>(mask)[m_offset + l * m_stride] : 0.0f;
  }
  float cap(float dot) const { return softcap > 0.0f ? softcap * std::tanh(dot / softcap) : dot; }
};

template <class D>
void attention_row_scalar(const AttentionRow& a, const typename D::T* qp, const typename D::T* k, const typename D::T* v,
                          float* o) {
  static thread_local std::vector<float> buffer;
  buffer.assign(a.L + 2 * a.Dh, 0.0f);
  float *s = buffer.data(), *qf = s + a.L, *acc = qf + a.Dh;  // (thread_local costs a call per use)
  for (int64_t d = 0; d < a.Dh; ++d) qf[d] = D::get(qp + d) * a.scale;
  float top = -INFINITY;
  for (int64_t l = 0; l < a.L; ++l) {
    if (!a.attended(l)) {
      s[l] = -INFINITY;
      continue;
    }
    float dot = 0.0f;
    for (int64_t d = 0; d < a.Dh; ++d) dot += qf[d] * D::get(k + l * a.Dh + d);
    s[l] = a.cap(dot) + a.add(l);
    top = std::max(top, s[l]);
  }
  float total = 0.0f;
  if (top != -INFINITY) {
    for (int64_t l = 0; l < a.L; ++l) {
      if (s[l] == -INFINITY) continue;
      const float p = std::exp(s[l] - top);
      total += p;
      for (int64_t d = 0; d < a.Dh; ++d) acc[d] += p * D::get(v + l * a.Dh + d);
    }
  }
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  for (int64_t d = 0; d < a.Dh; ++d) o[d] = acc[d] * inv;
}

// The vector path: q in block order (as dots_vec reads it), four keys' scores at a time, the
// exponentials a vector of scores at a time, and the values' weighted sum one block of the head
// dimension at a time, its accumulators in registers across the attended keys.
template <class V, class D>
void attention_row_vec(const AttentionRow& a, const typename D::T* qp, const typename D::T* k, const typename D::T* v,
                       float* o) {
  using T = typename D::T;
  using vec = typename V::vec;
  constexpr int L = V::lanes, W = 2 * L;
  const int64_t padded = (a.Dh + W - 1) / W * W, n_scores = (a.L + L - 1) / L * L;
  static thread_local std::vector<float> buffer;
  static thread_local std::vector<int32_t> keys_buffer;
  buffer.resize(n_scores + padded);
  keys_buffer.resize(a.L);
  float *s = buffer.data(), *qs = s + n_scores;  // (a thread_local costs a call per use)
  int32_t* keys = keys_buffer.data();
  std::fill(s, s + n_scores, -INFINITY);
  std::fill(qs, qs + padded, 0.0f);
  for (int64_t d = 0; d < a.Dh; ++d) qs[d / W * W + block_pos<D, L>(d % W)] = D::get(qp + d) * a.scale;
  int64_t n_keys = 0;
  for (int64_t l = 0; l < a.L; ++l)
    if (a.attended(l)) keys[n_keys++] = static_cast<int32_t>(l);
  int64_t j = 0;
  float dot[4];
  for (; j + 4 <= n_keys; j += 4) {
    const T* kp[4];
    for (int r = 0; r < 4; ++r) kp[r] = k + keys[j + r] * a.Dh;
    dots_vec<V, D, 4, false>(kp, kp, qs, a.Dh, dot);
    for (int r = 0; r < 4; ++r) s[keys[j + r]] = a.cap(dot[r]) + a.add(keys[j + r]);
  }
  for (; j < n_keys; ++j) {
    const T* kp = k + keys[j] * a.Dh;
    dots_vec<V, D, 1, false>(&kp, &kp, qs, a.Dh, dot);
    s[keys[j]] = a.cap(dot[0]) + a.add(keys[j]);
  }
  vec top_v = V::set1(-INFINITY);
  for (int64_t l = 0; l < n_scores; l += L) top_v = V::max(top_v, V::load(s + l));
  const float top = V::max(top_v);
  if (top == -INFINITY) {
    std::fill(o, o + a.Dh, 0.0f);
    return;
  }
  vec sum = V::zero();
  for (int64_t l = 0; l < n_scores; l += L) {
    const vec p = V::exp_nonpositive(V::add(V::load(s + l), V::set1(-top)));
    V::store(s + l, p);
    sum = V::add(sum, p);
  }
  const float inv = 1.0f / V::sum(sum);
  for (int64_t d = 0; d < a.Dh; d += W) {
    vec acc0 = V::zero(), acc1 = V::zero(), lo, hi;
    const bool whole = d + W <= a.Dh;
    for (j = 0; j < n_keys; ++j) {
      const T* vp = v + keys[j] * a.Dh + d;
      if (whole) V::template pair<D>(vp, lo, hi); else pair_tail<V, D>(vp, a.Dh - d, lo, hi);
      const vec p = V::set1(s[keys[j]]);
      acc0 = V::fma(p, lo, acc0);
      acc1 = V::fma(p, hi, acc1);
    }
    float block[W];
    V::store(block, acc0);
    V::store(block + L, acc1);
    for (int64_t e = d; e < std::min(d + W, a.Dh); ++e) o[e] = block[block_pos<D, L>(e - d)] * inv;
  }
}

template <class D>
void decode_attention(const void* qv, const void* kv, const void* vv, int64_t B, int64_t Hq, int64_t Hkv, int64_t Q,
                      int64_t L, int64_t Dh, const void* mask, int mask_kind, const int64_t* ms, float scale,
                      float softcap, float* out, int threads) {
  using T = typename D::T;
  const auto* q = static_cast<const T*>(qv);
  const auto* k = static_cast<const T*>(kv);
  const auto* v = static_cast<const T*>(vv);
  const int64_t groups = Hq / Hkv, tasks = B * Hq * Q;
  const int isa = current_isa();
  const int n = resolve_threads(threads);
  const int64_t chunks = n <= 1 ? 1 : std::min<int64_t>(tasks, 4 * n);
  pool().run(n, chunks, [&](int64_t c) {
    int64_t begin, end;
    split(tasks, c, chunks, 1, begin, end);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / (Hq * Q), h = t / Q % Hq, i = t % Q;
      const AttentionRow row{mask, mask_kind, b * ms[0] + h * ms[1] + i * ms[2], ms[3], L, Dh, scale, softcap};
      const T* qp = q + ((b * Hq + h) * Q + i) * Dh;
      const int64_t kv_offset = (b * Hkv + h / groups) * L * Dh;
      float* o = out + ((b * Q + i) * Hq + h) * Dh;
#ifdef ACTSPARSE_HAVE_AVX512
      if (isa >= kAvx512) {
        attention_row_vec<V512, D>(row, qp, k + kv_offset, v + kv_offset, o);
        continue;
      }
#endif
#ifdef ACTSPARSE_HAVE_AVX2
      if (isa >= kAvx2) {
        attention_row_vec<V256, D>(row, qp, k + kv_offset, v + kv_offset, o);
        continue;
      }
#endif
      attention_row_scalar<D>(row, qp, k + kv_offset, v + kv_offset, o);
    }
  });
}

template <class D> struct DecodeAttentionFn { template <class... A> static void run(A... a) { decode_attention<D>(a...); } };

// ---------------------------------------------------------------- activations of the model's dtype

bool known_dtype(int dtype) { return dtype == kF32 || dtype == kBF16 || dtype == kF16; }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline uint16_t f32_to_f16(float f) {  // round to nearest even, with subnormals, infinities and NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7e00u;
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to >= 65520: infinity
  if (a < 0x38800000u) {  // below 2^-14: a subnormal half (or zero), rounded at 2^-24
    float mag;
    std::memcpy(&mag, &a, 4);
    return sign | static_cast<uint16_t>(std::nearbyint(mag * 16777216.0f));
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);
  return sign | static_cast<uint16_t>((r - 0x38000000u) >> 13);
}

// An fp32 view of an activation tensor: the tensor itself, or (bf16 / f16) a widened copy in
// per-thread buffer `slot`.
struct Activations {
  const float* data;
  Activations(const void* p, int64_t n, int dtype, int slot) {
    if (dtype == kF32) {
      data = static_cast<const float*>(p);
      return;
    }
    static thread_local std::vector<float> buffers[2];
    std::vector<float>& buf = buffers[slot];
    buf.resize(n);
    const auto* h = static_cast<const uint16_t*>(p);
    for (int64_t i = 0; i < n; ++i) buf[i] = dtype == kBF16 ? bf16_to_f32(h[i]) : f16_to_f32(h[i]);
    data = buf.data();
  }
};

// fp32 values v[0, n) into out[offset, offset + n) of dtype `dtype` (rounded to nearest even).
inline void store_activations(const float* v, int64_t n, void* out, int64_t offset, int dtype) {
  if (dtype == kF32) {
    std::memcpy(static_cast<float*>(out) + offset, v, n * sizeof(float));
    return;
  }
  auto* h = static_cast<uint16_t*>(out) + offset;
  for (int64_t i = 0; i < n; ++i) h[i] = dtype == kBF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
}

// Where a kernel writes its fp32 output: the output itself, or (bf16 / f16) a buffer that
// `finish` rounds into it.
struct Output {
  float* data;
  void* target;
  int64_t n;
  int dtype;
  Output(void* p, int64_t count, int dt) : target(p), n(count), dtype(dt) {
    static thread_local std::vector<float> buf;
    if (dtype == kF32) {
      data = static_cast<float*>(p);
    } else {
      buf.resize(n);
      data = buf.data();
    }
  }
  void finish() const {
    if (dtype != kF32) store_activations(data, n, target, 0, dtype);
  }
};

// ---------------------------------------------------------------- act(gate) * up

constexpr int kSilu = ACTSPARSE_ACT_SILU, kRelu = ACTSPARSE_ACT_RELU, kGelu = ACTSPARSE_ACT_GELU,
              kGeluTanh = ACTSPARSE_ACT_GELU_TANH;

float activation_scalar(int act, float g) {
  switch (act) {
    case kSilu: return g / (1.0f + std::exp(-g));
    case kRelu: return g > 0.0f ? g : 0.0f;
    case kGelu: return 0.5f * g * (1.0f + std::erf(g * 0.70710678118654752f));
    default: break;
  }
  constexpr float kC = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * g * (1.0f + std::tanh(kC * (g + 0.044715f * g * g * g)));
}

// silu(g) = g * sigmoid(g), the sigmoid from e^-|g| (which cannot overflow); relu = max(g, 0)
// (0 for NaN, as the scalar path).
template <class V>
inline typename V::vec activation_vec(int act, typename V::vec g) {
  if (act == kRelu) return V::max(g, V::zero());
  const typename V::vec e = V::exp_nonpositive(V::mul(V::abs(g), V::set1(-1.0f)));
  const typename V::vec inv = V::div(V::set1(1.0f), V::add(V::set1(1.0f), e));
  return V::mul(g, V::where_nonnegative(g, inv, V::mul(e, inv)));
}

// m[b, c] = act(gate) * up over the columns of gu [B, n], gate and up interleaved in groups of
// `group` (gate columns of a group, then its up columns); m is [B, n / 2] of dtype `dtype`.
// The vector path takes silu and relu over groups of whole vectors; the rest runs scalar.
template <class V>
void gate_times_up_vec(int act, const float* gu, int64_t B, int64_t n, int64_t group, void* out, int dtype) {
  constexpr int L = V::lanes;
  const int64_t j = n / 2;
  float block[L];
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c0 = 0; c0 < j; c0 += group) {
      const float* gate = gu + b * n + c0 * 2;
      for (int64_t i = 0; i < group; i += L) {
        V::store(block, V::mul(activation_vec<V>(act, V::load(gate + i)), V::load(gate + group + i)));
        store_activations(block, L, out, b * j + c0 + i, dtype);
      }
    }
}

void gate_times_up_scalar(int act, const float* gu, int64_t B, int64_t n, int64_t group, void* out, int dtype) {
  const int64_t j = n / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < j; ++c) {
      const int64_t gate = b * n + c / group * 2 * group + c % group;
      const float m = activation_scalar(act, gu[gate]) * gu[gate + group];
      store_activations(&m, 1, out, b * j + c, dtype);
    }
}

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

// The thread count the torch ops (cpu_torch_ops.cpp) run the kernels with; set_threads returns
// -1 (nothing changed) below 1.
int actsparse_cpu_threads(void) { return g_threads.load(std::memory_order_relaxed); }

int actsparse_cpu_set_threads(int threads) {
  if (threads < 1) return -1;
  g_threads.store(threads, std::memory_order_relaxed);
  return threads;
}

// Activations (x, a) and outputs (y, m) are of dtype `act_dtype` (0 f32, 1 bf16, 2 f16: the
// model's dtype; input_sparse takes x's and y's apart, `x_dtype` and `y_dtype`, so that a
// caller can keep an fp32 product), widened to fp32 on entry and rounded once on the way out; weights of dtype
// `w_dtype`; scale, threshold and bias are fp32. `threads` threads (0: one per hardware thread).
// Each returns 0, or -1 for an unknown dtype.

// input_sparse over `wt` [K, N] (input-major); threshold NULL: dense (every row kept).
int actsparse_input_sparse_ex(const void* x, int64_t B, int64_t K, const float* scale, const float* threshold,
                              const void* wt, int wt_dtype, int64_t N, const float* bias, void* y, int x_dtype,
                              int y_dtype, int threads) {
  if (!known_dtype(x_dtype) || !known_dtype(y_dtype)) return -1;
  Activations in(x, B * K, x_dtype, 0);
  Output out(y, B * N, y_dtype);
  const int rc = by_dtype<InputSparseFn>(wt_dtype, in.data, B, K, scale, threshold, wt, N, bias, out.data,
                                         threads);
  out.finish();
  return rc;
}

// y (dtype y_dtype) = product + z b^T, the low-rank term (add_lowrank above) added to the GEMV's
// fp32 product before its one rounding; product may be y itself when y is fp32. Returns 0, or -1
// for an unknown dtype.
int actsparse_add_lowrank(const float* product, const void* z, int z_dtype, const void* b, int b_dtype, int64_t B,
                          int64_t N, int64_t R, void* y, int y_dtype) {
  if (!known_dtype(y_dtype) || !known_dtype(z_dtype)) return -1;
  Activations zf(z, B * R, z_dtype, 1);
  Output out(y, B * N, y_dtype);
  if (out.data != product) std::memcpy(out.data, product, B * N * sizeof(float));
  const int rc = by_dtype<AddLowrankFn>(b_dtype, out.data, zf.data, b, B, N, R);
  out.finish();
  return rc;
}

// output_sparse_rows over `w` [J, D] (output-major); see above.
int actsparse_output_sparse_rows_ex(const void* x, const void* a, int64_t B, int64_t J, int64_t D,
                                    const float* threshold, const void* w, int w_dtype, void* m, int act_dtype,
                                    int threads) {
  if (!known_dtype(act_dtype)) return -1;
  Activations xin(x, B * D, act_dtype, 0), ain(a, B * J, act_dtype, 1);
  Output out(m, B * J, act_dtype);
  const int rc = by_dtype<OutputSparseRowsFn>(w_dtype, xin.data, ain.data, B, J, D, threshold, w, out.data, threads);
  out.finish();
  return rc;
}

// y[b, j] = bias[j] + dot(x[b, :], w[j, :]): the dense product over `w` [J, D] (nn.Linear's
// layout); bias may be NULL.
int actsparse_dense_rows(const void* x, int64_t B, int64_t D, const void* w, int w_dtype, int64_t J, const float* bias,
                         void* y, int act_dtype, int threads) {
  if (!known_dtype(act_dtype)) return -1;
  Activations in(x, B * D, act_dtype, 0);
  Output out(y, B * J, act_dtype);
  const int rc = by_dtype<DenseRowsFn>(w_dtype, in.data, B, D, w, J, bias, out.data, threads);
  out.finish();
  return rc;
}

// act(gate) * up (see gate_times_up_vec) from the fp32 product gu [B, n] into m [B, n / 2] of
// dtype `dtype`; act one of cpu_kernels.h's ACTSPARSE_ACT_ codes. Returns 0, or -1 for an
// unknown dtype or activation or a group that does not divide n / 2.
int actsparse_gate_times_up(const float* gu, int64_t B, int64_t n, int64_t group, int act, void* m, int dtype) {
  if (!known_dtype(dtype) || act < kSilu || act > kGeluTanh || group < 1 || n % 2 || (n / 2) % group) return -1;
  const int isa = current_isa();
  const bool vector_act = act == kSilu || act == kRelu;
#ifdef ACTSPARSE_HAVE_AVX512
  if (isa >= kAvx512 && vector_act && group % V512::lanes == 0) {
    gate_times_up_vec<V512>(act, gu, B, n, group, m, dtype);
    return 0;
  }
#endif
#ifdef ACTSPARSE_HAVE_AVX2
  if (isa >= kAvx2 && vector_act && group % V256::lanes == 0) {
    gate_times_up_vec<V256>(act, gu, B, n, group, m, dtype);
    return 0;
  }
#endif
  gate_times_up_scalar(act, gu, B, n, group, m, dtype);
  return 0;
}

// Decode attention (see decode_attention above) over q, k, v of dtype `dtype`, out [B, Q, Hq, D]
// of the same dtype; mask of kind `mask_kind` (0 none, 1 bool, 2 fp32 additive) with strides
// ms_b, ms_h, ms_q, ms_l.
int actsparse_decode_attention(const void* q, const void* k, const void* v, int dtype, int64_t B, int64_t Hq,
                               int64_t Hkv, int64_t Q, int64_t L, int64_t D, const void* mask, int mask_kind,
                               int64_t ms_b, int64_t ms_h, int64_t ms_q, int64_t ms_l, float scale, float softcap,
                               void* out, int threads) {
  if (!known_dtype(dtype) || mask_kind < kNoMask || mask_kind > kAddMask || Hkv < 1 || Hq % Hkv) return -1;
  Output o(out, B * Q * Hq * D, dtype);
  const int64_t ms[4] = {ms_b, ms_h, ms_q, ms_l};
  const int rc = by_dtype<DecodeAttentionFn>(dtype, q, k, v, B, Hq, Hkv, Q, L, D, mask, mask_kind, ms, scale, softcap,
                                             o.data, threads);
  o.finish();
  return rc;
}

}  // extern "C"
