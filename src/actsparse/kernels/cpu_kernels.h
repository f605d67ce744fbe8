// The C ABI of cpu_kernels.cpp (its comments say what each function computes), used by
// cpu_torch_ops.cpp and, for the settings, by cpu_ops.py through ctypes.
#pragma once
#include <cstdint>

// The activations of actsparse_gate_times_up.
enum { ACTSPARSE_ACT_SILU = 0, ACTSPARSE_ACT_RELU = 1, ACTSPARSE_ACT_GELU = 2, ACTSPARSE_ACT_GELU_TANH = 3 };

extern "C" {
int actsparse_cpu_isa(void);
int actsparse_cpu_set_isa(int isa);
int actsparse_cpu_threads(void);
int actsparse_cpu_set_threads(int threads);
int actsparse_input_sparse_ex(const void* x, int64_t B, int64_t K, const float* scale, const float* threshold,
                              const void* wt, int wt_dtype, int64_t N, const float* bias, void* y, int x_dtype,
                              int y_dtype, int threads);
int actsparse_output_sparse_rows_ex(const void* x, const void* a, int64_t B, int64_t J, int64_t D,
                                    const float* threshold, const void* w, int w_dtype, void* m, int act_dtype,
                                    int threads);
int actsparse_add_lowrank(const float* product, const void* z, int z_dtype, const void* b, int b_dtype, int64_t B,
                          int64_t N, int64_t R, void* y, int y_dtype);
int actsparse_gate_times_up(const float* gu, int64_t B, int64_t n, int64_t group, int act, void* m, int dtype);
int actsparse_dense_rows(const void* x, int64_t B, int64_t D, const void* w, int w_dtype, int64_t J, const float* bias,
                         void* y, int act_dtype, int threads);
int actsparse_decode_attention(const void* q, const void* k, const void* v, int dtype, int64_t B, int64_t Hq,
                               int64_t Hkv, int64_t Q, int64_t L, int64_t D, const void* mask, int mask_kind,
                               int64_t ms_b, int64_t ms_h, int64_t ms_q, int64_t ms_l, float scale, float softcap,
                               void* out, int threads);
}
