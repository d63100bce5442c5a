// The forward GEMM of patch_embed and linear_unpatchify on cuBLASLt with kept plans
// (declared in csrc/linear_gemm.h). Host compiler.
//
// Why: the H100 timed our patch_embed forward at 0.190 ms against 0.109 ms of kernels (the
// gather 8.5 us, the GEMM 100 us): the GEMM starts only when the host has issued it, and
// ATen's addmm spent about 40 us of that host's time before its launch (torch.addmm, cProfile;
// the compiled permute + nn.Linear calls the same addmm). For a bfloat16 bias GEMM addmm
// builds the cuBLASLt descriptors, asks cuBLASLt's heuristic for an algorithm and frees them
// again at every call, beside its dispatcher and argument layers. Here the descriptors and
// the heuristic's answer are made once per (device, dtype, M, N, K, bias, alignments) and
// reused: a call sets the bias pointer and calls cublasLtMatmul. The same library, the same
// kind of heuristic answer (the nvjet kernels addmm's profile shows), the same float32
// accumulation.
//
// The cuBLASLt entry points are looked up in the libcublasLt torch has loaded (dlopen with
// RTLD_NOLOAD), so _C gains no link dependency whose file name and place differ across CUDA
// packagings; without it every call takes ATen's path. The plans live in one process-wide
// table behind a mutex (a plan's descriptor carries the bias pointer of the call using it),
// and are never freed at exit (the library may be gone by then); past kMaxPlans (a training
// run whose packs change the token count every step) the table is cleared.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContextLight.h>
#include <ATen/cuda/EmptyTensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <dlfcn.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "linear_gemm.h"

namespace vdit {
namespace {

struct LtApi {
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
  std::string source;  // the library the entry points came from, or why there are none
  bool ok = false;
};

template <typename Fn>
bool lookup(void* lib, const char* name, Fn& fn) {
  fn = reinterpret_cast<Fn>(dlsym(lib, name));
  return fn != nullptr;
}

const LtApi& lt_api() {
  static const LtApi api = [] {
    LtApi a;
    // the library of the cuBLAS major release these headers are (torch's build's)
    const std::string name = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* lib = dlopen(name.c_str(), RTLD_LAZY | RTLD_NOLOAD);
    if (lib == nullptr) {
      a.source = name + " is not loaded in this process";
      return a;
    }
    a.ok = lookup(lib, "cublasLtMatmulDescCreate", a.desc_create) &&
           lookup(lib, "cublasLtMatmulDescDestroy", a.desc_destroy) &&
           lookup(lib, "cublasLtMatmulDescSetAttribute", a.desc_set) &&
           lookup(lib, "cublasLtMatrixLayoutCreate", a.layout_create) &&
           lookup(lib, "cublasLtMatrixLayoutDestroy", a.layout_destroy) &&
           lookup(lib, "cublasLtMatmulPreferenceCreate", a.pref_create) &&
           lookup(lib, "cublasLtMatmulPreferenceDestroy", a.pref_destroy) &&
           lookup(lib, "cublasLtMatmulPreferenceSetAttribute", a.pref_set) &&
           lookup(lib, "cublasLtMatmulAlgoGetHeuristic", a.heuristic) && lookup(lib, "cublasLtMatmul", a.matmul);
    a.source = a.ok ? name : name + " lacks a cuBLASLt entry point";
    return a;
  }();
  return api;
}

// The largest power of two <= 256 dividing the address (cuBLASLt's alignment preference).
uint32_t alignment(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t a = 256;
  while (a > 1 && address % a != 0) a /= 2;
  return a;
}

struct PlanKey {
  int device;
  int dtype;
  int64_t m, n, k;
  bool bias;
  uint32_t align_a, align_w, align_out, align_bias;
  size_t workspace;
  bool operator==(const PlanKey& o) const {
    return device == o.device && dtype == o.dtype && m == o.m && n == o.n && k == o.k && bias == o.bias &&
           align_a == o.align_a && align_w == o.align_w && align_out == o.align_out &&
           align_bias == o.align_bias && workspace == o.workspace;
  }
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& key) const {
    size_t h = 0;
    for (uint64_t v : {uint64_t(key.device), uint64_t(key.dtype), uint64_t(key.m), uint64_t(key.n), uint64_t(key.k),
                       uint64_t(key.bias), uint64_t(key.align_a), uint64_t(key.align_w), uint64_t(key.align_out),
                       uint64_t(key.align_bias), uint64_t(key.workspace)})
      h = h * 1000003u ^ std::hash<uint64_t>()(v);
    return h;
  }
};

// Descriptors of out^T (N x M, column-major: row-major out) = w (K x N column-major,
// transposed) x a^T (K x M column-major: row-major a), bias along out's N, and the
// heuristic's algorithm for them; usable = false where cuBLASLt offered none.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t w_layout = nullptr, a_layout = nullptr, out_layout = nullptr;
  cublasLtMatmulAlgo_t algo;
  bool usable = false;
};

void destroy(const LtApi& api, Plan& plan) {
  if (plan.desc) api.desc_destroy(plan.desc);
  for (auto layout : {plan.w_layout, plan.a_layout, plan.out_layout})
    if (layout) api.layout_destroy(layout);
}

Plan make_plan(const LtApi& api, const PlanKey& key, cudaDataType_t type, cublasLtHandle_t handle) {
  Plan plan;
  const bool made =
      api.desc_create(&plan.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
      api.layout_create(&plan.w_layout, type, key.k, key.n, key.k) == CUBLAS_STATUS_SUCCESS &&
      api.layout_create(&plan.a_layout, type, key.k, key.m, key.k) == CUBLAS_STATUS_SUCCESS &&
      api.layout_create(&plan.out_layout, type, key.n, key.m, key.n) == CUBLAS_STATUS_SUCCESS;
  if (!made) return plan;
  const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
  const cublasLtEpilogue_t epilogue = key.bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (api.desc_set(plan.desc, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof(transa)) != CUBLAS_STATUS_SUCCESS ||
      api.desc_set(plan.desc, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof(transb)) != CUBLAS_STATUS_SUCCESS ||
      api.desc_set(plan.desc, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)) != CUBLAS_STATUS_SUCCESS)
    return plan;
  cublasLtMatmulPreference_t pref = nullptr;
  if (api.pref_create(&pref) != CUBLAS_STATUS_SUCCESS) return plan;
  // split-K partial sums are reduced in float32, never in the 16-bit output type
  const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_MASK & ~CUBLASLT_REDUCTION_SCHEME_OUTPUT_TYPE;
  const uint64_t workspace = key.workspace;
  bool set = api.pref_set(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace)) ==
                 CUBLAS_STATUS_SUCCESS &&
             api.pref_set(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction, sizeof(reduction)) ==
                 CUBLAS_STATUS_SUCCESS;
  // operand A of the product is w, B is a, C and D are out
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligns[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_w},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_out},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_out}};
  for (const auto& [attr, value] : aligns)
    set = set && api.pref_set(pref, attr, &value, sizeof(value)) == CUBLAS_STATUS_SUCCESS;
  cublasLtMatmulHeuristicResult_t result;
  std::memset(&result, 0, sizeof(result));
  int found = 0;
  if (set && api.heuristic(handle, plan.desc, plan.w_layout, plan.a_layout, plan.out_layout, plan.out_layout, pref,
                           1, &result, &found) == CUBLAS_STATUS_SUCCESS && found > 0) {
    plan.algo = result.algo;
    plan.usable = true;
  }
  api.pref_destroy(pref);
  return plan;
}

constexpr size_t kMaxPlans = 256;

struct PlanTable {
  std::mutex mutex;
  std::unordered_map<PlanKey, Plan, PlanKeyHash> plans;
};

PlanTable& plan_table() {
  static PlanTable* table = new PlanTable();  // never freed: see the file's comment
  return *table;
}

std::atomic<int64_t> lt_calls{0}, aten_calls{0};

bool lt_disabled() {
  const char* v = std::getenv("VDIT_CUBLASLT");  // read per call: a benchmark switches it
  return v != nullptr && std::strcmp(v, "0") == 0;
}

// out = a @ w^T (+ bias) with cuBLASLt; false where this path does not apply (the caller
// runs ATen's instead).
bool lt_linear(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  const auto dtype = a.scalar_type();
  const bool with_bias = bias.has_value() && bias->defined();
  if (!a.is_cuda() || (dtype != at::kHalf && dtype != at::kBFloat16) || w.scalar_type() != dtype ||
      a.dim() != 2 || w.dim() != 2 || a.size(1) != w.size(1) || !a.is_contiguous() || !w.is_contiguous() ||
      a.size(0) == 0 || a.size(1) == 0 || w.size(0) == 0 || a.size(0) > INT32_MAX || a.size(1) > INT32_MAX ||
      w.size(0) > INT32_MAX || lt_disabled())
    return false;
  // the bias epilogue reads the vector in wide loads: 16-byte aligned, else ATen's path
  if (with_bias && (bias->scalar_type() != dtype || bias->dim() != 1 || bias->size(0) != w.size(0) ||
                    !bias->is_contiguous() || alignment(bias->data_ptr()) < 16))
    return false;
  const LtApi& api = lt_api();
  if (!api.ok) return false;
  c10::cuda::CUDAGuard guard(a.device());
  out = at::detail::empty_cuda({a.size(0), w.size(0)}, a.options());
  const PlanKey key{a.get_device(), static_cast<int>(dtype), a.size(0), w.size(0), a.size(1), with_bias,
                    alignment(a.data_ptr()), alignment(w.data_ptr()), alignment(out.data_ptr()),
                    with_bias ? alignment(bias->data_ptr()) : 0, at::cuda::getCUDABlasLtWorkspaceSize()};
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  PlanTable& table = plan_table();
  std::lock_guard<std::mutex> lock(table.mutex);
  auto it = table.plans.find(key);
  if (it == table.plans.end()) {
    if (table.plans.size() >= kMaxPlans) {
      for (auto& entry : table.plans) destroy(api, entry.second);
      table.plans.clear();
    }
    const cudaDataType_t type = dtype == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
    it = table.plans.emplace(key, make_plan(api, key, type, handle)).first;
  }
  Plan& plan = it->second;
  if (!plan.usable) return false;
  if (with_bias) {
    const void* bias_ptr = bias->data_ptr();
    if (api.desc_set(plan.desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias_ptr, sizeof(bias_ptr)) !=
        CUBLAS_STATUS_SUCCESS)
      return false;
  }
  const float one = 1.0f, zero = 0.0f;
  const cublasStatus_t status =
      api.matmul(handle, plan.desc, &one, w.data_ptr(), plan.w_layout, a.data_ptr(), plan.a_layout, &zero,
                 out.data_ptr(), plan.out_layout, out.data_ptr(), plan.out_layout, &plan.algo,
                 at::cuda::getCUDABlasLtWorkspace(), key.workspace, c10::cuda::getCurrentCUDAStream().stream());
  if (status != CUBLAS_STATUS_SUCCESS) {
    plan.usable = false;  // not again for this key: ATen's path from now on
    return false;
  }
  lt_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}

}  // namespace

at::Tensor linear_forward(const at::Tensor& a, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  at::Tensor out;
  if (lt_linear(a, w, bias, out)) return out;
  if (a.is_cuda()) aten_calls.fetch_add(1, std::memory_order_relaxed);
  return bias.has_value() && bias->defined() ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
}

std::string linear_forward_info() {
  const LtApi& api = lt_api();
  size_t plans = 0, usable = 0;
  {
    PlanTable& table = plan_table();
    std::lock_guard<std::mutex> lock(table.mutex);
    plans = table.plans.size();
    for (const auto& entry : table.plans) usable += entry.second.usable;
  }
  return "cuBLASLt " + (api.ok ? "from " + api.source : "unavailable (" + api.source + ")") + ": " +
         std::to_string(plans) + " plans (" + std::to_string(usable) + " usable), " +
         std::to_string(lt_calls.load()) + " calls on cuBLASLt, " + std::to_string(aten_calls.load()) +
         " CUDA calls on ATen";
}

}  // namespace vdit
