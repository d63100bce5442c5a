// vdit_kernels._C.direct_<op>: the cuda backend's patch ops as plain Python functions,
// called without the dispatcher: patchify / unpatchify (csrc/patch_host.cpp, the same
// checks and kernels) and patch_embed / linear_unpatchify as their Autograd kernels run them
// (the C++ autograd Function of csrc/patch_gemm_host.cpp). vdit_kernels/cuda/patch.py calls
// these; torch.ops.vdit_C.* stay registered for everything else (users, the profiler's op
// records, torch.compile's graphs, which hold the torch.ops.vdit ops above them).
//
// Why: on the train pack the H100 machine's host took 67 / 81 us to issue a patchify /
// unpatchify whose kernels take 39 / 35 us, and torch.ops' boxed call (arguments parsed
// against the schema into IValues, the dispatcher's fallbacks, the outputs boxed back) is
// one of its layers: a stand-in op of patchify's schema cost 6.9 us a call through
// torch.ops and 3.2 us so, 14.0 / 8.7 us for unpatchify's (6 small CPU tensors,
// 2026-11-27). Arguments are what the ops' schemas take (lists of tensors, lists of Python
// ints, None for an absent bias); errors are raised as the registered ops raise them.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/python_numbers.h>

#include <optional>
#include <vector>

#include "patch_ops.h"

namespace vdit {
namespace {

// A Python list or tuple as a vector of its items (borrowed references).
std::vector<PyObject*> items_of(PyObject* seq, const char* fn, const char* name) {
  TORCH_CHECK_TYPE(PyList_Check(seq) || PyTuple_Check(seq), "vdit_C.", fn, ": ", name,
                   " must be a list or tuple, got ", Py_TYPE(seq)->tp_name);
  PyObject** first = PySequence_Fast_ITEMS(seq);
  return std::vector<PyObject*>(first, first + PySequence_Fast_GET_SIZE(seq));
}

std::vector<at::Tensor> tensors_of(PyObject* seq, const char* fn, const char* name) {
  std::vector<at::Tensor> out;
  for (PyObject* item : items_of(seq, fn, name)) {
    TORCH_CHECK_TYPE(THPVariable_Check(item), "vdit_C.", fn, ": ", name, " must hold tensors, got ",
                     Py_TYPE(item)->tp_name);
    out.push_back(THPVariable_Unpack(item));
  }
  return out;
}

int64_t int_of(PyObject* obj, const char* fn, const char* name) {
  TORCH_CHECK_TYPE(THPUtils_checkLong(obj), "vdit_C.", fn, ": ", name,  // (never a bool)
                   " must be an int, got ", Py_TYPE(obj)->tp_name);
  return THPUtils_unpackLong(obj);
}

std::vector<int64_t> ints_of(PyObject* seq, const char* fn, const char* name) {
  std::vector<int64_t> out;
  for (PyObject* item : items_of(seq, fn, name)) out.push_back(int_of(item, fn, name));
  return out;
}

const at::Tensor& tensor_of(PyObject* obj, const char* fn, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), "vdit_C.", fn, ": ", name, " must be a tensor, got ",
                   Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

std::optional<at::Tensor> optional_tensor_of(PyObject* obj, const char* fn, const char* name) {
  if (obj == Py_None) return std::nullopt;
  return tensor_of(obj, fn, name);
}

// direct_patchify(videos: list[Tensor], patch_size: list[int]) -> Tensor
PyObject* direct_patchify(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 2, "vdit_C.direct_patchify(videos, patch_size) takes 2 arguments, got ", nargs);
  const std::vector<at::Tensor> videos = tensors_of(args[0], "direct_patchify", "videos");
  const std::vector<int64_t> patch_size = ints_of(args[1], "direct_patchify", "patch_size");
  return THPVariable_Wrap(patchify_tokens(videos, patch_size));
  END_HANDLE_TH_ERRORS
}

// direct_unpatchify(tokens: Tensor, shapes: list[int], patch_size: list[int], channels: int)
//     -> list[Tensor]
PyObject* direct_unpatchify(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 4, "vdit_C.direct_unpatchify(tokens, shapes, patch_size, channels) takes "
                   "4 arguments, got ", nargs);
  const char* fn = "direct_unpatchify";
  const at::Tensor& tokens = tensor_of(args[0], fn, "tokens");
  const std::vector<int64_t> shapes = ints_of(args[1], fn, "shapes");
  const std::vector<int64_t> patch_size = ints_of(args[2], fn, "patch_size");
  const int64_t channels = int_of(args[3], fn, "channels");
  return THPVariable_WrapList(unpatchify_videos(tokens, shapes, patch_size, channels));
  END_HANDLE_TH_ERRORS
}

// direct_patch_embed(videos: list[Tensor], weight: Tensor, bias: Tensor | None) -> Tensor
PyObject* direct_patch_embed(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "vdit_C.direct_patch_embed(videos, weight, bias) takes 3 arguments, got ", nargs);
  const char* fn = "direct_patch_embed";
  const std::vector<at::Tensor> videos = tensors_of(args[0], fn, "videos");
  const at::Tensor& weight = tensor_of(args[1], fn, "weight");
  return THPVariable_Wrap(patch_embed_autograd(videos, weight, optional_tensor_of(args[2], fn, "bias")));
  END_HANDLE_TH_ERRORS
}

// direct_linear_unpatchify(x: Tensor, weight: Tensor, bias: Tensor | None, shapes: list[int],
//     patch_size: list[int], channels: int) -> list[Tensor]
PyObject* direct_linear_unpatchify(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 6, "vdit_C.direct_linear_unpatchify(x, weight, bias, shapes, patch_size, channels) "
                   "takes 6 arguments, got ", nargs);
  const char* fn = "direct_linear_unpatchify";
  const at::Tensor& x = tensor_of(args[0], fn, "x");
  const at::Tensor& weight = tensor_of(args[1], fn, "weight");
  const std::optional<at::Tensor> bias = optional_tensor_of(args[2], fn, "bias");
  const std::vector<int64_t> shapes = ints_of(args[3], fn, "shapes");
  const std::vector<int64_t> patch_size = ints_of(args[4], fn, "patch_size");
  const int64_t channels = int_of(args[5], fn, "channels");
  return THPVariable_WrapList(linear_unpatchify_autograd(x, weight, bias, shapes, patch_size, channels));
  END_HANDLE_TH_ERRORS
}

PyMethodDef kMethods[] = {
    {"direct_patchify", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_patchify)),
     METH_FASTCALL, "vdit_C::patchify's CUDA implementation, called without the dispatcher."},
    {"direct_unpatchify", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_unpatchify)),
     METH_FASTCALL, "vdit_C::unpatchify's CUDA implementation, called without the dispatcher."},
    {"direct_patch_embed", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_patch_embed)),
     METH_FASTCALL, "vdit_C::patch_embed as its Autograd kernel runs it, called without the dispatcher."},
    {"direct_linear_unpatchify",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_linear_unpatchify)), METH_FASTCALL,
     "vdit_C::linear_unpatchify as its Autograd kernel runs it, called without the dispatcher."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* direct_methods() { return kMethods; }

}  // namespace vdit
