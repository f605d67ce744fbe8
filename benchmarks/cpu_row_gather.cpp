// What one core reads when it gathers scattered weight rows, the access pattern of the
// input-sparse kernels (no arithmetic beyond a sum): a random share KEEP of the ROW_BYTES-byte
// rows of a K-row matrix, in row order, against the same bytes read in order, with software
// prefetch of the rows DIST ahead under four variants. Matrices rotate over > 512 MB so every
// read comes from memory; the best of 5 passes counts.
//
//   g++ -O3 -march=native benchmarks/cpu_row_gather.cpp -o /tmp/row_gather
//   /tmp/row_gather K ROW_BYTES KEEP [HUGE]     # e.g. /tmp/row_gather 1536 1152 0.5 (down, bf16)
//                                               # HUGE=1: madvise(MADV_HUGEPAGE) on the matrices
// Variants: "fwd T1" (lines in order, prefetch into L2, as the kernels do), "rev T1" (each row's
// lines backwards: the hardware prefetcher gets no stream), "fwd NTA", "fwd T0".
#include <immintrin.h>
#include <sys/mman.h>
#include <time.h>
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

static double now() { timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

template <int MODE>  // 0 fwd T1, 1 rev T1, 2 fwd NTA, 3 fwd T0
__attribute__((noinline)) float gather(const char* base, const int* rows, int n, int row_bytes, int dist) {
  __m512 s = _mm512_setzero_ps();
  const int lines = row_bytes / 64;
  for (int j = 0; j < n; j++) {
    const char* p = base + (size_t)rows[j] * row_bytes;
    const char* q = j + dist < n ? base + (size_t)rows[j + dist] * row_bytes : p;
    for (int l = 0; l < lines; l++) {
      const int o = MODE == 1 ? (lines - 1 - l) * 64 : l * 64;
      if (MODE <= 1) _mm_prefetch(q + o, _MM_HINT_T1);
      if (MODE == 2) _mm_prefetch(q + o, _MM_HINT_NTA);
      if (MODE == 3) _mm_prefetch(q + o, _MM_HINT_T0);
      s = _mm512_add_ps(s, _mm512_loadu_ps((const float*)(p + o)));
    }
  }
  return _mm512_reduce_add_ps(s);
}

int main(int argc, char** argv) {
  if (argc < 4) { fprintf(stderr, "usage: %s K ROW_BYTES KEEP [HUGE]\n", argv[0]); return 2; }
  const int K = atoi(argv[1]), row_bytes = atoi(argv[2]);
  const double keep = atof(argv[3]);
  const bool huge = argc > 4 && atoi(argv[4]);
  if (K < 1 || row_bytes < 64 || row_bytes % 64 || keep <= 0 || keep > 1) {
    fprintf(stderr, "need K >= 1, ROW_BYTES a positive multiple of 64, 0 < KEEP <= 1\n");
    return 2;
  }
  const size_t bytes = (size_t)K * row_bytes, size = (bytes + (2u << 20) - 1) / (2u << 20) * (2u << 20);
  const int copies = std::max<size_t>(4, (512u << 20) / bytes);
  std::vector<char*> mats(copies);
  for (auto& m : mats) {
    m = (char*)aligned_alloc(2u << 20, size);
    if (huge) madvise(m, size, MADV_HUGEPAGE);
    memset(m, 1, bytes);
  }
  std::mt19937 g(1);
  std::vector<std::vector<int>> kept(copies), all(copies);
  for (int c = 0; c < copies; c++)
    for (int k = 0; k < K; k++) {
      all[c].push_back(k);
      if (std::uniform_real_distribution<>(0, 1)(g) < keep) kept[c].push_back(k);
    }
  float sink = 0;
  auto run = [&](const char* name, auto f, const std::vector<std::vector<int>>& rows, int dist) {
    double best = 1e9;
    for (int rep = 0; rep < 5; rep++) {
      double t = now();
      size_t read = 0;
      for (int c = 0; c < copies; c++) { sink += f(mats[c], rows[c].data(), rows[c].size(), row_bytes, dist); read += rows[c].size(); }
      best = std::min(best, (now() - t) / (read * (double)row_bytes));
    }
    printf("%-8s dist %d: %5.1f GB/s\n", name, dist, 1e-9 / best);
  };
  printf("K=%d rows of %d bytes, %.0f%% kept at random%s\n", K, row_bytes, keep * 100, huge ? ", 2 MB pages" : "");
  run("in order", gather<0>, all, 2);
  for (int d : {2, 4, 8}) {
    run("fwd T1", gather<0>, kept, d);
    run("rev T1", gather<1>, kept, d);
    run("fwd NTA", gather<2>, kept, d);
    run("fwd T0", gather<3>, kept, d);
  }
  return sink == 12345.0f;  // keeps the reads
}
