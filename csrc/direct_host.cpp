// vdit_kernels._C.direct_<op>: the cuda backend's ops as plain Python functions, called
// without the dispatcher: patchify / unpatchify (csrc/patch_host.cpp, the same checks and
// kernels), patch_embed / linear_unpatchify as their Autograd kernels run them (the C++
// autograd Function of csrc/patch_gemm_host.cpp) and rope_3d / rope_3d_ (csrc/rope_host.cpp).
// vdit_kernels/cuda/patch.py and cuda/rope.py call these; torch.ops.vdit_C.* stay registered
// for everything else (users, the profiler's op records, torch.compile's graphs, which hold
// the torch.ops.vdit ops above them).
//
// Why: on the train pack the H100 machine's host took 67 / 81 us to issue a patchify /
// unpatchify whose kernels take 39 / 35 us, and torch.ops' boxed call (arguments parsed
// against the schema into IValues, the dispatcher's fallbacks, the outputs boxed back) is
// one of its layers: a stand-in op of patchify's schema cost 6.9 us a call through
// torch.ops and 3.2 us so, 14.0 / 8.7 us for unpatchify's (6 small CPU tensors,
// 2026-11-27). Arguments are what the ops' schemas take (lists of tensors, lists of Python
// ints, None for an absent bias, floats, bools); errors are raised as the registered ops
// raise them.
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/utils/wrap_outputs.h>
#include <torch/csrc/utils/python_numbers.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "linear_gemm.h"
#include "patch_ops.h"
#include "rope_ops.h"

namespace vdit {
namespace {

// The positional arguments of one direct call: their count checked against `names` at
// construction, each read by position as its schema type, with a TypeError naming the
// function and the argument.
class Args {
 public:
  Args(const char* fn, PyObject* const* args, Py_ssize_t nargs, std::initializer_list<const char*> names)
      : fn_(fn), args_(args), names_(names) {
    if (nargs != static_cast<Py_ssize_t>(names_.size())) {
      std::string signature;
      for (const char* name : names_) signature += (signature.empty() ? "" : ", ") + std::string(name);
      TORCH_CHECK_TYPE(false, "vdit_C.", fn, "(", signature, ") takes ", names_.size(), " arguments, got ", nargs);
    }
  }

  const at::Tensor& tensor(size_t i) const {
    TORCH_CHECK_TYPE(THPVariable_Check(args_[i]), prefix(i), " must be a tensor, got ", type_name(args_[i]));
    return THPVariable_Unpack(args_[i]);
  }

  std::optional<at::Tensor> optional_tensor(size_t i) const {
    if (args_[i] == Py_None) return std::nullopt;
    return tensor(i);
  }

  std::vector<at::Tensor> tensors(size_t i) const {
    std::vector<at::Tensor> out;
    for (PyObject* item : items(i)) {
      TORCH_CHECK_TYPE(THPVariable_Check(item), prefix(i), " must hold tensors, got ", type_name(item));
      out.push_back(THPVariable_Unpack(item));
    }
    return out;
  }

  int64_t integer(size_t i) const { return int_of(args_[i], i); }

  double real(size_t i) const {  // a float, or an int (as a schema's float takes)
    TORCH_CHECK_TYPE(THPUtils_checkDouble(args_[i]) && !PyBool_Check(args_[i]), prefix(i),
                     " must be a float, got ", type_name(args_[i]));
    return THPUtils_unpackDouble(args_[i]);
  }

  bool boolean(size_t i) const {
    TORCH_CHECK_TYPE(PyBool_Check(args_[i]), prefix(i), " must be a bool, got ", type_name(args_[i]));
    return args_[i] == Py_True;
  }

  std::vector<int64_t> ints(size_t i) const {
    std::vector<int64_t> out;
    for (PyObject* item : items(i)) out.push_back(int_of(item, i));
    return out;
  }

 private:
  std::string prefix(size_t i) const { return std::string("vdit_C.") + fn_ + ": " + names_[i]; }
  static const char* type_name(PyObject* obj) { return Py_TYPE(obj)->tp_name; }

  // a Python list or tuple as its items (borrowed references)
  std::vector<PyObject*> items(size_t i) const {
    PyObject* seq = args_[i];
    TORCH_CHECK_TYPE(PyList_Check(seq) || PyTuple_Check(seq), prefix(i), " must be a list or tuple, got ",
                     type_name(seq));
    PyObject** first = PySequence_Fast_ITEMS(seq);
    return std::vector<PyObject*>(first, first + PySequence_Fast_GET_SIZE(seq));
  }

  int64_t int_of(PyObject* obj, size_t i) const {
    TORCH_CHECK_TYPE(THPUtils_checkLong(obj), prefix(i), " must be an int, got ", type_name(obj));  // (never a bool)
    return THPUtils_unpackLong(obj);
  }

  const char* fn_;
  PyObject* const* args_;
  std::vector<const char*> names_;
};

PyObject* direct_patchify(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a("direct_patchify", args, nargs, {"videos", "patch_size"});
  return THPVariable_Wrap(patchify_tokens(a.tensors(0), a.ints(1)));
  END_HANDLE_TH_ERRORS
}

PyObject* direct_unpatchify(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a("direct_unpatchify", args, nargs, {"tokens", "shapes", "patch_size", "channels"});
  return THPVariable_WrapList(unpatchify_videos(a.tensor(0), a.ints(1), a.ints(2), a.integer(3)));
  END_HANDLE_TH_ERRORS
}

PyObject* direct_patch_embed(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a("direct_patch_embed", args, nargs, {"videos", "weight", "bias"});
  return THPVariable_Wrap(patch_embed_autograd(a.tensors(0), a.tensor(1), a.optional_tensor(2)));
  END_HANDLE_TH_ERRORS
}

PyObject* direct_linear_unpatchify(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a("direct_linear_unpatchify", args, nargs, {"x", "weight", "bias", "shapes", "patch_size", "channels"});
  return THPVariable_WrapList(
      linear_unpatchify_autograd(a.tensor(0), a.tensor(1), a.optional_tensor(2), a.ints(3), a.ints(4), a.integer(5)));
  END_HANDLE_TH_ERRORS
}

PyObject* direct_rope_3d(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a("direct_rope_3d", args, nargs, {"q", "k", "positions", "dims", "theta", "interleaved", "inverse"});
  return torch::autograd::utils::wrap(rope_3d_tokens(a.tensor(0), a.tensor(1), a.tensor(2), a.ints(3), a.real(4),
                                                     a.boolean(5), a.boolean(6)));
  END_HANDLE_TH_ERRORS
}

PyObject* direct_rope_3d_(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  const Args a("direct_rope_3d_", args, nargs, {"q", "k", "positions", "dims", "theta", "interleaved", "inverse"});
  rope_3d_in_place(a.tensor(0), a.tensor(1), a.tensor(2), a.ints(3), a.real(4), a.boolean(5), a.boolean(6));
  Py_RETURN_NONE;
  END_HANDLE_TH_ERRORS
}

PyObject* linear_forward_info(PyObject*, PyObject* const*, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 0, "vdit_C.linear_forward_info() takes no arguments, got ", nargs);
  return PyUnicode_FromString(vdit::linear_forward_info().c_str());
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
    {"direct_rope_3d", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_rope_3d)), METH_FASTCALL,
     "vdit_C::rope_3d's CUDA implementation, called without the dispatcher."},
    {"direct_rope_3d_", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(direct_rope_3d_)), METH_FASTCALL,
     "vdit_C::rope_3d_'s CUDA implementation, called without the dispatcher."},
    {"linear_forward_info", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(linear_forward_info)),
     METH_FASTCALL, "What the forward GEMMs of patch_embed / linear_unpatchify used in this process (cuBLASLt plans, "
     "calls by path)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

PyMethodDef* direct_methods() { return kMethods; }

}  // namespace vdit
