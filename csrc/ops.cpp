// vdit_C: schemas of the compiled ops and the Python module stub.
//
// Every schema is defined here, in every build, so the op set is the same whether or
// not CUDA kernels were compiled; CUDA builds add implementations in csrc/*.cu with
// TORCH_LIBRARY_IMPL(vdit_C, CUDA, m). has_cuda() says which build this is.
#include <Python.h>
#include <torch/library.h>

#include <string>

// the setup.py defines below are token lists (13.0; 8.0,9.0a,9.0+PTX): no quotes to escape
// through ninja's shell; a variadic macro keeps the commas
#define VDIT_STRINGIFY_TOKENS(...) #__VA_ARGS__
#define VDIT_STRINGIFY(x) VDIT_STRINGIFY_TOKENS(x)

namespace vdit {

bool has_cuda() {
#ifdef VDIT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string build_info() {
  std::string info = "vdit_kernels._C";
#ifdef VDIT_WITH_CUDA
  info += " cuda=1";
#else
  info += " cuda=0";
#endif
#ifdef VDIT_CPU_ONLY_REASON  // setup.py's CPU_ONLY_REASONS
  info += VDIT_CPU_ONLY_REASON == 1   ? " (VDIT_SKIP_CUDA_BUILD=1)"
          : VDIT_CPU_ONLY_REASON == 2 ? " (no CUDA toolkit found at build time: set CUDA_HOME and rebuild)"
                                      : " (built against a CPU build of torch)";
#endif
#ifdef VDIT_CUDA_TOOLKIT  // setup.py: the toolkit and TORCH_CUDA_ARCH_LIST the kernels were built with
  info += " toolkit=" VDIT_STRINGIFY(VDIT_CUDA_TOOLKIT) " archs=" VDIT_STRINGIFY(VDIT_CUDA_ARCHS);
#endif
  return info;
}

}  // namespace vdit

TORCH_LIBRARY(vdit_C, m) {
  m.def("has_cuda() -> bool", &vdit::has_cuda);
  m.def("build_info() -> str", &vdit::build_info);
  // memory-bound ops; CUDA kernels in csrc/patch.cu and csrc/rope.cu (CUDA builds only)
  m.def("patchify(Tensor[] videos, int[] patch_size) -> Tensor");
  m.def("unpatchify(Tensor tokens, int[] shapes, int[] patch_size, int channels) -> Tensor[]");
  // patch embedding and the DiT output layer: our gather / scatter around ATen's GEMMs, with
  // a C++ autograd formula (csrc/patch_gemm_host.cpp, CUDA builds only)
  m.def("patch_embed(Tensor[] videos, Tensor weight, Tensor? bias) -> Tensor");
  m.def("patch_embed_backward(Tensor grad, Tensor[] videos, Tensor weight, bool with_bias) "
        "-> (Tensor[], Tensor, Tensor)");
  m.def("linear_unpatchify(Tensor x, Tensor weight, Tensor? bias, int[] shapes, int[] patch_size, "
        "int channels) -> Tensor[]");
  m.def("linear_unpatchify_backward(Tensor[] grad_videos, Tensor x, Tensor weight, int[] patch_size, "
        "bool with_bias) -> (Tensor, Tensor, Tensor)");
  m.def("rope_3d(Tensor q, Tensor k, Tensor positions, int[] dims, float theta, bool interleaved, "
        "bool inverse) -> (Tensor, Tensor)");
  m.def("rope_3d_(Tensor(a!) q, Tensor(b!) k, Tensor positions, int[] dims, float theta, "
        "bool interleaved, bool inverse) -> ()");
}

#ifdef VDIT_WITH_CUDA
namespace vdit {
PyMethodDef* direct_methods();  // csrc/direct_host.cpp
}
#endif

// Importing vdit_kernels._C runs the static registrations above. The module itself holds,
// in CUDA builds, the direct calls of csrc/direct_host.cpp; otherwise nothing.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "vdit_kernels compiled ops", -1, nullptr};
#ifdef VDIT_WITH_CUDA
  module_def.m_methods = vdit::direct_methods();
#endif
  return PyModule_Create(&module_def);
}
}
