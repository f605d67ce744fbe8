// The kernels of cpu_kernels.cpp as the CPU kernels of the actsparse:: ops, registered with the
// dispatcher in C++ (the ops' schemas, fakes and torch references are defined in ops.py). A
// decode step makes ~200 op calls; each goes from the dispatcher straight into C++, with no Python
// kernel (torch.library.custom_op's wrapper) or ctypes call in between.
//
// actsparse_register_cpu_ops(1) registers them (once; again after a 0), 0 drops the registration
// so that another CPU kernel can stand in (the Triton interpreter's, in tests). Argument errors
// raise through TORCH_CHECK (RuntimeError in Python); callers pass what ops.py documents.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace {

int dtype_code(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "cpu kernels take contiguous CPU tensors; ", what,
              " is on ", t.device(), (t.is_contiguous() ? "" : " and not contiguous"));
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default:
      TORCH_CHECK(false, "cpu kernels take float32, bfloat16 or float16 tensors; ", what, " is ", t.scalar_type());
  }
}

void same_dtype(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "cpu kernels take ", what, " of the activations' dtype ",
              x.scalar_type(), ", got ", t.scalar_type());
}

void matrix(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.dim() == 2, what, " must be 2-d, got ", t.dim(), "-d");
}

// A scale, threshold or bias as the kernels read it: fp32, contiguous (a copy when it is not).
struct Fp32 {
  at::Tensor held;
  const float* ptr = nullptr;
  explicit Fp32(const std::optional<at::Tensor>& t) {
    if (!t) return;
    held = t->scalar_type() == at::kFloat ? t->contiguous() : t->to(at::kFloat).contiguous();
    ptr = held.data_ptr<float>();
  }
};

void check_rc(int rc, const char* op) { TORCH_CHECK(rc == 0, "actsparse::", op, ": the cpu kernel refused its arguments"); }

at::Tensor input_sparse_linear(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& threshold,
                               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& lowrank_b, const std::optional<at::Tensor>& lowrank_z,
                               double) {
  const int act = dtype_code(x, "x"), wd = dtype_code(weight_t, "weight_t");
  matrix(x, "x");
  matrix(weight_t, "weight_t");
  TORCH_CHECK(x.size(1) == weight_t.size(0), "input_sparse_linear: x ", x.sizes(), " does not fit weight_t ",
              weight_t.sizes());
  const int64_t batch = x.size(0), k = x.size(1), n = weight_t.size(1);
  int zd = 0, bd = 0;
  int64_t rank = 0;
  if (lowrank_b) {
    TORCH_CHECK(lowrank_z.has_value(), "input_sparse_linear: lowrank_b without lowrank_z");
    zd = dtype_code(*lowrank_z, "lowrank_z");
    bd = dtype_code(*lowrank_b, "lowrank_b");
    matrix(*lowrank_z, "lowrank_z");
    matrix(*lowrank_b, "lowrank_b");
    rank = lowrank_b->size(1);
    TORCH_CHECK(lowrank_b->size(0) == n && lowrank_z->size(0) == batch && lowrank_z->size(1) == rank,
                "input_sparse_linear: lowrank_b ", lowrank_b->sizes(), " and lowrank_z ", lowrank_z->sizes(),
                " do not fit ", batch, " tokens of ", n, " outputs");
  }
  at::Tensor y = at::empty({batch, n}, x.options());
  const Fp32 t(threshold), s(scale), b(bias);
  // With a low-rank term the GEMV's fp32 product (y itself when fp32) takes the term before its
  // one rounding to the activations' dtype.
  static thread_local std::vector<float> product;
  float* fp32_out = act == 0 ? y.data_ptr<float>() : nullptr;
  if (lowrank_b && !fp32_out) {
    product.resize(batch * n);
    fp32_out = product.data();
  }
  check_rc(actsparse_input_sparse_ex(x.data_ptr(), batch, k, s.ptr, t.ptr, weight_t.data_ptr(), wd, n, b.ptr,
                                     lowrank_b ? static_cast<void*>(fp32_out) : y.data_ptr(), act,
                                     lowrank_b ? 0 : act, actsparse_cpu_threads()),
           "input_sparse_linear");
  if (lowrank_b) {
    check_rc(actsparse_add_lowrank(fp32_out, lowrank_z->data_ptr(), zd, lowrank_b->data_ptr(), bd, batch, n, rank,
                                   y.data_ptr(), act),
             "input_sparse_linear");
  }
  return y;
}

int activation_of(const std::string& act) {
  if (act == "silu") return ACTSPARSE_ACT_SILU;
  if (act == "relu") return ACTSPARSE_ACT_RELU;
  if (act == "gelu") return ACTSPARSE_ACT_GELU;
  TORCH_CHECK(act == "gelu_tanh", "input_sparse_gated: act must be one of gelu, gelu_tanh, relu, silu, got ", act);
  return ACTSPARSE_ACT_GELU_TANH;
}

at::Tensor input_sparse_gated(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& threshold,
                              const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& lowrank_b, const std::optional<at::Tensor>& lowrank_z,
                              int64_t group, c10::string_view act_view, double) {
  const int act = activation_of(std::string(act_view));
  const int wd = dtype_code(weight_t, "weight_t"), xd = dtype_code(x, "x");
  matrix(x, "x");
  matrix(weight_t, "weight_t");
  const int64_t batch = x.size(0), k = x.size(1), n = weight_t.size(1), j = n / 2;
  TORCH_CHECK(x.size(1) == weight_t.size(0) && n % 2 == 0 && group > 0 && j % group == 0,
              "input_sparse_gated: x ", x.sizes(), ", weight_t ", weight_t.sizes(), " and group ", group, " do not fit");
  static thread_local std::vector<float> gu;
  gu.resize(batch * n);
  const Fp32 t(threshold), s(scale), b(bias);
  check_rc(actsparse_input_sparse_ex(x.data_ptr(), batch, k, s.ptr, t.ptr, weight_t.data_ptr(), wd, n, b.ptr,
                                     gu.data(), xd, 0, actsparse_cpu_threads()),
           "input_sparse_gated");
  if (lowrank_b) {  // into the fp32 product, before the activation
    TORCH_CHECK(lowrank_z.has_value(), "input_sparse_gated: lowrank_b without lowrank_z");
    const int zd = dtype_code(*lowrank_z, "lowrank_z"), bd = dtype_code(*lowrank_b, "lowrank_b");
    matrix(*lowrank_z, "lowrank_z");
    matrix(*lowrank_b, "lowrank_b");
    const int64_t rank = lowrank_b->size(1);
    TORCH_CHECK(lowrank_b->size(0) == n && lowrank_z->size(0) == batch && lowrank_z->size(1) == rank,
                "input_sparse_gated: lowrank_b ", lowrank_b->sizes(), " and lowrank_z ", lowrank_z->sizes(),
                " do not fit ", batch, " tokens of ", n, " outputs");
    check_rc(actsparse_add_lowrank(gu.data(), lowrank_z->data_ptr(), zd, lowrank_b->data_ptr(), bd, batch, n, rank,
                                   gu.data(), 0),
             "input_sparse_gated");
  }
  at::Tensor m = at::empty({batch, j}, x.options());
  // act(gate) * up from the fp32 product, rounded once to the activations' dtype (no conversion
  // ops around the kernel)
  check_rc(actsparse_gate_times_up(gu.data(), batch, n, group, act, m.data_ptr(), xd), "input_sparse_gated");
  return m;
}

at::Tensor output_sparse_rows(const at::Tensor& x, const at::Tensor& a, const at::Tensor& threshold,
                              const at::Tensor& weight, double) {
  const int act = dtype_code(x, "x"), wd = dtype_code(weight, "weight");
  dtype_code(a, "a");
  same_dtype(a, x, "a");
  matrix(x, "x");
  matrix(a, "a");
  matrix(weight, "weight");
  TORCH_CHECK(x.size(1) == weight.size(1) && a.size(0) == x.size(0) && a.size(1) == weight.size(0),
              "output_sparse_rows: x ", x.sizes(), ", a ", a.sizes(), " and weight ", weight.sizes(), " do not fit");
  const int64_t batch = x.size(0), d = x.size(1), rows = weight.size(0);
  at::Tensor m = at::empty({batch, rows}, x.options());
  const Fp32 t(threshold);
  check_rc(actsparse_output_sparse_rows_ex(x.data_ptr(), a.data_ptr(), batch, rows, d, t.ptr, weight.data_ptr(), wd,
                                           m.data_ptr(), act, actsparse_cpu_threads()),
           "output_sparse_rows");
  return m;
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const int act = dtype_code(x, "x"), wd = dtype_code(weight, "weight");
  matrix(x, "x");
  matrix(weight, "weight");
  TORCH_CHECK(x.size(1) == weight.size(1), "dense_linear: x ", x.sizes(), " does not fit weight ", weight.sizes());
  const int64_t batch = x.size(0), d = x.size(1), rows = weight.size(0);
  at::Tensor y = at::empty({batch, rows}, x.options());
  const Fp32 b(bias);
  check_rc(actsparse_dense_rows(x.data_ptr(), batch, d, weight.data_ptr(), wd, rows, b.ptr, y.data_ptr(), act,
                                actsparse_cpu_threads()),
           "dense_linear");
  return y;
}

// The k largest scores (|x| times scale) of each row kept, the rest zero: ops.topk_mask's
// semantics exactly (of equal scores the lowest indices first; a row with a NaN score keeps
// nothing, as the reference's amin over its top k is then NaN), by a selection instead of the
// reference's dozen tensor ops (~100 us a call on the CPU, four calls a layer in LaRoSA).
template <class T>
void topk_rows(const T* x, const float* scale, int64_t batch, int64_t d, int64_t k, T* out) {
  std::vector<float> score(d), work(d);
  for (int64_t b = 0; b < batch; ++b) {
    const T* row = x + b * d;
    T* o = out + b * d;
    bool nan = false;
    for (int64_t i = 0; i < d; ++i) {
      score[i] = std::abs(static_cast<float>(row[i])) * (scale ? scale[i] : 1.0f);
      nan |= std::isnan(score[i]);
    }
    if (nan) {
      std::fill(o, o + d, T(0));
      continue;
    }
    work = score;
    std::nth_element(work.begin(), work.begin() + (k - 1), work.end(), std::greater<float>());
    const float kth = work[k - 1];
    int64_t room = k;
    for (int64_t i = 0; i < d; ++i) room -= score[i] > kth;
    for (int64_t i = 0; i < d; ++i) {
      const bool keep = score[i] > kth || (score[i] == kth && room-- > 0);
      o[i] = keep ? row[i] : T(0);
    }
  }
}

at::Tensor topk_kept(const at::Tensor& x_in, int64_t k, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.device().is_cpu(), "topk_kept: a CPU tensor of at least one dimension, got ",
              x_in.sizes(), " on ", x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t d = x.size(-1), batch = d ? x.numel() / d : 0;
  TORCH_CHECK(k >= 1 && k <= d, "topk_kept: k must be in 1..", d, ", got ", k);
  TORCH_CHECK(!scale || scale->numel() == d, "topk_kept: scale must have ", d, " entries, got ", scale->numel());
  const Fp32 s(scale);
  at::Tensor out = at::empty(x.sizes(), x.options());
  switch (x.scalar_type()) {
    case at::kFloat: topk_rows(x.data_ptr<float>(), s.ptr, batch, d, k, out.data_ptr<float>()); break;
    case at::kBFloat16:
      topk_rows(x.data_ptr<at::BFloat16>(), s.ptr, batch, d, k, out.data_ptr<at::BFloat16>());
      break;
    case at::kHalf: topk_rows(x.data_ptr<at::Half>(), s.ptr, batch, d, k, out.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "topk_kept: float32, bfloat16 or float16 activations, got ", x.scalar_type());
  }
  return out;
}

at::Tensor decode_attention(const at::Tensor& query_in, const at::Tensor& key_in, const at::Tensor& value_in,
                            const std::optional<at::Tensor>& mask_in, double scale, double softcap) {
  TORCH_CHECK(query_in.dim() == 4 && key_in.dim() == 4 && value_in.sizes() == key_in.sizes(),
              "decode_attention: query [B,Hq,Q,D] and key = value [B,Hkv,L,D], got ", query_in.sizes(), ", ",
              key_in.sizes(), ", ", value_in.sizes());
  const at::Tensor query = query_in.contiguous(), key = key_in.contiguous(), value = value_in.contiguous();
  const int64_t batch = query.size(0), heads = query.size(1), q_len = query.size(2), head_dim = query.size(3);
  const int64_t kv_heads = key.size(1), kv_len = key.size(2);
  TORCH_CHECK(key.size(0) == batch && key.size(3) == head_dim && kv_heads > 0 && heads % kv_heads == 0,
              "decode_attention: key ", key.sizes(), " does not fit query ", query.sizes(),
              " (same batch and head size, query heads a multiple of KV heads)");
  const int dt = dtype_code(query, "query");
  same_dtype(key, query, "key");
  same_dtype(value, query, "value");
  at::Tensor out = at::empty({batch, q_len, heads, head_dim}, query.options());
  int kind = 0;
  const void* address = nullptr;
  std::vector<int64_t> strides(4, 0);
  at::Tensor mask;
  if (mask_in) {
    TORCH_CHECK(mask_in->dim() == 4 && (mask_in->scalar_type() == at::kBool || mask_in->is_floating_point()),
                "decode_attention: a 4-d boolean or additive float mask, got ", mask_in->scalar_type(), " ",
                mask_in->sizes());
    mask = mask_in->scalar_type() == at::kBool || mask_in->scalar_type() == at::kFloat ? *mask_in
                                                                                          : mask_in->to(at::kFloat);
    mask = mask.expand({batch, heads, q_len, kv_len});  // broadcast dimensions get stride 0
    kind = mask.scalar_type() == at::kBool ? 1 : 2;
    address = mask.data_ptr();
    strides = mask.strides().vec();
  }
  check_rc(actsparse_decode_attention(query.data_ptr(), key.data_ptr(), value.data_ptr(), dt, batch, heads, kv_heads,
                                      q_len, kv_len, head_dim, address, kind, strides[0], strides[1], strides[2],
                                      strides[3], static_cast<float>(scale), static_cast<float>(softcap),
                                      out.data_ptr(), actsparse_cpu_threads()),
           "decode_attention");
  return out;
}

constexpr const char* kOps[] = {"input_sparse_linear", "input_sparse_gated", "output_sparse_rows", "dense_linear",
                                 "decode_attention", "topk_kept"};

// Never destroyed at exit: the dispatcher may be torn down first.
torch::Library* g_library = nullptr;
// The ops' autograd kernel for CPU tensors: torch's C++ "not implemented" one, which gives outputs
// a grad_fn that raises on backward (what torch.library.custom_op's Python autograd kernel does
// for an op with no backward) at a fraction of its cost: ~5 us a call, ~150 calls a decode step.
torch::Library* g_autograd_library = nullptr;

}  // namespace

extern "C" int actsparse_register_cpu_ops(int on) {
  try {
    if (!on) {
      delete g_library;
      delete g_autograd_library;
      g_library = g_autograd_library = nullptr;
      return 0;
    }
    if (g_library) return 0;
    auto library = std::make_unique<torch::Library>(torch::Library::IMPL, "actsparse", c10::DispatchKey::CPU, __FILE__,
                                                    __LINE__);
    library->impl("input_sparse_linear", TORCH_FN(input_sparse_linear));
    library->impl("input_sparse_gated", TORCH_FN(input_sparse_gated));
    library->impl("output_sparse_rows", TORCH_FN(output_sparse_rows));
    library->impl("dense_linear", TORCH_FN(dense_linear));
    library->impl("decode_attention", TORCH_FN(decode_attention));
    library->impl("topk_kept", TORCH_FN(topk_kept));
    auto autograd = std::make_unique<torch::Library>(torch::Library::IMPL, "actsparse", c10::DispatchKey::AutogradCPU,
                                                     __FILE__, __LINE__);
    for (const char* op : kOps) autograd->impl(op, torch::autograd::autogradNotImplementedFallback());
    g_library = library.release();
    g_autograd_library = autograd.release();
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}
