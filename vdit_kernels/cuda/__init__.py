"""CUDA kernels from csrc/, compiled into vdit_kernels._C (namespace torch.ops.vdit_C).

One module per op family (vdit_kernels.backend imports them on first use); each defines
only the contract functions it implements (the backend checks per op). Importing this
package loads the extension, which registers the ops.
"""
from .. import backend as _backend

_backend.extension()
