// The CPU kernels' weight bandwidth next to a plain streaming read of the same bytes, one call
// at a time, interleaved, best of 15 passes by the calling thread's CPU time: on a shared machine
// the ratio (kernel / streaming read) holds still where absolute GB/s do not.
//
//   g++ -O3 -march=native -shared -fPIC -std=c++17 src/actsparse/kernels/cpu_kernels.cpp -o /tmp/libk.so
//   g++ -O3 -march=native benchmarks/cpu_kernels_vs_stream.cpp /tmp/libk.so -o /tmp/kvs -Wl,-rpath,/tmp
//   /tmp/kvs DTYPE K N LAYOUT [THREADS]     # DTYPE 0 fp32, 1 bf16, 2 fp16; LAYOUT 0 input-major
//                                           # (input_sparse, dense), 1 output-major (dense_rows)
//   e.g. /tmp/kvs 1 576 3072 0   (gate+up, bf16)     /tmp/kvs 1 576 49152 1   (LM head, bf16)
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <immintrin.h>
#include <time.h>
extern "C" int actsparse_input_sparse_ex(const void*, int64_t, int64_t, const float*, const float*, const void*, int, int64_t, const float*, void*, int, int, int);
extern "C" int actsparse_dense_rows(const void*, int64_t, int64_t, const void*, int, int64_t, const float*, void*, int, int);
static double now() { timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
float stream_read(const char* p, size_t n) {
  __m512 s = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
  for (size_t i = 0; i < n; i += 128) { s = _mm512_add_ps(s, _mm512_loadu_ps((const float*)(p + i))); s1 = _mm512_add_ps(s1, _mm512_loadu_ps((const float*)(p + i + 64))); }
  return _mm512_reduce_add_ps(_mm512_add_ps(s, s1));
}
int main(int argc, char** argv) {
  int dtype = atoi(argv[1]); int64_t K = atol(argv[2]), N = atol(argv[3]); int layout_out = atoi(argv[4]); int threads = argc > 5 ? atoi(argv[5]) : 1;
  size_t es = dtype == 0 ? 4 : 2; size_t bytes = K * N * es;
  size_t copies = std::max<size_t>(2, (256u << 20) / bytes);
  std::vector<std::vector<char>> ws(copies, std::vector<char>(bytes));
  for (auto& w : ws) for (size_t i = 0; i < bytes; i += 2) { uint16_t v = 0x3c00 + (rand() & 0xff); memcpy(&w[i], &v, 2); }
  std::vector<float> x(K, 0.5f), y(N + 64);
  double best_k = 1e9, best_s = 1e9; volatile float sink = 0;
  for (int rep = 0; rep < 15; ++rep) {
    double t0 = now();
    for (size_t c = 0; c < copies; ++c) {
      if (layout_out) actsparse_dense_rows(x.data(), 1, K, ws[c].data(), dtype, N, nullptr, y.data(), 0, threads);
      else actsparse_input_sparse_ex(x.data(), 1, K, nullptr, nullptr, ws[c].data(), dtype, N, nullptr, y.data(), 0, 0, threads);
    }
    double t1 = now();
    for (size_t c = 0; c < copies; ++c) sink += stream_read(ws[c].data(), bytes);
    double t2 = now();
    best_k = std::min(best_k, (t1 - t0) / copies); best_s = std::min(best_s, (t2 - t1) / copies);
  }
  printf("dtype=%d K=%ld N=%ld out=%d: kernel %.1f us %.1f GB/s | stream read %.1f us %.1f GB/s | ratio %.2f\n", dtype, K, N, layout_out,
         best_k * 1e6, bytes / best_k / 1e9, best_s * 1e6, bytes / best_s / 1e9, best_s / best_k);
}
